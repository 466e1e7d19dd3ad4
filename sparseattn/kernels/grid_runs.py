"""The runs of a neighbourhood pattern (:func:`sparseattn.neighborhood`) in one pass over its rows.

The NumPy form spends most of its time in integer division and modulo per axis and in run-sized
temporaries (14 ms for the 0.9 M runs of a 256 x 512 grid with a 7 x 7 kernel); here each row's grid
coordinates advance as an odometer and its runs are written once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["grid_runs"]


@njit(cache=True, nogil=True)
def grid_runs(start, stop, shape, kernel, dilation, causal, strides):
    """Rows ``start:stop`` of the neighbourhood as runs ``(ptr, lo, hi)``; the last axis must be undilated.

    Per axis, the window of a query at coordinate ``x`` among the positions of its class ``x % d`` follows
    :func:`sparseattn.neighborhood` (NATTEN: shifted at the borders; causal: cut at the start).  One run per
    window position on the axes before the last, in ascending key order.
    """
    A = shape.shape[0]
    assert 1 <= A <= 3
    m = stop - start
    first = np.empty((A, max(m, 1)), dtype=np.int64)
    count = np.empty((A, max(m, 1)), dtype=np.int64)
    ptr = np.zeros(m + 1, dtype=np.int64)
    x = np.empty(A, dtype=np.int64)
    rem = start
    for a in range(A):
        x[a] = rem // strides[a]
        rem -= x[a] * strides[a]
    for i in range(m):
        runs = np.int64(1)
        for a in range(A):
            L = shape[a]
            k = kernel[a]
            d = dilation[a]
            r = x[a] % d
            pos = x[a] // d
            if causal[a]:
                lo = max(pos - (k - 1), 0)
                c = pos - lo + 1
            else:
                length = (L - r + d - 1) // d
                lo = min(max(pos - k // 2, 0), length - k)
                c = k
            first[a, i] = r + lo * d
            count[a, i] = c
            if a < A - 1:
                runs *= c
        ptr[i + 1] = ptr[i] + runs
        a = A - 1  # the next row: advance the coordinates, the last axis fastest
        x[a] += 1
        while a > 0 and x[a] == shape[a]:
            x[a] = 0
            a -= 1
            x[a] += 1
    lo_out = np.empty(ptr[m], dtype=np.int64)
    hi_out = np.empty(ptr[m], dtype=np.int64)
    last = A - 1
    # the window positions on the axes before the last (at most two: grids have 1 to 3 axes)
    s0 = dilation[0] * strides[0]
    s1 = dilation[min(1, last)] * strides[min(1, last)]
    for i in range(m):
        e = ptr[i]
        c = count[last, i]
        base = first[last, i]
        if A == 1:
            lo_out[e] = base
            hi_out[e] = base + c
            continue
        base += first[0, i] * strides[0]
        if A == 3:
            base += first[1, i] * strides[1]
        n1 = count[1, i] if A == 3 else 1
        for j0 in range(count[0, i]):
            for j1 in range(n1):
                v = base + j0 * s0 + j1 * s1
                lo_out[e] = v
                hi_out[e] = v + c
                e += 1
    return ptr, lo_out, hi_out
