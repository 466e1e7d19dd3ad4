"""The staged backward: per-nonzero probabilities and score gradients, then two gathers.

Raw arrays in, raw arrays out; no validation (``sparseattn.engine.staged`` does it).
It shares the staged forward's layout (see :mod:`sparseattn.kernels.staged`):
``ptr`` (P, n_q + 1) with absolute offsets into ``ind``, slice ``s`` using
pattern ``slice_pat[s]`` and storing its values at ``slice_off[s]``.

``rows_backward``
    One pass over the rows (``prange`` over ``S * n_q``): recompute
    ``p = exp(scale q.k - lse)`` at every nonzero from the forward's
    log-sum-exp, ``dp = dO.v``, ``ds = p (dp - D)`` with ``D = dO.O``, and
    ``dQ = scale * sum ds k``.  Stores ``p`` and ``ds`` per nonzero and slice.
``cols_backward``
    One pass over the keys of each *stored* slice through the transposed
    structure (``tptr``, ``trow``, ``tpos``: the entries of each column, as
    rows and positions in ``ind``), called once for ``dK = scale * sum ds q``
    and once for ``dV = sum p dO``.  The slices that read one stored slice
    (grouped-query or broadcast heads) are summed inside that slice's
    iteration, so each key of each stored slice is written by one iteration:
    no races, no scratch, and a fixed order of the sum.

``q``, ``k``, ``v`` hold the distinct stored slices; slice ``s`` reads
``q[qmap[s]]``, ``k[kmap[s]]``, ``v[vmap[s]]`` (no copy per head).

Memory is two values per nonzero and slice: this path is the cross-check of
the fused backward, not the fast path.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .mods import active, mod_grad

__all__ = ["rows_backward", "cols_backward"]


@njit(parallel=True, cache=True, nogil=True)
def rows_backward(q, k, v, qmap, kmap, vmap, dout, out, lse, ptr, ind, slice_pat, slice_off, scale, key_valid,
                  slice_batch, use_valid, mod, slopes, slices, pvals, dsvals, dq):  # fmt: skip
    """Fill ``pvals``, ``dsvals`` (one per nonzero and slice) and ``dq`` (S, n_q, d).

    With score modifiers (``mod``, ``slopes``; slice ``s`` here is slice
    ``slices[s]`` of the call) ``p = exp(s' - lse)`` and ``ds`` is taken
    through ``ds'/ds``; a NaN score stays NaN.
    """
    S, n_q, d = dq.shape
    dv = v.shape[2]
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p_idx = slice_pat[s]
        base = slice_off[s] - ptr[p_idx, 0]
        sq = qmap[s]
        sk = kmap[s]
        sv = vmap[s]
        zero = scale - scale
        sl = slices[s]
        slope = slopes[min(sl, slopes.shape[0] - 1)]
        modded = active(mod)
        for c in range(d):
            dq[s, i, c] = zero
        li = lse[s, i]
        if li == -np.inf:
            for e in range(ptr[p_idx, i], ptr[p_idx, i + 1]):
                pvals[base + e] = zero
                dsvals[base + e] = zero
            continue
        big_d = zero
        for c in range(dv):
            big_d += dout[s, i, c] * out[s, i, c]
        for e in range(ptr[p_idx, i], ptr[p_idx, i + 1]):
            j = ind[e]
            if use_valid and not key_valid[slice_batch[s], j]:
                pvals[base + e] = zero
                dsvals[base + e] = zero
                continue
            x = zero
            for c in range(d):
                x += q[sq, i, c] * k[sk, j, c]
            x = x * scale
            fac = zero + 1
            if modded and x == x:
                x, fac = mod_grad(x, i, np.int64(j), mod, slope, sl)
            p = np.exp(x - li)
            dp = zero
            for c in range(dv):
                dp += dout[s, i, c] * v[sv, j, c]
            ds = p * (dp - big_d) * fac
            pvals[base + e] = p
            dsvals[base + e] = ds
            for c in range(d):
                dq[s, i, c] += ds * k[sk, j, c]
        for c in range(d):
            dq[s, i, c] *= scale


@njit(parallel=True, cache=True, nogil=True)
def cols_backward(src, src_map, vals, grp_ptr, grp_sl, tptr, trow, tpos, slice_pat, slice_off, ptr, coef,
                  key_valid, slice_batch, use_valid, dst):  # fmt: skip
    """``dst[t, j] = coef * sum vals[e] src[src_map[s], i]`` over the slices ``s`` reading stored slice ``t``.

    The slices of stored slice ``t`` are ``grp_sl[grp_ptr[t]:grp_ptr[t + 1]]``;
    the sum runs over column ``j``'s entries ``(i, e)`` of each one's pattern.
    ``dK``: ``vals`` = dS, ``src`` = q through qmap, ``coef`` = scale;
    ``dV``: ``vals`` = P, ``src`` = dO (one block per slice), ``coef`` = 1.
    One iteration per (stored slice, key): the group is looped serially inside
    it rather than accumulated per query slice into shared rows, so no two
    iterations write one row (race-free without atomics or per-thread
    scratch) and the sum's order is fixed.  A key padded for slice ``s``
    gets nothing from ``s`` without touching its column's entries (their
    ``p`` and ``ds`` are 0, but ``0 * inf`` from a non-finite ``q`` or
    ``dout`` row must not reach it).
    """
    n_t, n_k, w = dst.shape
    for r in prange(n_t * n_k):
        t = r // n_k
        j = r - t * n_k
        zero = coef - coef
        for c in range(w):
            dst[t, j, c] = zero
        for g in range(grp_ptr[t], grp_ptr[t + 1]):
            s = grp_sl[g]
            if use_valid and not key_valid[slice_batch[s], j]:
                continue
            p_idx = slice_pat[s]
            base = slice_off[s] - ptr[p_idx, 0]
            ss = src_map[s]
            for u in range(tptr[p_idx, j], tptr[p_idx, j + 1]):
                i = trow[u]
                x = vals[base + tpos[u]]
                for c in range(w):
                    dst[t, j, c] += x * src[ss, i, c]
        for c in range(w):
            dst[t, j, c] *= coef
