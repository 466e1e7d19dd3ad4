"""Flush denormals to zero in the kernels' threads: the x86 MXCSR bits FTZ and DAZ, set and restored.

A float32 softmax whose scores fall far below the row's maximum (ALiBi's far keys: a slope of 0.6 over 256
keys is -150) makes probabilities and gradient terms below the smallest normal number, 1.2e-38.  Without
these bits every operation that reads or makes such a denormal takes a microcode assist (tens to hundreds
of cycles): H1 with ALiBi ran 1.24x the plain forward and 1.27x the backward, with the same slopes / 1000
1.06x and 1.01x.  With the bits set a denormal reads and writes as 0, which changes a softmax by less than
1e-38 of its largest term.

MXCSR is per thread: :func:`ftz_enter` sets the bits on the calling thread and returns the old register,
:func:`ftz_exit` puts it back, so a caller's own floating-point mode is unchanged after a call.  On other
machines (no MXCSR) both do nothing.  Neither releases the GIL: each is a few instructions, and a call that
released it would have to take it back from the pool threads that are starting their ranges.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["ftz_enter", "ftz_exit", "X86"]

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_FTZ_DAZ = (1 << 15) | (1 << 6)


def _mxcsr_call(builder, name, slot):
    fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])


@intrinsic
def _mxcsr_ftz(typingctx):
    """Read MXCSR, write it back with FTZ and DAZ set; returns the value read (0 off x86)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        if not X86:
            return ir.Constant(i32, 0)
        slot = cgutils.alloca_once(builder, i32)
        _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(i32, _FTZ_DAZ)), slot)
        _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return old

    return types.uint32(), codegen


@intrinsic
def _mxcsr_set(typingctx, value):
    if not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        if X86:
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            v = args[0]
            if v.type.width != 32:
                v = builder.trunc(v, ir.IntType(32)) if v.type.width > 32 else builder.zext(v, ir.IntType(32))
            builder.store(v, slot)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return types.none(value), codegen


@njit(cache=True)
def ftz_enter():
    """Set FTZ and DAZ on this thread; returns the previous MXCSR for :func:`ftz_exit`."""
    return _mxcsr_ftz()


@njit(cache=True)
def ftz_exit(old):
    """Restore this thread's MXCSR as :func:`ftz_enter` found it (a no-op off x86)."""
    _mxcsr_set(old)
