"""Which rows of an input hold a NaN or an infinity: one cheap pass, vectorised.

Raw arrays in, raw arrays out.  ``sparseattn.engine.paths`` uses the flags to send
slices with non-finite inputs to the staged kernels, which do plain IEEE
arithmetic over each row's allowed keys (the fused kernels are compiled with
fast-math and assume finite scores), and ``check_finite=True`` uses them to
name the first bad element.
"""

from __future__ import annotations

from numba import njit

from .simd import as_c

__all__ = ["nonfinite_slices"]


@njit(cache=True, nogil=True)
def nonfinite_slices(bits, abs_mask, exp_mask, lo, hi, flags):
    """``flags[s] |= slice s holds a NaN or +-inf``, for slices ``lo <= s < hi``.

    ``bits`` is the float array viewed as signed integers of the same width
    (int32 for float32, int64 for float64), shape (S, n * d), each row
    contiguous (a view of a KV cache need not be contiguous between rows);
    ``abs_mask`` clears the sign bit and ``exp_mask`` is the exponent field
    (``0x7f800000`` or ``0x7ff0000000000000``), both of the integer dtype.  A
    value is non-finite exactly when its bits without the sign are
    ``>= exp_mask``; the maximum of those over a slice is an integer
    reduction, which LLVM vectorises without fast-math (a float test such as
    ``x - x != 0`` would be folded away under fast-math, and a float sum does
    not vectorise without it).  Memory-bound: one read of the input.
    """
    for s in range(lo, hi):
        row = as_c(bits[s])
        if row.shape[0] == 0:
            continue
        m = row[0] & abs_mask
        for t in range(1, row.shape[0]):
            m = max(m, row[t] & abs_mask)
        if m >= exp_mask:
            flags[s] = True
