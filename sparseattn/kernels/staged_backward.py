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
    One pass over the keys through the transposed structure (``tptr``,
    ``trow``, ``tpos``: the entries of each column, as rows and positions in
    ``ind``): ``dK = scale * sum ds q`` and ``dV = sum p dO``.  Each key is
    written by one iteration, so there are no races.

Memory is two values per nonzero and slice: this path is the cross-check of
the fused backward, not the fast path.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["rows_backward", "cols_backward"]


@njit(parallel=True, cache=True, nogil=True)
def rows_backward(q, k, v, dout, out, lse, ptr, ind, slice_pat, slice_off, scale, key_valid, slice_batch,
                  use_valid, pvals, dsvals, dq):  # fmt: skip
    """Fill ``pvals``, ``dsvals`` (one per nonzero and slice) and ``dq`` (S, n_q, d)."""
    S, n_q, d = q.shape
    dv = v.shape[2]
    for r in prange(S * n_q):
        s = r // n_q
        i = r - s * n_q
        p_idx = slice_pat[s]
        base = slice_off[s] - ptr[p_idx, 0]
        zero = scale - scale
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
                x += q[s, i, c] * k[s, j, c]
            p = np.exp(x * scale - li)
            dp = zero
            for c in range(dv):
                dp += dout[s, i, c] * v[s, j, c]
            ds = p * (dp - big_d)
            pvals[base + e] = p
            dsvals[base + e] = ds
            for c in range(d):
                dq[s, i, c] += ds * k[s, j, c]
        for c in range(d):
            dq[s, i, c] *= scale


@njit(parallel=True, cache=True, nogil=True)
def cols_backward(q, dout, tptr, trow, tpos, slice_pat, slice_off, ptr, scale, key_valid, slice_batch, use_valid,
                  pvals, dsvals, dk, dv_out):  # fmt: skip
    """``dk[s, j] = scale * sum ds q[s, i]`` and ``dv_out[s, j] = sum p dout[s, i]`` over column ``j``'s entries.

    A padded key gets zero gradients without touching its column's entries
    (their ``p`` and ``ds`` are 0, but ``0 * inf`` from a non-finite ``q`` or
    ``dout`` row must not reach it).
    """
    S, n_k, d = dk.shape
    dv = dv_out.shape[2]
    for r in prange(S * n_k):
        s = r // n_k
        j = r - s * n_k
        p_idx = slice_pat[s]
        base = slice_off[s] - ptr[p_idx, 0]
        zero = scale - scale
        for c in range(d):
            dk[s, j, c] = zero
        for c in range(dv):
            dv_out[s, j, c] = zero
        if use_valid and not key_valid[slice_batch[s], j]:
            continue
        for t in range(tptr[p_idx, j], tptr[p_idx, j + 1]):
            i = trow[t]
            e = base + tpos[t]
            ds = dsvals[e]
            p = pvals[e]
            for c in range(d):
                dk[s, j, c] += ds * q[s, i, c]
            for c in range(dv):
                dv_out[s, j, c] += p * dout[s, i, c]
        for c in range(d):
            dk[s, j, c] *= scale
