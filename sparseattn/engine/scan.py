"""Which slices of an array hold a NaN or an infinity: the scan behind the non-finite routing and ``check_finite``.

The fused kernels and the blocked path assume finite inputs (fast-math, finite
sentinels); the slices this scan flags run on the staged kernels, which follow
the non-finite policy exactly.  A Numba kernel scans (memory-bound, threaded
above 2**22 elements), or NumPy where nothing may be compiled.
"""

from __future__ import annotations

import numpy as np

from . import coldstart
from .threads import run_ranges

__all__ = ["scan_nonfinite", "first_nonfinite", "numpy_scan"]


def numpy_scan(x):
    """(S,) bool: slice ``x[s]`` holds a NaN or an infinity (NumPy; one slice at a time)."""
    return np.array([not np.isfinite(x[s]).all() for s in range(x.shape[0])], dtype=bool)


_INT_VIEW = {
    np.dtype(np.float32): (np.int32, 0x7FFF_FFFF, 0x7F80_0000),
    np.dtype(np.float64): (np.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
#: below this many elements the scan runs in the calling thread
_SCAN_PARALLEL_MIN = 1 << 22


def scan_nonfinite(x, flags, compiled=True):
    """``flags[s] |= x[s]`` holds a NaN or an infinity, for ``x`` (S, n, d) C-contiguous float32/float64.

    A Numba kernel, or NumPy when ``compiled`` is False (the blocked path,
    which compiles nothing) or while a background compile holds Numba's
    compiler lock (see :mod:`sparseattn.engine.coldstart`).
    """
    S = x.shape[0]
    if x.size == 0:
        return flags
    if not compiled or (coldstart.compiling() and not coldstart.in_compile_thread()):
        flags |= numpy_scan(x)
        return flags
    from ..kernels.finite import nonfinite_slices

    it, abs_mask, exp_mask = _INT_VIEW[x.dtype]
    bits = x.reshape(S, -1).view(it)
    n_threads = 1
    if x.size >= _SCAN_PARALLEL_MIN and S > 1:
        from numba import get_num_threads

        n_threads = min(get_num_threads(), S)
    bounds = [i * S // n_threads for i in range(n_threads + 1)]
    run_ranges(nonfinite_slices, (bits, it(abs_mask), it(exp_mask)), (flags,), bounds, n_threads)
    return flags


def first_nonfinite(name, user, compact, own):
    """``ValueError`` naming the user's array and the index of its first NaN/inf, or None.

    ``compact`` is its (prod(own), n, d) copy in the compute dtype, ``own`` its
    leading shape aligned to the broadcast shape (1 on broadcast axes).
    """
    flags = scan_nonfinite(compact, np.zeros(compact.shape[0], dtype=bool))
    if not flags.any():
        return None
    s = int(np.argmax(flags))
    i, t = (int(a) for a in np.argwhere(~np.isfinite(compact[s]))[0])
    user_lead = np.shape(user)[:-2]
    lead_idx = np.unravel_index(s, own) if own else ()
    idx = tuple(int(j) for j in lead_idx[len(lead_idx) - len(user_lead):]) if user_lead else ()
    idx = idx + (i, t)
    value = compact[s, i, t]
    return ValueError(
        f"{name} holds a non-finite value ({value}) at index {idx} (shape {np.shape(user)}); "
        f"check_finite=True refuses NaN and +-inf; without it they propagate under IEEE rules "
        f"to the rows that use them (see the non-finite policy in sparse_attention's docs)"
    )
