"""Shared helpers for the pytest-benchmark files in ``benchmarks/``.

Workloads, the competing implementations (dense NumPy, torch SDPA, torch
FlexAttention, Hugging Face Longformer's attention core), a float64 row-slice
oracle every method is checked against before it is timed, peak-memory
measurement and the float32 GEMM rate of the machine.

Run ``python benchmarks/benchlib.py --gemm`` to print the GEMM rate as JSON
(the benchmarks do this in a subprocess with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` unset, so the BLAS picks its kernel from the hardware).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from sparseattn._memory import malloc_trim, status_kib

QUICK_ENV = "SPARSEATTN_BENCH_QUICK"
NS_ENV = "SPARSEATTN_BENCH_NS"

#: Headline workload H1: batch 1, 12 heads, d 64, float32, radius 256, one global token (index 0).
H1 = dict(heads=12, d=64, radius=256, globals=1, dtype="float32")

#: Largest n each peer runs at (memory / time); beyond it the benchmark is skipped with the reason.
PEER_MAX_N = {
    "dense-numpy": 16384,  # n*n float32 scores per row block, head by head: O(n^2) time (~minutes beyond)
    "torch-sdpa": 8192,  # materialises heads*n*n float32 scores (3.2 GB at 8192, 12.9 GB at 16384)
    "torch-flex": 16384,  # create_block_mask materialises the n*n mask (plus int64 temporaries of the predicate)
    "hf-longformer": 16384,  # ~O(n*w) but slow: seconds per call at 16384
}


# --------------------------------------------------------------------------------------------
# run mode
# --------------------------------------------------------------------------------------------


def quick():
    """True in quick mode (``--quick`` or ``SPARSEATTN_BENCH_QUICK=1``): few sizes, one round."""
    return os.environ.get(QUICK_ENV, "").strip() not in ("", "0", "false", "no")


def sizes(full, quick_sizes):
    """The n values to run: ``SPARSEATTN_BENCH_NS=1024,4096`` overrides, else quick or full list."""
    override = os.environ.get(NS_ENV, "").strip()
    if override:
        return [int(x) for x in override.split(",") if x.strip()]
    return list(quick_sizes if quick() else full)


# --------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def qkv(heads, n, d, dtype, seed=0):
    """Read-only random q, k, v of shape (heads, n, d), standard normal, cached across methods."""
    rng = np.random.default_rng(seed)
    arrs = []
    for _ in range(3):
        a = rng.standard_normal((heads, n, d), dtype=np.float32).astype(dtype, copy=False)
        a.setflags(write=False)
        arrs.append(a)
    return tuple(arrs)


def global_indices(n, n_globals):
    """The first ``n_globals`` tokens are global (the question in Longformer's QA setting)."""
    return np.arange(min(n_globals, n), dtype=np.int64)


@functools.lru_cache(maxsize=8)
def band_global_pattern(n, radius, n_globals):
    """``sliding_window(n, radius) | global_tokens(n, range(n_globals))`` with its CSR compiled."""
    import sparseattn as sa

    p = sa.sliding_window(n, radius)
    if n_globals:
        p = p | sa.global_tokens(n, global_indices(n, n_globals))
    p.csr  # compile once, outside any timing
    return p


def band_global_nnz(n, radius, n_globals):
    """nnz of band | globals counted in closed form (independent of the pattern code)."""
    i = np.arange(n, dtype=np.int64)
    band_row = np.minimum(i + radius, n - 1) - np.maximum(i - radius, 0) + 1
    g = global_indices(n, n_globals)
    is_g = np.zeros(n, dtype=bool)
    is_g[g] = True
    # ordinary rows: band plus the global columns outside the band; global rows: all n keys
    lo, hi = np.maximum(i - radius, 0), np.minimum(i + radius, n - 1)
    outside = np.zeros(n, dtype=np.int64)
    for gj in g:
        outside += (gj < lo) | (gj > hi)
    return int(np.where(is_g, n, band_row + outside).sum())


def dense_mask_rows(n, radius, n_globals, start, stop):
    """Bool mask rows ``[start, stop)`` of band | globals, built from the definition."""
    i = np.arange(start, stop)[:, None]
    j = np.arange(n)[None, :]
    m = np.abs(i - j) <= radius
    g = global_indices(n, n_globals)
    if len(g):
        m[:, g] = True
        rows = g[(g >= start) & (g < stop)] - start
        m[rows, :] = True
    return m


def useful_flop(nnz, d, heads=1, batch=1, d_v=None):
    """Useful work: 2*nnz*d for the scores plus 2*nnz*d_v for P.V, per (batch, head)."""
    d_v = d if d_v is None else d_v
    return 2 * nnz * (d + d_v) * heads * batch


# --------------------------------------------------------------------------------------------
# the oracle
# --------------------------------------------------------------------------------------------


def check_rows(n):
    """Rows every method is checked on: the edges, a global row, the middle."""
    rows = sorted({0, 1, 2, n // 3, n // 2, n // 2 + 1, n - 2, n - 1} & set(range(n)))
    return np.array(rows, dtype=np.int64)


def oracle_rows(q, k, v, mask_rows, rows, scale=None):
    """Dense float64 attention for the given query rows; q, k, v (heads, n, d); mask_rows (len(rows), n_k)."""
    q64 = np.asarray(q, dtype=np.float64)[:, rows]
    k64 = np.asarray(k, dtype=np.float64)
    v64 = np.asarray(v, dtype=np.float64)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("hqd,hkd->hqk", q64, k64) * scale
    s = np.where(mask_rows[None], s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,hkd->hqd", p, v64)


def assert_matches(out, q, k, v, n, radius, n_globals, method):
    """Raise AssertionError unless ``out`` (heads, n, d_v) matches the float64 oracle on check rows."""
    rows = check_rows(n)
    mask = np.concatenate([dense_mask_rows(n, radius, n_globals, r, r + 1) for r in rows])
    ref = oracle_rows(q, k, v, mask, rows)
    got = np.asarray(out, dtype=np.float64)[:, rows]
    tol = 2e-4 if np.asarray(out).dtype == np.float32 else 1e-9
    err = np.max(np.abs(got - ref)) / max(1.0, np.max(np.abs(ref)))
    if not err <= tol:
        raise AssertionError(f"{method}: output differs from the float64 oracle by {err:.3e} (tolerance {tol:g}) on rows {rows.tolist()}")
    return float(err)


# --------------------------------------------------------------------------------------------
# the methods: each maker returns fn() -> output (heads, n, d) as numpy (or a torch tensor)
# --------------------------------------------------------------------------------------------


def make_sparse(q, k, v, pattern, path="auto"):
    import sparseattn as sa

    def run():
        return sa.sparse_attention(q, k, v, pattern, path=path)

    return run


def dense_numpy_attention(q, k, v, neg_mask, block_rows=None):
    """Plain dense masked attention in NumPy, head by head and in row blocks so n = 16384 fits.

    ``neg_mask`` is the (n_q, n_k) bool array of *forbidden* pairs. Every score of
    the n_q x n_k grid is computed (that is what dense attention costs).
    """
    h, n_q, d = q.shape
    n_k = k.shape[1]
    scale = q.dtype.type(1.0 / math.sqrt(d))
    if block_rows is None:
        block_rows = max(1, min(n_q, (1 << 24) // max(n_k, 1)))  # <= 64 MiB of float32 scores
    out = np.empty((h, n_q, v.shape[2]), dtype=q.dtype)
    s = np.empty((block_rows, n_k), dtype=q.dtype)
    for hh in range(h):
        kt = k[hh].T
        for r0 in range(0, n_q, block_rows):
            r1 = min(n_q, r0 + block_rows)
            blk = s[: r1 - r0]
            np.matmul(q[hh, r0:r1], kt, out=blk)
            blk *= scale
            np.copyto(blk, -np.inf, where=neg_mask[r0:r1])
            blk -= blk.max(axis=1, keepdims=True)
            np.exp(blk, out=blk)
            blk /= blk.sum(axis=1, keepdims=True)
            np.matmul(blk, v[hh], out=out[hh, r0:r1])
    return out


def make_dense_numpy(q, k, v, n, radius, n_globals):
    neg = ~np.concatenate([dense_mask_rows(n, radius, n_globals, r0, min(n, r0 + 4096)) for r0 in range(0, n, 4096)])

    def run():
        return dense_numpy_attention(q, k, v, neg)

    return run


def _tensors(torch, *arrays):
    """Torch views of writable copies, batch axis added.

    The cached inputs are read-only (a guard against in-place writes), and torch
    cannot represent read-only memory: ``torch.from_numpy`` warns about it.  The
    copies are made once, before anything is timed.
    """
    return tuple(torch.from_numpy(np.array(a, order="C"))[None] for a in arrays)


def _torch():
    import torch

    return torch


def make_torch_sdpa(q, k, v, n, radius, n_globals):
    torch = _torch()
    tq, tk, tv = _tensors(torch, q, k, v)
    mask = torch.from_numpy(np.concatenate([dense_mask_rows(n, radius, n_globals, r0, min(n, r0 + 4096)) for r0 in range(0, n, 4096)]))

    def run():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)[0]

    return run


@functools.lru_cache(maxsize=None)
def _compiled_flex(shape_key):
    # one compiled function per shape: no dynamic-shape recompiles land inside a timed call
    torch = _torch()
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


def make_torch_flex(q, k, v, n, radius, n_globals):
    """FlexAttention compiled for CPU; the mask is the band | globals predicate (create_block_mask)."""
    torch = _torch()
    from torch.nn.attention.flex_attention import create_block_mask

    tq, tk, tv = _tensors(torch, q, k, v)
    is_g = torch.zeros(n, dtype=torch.bool)
    is_g[torch.from_numpy(global_indices(n, n_globals))] = True

    def mask_mod(b, h, qi, ki):
        return ((qi - ki).abs() <= radius) | is_g[qi] | is_g[ki]

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu")
    setup = time.perf_counter() - t0
    flex = _compiled_flex((tq.shape, str(tq.dtype)))

    def run():
        with torch.inference_mode():
            return flex(tq, tk, tv, block_mask=block_mask)[0]

    run.setup_s = setup
    return run


def make_hf_longformer(x, n, radius, n_globals):
    """HF ``LongformerSelfAttention``'s attention core on q = k = v = x (heads, n, d).

    The six ``nn.Linear`` projections are replaced by identities (the query by a
    copy, because HF scales it in place), so the timed work is the sliding-chunk
    scores, the global-key columns, the softmax, P.V and the separate dense pass
    for the global rows: the layer without its projections.
    """
    torch = _torch()
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    h, _, d = x.shape
    if n % (2 * radius):
        raise ValueError(f"HF Longformer needs n % attention_window == 0, got n={n}, attention_window={2 * radius}")
    cfg = LongformerConfig(hidden_size=h * d, num_attention_heads=h, attention_window=[2 * radius], attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(cfg, 0).eval()

    class _Copy(torch.nn.Module):
        def forward(self, t):
            return t.clone()

    layer.query = _Copy()
    for name in ("key", "value", "query_global", "key_global", "value_global"):
        setattr(layer, name, torch.nn.Identity())
    hidden = torch.from_numpy(np.array(np.transpose(x, (1, 0, 2)).reshape(1, n, h * d), order="C"))  # writable copy
    am = torch.zeros(1, n, dtype=hidden.dtype)
    am[0, torch.from_numpy(global_indices(n, n_globals))] = 10000.0
    kw = dict(attention_mask=am, is_index_masked=am < 0, is_index_global_attn=am > 0, is_global_attn=bool(n_globals))

    def run():
        with torch.inference_mode():
            out = layer(hidden, **kw)[0]
        return out[0].reshape(n, h, d).permute(1, 0, 2)

    return run


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def measure_peak(fn):
    """Call ``fn()`` once; return (result, info) with the peak extra memory it used.

    ``tracemalloc_peak_bytes``: peak of allocations traced by Python (NumPy arrays;
    misses Numba's and torch's own allocators).  ``rss_peak_delta_bytes``: peak
    resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident
    set before the call, after ``malloc_trim(0)`` returned glibc's free pages:
    sees every allocator that uses malloc or mmap.
    """
    gc.collect()
    malloc_trim()
    can_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        can_reset = False
    rss0 = status_kib("VmRSS")
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    hwm = status_kib("VmHWM")
    info = {"tracemalloc_peak_bytes": int(peak)}
    if can_reset and rss0 is not None and hwm is not None:
        info["rss_peak_delta_bytes"] = max(0, hwm - rss0) * 1024
    return result, info


def to_numpy(out):
    if hasattr(out, "detach"):
        return out.detach().numpy()
    return np.asarray(out)


def blas_info():
    """The NumPy BLAS as threadpoolctl sees it (kernel name in 'architecture')."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    blas = [e for e in threadpool_info() if e.get("user_api") == "blas"]
    # scipy/torch may load BLAS libraries of their own: report NumPy's (the one np.matmul calls)
    blas.sort(key=lambda e: "numpy" not in str(e.get("filepath", "")))
    return {k: blas[0].get(k) for k in ("internal_api", "architecture", "version", "num_threads", "filepath")} if blas else {}


def gemm_rate(n=None, repeats=5):
    """Best-of-``repeats`` NumPy float32 square GEMM rate in GFLOP/s, with the BLAS kernel name."""
    n = (1024 if quick() else 2048) if n is None else n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    info = {"gemm_n": n, "gemm_gflops": 2.0 * n**3 / best / 1e9}
    info.update({f"blas_{k}": v for k, v in blas_info().items() if k != "filepath"})
    info["env_OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    return info


def gemm_rate_hardware(timeout=120):
    """``gemm_rate()`` in a subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset.

    The main process is left alone; the child lets OpenBLAS pick its kernel from the CPU.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    try:
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--gemm"], env=env, capture_output=True, text=True, timeout=timeout, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


@functools.lru_cache(maxsize=1)
def session_gemm():
    """Both GEMM rates, measured once per session (in-process first, then the subprocess)."""
    return {"in_process": gemm_rate(), "hardware_default": gemm_rate_hardware()}


def fused_available():
    """Whether the fused kernels import here (the engine's default path; they compile on first use).

    It asked ``sparseattn.engine.attention._fused_available``, which the
    engine's layout change removed: from then until this fix every record
    said "not available" while the fused kernels ran.
    """
    try:
        from sparseattn.engine import fused_backward, fused_forward  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "not available" for the record
        return False
    return True


def machine_extra():
    """The session's GEMM rates with their BLAS kernel names, and the 1-minute load average, for extra_info."""
    g = session_gemm()
    return dict(
        gemm_gflops=g["in_process"].get("gemm_gflops"),
        blas_architecture=g["in_process"].get("blas_architecture"),
        gemm_gflops_hardware_default=g["hardware_default"].get("gemm_gflops"),
        blas_architecture_hardware_default=g["hardware_default"].get("blas_architecture"),
        loadavg_1min=os.getloadavg()[0],  # the machine is shared: say how busy it was
    )


def run(benchmark, fn, *, group, info, check=None, budget_s=None, max_rounds=None):
    """Time ``fn`` with pytest-benchmark after an untimed first call (compilation) and a memory probe.

    ``check(output)`` runs on the first call's output before anything is timed.
    Rounds are chosen from the steady-state time of the second (untimed) call so
    one benchmark takes about ``budget_s`` seconds; quick mode does one round.
    """
    benchmark.group = group
    budget_s = (0.5 if quick() else 6.0) if budget_s is None else budget_s
    max_rounds = (1 if quick() else 15) if max_rounds is None else max_rounds
    t0 = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - t0
    extra = dict(info)
    if check is not None:
        extra["max_rel_error_vs_float64"] = check(first)
    del first
    t0 = time.perf_counter()
    _, mem = measure_peak(fn)  # second call: steady state, also a warm-up
    second_s = time.perf_counter() - t0
    rounds = int(max(1, min(max_rounds, budget_s // max(second_s, 1e-6))))
    extra.update(mem)
    extra["first_call_s"] = first_s
    extra["rounds"] = rounds
    if getattr(fn, "setup_s", None) is not None:
        extra["setup_s"] = fn.setup_s
    extra.update(machine_extra())
    benchmark.extra_info.update(extra)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats is not None else None
    if median and "useful_flop" in extra:
        benchmark.extra_info["gflops"] = extra["useful_flop"] / median / 1e9


PEER_MODULES = {
    "torch-sdpa": ("torch",),
    "torch-flex": ("torch", "torch.nn.attention.flex_attention"),
    "hf-longformer": ("torch", "transformers"),
}


def make_method(method, *, n, radius, n_globals, dtype="float32", heads=12, d=64):
    """``(fn, info, check)`` for one method on band(radius) | globals(first n_globals tokens).

    ``method``: ``sparseattn`` (default path), ``sparseattn-staged``, ``sparseattn-fused``,
    ``dense-numpy``, ``torch-sdpa``, ``torch-flex`` or ``hf-longformer``. Peers
    that are not installed, or ``n`` beyond :data:`PEER_MAX_N`, skip with the reason.
    ``fn()`` runs the method on (heads, n, d) inputs; ``info`` is the workload's
    extra_info; ``check(out)`` compares an output with the float64 oracle.
    """
    import pytest

    for mod in PEER_MODULES.get(method, ()):
        pytest.importorskip(mod, reason=f"{method} needs {mod} (extra 'compare')")
    if n > PEER_MAX_N.get(method, math.inf):
        pytest.skip(f"{method} is only run up to n={PEER_MAX_N[method]} (memory/time), asked n={n}")
    if method in ("torch-sdpa", "torch-flex", "hf-longformer") and dtype != "float32":
        pytest.skip(f"{method} is benchmarked in float32 only")
    if method == "hf-longformer" and n % (2 * radius):
        pytest.skip(f"HF Longformer needs n % (2*radius) == 0, got n={n}, radius={radius}")
    if method == "sparseattn-fused" and not fused_available():
        pytest.skip("sparseattn.fused is not available in this checkout")

    if quick():
        heads = min(heads, 2)  # smoke test: exercise every path, spend no time
    q, k, v = qkv(heads, n, d, np.dtype(dtype).name)
    nnz = band_global_nnz(n, radius, n_globals)
    path = None
    if method.startswith("sparseattn"):
        path = {"sparseattn": "auto", "sparseattn-staged": "staged", "sparseattn-fused": "fused"}[method]
        pattern = band_global_pattern(n, radius, n_globals)
        assert pattern.nnz == nnz, f"pattern nnz {pattern.nnz} != closed form {nnz}"
        fn = make_sparse(q, k, v, pattern, path=path)
        ref = (q, k, v)
    elif method == "dense-numpy":
        fn, ref = make_dense_numpy(q, k, v, n, radius, n_globals), (q, k, v)
    elif method == "torch-sdpa":
        fn, ref = make_torch_sdpa(q, k, v, n, radius, n_globals), (q, k, v)
    elif method == "torch-flex":
        fn, ref = make_torch_flex(q, k, v, n, radius, n_globals), (q, k, v)
    elif method == "hf-longformer":
        fn, ref = make_hf_longformer(q, n, radius, n_globals), (q, q, q)
    else:
        raise ValueError(f"unknown method {method!r}")

    info = dict(
        method=method,
        n=n,
        radius=radius,
        globals=n_globals,
        heads=heads,
        d=d,
        batch=1,
        dtype=np.dtype(dtype).name,
        nnz=nnz,
        density=nnz / float(n) ** 2,
        useful_flop=useful_flop(nnz, d, heads),
        qkvo_bytes=4 * q.nbytes,  # q, k, v and the output (d_v = d)
        out_bytes=q.nbytes,
        path=path,
        fused_available=fused_available(),
    )

    def check(out):
        return assert_matches(to_numpy(out), *ref, n, radius, n_globals, method)

    return fn, info, check


def bench_attention(benchmark, method, *, n, radius, n_globals, dtype="float32", heads=12, d=64, group):
    """Benchmark one method (see :func:`make_method`) on band(radius) | globals."""
    fn, info, check = make_method(method, n=n, radius=radius, n_globals=n_globals, dtype=dtype, heads=heads, d=d)
    run(benchmark, fn, group=f"{group}, {info['heads']} heads, d{d}", info=info, check=check)


def bench_paired(benchmark, a, b, *, label, target=None, budget_s=None, max_rounds=None):
    """Time two calls alternately (A, B, A, B, ...) and record the ratio of their medians.

    ``a`` and ``b`` are ``(name, fn, info, check)``. Both are checked against the
    float64 oracle and warmed up first. On a shared machine the load drifts
    between benchmarks run one after the other; alternating gives both calls
    the same conditions. pytest-benchmark times each (A, B) pair;
    ``extra_info["paired"]`` holds both series, their medians and
    ``ratio = median(B) / median(A)`` (with the per-pair ratios' range), and
    ``target``, a text such as ``">= 10"`` for the report.
    """
    checked = {}
    for name, fn, _, check in (a, b):
        checked[name] = check(fn())  # first call: compile + correctness
        fn()  # steady-state warm-up
    (na, fa, ia, _), (nb, fb, ib, _) = a, b
    series = {na: [], nb: []}
    t0 = time.perf_counter()
    fa()
    fb()
    pair_s = time.perf_counter() - t0
    budget_s = (0.5 if quick() else 20.0) if budget_s is None else budget_s
    max_rounds = (1 if quick() else 15) if max_rounds is None else max_rounds
    rounds = int(max(1 if quick() else 5, min(max_rounds, budget_s // max(pair_s, 1e-6))))

    def pair():
        t = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        series[na].append(t1 - t)
        series[nb].append(t2 - t1)

    benchmark.group = f"paired: {label}"
    benchmark.extra_info.update(
        paired=dict(label=label, a=na, b=nb, info_a=ia, info_b=ib, target=target, max_rel_error_vs_float64=checked),
        **machine_extra(),
    )
    benchmark.pedantic(pair, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["paired"].update(paired_summary(series[na], series[nb]))


def paired_summary(times_a, times_b):
    """The report's figures of alternating pairs: both series, their medians, ``ratio = median(B) / median(A)``,
    the per-pair ratios' range and the number of pairs."""
    ta, tb = np.asarray(times_a, dtype=float), np.asarray(times_b, dtype=float)
    per_pair = tb / ta
    return dict(
        times_a=ta.tolist(),
        times_b=tb.tolist(),
        median_a=float(np.median(ta)),
        median_b=float(np.median(tb)),
        ratio=float(np.median(tb) / np.median(ta)),
        pair_ratio_min=float(per_pair.min()),
        pair_ratio_max=float(per_pair.max()),
        rounds=len(ta),
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--gemm"]:
        print(json.dumps(gemm_rate()))
    else:
        print(__doc__)
