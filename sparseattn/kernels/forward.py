"""The fused forward kernels: tile-planned scores, online softmax and P.V.

Raw arrays in, raw arrays out; no validation (``sparseattn.engine.fused_forward`` prepares
everything).  The plan layout is documented in :mod:`sparseattn.engine.plan`.

Three serial, ``nogil`` kernels run one after the other for the slices that
share a plan; ``sparseattn.engine.fused_forward`` runs disjoint work ranges of the first two
on several Python threads (no Numba parallel region: faster to compile, and
safe to call from threads that Dask or the user already run):

``tiles_forward``
    Row tiles of ``T`` queries.  Per tile: the contiguous key span (one or a
    few dense chunks, each row restricted to its own run inside it; the
    products run on the register-blocked micro-kernels of
    :mod:`sparseattn.kernels.simd`), the
    tile's shared gathered columns (a small dense GEMM with a membership
    mask) and each row's residual columns (per-row dot products).  Every part
    feeds one online softmax (running max ``m``, running sum ``l`` and the
    unnormalised output), so no nnz-sized score array ever exists.
``long_rows_partial``
    The few very long rows (global tokens), cut into column chunks shared
    by the threads; rows with identical columns are batched into one GEMM.
    Each chunk leaves a partial ``(m, l, o)``.
``long_rows_merge``
    Merges the partials of every long row with the log-sum-exp formula.

The other products call BLAS through ``np.dot``; the caller caps BLAS at one thread
while these kernels run (they run on several threads already).  ``exp`` is a
vectorisable polynomial (Numba has no vector math library here).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .mods import mod_cols, mod_one, mod_span
from .online import _add_into, _one_key_update, _row_update
from .simd import (
    _FM, NO_RC, _mm_nn, _mm_nt, _neg, all_finite, as_c, as_readonly, lanes, pack_panel, pv_block, qk_block,
)

__all__ = ["tiles_forward", "long_rows_partial", "long_rows_merge"]

#: tiles with at most this many shared columns skip the gather + GEMM for them
_FEW_SHARED = 8


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _span_simd(
    qbuf, ks, vs, s, rows, k0, k1, chunk, row_lo, row_hi, rb, t0, sbuf, accf, dv,
    kp, packed, glo, ghi, use_valid, kvrow, m, l, acc, neg, zero, mod, slope, sl, big, nf,
):  # fmt: skip
    """One span ``[k0, k1)`` of the tile of rows ``t0..`` through the micro-kernels (``qk_block``, ``pv_block``).

    Row ``r`` of the tile has its run ``[row_lo[rb + r], row_hi[rb + r])`` (``rb = t0`` for the tile's
    span, ``x * T`` for its extra span ``x``).

    Chunks start on panel boundaries (2L keys).  Per 6-row register block only
    the panels that its rows' runs touch are computed (QK^T) and only the keys
    inside the union of its runs are summed (P.V), so the masked corners of a
    band tile cost almost nothing.  K^T panels are packed on first use into
    the thread's direct-mapped panel cache ``kp``: panel ``p`` of slice ``s``
    lives in slot ``p % n_slots``, tagged ``packed[slot] == s * n_panels + p``
    (the cache holds the tile's whole span and a chunk more, up to a byte cap, so a tile never
    evicts its own panels, the next tile of a band repacks only the keys it adds, and a causal or
    full pattern packs each panel once per slice).
    """
    d = ks.shape[1]
    n_k = ks.shape[0]
    L2 = 2 * lanes(qbuf)
    ng = (rows + 5) // 6
    n_panels = (n_k + L2 - 1) // L2
    n_slots = packed.shape[0]
    vf = vs.reshape(n_k * dv)
    a = k0 // L2 * L2
    nch = (k1 - a + chunk - 1) // chunk
    step = ((k1 - a + nch - 1) // nch + L2 - 1) // L2 * L2
    while a < k1:
        b = min(k1, a + step)
        pa = a // L2
        lds = (b - a + L2 - 1) // L2 * L2
        # 1. scores, block by block, only where some row of the block has its run
        for g in range(ng):
            lo_g = lds
            hi_g = 0
            for r in range(6 * g, min(rows, 6 * g + 6)):
                lo = max(row_lo[rb + r], a) - a
                hi = min(row_hi[rb + r], b) - a
                if hi > lo:
                    lo_g = min(lo_g, lo)
                    hi_g = max(hi_g, hi)
            glo[g] = lo_g
            ghi[g] = hi_g
            for p in range(lo_g // L2, (hi_g + L2 - 1) // L2):
                pp = pa + p
                slot = pp % n_slots
                if packed[slot] != s * n_panels + pp:
                    pack_panel(ks, pp, n_k, kp, slot * d * L2, zero)
                    packed[slot] = s * n_panels + pp
                qk_block(qbuf, 6 * g * d, d, kp, slot * d * L2, sbuf, 6 * g * lds + p * L2, lds)
        # 2. online softmax, row by row
        vrow = kvrow[a:b] if use_valid else kvrow[:0]
        for r in range(rows):
            lo = max(row_lo[rb + r], a) - a
            hi = min(row_hi[rb + r], b) - a
            if hi < lo:
                hi = lo
            if not all_finite(sbuf[r * lds + lo : r * lds + hi], big):  # a NaN or an infinity in q or k
                nf[0] = 1
            mod_span(sbuf[r * lds : r * lds + lds], lo, hi, t0 + r, a, mod, slope, sl)
            _row_update(sbuf[r * lds : r * lds + lds], lo, hi, vrow, use_valid, r, m, l, acc, neg, zero)
        # 3. P.V into the accumulator, over each block's union of runs
        for g in range(ng):
            if ghi[g] > glo[g]:
                for cb in range(0, dv, L2):
                    pv_block(sbuf, 6 * g * lds, lds, glo[g], ghi[g], vf, a * dv + cb, dv, accf, 6 * g * dv + cb, dv)
        a = b


@njit(nogil=True, fastmath=_FM)
def _span_blas(qt, ks, vs, rows, k0, k1, chunk, row_lo, row_hi, rb, t0, sbuf, kvrow, use_valid,
               m, l, acc, tmp, neg, zero, mod, slope, sl, first, big, nf):  # fmt: skip
    """The span ``[k0, k1)`` through BLAS (``d_v`` not a multiple of 2 vectors); returns the new ``first``."""
    nch = (k1 - k0 + chunk - 1) // chunk
    step = (k1 - k0 + nch - 1) // nch
    a = k0
    while a < k1:
        b = min(k1, a + step)
        wd = b - a
        sm = sbuf[: rows * wd].reshape((rows, wd))
        _mm_nt(qt, ks[a:b], sm)
        vrow = kvrow[a:b] if use_valid else kvrow[:0]
        for r in range(rows):
            lo = max(row_lo[rb + r], a) - a
            hi = min(row_hi[rb + r], b) - a
            if hi < lo:
                hi = lo
            if not all_finite(sm[r, lo:hi], big):
                nf[0] = 1
            mod_span(sm[r], lo, hi, t0 + r, a, mod, slope, sl)
            _row_update(sm[r], lo, hi, vrow, use_valid, r, m, l, acc, neg, zero)
        if first:
            _mm_nn(sm, vs[a:b], acc[:rows])
            first = False
        else:
            _mm_nn(sm, vs[a:b], tmp[:rows])
            _add_into(acc, tmp, rows)
        a = b
    return first


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _few_shared(qt, ks, vs, rows, T, t0, c0, c1, sh_cols, sh_mask, key_valid, kb, use_valid,
                mod, slope, s, m, l, acc, half, zero, big, nf):  # fmt: skip
    """A tile's few shared columns ``sh_cols[c0:c1]``: direct dot products, no gather and no GEMM call."""
    d = qt.shape[1]
    for c in range(c0, c1):
        j = sh_cols[c]
        if use_valid and not key_valid[kb, j]:
            continue
        vj = vs[j]
        for r in range(rows):
            if sh_mask[c * T + r] == 0:
                continue
            x = zero
            for e in range(d):
                x += qt[r, e] * ks[j, e]
            if not abs(x) <= big:
                nf[0] = 1
            _one_key_update(mod_one(x, t0 + r, j, mod, slope, s), vj, r, m, l, acc, half, zero)


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _residual_rows(qt, ks, vs, rows, t0, rs_ptr, rs_lo, rs_hi, rcol, sbuf, okb, key_valid, kb, use_valid,
                   chunk, mod, slope, s, m, l, acc, neg, zero, big, nf):  # fmt: skip
    """Each row's residual runs, their keys listed in chunks of up to ``chunk`` into ``rcol``."""
    d = qt.shape[1]
    dv = vs.shape[1]
    for r in range(rows):
        i = t0 + r
        e = rs_ptr[i]
        e_end = rs_ptr[i + 1]
        j = rs_lo[e] if e < e_end else 0
        while e < e_end:
            ne = 0
            while e < e_end and ne < chunk:
                rcol[ne] = j
                ne += 1
                j += 1
                if j == rs_hi[e]:
                    e += 1
                    if e < e_end:
                        j = rs_lo[e]
            sr = sbuf[:ne]
            qi = qt[r]
            for c2 in range(ne):
                kj = ks[rcol[c2]]
                x = zero
                for c in range(d):
                    x += qi[c] * kj[c]
                sr[c2] = x
                if use_valid:
                    okb[c2] = key_valid[kb, rcol[c2]]
            if not all_finite(sr, big):
                nf[0] = 1
            mod_cols(sr, ne, rcol, np.int64(0), i, mod, slope, s)
            _row_update(sr, np.int64(0), ne, okb, use_valid, r, m, l, acc, neg, zero)
            ar = acc[r]
            for c2 in range(ne):  # a zero weight too: 0 x inf is NaN (the non-finite policy)
                p = sr[c2]
                vj = vs[rcol[c2]]
                for c in range(dv):
                    ar[c] += p * vj[c]


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def tiles_forward(
    q, k, v, qmap, kmap, vmap, slices, T, chunk, tile_k0, tile_k1, row_lo, row_hi,
    xs_ptr, xs_k0, xs_k1, xs_lo, xs_hi, sh_ptr, sh_cols, sh_mask, rs_ptr, rs_lo, rs_hi,
    scale, key_valid, slice_batch, use_valid, mod, slopes, it_begin, it_end, out, lse, bad, kp, packed,
):  # fmt: skip
    """Tile pass for the slices ``slices`` sharing one plan, work items ``[it_begin, it_end)``.

    Item ``it = si * n_tiles + t`` is tile ``t`` of slice ``slices[si]``;
    slice ``s`` reads ``q[qmap[s]]``, ``k[kmap[s]]`` and ``v[vmap[s]]`` (an
    input broadcast over slices is stored once).
    Writes ``out[s, rows]`` and ``lse[s, rows]`` for every row of those
    tiles; long rows come out empty here and are overwritten by the long-row
    pass.  ``bad[s] = 1`` when a raw score of an allowed pair or an output row of
    slice ``s`` is NaN or infinite (the fast-math arithmetic is then not the
    non-finite policy's: the caller recomputes the slice).  Serial and ``nogil``: the caller runs disjoint item ranges on
    several threads.  ``mod`` and ``slopes``: the score modifiers (see
    :mod:`sparseattn.kernels.mods`), applied to every row of scores.

    ``kp`` and ``packed`` are the calling thread's K^T panel cache (see
    :func:`sparseattn.engine.fused_forward.panel_buffers`; reused across its ranges of one call).  When they
    are non-empty, spans go through the register-blocked micro-kernels of
    ``qk_block`` / ``pv_block`` (needs ``dv`` a multiple of 2 vectors);
    otherwise through BLAS.
    """
    n_q = q.shape[1]
    d = q.shape[2]
    dv = v.shape[2]
    n_tiles = tile_k0.shape[0]
    dt = q.dtype
    zero = scale - scale
    neg = _neg(zero)
    half = neg * 0.5
    ninf = -np.inf
    big = np.finfo(dt).max
    max_sh = 0
    for t in range(n_tiles):
        max_sh = max(max_sh, sh_ptr[t + 1] - sh_ptr[t])
    g_cap = min(max_sh, chunk)
    L2 = 2 * lanes(q)
    simd = packed.shape[0] > 0
    Tp = (T + 5) // 6 * 6  # rows rounded up to whole 6-row register blocks
    if it_end > it_begin:
        sbuf = np.empty(Tp * (chunk + L2), dtype=dt)
        acc = np.zeros((Tp, dv), dtype=dt)
        accf = acc.reshape(Tp * dv)
        tmp = np.empty((T, dv), dtype=dt)
        m = np.empty(T, dtype=dt)
        l = np.empty(T, dtype=dt)
        kg = np.empty((max(g_cap, 1), d), dtype=dt)
        vg = np.empty((max(g_cap, 1), dv), dtype=dt)
        okb = np.empty(chunk + L2, dtype=np.bool_)
        rcol = np.empty(chunk, dtype=np.int64)
        qbuf = np.zeros(Tp * d, dtype=dt)  # rows past a short tile's end stay finite
        glo = np.empty(Tp // 6, dtype=np.int64)
        ghi = np.empty(Tp // 6, dtype=np.int64)
        nf = np.zeros(1, dtype=np.uint8)  # the item met a NaN or an infinity
        for it in range(it_begin, it_end):
            si = it // n_tiles
            t = it - si * n_tiles
            s = slices[si]
            sq, sk, sv = qmap[s], kmap[s], vmap[s]  # a broadcast input is one array shared by its slices
            ks, vs = as_c(k[sk]), as_c(v[sv])  # each stored slice is contiguous (a cache view: not between them)
            kb = slice_batch[s]
            slope = slopes[min(s, slopes.shape[0] - 1)]
            t0 = t * T
            t1 = min(n_q, t0 + T)
            rows = t1 - t0
            nf[0] = 0
            for r in range(rows):
                m[r] = neg
                l[r] = zero
            first = True
            if simd:  # the micro-kernels accumulate into acc
                for e in range(Tp * dv):
                    accf[e] = zero
                first = False
            qt = qbuf[: rows * d].reshape((rows, d))
            qsrc = q[sq, t0:t1]
            for r in range(rows):
                for c in range(d):
                    qt[r, c] = qsrc[r, c] * scale
            # -- 1. the contiguous span, then the extra spans, in chunks of at most `chunk` keys
            kvrow = key_valid[kb] if use_valid else key_valid[0, :0]
            for x in range(xs_ptr[t] - 1, xs_ptr[t + 1]):
                main = x < xs_ptr[t]
                k0 = tile_k0[t] if main else xs_k0[x]
                k1 = tile_k1[t] if main else xs_k1[x]
                lo_a = row_lo if main else xs_lo
                hi_a = row_hi if main else xs_hi
                rb = t0 if main else x * T
                if simd and k1 > k0:
                    _span_simd(
                        qbuf, ks, vs, sk, rows, k0, k1, chunk, lo_a, hi_a, rb, t0, sbuf, accf, dv,
                        kp, packed, glo, ghi, use_valid, kvrow, m, l, acc, neg, zero, mod, slope, s, big, nf,
                    )  # fmt: skip
                if not simd and k1 > k0:
                    first = _span_blas(qt, ks, vs, rows, k0, k1, chunk, lo_a, hi_a, rb, t0, sbuf, kvrow, use_valid,
                                       m, l, acc, tmp, neg, zero, mod, slope, s, first, big, nf)  # fmt: skip
            if first:
                for r in range(rows):
                    for c in range(dv):
                        acc[r, c] = zero
                first = False
            # -- 2. shared gathered columns (global keys, dense leftovers)
            c0 = sh_ptr[t]
            c1 = sh_ptr[t + 1]
            if c1 - c0 <= _FEW_SHARED:
                _few_shared(qt, ks, vs, rows, T, t0, c0, c1, sh_cols, sh_mask, key_valid, kb, use_valid,
                            mod, slope, s, m, l, acc, half, zero, big, nf)  # fmt: skip
                c0 = c1
            while c0 < c1:
                cb = min(c1, c0 + g_cap)
                nc = cb - c0
                for c in range(nc):
                    j = sh_cols[c0 + c]
                    for e in range(d):
                        kg[c, e] = ks[j, e]
                    for e in range(dv):
                        vg[c, e] = vs[j, e]
                sm = sbuf[: rows * nc].reshape((rows, nc))
                _mm_nt(qt, as_readonly(kg[:nc]), sm)  # the call site of k's slices: one specialisation
                for r in range(rows):
                    for c in range(nc):
                        ok = sh_mask[(c0 + c) * T + r] != 0
                        if use_valid:
                            ok = ok and key_valid[kb, sh_cols[c0 + c]]
                        okb[c] = ok
                        if ok and not abs(sm[r, c]) <= big:
                            nf[0] = 1
                    mod_cols(sm[r], nc, sh_cols, c0, t0 + r, mod, slope, s)
                    _row_update(sm[r], np.int64(0), nc, okb, np.bool_(True), r, m, l, acc, neg, zero)  # typed, not literal: one specialisation
                _mm_nn(sm, as_readonly(vg[:nc]), tmp[:rows])
                _add_into(acc, tmp, rows)
                c0 = cb
            # -- 3. per-row residual runs, their keys listed in chunks of up to `chunk` into `rcol`
            _residual_rows(qt, ks, vs, rows, t0, rs_ptr, rs_lo, rs_hi, rcol, sbuf, okb, key_valid, kb, use_valid,
                           chunk, mod, slope, s, m, l, acc, neg, zero, big, nf)  # fmt: skip
            # -- finalise
            for r in range(rows):
                i = t0 + r
                if m[r] > half and l[r] > zero:
                    inv = dt.type(1) / l[r]  # in the compute dtype (1 / l[r] would be float64, the products too)
                    ok = True
                    for c in range(dv):
                        o = acc[r, c] * inv
                        out[s, i, c] = o
                        ok &= abs(o) <= big
                    lse[s, i] = m[r] + np.log(l[r])
                    if not ok:  # a NaN or an infinity in v (or an overflow)
                        nf[0] = 1
                else:
                    for c in range(dv):
                        out[s, i, c] = zero
                    lse[s, i] = ninf
            if nf[0] != 0:
                bad[s] = 1


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def long_rows_partial(
    q, k, v, qmap, kmap, vmap, slices, lg_rows, grp_ptr, it_grp, it_a, it_b, it_off,
    scale, key_valid, slice_batch, use_valid, mod, slopes, part_m, part_l, part_o, bad, job_begin, job_end,
):  # fmt: skip
    """Partial softmax of the (slice, long-row chunk) jobs ``[job_begin, job_end)``, ``job = si * n_items + it``.

    Item ``it`` covers the rows ``lg_rows[grp_ptr[g] : grp_ptr[g + 1]]`` of
    group ``g = it_grp[it]`` (they share their columns) and the keys
    ``[it_a[it], it_b[it])``.  Row ``rr`` of the group writes its partial to
    ``part_*[si, it_off[it] + rr]``: running max, sum and unnormalised output.
    Serial and ``nogil`` like :func:`tiles_forward`, which it shares ``bad`` with.
    """
    d = q.shape[2]
    n_items = it_grp.shape[0]
    dt = q.dtype
    zero = scale - scale
    neg = _neg(zero)
    big = np.finfo(dt).max
    max_rows = 1
    max_w = 1
    for it in range(n_items):
        g = it_grp[it]
        max_rows = max(max_rows, grp_ptr[g + 1] - grp_ptr[g])
        max_w = max(max_w, it_b[it] - it_a[it])
    qbuf = np.empty(max_rows * d, dtype=dt)
    sbuf = np.empty(max_rows * max_w, dtype=dt)
    m = np.empty(max_rows, dtype=dt)
    l = np.empty(max_rows, dtype=dt)
    for job in range(job_begin, job_end):
        si = job // n_items
        it = job - si * n_items
        s = slices[si]
        sq, sk, sv = qmap[s], kmap[s], vmap[s]
        ks, vs = as_c(k[sk]), as_c(v[sv])
        kb = slice_batch[s]
        g = it_grp[it]
        r0 = grp_ptr[g]
        nr = grp_ptr[g + 1] - r0
        a = it_a[it]
        b = it_b[it]
        wd = b - a
        qg = qbuf[: nr * d].reshape((nr, d))
        for rr in range(nr):
            for c in range(d):
                qg[rr, c] = q[sq, lg_rows[r0 + rr], c] * scale
        sm = sbuf[: nr * wd].reshape((nr, wd))
        _mm_nt(qg, ks[a:b], sm)
        o = part_o[si, it_off[it] : it_off[it] + nr]
        for rr in range(nr):
            m[rr] = neg
            l[rr] = zero
            vrow = key_valid[kb, a:b] if use_valid else key_valid[0, :0]
            if not all_finite(sm[rr], big):
                bad[s] = 1
            mod_span(sm[rr], np.int64(0), wd, lg_rows[r0 + rr], a, mod, slopes[min(s, slopes.shape[0] - 1)], s)
            _row_update(sm[rr], np.int64(0), wd, vrow, use_valid, rr, m, l, o, neg, zero)
        _mm_nn(sm, vs[a:b], o)
        for rr in range(nr):
            part_m[si, it_off[it] + rr] = m[rr]
            part_l[si, it_off[it] + rr] = l[rr]


@njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")
def long_rows_merge(slices, lg_rows, grp_ptr, grp_it_ptr, it_off, part_m, part_l, part_o, out, lse, bad):
    """Merge each long row's chunk partials: ``m = max m_i``, ``l = sum e^(m_i - m) l_i``, same for ``o``.

    A NaN or an infinity in a merged row sets ``bad[s]`` (see :func:`tiles_forward`).
    """
    n_grp = grp_ptr.shape[0] - 1
    ns = slices.shape[0]
    dv = out.shape[2]
    zero = np.zeros(1, dtype=out.dtype)[0]
    neg = _neg(zero)
    half = neg * 0.5
    big = np.finfo(out.dtype).max
    n_long = lg_rows.shape[0]
    for job in range(ns * n_long):  # small: a few rows times n / chunk partials
        si = job // n_long
        lr = job - si * n_long
        s = slices[si]
        # the group of long row lr (groups are contiguous in lg_rows)
        g = 0
        lo_g = 0
        hi_g = n_grp
        while hi_g - lo_g > 1:
            mid = (lo_g + hi_g) // 2
            if grp_ptr[mid] <= lr:
                lo_g = mid
            else:
                hi_g = mid
        g = lo_g
        rr = lr - grp_ptr[g]
        i = lg_rows[lr]
        mx = neg
        for it in range(grp_it_ptr[g], grp_it_ptr[g + 1]):
            mi = part_m[si, it_off[it] + rr]
            mx = mi if mi > mx else mx
        for c in range(dv):
            out[s, i, c] = zero
        if mx <= half:
            lse[s, i] = -np.inf
            continue
        ltot = zero
        for it in range(grp_it_ptr[g], grp_it_ptr[g + 1]):
            p = it_off[it] + rr
            mi = part_m[si, p]
            if mi <= half:
                continue
            f = np.exp(mi - mx)
            ltot += f * part_l[si, p]
            for c in range(dv):
                out[s, i, c] += f * part_o[si, p, c]
        if ltot > zero:
            inv = 1 / ltot
            ok = True
            for c in range(dv):
                out[s, i, c] *= inv
                ok &= abs(out[s, i, c]) <= big
            lse[s, i] = mx + np.log(ltot)
            if not ok:
                bad[s] = 1
        else:
            lse[s, i] = -np.inf
