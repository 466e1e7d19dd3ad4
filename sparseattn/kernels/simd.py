"""SIMD building blocks shared by the fused kernels: a vector type, ``exp``, micro-kernels.

Numba has no vector type and no vector math library here, so this module adds
what the tile kernels (:mod:`sparseattn.kernels.forward`, and the backward)
are built from:

- ``_exp`` / ``_neg`` / ``_fmax``: a vectorisable polynomial ``exp`` for
  ``x <= 0`` in float32 and float64, the finite masked-score sentinel, and
  ``llvm.maxnum`` (Python's ``max`` compiles to a scalar select chain);
- ``Vec``: an LLVM ``<L x float>`` / ``<L x double>`` value with load,
  broadcast-load, store, add, fma and zero intrinsics;
- the 6 x 2L register-block micro-kernels ``qk_block`` (S = Q K^T from packed
  K^T panels), ``pv_block`` (O += P V), ``tn_block`` (O += A^T B, the backward's
  transposed products), and ``pack_panel``;
- ``_mm_nt`` / ``_mm_nn`` / ``_mm_tn``: the one BLAS call site of each shape.

Raw arrays in, raw arrays out; no validation.  The kernels that use these
are cached on disk by Numba; :mod:`sparseattn.kernels` keys that cache on a
digest of every file in this package, so editing this file invalidates them.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from . import VECTOR_BYTES  # 32 (AVX2) or 64 (AVX-512), chosen once per process

__all__ = [
    "vexp", "VECTOR_BYTES", "block_width", "lanes", "qk_block", "pv_block", "tn_block", "pack_panel",
]

# Loop bodies use fast-math without the no-NaN / no-Inf assumptions: masked
# scores are a large finite negative sentinel, and empty rows are detected.
_FM = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: options of the per-row and per-key helpers, which allocate nothing and return no array: compiled
#: without Numba's reference counting.  Otherwise every array argument and every view they take
#: (a row of scores, ``acc[r]``, ``ks[j]``) costs an atomic increment and decrement, more than the
#: arithmetic of a short row (measured: a third of a band of radius 4's forward).
NO_RC = {"_nrt": False}
#: Numba compiles a function called from a ``NO_RC`` one without reference counting too, unless the
#: function sets it: the BLAS wrappers (whose ``np.dot`` may allocate) set it back.
RC = {"_nrt": True}


@intrinsic
def _float_from_bits(typingctx, bits, like):
    """The float of ``like``'s type (float32 / float64) whose bit pattern is the integer ``bits``."""
    if not (isinstance(like, types.Float) and isinstance(bits, types.Integer)):
        return None
    intty = types.int32 if like.bitwidth == 32 else types.int64  # numba widens int32 sums: cast back

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(like))

    return like(intty, like), codegen


#: the kernels' ``exp`` polynomial by bit width, written once for the scalar ``_exp32`` / ``_exp64`` and the vector
#: one of :mod:`sparseattn.kernels.lanes`: the cutoff below which it is 0, ln 2 in two parts, the coefficients from
#: the highest degree, the exponent's bias and shift
EXP_CONSTANTS = {
    32: (-87.0, 0.693145751953125, 1.428606765330187e-06,
         (1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0), 127, 23),
    64: (-708.0, 0.6931471803691238, 1.9082149292705877e-10,
         (1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,
          1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0), 1023, 52),
}  # fmt: skip
_CUT32, _LN2HI32, _LN2LO32, _POLY32, _BIAS32, _SHIFT32 = EXP_CONSTANTS[32]
_CUT64, _LN2HI64, _LN2LO64, _POLY64, _BIAS64, _SHIFT64 = EXP_CONSTANTS[64]
_LOG2E = 1.4426950408889634


@njit(fastmath=_FM)
def _exp32(x):
    """``exp(x)`` for float32 ``x <= 0`` (0 below -87); max relative error ~2e-7."""
    cut = np.float32(_CUT32)
    xc = max(x, cut)
    t = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))
    r = xc - t * np.float32(_LN2HI32) - t * np.float32(_LN2LO32)
    p = np.float32(_POLY32[0])
    for c in _POLY32[1:]:
        p = p * r + np.float32(c)
    y = p * _float_from_bits((np.int32(t) + np.int32(_BIAS32)) << np.int32(_SHIFT32), p)
    return y if x > cut else np.float32(0.0)


@njit(fastmath=_FM)
def _exp64(x):
    """``exp(x)`` for float64 ``x <= 0`` (0 below -708); max relative error ~3e-16."""
    xc = max(x, _CUT64)
    t = np.floor(xc * _LOG2E + 0.5)
    r = xc - t * _LN2HI64 - t * _LN2LO64
    p = _POLY64[0]
    for c in _POLY64[1:]:
        p = p * r + c
    y = p * _float_from_bits((np.int64(t) + np.int64(_BIAS64)) << np.int64(_SHIFT64), p)
    return y if x > _CUT64 else 0.0


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


