"""A neighbourhood's forward vectorised along its grid's last axis (NATTEN's narrow windows).

Raw arrays in, raw arrays out; no validation (``sparseattn.engine.fused_forward`` routes here).

A plain neighbourhood (:func:`sparseattn.neighborhood`) whose last-axis window is narrower than a
panel (``kw < 16`` keys: 3 x 3, 7 x 7, (3, 5, 5)...) has rows of a few short runs, which the tile
kernels compute as per-row residual dot products: one (query, key) pair at a time, a horizontal sum
per pair.  On one line of the grid's last axis, though, query ``x`` sees the keys ``sx[x] + u``
(``u < kw``) of each of its lines (first keys ``ln_base``), and away from the line's ends
``sx[x] = x - kw // 2``: at offset ``u`` the keys of ``L`` consecutive queries are ``L`` consecutive
keys.  With Q and K transposed (features by tokens), the scores of ``L`` queries at one offset are
one vector FMA per feature, every lane useful.  The block's softmax runs lane by lane over its
``C * U`` scores (all of a query's keys at once: no online rescaling), and P.V runs in row layout,
each probability broadcast against a value row's vectors, the accumulators in registers.

Near a line's ends the window is shifted (``sx`` clamped), so a block computes the offsets that
cover every lane's window (``U <= 2 kw - 1``) and masks each lane's scores outside its own.

``grid_forward``
    Items ``it = si * n_lines + line``: one line of the last axis of slice ``slices[si]``.  Each
    thread keeps K transposed for the stored slice it last read (``kt``, tagged ``tag[0]``), with
    ``mg`` zero columns on each side (at least ``L + 2 kw``: a block's loads reach that far past a
    line) so that they stay in the buffer.  With ``ldk`` (``kt``'s row length) a multiple of the lanes,
    ``mg - kw // 2`` too and ``kt`` on a vector boundary, an interior block's keys start on one, and its
    scores come from aligned loads and shuffles.
    Needs ``d`` a multiple of ``L`` and ``d_v`` of ``2L`` (the caller checks).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .lanes import lane_max, lane_softmax
from .simd import (
    _FM, NO_RC, _element_ptr, _neg, _vbload, _vec_of, _vfma, _vload, _vstore, _vzero, all_finite, as_c, lanes,
)

__all__ = ["grid_forward", "transpose_block", "valign"]


@intrinsic
def transpose_block(typingctx, src, s0, lds, dst, d0, ldd):
    """``dst[d0 + j * ldd + i] = src[s0 + i * lds + j]`` for ``i, j < L``: an L x L block transposed in registers.

    L vector loads, ``log2(L)`` rounds of L shuffles (round ``b`` swaps bit ``b`` of the row and column
    index: rows ``i`` and ``i | 2**b`` exchange the lanes whose bit ``b`` differs), L vector stores.
    Both arrays 1-D and contiguous; the caller guarantees the indices.
    """
    vt = _vec_of(src.dtype)
    L = vt.count

    def codegen(context, builder, sig, args):
        src_ty, dst_ty = sig.args[0], sig.args[3]
        src_a, s0_a, lds_a, dst_a, d0_a, ldd_a = args
        llvt = context.get_value_type(vt)
        align = src.dtype.bitwidth // 8
        mask_ty = ir.VectorType(ir.IntType(32), L)
        rows = []
        for i in range(L):
            idx = builder.add(s0_a, builder.mul(lds_a, ir.Constant(lds_a.type, i)))
            p = _element_ptr(context, builder, src_ty, src_a, idx)
            rows.append(builder.load(builder.bitcast(p, llvt.as_pointer()), align=align))
        b = 1
        while b < L:
            lo = ir.Constant(mask_ty, [j if not j & b else L + j - b for j in range(L)])
            hi = ir.Constant(mask_ty, [j + b if not j & b else L + j for j in range(L)])
            new = list(rows)
            for i in range(L):
                if not i & b:
                    new[i] = builder.shuffle_vector(rows[i], rows[i | b], lo)
                    new[i | b] = builder.shuffle_vector(rows[i], rows[i | b], hi)
            rows = new
            b *= 2
        for j in range(L):
            idx = builder.add(d0_a, builder.mul(ldd_a, ir.Constant(ldd_a.type, j)))
            p = _element_ptr(context, builder, dst_ty, dst_a, idx)
            builder.store(rows[j], builder.bitcast(p, llvt.as_pointer()), align=align)
        return context.get_dummy_value()

    return types.none(src, s0, lds, dst, d0, ldd), codegen


@intrinsic
def valign(typingctx, lo, hi, shift):
    """Lanes ``shift .. shift + L - 1`` of the ``2L`` lanes ``lo`` then ``hi`` (``shift``: a literal, ``0 <= shift <= L``).

    The keys ``j0 + shift ..`` from two aligned loads at ``j0`` and ``j0 + L``: one shuffle instead of
    a load that crosses a cache line.
    """
    if not isinstance(shift, types.IntegerLiteral):
        return None
    L = lo.count
    k = shift.literal_value

    def codegen(context, builder, sig, args):
        # modulo 2L: an out-of-range shift in a branch that a smaller L never runs still makes valid IR
        mask = ir.Constant(ir.VectorType(ir.IntType(32), L), [(k + i) % (2 * L) for i in range(L)])
        return builder.shuffle_vector(args[0], args[1], mask)

    return lo(lo, hi, shift), codegen


@njit(nogil=True, inline="always")
def _store4(sb, s0, L, a0, a1, a2, a3):
    """Four score rows of a block: ``sb[s0 + o * L :][:L] = a_o``."""
    _vstore(sb, s0, a0)
    _vstore(sb, s0 + L, a1)
    _vstore(sb, s0 + 2 * L, a2)
    _vstore(sb, s0 + 3 * L, a3)


@njit(nogil=True, inline="always")
def _qk4(qt, q0, ldq, kt, k0, ldk, d, sb, s0, aligned):
    """Scores of the block's ``L`` lanes at 4 consecutive offsets: ``sb[s0 + o * L + t] = sum_c qt[c, t] kt[c, k0 + o + t]``.

    ``aligned``: ``k0 + c ldk`` is a multiple of L, and the shifted keys come from two aligned loads and
    shuffles (see :func:`_qk8`) instead of unaligned loads.
    """
    L = lanes(qt)
    a0 = _vzero(qt)
    a1 = a0
    a2 = a0
    a3 = a0
    for c in range(d):
        qv = _vload(qt, q0 + c * ldq)
        kb = k0 + c * ldk
        k0v = _vload(kt, kb)
        if aligned:
            hi = _vload(kt, kb + L)
            k1v, k2v, k3v = valign(k0v, hi, 1), valign(k0v, hi, 2), valign(k0v, hi, 3)
        else:
            k1v, k2v, k3v = _vload(kt, kb + 1), _vload(kt, kb + 2), _vload(kt, kb + 3)
        a0 = _vfma(qv, k0v, a0)
        a1 = _vfma(qv, k1v, a1)
        a2 = _vfma(qv, k2v, a2)
        a3 = _vfma(qv, k3v, a3)
    _store4(sb, s0, L, a0, a1, a2, a3)


@njit(nogil=True, inline="always")
def _qk8(qt, q0, ldq, kt, k0, ldk, d, sb, s0, second):
    """Offsets ``0..7`` (``8..15`` when ``second``) of :func:`_qk4` for an aligned ``k0 + c ldk`` (a multiple of L = 8 or 16).

    Two aligned loads per feature and shuffles (:func:`valign`): unaligned vector
    loads cross a cache line, and on the development machine they, not the FMAs, bounded ``_qk4``.
    """
    L = lanes(qt)
    a0 = _vzero(qt)
    a1 = a0
    a2 = a0
    a3 = a0
    a4 = a0
    a5 = a0
    a6 = a0
    a7 = a0
    wide = L >= 16  # offsets 8..15 are lanes 8..30 of the same two vectors; with 8 lanes, the next two
    shift = 8 if second and not wide else 0
    for c in range(d):
        qv = _vload(qt, q0 + c * ldq)
        kb = k0 + c * ldk + shift
        lo = _vload(kt, kb)
        hi = _vload(kt, kb + L)
        if second and wide:
            k0v, k1v, k2v, k3v = valign(lo, hi, 8), valign(lo, hi, 9), valign(lo, hi, 10), valign(lo, hi, 11)
            k4v, k5v, k6v, k7v = valign(lo, hi, 12), valign(lo, hi, 13), valign(lo, hi, 14), valign(lo, hi, 15)
        else:
            k0v, k1v, k2v, k3v = lo, valign(lo, hi, 1), valign(lo, hi, 2), valign(lo, hi, 3)
            k4v, k5v, k6v, k7v = valign(lo, hi, 4), valign(lo, hi, 5), valign(lo, hi, 6), valign(lo, hi, 7)
        a0 = _vfma(qv, k0v, a0)
        a1 = _vfma(qv, k1v, a1)
        a2 = _vfma(qv, k2v, a2)
        a3 = _vfma(qv, k3v, a3)
        a4 = _vfma(qv, k4v, a4)
        a5 = _vfma(qv, k5v, a5)
        a6 = _vfma(qv, k6v, a6)
        a7 = _vfma(qv, k7v, a7)
    _store4(sb, s0, L, a0, a1, a2, a3)
    _store4(sb, s0 + 4 * L, L, a4, a5, a6, a7)


@njit(nogil=True, inline="always")
def _pv4(sb, p0, L, vf, j0, dv, kw, acc):
    """Four queries whose windows on one key line start on consecutive keys (a line's interior):
    ``acc[2 i + h] += sum_u sb[p0 + u L + i] * vf[j0 + (u + i) dv + h L]``.

    Each value row is loaded once for the (up to four) queries that see it: 0.75 loads per FMA, against
    1.5 for :func:`_pv2`, whose loads bounded the line kernel's P.V.
    """
    a0, a1, b0, b1, c0, c1, e0, e1 = acc
    for m in range(kw + 3):
        v0 = _vload(vf, j0 + m * dv)
        v1 = _vload(vf, j0 + m * dv + L)
        if m < kw:
            p = _vbload(sb, p0 + m * L)
            a0 = _vfma(p, v0, a0)
            a1 = _vfma(p, v1, a1)
        if 1 <= m <= kw:
            p = _vbload(sb, p0 + (m - 1) * L + 1)
            b0 = _vfma(p, v0, b0)
            b1 = _vfma(p, v1, b1)
        if 2 <= m <= kw + 1:
            p = _vbload(sb, p0 + (m - 2) * L + 2)
            c0 = _vfma(p, v0, c0)
            c1 = _vfma(p, v1, c1)
        if m >= 3:
            p = _vbload(sb, p0 + (m - 3) * L + 3)
            e0 = _vfma(p, v0, e0)
            e1 = _vfma(p, v1, e1)
    return (a0, a1, b0, b1, c0, c1, e0, e1)


@njit(nogil=True, inline="always")
def _pv2(sb, pa, pb, L, vf, ja, jb, dv, kw, a, b):
    """``a[h] += sum_u sb[pa + u L] * vf[ja + u dv + h L]`` and the same for ``b`` (two queries, one key line).

    In one loop: four independent FMA chains (a query's two alone wait on the FMA latency).
    """
    a0, a1 = a
    b0, b1 = b
    for u in range(kw):
        p = _vbload(sb, pa + u * L)
        a0 = _vfma(p, _vload(vf, ja + u * dv), a0)
        a1 = _vfma(p, _vload(vf, ja + u * dv + L), a1)
        p2 = _vbload(sb, pb + u * L)
        b0 = _vfma(p2, _vload(vf, jb + u * dv), b0)
        b1 = _vfma(p2, _vload(vf, jb + u * dv + L), b1)
    return (a0, a1), (b0, b1)


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _transpose_keys(kf, n_k, d, kt, ldk, mg):
    """``kt[c * ldk + mg + j] = k[j, c]`` (``kf``: the slice's keys, flat): ``L x L`` blocks, the last keys one by one."""
    L = lanes(kt)
    nb = n_k - n_k % L
    for j0 in range(0, nb, L):
        for c0 in range(0, d, L):
            transpose_block(kf, j0 * d + c0, d, kt, c0 * ldk + mg + j0, ldk)
    for j in range(nb, n_k):
        for c in range(d):
            kt[c * ldk + mg + j] = kf[j * d + c]


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _block_pv(sb, ls, vf, outf, ln_base, c0, C, U, kw, sx, x0, nt, emin, orow0, dv, big, qt):
    """P.V of one block of :func:`_grid_items` (its ``nt`` queries from ``x0``, output rows from ``orow0``):
    the outputs scaled by ``ls`` (each lane's ``1 / sum``); returns whether they are all finite."""
    L = lanes(qt)
    L2 = 2 * L
    ok = True
    # -- P.V per query, 2L value columns at a time, over the query's own keys: four queries at a time
    # where their windows start on consecutive keys (they share value rows), else two
    t = 0
    while t < nt:
        x = x0 + t
        lo = sx[x] - x - emin
        if t + 3 < nt and sx[x + 3] - sx[x] == 3:
            for cb in range(0, dv, L2):
                z = _vzero(qt)
                acc = (z, z, z, z, z, z, z, z)
                for cl in range(C):
                    acc = _pv4(sb, (cl * U + lo) * L + t, L, vf, (ln_base[c0 + cl] + sx[x]) * dv + cb, dv, kw, acc)
                for i in range(4):
                    inv = _vbload(ls, t + i)
                    orow = orow0 + (x - x0 + i) * dv + cb
                    _vstore(outf, orow, _vfma(acc[2 * i], inv, z))
                    _vstore(outf, orow + L, _vfma(acc[2 * i + 1], inv, z))
            ok &= all_finite(outf[orow0 + (x - x0) * dv : orow0 + (x - x0 + 4) * dv], big)
            t += 4
            continue
        t2 = min(t + 1, nt - 1)  # an odd last query runs twice (same values written)
        x2 = x0 + t2
        lo2 = sx[x2] - x2 - emin
        orow, orow2 = orow0 + (x - x0) * dv, orow0 + (x2 - x0) * dv
        inv, inv2 = _vbload(ls, t), _vbload(ls, t2)
        for cb in range(0, dv, L2):
            z = _vzero(qt)
            a = (z, z)
            b = (z, z)
            for cl in range(C):
                base = ln_base[c0 + cl]
                a, b = _pv2(sb, (cl * U + lo) * L + t, (cl * U + lo2) * L + t2, L, vf,
                            (base + sx[x]) * dv + cb, (base + sx[x2]) * dv + cb, dv, kw, a, b)  # fmt: skip
            _vstore(outf, orow + cb, _vfma(a[0], inv, z))
            _vstore(outf, orow + cb + L, _vfma(a[1], inv, z))
            _vstore(outf, orow2 + cb, _vfma(b[0], inv2, z))
            _vstore(outf, orow2 + cb + L, _vfma(b[1], inv2, z))
        ok &= all_finite(outf[orow : orow + dv], big) and all_finite(outf[orow2 : orow2 + dv], big)
        t += 2
    return ok


@njit(nogil=True, fastmath=_FM, error_model="numpy", **NO_RC)
def _grid_items(
    q, k, v, qmap, kmap, vmap, slices, W, kw, sx, ln_ptr, ln_base, scale, it_begin, it_end, out, lse, bad, kt, tag,
    mg, qt, sb, mx, ls,
):  # fmt: skip
    n_q = q.shape[1]
    d = q.shape[2]
    n_k = k.shape[1]
    dv = v.shape[2]
    L = lanes(qt)
    L2 = 2 * L
    n_lines = ln_ptr.shape[0] - 1
    Wp = qt.shape[0] // d
    ldk = kt.shape[0] // d
    # interior blocks of a line whose keys start on a vector boundary: aligned loads and shuffles
    aligned = (L == 8 or L == 16) and W % L == 0 and ldk % L == 0 and (mg - kw // 2) % L == 0
    zero = scale - scale
    neg = _neg(zero)
    big = np.finfo(q.dtype).max
    outf = out.reshape(out.shape[0] * n_q * dv)
    for it in range(it_begin, it_end):
        si = it // n_lines
        line = it - si * n_lines
        s = slices[si]
        sq, sk, sv = qmap[s], kmap[s], vmap[s]
        if tag[0] != sk:
            _transpose_keys(as_c(k[sk]).reshape(n_k * d), n_k, d, kt, ldk, mg)
            tag[0] = sk
        qf = as_c(q[sq]).reshape(n_q * d)
        vf = as_c(v[sv]).reshape(n_k * dv)
        r0 = line * W
        # -- Q^T of the line, scaled; lanes past the line's end stay zero
        wb = W - W % L
        for x0 in range(0, wb, L):
            for c0 in range(0, d, L):
                transpose_block(qf, (r0 + x0) * d + c0, d, qt, c0 * Wp + x0, Wp)
        for c in range(d):
            for x in range(wb, Wp):
                qt[c * Wp + x] = qf[(r0 + x) * d + c] if x < W else zero
        for e in range(d * Wp):
            qt[e] *= scale
        c0 = ln_ptr[line]
        C = ln_ptr[line + 1] - c0
        for x0 in range(0, W, L):
            nt = min(L, W - x0)
            emin = sx[x0] - x0
            emax = emin
            for t in range(1, nt):
                e = sx[x0 + t] - (x0 + t)
                emin = min(emin, e)
                emax = max(emax, e)
            U = emax - emin + kw
            # -- scores: row cl * U + u holds, for lane t, key ln_base[c0 + cl] + x0 + t + emin + u
            for cl in range(C):
                kb0 = mg + ln_base[c0 + cl] + x0 + emin
                # a group's offsets past U write into the next line's rows, computed after it, or into the
                # spare rows past the block's
                if aligned and emin == -(kw // 2) and U <= 4:  # the interior, and a line's first block
                    _qk4(qt, x0, Wp, kt, kb0, ldk, d, sb, cl * U * L, True)
                elif aligned and emin == -(kw // 2) and U <= 16:
                    _qk8(qt, x0, Wp, kt, kb0, ldk, d, sb, cl * U * L, False)
                    if U > 8:
                        _qk8(qt, x0, Wp, kt, kb0, ldk, d, sb, (cl * U + 8) * L, True)
                else:
                    for u in range(0, U, 4):
                        _qk4(qt, x0, Wp, kt, kb0 + u, ldk, d, sb, (cl * U + u) * L, False)
            R = C * U
            if emax != emin:  # shifted windows at a line's end: each lane keeps its own kw offsets
                for t in range(nt):
                    lo = sx[x0 + t] - (x0 + t) - emin
                    for cl in range(C):
                        for u in range(lo):
                            sb[(cl * U + u) * L + t] = neg
                        for u in range(lo + kw, U):
                            sb[(cl * U + u) * L + t] = neg
            # -- softmax, lane by lane over the block's R rows
            for t in range(L):
                mx[t] = neg
            # a NaN or an infinity among the scores (q, k) or, below, the outputs (v): bad[s]
            ok = all_finite(sb[: R * L], big)
            lane_max(sb, R, mx)
            lane_softmax(sb, R, mx, ls)
            for t in range(nt):
                lse[s, r0 + x0 + t] = mx[t] + np.log(ls[t])
                ls[t] = 1 / ls[t]  # from here on, the lane's factor for its outputs
            ok &= _block_pv(sb, ls, vf, outf, ln_base, c0, C, U, kw, sx, x0, nt, emin, (s * n_q + r0 + x0) * dv, dv, big, qt)
            if not ok:
                bad[s] = 1


@njit(nogil=True)
def _aligned(raw, n):
    """``n`` elements of ``raw`` (``n + L`` long) from its first element on a vector boundary (64 bytes at most)."""
    L = lanes(raw)
    o = (L - raw.ctypes.data // raw.itemsize % L) % L
    return raw[o : o + n]


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def grid_forward(
    q, k, v, qmap, kmap, vmap, slices, W, kw, sx, ln_ptr, ln_base, scale, it_begin, it_end, out, lse, bad, kt, tag, mg,
):  # fmt: skip
    """The lines ``[it_begin, it_end)`` of the slices ``slices`` (see the module docstring): ``out`` and ``lse`` rows.

    ``W``: the last axis' length; ``kw``: its window; ``sx`` (W,): each position's window start on it;
    line ``i`` reads the key lines starting at ``ln_base[ln_ptr[i]:ln_ptr[i + 1]]``.  ``kt``: the thread's
    ``d x (n_k + 2 mg)`` transposed keys (the ``mg`` margin columns zero), ``tag``: (1,) int64, the
    stored slice ``kt`` holds (-1: none).  ``bad[s] = 1`` where a score or an output of slice ``s`` is NaN or
    infinite (see :func:`sparseattn.kernels.forward.tiles_forward`).
    """
    d = q.shape[2]
    L = lanes(q)
    C = 0
    for i in range(ln_ptr.shape[0] - 1):
        C = max(C, ln_ptr[i + 1] - ln_ptr[i])
    if it_end <= it_begin:
        return
    Wp = (W + L - 1) // L * L
    qt = _aligned(np.zeros(d * Wp + L, dtype=q.dtype), d * Wp)
    # U <= 2 kw - 1 offsets per key line, and up to 15 rows written past the last
    sb = _aligned(np.empty((max(C, 1) * (2 * kw - 1) + 16) * L + L, dtype=q.dtype), (max(C, 1) * (2 * kw - 1) + 16) * L)
    mx = np.empty(L, dtype=q.dtype)
    ls = np.empty(L, dtype=q.dtype)
    _grid_items(q, k, v, qmap, kmap, vmap, slices, W, kw, sx, ln_ptr, ln_base, scale, it_begin, it_end, out, lse,
                bad, kt, tag, mg, qt, sb, mx, ls)  # fmt: skip
