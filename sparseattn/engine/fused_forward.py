"""The fused forward path: plan (cached) -> tile kernel -> long-row kernels.

:func:`fused_attention` is called by :func:`sparseattn.sparse_attention` after
validation, broadcasting and dtype promotion.  It allocates the output, the
per-row log-sum-exp and, when the pattern has long rows, their chunk partials
(a few rows times ``n / chunk``); nothing proportional to ``nnz * heads``.

The kernels are serial ``nogil`` Numba functions; this module runs disjoint
work ranges of them on a small pool of Python threads (one per Numba thread,
``numba.get_num_threads()``), each thread taking the next cost-balanced range
as it finishes the last, so a thread delayed by other processes does not hold
the others up.  Span products run on the micro-kernels of
:mod:`sparseattn.kernels.simd`; the rest (other ``d_v``, shared-column gathers,
long rows) calls BLAS (``np.dot`` on tiles), so BLAS is capped
at one thread for the duration of the call (through ``threadpoolctl`` when it
is installed).
"""

from __future__ import annotations

import numpy as np

from . import fused_lines
from .threads import PARALLEL_MIN_FLOP as _PARALLEL_MIN_FLOP
from .threads import WORK_SPLIT as _WORK_SPLIT
from .threads import blas_single_thread, run_ranges
from .plan import get_plan

__all__ = ["fused_attention"]

#: the most bytes of one thread's K^T panel cache (see :func:`panel_buffers`)
PANEL_CACHE_BYTES = 16 * 2**20


