"""The staged pipeline: SDDMM -> row softmax -> SpMM, each a Numba kernel.

Raw arrays in, raw arrays out; no validation here (``attention.py`` does it).

Layout shared by the three kernels
----------------------------------
``S`` slices (flattened batch x heads) use ``P`` patterns.  The patterns' CSR
arrays are concatenated: ``ptr`` is ``(P, n_q + 1)`` with absolute offsets into
``ind``.  Slice ``s`` uses pattern ``slice_pat[s]`` and stores its nonzero
values in ``vals[slice_off[s] : slice_off[s] + nnz(pattern)]`` in CSR order.
Rows of all slices are processed in parallel (``prange`` over ``S * n_q``).
``q``, ``k``, ``v`` hold the distinct stored slices: slice ``s`` reads
``q[qmap[s]]``, ``k[kmap[s]]``, ``v[vmap[s]]`` (heads sharing a broadcast or
grouped-query key/value head read one array, never a copy per head).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .mods import mod_one

__all__ = ["sddmm", "modify_values", "csr_softmax", "spmm"]


@njit(parallel=True, cache=True, nogil=True)
def sddmm(q, k, qmap, kmap, ptr, ind, slice_pat, slice_off, scale, key_valid, slice_batch, use_valid, vals):
    """``vals[e] = scale * q[qmap[s], i] . k[kmap[s], j]`` at every nonzero; padded keys get ``-inf``."""
    S = qmap.shape[0]
    n_q, d = q.shape[1], q.shape[2]
    neg_inf = -np.inf
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        sq = qmap[s]
        sk = kmap[s]
        for e in range(ptr[p, i], ptr[p, i + 1]):
            j = ind[e]
            if use_valid and not key_valid[slice_batch[s], j]:
                vals[base + e] = neg_inf
                continue
            acc = scale - scale  # a zero of the working dtype
            for t in range(d):
                acc += q[sq, i, t] * k[sk, j, t]
            vals[base + e] = acc * scale


@njit(parallel=True, cache=True, nogil=True)
def modify_values(vals, ptr, ind, slice_pat, slice_off, key_valid, slice_batch, use_valid, n_q, mod, slopes, slices):
    """The score modifiers (:mod:`sparseattn.kernels.mods`) on every usable nonzero's score, in place.

    Slice ``s`` of these arrays is slice ``slices[s]`` of the call (what a
    user's ``score_mod`` and the ALiBi slopes see).  A NaN score stays NaN;
    ``+-inf`` goes through the modifiers (softcap maps it to ``+-cap``).
    """
    S = slice_pat.shape[0]
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        sl = slices[s]
        slope = slopes[min(sl, slopes.shape[0] - 1)]
        for e in range(ptr[p, i], ptr[p, i + 1]):
            j = ind[e]
            if use_valid and not key_valid[slice_batch[s], j]:
                continue
            x = vals[base + e]
            if x == x:
                vals[base + e] = mod_one(x, i, np.int64(j), mod, slope, sl)


@njit(parallel=True, cache=True, nogil=True)
def csr_softmax(vals, ptr, ind, slice_pat, slice_off, key_valid, slice_batch, use_valid, n_q, lse):
    """Row-wise max-subtracted softmax in place, plain IEEE arithmetic over the row's usable keys.

    Padded keys (``use_valid`` and ``key_valid`` False) are excluded and get
    weight 0; a row with no usable key becomes all zeros with ``lse = -inf``.
    Otherwise the row is ``exp(x - max) / sum`` as IEEE arithmetic gives it:
    the max propagates NaN, so a NaN score, a ``+inf`` score (``inf - inf``)
    or all scores ``-inf`` (``-inf - -inf``) make the whole row NaN, and a
    ``-inf`` score among finite ones gets weight 0.
    """
    S = slice_pat.shape[0]
    neg_inf = -np.inf
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        a = ptr[p, i]
        b = ptr[p, i + 1]
        m = neg_inf  # float64 max and sum: the staged path favours accuracy
        n_used = 0
        for e in range(a, b):
            if use_valid and not key_valid[slice_batch[s], ind[e]]:
                vals[base + e] = 0
                continue
            n_used += 1
            x = vals[base + e]
            if x > m or x != x:
                m = x
            if m != m:
                break
        if n_used == 0:
            lse[s, i] = neg_inf
            continue
        total = 0.0
        for e in range(a, b):
            if use_valid and not key_valid[slice_batch[s], ind[e]]:
                vals[base + e] = 0
                continue
            x = np.exp(vals[base + e] - m)
            vals[base + e] = x
            total += x
        inv = 1.0 / total
        for e in range(a, b):
            vals[base + e] = vals[base + e] * inv
        lse[s, i] = m + np.log(total)


@njit(parallel=True, cache=True, nogil=True)
def spmm(vals, ptr, ind, slice_pat, slice_off, key_valid, slice_batch, use_valid, v, vmap, out):
    """``out[s, i] = sum_e vals[e] * v[vmap[s], ind[e]]`` over row ``i``'s usable keys (``out`` zeroed).

    Padded keys are skipped; every other entry is added even when its weight
    is 0, so that ``0 * inf`` gives NaN as IEEE arithmetic does (a key the row
    may attend whose value is not finite).
    """
    S, n_q, dv = out.shape
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p = slice_pat[s]
        base = slice_off[s] - ptr[p, 0]
        sv = vmap[s]
        for e in range(ptr[p, i], ptr[p, i + 1]):
            j = ind[e]
            if use_valid and not key_valid[slice_batch[s], j]:
                continue
            w = vals[base + e]
            for t in range(dv):
                out[s, i, t] += w * v[sv, j, t]
