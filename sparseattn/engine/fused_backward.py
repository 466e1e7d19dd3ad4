"""The fused backward path: the forward's tile plan, walked again from the saved log-sum-exp.

:func:`fused_backward` is called by :func:`sparseattn.sparse_attention_backward`
after validation.  It allocates the three gradients
and, per worker thread, a pair of key buffers; nothing proportional to
``nnz * heads`` (``D = rowsum(dO * O)`` is computed per tile).

Race-free ``dK`` / ``dV``.  A query tile's rows are its own, so ``dQ`` is
written directly; but many query tiles touch the same key, so their ``dK`` /
``dV`` contributions would collide.  Each work range is a run of tiles of one
slice (ranges are cut at slice boundaries); the thread that runs it adds its
contributions into private buffers of ``n_k`` rows and then, under that
slice's lock, adds only the rows it touched (the span interval plus the
scattered columns it recorded) to the slice's gradients and clears them.
A band's range of ``R`` rows touches about ``R + 2r`` keys, so the flush costs
a small fraction of the range's work; extra memory is two ``n_k x d`` buffers
per thread.  (The alternative, a second pass over key tiles of the transposed
plan, recomputes ``S`` and ``dP``: seven products instead of five.)

Long (global) rows run afterwards, one thread per slice range, adding their
contributions to the slice's gradients directly.
"""

from __future__ import annotations

import threading

import numpy as np

from .threads import blas_single_thread, run_ranges
from .fused_forward import _PARALLEL_MIN_FLOP, _WORK_SPLIT, _split_items, panel_buffers
from .plan import get_plan

__all__ = ["fused_backward"]


def _thread_buffers(n_k, d, dv, dtype, chunk, simd):
    """One thread's key buffers and panel caches for :func:`~sparseattn.kernels.backward.tiles_backward`.

    The K^T and V^T panel caches are empty (the BLAS span path) unless ``simd``.
    """
    from ..kernels.backward import KEY_PAD

    dkb = np.zeros((n_k + KEY_PAD, d), dtype=dtype)
    dvb = np.zeros((n_k + KEY_PAD, dv), dtype=dtype)
    lohi = np.array([n_k, 0, 0], dtype=np.int64)
    mark = np.zeros(n_k, dtype=np.uint8)
    cols = np.empty(n_k, dtype=np.int64)
    kp, packed_k = panel_buffers(n_k, d, dv, dtype, chunk)
    vp, packed_v = panel_buffers(n_k, dv, dv, dtype, chunk)
    if not simd:
        kp, packed_k, vp, packed_v = kp[:0], packed_k[:0], vp[:0], packed_v[:0]
    return dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v


def fused_backward(q, k, v, dout, out, lse, patterns, slice_pattern, scale, key_valid, slice_batch, *,
                   parallel=None, skip=None):  # fmt: skip
    """Gradients ``(dq, dk, dv)`` of the fused forward over flattened slices.

    Parameters
    ----------
    q, k, v, patterns, slice_pattern, scale, key_valid, slice_batch, parallel
        As for :func:`sparseattn.engine.fused_forward.fused_attention` (C-contiguous, one float dtype).
    dout, out : ndarray, shape (S, n_q, dv)
        Gradient of the loss with respect to the output, and the output.
    lse : ndarray, shape (S, n_q)
        The forward's log-sum-exp (``-inf`` for rows without a key).
    skip : bool ndarray, shape (S,), optional
        Slices to leave out: their gradients are zeros for the caller to
        fill (``sparse_attention_backward`` computes slices with non-finite
        inputs on the staged kernels).

    Returns
    -------
    dq, dk, dv : ndarray, shapes of q, k, v, dtype of q
    """
    from numba import get_num_threads

    from ..kernels.backward import flush_keys, long_rows_backward, tiles_backward
    from ..kernels.simd import block_width

    S, n_q, d = q.shape
    n_k = k.shape[1]
    dv = v.shape[2]
    dt = q.dtype
    # every row of a computed slice is written: by its tile, long rows again by the long-row pass
    dq = np.empty_like(q) if skip is None else np.zeros_like(q)
    dk = np.zeros_like(k)
    dvv = np.zeros_like(v)
    if S == 0 or n_q == 0 or n_k == 0:
        dq[...] = 0
        return dq, dk, dvv
    use_valid = key_valid is not None
    kv = np.ascontiguousarray(key_valid, dtype=bool) if use_valid else np.ones((1, 1), dtype=bool)
    sb = np.asarray(slice_batch, dtype=np.int64) if use_valid else np.zeros(S, dtype=np.int64)
    sc = dt.type(scale)
    slice_pattern = np.asarray(slice_pattern, dtype=np.int64)
    n_threads = 1 if parallel is False else get_num_threads()
    simd_ok = d % block_width(dt) == 0 and dv % block_width(dt) == 0
    with blas_single_thread():
        for p_idx, pattern in enumerate(patterns):
            mine = slice_pattern == p_idx
            if skip is not None:
                mine &= ~np.asarray(skip, dtype=bool)
            slices = np.flatnonzero(mine).astype(np.int64)
            ns = len(slices)
            if ns == 0:
                continue
            plan = get_plan(pattern)
            n_tiles = plan.n_tiles
            par = n_threads > 1 and ns * int(plan.cost_prefix[-1]) * (d + dv) >= _PARALLEL_MIN_FLOP
            bounds = _split_items(plan, ns, _WORK_SPLIT * n_threads if par else 1)
            # ranges never cross a slice: a thread's key buffers hold one slice at a time
            bounds = np.union1d(bounds, np.arange(0, ns * n_tiles + 1, max(1, n_tiles))).astype(np.int64)
            locks = [threading.Lock() for _ in range(ns)]
            const = (q, k, v, dout, out, lse, slices, plan.tile_rows, plan.chunk, plan.tile_k0, plan.tile_k1,
                     plan.row_lo, plan.row_hi, plan.sh_ptr, plan.sh_cols, plan.sh_mask, plan.rs_ptr,
                     plan.rs_cols, sc, kv, sb, use_valid)  # fmt: skip

            def tiles(b0, b1, dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v):
                if b1 <= b0:
                    return
                tiles_backward(*const, b0, b1, dq, dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v)
                si = b0 // n_tiles
                s = slices[si]
                with locks[si]:
                    flush_keys(dk[s], dvv[s], dkb, dvb, lohi, mark, cols)

            if n_tiles:
                run_ranges(
                    tiles, (), (), bounds.tolist(), n_threads if par else 1,
                    per_thread=lambda: _thread_buffers(n_k, d, dv, dt, plan.chunk, simd_ok),
                )  # fmt: skip
            if len(plan.it_grp):
                n_ranges = min(ns, n_threads) if par else 1
                run_ranges(
                    long_rows_backward,
                    (q, k, v, dout, out, lse, slices, plan.long_rows, plan.grp_ptr, plan.grp_it_ptr,
                     plan.it_a, plan.it_b, sc, kv, sb, use_valid, dq, dk, dvv),
                    (),
                    [i * ns // n_ranges for i in range(n_ranges + 1)],
                    n_threads if par else 1,
                )  # fmt: skip
    return dq, dk, dvv
