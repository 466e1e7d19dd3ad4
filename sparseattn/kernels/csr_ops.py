"""Row-wise merges of canonical CSR arrays (union and intersection), count first then fill."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["merge_rows"]


@njit(cache=True, nogil=True, inline="always")
def _merge_row(a, a_end, b, b_end, ia, ib, union, out, o, write):
    # Walks two sorted unique index runs; returns the number of outputs.
    count = 0
    while a < a_end and b < b_end:
        x = ia[a]
        y = ib[b]
        if x == y:
            if write:
                out[o + count] = x
            count += 1
            a += 1
            b += 1
        elif x < y:
            if union:
                if write:
                    out[o + count] = x
                count += 1
            a += 1
        else:
            if union:
                if write:
                    out[o + count] = y
                count += 1
            b += 1
    if union:
        while a < a_end:
            if write:
                out[o + count] = ia[a]
            count += 1
            a += 1
        while b < b_end:
            if write:
                out[o + count] = ib[b]
            count += 1
            b += 1
    return count


@njit(parallel=True, cache=True, nogil=True)
def _merge(pa, ia, pb, ib, union):
    n = pa.shape[0] - 1
    counts = np.empty(n, dtype=np.int64)
    dummy = np.empty(0, dtype=np.int64)
    for r in prange(n):
        counts[r] = _merge_row(pa[r], pa[r + 1], pb[r], pb[r + 1], ia, ib, union, dummy, 0, False)
    indptr = np.empty(n + 1, dtype=np.int64)
    indptr[0] = 0
    for r in range(n):
        indptr[r + 1] = indptr[r] + counts[r]
    out = np.empty(indptr[n], dtype=np.int64)
    for r in prange(n):
        _merge_row(pa[r], pa[r + 1], pb[r], pb[r + 1], ia, ib, union, out, indptr[r], True)
    return indptr, out


def merge_rows(a, b, union):
    """Union (``union=True``) or intersection of two canonical CSR row blocks ``(indptr, indices)``."""
    pa, ia = (np.ascontiguousarray(x, dtype=np.int64) for x in a)
    pb, ib = (np.ascontiguousarray(x, dtype=np.int64) for x in b)
    return _merge(pa, ia, pb, ib, union)
