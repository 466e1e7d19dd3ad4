"""Lane-wise softmax over score blocks stored lane by lane (``L`` queries per row), as vector code.

The neighbourhood line kernel (:mod:`sparseattn.kernels.grid`) keeps a block's scores as rows of ``L``
lanes, one query per lane, with each lane's running max and sum in ``(L,)`` arrays.  Written as loops of
Numba, the max and the exp-and-sum compiled to scalar code (LLVM could not tell those small arrays from
the scores they read and write); these intrinsics emit the vector loop directly: ``llvm.maxnum`` and the
kernels' ``exp`` polynomial (:mod:`sparseattn.kernels.simd`'s ``_exp32`` / ``_exp64``) on whole vectors.
Raw arrays in, raw arrays out; no validation.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _LOG2E, EXP_CONSTANTS, _element_ptr, _vec_of

__all__ = ["lane_max", "lane_softmax"]

def _vcall(builder, name, ty, *args):
    """``name`` (an LLVM intrinsic such as ``"llvm.fma"``) on vectors of type ``ty``."""
    full = f"{name}.v{ty.count}f{32 if isinstance(ty.element, ir.FloatType) else 64}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * len(args)), full)
    return builder.call(fn, args)


@intrinsic
def lane_softmax(typingctx, sb, n, mx, ls):
    """``sb[r L : r L + L] = exp(sb[r L : r L + L] - mx)`` for ``r < n`` and ``ls[:L]`` their sum, lane by lane.

    The lanes' maxima ``mx`` and sums ``ls`` are (L,) arrays; the ``exp`` is the kernels' polynomial
    (``simd._exp32`` / ``_exp64``) on whole vectors.  Written as a loop of Numba it compiled to scalar code
    (each lane's sum goes to memory that LLVM could not tell from the scores): a sixth of a 7 x 7
    neighbourhood's forward.
    """
    vt = _vec_of(sb.dtype)
    bits = sb.dtype.bitwidth

    def codegen(context, builder, sig, args):
        sb_a, n_a, mx_a, ls_a = args
        llvt = context.get_value_type(vt)
        L = llvt.count
        ity = ir.IntType(bits)
        ivt = ir.VectorType(ity, L)
        cut, c1, c2, poly, bias, shift = EXP_CONSTANTS[bits]
        const = lambda x: ir.Constant(llvt, [float(x)] * L)  # noqa: E731
        al = bits // 8
        base = builder.bitcast(_element_ptr(context, builder, sig.args[0], sb_a, context.get_constant(types.intp, 0)),
                               llvt.as_pointer())  # fmt: skip
        m = builder.load(builder.bitcast(_element_ptr(context, builder, sig.args[2], mx_a,
                                                      context.get_constant(types.intp, 0)), llvt.as_pointer()), align=al)
        acc = cgutils.alloca_once_value(builder, ir.Constant(llvt, None))
        with cgutils.for_range(builder, n_a) as loop:
            ptr = builder.gep(base, [loop.index])
            x = builder.fsub(builder.load(ptr, align=al), m)
            xc = _vcall(builder, "llvm.maxnum", llvt, x, const(cut))
            t = _vcall(builder, "llvm.floor", llvt, _vcall(builder, "llvm.fma", llvt, xc, const(_LOG2E),
                                                               const(0.5)))  # fmt: skip
            r = builder.fsub(builder.fsub(xc, builder.fmul(t, const(c1))), builder.fmul(t, const(c2)))
            p = const(poly[0])
            for coef in poly[1:]:
                p = _vcall(builder, "llvm.fma", llvt, p, r, const(coef))
            e = builder.shl(builder.add(builder.fptosi(t, ivt), ir.Constant(ivt, [bias] * L)), ir.Constant(ivt, [shift] * L))
            y = builder.fmul(p, builder.bitcast(e, llvt))
            y = builder.select(builder.fcmp_ordered(">", x, const(cut)), y, const(0.0))
            builder.store(y, ptr, align=al)
            builder.store(builder.fadd(builder.load(acc), y), acc)
        lp = _element_ptr(context, builder, sig.args[3], ls_a, context.get_constant(types.intp, 0))
        builder.store(builder.load(acc), builder.bitcast(lp, llvt.as_pointer()), align=al)
        return context.get_dummy_value()

    return types.none(sb, n, mx, ls), codegen


@intrinsic
def lane_max(typingctx, sb, n, mx):
    """``mx[:L] = max(mx[:L], sb[r L : r L + L] for r < n)`` lane by lane (``llvm.maxnum``)."""
    vt = _vec_of(sb.dtype)

    def codegen(context, builder, sig, args):
        sb_a, n_a, mx_a = args
        llvt = context.get_value_type(vt)
        al = sb.dtype.bitwidth // 8
        zero = context.get_constant(types.intp, 0)
        base = builder.bitcast(_element_ptr(context, builder, sig.args[0], sb_a, zero), llvt.as_pointer())
        mp = builder.bitcast(_element_ptr(context, builder, sig.args[2], mx_a, zero), llvt.as_pointer())
        acc = cgutils.alloca_once_value(builder, builder.load(mp, align=al))
        with cgutils.for_range(builder, n_a) as loop:
            y = builder.load(builder.gep(base, [loop.index]), align=al)
            builder.store(_vcall(builder, "llvm.maxnum", llvt, builder.load(acc), y), acc)
        builder.store(builder.load(acc), mp, align=al)
        return context.get_dummy_value()

    return types.none(sb, n, mx), codegen
