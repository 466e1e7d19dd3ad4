"""The decode kernel: a few query rows per key/value head against one contiguous key span, K and V read once.

Raw arrays in, raw arrays out; no validation (``sparseattn.engine.decode``
prepares everything).  A decode step has a handful of query rows (the ``g``
query heads of one key/value head, times at most 16 new tokens) and thousands
of keys, so its cost is reading K and V, not arithmetic.  The tile kernels
pack K^T into panels for their register blocks, which pays off over 64 query
rows and doubles the traffic over 4; here each key row is read once, from
the cache in place, and dotted with every query row while it is in L1
(``q . k`` as a vectorised reduction over ``d``), and the value rows are
read in chunks of ``_KC`` rows (32 KiB at d 128 in float32, held in L1 and
L2): each chunk goes through the register-blocked ``pv_block`` of
:mod:`sparseattn.kernels.simd` column block by column block (6 rows x 2L
columns held in registers; a group of fewer than 6 rows leaves zero rows in
the block), so each value row comes from memory once.  Walking the whole
span once per column block instead read it from memory up to ``dv / 2L``
times when the span did not stay in L2.

Each slice (one key/value head of one batch entry) keeps its scores in a
(rows, span) scratch buffer: plain softmax (max, ``exp``, sum), no online
rescaling.  The kernel checks what the fast-math arithmetic could get wrong
instead of scanning the inputs beforehand: a NaN or an infinity among a row's
raw scores (from ``q`` or ``k``) or in its output (from ``v``, or an
overflow) flags the slice, and the engine recomputes flagged calls on the
paths that follow the non-finite policy exactly.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .mods import mod_span
from .simd import _FM, _exp, _neg, as_c, lanes, pv_block

__all__ = ["decode_slices"]

#: value rows per chunk of the P.V pass
_KC = 64


@njit(nogil=True, fastmath=_FM, inline="always")
def _dot(a, b, zero):
    acc = zero
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return acc


@njit(nogil=True, fastmath=_FM)
def _scores(qs, ks, jmin, jmax, scale, sbuf):
    """``sbuf[r, j] = scale * q_r . k_j`` for every row and ``jmin <= j < jmax``: each key row read once."""
    R = qs.shape[0]
    zero = sbuf.dtype.type(0)
    R4 = R - R % 4
    for j in range(jmin, jmax):
        kj = ks[j]
        for r in range(0, R4, 4):
            q0, q1, q2, q3 = qs[r], qs[r + 1], qs[r + 2], qs[r + 3]
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            for t in range(kj.shape[0]):
                x = kj[t]
                a0 += q0[t] * x
                a1 += q1[t] * x
                a2 += q2[t] * x
                a3 += q3[t] * x
            sbuf[r, j] = a0 * scale
            sbuf[r + 1, j] = a1 * scale
            sbuf[r + 2, j] = a2 * scale
            sbuf[r + 3, j] = a3 * scale
        for r in range(R4, R):
            sbuf[r, j] = _dot(qs[r], kj, zero) * scale


@njit(nogil=True, fastmath=_FM)
def _values_blocks(sbuf, vs, jmin, jmax, R, acc, os_):
    """``os_[r] = sum_j sbuf[r, j] v_j`` for ``r < R``, on the register-blocked ``pv_block`` (6 rows x 2L columns).

    ``sbuf`` has a multiple of 6 rows (those from ``R`` on hold zeros) and
    ``acc`` as many rows of ``dv`` columns; the span is walked in chunks of
    ``_KC`` value rows, and within a chunk each column block streams its
    columns of the chunk's rows, its 12 accumulators held in registers and
    added to ``acc`` at the chunk's end.
    Columns past the last full block go through the plain loop.
    """
    W = sbuf.shape[1]
    dv = vs.shape[1]
    L2 = 2 * lanes(sbuf)
    full = dv - dv % L2
    sf = sbuf.reshape(-1)
    vf = vs.reshape(-1)
    af = acc.reshape(-1)
    zero = acc.dtype.type(0)
    for x in range(af.shape[0]):
        af[x] = zero
    for k0 in range(jmin, jmax, _KC):
        k1 = min(k0 + _KC, jmax)
        for r0 in range(0, R, 6):
            for c0 in range(0, full, L2):
                pv_block(sf, r0 * W, W, k0, k1, vf, c0, dv, af, r0 * dv + c0, dv)
    for r in range(R):
        o = os_[r]
        a = acc[r]
        for t in range(full):
            o[t] = a[t]
        for t in range(full, dv):
            o[t] = zero
    if full < dv:
        for j in range(jmin, jmax):
            vj = vs[j]
            for r in range(R):
                p = sbuf[r, j]
                o = os_[r]
                for t in range(full, dv):
                    o[t] += p * vj[t]


@njit(nogil=True, fastmath=_FM)
def _all_finite(x, big):
    ok = True
    for j in range(x.shape[0]):
        ok &= abs(x[j]) <= big
    return ok


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def decode_slices(
    q, k, v, kpm, has_mask, kv_heads, lo, hi, n_q, i0, j0, scale, mod, slopes, g, parts, w0, w1, out, lse, bad, sbuf, acc
):  # fmt: skip
    """Work items ``w0 <= w < w1``: part ``w % parts`` of the keys of slice ``s = w // parts``.

    ``q``: (S, R, d) with ``R = g * n_q`` rows, row ``r`` the query row
    ``r % n_q`` of the ``r // n_q``-th query head of the group; ``k``, ``v``:
    (S, W, d) and (S, W, dv), each slice contiguous (views of a cache allowed);
    ``kpm``: (B, W) uint8, 1 = padded key, for batch entry ``s // kv_heads``,
    read only when ``has_mask``; ``lo``, ``hi``: (n_q,) each query row's run of keys
    ``[lo, hi)`` in ``[0, W)``; ``i0``, ``j0``: the positions of query row 0
    and key 0 in the user's call (the modifiers' ``i`` and ``j``); ``mod``,
    ``slopes``: the modifiers (``slopes`` per query slice ``s * g + r // n_q``).
    ``parts``: the keys of each slice are cut into that many equal ranges (a
    few slices on many threads); item ``w`` writes the softmax over its range
    to ``out[w]``, ``lse[w]`` (``-inf`` for a row without key there), which
    the caller merges (log-sum-exp).  ``bad[w]`` is set to 1 when a raw score
    of an allowed key or an output is NaN or infinite; ``sbuf``: (R6, W)
    scratch of the compute dtype, ``R6`` the multiple of 6 from ``R`` up,
    zero from row ``R`` on; ``acc``: (R6, dv) scratch.
    """
    R = q.shape[1]
    zero = out.dtype.type(0)
    big = np.finfo(out.dtype).max
    neg = _neg(zero)
    span0 = lo.min()
    span1 = hi.max()
    step = (span1 - span0 + parts - 1) // parts
    for w in range(w0, w1):
        s = w // parts
        jmin = min(span0 + (w % parts) * step, span1)
        jmax = min(jmin + step, span1)
        ks = as_c(k[s])
        mrow = kpm[s // kv_heads if has_mask else 0]
        # every row's score with every key of [jmin, jmax); a row's keys outside its run are discarded below
        _scores(q[s], ks, jmin, jmax, scale, sbuf)
        finite = True
        for r in range(R):
            i = r % n_q
            a, b = max(lo[i], jmin), min(hi[i], jmax)
            b = max(a, b)
            row = sbuf[r]
            if has_mask:
                for j in range(a, b):
                    if mrow[j] != 0:
                        row[j] = zero
            finite &= _all_finite(row[a:b], big)
            if not finite:
                break
            if mod[0] != 0 and b > a:
                q_slice = s * g + r // n_q
                mod_span(row, a, b, i0 + i, j0, mod, slopes[min(q_slice, slopes.shape[0] - 1)], q_slice)
            if has_mask:
                for j in range(a, b):
                    if mrow[j] != 0:
                        row[j] = neg
            m = neg
            for j in range(a, b):
                m = max(m, row[j])
            for j in range(jmin, a):  # keys outside the run take no part in the products
                row[j] = zero
            for j in range(b, jmax):
                row[j] = zero
            if b <= a or m == neg:  # no key (or every key padded): zeros, lse = -inf
                for j in range(a, b):
                    row[j] = zero
                lse[w, r] = -np.inf
                continue
            x = row[a:b]
            tot = zero
            for j in range(x.shape[0]):
                e = _exp(min(x[j] - m, zero))
                x[j] = e
                tot += e
            if has_mask:
                for j in range(a, b):
                    if mrow[j] != 0:
                        tot -= row[j]
                        row[j] = zero
            lse[w, r] = m + np.log(tot)
            inv = 1 / tot
            for j in range(x.shape[0]):
                x[j] *= inv
        if not finite:  # the engine recomputes the call on the paths that follow the non-finite policy
            bad[w] = 1
            continue
        _values_blocks(sbuf, as_c(v[s]), jmin, jmax, R, acc, out[w])
        for r in range(R):
            finite &= _all_finite(out[w, r], big)
        if not finite:
            bad[w] = 1