@njit(nogil=True, fastmath=_FM, **NO_RC)
def all_finite(x, big):
    """Whether every element of the 1-D ``x`` is finite: ``|x| <= big``, the dtype's largest float (NaN fails it).

    The kernels' fast-math keeps NaN and infinity (no ``nnan``/``ninf``), so the test compiles as written and
    vectorises: how the fused kernels check their raw scores and outputs instead of scanning their inputs.
    """
    ok = True
    for j in range(x.shape[0]):
        ok &= abs(x[j]) <= big
    return ok


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



@intrinsic
def as_readonly(typingctx, arr):
    """The same array typed read-only.

    The inputs q, k, v reach the kernels read-only; passing a writable scratch
    array to the same BLAS call site would compile a second specialisation of
    it (and of ``np.dot``), so scratch operands are retyped at those call sites.
    """
    if not isinstance(arr, types.Array) or not arr.mutable:
        return None
    ro = arr.copy(readonly=True)

    def codegen(context, builder, signature, args):
        from numba.core.imputils import impl_ret_borrowed

        return impl_ret_borrowed(context, builder, ro, args[0])

    return ro(arr), codegen


@intrinsic
def as_c(typingctx, arr):
    """The same array typed C-contiguous, for a block the caller knows is contiguous.

    A view of a preallocated KV cache (``k_cache[:, :, :L]``) is contiguous
    within each head but not between heads; the kernels read it in place,
    one head's ``(n_k, d)`` block at a time, retyped here so that the code
    that follows (reshapes, BLAS call sites) is the contiguous code.  The
    engine checks that each block is contiguous before it passes such a view.
    """
    if not isinstance(arr, types.Array):
        return None
    c = arr.copy(layout="C")

    def codegen(context, builder, signature, args):
        from numba.core.imputils import impl_ret_borrowed

        return impl_ret_borrowed(context, builder, c, args[0])

    return c(arr), codegen


@njit(nogil=True, **RC)
def _mm_nt(a, b, out):
    """``out = a @ b.T`` through BLAS (one shared call site keeps compile time down)."""
    np.dot(a, b.T, out)


@njit(nogil=True, **RC)
def _mm_nn(a, b, out):
    """``out = a @ b`` through BLAS."""
    np.dot(a, b, out)


@njit(nogil=True, **RC)
def _mm_tn(a, b, out):
    """``out = a.T @ b`` through BLAS."""
    np.dot(a.T, b, out)



# -- register-blocked micro-kernels for the span products ----------------------------
# Numba has no vector type, so this section adds one (``Vec``: an LLVM <L x float> /
# <L x double> value: one 256-bit register, L = 8 float32 or 4 float64 lanes, or one
# 512-bit register, L = 16 or 8, see sparseattn.kernels.VECTOR_BYTES) with
# load, broadcast-load, store, add, fma and zero intrinsics.  With them QK^T and P.V
# are written as the classic 6 x 2L register block (12 accumulators, 2 loads and 6
# broadcasts per step), which LLVM keeps in registers.  On a sliding window's tile
# shapes (64 rows, ~600 keys, d = 64) they run at 70-85 GFLOP/s on one core of the
# development machine, where OpenBLAS's sgemm reaches 46-56 (it packs both operands on
# every call).  LLVM splits the vectors on a CPU without AVX: correct everywhere.  No
# bounds checks or negative-index wraparound: callers guarantee the indices.


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
def tn_block(af, lda, k0, r0, r1, bf, ldb, b0, of, o0, ldo):
    """``O[kk, 0:2L] += sum_{r0 <= r < r1} A[r, k0 + kk] * B[r, b0 : b0 + 2L]`` for the 6 columns ``kk`` of A.

    The transposed product of the backward (``dK += dS^T Q``, ``dV += P^T dO``):
    ``af``: flat A, row ``r`` at ``r * lda`` (reads columns ``k0 .. k0 + 5``);
    ``bf``: flat B, row ``r`` at ``r * ldb``; ``of``: flat O, row ``kk`` at
    ``o0 + kk * ldo``.
    """
    L = lanes(af)
    c = _zero_block(af)
    for r in range(r0, r1):
        c = _rank1(af, r * lda + k0, 1, _vload(bf, r * ldb + b0), _vload(bf, r * ldb + b0 + L), c)
    _put_block(of, o0, ldo, c, True)


@njit(nogil=True, inline="always")
def pack_panel(ks, panel, n_k, kp, p0, zero):
    """Copy keys ``[panel*2L, panel*2L + 2L)`` of ``ks`` (n_k, d) into ``kp[p0:]`` as (d, 2L); keys past n_k are 0."""
    L2 = 2 * lanes(kp)
    d = ks.shape[1]
    j0 = panel * L2
    nj = max(0, min(L2, n_k - j0))
    dst = kp[p0 : p0 + d * L2]  # indices from 0: no negative-index wraparound in the stores
    for j in range(nj):
        row = ks[j0 + j]
        for c in range(d):
            dst[c * L2 + j] = row[c]
    for j in range(nj, L2):
        for c in range(d):
            dst[c * L2 + j] = zero

