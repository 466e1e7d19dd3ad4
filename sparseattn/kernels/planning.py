"""Numba helpers of the planner (:mod:`sparseattn.engine.plan`): passes over a pattern's runs of keys.

A pattern reaches them as runs ``(ptr, lo, hi)`` (row ``r`` allows ``lo[k] <= j < hi[k]`` for ``k`` in
``ptr[r]:ptr[r+1]``, see :mod:`sparseattn.patterns.runsets`); a CSR pattern as its maximal runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["plan_shared_globals", "plan_leftovers", "plan_tile_spans"]


@njit(cache=True, nogil=True)
def plan_shared_globals(lo, hi, is_long, g, T):
    """Shared columns per tile for global keys ``g``: rows whose run misses the column use it."""
    n_q = lo.shape[0]
    n_tiles = (n_q + T - 1) // T
    ng = g.shape[0]
    sh_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    for phase in range(2):
        if phase == 1:
            total = sh_ptr[n_tiles]
            sh_cols = np.empty(total, dtype=np.int64)
            sh_mask = np.zeros(total * T, dtype=np.uint8)
        for t in range(n_tiles):
            r0 = t * T
            r1 = min(n_q, r0 + T)
            pos = sh_ptr[t] if phase == 1 else 0
            cnt = 0
            for c in range(ng):
                j = g[c]
                used = False
                for r in range(r0, r1):
                    if not is_long[r] and not (lo[r] <= j < hi[r]):
                        used = True
                        if phase == 1:
                            sh_mask[(pos + cnt) * T + (r - r0)] = 1
                if used:
                    if phase == 1:
                        sh_cols[pos + cnt] = j
                    cnt += 1
            if phase == 0:
                sh_ptr[t + 1] = sh_ptr[t] + cnt
    return sh_ptr, sh_cols, sh_mask


@njit(cache=True, nogil=True)
def plan_leftovers(ptr, run_lo, run_hi, is_long, lo, hi, T, n_k):
    """Split each tile's keys outside the rows' spans ``[lo, hi)`` into shared columns and per-row residuals.

    The keys come as runs (``ptr``, ``run_lo``, ``run_hi``); a row's span is
    one of its runs or empty, so a run is either the span or outside it.  A
    column used by at least a quarter of the tile's rows (and by two or more)
    becomes shared; the rest stays with its row.  Time O(keys outside the
    spans), memory O(n_k + the plan).
    """
    n_q = ptr.shape[0] - 1
    n_tiles = (n_q + T - 1) // T
    cnt = np.zeros(n_k, dtype=np.int64)
    sh_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    rs_ptr = np.zeros(n_q + 1, dtype=np.int64)
    cols = np.empty(0, dtype=np.int64)
    sh_cols = np.empty(0, dtype=np.int64)
    sh_mask = np.empty(0, dtype=np.uint8)
    rs_cols = np.empty(0, dtype=np.int64)
    for phase in range(2):
        if phase == 1:
            for i in range(n_q):
                rs_ptr[i + 1] += rs_ptr[i]
            sh_cols = np.empty(sh_ptr[n_tiles], dtype=np.int64)
            sh_mask = np.zeros(sh_ptr[n_tiles] * T, dtype=np.uint8)
            rs_cols = np.empty(rs_ptr[n_q], dtype=np.int64)
        for t in range(n_tiles):
            r0 = t * T
            r1 = min(n_q, r0 + T)
            nrows = 0
            for r in range(r0, r1):
                if not is_long[r]:
                    nrows += 1
            thr = max(2, (nrows + 3) // 4)
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                for k in range(ptr[r], ptr[r + 1]):
                    if lo[r] <= run_lo[k] and run_hi[k] <= hi[r]:
                        continue  # the span
                    for j in range(run_lo[k], run_hi[k]):
                        cnt[j] += 1
            # distinct shared columns, sorted
            nsh = 0
            if cols.shape[0] < 64:
                cols = np.empty(64, dtype=np.int64)
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                for k in range(ptr[r], ptr[r + 1]):
                    if lo[r] <= run_lo[k] and run_hi[k] <= hi[r]:
                        continue
                    for j in range(run_lo[k], run_hi[k]):
                        if cnt[j] >= thr:
                            if nsh == cols.shape[0]:
                                grown = np.empty(2 * nsh, dtype=np.int64)
                                grown[:nsh] = cols[:nsh]
                                cols = grown
                            cols[nsh] = j
                            nsh += 1
                            cnt[j] = -1  # counted once
            srt = cols[:nsh]  # order of first appearance
            base = sh_ptr[t]
            for c in range(nsh):
                cnt[srt[c]] = -(c + 2)  # slot c is encoded as -(c + 2)
                if phase == 1:
                    sh_cols[base + c] = srt[c]
            if phase == 0:
                sh_ptr[t + 1] = sh_ptr[t] + nsh
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                pos = rs_ptr[r]
                for k in range(ptr[r], ptr[r + 1]):
                    if lo[r] <= run_lo[k] and run_hi[k] <= hi[r]:
                        continue
                    for j in range(run_lo[k], run_hi[k]):
                        if cnt[j] <= -2:
                            if phase == 1:
                                sh_mask[(base + (-cnt[j] - 2)) * T + (r - r0)] = 1
                        elif phase == 0:
                            rs_ptr[r + 1] += 1
                        else:
                            rs_cols[pos] = j
                            pos += 1
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                for k in range(ptr[r], ptr[r + 1]):
                    if lo[r] <= run_lo[k] and run_hi[k] <= hi[r]:
                        continue
                    for j in range(run_lo[k], run_hi[k]):
                        cnt[j] = 0
    return sh_ptr, sh_cols, sh_mask, rs_ptr, rs_cols


@njit(cache=True, nogil=True)
def plan_tile_spans(lo, hi, is_long, T, min_fill):
    """Each tile's key span ``[k0, k1)`` from its rows' runs ``[lo, hi)`` (cleared in place where not used).

    The span is the hull of the tile's runs when they fill at least ``min_fill``
    of it (times the tile's rows that are not long); else the hull of the best
    cluster of overlapping runs that does (most keys), the other rows' runs
    going to the leftovers (a tile that straddles two documents); else none.
    """
    n_q = lo.shape[0]
    n_tiles = (n_q + T - 1) // T
    k0 = np.zeros(n_tiles, dtype=np.int64)
    k1 = np.zeros(n_tiles, dtype=np.int64)
    order = np.empty(T, dtype=np.int64)
    for t in range(n_tiles):
        r0 = t * T
        r1 = min(n_q, r0 + T)
        m = 0
        a = np.int64(0)
        b = np.int64(0)
        covered = np.int64(0)
        n_rows = 0
        for r in range(r0, r1):
            if not is_long[r]:
                n_rows += 1
            if hi[r] > lo[r]:
                if m == 0 or lo[r] < a:
                    a = lo[r]
                if m == 0 or hi[r] > b:
                    b = hi[r]
                covered += hi[r] - lo[r]
                # insertion sort of the tile's rows by run start
                x = m
                while x > 0 and lo[order[x - 1]] > lo[r]:
                    order[x] = order[x - 1]
                    x -= 1
                order[x] = r
                m += 1
        if m == 0:
            continue
        if covered >= min_fill * (b - a) * n_rows:
            k0[t], k1[t] = a, b
            continue
        best_cov = np.int64(-1)
        best_a = np.int64(0)
        best_b = np.int64(0)
        x = 0
        while x < m:
            ca, cb, cc = lo[order[x]], hi[order[x]], np.int64(0)
            y = x
            while y < m and lo[order[y]] < cb:
                cb = max(cb, hi[order[y]])
                cc += hi[order[y]] - lo[order[y]]
                y += 1
            if cc >= min_fill * (cb - ca) * n_rows and cc > best_cov:
                best_cov, best_a, best_b = cc, ca, cb
            x = y
        if best_cov >= 0:
            k0[t], k1[t] = best_a, best_b
        for r in range(r0, r1):
            if best_cov < 0 or not (best_a <= lo[r] and hi[r] <= best_b):
                lo[r] = 0
                hi[r] = 0
    return k0, k1
