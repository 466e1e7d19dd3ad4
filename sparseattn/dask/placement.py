"""Where the tasks run: the graph's layer, restricted to workers for ``pin=True`` or ``shards=``.

Every task of the graph has a home block, the input block it reads most of
(``home``: task key -> input block key, from :mod:`sparseattn.dask.graph`).
``pin=True`` restricts a task to the workers holding its home block now;
``shards=`` to the worker that :class:`~sparseattn.dask.shards.ContiguousShards`
gives the home block's index.  Imports Dask only when called.
"""

from __future__ import annotations


def placed_graph(name, dsk, home, inputs, pin, shards):
    """The ``HighLevelGraph`` of the output ``name``: the layer ``dsk``, placed as ``pin`` and ``shards`` ask.

    ``inputs``: the laid-out inputs (:class:`~sparseattn.dask.inputs.Inputs`),
    the layer's dependencies.
    """
    from dask.highlevelgraph import HighLevelGraph

    q, k, v, mask, k_chunks = inputs.q, inputs.k, inputs.v, inputs.mask, inputs.k_chunks
    deps = [x for x in (q, k, v, mask) if x is not None]
    if pin:
        return HighLevelGraph.from_collections(name, _pinned(dsk, home, deps), dependencies=deps)
    if shards is not None:
        seq = {q.name: (q.chunks[-2], -2), k.name: (k_chunks, -2), v.name: (k_chunks, -2)}
        if mask is not None:
            seq[mask.name] = (k_chunks, -1)
        layer = _sharded(dsk, home, shards, seq)
        return HighLevelGraph.from_collections(name, layer, dependencies=deps)
    return HighLevelGraph.from_collections(name, dsk, dependencies=deps)


def _future_of(key, inputs):
    """The future holding an input block (persisted arrays keep one per block in their graph), or None."""
    for arr in inputs:
        if key[0] == arr.name:
            value = arr.__dask_graph__().get(key)
            value = getattr(value, "value", value)  # a graph node wrapping the future
            return value if type(value).__name__ == "Future" else None
    return None


def _pinned(dsk, home, inputs):
    """A layer whose tasks are restricted to the workers holding their home input blocks."""
    from dask.highlevelgraph import MaterializedLayer

    try:
        from distributed import get_client
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pin=True needs distributed") from exc
    try:
        client = get_client()
    except ValueError:
        raise ValueError("pin=True needs a distributed Client (none is active)") from None
    blocks = sorted(set(home.values()), key=str)
    futures = {key: _future_of(key, inputs) for key in blocks}
    who = client.who_has([f for f in futures.values() if f is not None])
    where = {}
    for key in blocks:
        f = futures[key]
        addrs = who.get(f.key) if f is not None else None
        if not addrs:
            raise ValueError(
                f"pin=True needs q and k held in the workers' memory (q, k = client.persist([q, k]) and wait), "
                f"but block {key} is not"
            )
        where[key] = list(addrs)
    workers = {task: where[src] for task, src in home.items()}
    return MaterializedLayer(
        dsk, annotations={"workers": workers.get, "allow_other_workers": lambda key: key not in workers}
    )


def _sharded(dsk, home, shards, seq):
    """A layer whose tasks are restricted to the shard of their home input blocks (``seq``: name -> chunks, index)."""
    from dask.highlevelgraph import MaterializedLayer

    places = {name: shards.annotation(chunks, index) for name, (chunks, index) in seq.items()}
    workers = {task: places[src[0]](src) for task, src in home.items()}
    return MaterializedLayer(dsk, annotations={"workers": workers.get})
