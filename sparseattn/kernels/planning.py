"""Numba helpers of the generic planner (:mod:`sparseattn.engine.plan`): O(nnz) passes over a pattern's CSR."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["plan_shared_globals", "plan_longest_runs", "plan_leftovers"]


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
def plan_longest_runs(indptr, indices, is_long, min_run):
    """Each row's longest run of consecutive columns ``[lo, hi)`` (empty if shorter than ``min_run``)."""
    n_q = indptr.shape[0] - 1
    lo = np.zeros(n_q, dtype=np.int64)
    hi = np.zeros(n_q, dtype=np.int64)
    for i in range(n_q):
        if is_long[i]:
            continue
        best_a = 0
        best_n = 0
        e = indptr[i]
        end = indptr[i + 1]
        while e < end:
            f = e + 1
            while f < end and indices[f] == indices[f - 1] + 1:
                f += 1
            if f - e > best_n:
                best_n = f - e
                best_a = indices[e]
            e = f
        if best_n >= min_run:
            lo[i] = best_a
            hi[i] = best_a + best_n
    return lo, hi


@njit(cache=True, nogil=True)
def plan_leftovers(indptr, indices, is_long, lo, hi, T, n_k):
    """Split each tile's entries outside the rows' runs into shared columns and per-row residuals.

    A column used by at least a quarter of the tile's rows (and by two or
    more) becomes shared; the rest stays with its row.
    """
    n_q = indptr.shape[0] - 1
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
                for e in range(indptr[r], indptr[r + 1]):
                    j = indices[e]
                    if not (lo[r] <= j < hi[r]):
                        cnt[j] += 1
            # distinct shared columns, sorted
            nsh = 0
            if cols.shape[0] < 64:
                cols = np.empty(64, dtype=np.int64)
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                for e in range(indptr[r], indptr[r + 1]):
                    j = indices[e]
                    if not (lo[r] <= j < hi[r]) and cnt[j] >= thr:
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
                for e in range(indptr[r], indptr[r + 1]):
                    j = indices[e]
                    if lo[r] <= j < hi[r]:
                        continue
                    if cnt[j] <= -2:
                        if phase == 1:
                            sh_mask[(base + (-cnt[j] - 2)) * T + (r - r0)] = 1
                    elif phase == 0:
                        rs_ptr[r + 1] += 1
                    else:
                        rs_cols[pos] = j
                        pos += 1
            for r in range(r0, r1):
                for e in range(indptr[r], indptr[r + 1]):
                    cnt[indices[e]] = 0
    return sh_ptr, sh_cols, sh_mask, rs_ptr, rs_cols
