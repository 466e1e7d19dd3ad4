"""The staged pipeline: SDDMM -> row softmax -> SpMM, each a Numba kernel.

Raw arrays in, raw arrays out; no validation here (``attention.py`` does it).

Layout shared by the three kernels
----------------------------------
``S`` slices (flattened batch x heads) use ``P`` patterns.  The patterns' CSR
arrays are concatenated: ``ptr`` is ``(P, n_q + 1)`` with absolute offsets into
``ind``.  Slice ``s`` uses pattern ``slice_pat[s]`` and stores its nonzero
values in ``vals[slice_off[s] : slice_off[s] + nnz(pattern)]`` in CSR order.
Rows of all slices are processed in parallel (``prange`` over ``S * n_q``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["sddmm", "csr_softmax", "spmm"]


@njit(parallel=True, cache=True, nogil=True)
def sddmm(q, k, ptr, ind, slice_pat, slice_off, scale, key_valid, slice_batch, use_valid, vals):
    """``vals[e] = scale * q[s, i] . k[s, j]`` at every nonzero; padded keys get ``-inf``."""
    S, n_q, d = q.shape
    neg_inf = -np.inf
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        for e in range(ptr[p, i], ptr[p, i + 1]):
            j = ind[e]
            if use_valid and not key_valid[slice_batch[s], j]:
                vals[base + e] = neg_inf
                continue
            acc = scale - scale  # a zero of the working dtype
            for t in range(d):
                acc += q[s, i, t] * k[s, j, t]
            vals[base + e] = acc * scale


@njit(parallel=True, cache=True, nogil=True)
def csr_softmax(vals, ptr, slice_pat, slice_off, n_q, lse):
    """Row-wise max-subtracted softmax in place; rows without a finite score become all zeros."""
    S = slice_pat.shape[0]
    neg_inf = -np.inf
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        a = base + ptr[p, i]
        b = base + ptr[p, i + 1]
        m = neg_inf  # float64 max and sum: the staged path favours accuracy
        for e in range(a, b):
            if vals[e] > m:
                m = vals[e]
        if m == neg_inf:
            for e in range(a, b):
                vals[e] = 0
            lse[s, i] = neg_inf
            continue
        total = 0.0
        for e in range(a, b):
            x = np.exp(vals[e] - m)
            vals[e] = x
            total += x
        inv = 1.0 / total
        for e in range(a, b):
            vals[e] = vals[e] * inv
        lse[s, i] = m + np.log(total)


@njit(parallel=True, cache=True, nogil=True)
def spmm(vals, ptr, ind, slice_pat, slice_off, v, out):
    """``out[s, i] = sum_e vals[e] * v[s, ind[e]]`` over row ``i``'s nonzeros (``out`` zeroed)."""
    S, n_q, dv = out.shape
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        for e in range(ptr[p, i], ptr[p, i + 1]):
            w = vals[base + e]
            if w == 0:
                continue
            j = ind[e]
            for t in range(dv):
                out[s, i, t] += w * v[s, j, t]
