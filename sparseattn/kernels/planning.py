"""Numba helpers of the planner (:mod:`sparseattn.engine.plan`): passes over a pattern's runs of keys.

A pattern reaches them as runs ``(ptr, lo, hi)`` (row ``r`` allows ``lo[k] <= j < hi[k]`` for ``k`` in
``ptr[r]:ptr[r+1]``, see :mod:`sparseattn.patterns.runsets`); a CSR pattern as its maximal runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_I64_MAX = np.iinfo(np.int64).max

from .leftovers import _grown, plan_leftovers

__all__ = ["plan_extra_spans", "plan_leftovers", "plan_longest_runs", "plan_row_counts", "plan_shared_globals", "plan_tile_spans"]


@njit(cache=True, nogil=True)
def plan_row_counts(ptr, run_lo, run_hi):
    """Keys per row, one pass over the runs (the NumPy form's cumulative sum took 9 ms at 0.9 M runs)."""
    n_q = ptr.shape[0] - 1
    out = np.zeros(n_q, dtype=np.int64)
    for r in range(n_q):
        c = np.int64(0)
        for k in range(ptr[r], ptr[r + 1]):
            c += run_hi[k] - run_lo[k]
        out[r] = c
    return out


@njit(cache=True, nogil=True)
def plan_longest_runs(ptr, run_lo, run_hi, is_long, min_run):
    """Each row's longest run ``[lo, hi)``, the first of equal ones; empty when shorter than ``min_run`` or long.

    One pass over the runs, O(rows + runs) (the NumPy form needed a row index per run and four run-sized
    temporaries).
    """
    n_q = ptr.shape[0] - 1
    lo = np.zeros(n_q, dtype=np.int64)
    hi = np.zeros(n_q, dtype=np.int64)
    for r in range(n_q):
        if is_long[r]:
            continue
        best = np.int64(-1)
        for k in range(ptr[r], ptr[r + 1]):
            w = run_hi[k] - run_lo[k]
            if w > best:
                best = w
                lo[r] = run_lo[k]
                hi[r] = run_hi[k]
        if best < min_run:
            lo[r] = 0
            hi[r] = 0
    return lo, hi


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


@njit(cache=True, nogil=True)
def plan_extra_spans(ptr, run_lo, run_hi, is_long, lo, hi, T, min_fill, min_width, panel):
    """Extra spans per tile for the runs outside its span ``[lo, hi)`` (rows with several runs, split tiles).

    A tile's other runs are sorted by start and cut into clusters of overlapping runs; a cluster at least
    ``min_width`` keys wide whose runs (one per row: a row's second run in a cluster stays out) fill at
    least ``min_fill`` of the hulls of its 6-row register blocks (rounded up to ``panel`` keys, the
    micro-kernels' unit, times their rows) becomes an extra span
    ``[xs_k0[x], xs_k1[x])`` with row ``r`` of the tile running over ``[xs_lo[x*T + r], xs_hi[x*T + r])``.
    A tile across two documents gets one for the second, a 2-D neighbourhood with wide kernel rows one
    per kernel row (7-key rows fill too little of a panel: they stay per-row residuals, which run faster).  Returns ``xs_ptr, xs_k0, xs_k1, xs_lo, xs_hi`` and ``in_span`` (per run: in the
    tile's span or an extra span).  Time O(runs log runs per tile), memory O(runs + the extras).
    """
    n_q = ptr.shape[0] - 1
    n_tiles = (n_q + T - 1) // T
    in_span = np.zeros(run_lo.shape[0], dtype=np.uint8)
    xs_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    cap = 16
    xs_k0 = np.empty(cap, dtype=np.int64)
    xs_k1 = np.empty(cap, dtype=np.int64)
    xs_lo = np.zeros(cap * T, dtype=np.int64)
    xs_hi = np.zeros(cap * T, dtype=np.int64)
    nx = 0
    # sized once for the tile with most runs: an array grown (reassigned) inside the loop costs reference
    # counting on every access (4x the whole pass on a neighbourhood)
    most = 1
    for t in range(n_tiles):
        most = max(most, ptr[min(n_q, (t + 1) * T)] - ptr[t * T])
    cand = np.empty(most, dtype=np.int64)
    crow = np.empty(most, dtype=np.int64)
    ng = (T + 5) // 6
    ga = np.empty(ng, dtype=np.int64)
    gb = np.empty(ng, dtype=np.int64)
    gn = np.empty(ng, dtype=np.int64)
    mark = np.full(T, -1, dtype=np.int64)
    pick = np.zeros(T, dtype=np.int64)
    cid = 0
    for t in range(n_tiles):
        r0 = t * T
        r1 = min(n_q, r0 + T)
        nc = 0
        fits = False
        for r in range(r0, r1):
            if is_long[r]:
                continue
            for k in range(ptr[r], ptr[r + 1]):
                if hi[r] > lo[r] and lo[r] <= run_lo[k] and run_hi[k] <= hi[r]:
                    in_span[k] = 1
                    continue
                w = run_hi[k] - run_lo[k]
                if w >= min_fill * ((w + panel - 1) // panel * panel):
                    fits = True
                cand[nc] = k
                crow[nc] = r - r0
                nc += 1
        if not fits:
            # a cluster's area is at least its picked runs' widths rounded up to panels: when no run fills
            # min_fill of its own panels no cluster can (a 7-key neighbourhood's rows), so skip the sort
            xs_ptr[t + 1] = nx
            continue
        order = _start_order(cand, crow, nc, run_lo)
        x = 0
        while x < nc:
            cb = run_hi[cand[order[x]]]
            y = x
            while y < nc and run_lo[cand[order[y]]] < cb:
                cb = max(cb, run_hi[cand[order[y]]])
                y += 1
            for g in range(ng):
                ga[g] = _I64_MAX
                gb[g] = 0
                gn[g] = 0
            sa = _I64_MAX
            sb = np.int64(0)
            cov = np.int64(0)
            for z in range(x, y):
                k = cand[order[z]]
                rr = crow[order[z]]
                if mark[rr] == cid:
                    continue  # one run per row and span
                mark[rr] = cid
                pick[rr] = k
                g = rr // 6
                ga[g] = min(ga[g], run_lo[k])
                gb[g] = max(gb[g], run_hi[k])
                gn[g] += 1
                sa = min(sa, run_lo[k])
                sb = max(sb, run_hi[k])
                cov += run_hi[k] - run_lo[k]
            area = np.int64(0)
            for g in range(ng):
                if gn[g] > 0:
                    area += gn[g] * ((gb[g] - ga[g] + panel - 1) // panel * panel)
            if sb - sa >= min_width and cov >= min_fill * area:
                if nx == cap:
                    cap *= 2
                    xs_k0 = _grown(xs_k0, cap)
                    xs_k1 = _grown(xs_k1, cap)
                    xs_lo = _grown(xs_lo, cap * T)
                    xs_hi = _grown(xs_hi, cap * T)
                xs_k0[nx] = sa
                xs_k1[nx] = sb
                for rr in range(T):
                    xs_lo[nx * T + rr] = 0
                    xs_hi[nx * T + rr] = 0
                    if mark[rr] == cid:
                        xs_lo[nx * T + rr] = run_lo[pick[rr]]
                        xs_hi[nx * T + rr] = run_hi[pick[rr]]
                        in_span[pick[rr]] = 1
                nx += 1
            cid += 1
            x = y
        xs_ptr[t + 1] = nx
    return xs_ptr, xs_k0[:nx].copy(), xs_k1[:nx].copy(), xs_lo[: nx * T].copy(), xs_hi[: nx * T].copy(), in_span


@njit(cache=True, nogil=True)
def _start_order(cand, crow, nc, run_lo):
    """The candidates ``cand[:nc]`` (row by row, each row's runs sorted) ordered by start.

    Rows with as many runs each whose ``j``-th runs come before all ``(j+1)``-th ones (a neighbourhood's
    kernel rows) are taken run index by run index, in O(nc); anything else is sorted.
    """
    order = np.empty(nc, dtype=np.int64)
    if nc == 0:
        return order
    rows = 1
    for z in range(1, nc):
        if crow[z] != crow[z - 1]:
            rows += 1
    per = nc // rows
    ok = per * rows == nc
    if ok:
        for z in range(nc):
            if crow[z] != crow[(z // per) * per]:
                ok = False
                break
    if ok:
        for j in range(per):
            for i in range(rows):
                order[j * rows + i] = i * per + j
        for z in range(1, nc):
            if run_lo[cand[order[z]]] < run_lo[cand[order[z - 1]]]:
                ok = False
                break
    if not ok:
        order = np.argsort(run_lo[cand[:nc]])
    return order
