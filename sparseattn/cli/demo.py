"""``sparseattn demo``: the question-answering setting on a synthetic long document.

The Longformer QA pattern (a band plus global question tokens) on a seeded synthetic document: the pattern,
the time and memory of ``sparse_attention`` against dense attention (measured where it fits, extrapolated
quadratically beyond), and a check against the float64 dense reference on row slices. ``_cmd_demo`` runs
the steps below in order; each prints its own section.
"""

from __future__ import annotations

import time

from ._common import PROG, CLIError, _summary


def add_parser(sub):
    demo = sub.add_parser(
        "demo",
        help="the question-answering setting on a synthetic long document: pattern, timings, check",
        description=(
            "Builds the Longformer QA pattern (a band of --radius tokens per side plus the first --question "
            "tokens as global tokens) for a synthetic document of --n tokens, times sparse_attention, "
            "measures dense attention at --dense-n tokens and extrapolates it quadratically, and checks the "
            "result against the float64 dense reference on row slices."
        ),
        allow_abbrev=False,
    )
    demo.add_argument("--n", type=int, default=16384, help="document length in tokens (default: 16384)")
    demo.add_argument("--radius", type=int, default=256, help="local window radius per side (default: 256)")
    demo.add_argument("--question", type=int, default=32, help="leading question tokens made global (default: 32)")
    demo.add_argument("--heads", type=int, default=12, help="attention heads (default: 12)")
    demo.add_argument("--d", type=int, default=64, help="head dimension (default: 64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic document (default: 0)")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="working precision (default: float32)")
    demo.add_argument("--path", choices=("auto", "fused", "staged", "blocked"), default="auto", help="engine path (default: auto)")
    demo.add_argument("--repeat", type=int, default=3, help="timed repetitions, best is reported (default: 3)")
    demo.add_argument("--dense-n", type=int, default=2048, help="size at which dense attention is measured (default: 2048)")
    demo.add_argument("--check-rows", type=int, default=256, help="rows per slice checked against the reference (default: 256)")
    demo.set_defaults(func=_cmd_demo)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def _fmt_time(seconds):
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _fmt_bytes(nbytes):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def _qa_pattern(n, radius, question):
    from ..patterns import global_tokens, sliding_window

    p = sliding_window(n, radius)
    if question:
        p = p | global_tokens(n, range(question))
    return p


def _synthetic_document(n, heads, d, question, seed, dtype):
    """Queries, keys and values of a synthetic long document.

    Token ids come from a seeded generator over a small vocabulary; the question
    (the first ``question`` tokens) is repeated once inside the document, as the
    "answer" passage.  Embeddings plus sinusoidal positions are projected per head.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab, width = 1000, 128
    ids = rng.integers(0, vocab, size=n)
    if question and n >= 3 * question:
        at = int(rng.integers(2 * question, n - question + 1))
        ids[at : at + question] = ids[:question]
    table = rng.standard_normal((vocab, width))
    pos = np.arange(n)[:, None] / (10000.0 ** (np.arange(0, width, 2) / width))[None, :]
    x = table[ids]
    x[:, 0::2] += np.sin(pos)
    x[:, 1::2] += np.cos(pos)
    x /= np.sqrt(2.0)
    x = x.astype(dtype)
    w = (rng.standard_normal((3, heads, width, d)) / np.sqrt(width)).astype(dtype)
    q, k, v = (np.matmul(x, w[i]) for i in range(3))  # (heads, n, d) each
    return q, k, v


def _dense_all_heads_attention(q, k, v, mask, scale):
    """Dense masked attention in the working precision, every head's full score grid at once.

    The demo's dense baseline: what a straightforward dense implementation costs in
    time and memory (``heads x n x n`` scores).  The benchmarks' ``dense-numpy``
    is a different baseline: head by head in row blocks, so its memory stays bounded.
    """
    import numpy as np

    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= s.dtype.type(scale)
    np.copyto(s, s.dtype.type(-np.inf), where=~mask)
    m = s.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0
    s -= m
    np.exp(s, out=s)
    tot = s.sum(axis=-1, keepdims=True)
    tot[tot == 0] = 1
    s /= tot
    return np.matmul(s, v)


def _peak_memory(fn):
    """``(result, seconds, peak bytes)`` of one call of ``fn``.

    The peak is the larger of tracemalloc's peak (NumPy's allocations) and, on
    Linux, the growth of the resident set's high-water mark (reset through
    ``/proc/self/clear_refs``), which also sees Numba's own allocations.
    """
    import gc
    import tracemalloc

    from .._memory import status_kib

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = status_kib("VmRSS")
    except OSError:
        rss0 = None
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    hwm = status_kib("VmHWM")
    if rss0 is not None and hwm is not None:
        peak = max(peak, (hwm - rss0) * 1024)
    return result, seconds, peak


def _best_time(fn, repeat, budget=2.0):
    times = []
    t_start = time.perf_counter()
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget:
            break
    return min(times), len(times)


# --------------------------------------------------------------------------------------------
# the steps of the demo
# --------------------------------------------------------------------------------------------
def _cmd_demo(args, words, out):
    import numpy as np

    _check_args(args)
    n, heads, d, question = args.n, args.heads, args.d, args.question
    dtype = np.dtype(args.dtype)
    pattern = _qa_pattern(n, args.radius, question)
    _print_setting(args, dtype, pattern, out)
    q, k, v = _synthetic_document(n, heads, d, question, args.seed, dtype)
    result, t_sparse, mem_sparse = _time_sparse(args, pattern, q, k, v, out)
    t_dense, mem_dense, extrapolated = _time_dense(args, q, k, v, dtype, out)
    _print_comparison(n, extrapolated, (t_sparse, mem_sparse), (t_dense, mem_dense), out)
    _check_rows(args, pattern, q, k, v, result, out)
    return 0


def _check_args(args):
    """Usage errors (exit status 2) for the demo's options."""
    n, radius, question, heads, d = args.n, args.radius, args.question, args.heads, args.d
    for name, value, low in (("--n", n, 2), ("--radius", radius, 0), ("--question", question, 0), ("--heads", heads, 1), ("--d", d, 1)):
        if value < low:
            raise CLIError(f"{PROG} demo: {name} must be >= {low}, got {value}")
    if question >= n:
        raise CLIError(f"{PROG} demo: --question ({question}) must be smaller than --n ({n})")
    if args.dense_n < 2:
        raise CLIError(f"{PROG} demo: --dense-n must be >= 2, got {args.dense_n}")
    if args.check_rows < 1:
        raise CLIError(f"{PROG} demo: --check-rows must be >= 1, got {args.check_rows}")


