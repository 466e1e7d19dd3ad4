"""The public function, :func:`sparse_attention`: check, plan, build the graph, place it.

Each step has its module: :mod:`~sparseattn.dask.inputs` (arguments and
layout), :mod:`~sparseattn.dask.plans` (the work list of every query block),
:mod:`~sparseattn.dask.graph` (the tasks), :mod:`~sparseattn.dask.placement`
(where they run).
"""

from __future__ import annotations

from .graph import build_graph
from .inputs import import_dask, prepare_inputs
from .placement import placed_graph
from .plans import block_bounds, plan_patterns

__all__ = ["sparse_attention"]


def sparse_attention(q, k, v, pattern, *, scale=None, softcap=None, alibi_slopes=None, sinks=None, score_mod=None,
                     key_padding_mask=None, serial=True, pin=False, shards=None):  # fmt: skip
    """:func:`sparseattn.sparse_attention` on Dask arrays: a lazy result chunked like ``q``.

    Parameters
    ----------
    q : dask array, shape (..., n_q, d)
    k : dask array, shape (..., n_k, d)
    v : dask array, shape (..., n_k, d_v)
        Floating-point; chunked along the sequence axis and any leading
        (batch, heads) axes, with any chunk sizes (uneven, different for q
        and k, smaller than the window).  NumPy arrays are accepted next to
        Dask ones and wrapped, chunked along the sequence like a Dask input
        of the same length (else one chunk); at least one must be a Dask
        array.  The head dimension is rechunked to one chunk; ``v`` is
        rechunked to ``k``'s sequence chunks when they differ, and ``k`` and
        ``v`` to ``q``'s chunks on the leading axes.  Grouped-query heads
        (``k``, ``v`` with ``h_kv`` heads, ``q`` with ``h_q = g * h_kv``;
        multi-query too): ``k`` and ``v`` keep their ``h_kv`` heads (never
        copied per query head), chunked to match ``q``'s head chunks; a
        chunk of query heads must lie inside one group or start and end on
        group boundaries, else ``q``'s heads axis is rechunked to whole
        groups (the output is rechunked back).
    pattern : Pattern, scipy sparse matrix/array, 2-D bool ndarray, or a sequence of them
        As for :func:`sparseattn.sparse_attention` (a sequence: one per head,
        axis -3).
    scale : float, optional
        Multiplies the scores; defaults to ``1 / sqrt(d)``.
    softcap, alibi_slopes, sinks : optional
        As for the local engine (same checks and messages; slopes and sinks
        ``(h_q,)`` or broadcasting to the leading shape, heads last).  ALiBi
        is applied at the positions of the whole attention: each task passes
        the diagonal of its rows and keys to the engine (the generic path
        then reads key slices, never gathers, and runs one engine call per
        run of contiguous keys; split rows one call per row).  Sinks are
        added once per row after its partials are merged.
    score_mod : ScoreMod, optional
        As for the local engine: ``f(s, b, h, i, j)`` sees the positions of
        the whole call (each task passes its own, as for ALiBi).  Compiled
        here first, so a function Numba cannot compile raises on the client;
        then once per worker process and dtype, on its first task that uses
        it (docs/dask.md says what that costs).
    key_padding_mask : bool NumPy or dask array, optional
        True marks a padded key; broadcasts like the local engine's (the
        leading shape without the heads axis, then ``n_k``).
    serial : bool
        True (default): every task runs the engine's kernels in its own worker
        thread (Dask supplies the parallelism; use as many threads per
        worker as cores).  False: every task uses the engine's thread pool
        (``numba.get_num_threads()`` threads), for workers started with
        ``threads_per_worker=1`` on machines with more cores than workers.
    pin : bool
        False (default): the scheduler places tasks; to balance load it may
        move whole input chunks between workers.  True: every task is
        restricted to the worker holding the block it reads most of (its
        query block, or the key block it slices or splits rows over), so
        only halos, global keys and split-row partials cross between
        workers.  Needs a ``distributed`` client and ``q`` and ``k`` whose
        blocks are in the workers' memory (``client.persist``).
    shards : ContiguousShards, optional
        Places every task with its home block (as ``pin=True`` does) by the
        block's index instead of by where it is held: a task reading query
        block ``i`` runs on ``shards.worker(q.chunks[-2], i)``, one reading
        key block ``j`` on ``shards.worker(k.chunks[-2], j)``.  The inputs
        need not exist yet: generate or load them under
        ``dask.annotate(workers=shards.annotation(chunks))`` with the same
        shards, and each worker sweeps its own contiguous range of blocks,
        holding about two blocks of each input at a time.  Cannot be
        combined with ``pin=True``.  The restrictions are strict (a task
        waits for its worker), and the synchronous and threaded schedulers
        ignore them.

    Returns
    -------
    dask array, shape (..., n_q, d_v)
        Chunked like ``q`` on every axis but the last (one chunk);
        dtype ``np.result_type(q, k, v)``.

    Examples
    --------
    Inputs generated on contiguous shards, and the attention placed with
    them (on a cluster, ``ContiguousShards(client)``; compute with
    ``dask.config.set({"optimization.fuse.active": False})`` or
    ``client.compute(..., optimize_graph=False)``: Dask's low-level fusion
    drops worker annotations):

    >>> import dask, numpy as np, dask.array as da, sparseattn as sa
    >>> from sparseattn.dask import ContiguousShards, sparse_attention
    >>> shards = ContiguousShards(["tcp://10.0.0.1:4000", "tcp://10.0.0.2:4000"])
    >>> chunks = ((1,), (250,) * 4, (16,))
    >>> with dask.annotate(workers=shards.annotation(chunks[1])):
    ...     q, k, v = (da.random.default_rng(i).standard_normal((1, 1000, 16), chunks=chunks) for i in range(3))
    >>> p = sa.sliding_window(1000, 32) | sa.global_tokens(1000, [0])
    >>> out = sparse_attention(q, k, v, p, shards=shards)
    >>> layer = out.__dask_graph__().layers[out.name]
    >>> layer.annotations["workers"]((out.name, 0, 3, 0))  # output block 3 runs on the second worker
    ['tcp://10.0.0.2:4000']
    >>> ref = sa.sparse_attention(*dask.compute(q, k, v, scheduler="synchronous"), p)
    >>> bool(np.allclose(out.compute(scheduler="synchronous"), ref, rtol=1e-11, atol=1e-12))
    True
    """
    da = import_dask()
    from dask.base import tokenize

    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, score_mod=score_mod)
    x = prepare_inputs(q, k, v, pattern, scale, key_padding_mask, serial, pin, shards, da, mods)
    # -- work lists, one per distinct pattern ----------------------------------------------
    qb, kb = block_bounds(x.q.chunks[-2]), block_bounds(x.k_chunks)
    plans = plan_patterns(x.patterns, x.n_k, kb, contiguous=x.slopes is not None or x.scale.score_mod is not None)

    token = tokenize(x.q.name, x.k.name, x.v.name, None if x.mask is None else x.mask.name,
                     [p.identity for p in x.patterns], x.scale, x.serial, x.per_head, pin, shards,
                     x.kv_heads, x.slopes, x.sinks)  # fmt: skip
    name = f"sparse-attention-{token}"
    dsk, home = build_graph(name, x, plans, qb, kb, shards)
    graph = placed_graph(name, dsk, home, x, pin, shards)
    out = da.Array(graph, name, x.lead_chunks + (x.q.chunks[-2], (x.dv,)), dtype=x.out_dtype)
    if out.chunks[:-1] != x.q_user_chunks[:-1]:
        out = out.rechunk(x.q_user_chunks[:-1] + ((x.dv,),))
    return out