def panel_buffers(n_k, d, dv, dtype, chunk, span=0):
    """One thread's K^T panel cache for the micro-kernel span path: ``(kp, packed)``.

    ``kp`` holds ``n_slots`` panels of ``d x 2L`` keys (L lanes of the
    micro-kernels' vector, :data:`sparseattn.kernels.VECTOR_BYTES`): enough for a tile's whole
    ``span`` of keys and one chunk more, at least two chunks and at most
    :data:`PANEL_CACHE_BYTES`.  Slots are direct-mapped (panel ``p`` in slot ``p % n_slots``), so
    a tile never evicts its own panels, the next tile of a band packs only the keys it adds, and
    the tiles of a causal or full pattern pack each panel once per slice instead of once per tile
    (their spans run to the end of the sequence: with two chunks' worth the packing cost about a
    quarter of the products at d 64).  ``packed[slot]`` tags the slice and panel a slot holds
    (-1: none).  Empty arrays select the BLAS path, used when ``dv`` is not a multiple of 2L.
    """
    from ..kernels.simd import block_width

    width = block_width(dtype)  # 2L
    if dv % width:
        return np.empty(0, dtype=dtype), np.empty(0, dtype=np.int64)
    n_slots = 2 * (chunk // width + 2)
    if span:
        cap = max(n_slots, PANEL_CACHE_BYTES // (d * width * np.dtype(dtype).itemsize))
        n_slots = min(max(n_slots, -(-span // width) + chunk // width + 2), cap)
    n_slots = min(-(-n_k // width), n_slots)
    return np.empty(n_slots * d * width, dtype=dtype), np.full(n_slots, -1, dtype=np.int64)


def _split_items(plan, n_slices, n_workers):
    """Boundaries of ``n_workers`` runs of (slice, tile) items with about equal cost."""
    n_tiles = plan.n_tiles
    n_items = n_slices * n_tiles
    n_workers = max(1, min(n_workers, n_items))
    prefix = plan.cost_prefix
    total = int(prefix[-1])
    targets = np.arange(n_workers + 1, dtype=np.float64) * (n_slices * total / n_workers)
    si = np.minimum(np.floor(targets / total).astype(np.int64), n_slices)
    rem = targets - si * total
    t = np.searchsorted(prefix, rem, side="left")
    bounds = np.minimum(si * n_tiles + np.minimum(t, n_tiles), n_items).astype(np.int64)
    bounds[0], bounds[-1] = 0, n_items
    return np.maximum.accumulate(bounds)


def _kernels(mods):
    """The modifiers (none: ``NONE``) and the tile and long-row kernels that apply them."""
    from ..kernels.forward import long_rows_partial, tiles_forward
    from .modifiers import NONE

    mods = NONE if mods is None else mods
    if mods.score_mod is None:
        return mods, tiles_forward, long_rows_partial
    spec = mods.score_mod.kernels("forward")
    return mods, spec["tiles_forward"], spec["long_rows_partial"]


def fused_attention(q, k, v, patterns, slice_pattern, scale, key_valid, slice_batch, *, parallel=None, skip=None,
                    maps=None, mods=None, flags=None):  # fmt: skip
    """Fused sparse attention forward over flattened slices.

    Parameters
    ----------
    q, k, v : ndarray, shapes (S, n_q, d), (S, n_k, d), (S, n_k, dv)
        C-contiguous, one float dtype (float32 or float64); not modified.
        The kernels run with fast-math: a slice with a NaN or an infinity
        that some allowed pair reads gets results that need not follow the
        non-finite policy, and is flagged in ``flags``.
    patterns : list of Pattern
        The distinct patterns, each of shape ``(n_q, n_k)``.
    slice_pattern : int64 ndarray, shape (S,)
        Index into ``patterns`` for every slice.
    scale : float
        Multiplies the scores.
    key_valid : bool ndarray, shape (NB, n_k), or None
        True where a key is usable; padded keys are removed from every row.
    slice_batch : int64 ndarray, shape (S,), or None
        Row of ``key_valid`` used by each slice.
    parallel : bool, optional
        ``None`` (default): run on ``numba.get_num_threads()`` threads when the work is large
        enough.  ``False``: only in the calling thread (for callers that bring their own threads, e.g. Dask workers).
    maps : (qmap, kmap, vmap), optional
        int64 arrays (S,): slice ``s`` reads ``q[qmap[s]]``, ``k[kmap[s]]``, ``v[vmap[s]]`` (an input
        broadcast over slices is stored once).  Default: slice ``s`` reads row block ``s`` of each.
    skip : bool ndarray, shape (S,), optional
        Slices to leave out: their rows of ``out`` and ``lse`` are left uninitialised for the caller to
        fill (``sparse_attention`` computes slices with non-finite inputs on the staged kernels).
    flags : uint8 ndarray, shape (S,), optional
        Set to 1 for each slice whose raw scores (over its allowed pairs) or outputs hold a NaN or an
        infinity (its q, k or v does, or a score or output overflowed): the caller recomputes those
        (``sparse_attention`` scans them and runs the ones with non-finite inputs on the staged kernels).

    Returns
    -------
    out : ndarray, shape (S, n_q, dv), dtype of q
        Rows with no allowed key are 0.
    lse : ndarray, shape (S, n_q), dtype of q
        Log-sum-exp of the scaled scores over each row's allowed keys (-inf when empty).

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> from sparseattn.engine.fused_forward import fused_attention
    >>> from sparseattn.reference import dense_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 40, 8))
    >>> p = sa.longformer(40, attention_window=6, global_indices=[3])
    >>> out, lse = fused_attention(q, k, v, [p], np.zeros(2, np.int64), 0.35, None, None)
    >>> bool(np.allclose(out, dense_attention(q, k, v, p, scale=0.35), rtol=1e-11, atol=1e-12))
    True
    """
    from numba import get_num_threads

    mods, tiles_forward, long_rows_partial = _kernels(mods)
    slice_pattern = np.asarray(slice_pattern, dtype=np.int64)
    S = len(slice_pattern)
    n_q, d = q.shape[1:]
    dv = v.shape[2]
    if maps is None:
        maps = (np.arange(S, dtype=np.int64),) * 3
    qmap, kmap, vmap = (np.ascontiguousarray(m, dtype=np.int64) for m in maps)
    dt = q.dtype
    out = np.empty((S, n_q, dv), dtype=dt)
    lse = np.empty((S, n_q), dtype=dt)
    if flags is None:
        flags = np.zeros(S, dtype=np.uint8)
    if S == 0 or n_q == 0:
        return out, lse
    use_valid = key_valid is not None
    kv = np.ascontiguousarray(key_valid, dtype=bool) if use_valid else np.ones((1, 1), dtype=bool)
    sb = np.asarray(slice_batch, dtype=np.int64) if use_valid else np.zeros(S, dtype=np.int64)
    sc = dt.type(scale)
    mod, slopes = mods.kernel_args(dt)
    n_threads = 1 if parallel is False else get_num_threads()
    with blas_single_thread():
        for p_idx, pattern in enumerate(patterns):
            mine = slice_pattern == p_idx
            if skip is not None:
                mine &= ~np.asarray(skip, dtype=bool)
            slices = np.flatnonzero(mine).astype(np.int64)
            if len(slices) == 0:
                continue
            plan = get_plan(pattern)
            if fused_lines.applies(plan, k, v, use_valid, mod, mods):
                fused_lines.run(plan, q, k, v, qmap, kmap, vmap, slices, sc, out, lse, flags, n_threads)
                continue
            # small problems run in this thread: handing work to the pool costs more than it saves
            par = n_threads > 1 and len(slices) * int(plan.cost_prefix[-1]) * (d + dv) >= _PARALLEL_MIN_FLOP
            bounds = _split_items(plan, len(slices), _WORK_SPLIT * n_threads if par else 1)
            run_ranges(
                tiles_forward,
                (q, k, v, qmap, kmap, vmap, slices, plan.tile_rows, plan.chunk, plan.tile_k0, plan.tile_k1,
                 plan.row_lo, plan.row_hi, plan.xs_ptr, plan.xs_k0, plan.xs_k1, plan.xs_lo, plan.xs_hi,
                 plan.sh_ptr, plan.sh_cols, plan.sh_mask,
                 plan.rs_ptr, plan.rs_lo, plan.rs_hi, sc, kv, sb, use_valid, mod, slopes),
                (out, lse, flags),
                bounds.tolist(),
                n_threads if par else 1,
                per_thread=lambda: panel_buffers(k.shape[1], d, dv, dt, plan.chunk, plan.max_span), flush_denormals=True,
            )  # fmt: skip
            if len(plan.it_grp):
                _long_rows(long_rows_partial, plan, q, k, v, (qmap, kmap, vmap), slices, sc, (kv, sb, use_valid),
                           (mod, slopes), out, lse, flags, n_threads)  # fmt: skip
    return out, lse


def _long_rows(long_rows_partial, plan, q, k, v, maps, slices, sc, valid, mods, out, lse, flags, n_threads):
    """The plan's long rows for ``slices``: chunk partials on the threads, then merged into ``out`` and ``lse``."""
    from ..kernels.forward import long_rows_merge

    dt = q.dtype
    d, dv = q.shape[2], v.shape[2]
    ns, npr = len(slices), plan.n_part_rows
    part_m = np.empty((ns, npr), dtype=dt)
    part_l = np.empty((ns, npr), dtype=dt)
    part_o = np.empty((ns, npr, dv), dtype=dt)
    n_jobs = ns * len(plan.it_grp)
    par = n_threads > 1 and ns * npr * plan.chunk * (d + dv) >= _PARALLEL_MIN_FLOP
    n_ranges = min(n_jobs, _WORK_SPLIT * n_threads) if par else 1
    run_ranges(
        long_rows_partial,
        (q, k, v, *maps, slices, plan.long_rows, plan.grp_ptr, plan.it_grp, plan.it_a, plan.it_b,
         plan.it_off, sc, *valid, *mods, part_m, part_l, part_o, flags),
        (),
        [i * n_jobs // n_ranges for i in range(n_ranges + 1)],
        n_threads if par else 1, flush_denormals=True,
    )  # fmt: skip
    long_rows_merge(
        slices, plan.long_rows, plan.grp_ptr, plan.grp_it_ptr, plan.it_off, part_m, part_l, part_o, out, lse, flags,
    )  # fmt: skip
