"""The fused backward path: the forward's tile plan, walked again from the saved log-sum-exp.

:func:`fused_backward` is called by :func:`sparseattn.sparse_attention_backward`
after validation.  It allocates the three gradients
and, per worker thread, a pair of key buffers; nothing proportional to
``nnz * heads`` (``D = rowsum(dO * O)`` is computed per tile).

Race-free ``dK`` / ``dV``.  A query tile's rows are its own, so ``dQ`` is
written directly; but many query tiles touch the same key, so their ``dK`` /
``dV`` contributions would collide.  Each work range is a run of tiles of one
slice (ranges are cut at slice boundaries); the thread that runs it adds its
contributions into private buffers of ``n_k`` rows and then, under the lock
of the stored ``k`` slice the slice reads (and that of its stored ``v``
slice), adds only the rows it touched (the span interval plus the scattered
columns it recorded) to that stored slice's gradients and clears them.  So
query heads sharing a key/value head (grouped-query attention, or ``k``
broadcast over the heads or the batch) accumulate into one gradient of
``k``'s own shape, and ``k`` and ``v`` are read through the slice maps,
never copied per head.
A band's range of ``R`` rows touches about ``R + 2r`` keys, so the flush costs
a small fraction of the range's work; extra memory is two ``n_k x d`` buffers
per thread.  (The alternative, a second pass over key tiles of the transposed
plan, recomputes ``S`` and ``dP``: seven products instead of five.)

Long (global) rows run afterwards, one thread per slice range, adding their
contributions to the stored slices' gradients directly.  Ranges are cut
between groups of slices that share no stored ``k`` or ``v`` slice (with
grouped-query heads: a key/value head and its query heads), so two threads
never add into one stored slice; without sharing every slice is its own
group, as before.
"""

from __future__ import annotations

import threading

import numpy as np

from .threads import blas_single_thread, run_ranges
from .fused_forward import _PARALLEL_MIN_FLOP, _WORK_SPLIT, _split_items, panel_buffers
from .plan import get_plan

__all__ = ["fused_backward"]


def _thread_buffers(n_k, d, dv, dtype, chunk, span, simd):
    """One thread's key buffers and panel caches for :func:`~sparseattn.kernels.backward.tiles_backward`.

    The K^T and V^T panel caches are empty (the BLAS span path) unless ``simd``.
    """
    from ..kernels.backward import KEY_PAD

    dkb = np.zeros((n_k + KEY_PAD, d), dtype=dtype)
    dvb = np.zeros((n_k + KEY_PAD, dv), dtype=dtype)
    lohi = np.array([n_k, 0, 0], dtype=np.int64)
    mark = np.zeros(n_k, dtype=np.uint8)
    cols = np.empty(n_k, dtype=np.int64)
    kp, packed_k = panel_buffers(n_k, d, dv, dtype, chunk, span)
    vp, packed_v = panel_buffers(n_k, dv, dv, dtype, chunk, span)
    if not simd:
        kp, packed_k, vp, packed_v = kp[:0], packed_k[:0], vp[:0], packed_v[:0]
    return dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v


def _disjoint_groups(slices, kmap, vmap):
    """``slices`` reordered so that slices sharing a stored k or v slice are adjacent, and where groups start.

    A group is a connected set of slices through shared stored slices (labels
    propagated to their fixed point: the smallest stored-k index in the set).
    """
    km, vm = kmap[slices], vmap[slices]
    lab = km.copy()
    while True:
        low_v = np.full(int(vm.max()) + 1, np.iinfo(np.int64).max)
        np.minimum.at(low_v, vm, lab)
        low_k = np.full(int(km.max()) + 1, np.iinfo(np.int64).max)
        np.minimum.at(low_k, km, low_v[vm])
        new = low_k[km]
        if np.array_equal(new, lab):
            break
        lab = new
    order = np.argsort(lab, kind="stable")
    lab = lab[order]
    return slices[order], np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])


