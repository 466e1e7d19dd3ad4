"""The decode kernel: a few query rows per key/value head against one contiguous key span, K and V read once.

Raw arrays in, raw arrays out; no validation (``sparseattn.engine.decode``
prepares everything).  A decode step has a handful of query rows (the ``g``
query heads of one key/value head, times at most 16 new tokens) and thousands
of keys, so its cost is reading K and V, not arithmetic.  The tile kernels
pack K^T into panels for their register blocks, which pays off over 64 query
rows and doubles the traffic over 4; here each key row is read once, from
the cache in place, and dotted with the query rows while it is in L1.  With
``d`` a multiple of the lanes the scores come in tiles of 4 rows x L/4 keys
(then 2 x L/2, 1 x L for the last rows of a group): L lane-wise partial
sums, then one shuffle tree that adds each one's lanes into one lane of a
single vector (:func:`_qk_tile`), instead of a horizontal sum per (row, key)
pair, which cost twice the tile's time once the span sat in the cache.  The
value rows are read in chunks of ``_KC`` rows (32 KiB at d 128 in float32,
held in L1 and L2): each chunk goes through a register block column block by
column block (4 rows x 4L columns, :func:`_pv4`, when ``dv`` allows; else
``pv_block`` of :mod:`sparseattn.kernels.simd`, 6 rows x 2L, where a group
of fewer than 6 rows leaves zero rows in the block), so each value row comes
from memory once.  Walking the whole span once per column block instead
read it from memory up to ``dv / 2L`` times when the span did not stay in
L2.  The helpers run without reference counting (``NO_RC``).

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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .mods import mod_span
from .simd import (
    _FM, NO_RC, _element_ptr, _exp, _fmax, _neg, _splat, _vadd, _vbload, _vec_of, _vfma, _vload, _vstore, _vzero,
    all_finite, as_c, lanes, pv_block,
)

__all__ = ["decode_slices"]

#: value rows per chunk of the P.V pass
_KC = 64


@njit(nogil=True, fastmath=_FM, inline="always")
def _dot(a, b, zero):
    acc = zero
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return acc


def _tree_masks(L, c):
    """The two shuffles of one level of the reduction tree, each input holding ``L // c`` runs of ``c`` partial sums.

    A pair ``(x, y)`` becomes ``xy[lo] + xy[hi]`` (``xy`` their concatenation: indices past ``L`` pick
    from ``y``): each run of ``c`` becomes the sum of its two halves, the runs of ``x`` first, then ``y``'s.
    """
    lo, hi = [], []
    for src in (0, L):
        for run in range(L // c):
            base = src + run * c
            lo += [base + t for t in range(c // 2)]
            hi += [base + c // 2 + t for t in range(c // 2)]
    return lo, hi


def _qk_tile(rows):
    """An intrinsic for ``rows`` query rows (1, 2 or 4) times ``L // rows`` keys: one vector of ``L`` scores.

    ``tile(qf, q0, ldq, kf, k0, ldk, d, sf, s0, lds, scale)`` stores
    ``sf[s0 + r * lds + j] = scale * sum_c qf[q0 + r * ldq + c] * kf[k0 + j * ldk + c]`` for ``r < rows``,
    ``j < L // rows``; ``d`` a multiple of ``L``; flat contiguous arrays, the caller guarantees the indices.
    The ``L`` dot products accumulate lane-wise over ``d`` (one vector each, every key vector loaded once
    per feature block and used by every row), then a tree of shuffles and adds (``2 (L - 1)`` shuffles,
    ``L - 1`` adds) sums each one's lanes into one lane of the result: no horizontal sum per pair.
    """

    @intrinsic
    def tile(typingctx, qf, q0, ldq, kf, k0, ldk, d, sf, s0, lds, scale):
        vt = _vec_of(qf.dtype)
        if vt is None or kf.dtype != qf.dtype or sf.dtype != qf.dtype:
            return None
        L = vt.count
        nk = L // rows
        ints = (q0, ldq, k0, ldk, d, s0, lds)

        def codegen(context, builder, sig, args):
            qf_a, q0_a, ldq_a, kf_a, k0_a, ldk_a, d_a, sf_a, s0_a, lds_a, scale_a = args
            intp = context.get_value_type(types.intp)
            q0_a, ldq_a, k0_a, ldk_a, d_a, s0_a, lds_a = (
                context.cast(builder, a, t, types.intp) for a, t in zip((q0_a, ldq_a, k0_a, ldk_a, d_a, s0_a, lds_a), ints)
            )
            scale_a = context.cast(builder, scale_a, sig.args[10], qf.dtype)
            llvt = context.get_value_type(vt)
            align = qf.dtype.bitwidth // 8
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(llvt, [llvt] * 3), f"llvm.fma.v{L}f{qf.dtype.bitwidth}"
            )
            accs = [cgutils.alloca_once_value(builder, ir.Constant(llvt, None)) for _ in range(L)]

            def vload(arrty, arr, idx):
                p = _element_ptr(context, builder, arrty, arr, idx)
                return builder.load(builder.bitcast(p, llvt.as_pointer()), align=align)

            def const(x):
                return ir.Constant(intp, x)

            with cgutils.for_range_slice(builder, const(0), d_a, const(L), intp=intp) as (c, _):
                kv = [vload(sig.args[3], kf_a, builder.add(builder.add(k0_a, builder.mul(ldk_a, const(j))), c))
                      for j in range(nk)]  # fmt: skip
                for r in range(rows):
                    qv = vload(sig.args[0], qf_a, builder.add(builder.add(q0_a, builder.mul(ldq_a, const(r))), c))
                    for j in range(nk):
                        a = accs[r * nk + j]
                        builder.store(builder.call(fma, [qv, kv[j], builder.load(a)]), a)
            vecs = [builder.load(a) for a in accs]
            mask_ty = ir.VectorType(ir.IntType(32), L)
            c = L
            while len(vecs) > 1:
                lo, hi = _tree_masks(L, c)
                lo_m, hi_m = ir.Constant(mask_ty, lo), ir.Constant(mask_ty, hi)
                vecs = [
                    builder.fadd(builder.shuffle_vector(x, y, lo_m), builder.shuffle_vector(x, y, hi_m))
                    for x, y in zip(vecs[0::2], vecs[1::2])
                ]
                c //= 2
            tot = vecs[0]
            tot = builder.fmul(tot, _splat(builder, llvt, scale_a))
            part_ty = ir.VectorType(llvt.element, nk) if nk > 1 else None
            for r in range(rows):
                p = _element_ptr(context, builder, sig.args[7], sf_a, builder.add(s0_a, builder.mul(lds_a, const(r))))
                if nk == 1:
                    builder.store(builder.extract_element(tot, ir.Constant(ir.IntType(32), r)), p)
                    continue
                part = builder.shuffle_vector(
                    tot, ir.Constant(llvt, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), nk), [r * nk + j for j in range(nk)])
                )  # fmt: skip
                builder.store(part, builder.bitcast(p, part_ty.as_pointer()), align=align)
            return context.get_dummy_value()

        return types.none(qf, q0, ldq, kf, k0, ldk, d, sf, s0, lds, scale), codegen

    return tile


_qk4, _qk2, _qk1 = _qk_tile(4), _qk_tile(2), _qk_tile(1)


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _scores_tiles(qs, ks, jmin, jmax, scale, sbuf):
    """:func:`_scores` on the vector tiles (``d`` a multiple of the lanes): rows by 4, then 2, then 1."""
    R, d = qs.shape
    W = sbuf.shape[1]
    L = lanes(sbuf)
    qf = qs.reshape(-1)
    kf = ks.reshape(-1)
    sf = sbuf.reshape(-1)
    r = 0
    while r < R:
        rows = 4 if R - r >= 4 else (2 if R - r >= 2 else 1)
        nk = L // rows
        j = jmin
        while j + nk <= jmax:
            if rows == 4:
                _qk4(qf, r * d, d, kf, j * d, d, d, sf, r * W + j, W, scale)
            elif rows == 2:
                _qk2(qf, r * d, d, kf, j * d, d, d, sf, r * W + j, W, scale)
            else:
                _qk1(qf, r * d, d, kf, j * d, d, d, sf, r * W + j, W, scale)
            j += nk
        zero = sbuf.dtype.type(0)
        for jj in range(j, jmax):  # the last keys of the span, fewer than a tile's
            for rr in range(r, r + rows):
                sbuf[rr, jj] = _dot(qs[rr], ks[jj], zero) * scale
        r += rows


@njit(nogil=True, fastmath=_FM, **NO_RC)
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


@njit(nogil=True, inline="always")
def _add4(of, o, L, e0, e1, e2, e3):
    """``of[o : o + 4L] += (e0, e1, e2, e3)``."""
    _vstore(of, o, _vadd(_vload(of, o), e0))
    _vstore(of, o + L, _vadd(_vload(of, o + L), e1))
    _vstore(of, o + 2 * L, _vadd(_vload(of, o + 2 * L), e2))
    _vstore(of, o + 3 * L, _vadd(_vload(of, o + 3 * L), e3))


@njit(nogil=True, inline="always")
def _pv4(pf, p0, ldp, k0, k1, vf, ldv, c0, of, o0, ldo):
    """``O[r, c0 : c0 + 4L] += sum_{k0 <= k < k1} P[r, k] * V[k, c0 : c0 + 4L]`` for 4 rows ``r`` (16 accumulators).

    ``pf``: flat P, row ``r`` at ``p0 + r * ldp``; ``vf``: flat V, row ``k`` at ``k * ldv``; ``of``: flat O,
    row ``r`` at ``o0 + r * ldo``.  For the few rows of a decode step: each value row's 4 vectors are
    loaded once and used by 4 rows (``pv_block``'s 6 x 2L block spends a third of its products on zero
    rows when a group has 4).
    """
    L = lanes(pf)
    z = _vzero(pf)
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = e0 = e1 = e2 = e3 = f0 = f1 = f2 = f3 = z
    for k in range(k0, k1):
        x = k * ldv + c0
        v0 = _vload(vf, x)
        v1 = _vload(vf, x + L)
        v2 = _vload(vf, x + 2 * L)
        v3 = _vload(vf, x + 3 * L)
        p = _vbload(pf, p0 + k)
        a0, a1, a2, a3 = _vfma(p, v0, a0), _vfma(p, v1, a1), _vfma(p, v2, a2), _vfma(p, v3, a3)
        p = _vbload(pf, p0 + ldp + k)
        b0, b1, b2, b3 = _vfma(p, v0, b0), _vfma(p, v1, b1), _vfma(p, v2, b2), _vfma(p, v3, b3)
        p = _vbload(pf, p0 + 2 * ldp + k)
        e0, e1, e2, e3 = _vfma(p, v0, e0), _vfma(p, v1, e1), _vfma(p, v2, e2), _vfma(p, v3, e3)
        p = _vbload(pf, p0 + 3 * ldp + k)
        f0, f1, f2, f3 = _vfma(p, v0, f0), _vfma(p, v1, f1), _vfma(p, v2, f2), _vfma(p, v3, f3)
    _add4(of, o0, L, a0, a1, a2, a3)
    _add4(of, o0 + ldo, L, b0, b1, b2, b3)
    _add4(of, o0 + 2 * ldo, L, e0, e1, e2, e3)
    _add4(of, o0 + 3 * ldo, L, f0, f1, f2, f3)


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _values_blocks(sbuf, vs, jmin, jmax, R, acc, os_):
    """``os_[r] = sum_j sbuf[r, j] v_j`` for ``r < R``, on register blocks: :func:`_pv4` (4 rows x 4L
    columns) when ``dv`` is a multiple of 4L, else ``pv_block`` (6 rows x 2L columns).

    ``sbuf`` has whole blocks of rows (those from ``R`` on hold zeros) and
    ``acc`` as many rows of ``dv`` columns; the span is walked in chunks of
    ``_KC`` value rows, and within a chunk each column block streams its
    columns of the chunk's rows, its accumulators held in registers and
    added to ``acc`` at the chunk's end.
    Columns past the last full 2L block go through the plain loop.
    """
    W = sbuf.shape[1]
    dv = vs.shape[1]
    L = lanes(sbuf)
    L2 = 2 * L
    four = dv % (4 * L) == 0  # 4-row blocks of 4L columns (a group of 4 or 8 query heads fills them)
    full = dv if four else dv - dv % L2
    sf = sbuf.reshape(-1)
    vf = vs.reshape(-1)
    af = acc.reshape(-1)
    zero = acc.dtype.type(0)
    for x in range(af.shape[0]):
        af[x] = zero
    for k0 in range(jmin, jmax, _KC):
        k1 = min(k0 + _KC, jmax)
        if four:
            for r0 in range(0, R, 4):
                for c0 in range(0, dv, 4 * L):
                    _pv4(sf, r0 * W, W, k0, k1, vf, dv, c0, af, r0 * dv + c0, dv)
            continue
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


@njit(nogil=True, fastmath=_FM, error_model="numpy", **NO_RC)
def _item(q, k, v, kpm, has_mask, kv_heads, lo, hi, n_q, i0, j0, scale, mod, slopes, g, parts, w, span0, span1, out, lse,
          bad, sbuf, acc):  # fmt: skip
    """Work item ``w`` of :func:`decode_slices`, without reference counting (a view per key row otherwise costs more
    than the key's arithmetic once the span sits in the cache)."""
    R = q.shape[1]
    zero = out.dtype.type(0)
    big = np.finfo(out.dtype).max
    neg = _neg(zero)
    step = (span1 - span0 + parts - 1) // parts
    s = w // parts
    jmin = min(span0 + (w % parts) * step, span1)
    jmax = min(jmin + step, span1)
    ks = as_c(k[s])
    mrow = kpm[s // kv_heads if has_mask else 0]
    # every row's score with every key of [jmin, jmax); a row's keys outside its run are discarded below
    qs = as_c(q[s])
    if qs.shape[1] % lanes(sbuf) == 0:
        _scores_tiles(qs, ks, jmin, jmax, scale, sbuf)
    else:
        _scores(qs, ks, jmin, jmax, scale, sbuf)
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
        finite &= all_finite(row[a:b], big)
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
            m = _fmax(m, row[j])  # the scores are finite here (checked above)
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
        inv = out.dtype.type(1) / tot  # the compute dtype: 1 / tot would make the products below float64
        for j in range(x.shape[0]):
            x[j] *= inv
    if not finite:  # the engine recomputes the call on the paths that follow the non-finite policy
        bad[w] = 1
        return
    _values_blocks(sbuf, as_c(v[s]), jmin, jmax, R, acc, out[w])
    for r in range(R):
        finite &= all_finite(out[w, r], big)
    if not finite:
        bad[w] = 1


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
    of an allowed key or an output is NaN or infinite; ``sbuf``: (R', W)
    scratch of the compute dtype, ``R'`` at least the multiples of 6 and of 4
    from ``R`` up (the P.V register blocks), zero from row ``R`` on; ``acc``:
    (R', dv) scratch.
    """
    span0 = lo.min()
    span1 = hi.max()
    for w in range(w0, w1):
        _item(q, k, v, kpm, has_mask, kv_heads, lo, hi, n_q, i0, j0, scale, mod, slopes, g, parts, w, span0, span1, out,
              lse, bad, sbuf, acc)  # fmt: skip