def _print_setting(args, dtype, pattern, out):
    """The setting, the pattern's summary and the same pattern at 12 tokens as text."""
    n, radius, question, heads, d = args.n, args.radius, args.question, args.heads, args.d
    print("sparseattn demo: question answering on a synthetic long document", file=out)
    print(
        f"  n = {n} tokens; the first {question} are the question (global); local radius {radius} per side "
        f"(Hugging Face attention_window = {2 * radius})",
        file=out,
    )
    print(f"  {heads} heads, d = {d}, {dtype.name}, seed {args.seed}", file=out)
    print(file=out)
    print(f"pattern: sliding_window(n={n}, radius={radius}) | global_tokens(n={n}, indices=range({question}))", file=out)
    print(f"  {_summary(pattern)}", file=out)

    n_small = 12
    r_small, q_small = min(radius, 2), min(question, 2)
    print(file=out)
    print(f"the same pattern at {n_small} tokens (radius {r_small}, {q_small} question tokens):", file=out)
    print(_qa_pattern(n_small, r_small, q_small).to_string(), file=out)


def _time_sparse(args, pattern, q, k, v, out):
    """Time ``sparse_attention``: the CSR, the first call, the steady state; ``(result, seconds, peak bytes)``."""
    import sparseattn

    heads, d = args.heads, args.d
    t0 = time.perf_counter()
    pattern.csr  # built once and cached on the pattern
    t_csr = time.perf_counter() - t0

    def run():
        return sparseattn.sparse_attention(q, k, v, pattern, path=args.path)

    from ..engine import coldstart as _coldstart

    t0 = time.perf_counter()
    result = run()  # the untimed warm-up: compiles (or loads) the kernels and builds the tile plan
    t_first = time.perf_counter() - t0
    background = _coldstart.compiling()
    if background:  # the first call ran on the blocked path: time the fused kernels, not the stopgap
        _coldstart.wait()
        t_compiled = max(s for s, _, _ in _coldstart.status().values())
        run()  # builds the tile plan
    t_sparse, reps = _best_time(run, args.repeat)
    _, _, mem_sparse = _peak_memory(run)
    flops = 4.0 * pattern.nnz * d * heads
    print(file=out)
    print(f"sparse_attention (path={args.path!r}):", file=out)
    print(f"  pattern CSR built in {_fmt_time(t_csr)} (once; cached on the pattern)", file=out)
    if background:
        print(
            f"  first call {_fmt_time(t_first)} on the blocked path (NumPy/BLAS) while the fused kernels compiled in a "
            f"background thread; they were ready {_fmt_time(t_compiled)} after that call started (once per "
            f"environment: they are now in Numba's cache)",
            file=out,
        )
    else:
        print(
            f"  first call {_fmt_time(t_first)}, of which ~{_fmt_time(max(t_first - t_sparse, 0.0))} is one-time "
            f"work: Numba compilation (or loading compiled kernels from its disk cache) and the tile plan",
            file=out,
        )
    print(
        f"  steady state at n = {args.n}: {_fmt_time(t_sparse)} (best of {reps}), peak memory {_fmt_bytes(mem_sparse)} "
        f"(output {_fmt_bytes(result.nbytes)} included), {flops / t_sparse / 1e9:.1f} GFLOP/s of useful work",
        file=out,
    )
    return result, t_sparse, mem_sparse