def _long_ranges(starts, ns, n_ranges):
    """About ``n_ranges`` cuts of ``[0, ns)`` at group starts (each group whole in one range)."""
    want = [i * ns // n_ranges for i in range(1, n_ranges)]
    cuts = np.unique(starts[np.clip(np.searchsorted(starts, want), 0, len(starts) - 1)])
    return sorted(set([0, ns] + [int(c) for c in cuts if 0 < c < ns]))


def fused_backward(q, k, v, dout, out, lse, patterns, slice_pattern, scale, key_valid, slice_batch, *,
                   parallel=None, skip=None, maps=None, mods=None):  # fmt: skip
    """Gradients ``(dq, dk, dv)`` of the fused forward over flattened slices.

    Parameters
    ----------
    q, k, v, patterns, slice_pattern, scale, key_valid, slice_batch, parallel, maps, mods
        As for :func:`sparseattn.engine.fused_forward.fused_attention` (C-contiguous, one float dtype):
        ``q``, ``k``, ``v`` hold the stored slices, ``maps = (qmap, kmap, vmap)``
        which one slice ``s`` reads (identity when None).
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
    dq : ndarray, shape (S, n_q, d), one row block per slice
    dk, dv : ndarray, shapes of k and v: the gradient of each stored slice, summed over the slices reading it
    """
    from numba import get_num_threads

    from ..kernels.backward import flush_keys, long_rows_backward, tiles_backward
    from ..kernels.simd import block_width
    from .modifiers import NONE

    mods = NONE if mods is None else mods
    if mods.score_mod is not None:
        spec = mods.score_mod.kernels("backward")
        tiles_backward, long_rows_backward = spec["tiles_backward"], spec["long_rows_backward"]

    S = len(slice_pattern)
    _, n_q, d = q.shape
    n_k = k.shape[1]
    dv = v.shape[2]
    dt = q.dtype
    if maps is None:
        maps = (np.arange(S, dtype=np.int64),) * 3
    qmap, kmap, vmap = (np.ascontiguousarray(m, dtype=np.int64) for m in maps)
    # every row of a computed slice is written: by its tile, long rows again by the long-row pass
    dq = (np.empty if skip is None else np.zeros)((S, n_q, d), dtype=dt)
    dk = np.zeros_like(k)
    dvv = np.zeros_like(v)
    if S == 0 or n_q == 0 or n_k == 0:
        dq[...] = 0
        return dq, dk, dvv
    use_valid = key_valid is not None
    kv = np.ascontiguousarray(key_valid, dtype=bool) if use_valid else np.ones((1, 1), dtype=bool)
    sb = np.asarray(slice_batch, dtype=np.int64) if use_valid else np.zeros(S, dtype=np.int64)
    sc = dt.type(scale)
    mod, slopes = mods.kernel_args(dt)
    slice_pattern = np.asarray(slice_pattern, dtype=np.int64)
    n_threads = 1 if parallel is False else get_num_threads()
    simd_ok = d % block_width(dt) == 0 and dv % block_width(dt) == 0
    k_locks = [threading.Lock() for _ in range(len(k))]
    v_locks = [threading.Lock() for _ in range(len(v))]
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
            const = (q, k, v, qmap, kmap, vmap, dout, out, lse, slices, plan.tile_rows, plan.chunk, plan.tile_k0, plan.tile_k1,
                     plan.row_lo, plan.row_hi, plan.xs_ptr, plan.xs_k0, plan.xs_k1, plan.xs_lo, plan.xs_hi,
                     plan.sh_ptr, plan.sh_cols, plan.sh_mask, plan.rs_ptr,
                     plan.rs_lo, plan.rs_hi, sc, kv, sb, use_valid, mod, slopes)  # fmt: skip

            def tiles(b0, b1, dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v):
                if b1 <= b0:
                    return
                tiles_backward(*const, b0, b1, dq, dkb, dvb, lohi, mark, cols, kp, vp, packed_k, packed_v)
                s = slices[b0 // n_tiles]
                sk, sv = kmap[s], vmap[s]
                with k_locks[sk], v_locks[sv]:  # always k's lock first: no deadlock
                    flush_keys(dk[sk], dvv[sv], dkb, dvb, lohi, mark, cols)

            if n_tiles:
                run_ranges(
                    tiles, (), (), bounds.tolist(), n_threads if par else 1,
                    per_thread=lambda: _thread_buffers(n_k, d, dv, dt, plan.chunk, plan.max_span, simd_ok),
                    flush_denormals=True,
                )  # fmt: skip
            if len(plan.it_grp):
                lslices, starts = _disjoint_groups(slices, kmap, vmap) if par else (slices, np.zeros(1, np.int64))
                n_ranges = min(len(starts), n_threads) if par else 1
                run_ranges(
                    long_rows_backward,
                    (q, k, v, qmap, kmap, vmap, dout, out, lse, lslices, plan.long_rows, plan.grp_ptr, plan.grp_it_ptr,
                     plan.it_a, plan.it_b, sc, kv, sb, use_valid, mod, slopes, dq, dk, dvv),
                    (),
                    _long_ranges(starts, ns, n_ranges),
                    n_threads if par else 1,
                    flush_denormals=True,
                )  # fmt: skip
    return dq, dk, dvv
