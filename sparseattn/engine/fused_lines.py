"""The fused forward of narrow neighbourhoods: when the line kernel applies, and its threads.

A neighbourhood planned from its grid with a narrow, non-causal last-axis window carries its lines
(``TilePlan.grid``, :mod:`sparseattn.engine.gridplan`); :func:`sparseattn.engine.fused_forward.fused_attention`
runs them on :func:`sparseattn.kernels.grid.grid_forward` instead of the tile kernels' residual loops.
"""

from __future__ import annotations

import numpy as np

from .threads import PARALLEL_MIN_FLOP as _PARALLEL_MIN_FLOP
from .threads import WORK_SPLIT as _WORK_SPLIT
from .threads import run_ranges

__all__ = ["LINE_KERNEL", "applies", "run"]

#: run a narrow neighbourhood's lines on the line kernel (:mod:`sparseattn.kernels.grid`) where it applies
LINE_KERNEL = True


def applies(plan, k, v, use_valid, mod, mods):
    """Whether the plan's lines run on :mod:`sparseattn.kernels.grid`: a narrow neighbourhood, no padding mask
    and no score modifier, ``d`` a multiple of the vector's lanes and ``d_v`` of two vectors, contiguous k and v."""
    from ..kernels import VECTOR_BYTES

    if not LINE_KERNEL or plan.grid is None or use_valid or int(mod[0]) != 0 or mods.score_mod is not None:
        return False
    L = VECTOR_BYTES // k.dtype.itemsize
    if not (k.shape[2] % L == 0 and v.shape[2] % (2 * L) == 0 and k.flags.c_contiguous and v.flags.c_contiguous):
        return False
    return _ready(k.dtype)


def _ready(dtype):
    """Whether the line kernel of ``dtype`` can run now: compiled in this process or in Numba's disk cache.

    Otherwise the tile kernels answer (the same result) rather than make this call compile it, except
    where compiling in the caller's thread is what was asked (``SPARSEATTN_COLD_START=wait``, or the
    cold start's own compile job, which compiles it with the forward kernels): see
    :func:`sparseattn.engine.coldstart.kernel_ready`.
    """
    import numba

    from ..kernels.grid import grid_forward
    from . import coldstart

    want = numba.from_dtype(dtype)
    return coldstart.kernel_ready(grid_forward, ("line", dtype), lambda sig: getattr(sig[0], "dtype", None) == want, want)


def run(plan, q, k, v, qmap, kmap, vmap, slices, sc, out, lse, flags, n_threads):
    """The plan's grid lines for ``slices`` on the line kernel, on up to ``n_threads`` threads."""
    from ..kernels import VECTOR_BYTES
    from ..kernels.grid import grid_forward

    W, kw, sx, ln_ptr, ln_base = plan.grid
    n_k, d = k.shape[1:]
    n_items = len(slices) * (len(ln_ptr) - 1)
    work = n_items * W * int(np.diff(ln_ptr).max()) * kw * (d + v.shape[2])
    par = n_threads > 1 and work >= _PARALLEL_MIN_FLOP
    n_ranges = min(n_items, _WORK_SPLIT * n_threads) if par else 1
    L = VECTOR_BYTES // k.dtype.itemsize
    # the kernel's loads reach L + 2 kw keys past a line; mg - kw // 2 and the row length multiples of L
    # (with the buffer on a vector boundary, an interior block's keys start on one: aligned loads)
    mg = -(-(L + 2 * kw) // L) * L + kw // 2
    ldk = -(-(n_k + 2 * mg) // L) * L

    def per_thread():  # K transposed with zero margins, and the stored slice it holds
        raw = np.zeros(d * ldk + L, dtype=k.dtype)
        o = -(raw.ctypes.data // raw.itemsize) % L
        return raw[o : o + d * ldk], np.full(1, -1, dtype=np.int64), mg

    run_ranges(
        grid_forward, (q, k, v, qmap, kmap, vmap, slices, W, kw, sx, ln_ptr, ln_base, sc), (out, lse, flags),
        [i * n_items // n_ranges for i in range(n_ranges + 1)], n_threads if par else 1,
        per_thread=per_thread, flush_denormals=True,
    )  # fmt: skip
