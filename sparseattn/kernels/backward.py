"""The fused backward kernels: gradients tile by tile from the forward's log-sum-exp.

Raw arrays in, raw arrays out; no validation (``sparseattn.engine.fused_backward``
prepares everything).  They walk the same tile plan as the forward
(:mod:`sparseattn.engine.plan`) and follow FlashAttention-2's recipe: per tile and
key chunk, recompute ``S = scale Q K^T`` and ``dP = dO V^T``, turn them into
``P = exp(S - lse)`` and ``dS = P (dP - D)`` on each row's allowed,
non-padded keys, then ``dQ += dS K``, ``dK += dS^T (scale Q)`` and
``dV += P^T dO``: five products against the forward's two, and no
nnz-sized array.

``tiles_backward``
    A run of tiles of ONE slice.  ``dQ`` rows belong to their tile and are
    written directly; ``dK`` / ``dV`` contributions go to the calling thread's
    private key buffers (``dkb``, ``dvb``), and the keys touched are recorded
    (one interval for the spans, a list for scattered columns) so that
    :func:`flush_keys` adds exactly those rows to the shared gradients under
    the stored key/value slice's lock.  Spans run on the micro-kernels of
    :mod:`sparseattn.kernels.simd` (``qk_block`` for S and dP from packed
    K^T and V^T panels, ``pv_block`` for dS K, ``tn_block`` for the two
    transposed products) when ``d`` and ``d_v`` are multiples of 2L, else on
    BLAS.  Shared columns and residual runs use direct per-entry loops.
``long_rows_backward``
    The long (global) rows of a range of slices, after the tile pass: their
    chunks are BLAS products, their ``dK`` / ``dV`` go straight into the
    stored key/value slice's gradients (concurrent ranges hold disjoint
    stored slices).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .mods import active, mod_grad_span
from .pair_grads import _pair_grad, _run_grad
from .simd import _FM, NO_RC, _exp, _mm_nn, _mm_nt, _mm_tn, lanes, pack_panel, pv_block, qk_block, tn_block

__all__ = ["tiles_backward", "long_rows_backward", "flush_keys", "KEY_PAD"]

#: extra rows of the per-thread key buffers: a 6-key register block may run past the last key
KEY_PAD = 8


@njit(fastmath=_FM, nogil=True, **NO_RC)
def _grad_row(srow, dprow, lo, hi, vrow, use_valid, li, di, zero, i, j0, mod, slope, sl):
    """One row over one chunk: scaled scores ``srow`` -> ``P``, ``dprow`` (dO.v) -> ``dS``; zero outside ``[lo, hi)``.

    ``P = exp(s' - lse)`` and ``dS = P (dP - D) ds'/ds`` on the row's run
    (``s'`` the modified score of query ``i`` and key ``j0 + j``), only where
    ``vrow`` is True when ``use_valid`` (padded keys).
    """
    n = srow.shape[0]
    for j in range(lo):
        srow[j] = zero
        dprow[j] = zero
    for j in range(hi, n):
        srow[j] = zero
        dprow[j] = zero
    x = srow[lo:hi]
    y = dprow[lo:hi]
    if active(mod):  # x <- s', y <- (y - D) ds'/ds, then the plain loops below with D = 0
        mod_grad_span(srow, dprow, lo, hi, i, j0, di, mod, slope, sl)
        di = zero
    if use_valid:
        vv = vrow[lo:hi]
        for j in range(x.shape[0]):
            p = _exp(x[j] - li) if vv[j] else zero
            x[j] = p
            y[j] = p * (y[j] - di)
    else:
        for j in range(x.shape[0]):
            p = _exp(x[j] - li)
            x[j] = p
            y[j] = p * (y[j] - di)


@njit(fastmath=_FM, nogil=True, **NO_RC)
def _touch(j, mark, cols, lohi):
    if mark[j] == 0:
        mark[j] = 1
        cols[lohi[2]] = j
        lohi[2] += 1


@njit(fastmath=_FM, nogil=True, **NO_RC)
def _residual_run(qt, dot, dqt, r, ks, vs, dkb, dvb, lo, hi, li, di, zero, i, mod, slope, s, use_valid, valid, mark,
                  cols, lohi):  # fmt: skip
    """Row ``r``'s residual run ``[lo, hi)``: whole (groups of keys), or key by key past the padding mask."""
    if not use_valid:
        for j in range(lo, hi):
            _touch(j, mark, cols, lohi)
        _run_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, lo, hi, li, di, zero, i, mod, slope, s)
        return
    for j in range(lo, hi):
        if valid[j]:
            _touch(j, mark, cols, lohi)
            _pair_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, li, di, zero, i, mod, slope, s)


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _span_grad_simd(
    qbuf, dobuf, ks, vs, s, rows, k0, k1, chunk, row_lo, row_hi, rb, t0, live, sbuf, dpbuf, dqacc,
    kp, vp, packed_k, packed_v, glo, ghi, use_valid, kvrow, lse_t, dsum_t, dkb, dvb, lohi, zero, mod, slope, sl,
):  # fmt: skip
    """One span ``[k0, k1)`` of the tile of rows ``t0..`` through the micro-kernels (see the module docstring).

    Row ``r``'s run is ``[row_lo[rb + r], row_hi[rb + r])`` (the tile's span or one of its extra spans).
    """
    d = ks.shape[1]
    dv = vs.shape[1]
    n_k = ks.shape[0]
    L2 = 2 * lanes(qbuf)
    ng = (rows + 5) // 6
    n_panels = (n_k + L2 - 1) // L2
    n_slots = packed_k.shape[0]
    kf = ks.reshape(n_k * d)
    dkf = dkb.reshape(dkb.shape[0] * d)
    dvf = dvb.reshape(dvb.shape[0] * dv)
    a = k0 // L2 * L2
    nch = (k1 - a + chunk - 1) // chunk
    step = ((k1 - a + nch - 1) // nch + L2 - 1) // L2 * L2
    while a < k1:
        b = min(k1, a + step)
        pa = a // L2
        lds = (b - a + L2 - 1) // L2 * L2 + L2  # one spare panel: a 6-key block never reads the next row
        kmin = lds
        kmax = 0
        # 1. S and dP, block by block, only on the panels its rows' runs touch
        for g in range(ng):
            lo_g = lds
            hi_g = 0
            for r in range(6 * g, min(rows, 6 * g + 6)):
                if not live[r]:
                    continue
                lo = max(row_lo[rb + r], a) - a
                hi = min(row_hi[rb + r], b) - a
                if hi > lo:
                    lo_g = min(lo_g, lo)
                    hi_g = max(hi_g, hi)
            glo[g] = lo_g
            ghi[g] = hi_g
            if hi_g > lo_g:
                kmin = min(kmin, lo_g)
                kmax = max(kmax, hi_g)
            for p in range(lo_g // L2, (hi_g + L2 - 1) // L2):
                pp = pa + p
                slot = pp % n_slots
                if packed_k[slot] != s * n_panels + pp:
                    pack_panel(ks, pp, n_k, kp, slot * d * L2, zero)
                    packed_k[slot] = s * n_panels + pp
                if packed_v[slot] != s * n_panels + pp:
                    pack_panel(vs, pp, n_k, vp, slot * dv * L2, zero)
                    packed_v[slot] = s * n_panels + pp
                qk_block(qbuf, 6 * g * d, d, kp, slot * d * L2, sbuf, 6 * g * lds + p * L2, lds)
                qk_block(dobuf, 6 * g * dv, dv, vp, slot * dv * L2, dpbuf, 6 * g * lds + p * L2, lds)
        if kmax <= kmin:
            a = b
            continue
        # 2. P and dS, row by row
        vrow = kvrow[a:b] if use_valid else kvrow[:0]
        for r in range(rows):
            lo = max(row_lo[rb + r], a) - a
            hi = min(row_hi[rb + r], b) - a
            if hi < lo or not live[r]:
                lo = 0
                hi = 0
            _grad_row(sbuf[r * lds : r * lds + lds], dpbuf[r * lds : r * lds + lds], lo, hi, vrow, use_valid,
                      lse_t[r], dsum_t[r], zero, t0 + r, a, mod, slope, sl)  # fmt: skip
        # 3. dQ += dS K over each block's union of runs
        for g in range(ng):
            if ghi[g] > glo[g]:
                for cb in range(0, d, L2):
                    pv_block(dpbuf, 6 * g * lds, lds, glo[g], ghi[g], kf, a * d + cb, d, dqacc, 6 * g * d + cb, d)
        # 4. dK += dS^T Q and dV += P^T dO, 6 keys at a time, into the thread's key buffers,
        #    over the rows whose runs reach those keys (a band tile's corners are skipped)
        #    (at register-block granularity: the blocks whose union of runs meets the keys)
        for kk in range(kmin, kmax, 6):
            r0 = rows
            r1 = 0
            for g in range(ng):
                if ghi[g] > glo[g] and glo[g] < kk + 6 and ghi[g] > kk:
                    r0 = min(r0, 6 * g)
                    r1 = min(rows, 6 * g + 6)
            if r1 <= r0:
                continue
            for cb in range(0, d, L2):
                tn_block(dpbuf, lds, kk, r0, r1, qbuf, d, cb, dkf, (a + kk) * d + cb, d)
            for cb in range(0, dv, L2):
                tn_block(sbuf, lds, kk, r0, r1, dobuf, dv, cb, dvf, (a + kk) * dv + cb, dv)
        lohi[0] = min(lohi[0], a + kmin)
        lohi[1] = max(lohi[1], a + kmax)
        a = b


@njit(nogil=True, fastmath=_FM, **NO_RC)
def _span_grad_blas(
    qt, dot, dqt, ks, vs, rows, k0, k1, chunk, row_lo, row_hi, rb, t0, live, sbuf, dpbuf,
    tmpq, tmpk, tmpv, use_valid, kvrow, lse_t, dsum_t, dkb, dvb, lohi, zero, mod, slope, sl,
):  # fmt: skip
    """The span ``[k0, k1)`` through BLAS (``d`` or ``d_v`` not a multiple of 2 vectors)."""
    d = ks.shape[1]
    dv = vs.shape[1]
    nch = (k1 - k0 + chunk - 1) // chunk
    step = (k1 - k0 + nch - 1) // nch
    a = k0
    while a < k1:
        b = min(k1, a + step)
        wd = b - a
        sm = sbuf[: rows * wd].reshape((rows, wd))
        dpm = dpbuf[: rows * wd].reshape((rows, wd))
        _mm_nt(qt, ks[a:b], sm)
        _mm_nt(dot, vs[a:b], dpm)
        vrow = kvrow[a:b] if use_valid else kvrow
        for r in range(rows):
            lo = max(row_lo[rb + r], a) - a
            hi = min(row_hi[rb + r], b) - a
            if hi < lo or not live[r]:
                lo = 0
                hi = 0
            _grad_row(sm[r], dpm[r], lo, hi, vrow, use_valid, lse_t[r], dsum_t[r], zero, t0 + r, a, mod, slope, sl)
        _mm_nn(dpm, ks[a:b], tmpq[:rows])
        for r in range(rows):
            for c in range(d):
                dqt[r, c] += tmpq[r, c]
        _mm_tn(dpm, qt, tmpk[:wd])
        _mm_tn(sm, dot, tmpv[:wd])
        for j in range(wd):
            for c in range(d):
                dkb[a + j, c] += tmpk[j, c]
            for c in range(dv):
                dvb[a + j, c] += tmpv[j, c]
        lohi[0] = min(lohi[0], a)
        lohi[1] = max(lohi[1], b)
        a = b


@njit(cache=True, nogil=True, fastmath=_FM)
def tiles_backward(
    q, k, v, qmap, kmap, vmap, dout, out, lse, slices, T, chunk, tile_k0, tile_k1, row_lo, row_hi,
    xs_ptr, xs_k0, xs_k1, xs_lo, xs_hi, sh_ptr, sh_cols, sh_mask, rs_ptr, rs_lo, rs_hi,
    scale, key_valid, slice_batch, use_valid, mod, slopes,
    it_begin, it_end, dq, dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v,
):  # fmt: skip
    """Backward over the tile items ``[it_begin, it_end)``, all of one slice (``it = si * n_tiles + t``).

    Slice ``s`` reads ``q[qmap[s]]``, ``k[kmap[s]]``, ``v[vmap[s]]`` (stored
    once, shared by broadcast or grouped-query heads); ``dout``, ``out``,
    ``lse`` and ``dq`` have one row block per slice.
    Writes ``dq`` rows of those tiles (long rows get zero here); adds
    ``dK`` / ``dV`` contributions into ``dkb`` / ``dvb`` (``n_k + KEY_PAD``
    rows) and records the keys touched: ``[lohi[0], lohi[1])`` and the
    ``lohi[2]`` columns ``cols[:lohi[2]]`` (flagged in ``mark``).  ``kp``,
    ``vp``, ``packed_k``, ``packed_v``: the thread's K^T and V^T panel
    caches (empty: the BLAS span path).
    """
    n_q = q.shape[1]
    d = q.shape[2]
    dv = v.shape[2]
    n_tiles = tile_k0.shape[0]
    dt = q.dtype
    zero = scale - scale
    ninf = -np.inf
    L2 = 2 * lanes(q)
    simd = packed_k.shape[0] > 0
    Tp = (T + 5) // 6 * 6
    if it_end <= it_begin:
        return
    sbuf = np.empty(Tp * (chunk + 2 * L2), dtype=dt)
    dpbuf = np.empty(Tp * (chunk + 2 * L2), dtype=dt)
    qbuf = np.zeros(Tp * d, dtype=dt)  # rows past a short tile's end stay zero
    dobuf = np.zeros(Tp * dv, dtype=dt)
    dqacc = np.zeros(Tp * d, dtype=dt)
    tmpq = np.empty((T, d), dtype=dt)
    tmpk = np.empty((chunk, d), dtype=dt)
    tmpv = np.empty((chunk, dv), dtype=dt)
    live = np.empty(Tp, dtype=np.bool_)
    lse_t = np.empty(Tp, dtype=dt)
    dsum_t = np.empty(Tp, dtype=dt)
    glo = np.empty(Tp // 6, dtype=np.int64)
    ghi = np.empty(Tp // 6, dtype=np.int64)
    si = it_begin // n_tiles
    s = slices[si]
    sq, sk, sv = qmap[s], kmap[s], vmap[s]
    kb = slice_batch[s]
    slope = slopes[min(s, slopes.shape[0] - 1)]
    kvrow = key_valid[kb] if use_valid else key_valid[0, :0]
    for it in range(it_begin, it_end):
        t = it - si * n_tiles
        t0 = t * T
        t1 = min(n_q, t0 + T)
        rows = t1 - t0
        for r in range(rows):
            li = lse[s, t0 + r]
            live[r] = li != ninf
            lse_t[r] = li if live[r] else zero
            dd = zero
            for c in range(dv):
                dd += dout[s, t0 + r, c] * out[s, t0 + r, c]
            dsum_t[r] = dd  # D = rowsum(dO * O)
            for c in range(d):
                qbuf[r * d + c] = q[sq, t0 + r, c] * scale
            for c in range(dv):
                dobuf[r * dv + c] = dout[s, t0 + r, c]
        for e in range(Tp * d):
            dqacc[e] = zero
        qt = qbuf[: rows * d].reshape((rows, d))
        dot = dobuf[: rows * dv].reshape((rows, dv))
        dqt = dqacc[: rows * d].reshape((rows, d))
        # -- 1. the contiguous span, then the extra spans
        for x in range(xs_ptr[t] - 1, xs_ptr[t + 1]):
            main = x < xs_ptr[t]
            k0 = tile_k0[t] if main else xs_k0[x]
            k1 = tile_k1[t] if main else xs_k1[x]
            lo_a = row_lo if main else xs_lo
            hi_a = row_hi if main else xs_hi
            rb = t0 if main else x * T
            if simd and k1 > k0:
                _span_grad_simd(
                    qbuf, dobuf, k[sk], v[sv], s, rows, k0, k1, chunk, lo_a, hi_a, rb, t0, live, sbuf, dpbuf, dqacc,
                    kp, vp, packed_k, packed_v, glo, ghi, use_valid, kvrow, lse_t, dsum_t, dkb, dvb, lohi, zero,
                    mod, slope, s,
                )  # fmt: skip
            if not simd and k1 > k0:
                _span_grad_blas(
                    qt, dot, dqt, k[sk], v[sv], rows, k0, k1, chunk, lo_a, hi_a, rb, t0, live, sbuf, dpbuf,
                    tmpq, tmpk, tmpv, use_valid, kvrow, lse_t, dsum_t, dkb, dvb, lohi, zero, mod, slope, s,
                )  # fmt: skip
        # -- 2. shared gathered columns, 3. per-row residual columns: direct per-entry loops
        ks = k[sk]
        vs = v[sv]
        for c in range(sh_ptr[t], sh_ptr[t + 1]):
            j = sh_cols[c]
            if use_valid and not key_valid[kb, j]:
                continue
            _touch(j, mark, cols, lohi)
            for r in range(rows):
                if sh_mask[c * T + r] != 0 and live[r]:
                    _pair_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, lse_t[r], dsum_t[r], zero, t0 + r, mod, slope, s)
        for r in range(rows):
            if not live[r]:
                continue
            i = t0 + r
            li = lse_t[r]
            di = dsum_t[r]
            for e in range(rs_ptr[i], rs_ptr[i + 1]):
                _residual_run(qt, dot, dqt, r, ks, vs, dkb, dvb, rs_lo[e], rs_hi[e], li, di, zero, i, mod, slope, s,
                              use_valid, kvrow, mark, cols, lohi)  # fmt: skip
        # -- finalise dQ
        for r in range(rows):
            for c in range(d):
                dq[s, t0 + r, c] = dqt[r, c] * scale


@njit(cache=True, nogil=True)
def flush_keys(dk_s, dv_s, dkb, dvb, lohi, mark, cols):
    """Add the touched rows of a thread's key buffers to one slice's ``dK`` / ``dV`` and clear them."""
    d = dk_s.shape[1]
    dv = dv_s.shape[1]
    zero = dkb[0, 0] - dkb[0, 0]
    lo = lohi[0]
    hi = lohi[1]
    for j in range(lo, hi):
        for c in range(d):
            dk_s[j, c] += dkb[j, c]
            dkb[j, c] = zero
        for c in range(dv):
            dv_s[j, c] += dvb[j, c]
            dvb[j, c] = zero
    for t in range(lohi[2]):
        j = cols[t]
        mark[j] = 0
        if lo <= j < hi:
            continue
        for c in range(d):
            dk_s[j, c] += dkb[j, c]
            dkb[j, c] = zero
        for c in range(dv):
            dv_s[j, c] += dvb[j, c]
            dvb[j, c] = zero
    lohi[0] = dk_s.shape[0]
    lohi[1] = 0
    lohi[2] = 0


@njit(cache=True, nogil=True, fastmath=_FM)
def long_rows_backward(
    q, k, v, qmap, kmap, vmap, dout, out, lse, slices, lg_rows, grp_ptr, grp_it_ptr, it_a, it_b,
    scale, key_valid, slice_batch, use_valid, mod, slopes, dq, dk, dvv, si_begin, si_end,
):  # fmt: skip
    """Gradients of the long rows of slices ``slices[si_begin:si_end]``: ``dq`` rows set, ``dk`` / ``dvv`` added to.

    Slice ``s`` reads ``q[qmap[s]]``, ``k[kmap[s]]``, ``v[vmap[s]]`` and adds
    into ``dk[kmap[s]]``, ``dvv[vmap[s]]`` (the caller gives concurrent
    ranges disjoint stored slices).
    Group ``g`` (rows ``lg_rows[grp_ptr[g]:grp_ptr[g + 1]]``, identical
    columns) covers the key chunks ``[it_a[it], it_b[it])`` of its items
    ``grp_it_ptr[g]:grp_it_ptr[g + 1]``.  Serial; one thread per slice range.
    """
    d = q.shape[2]
    dvd = v.shape[2]
    dt = q.dtype
    zero = scale - scale
    ninf = -np.inf
    n_grp = grp_ptr.shape[0] - 1
    max_rows = 1
    max_w = 1
    for g in range(n_grp):
        max_rows = max(max_rows, grp_ptr[g + 1] - grp_ptr[g])
        for it in range(grp_it_ptr[g], grp_it_ptr[g + 1]):
            max_w = max(max_w, it_b[it] - it_a[it])
    qg_buf = np.empty(max_rows * d, dtype=dt)
    dog_buf = np.empty(max_rows * dvd, dtype=dt)
    dqg_buf = np.empty(max_rows * d, dtype=dt)
    tq_buf = np.empty(max_rows * d, dtype=dt)
    s_buf = np.empty(max_rows * max_w, dtype=dt)
    dp_buf = np.empty(max_rows * max_w, dtype=dt)
    tk = np.empty((max_w, d), dtype=dt)
    tv = np.empty((max_w, dvd), dtype=dt)
    dsum_g = np.empty(max_rows, dtype=dt)
    for si in range(si_begin, si_end):
        s = slices[si]
        sq, sk, sv = qmap[s], kmap[s], vmap[s]
        kb = slice_batch[s]
        for g in range(n_grp):
            r0 = grp_ptr[g]
            nr = grp_ptr[g + 1] - r0
            qg = qg_buf[: nr * d].reshape((nr, d))
            dog = dog_buf[: nr * dvd].reshape((nr, dvd))
            dqg = dqg_buf[: nr * d].reshape((nr, d))
            tq = tq_buf[: nr * d].reshape((nr, d))
            for rr in range(nr):
                i = lg_rows[r0 + rr]
                for c in range(d):
                    qg[rr, c] = q[sq, i, c] * scale
                    dqg[rr, c] = zero
                dd = zero
                for c in range(dvd):
                    dog[rr, c] = dout[s, i, c]
                    dd += dout[s, i, c] * out[s, i, c]
                dsum_g[rr] = dd
            for it in range(grp_it_ptr[g], grp_it_ptr[g + 1]):
                a = it_a[it]
                b = it_b[it]
                wd = b - a
                sm = s_buf[: nr * wd].reshape((nr, wd))
                dpm = dp_buf[: nr * wd].reshape((nr, wd))
                _mm_nt(qg, k[sk, a:b], sm)
                _mm_nt(dog, v[sv, a:b], dpm)
                vrow = key_valid[kb, a:b] if use_valid else key_valid[0, :0]
                for rr in range(nr):
                    i = lg_rows[r0 + rr]
                    li = lse[s, i]
                    hi = wd if li != ninf else 0
                    _grad_row(sm[rr], dpm[rr], 0, hi, vrow, use_valid, li if hi else zero, dsum_g[rr], zero, i, a, mod,
                              slopes[min(s, slopes.shape[0] - 1)], s)  # fmt: skip
                _mm_nn(dpm, k[sk, a:b], tq)
                for rr in range(nr):
                    for c in range(d):
                        dqg[rr, c] += tq[rr, c]
                _mm_tn(dpm, qg, tk[:wd])
                _mm_tn(sm, dog, tv[:wd])
                for j in range(wd):
                    for c in range(d):
                        dk[sk, a + j, c] += tk[j, c]
                    for c in range(dvd):
                        dvv[sv, a + j, c] += tv[j, c]
            for rr in range(nr):
                i = lg_rows[r0 + rr]
                for c in range(d):
                    dq[s, i, c] = dqg[rr, c] * scale
