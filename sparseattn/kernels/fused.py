"""The fused forward kernels: tile-planned scores, online softmax and P.V.

Raw arrays in, raw arrays out; no validation (``sparseattn.fused`` prepares
everything).  The plan layout is documented in :mod:`sparseattn.plan`.

Three serial, ``nogil`` kernels run one after the other for the slices that
share a plan; ``sparseattn.fused`` runs disjoint work ranges of the first two
on several Python threads (no Numba parallel region: faster to compile, and
safe to call from threads that Dask or the user already run):

``tiles_forward``
    Row tiles of ``T`` queries.  Per tile: the contiguous key span (one or a
    few dense chunks, each row restricted to its own run inside it; the
    products run on the register-blocked micro-kernels below), the
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
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

__all__ = ["tiles_forward", "long_rows_partial", "long_rows_merge", "vexp", "VECTOR_BYTES", "block_width"]

# Loop bodies use fast-math without the no-NaN / no-Inf assumptions: masked
# scores are a large finite negative sentinel, and empty rows are detected.
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}
#: tiles with at most this many shared columns skip the gather + GEMM for them
_FEW_SHARED = 8


@intrinsic
def _float_from_bits(typingctx, bits, like):
    """The float of ``like``'s type (float32 / float64) whose bit pattern is the integer ``bits``."""
    if not (isinstance(like, types.Float) and isinstance(bits, types.Integer)):
        return None
    intty = types.int32 if like.bitwidth == 32 else types.int64  # numba widens int32 sums: cast back

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(like))

    return like(intty, like), codegen


@njit(fastmath=_FM)
def _exp32(x):
    """``exp(x)`` for float32 ``x <= 0`` (0 below -87); max relative error ~2e-7."""
    xc = max(x, np.float32(-87.0))
    t = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - t * np.float32(0.693145751953125) - t * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    y = p * _float_from_bits((np.int32(t) + np.int32(127)) << np.int32(23), p)
    return y if x > np.float32(-87.0) else np.float32(0.0)


@njit(fastmath=_FM)
def _exp64(x):
    """``exp(x)`` for float64 ``x <= 0`` (0 below -708); max relative error ~3e-16."""
    xc = max(x, -708.0)
    t = np.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - t * 0.6931471803691238 - t * 1.9082149292705877e-10
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    y = p * _float_from_bits((np.int64(t) + np.int64(1023)) << np.int64(52), p)
    return y if x > -708.0 else 0.0


@intrinsic
def _fmax(typingctx, a, b):
    """``llvm.maxnum``: lets LLVM vectorise max-reductions (Python's ``max`` compiles to a scalar select chain)."""
    if not (isinstance(a, types.Float) and a == b):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return sig, codegen


