"""Issue 9: sparseattn on Dask worker processes against the local engine, on the same arrays.

Workload: 1 head, d 64, float32, radius 256, one global token (index 0). q, k and v are generated
chunk by chunk on a ``distributed.LocalCluster`` of 2 worker processes (1 thread each, work
stealing off, see docs/dask.md) and kept there; the local engine runs on the same values gathered
into this process. Each round times, alternately, the local engine and the Dask computation with
the output gathered into this process (``benchlib.bench_paired``; target: dask / local <= 3).
Both outputs are checked against the float64 oracle first.

``test_dask_4m`` (full mode only) runs n = 4,194,304 through Dask with the inputs generated inside
the graph on contiguous shards (``sparseattn.dask.ContiguousShards``: worker i owns a contiguous range
of blocks, and the attention tasks are placed with them) and a reduction of the output per block (sum
of squares), so the full output never sits in one process; it records, per worker, the exact peak of
input blocks held (the target: <= 2.5 chunks per input), the peak of all task results held
(``sparseattn.dask.probe``) and the peak resident set above the warmed-up runtime, in bytes and in
input chunks.

    pytest benchmarks/test_dask.py --benchmark-json=DASK.json
    pytest benchmarks/test_dask.py --quick --benchmark-disable     # smoke test
"""

import numpy as np
import pytest

import benchlib

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from sparseattn.dask.demo import gather as _gather  # noqa: E402  (blocks fetched without a concatenation on a worker)

RADIUS, GLOBALS, D = 256, 1, 64
NS = benchlib.sizes([65536, 262144, 1048576], [8192])
CHUNK = 65536


@pytest.fixture(scope="module")
def client():
    import dask

    with dask.config.set({"distributed.scheduler.work-stealing": False}):
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        ) as cluster, distributed.Client(cluster) as c:
            yield c


def _chunk_seed(seed, j, after=None):
    """The seed of chunk j (``after``: the previous chunk's seed, an ordering dependency only)."""
    return np.random.SeedSequence([seed, j])


def _make_chunk(chunk_seed, which, rows, d):
    rng = np.random.default_rng(chunk_seed.spawn(3)[which])
    return rng.standard_normal((1, rows, d), dtype=np.float32)


def _inputs(n, chunk, seed=0, shards=None):
    """q, k, v generated chunk by chunk, each block by its own task, from one small seed task per chunk.

    The three blocks of chunk j hang off the same seed task, so the scheduler
    makes them on one worker, as projections of the same hidden states would
    be (root tasks of three separate arrays are spread over the workers); and
    they are three arrays, not views of one stacked block, which would keep
    all three alive as long as any one of them is needed.

    ``shards`` (a ``sparseattn.dask.ContiguousShards``): chunk j (its seed and
    its q, k and v blocks) is made on the worker owning block j, and each
    seed task also waits for the previous chunk's seed in the same shard (the
    values do not change), so each worker generates its shard in block order,
    as a sequential reader of its shard would.  With independent seeds, the scheduler sends a
    worker all its restricted root tasks at once, and the worker starts the
    first one to arrive, in no particular order: a block generated at the
    start and held until its turn (measured: one more block of one input).
    """
    import contextlib

    import dask
    from dask.base import tokenize

    bounds = list(range(0, n, chunk)) + [n]
    token = tokenize(n, chunk, seed, D)
    seeds = f"bench-seed-{token}"
    chunks = ((1,), tuple(np.diff(bounds).tolist()), (D,))
    graph = {}
    for j in range(len(bounds) - 1):
        chained = shards is not None and j and shards.worker(chunks[1], j - 1) == shards.worker(chunks[1], j)
        graph[(seeds, j)] = (_chunk_seed, seed, j) + (((seeds, j - 1),) if chained else ())
    arrays = []
    place = contextlib.nullcontext()
    if shards is not None:
        blocks, seed_blocks = shards.annotation(chunks[1]), shards.annotation(chunks[1], index=-1)
        place = dask.annotate(workers=lambda key: blocks(key) or (seed_blocks(key) if len(key) == 2 else None))
    with place:
        for which, x in enumerate("qkv"):
            name = f"bench-{x}-{token}"
            layer = {(name, 0, j, 0): (_make_chunk, (seeds, j), which, hi - lo, D)
                     for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))}  # fmt: skip
            arrays.append(da.Array({**graph, **layer}, name, chunks, dtype=np.float32))
    return tuple(arrays)