def _time_dense(args, q, k, v, dtype, out):
    """Dense attention measured at ``--dense-n`` tokens and extrapolated quadratically to ``--n``.

    Returns ``(seconds, peak bytes, extrapolated)`` at ``--n`` tokens.
    """
    import numpy as np

    n, radius, question, heads = args.n, args.radius, args.question, args.heads
    scale = 1.0 / np.sqrt(args.d)
    n_m = min(n, args.dense_n)
    q_m = min(question, n_m - 1)
    mask = _qa_pattern(n_m, radius, q_m).to_dense(max_elements=max(1 << 26, n_m * n_m))
    qm, km, vm = q[:, :n_m].copy(), k[:, :n_m].copy(), v[:, :n_m].copy()
    _, t_dense, mem_dense = _peak_memory(lambda: _dense_all_heads_attention(qm, km, vm, mask, scale))
    if args.repeat > 1:
        t_more, _ = _best_time(lambda: _dense_all_heads_attention(qm, km, vm, mask, scale), args.repeat - 1)
        t_dense = min(t_dense, t_more)
    mem_dense += mask.nbytes
    factor = (n / n_m) ** 2
    print(file=out)
    print(
        f"dense attention (NumPy, {dtype.name}, boolean mask, all {heads} head{'s' if heads > 1 else ''}' n x n scores at once; "
        f"the benchmarks' dense-numpy goes head by head in row blocks instead):",
        file=out,
    )
    print(f"  measured at n = {n_m}: {_fmt_time(t_dense)}, peak memory {_fmt_bytes(mem_dense)} (mask included)", file=out)
    if n_m < n:
        print(
            f"  extrapolated to n = {n} (x{factor:.0f}, quadratic): {_fmt_time(t_dense * factor)}, "
            f"{_fmt_bytes(mem_dense * factor)}  [extrapolated, not measured]",
            file=out,
        )
    return t_dense * factor, mem_dense * factor, n_m < n


def _print_comparison(n, extrapolated, sparse, dense, out):
    """``sparse`` and ``dense``: ``(seconds, peak bytes)`` at ``n`` tokens."""
    (t_sparse, mem_sparse), (t_dense_n, mem_dense_n) = sparse, dense
    print(file=out)
    note = " (dense extrapolated)" if extrapolated else ""
    print(f"sparse vs dense at n = {n}{note}:", file=out)
    print(f"  time   {_fmt_time(t_sparse):>10} vs {_fmt_time(t_dense_n):>10}   {t_dense_n / t_sparse:.1f}x faster", file=out)
    print(
        f"  memory {_fmt_bytes(mem_sparse):>10} vs {_fmt_bytes(mem_dense_n):>10}   "
        f"{mem_dense_n / max(mem_sparse, 1):.1f}x less",
        file=out,
    )


def _check_rows(args, pattern, q, k, v, result, out):
    """Correctness on row slices: the float64 dense reference restricted to those rows, every head."""
    import numpy as np

    from ..reference import dense_attention

    n, heads = args.n, args.heads
    rows = min(args.check_rows, n)
    mid = max(0, min(n - rows, n // 2 - rows // 2))
    slices = [(0, rows)] if mid < rows else [(0, rows), (mid, mid + rows)]
    diff, peak = 0.0, 0.0
    for s, e in slices:
        sub = pattern.rows(s, e)
        # keys that no row of the slice may see cannot change its result: leave them out
        cols = np.unique(sub.indices)
        sub = sub[:, cols]
        for h in range(heads):
            ref = dense_attention(q[h, s:e], k[h, cols], v[h, cols], sub)
            diff = max(diff, float(np.max(np.abs(result[h, s:e] - ref))))
            peak = max(peak, float(np.max(np.abs(ref))))
    where = " and ".join(f"[{s}, {e})" for s, e in slices)
    print(file=out)
    print(f"check against sparseattn.reference.dense_attention (float64), rows {where} of every head:", file=out)
    print(f"  max |difference| = {diff:.2e}   (max |output| = {peak:.3g})", file=out)