def _exp(x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(_exp, fastmath=_FM)
def _exp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: _exp32(x)
    return lambda x: _exp64(x)


def _neg(x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(_neg)
def _neg_overload(x):
    """The masked-score sentinel of x's dtype: finite, far below any real score."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: np.float32(-1e30)
    return lambda x: np.float64(-1e300)


@njit(cache=True, nogil=True, fastmath=_FM)
def vexp(x, out):
    """``out[i] = exp(x[i])`` for ``x <= 0`` with the kernels' polynomial (tests and timing)."""
    for i in range(x.shape[0]):
        out[i] = _exp(x[i])


@njit(fastmath=True)
def _row_update(row, j0, j1, vrow, use_valid, r, m, l, acc, neg, zero):
    """Online-softmax update of query row ``r`` with one chunk of scaled scores ``row``.

    Only ``row[j0:j1]`` is allowed; with ``use_valid`` also only where
    ``vrow`` is True (padded keys).  The row is overwritten with ``exp(score - new max)`` (zero where not allowed), and
    the running max ``m[r]``, sum ``l[r]`` and output ``acc[r]`` are rescaled.
    Loops start at 0 over 1-D views so that LLVM can vectorise them (fast-math
    is safe: masked scores are the finite sentinel ``neg``, never inf/NaN).
    """
    half = neg * 0.5
    x = row[j0:j1]
    n = x.shape[0]
    mx = neg
    if use_valid:
        vv = vrow[j0:j1]
        for j in range(n):
            y = x[j] if vv[j] else neg
            x[j] = y
            mx = _fmax(mx, y)
    else:
        for j in range(n):
            mx = _fmax(mx, x[j])
    for j in range(j0):
        row[j] = zero
    for j in range(j1, row.shape[0]):
        row[j] = zero
    if mx <= half:  # nothing allowed in this chunk for this row
        for j in range(n):
            x[j] = zero
        return
    mo = m[r]
    mn = _fmax(mx, mo)
    ssum = zero
    for j in range(n):
        p = _exp(x[j] - mn)
        x[j] = p
        ssum += p
    m[r] = mn
    if mo <= half:  # first allowed keys of this row: its sum and output are still zero
        l[r] = ssum
        return
    alpha = _exp(mo - mn)
    l[r] = l[r] * alpha + ssum
    if alpha != 1:
        a = acc[r]
        for c in range(a.shape[0]):
            a[c] *= alpha


@njit(fastmath=True)
def _one_key_update(x, vj, r, m, l, acc, half, zero):
    """Online-softmax update of row ``r`` with one key: scaled score ``x``, value row ``vj``."""
    mo = m[r]
    a = acc[r]
    if x > mo:
        alpha = _exp(mo - x) if mo > half else zero
        for c in range(a.shape[0]):
            a[c] = a[c] * alpha + vj[c]
        l[r] = l[r] * alpha + 1
        m[r] = x
    else:
        p = _exp(x - mo)
        for c in range(a.shape[0]):
            a[c] += p * vj[c]
        l[r] += p


@njit(nogil=True)
def _mm_nt(a, b, out):
    """``out = a @ b.T`` through BLAS (one shared call site keeps compile time down)."""
    np.dot(a, b.T, out)


@njit(nogil=True)
def _mm_nn(a, b, out):
    """``out = a @ b`` through BLAS."""
    np.dot(a, b, out)


@njit(fastmath=_FM)
def _add_into(acc, tmp, rows):
    for r in range(rows):
        for c in range(acc.shape[1]):
            acc[r, c] += tmp[r, c]


# -- register-blocked micro-kernels for the span products ----------------------------
# Numba has no vector type, so this section adds one (``Vec``: an LLVM <L x float> /
# <L x double> value, L = 8 float32 or 4 float64 lanes, one 256-bit register) with
# load, broadcast-load, store, add, fma and zero intrinsics.  With them QK^T and P.V
# are written as the classic 6 x 2L register block (12 accumulators, 2 loads and 6
# broadcasts per step), which LLVM keeps in registers.  On a sliding window's tile
# shapes (64 rows, ~600 keys, d = 64) they run at 70-85 GFLOP/s on one core of the
# development machine, where OpenBLAS's sgemm reaches 46-56 (it packs both operands on
# every call).  LLVM splits the vectors on a CPU without AVX: correct everywhere.  No
# bounds checks or negative-index wraparound: callers guarantee the indices.
#
# They live in this file, not a module of their own, because Numba's disk cache keys a
# cached function (tiles_forward) on its own source file only: kernels in another file
# could change without invalidating it.


class Vec(types.Type):
    """A SIMD vector of ``count`` ``dtype`` lanes (only exists inside jitted code)."""

    def __init__(self, dtype, count):
        self.dtype = dtype
        self.count = count
        super().__init__(name=f"Vec({dtype} x {count})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.count)
        super().__init__(dmm, fe_type, be)


#: bytes per vector register the kernels use (AVX / AVX2)
VECTOR_BYTES = 32
_VEC = {t: Vec(t, VECTOR_BYTES * 8 // t.bitwidth) for t in (types.float32, types.float64)}


def _vec_of(dtype):
    return _VEC.get(dtype)


def block_width(dtype):
    """2L, the columns of one register block (and the keys of one K^T panel) for a NumPy float dtype."""
    return 2 * VECTOR_BYTES // np.dtype(dtype).itemsize


def lanes(x):  # pragma: no cover - replaced by the overload in jitted code
    """Lanes of one vector of ``x``'s dtype (8 for float32, 4 for float64)."""
    raise NotImplementedError


@overload(lanes)
def _lanes_overload(x):
    dt = x.dtype if isinstance(x, types.Array) else x
    n = _vec_of(dt).count
    return lambda x: n


def _element_ptr(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer2(
        context, builder, data=ary.data,
        shape=cgutils.unpack_tuple(builder, ary.shape),
        strides=cgutils.unpack_tuple(builder, ary.strides),
        layout=arrty.layout, inds=[idx], wraparound=False, boundscheck=False,
    )  # fmt: skip


def _splat(builder, llvt, x):
    v = builder.insert_element(ir.Constant(llvt, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), llvt.count), [0] * llvt.count)
    return builder.shuffle_vector(v, ir.Constant(llvt, ir.Undefined), mask)


@intrinsic
def _vload(typingctx, arr, idx):
    """``arr[idx : idx + lanes]`` of a 1-D contiguous array as a vector."""
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        llvt = context.get_value_type(vt)
        return builder.load(builder.bitcast(p, llvt.as_pointer()), align=arr.dtype.bitwidth // 8)

    return vt(arr, idx), codegen


@intrinsic
def _vbload(typingctx, arr, idx):
    """``arr[idx]`` in every lane."""
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, context.get_value_type(vt), builder.load(p))

    return vt(arr, idx), codegen


@intrinsic
def _vstore(typingctx, arr, idx, v):
    """``arr[idx : idx + lanes] = v``."""

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


@intrinsic
def _vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane (``llvm.fma``)."""

    def codegen(context, builder, sig, args):
        ty = args[0].type
        name = f"llvm.fma.v{ty.count}f{a.dtype.bitwidth}"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
        return builder.call(fn, args)

    return a(a, b, c), codegen


@intrinsic
def _vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def _vzero(typingctx, arr):
    """A zero vector of ``arr``'s dtype."""
    vt = _vec_of(arr.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr), codegen


@njit(nogil=True, inline="always")
def _zero_block(xf):
    z = _vzero(xf)
    return (z, z, z, z, z, z, z, z, z, z, z, z)


@njit(nogil=True, inline="always")
def _rank1(xf, x0, ld, b0, b1, c):
    """``c[2r + h] += xf[x0 + r * ld] * b_h`` for the 6 rows ``r`` of a register block (``c``: 12 vectors)."""
    a0 = _vbload(xf, x0)
    a1 = _vbload(xf, x0 + ld)
    a2 = _vbload(xf, x0 + 2 * ld)
    a3 = _vbload(xf, x0 + 3 * ld)
    a4 = _vbload(xf, x0 + 4 * ld)
    a5 = _vbload(xf, x0 + 5 * ld)
    return (
        _vfma(a0, b0, c[0]), _vfma(a0, b1, c[1]), _vfma(a1, b0, c[2]), _vfma(a1, b1, c[3]),
        _vfma(a2, b0, c[4]), _vfma(a2, b1, c[5]), _vfma(a3, b0, c[6]), _vfma(a3, b1, c[7]),
        _vfma(a4, b0, c[8]), _vfma(a4, b1, c[9]), _vfma(a5, b0, c[10]), _vfma(a5, b1, c[11]),
    )  # fmt: skip


@njit(nogil=True, inline="always")
def _put(of, i, v, add):
    _vstore(of, i, _vadd(_vload(of, i), v) if add else v)


@njit(nogil=True, inline="always")
def _put_block(of, o0, ld, c, add):
    """Row ``r`` of the block to ``of[o0 + r * ld :][: 2L]``: stored, or added to what is there when ``add``."""
    L = lanes(of)
    _put(of, o0, c[0], add)
    _put(of, o0 + L, c[1], add)
    _put(of, o0 + ld, c[2], add)
    _put(of, o0 + ld + L, c[3], add)
    _put(of, o0 + 2 * ld, c[4], add)
    _put(of, o0 + 2 * ld + L, c[5], add)
    _put(of, o0 + 3 * ld, c[6], add)
    _put(of, o0 + 3 * ld + L, c[7], add)
    _put(of, o0 + 4 * ld, c[8], add)
    _put(of, o0 + 4 * ld + L, c[9], add)
    _put(of, o0 + 5 * ld, c[10], add)
    _put(of, o0 + 5 * ld + L, c[11], add)


@njit(nogil=True, inline="always")
def qk_block(qf, q0, d, kp, p0, sf, s0, lds):
    """``S[r, 0:2L] = sum_c Q[r, c] * Kp[c, 0:2L]`` for the 6 rows ``r`` of one register block.

    ``qf``: flat Q, row ``r`` at ``q0 + r * d``; ``kp``: flat panel, feature ``c``
    at ``p0 + c * 2L``; ``sf``: flat S, row ``r`` at ``s0 + r * lds``.
    """
    L = lanes(qf)
    c = _zero_block(qf)
    for e in range(d):
        c = _rank1(qf, q0 + e, d, _vload(kp, p0 + e * 2 * L), _vload(kp, p0 + e * 2 * L + L), c)
    _put_block(sf, s0, lds, c, False)


@njit(nogil=True, inline="always")
def pv_block(pf, p0, ldp, k0, k1, vf, v0, ldv, of, o0, ldo):
    """``O[r, 0:2L] += sum_{k0 <= k < k1} P[r, k] * V[k, 0:2L]`` for 6 rows ``r``.

    ``pf``: flat P, row ``r`` at ``p0 + r * ldp``; ``vf``: flat V, row ``k`` at
    ``v0 + k * ldv``; ``of``: flat O, row ``r`` at ``o0 + r * ldo``.
    """
    L = lanes(pf)
    c = _zero_block(pf)
    for k in range(k0, k1):
        c = _rank1(pf, p0 + k, ldp, _vload(vf, v0 + k * ldv), _vload(vf, v0 + k * ldv + L), c)
    _put_block(of, o0, ldo, c, True)


@njit(nogil=True, inline="always")
def pack_panel(ks, panel, n_k, kp, p0, zero):
    """Copy keys ``[panel*2L, panel*2L + 2L)`` of ``ks`` (n_k, d) into ``kp[p0:]`` as (d, 2L); keys past n_k are 0."""
    L2 = 2 * lanes(kp)
    d = ks.shape[1]
    j0 = panel * L2
    for j in range(L2):
        jj = j0 + j
        if jj < n_k:
            row = ks[jj]
            for c in range(d):
                kp[p0 + c * L2 + j] = row[c]
        else:
            for c in range(d):
                kp[p0 + c * L2 + j] = zero


@njit(nogil=True, fastmath=_FM)
def _span_simd(
    qbuf, ks, vs, s, rows, k0, k1, chunk, row_lo, row_hi, t0, sbuf, accf, dv,
    kp, packed, glo, ghi, use_valid, kvrow, m, l, acc, neg, zero,
):  # fmt: skip
    """One tile's contiguous span ``[k0, k1)`` through the micro-kernels (``qk_block``, ``pv_block``).

    Chunks start on panel boundaries (2L keys).  Per 6-row register block only
    the panels that its rows' runs touch are computed (QK^T) and only the keys
    inside the union of its runs are summed (P.V), so the masked corners of a
    band tile cost almost nothing.  K^T panels are packed on first use into
    the thread's direct-mapped panel cache ``kp``: panel ``p`` of slice ``s``
    lives in slot ``p % n_slots``, tagged ``packed[slot] == s * n_panels + p``
    (the cache holds two chunks, so a tile's chunk never evicts its own panels
    and the next tile of a band repacks only the keys it adds).
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
                lo = max(row_lo[t0 + r], a) - a
                hi = min(row_hi[t0 + r], b) - a
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
            lo = max(row_lo[t0 + r], a) - a
            hi = min(row_hi[t0 + r], b) - a
            if hi < lo:
                hi = lo
            _row_update(sbuf[r * lds : r * lds + lds], lo, hi, vrow, use_valid, r, m, l, acc, neg, zero)
        # 3. P.V into the accumulator, over each block's union of runs
        for g in range(ng):
            if ghi[g] > glo[g]:
                for cb in range(0, dv, L2):
                    pv_block(sbuf, 6 * g * lds, lds, glo[g], ghi[g], vf, a * dv + cb, dv, accf, 6 * g * dv + cb, dv)
        a = b


@njit(cache=True, nogil=True, fastmath=_FM)
def tiles_forward(
    q, k, v, slices, T, chunk, tile_k0, tile_k1, row_lo, row_hi,
    sh_ptr, sh_cols, sh_mask, rs_ptr, rs_cols,
    scale, key_valid, slice_batch, use_valid, it_begin, it_end, out, lse, kp, packed,
):  # fmt: skip
    """Tile pass for the slices ``slices`` sharing one plan, work items ``[it_begin, it_end)``.

    Item ``it = si * n_tiles + t`` is tile ``t`` of slice ``slices[si]``.
    Writes ``out[s, rows]`` and ``lse[s, rows]`` for every row of those
    tiles; long rows come out empty here and are overwritten by the long-row
    pass.  Serial and ``nogil``: the caller runs disjoint item ranges on
    several threads.

    ``kp`` and ``packed`` are the calling thread's K^T panel cache (see
    :func:`sparseattn.fused.panel_buffers`; reused across its ranges of one call).  When they
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
        qbuf = np.zeros(Tp * d, dtype=dt)  # rows past a short tile's end stay finite
        glo = np.empty(Tp // 6, dtype=np.int64)
        ghi = np.empty(Tp // 6, dtype=np.int64)
        for it in range(it_begin, it_end):
            si = it // n_tiles
            t = it - si * n_tiles
            s = slices[si]
            kb = slice_batch[s]
            t0 = t * T
            t1 = min(n_q, t0 + T)
            rows = t1 - t0
            for r in range(rows):
                m[r] = neg
                l[r] = zero
            first = True
            if simd:  # the micro-kernels accumulate into acc
                for e in range(Tp * dv):
                    accf[e] = zero
                first = False
            qt = qbuf[: rows * d].reshape((rows, d))
            qsrc = q[s, t0:t1]
            for r in range(rows):
                for c in range(d):
                    qt[r, c] = qsrc[r, c] * scale
            # -- 1. the contiguous span, in chunks of at most `chunk` keys
            k0 = tile_k0[t]
            k1 = tile_k1[t]
            if simd and k1 > k0:
                _span_simd(
                    qbuf, k[s], v[s], s, rows, k0, k1, chunk, row_lo, row_hi, t0, sbuf, accf, dv,
                    kp, packed, glo, ghi, use_valid, key_valid[kb], m, l, acc, neg, zero,
                )  # fmt: skip
            if not simd and k1 > k0:
                nch = (k1 - k0 + chunk - 1) // chunk
                step = (k1 - k0 + nch - 1) // nch
                a = k0
                while a < k1:
                    b = min(k1, a + step)
                    wd = b - a
                    sm = sbuf[: rows * wd].reshape((rows, wd))
                    _mm_nt(qt, k[s, a:b], sm)
                    vrow = key_valid[kb, a:b] if use_valid else key_valid[0, :0]
                    for r in range(rows):
                        lo = max(row_lo[t0 + r], a) - a
                        hi = min(row_hi[t0 + r], b) - a
                        if hi < lo:
                            hi = lo
                        _row_update(sm[r], lo, hi, vrow, use_valid, r, m, l, acc, neg, zero)
                    if first:
                        _mm_nn(sm, v[s, a:b], acc[:rows])
                        first = False
                    else:
                        _mm_nn(sm, v[s, a:b], tmp[:rows])
                        _add_into(acc, tmp, rows)
                    a = b
            if first:
                for r in range(rows):
                    for c in range(dv):
                        acc[r, c] = zero
                first = False
            # -- 2. shared gathered columns (global keys, dense leftovers)
            c0 = sh_ptr[t]
            c1 = sh_ptr[t + 1]
            if c1 - c0 <= _FEW_SHARED:
                # a few columns: direct dot products, no gather and no GEMM call
                for c in range(c0, c1):
                    j = sh_cols[c]
                    if use_valid and not key_valid[kb, j]:
                        continue
                    kj = k[s, j]
                    vj = v[s, j]
                    for r in range(rows):
                        if sh_mask[c * T + r] == 0:
                            continue
                        qr = qt[r]
                        x = zero
                        for e in range(d):
                            x += qr[e] * kj[e]
                        _one_key_update(x, vj, r, m, l, acc, half, zero)
                c0 = c1
            while c0 < c1:
                cb = min(c1, c0 + g_cap)
                nc = cb - c0
                for c in range(nc):
                    j = sh_cols[c0 + c]
                    for e in range(d):
                        kg[c, e] = k[s, j, e]
                    for e in range(dv):
                        vg[c, e] = v[s, j, e]
                sm = sbuf[: rows * nc].reshape((rows, nc))
                _mm_nt(qt, kg[:nc], sm)
                for r in range(rows):
                    for c in range(nc):
                        ok = sh_mask[(c0 + c) * T + r] != 0
                        if use_valid:
                            ok = ok and key_valid[kb, sh_cols[c0 + c]]
                        okb[c] = ok
                    _row_update(sm[r], 0, nc, okb, True, r, m, l, acc, neg, zero)
                _mm_nn(sm, vg[:nc], tmp[:rows])
                _add_into(acc, tmp, rows)
                c0 = cb
            # -- 3. per-row residual columns
            for r in range(rows):
                i = t0 + r
                e0 = rs_ptr[i]
                e1 = rs_ptr[i + 1]
                while e0 < e1:
                    eb = min(e1, e0 + chunk)
                    ne = eb - e0
                    sr = sbuf[:ne]
                    qi = qt[r]
                    for e in range(ne):
                        j = rs_cols[e0 + e]
                        kj = k[s, j]
                        x = zero
                        for c in range(d):
                            x += qi[c] * kj[c]
                        sr[e] = x
                        if use_valid:
                            okb[e] = key_valid[kb, j]
                    _row_update(sr, 0, ne, okb, use_valid, r, m, l, acc, neg, zero)
                    for e in range(ne):
                        p = sr[e]
                        if p != zero:
                            j = rs_cols[e0 + e]
                            for c in range(dv):
                                acc[r, c] += p * v[s, j, c]
                    e0 = eb
            # -- finalise
            for r in range(rows):
                i = t0 + r
                if m[r] > half and l[r] > zero:
                    inv = 1 / l[r]
                    for c in range(dv):
                        out[s, i, c] = acc[r, c] * inv
                    lse[s, i] = m[r] + np.log(l[r])
                else:
                    for c in range(dv):
                        out[s, i, c] = zero
                    lse[s, i] = ninf


@njit(cache=True, nogil=True, fastmath=_FM)
def long_rows_partial(
    q, k, v, slices, lg_rows, grp_ptr, it_grp, it_a, it_b, it_off,
    scale, key_valid, slice_batch, use_valid, part_m, part_l, part_o, job_begin, job_end,
):  # fmt: skip
    """Partial softmax of the (slice, long-row chunk) jobs ``[job_begin, job_end)``, ``job = si * n_items + it``.

    Item ``it`` covers the rows ``lg_rows[grp_ptr[g] : grp_ptr[g + 1]]`` of
    group ``g = it_grp[it]`` (they share their columns) and the keys
    ``[it_a[it], it_b[it])``.  Row ``rr`` of the group writes its partial to
    ``part_*[si, it_off[it] + rr]``: running max, sum and unnormalised output.
    Serial and ``nogil`` like :func:`tiles_forward`.
    """
    d = q.shape[2]
    n_items = it_grp.shape[0]
    dt = q.dtype
    zero = scale - scale
    neg = _neg(zero)
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
                qg[rr, c] = q[s, lg_rows[r0 + rr], c] * scale
        sm = sbuf[: nr * wd].reshape((nr, wd))
        _mm_nt(qg, k[s, a:b], sm)
        o = part_o[si, it_off[it] : it_off[it] + nr]
        for rr in range(nr):
            m[rr] = neg
            l[rr] = zero
            vrow = key_valid[kb, a:b] if use_valid else key_valid[0, :0]
            _row_update(sm[rr], 0, wd, vrow, use_valid, rr, m, l, o, neg, zero)
        _mm_nn(sm, v[s, a:b], o)
        for rr in range(nr):
            part_m[si, it_off[it] + rr] = m[rr]
            part_l[si, it_off[it] + rr] = l[rr]


@njit(cache=True, nogil=True, fastmath=_FM)
def long_rows_merge(slices, lg_rows, grp_ptr, grp_it_ptr, it_off, part_m, part_l, part_o, out, lse):
    """Merge each long row's chunk partials: ``m = max m_i``, ``l = sum e^(m_i - m) l_i``, same for ``o``."""
    n_grp = grp_ptr.shape[0] - 1
    ns = slices.shape[0]
    dv = out.shape[2]
    zero = np.zeros(1, dtype=out.dtype)[0]
    neg = _neg(zero)
    half = neg * 0.5
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
            for c in range(dv):
                out[s, i, c] *= inv
            lse[s, i] = mx + np.log(ltot)
        else:
            lse[s, i] = -np.inf


# -- plan-building helpers (used by sparseattn.plan) ------------------------------
@njit(cache=True, nogil=True)
def plan_shared_globals(lo, hi, is_long, g, T):
    """Shared columns per tile for global keys ``g``: rows whose run misses the column use it."""
    n_q = lo.shape[0]
    n_tiles = (n_q + T - 1) // T
    ng = g.shape[0]
    sh_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    for phase in range(2):
        if phase == 1:
            total = sh_ptr[n_tiles]
            sh_cols = np.empty(total, dtype=np.int64)
            sh_mask = np.zeros(total * T, dtype=np.uint8)
        for t in range(n_tiles):
            r0 = t * T
            r1 = min(n_q, r0 + T)
            pos = sh_ptr[t] if phase == 1 else 0
            cnt = 0
            for c in range(ng):
                j = g[c]
                used = False
                for r in range(r0, r1):
                    if not is_long[r] and not (lo[r] <= j < hi[r]):
                        used = True
                        if phase == 1:
                            sh_mask[(pos + cnt) * T + (r - r0)] = 1
                if used:
                    if phase == 1:
                        sh_cols[pos + cnt] = j
                    cnt += 1
            if phase == 0:
                sh_ptr[t + 1] = sh_ptr[t] + cnt
    return sh_ptr, sh_cols, sh_mask


@njit(cache=True, nogil=True)
def plan_longest_runs(indptr, indices, is_long, min_run):
    """Each row's longest run of consecutive columns ``[lo, hi)`` (empty if shorter than ``min_run``)."""
    n_q = indptr.shape[0] - 1
    lo = np.zeros(n_q, dtype=np.int64)
    hi = np.zeros(n_q, dtype=np.int64)
    for i in range(n_q):
        if is_long[i]:
            continue
        best_a = 0
        best_n = 0
        e = indptr[i]
        end = indptr[i + 1]
        while e < end:
            f = e + 1
            while f < end and indices[f] == indices[f - 1] + 1:
                f += 1
            if f - e > best_n:
                best_n = f - e
                best_a = indices[e]
            e = f
        if best_n >= min_run:
            lo[i] = best_a
            hi[i] = best_a + best_n
    return lo, hi


@njit(cache=True, nogil=True)
def plan_leftovers(indptr, indices, is_long, lo, hi, T, n_k):
    """Split each tile's entries outside the rows' runs into shared columns and per-row residuals.

    A column used by at least a quarter of the tile's rows (and by two or
    more) becomes shared; the rest stays with its row.
    """
    n_q = indptr.shape[0] - 1
    n_tiles = (n_q + T - 1) // T
    cnt = np.zeros(n_k, dtype=np.int64)
    sh_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    rs_ptr = np.zeros(n_q + 1, dtype=np.int64)
    cols = np.empty(0, dtype=np.int64)
    sh_cols = np.empty(0, dtype=np.int64)
    sh_mask = np.empty(0, dtype=np.uint8)
    rs_cols = np.empty(0, dtype=np.int64)
    for phase in range(2):
        if phase == 1:
            for i in range(n_q):
                rs_ptr[i + 1] += rs_ptr[i]
            sh_cols = np.empty(sh_ptr[n_tiles], dtype=np.int64)
            sh_mask = np.zeros(sh_ptr[n_tiles] * T, dtype=np.uint8)
            rs_cols = np.empty(rs_ptr[n_q], dtype=np.int64)
        for t in range(n_tiles):
            r0 = t * T
            r1 = min(n_q, r0 + T)
            nrows = 0
            for r in range(r0, r1):
                if not is_long[r]:
                    nrows += 1
            thr = max(2, (nrows + 3) // 4)
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                for e in range(indptr[r], indptr[r + 1]):
                    j = indices[e]
                    if not (lo[r] <= j < hi[r]):
                        cnt[j] += 1
            # distinct shared columns, sorted
            nsh = 0
            if cols.shape[0] < 64:
                cols = np.empty(64, dtype=np.int64)
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                for e in range(indptr[r], indptr[r + 1]):
                    j = indices[e]
                    if not (lo[r] <= j < hi[r]) and cnt[j] >= thr:
                        if nsh == cols.shape[0]:
                            grown = np.empty(2 * nsh, dtype=np.int64)
                            grown[:nsh] = cols[:nsh]
                            cols = grown
                        cols[nsh] = j
                        nsh += 1
                        cnt[j] = -1  # counted once
            srt = cols[:nsh]  # order of first appearance
            base = sh_ptr[t]
            for c in range(nsh):
                cnt[srt[c]] = -(c + 2)  # slot c is encoded as -(c + 2)
                if phase == 1:
                    sh_cols[base + c] = srt[c]
            if phase == 0:
                sh_ptr[t + 1] = sh_ptr[t] + nsh
            for r in range(r0, r1):
                if is_long[r]:
                    continue
                pos = rs_ptr[r]
                for e in range(indptr[r], indptr[r + 1]):
                    j = indices[e]
                    if lo[r] <= j < hi[r]:
                        continue
                    if cnt[j] <= -2:
                        if phase == 1:
                            sh_mask[(base + (-cnt[j] - 2)) * T + (r - r0)] = 1
                    elif phase == 0:
                        rs_ptr[r + 1] += 1
                    else:
                        rs_cols[pos] = j
                        pos += 1
            for r in range(r0, r1):
                for e in range(indptr[r], indptr[r + 1]):
                    cnt[indices[e]] = 0
    return sh_ptr, sh_cols, sh_mask, rs_ptr, rs_cols