def _paired_vs_local(benchmark, client, n, shards=None):
    """Dask (2 worker processes) against the local engine on the same arrays, alternating; ``shards``: placed."""
    import sparseattn as sa
    from sparseattn.dask import sparse_attention as dask_attention

    chunk = min(CHUNK, max(n // 4, 1024))
    if shards is None:
        q, k, v = client.persist(list(_inputs(n, chunk)))
    else:
        q, k, v = client.persist(list(_inputs(n, chunk, shards=shards)), optimize_graph=False)  # keeps the placement
    distributed.wait([q, k, v])
    qa, ka, va = (_gather(client, x) for x in (q, k, v))
    pattern = benchlib.band_global_pattern(n, RADIUS, GLOBALS)
    lazy = dask_attention(q, k, v, pattern, shards=shards)

    def local():
        return sa.sparse_attention(qa, ka, va, pattern)

    def on_dask():
        return _gather(client, lazy)

    def check(out):
        return benchlib.assert_matches(out, qa, ka, va, n, RADIUS, GLOBALS, "sparseattn")

    info = dict(n=n, radius=RADIUS, globals=GLOBALS, heads=1, d=D, dtype="float32", chunk=chunk, workers=2)
    name, label = "dask 2 processes", f"1 head r256 g1 float32 n={n}, dask / local"
    if shards is not None:
        info["placement"] = "ContiguousShards"
        name, label = name + ", contiguous shards", label.replace("dask /", "dask (contiguous shards) /")
    benchlib.bench_paired(
        benchmark, ("local engine", local, info, check), (name, on_dask, info, check), label=label, target="<= 3"
    )


@pytest.mark.parametrize("n", NS)
def test_dask_vs_local(benchmark, client, n):
    _paired_vs_local(benchmark, client, n)


@pytest.mark.parametrize("n", NS[-1:])
def test_dask_sharded_vs_local(benchmark, client, n):
    """As test_dask_vs_local at the largest n, with the inputs made on contiguous shards and the tasks placed with them."""
    from sparseattn.dask import ContiguousShards

    _paired_vs_local(benchmark, client, n, shards=ContiguousShards(client))


def _sumsq(x, rows=4096):
    """Sum of squares in float64, a few rows at a time (no float64 copy of the whole block)."""
    x = x.reshape(-1, x.shape[-1])
    return np.array([[sum(float(np.sum(np.square(x[i : i + rows], dtype=np.float64))) for i in range(0, len(x), rows))]])


@pytest.mark.skipif(benchlib.quick(), reason="n = 4,194,304 runs in full mode only")
def test_dask_4m(benchmark, client):
    import dask

    import sparseattn as sa
    from sparseattn.dask.probe import memory_peaks
    from sparseattn.dask import ContiguousShards
    from sparseattn.dask import sparse_attention as dask_attention
    from sparseattn.dask.demo import _warm_up

    n = 4194304
    shards = ContiguousShards(client)  # worker i owns blocks [32 i, 32 i + 32)
    q, k, v = _inputs(n, CHUNK, shards=shards)  # generated inside the graph, chunk by chunk, on their shard
    pattern = sa.sliding_window(n, RADIUS) | sa.global_tokens(n, [0])  # no CSR compiled, ever
    out = dask_attention(q, k, v, pattern, shards=shards)
    # one number per output block, summed on the workers: the output never sits in one process
    total = da.map_blocks(_sumsq, out[0], chunks=((1,) * out.numblocks[1], (1,)), dtype=np.float64).sum()

    client.run(_warm_up, RADIUS, D, np.float32)  # kernels loaded in every worker before the probe starts
    reports = {}

    def run():
        # low-level fusion would merge the layers and drop their worker annotations
        with dask.config.set({"optimization.fuse.active": False}):
            value, reports["workers"] = memory_peaks(
                client, lambda: client.compute(total).result(), groups={"inputs": [q.name, k.name, v.name]}
            )
        return value

    value = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert np.isfinite(value) and value > 0
    # rows across a block boundary against the float64 oracle on the keys they see (band + key 0)
    r0, m = 10 * CHUNK - 4, 8
    keys = np.concatenate(([0], np.arange(r0 - RADIUS, r0 + m + RADIUS)))
    q_rows, k_sub, v_sub, got = client.compute([q[:, r0 : r0 + m], k[:, keys], v[:, keys], out[:, r0 : r0 + m]], sync=True)
    rows = np.arange(r0, r0 + m)[:, None]
    mask = (np.abs(rows - keys[None, :]) <= RADIUS) | (keys[None, :] == 0)
    ref = benchlib.oracle_rows(q_rows, k_sub, v_sub, mask, np.arange(m))
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert err <= 2e-4 * max(1.0, float(np.max(np.abs(ref)))), err
    chunk_bytes = CHUNK * D * 4
    order = {w: i for i, w in enumerate(shards.workers)}
    workers = sorted(reports["workers"].items(), key=lambda wr: order.get(wr[0], len(order)))
    benchmark.extra_info.update(
        n=n, chunk=CHUNK, radius=RADIUS, globals=GLOBALS, d=D, dtype="float32", max_abs_error_vs_float64=err,
        input_chunk_bytes=chunk_bytes, placement="ContiguousShards (inputs and attention tasks)",
        **benchlib.machine_extra(),
        # the target, per worker: the exact peak of the bytes held in blocks of q, k and v (whole input
        # chunks; halo slices, outputs and other results not counted), over 3 inputs, in input chunks
        targets=[
            dict(label=f"n={n} worker {i}: peak held input chunks per input (q, k, v)",
                 value=r["group_peak"]["inputs"] / 3 / chunk_bytes, unit="chunks", target="<= 2.5")
            for i, (w, r) in enumerate(workers)
        ],
        # per worker: peak of all task results held (managed memory, exact, at every transition; inputs, outputs,
        # slices, partials) and peak resident set above the warmed-up runtime, in bytes and in input chunks
        worker_memory={
            w: dict(shard=order.get(w), input_peak_bytes=r["group_peak"]["inputs"],
                    input_peak_chunks_per_input=r["group_peak"]["inputs"] / 3 / chunk_bytes,
                    inputs_held_at_input_peak=sorted(r["group_held_at_peak"]["inputs"]),
                    managed_peak_bytes=r["managed_peak"], managed_peak_chunks=r["managed_peak"] / chunk_bytes,
                    rss_before_bytes=r["rss_before"], rss_peak_bytes=r["rss_peak"],
                    rss_peak_delta_bytes=r["rss_peak_delta"],
                    rss_peak_delta_chunks=None if r["rss_peak_delta"] is None else r["rss_peak_delta"] / chunk_bytes,
                    held_at_managed_peak=sorted(r["held_at_peak"].items(), key=lambda kv: -kv[1])[:24])
            for w, r in workers
        },
    )  # fmt: skip


@pytest.mark.parametrize("chunk", [65536, 4096])
def test_graph_build_4m(benchmark, chunk):
    """Building (not running) the graph of a 4,194,304-token band + global pattern: target well under 1 s."""
    import sparseattn as sa
    from sparseattn.dask import sparse_attention as dask_attention

    n = 4194304
    x = da.zeros((n, D), chunks=(chunk, D), dtype=np.float32)
    pattern = sa.sliding_window(n, RADIUS) | sa.global_tokens(n, [0])

    def build():
        out = dask_attention(x, x, x, pattern)
        return len(out.__dask_graph__().layers[out.name])  # materialise the layer's tasks

    n_tasks = benchmark.pedantic(build, rounds=1 if benchlib.quick() else 5, iterations=1, warmup_rounds=0)
    assert "csr" not in pattern.__dict__
    benchmark.extra_info.update(n=n, chunk=chunk, tasks=n_tasks, target="< 1 s", **benchlib.machine_extra())


def test_serial_vs_engine_threads(benchmark, client):
    """serial=True (kernels in the worker's thread) against serial=False (the engine's pool) on 1-thread workers."""
    from sparseattn.dask import sparse_attention as dask_attention

    n = 16384 if benchlib.quick() else 262144
    chunk = n // 8
    q, k, v = client.persist(list(_inputs(n, chunk)))
    distributed.wait([q, k, v])
    qa, ka, va = (_gather(client, x) for x in (q, k, v))
    pattern = benchlib.band_global_pattern(n, RADIUS, GLOBALS)
    serial = dask_attention(q, k, v, pattern, serial=True)
    pooled = dask_attention(q, k, v, pattern, serial=False)

    def check(out):
        return benchlib.assert_matches(out, qa, ka, va, n, RADIUS, GLOBALS, "sparseattn")

    info = dict(n=n, radius=RADIUS, globals=GLOBALS, heads=1, d=D, dtype="float32", chunk=chunk, workers=2)
    benchlib.bench_paired(
        benchmark, ("serial=True", lambda: _gather(client, serial), info, check),
        ("serial=False", lambda: _gather(client, pooled), info, check),
        label=f"dask 2 workers x 1 thread, n={n}: engine threads / serial kernels",
    )  # fmt: skip
