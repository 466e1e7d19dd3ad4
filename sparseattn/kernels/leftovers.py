"""The planner's last pass (:mod:`sparseattn.engine.plan`): the keys outside every span of a tile become
shared columns or per-row residual runs.

Runs as in :mod:`sparseattn.kernels.planning`: row ``r`` allows ``lo[k] <= j < hi[k]`` for ``k`` in
``ptr[r]:ptr[r+1]``.  The per-tile loops that write into arrays :func:`plan_leftovers` grows are functions of
their own: an array reassigned inside a loop is reference-counted on every access there.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["plan_leftovers"]


@njit(cache=True, nogil=True)
def _shifted_cover(ptr, run_lo, run_hi, is_long, in_span, r0, r1):
    """The most rows of ``r0:r1`` over one key when the rows' runs are shifted copies, else -1; O(runs).

    Applies when no row is long, no run is in a span, every row has the same number of runs, each run
    index's starts and ends do not decrease down the rows and the run indices' hulls do not overlap (a
    neighbourhood's tile of one grid line: each kernel row's runs slide along it).  Then a key is covered by
    one run index only, and for sorted intervals the cover at row ``r``'s start is ``r + 1`` less the runs
    that end at or before it (two pointers).
    """
    R = ptr[r0 + 1] - ptr[r0]
    if R == 0:
        return -1
    for r in range(r0, r1):
        if is_long[r] or ptr[r + 1] - ptr[r] != R:
            return -1
    most = np.int64(0)
    prev_hi = np.int64(-1)
    for x in range(R):
        k_first = ptr[r0] + x
        if run_lo[k_first] < prev_hi:  # overlaps the previous run index's hull
            return -1
        p = r0
        for r in range(r0, r1):
            k = ptr[r] + x
            if in_span[k]:
                return -1
            if r > r0 and (run_lo[k] < run_lo[k - R] or run_hi[k] < run_hi[k - R]):
                return -1
            while run_hi[ptr[p] + x] <= run_lo[k]:
                p += 1
            most = max(most, r + 1 - p)
        prev_hi = run_hi[ptr[r1 - 1] + x]
    return most


@njit(cache=True, nogil=True)
def _hull_cover(ptr, run_lo, run_hi, is_long, in_span, r0, r1, h0, h1, dif):
    """The most rows of ``r0:r1`` over one key, from the runs' ends over their hull ``[h0, h1)``; leaves ``dif`` 0."""
    for r in range(r0, r1):
        if not is_long[r]:
            for k in range(ptr[r], ptr[r + 1]):
                if not in_span[k]:
                    dif[run_lo[k]] += 1
                    dif[run_hi[k]] -= 1
    c = np.int64(0)
    most = np.int64(0)
    for j in range(h0, h1 + 1):
        c += dif[j]
        dif[j] = 0
        most = max(most, c)
    return most


@njit(cache=True, nogil=True)
def _tile_count(ptr, run_lo, run_hi, is_long, in_span, cnt, r0, r1, floor):
    """Count rows ``r0:r1``'s leftover keys in ``cnt`` above ``floor``; returns the highest count."""
    top = floor
    for r in range(r0, r1):
        if is_long[r]:
            continue
        for k in range(ptr[r], ptr[r + 1]):
            if in_span[k]:
                continue
            for j in range(run_lo[k], run_hi[k]):
                v = max(cnt[j], floor) + 1
                cnt[j] = v
                top = max(top, v)
    return top


@njit(cache=True, nogil=True)
def _tile_shared(ptr, run_lo, run_hi, is_long, in_span, cnt, r0, r1, floor, thr, sh_cols, base):
    """List rows ``r0:r1``'s shared columns from ``base`` in order of first appearance; slot c is encoded in
    ``cnt`` as ``-(c + 2)``.  Returns their number.  A function of its own for the reason in
    :func:`_tile_residuals` (``sh_cols`` is grown)."""
    nsh = 0
    for r in range(r0, r1):
        if is_long[r]:
            continue
        for k in range(ptr[r], ptr[r + 1]):
            if in_span[k]:
                continue
            for j in range(run_lo[k], run_hi[k]):
                if cnt[j] - floor >= thr:
                    sh_cols[base + nsh] = j
                    cnt[j] = -(nsh + 2)
                    nsh += 1
    return nsh


@njit(cache=True, nogil=True)
def _tile_residuals(ptr, run_lo, run_hi, is_long, in_span, cnt, hot, r0, r1, T, base, sh_mask, rs_ptr, rs_lo, rs_hi,
                    pos):  # fmt: skip
    """Write rows ``r0:r1``'s residual runs from ``pos`` (and, in a ``hot`` tile, their shared-column bits).

    A function of its own: :func:`plan_leftovers` grows ``rs_lo``, ``rs_hi`` and ``sh_mask``, and an array
    reassigned inside a loop is reference-counted on every access there (the write loop took 4x longer).
    Returns the next ``pos`` and the tile's residual keys.
    """
    resid = np.int64(0)
    for r in range(r0, r1):
        if not is_long[r]:
            for k in range(ptr[r], ptr[r + 1]):
                if in_span[k]:
                    continue
                a = run_lo[k]
                if not hot:  # no shared column in this tile: the run is residual
                    rs_lo[pos] = a
                    rs_hi[pos] = run_hi[k]
                    resid += run_hi[k] - a
                    pos += 1
                    continue
                start = a
                for j in range(a, run_hi[k]):
                    if cnt[j] <= -2:
                        sh_mask[(base + (-cnt[j] - 2)) * T + (r - r0)] = 1
                        if j > start:
                            rs_lo[pos] = start
                            rs_hi[pos] = j
                            resid += j - start
                            pos += 1
                        start = j + 1
                if run_hi[k] > start:
                    rs_lo[pos] = start
                    rs_hi[pos] = run_hi[k]
                    resid += run_hi[k] - start
                    pos += 1
        rs_ptr[r + 1] = pos
    return pos, resid


