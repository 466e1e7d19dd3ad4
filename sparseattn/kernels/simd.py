"""AVX-width register-blocked micro-kernels for the fused tile pass.

Numba has no vector type, so this module adds one (``Vec``: an LLVM
``<L x float>`` / ``<L x double>`` value, L = 8 float32 or 4 float64 lanes, one
256-bit register) and five intrinsics on it: load, broadcast-load, store,
fused multiply-add and zero.  With them the two products of a tile are written
as the classic 6 x 2L register block (12 accumulators, 2 loads and 6
broadcasts per step), which LLVM keeps entirely in registers:

``qk_block``
    ``S[6 rows, 2L keys] = Q[6 rows, :] . K^T`` from a *panel-packed* K^T
    (``kp[panel, c, lane]``: the 2L keys of a panel are contiguous for every
    feature ``c``, so a step loads two vectors).
``pv_block``
    ``O[6 rows, 2L cols] += P[6 rows, k0:k1] . V[k0:k1, cols]`` reading V's rows
    in place (their columns are contiguous already).

On the tile shapes of a sliding window (64 rows, ~600 keys, d = 64) these run
at 70-85 GFLOP/s on one core of the development machine, where OpenBLAS's
``sgemm`` reaches 46-56 (it packs both operands on every call); see
``docs/architecture.md``.  Vectors are 256 bits wide whatever the CPU: LLVM
splits them on a CPU without AVX, so the code stays correct everywhere.

No bounds checks or negative-index wraparound: callers guarantee the indices.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

__all__ = ["lanes", "qk_block", "pv_block", "pack_panel"]


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


_VEC = {types.float32: Vec(types.float32, 8), types.float64: Vec(types.float64, 4)}


def _vec_of(dtype):
    return _VEC.get(dtype)


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
def qk_block(qf, q0, d, kp, p0, sf, s0, lds):
    """``S[r, 0:2L] = sum_c Q[r, c] * Kp[c, 0:2L]`` for the 6 rows ``r`` of one register block.

    ``qf``: flat Q, row ``r`` at ``q0 + r * d``; ``kp``: flat panel, feature ``c``
    at ``p0 + c * 2L``; ``sf``: flat S, row ``r`` at ``s0 + r * lds``.
    """
    L = lanes(qf)
    c00 = _vzero(qf)
    c01 = _vzero(qf)
    c10 = _vzero(qf)
    c11 = _vzero(qf)
    c20 = _vzero(qf)
    c21 = _vzero(qf)
    c30 = _vzero(qf)
    c31 = _vzero(qf)
    c40 = _vzero(qf)
    c41 = _vzero(qf)
    c50 = _vzero(qf)
    c51 = _vzero(qf)
    for c in range(d):
        b0 = _vload(kp, p0 + c * 2 * L)
        b1 = _vload(kp, p0 + c * 2 * L + L)
        a = _vbload(qf, q0 + c)
        c00 = _vfma(a, b0, c00)
        c01 = _vfma(a, b1, c01)
        a = _vbload(qf, q0 + d + c)
        c10 = _vfma(a, b0, c10)
        c11 = _vfma(a, b1, c11)
        a = _vbload(qf, q0 + 2 * d + c)
        c20 = _vfma(a, b0, c20)
        c21 = _vfma(a, b1, c21)
        a = _vbload(qf, q0 + 3 * d + c)
        c30 = _vfma(a, b0, c30)
        c31 = _vfma(a, b1, c31)
        a = _vbload(qf, q0 + 4 * d + c)
        c40 = _vfma(a, b0, c40)
        c41 = _vfma(a, b1, c41)
        a = _vbload(qf, q0 + 5 * d + c)
        c50 = _vfma(a, b0, c50)
        c51 = _vfma(a, b1, c51)
    _vstore(sf, s0, c00)
    _vstore(sf, s0 + L, c01)
    _vstore(sf, s0 + lds, c10)
    _vstore(sf, s0 + lds + L, c11)
    _vstore(sf, s0 + 2 * lds, c20)
    _vstore(sf, s0 + 2 * lds + L, c21)
    _vstore(sf, s0 + 3 * lds, c30)
    _vstore(sf, s0 + 3 * lds + L, c31)
    _vstore(sf, s0 + 4 * lds, c40)
    _vstore(sf, s0 + 4 * lds + L, c41)
    _vstore(sf, s0 + 5 * lds, c50)
    _vstore(sf, s0 + 5 * lds + L, c51)


@njit(nogil=True, inline="always")
def pv_block(pf, p0, ldp, k0, k1, vf, v0, ldv, of, o0, ldo):
    """``O[r, 0:2L] += sum_{k0 <= k < k1} P[r, k] * V[k, 0:2L]`` for 6 rows ``r``.

    ``pf``: flat P, row ``r`` at ``p0 + r * ldp``; ``vf``: flat V, row ``k`` at
    ``v0 + k * ldv``; ``of``: flat O, row ``r`` at ``o0 + r * ldo``.
    """
    L = lanes(pf)
    c00 = _vzero(pf)
    c01 = _vzero(pf)
    c10 = _vzero(pf)
    c11 = _vzero(pf)
    c20 = _vzero(pf)
    c21 = _vzero(pf)
    c30 = _vzero(pf)
    c31 = _vzero(pf)
    c40 = _vzero(pf)
    c41 = _vzero(pf)
    c50 = _vzero(pf)
    c51 = _vzero(pf)
    for k in range(k0, k1):
        b0 = _vload(vf, v0 + k * ldv)
        b1 = _vload(vf, v0 + k * ldv + L)
        a = _vbload(pf, p0 + k)
        c00 = _vfma(a, b0, c00)
        c01 = _vfma(a, b1, c01)
        a = _vbload(pf, p0 + ldp + k)
        c10 = _vfma(a, b0, c10)
        c11 = _vfma(a, b1, c11)
        a = _vbload(pf, p0 + 2 * ldp + k)
        c20 = _vfma(a, b0, c20)
        c21 = _vfma(a, b1, c21)
        a = _vbload(pf, p0 + 3 * ldp + k)
        c30 = _vfma(a, b0, c30)
        c31 = _vfma(a, b1, c31)
        a = _vbload(pf, p0 + 4 * ldp + k)
        c40 = _vfma(a, b0, c40)
        c41 = _vfma(a, b1, c41)
        a = _vbload(pf, p0 + 5 * ldp + k)
        c50 = _vfma(a, b0, c50)
        c51 = _vfma(a, b1, c51)
    _vstore(of, o0, _vadd(_vload(of, o0), c00))
    _vstore(of, o0 + L, _vadd(_vload(of, o0 + L), c01))
    _vstore(of, o0 + ldo, _vadd(_vload(of, o0 + ldo), c10))
    _vstore(of, o0 + ldo + L, _vadd(_vload(of, o0 + ldo + L), c11))
    _vstore(of, o0 + 2 * ldo, _vadd(_vload(of, o0 + 2 * ldo), c20))
    _vstore(of, o0 + 2 * ldo + L, _vadd(_vload(of, o0 + 2 * ldo + L), c21))
    _vstore(of, o0 + 3 * ldo, _vadd(_vload(of, o0 + 3 * ldo), c30))
    _vstore(of, o0 + 3 * ldo + L, _vadd(_vload(of, o0 + 3 * ldo + L), c31))
    _vstore(of, o0 + 4 * ldo, _vadd(_vload(of, o0 + 4 * ldo), c40))
    _vstore(of, o0 + 4 * ldo + L, _vadd(_vload(of, o0 + 4 * ldo + L), c41))
    _vstore(of, o0 + 5 * ldo, _vadd(_vload(of, o0 + 5 * ldo), c50))
    _vstore(of, o0 + 5 * ldo + L, _vadd(_vload(of, o0 + 5 * ldo + L), c51))


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
