"""``sparseattn dask-demo``: a million-token band + global attention on a LocalCluster of processes.

Generates q, k and v chunk by chunk on the workers (one task makes the three
blocks of a chunk, so they live together), runs
:func:`sparseattn.dask.sparse_attention` on a ``distributed.LocalCluster`` of
worker processes (or on an existing scheduler with ``--scheduler``), gathers
the output, and prints

* the wall time of the Dask computation (attention + gathering the output)
  and of the local engine on the same arrays, and their ratio;
* the bytes moved between workers during the attention, read from the
  workers' transfer logs (``Worker.transfer_incoming_log``), per block
  boundary, by kind of task (halo slices, global keys, split rows), against
  the target ``3 * (radius + globals) * d * itemsize * 2``;
* the largest difference from the local engine on a sample of rows (the
  global rows, rows at every block boundary, random rows).

Run ``python -m sparseattn.dask.demo --help`` or ``sparseattn dask-demo --help``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

__all__ = ["main"]


def _parser():
    p = argparse.ArgumentParser(
        prog="sparseattn dask-demo",
        description="Band + global sparse attention on Dask worker processes: time, transfer per block boundary, check.",
        allow_abbrev=False,
    )
    p.add_argument("--n", type=int, default=1048576, help="tokens (default: 1048576)")
    p.add_argument("--radius", type=int, default=256, help="window radius per side (default: 256)")
    p.add_argument("--globals", type=int, default=1, help="global tokens, the first ones (default: 1)")
    p.add_argument("--d", type=int, default=64, help="head dimension (default: 64)")
    p.add_argument("--chunk", type=int, default=65536, help="tokens per chunk (default: 65536)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (default: 1)")
    p.add_argument("--engine-threads", action="store_true", help="serial=False: each task uses the engine's thread pool")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="(default: float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default: 0)")
    p.add_argument("--check-rows", type=int, default=2048, help="random rows compared with the local engine (default: 2048)")
    p.add_argument("--no-local", action="store_true", help="skip the local engine's timing (still checks the sample)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="use a running scheduler instead of a LocalCluster")
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place the tasks (pin=False): it may move whole chunks to balance load",
    )
    p.add_argument(
        "--shards",
        action="store_true",
        help="contiguous shards: chunk j generated on the worker owning block j (sparseattn.dask.ContiguousShards) "
        "and the attention placed with them (shards=...), instead of round robin + pin=True",
    )
    p.add_argument(
        "--stealing",
        action="store_true",
        help="keep the scheduler's work stealing on (LocalCluster; off by default: it moves whole chunks to balance load)",
    )
    return p


def _make_chunk(seed, lo, hi, d, dtype):
    """q, k and v rows ``[lo, hi)``, stacked: a block of shape (3, hi - lo, d)."""
    rng = np.random.default_rng([seed, lo])
    return rng.standard_normal((3, hi - lo, d), dtype=np.float64).astype(dtype)


def _inputs(client, da, n, c, d, dtype, seed, shards=None):
    """q, k, v as dask arrays whose chunk ``j`` is generated on worker ``j % workers`` (round robin).

    The three blocks of a chunk live together, and neighbouring chunks live on
    different workers, so every block boundary is crossed by its halo: the
    worst case for traffic.  With ``shards`` (a ``ContiguousShards``), chunk
    ``j`` is generated on the worker owning block ``j`` instead.  Returns the
    arrays and the worker of each chunk.
    """
    import operator

    from distributed import wait

    workers = sorted(client.scheduler_info()["workers"])
    bounds = list(range(0, n, c)) + [n]
    if shards is not None:
        sizes = tuple(np.diff(bounds).tolist())
        where = [shards.worker(sizes, j) for j in range(len(bounds) - 1)]
    else:
        where = [workers[j % len(workers)] for j in range(len(bounds) - 1)]
    blocks = [
        client.submit(_make_chunk, seed, lo, hi, d, dtype, workers=[w], pure=False)
        for lo, hi, w in zip(bounds[:-1], bounds[1:], where)
    ]
    chunks = (tuple(np.diff(bounds).tolist()), (d,))
    arrays = []
    for i, label in enumerate("qkv"):
        name = f"demo-{label}-{seed}-{n}-{c}"
        # the block's own key, computed on the worker holding the chunk: like a persisted array
        parts = [
            client.submit(operator.getitem, b, i, key=(name, j, 0), workers=[w], pure=False)
            for j, (b, w) in enumerate(zip(blocks, where))
        ]
        wait(parts)
        arrays.append(da.Array({(name, j, 0): f for j, f in enumerate(parts)}, name, chunks, dtype=dtype))
    return arrays, where


def _kind(key):
    name = key[0] if isinstance(key, tuple) else str(key)
    for tag in ("-slice-", "-global", "-split", "-qrows", "-merge"):
        if tag in name:
            return tag.strip("-")
    return "other"


def _transfers(client):
    """Bytes received by every worker since the logs were cleared, by kind of task."""

    def read(dask_worker):
        return [(k, int(nb)) for entry in dask_worker.transfer_incoming_log for k, nb in entry["keys"].items()]

    by_kind = defaultdict(int)
    for entries in client.run(read).values():
        for key, nbytes in entries:
            by_kind[_kind(key)] += nbytes
    return dict(by_kind)


def _clear_logs(client):
    def clear(dask_worker):
        dask_worker.transfer_incoming_log.clear()
        dask_worker.transfer_outgoing_log.clear()

    client.run(clear)


def _warm_up(radius, d, dtype):
    from ..engine.attention import sparse_attention
    from ..patterns import global_tokens, sliding_window

    x = np.ones((2 * radius + 64, d), dtype=dtype)
    sparse_attention(x, x, x, sliding_window(len(x), radius) | global_tokens(len(x), [0]))


def gather(client, x):
    """Compute ``x`` on the cluster and fetch its blocks straight into this process, each as it completes.

    ``client.persist`` keeps the graph's layers and their annotations (worker
    restrictions of ``pin=True`` and ``shards=``); ``to_delayed`` would merge
    them into one layer without annotations, and ``client.compute(x)`` would
    concatenate the blocks on a worker first.  A block is fetched as soon as
    it is done, so the transfers overlap the blocks still computing, and it
    is copied into the result at once (no list of blocks, no concatenation).
    """
    from distributed import as_completed, futures_of

    held = client.persist(x, optimize_graph=False)
    futures = futures_of(held)
    starts = [np.concatenate(([0], np.cumsum(c))) for c in x.chunks]
    out = np.empty(x.shape, dtype=x.dtype)
    # as_completed(..., with_results=True) can wait forever (dask/distributed#7331; seen here once in a
    # test run): take each finished future's result instead
    for future in as_completed(futures):
        idx = future.key[1:]
        out[tuple(slice(st[i], st[i + 1]) for st, i in zip(starts, idx))] = future.result()
    del held, futures
    return out


def main(argv=None):
    """Run the demo; returns 0 when the row sample matches the local engine, 1 otherwise."""
    args = _parser().parse_args(argv)
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    from ..engine.attention import sparse_attention
    from ..patterns import global_tokens, sliding_window
    from .api import sparse_attention as dask_attention
    from .shards import ContiguousShards

    n, r, g, d, c = args.n, args.radius, args.globals, args.d, args.chunk
    dtype = np.dtype(args.dtype)
    pattern = sliding_window(n, r) | global_tokens(n, range(g)) if g else sliding_window(n, r)
    tol = 2e-5 if dtype == np.float32 else 1e-11
    cluster = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        dask.config.set({"distributed.scheduler.work-stealing": bool(args.stealing)})
        cluster = LocalCluster(
            n_workers=args.workers, threads_per_worker=args.threads, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        n_chunks = -(-n // c)
        shards = ContiguousShards(client) if args.shards else None
        pin = not args.no_pin and shards is None
        (q, k, v), where = _inputs(client, da, n, c, d, dtype, args.seed, shards)
        wait([q, k, v])
        placement = "shards (contiguous)" if shards is not None else f"round robin, pin={pin}"
        print(f"n={n} radius={r} globals={g} d={d} {dtype} chunk={c} ({n_chunks} chunks), "
              f"{len(client.scheduler_info()['workers'])} workers x {args.threads} thread(s), "
              f"serial={not args.engine_threads}, {placement}, work stealing {'on' if args.stealing or args.scheduler else 'off'}")  # fmt: skip

        t0 = time.perf_counter()
        out_lazy = dask_attention(q, k, v, pattern, serial=not args.engine_threads, pin=pin, shards=shards)
        t_build = time.perf_counter() - t0
        # load (or compile) the kernels in every worker first, outside the timing
        client.run(_warm_up, r, d, dtype)
        _clear_logs(client)
        # ... then the whole computation, output gathered into this process
        t0 = time.perf_counter()
        out = gather(client, out_lazy)
        t_dask = time.perf_counter() - t0
        moved = _transfers(client)
        print(f"graph build {t_build * 1e3:.1f} ms; dask (attention + gather) {t_dask:.2f} s")

        boundaries = max(sum(a != b for a, b in zip(where[:-1], where[1:])), 1)
        target = 3 * (r + g) * d * dtype.itemsize * 2
        total = sum(moved.values())
        print(f"bytes moved between workers: {total} in total, {total / boundaries:.0f} per block boundary "
              f"between workers (target <= {target}: 3 * (radius + globals) * d * itemsize * 2)")  # fmt: skip
        for kind, nbytes in sorted(moved.items()):
            print(f"  {kind:>7}: {nbytes} ({nbytes / boundaries:.0f} per boundary)")

        qa, ka, va = client.compute([q, k, v], sync=True)
        rng = np.random.default_rng(args.seed + 1)
        edges = np.arange(1, n_chunks) * c
        rows = np.unique(np.concatenate([np.arange(g), edges - 1, edges, rng.integers(0, n, args.check_rows)]))
        rows = rows[(rows >= 0) & (rows < n)]
        if args.no_local:
            local_rows = _local_rows(qa, ka, va, pattern, rows)
        else:
            sparse_attention(qa[:4096], ka[:4096], va[:4096], sliding_window(4096, r))  # compile/load
            t0 = time.perf_counter()
            local = sparse_attention(qa, ka, va, pattern)
            t_local = time.perf_counter() - t0
            local_rows = local[rows]
            print(f"local engine {t_local:.2f} s on this process; dask / local = {t_dask / t_local:.2f}")
        err = float(np.max(np.abs(out[rows].astype(np.float64) - local_rows)))
        scale = max(1.0, float(np.max(np.abs(local_rows))))
        ok = err <= tol * scale
        print(f"{len(rows)} sampled rows vs the local engine: max abs difference {err:.3g} "
              f"({'OK' if ok else 'MISMATCH'}, tolerance {tol * scale:.3g})")  # fmt: skip
        return 0 if ok else 1
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _local_rows(q, k, v, pattern, rows):
    """The local engine on the sampled rows only (their CSR rows over all keys)."""
    import scipy.sparse as sp

    from ..engine.attention import sparse_attention
    from ..patterns import from_sparse

    sub = sp.vstack([pattern.rows(int(i), int(i) + 1) for i in rows]).tocsr()
    return sparse_attention(q[rows], k, v, from_sparse(sub))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