@njit(cache=True, nogil=True)
def plan_leftovers(ptr, run_lo, run_hi, is_long, in_span, T, n_k):
    """Split each tile's keys outside the spans into shared columns and per-row residual runs.

    The keys come as runs (``ptr``, ``run_lo``, ``run_hi``); ``in_span[k]`` tells whether run ``k`` is a
    row's run inside one of its tile's spans (see :func:`plan_extra_spans`).  A column used by at least a
    quarter of the tile's rows (and by two or more) becomes shared, in order of first appearance (rows in
    order, each row's keys ascending); the rest stays with its row, as runs ``[rs_lo[e], rs_hi[e])`` for
    ``e`` in ``rs_ptr[r]:rs_ptr[r+1]`` (a row's leftover run split where shared columns cut it).  Tile ``t``
    counts column ``j`` in ``cnt[j]`` above ``t * (T + 1)`` (a value below is stale: nothing is reset, and
    a run's counting loop is branch-free); a tile where no column reaches the threshold copies its leftover
    runs as they are.  Keys are counted only in a tile that can have a shared column: one with at least the
    threshold's number of leftover runs and a key covered by that many, where the runs tell it without
    counting (rows that are shifted copies, :func:`_shifted_cover`, or a hull no wider than the keys,
    :func:`_hull_cover`).  Time O(runs + keys outside the spans of the tiles counted),
    memory O(n_k + runs + the plan): nothing per entry.  Also returns the residual keys per tile (``rs_tile``).
    """
    n_q = ptr.shape[0] - 1
    n_tiles = (n_q + T - 1) // T
    # room for the residual runs: one per leftover run, grown in a tile whose shared columns split more
    left = np.int64(0)
    for r in range(n_q):
        if not is_long[r]:
            for k in range(ptr[r], ptr[r + 1]):
                if not in_span[k]:
                    left += 1
    cnt = np.zeros(n_k, dtype=np.int64)
    sh_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    rs_ptr = np.zeros(n_q + 1, dtype=np.int64)
    rs_tile = np.zeros(n_tiles, dtype=np.int64)
    rs_lo = np.empty(left + left // 16 + 16, dtype=np.int64)
    rs_hi = np.empty(left + left // 16 + 16, dtype=np.int64)
    sh_cols = np.empty(16, dtype=np.int64)
    sh_mask = np.zeros(16 * T, dtype=np.uint8)
    dif = np.zeros(n_k + 1, dtype=np.int64)
    nsh_all = 0
    pos = 0
    for t in range(n_tiles):
        r0 = t * T
        r1 = min(n_q, r0 + T)
        nrows = 0
        nruns = 0
        keys = np.int64(0)
        h0 = n_k
        h1 = np.int64(0)
        for r in range(r0, r1):
            if not is_long[r]:
                nrows += 1
                for k in range(ptr[r], ptr[r + 1]):
                    if not in_span[k]:
                        nruns += 1
                        keys += run_hi[k] - run_lo[k]
                        h0 = min(h0, run_lo[k])
                        h1 = max(h1, run_hi[k])
        thr = max(2, (nrows + 3) // 4)
        floor = t * (T + 1)  # this tile's counts are cnt[j] - floor, in 1..T
        top = floor
        maybe = nruns >= thr  # else no column can be used by thr rows
        if maybe:
            # the most rows over one key, when the runs tell it in O(runs): rows that are shifted copies
            most = _shifted_cover(ptr, run_lo, run_hi, is_long, in_span, r0, r1)
            if most < 0 and h1 - h0 <= keys:
                most = _hull_cover(ptr, run_lo, run_hi, is_long, in_span, r0, r1, h0, h1, dif)
            maybe = most < 0 or most >= thr
        if maybe:
            top = _tile_count(ptr, run_lo, run_hi, is_long, in_span, cnt, r0, r1, floor)
        hot = top - floor >= thr
        base = nsh_all
        nsh = 0
        if hot:
            need = base + keys // thr + 1
            if need > sh_cols.shape[0]:
                cap = max(need, 2 * sh_cols.shape[0])
                sh_mask = _grown(sh_mask, cap * T)
                sh_cols = _grown(sh_cols, cap)
            nsh = _tile_shared(ptr, run_lo, run_hi, is_long, in_span, cnt, r0, r1, floor, thr, sh_cols, base)
        nsh_all = base + nsh
        sh_ptr[t + 1] = nsh_all
        # room for this tile's residual runs (a shared column splits a run of a row at most once more)
        need = pos + nruns + min(keys, nsh * nrows)
        if need > rs_lo.shape[0]:
            cap = max(need, rs_lo.shape[0] + rs_lo.shape[0] // 2)
            rs_lo = _grown(rs_lo, cap)
            rs_hi = _grown(rs_hi, cap)
        pos, rs_tile[t] = _tile_residuals(ptr, run_lo, run_hi, is_long, in_span, cnt, hot, r0, r1, T, base, sh_mask,
                                          rs_ptr, rs_lo, rs_hi, pos)  # fmt: skip
    if 4 * (rs_lo.shape[0] - pos) > rs_lo.shape[0]:  # shared columns took many runs: give the room back
        rs_lo = rs_lo[:pos].copy()
        rs_hi = rs_hi[:pos].copy()
    return sh_ptr, sh_cols[:nsh_all].copy(), sh_mask[: nsh_all * T].copy(), rs_ptr, rs_lo[:pos], rs_hi[:pos], rs_tile


@njit(cache=True, nogil=True)
def _grown(a, n):
    out = np.zeros(n, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
