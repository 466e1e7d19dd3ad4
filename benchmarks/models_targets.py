"""Issue 17's targets (today's models: GQA, offsets, modifiers, sinks, decode), each paired in one process.

    python benchmarks/models_targets.py [--quick] [--json PATH] [--sections decode,prefill,...]

Run it alone on a quiet machine (the default sizes take several minutes on 2 cores).  Sections:

1. ``decode``: Mistral attention, q ``(1, 32, 1, 128)``, k/v views ``cache[:, :, :T]`` of a preallocated
   ``(1, 8, T_max, 128)`` float32 cache, ``causal(1, W - 1, n_k=T, offset=T - 1)`` built per call, W 4096,
   T in 8192, 32768, 131072: sparseattn vs the floor (one NumPy thread reading the window rows of k and v
   once), vs torch SDPA (``enable_gqa=True``) on the sliced window, T_max vs T_min; and the old way (cache
   copied contiguous before the call) for reference.  Targets: <= 1.2x the floor, SDPA >= 1.5x slower,
   T = 131072 within 1.2x of T = 8192.  ``--decode-cache cold`` (the default) reads a buffer twice the
   last-level cache before every timed call, outside the clock, so each call reads its window from memory as
   a model's step does (its layers' caches together exceed the LLC); ``warm`` leaves whatever the round-robin
   left there.  A second floor reads the window with all threads (the bandwidth the cores can draw).
2. ``prefill``: GQA heads (``--prefill-heads``, default 8/2 of the issue's 32/8), d 128, n 16384, causal
   window 4096: forward vs SDPA ``is_causal=True`` (>= 3x), forward + backward vs SDPA's (>= 3x), forward
   GFLOP/s (4 nnz d per head) vs the float32 GEMM (numpy matmul 4096^2, all threads; >= 70%).
3. ``gemma``: Gemma 2 geometry (16/8 heads scaled by ``--gemma-heads`` to fit memory, d 256, window 4096,
   softcap 50, n 8192): forward + backward vs transformers' eager softcap attention in torch (>= 10x).
4. ``modifiers``: H1 (benchlib: 12 heads, d 64, band radius 256 | 1 global token), n 8192, fused path:
   plain vs ALiBi, sinks, softcap and a ``ScoreMod`` ALiBi, forward and backward (ALiBi, sinks <= 1.1x plain;
   softcap <= 1.3x; ScoreMod ALiBi <= 1.3x built-in ALiBi); the ScoreMod's compile time separately.
5. ``gqa_memory``: peak RSS delta (``ru_maxrss``, each case in a fresh subprocess) of GQA 32/8 vs
   multi-head attention with k and v of every query head (n 8192, d 128, causal window 1024): GQA uses no more.
6. ``head_dims``: GFLOP/s of the fused forward, fused backward and staged forward at d 64, 128, 256
   (8 heads, n 8192, causal window 1024): no cliff.

Every timed call's output is checked first (against torch SDPA / the eager recipe / a float64 torch
reference, on the same inputs or a reduced instance of the same geometry, as each section says), so no
section times a wrong answer; a failed check marks its section FAILED and the run goes on.  Timings are
round-robin (every call of a section once per round, the order reversed every other round), medians over
the rounds; ratios are ratios of medians.  Prints a Markdown report; ``--json PATH`` writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("SPARSEATTN_COLD_START", "wait")  # time the fused kernels, never the cold-start fallback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import benchlib

import sparseattn as sa

SECTIONS = ("decode", "prefill", "gemma", "modifiers", "gqa_memory", "head_dims")


# --------------------------------------------------------------------------------------------
# machine and report
# --------------------------------------------------------------------------------------------


def _cpuinfo():
    model, flags = "?", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    have = set(flags.split())
    feats = [x for x in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                         "avx2", "fma") if x in have]  # fmt: skip
    return model, feats


def _uptime():
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def chosen_sections(text, sections):
    """The comma-separated section names of ``--sections``, each one of ``sections`` (else the run stops, naming them)."""
    wanted = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in wanted if s not in sections]
    if bad:
        raise SystemExit(f"unknown sections {bad}; choose from {sections}")
    return wanted


def git(*cmd):
    """``git -C <this checkout> cmd``'s output, or None."""
    try:
        r = subprocess.run(["git", "-C", HERE, *cmd], check=False, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_state():
    """``(commit, dirty)`` of this checkout (``"?"`` and None when git cannot say): results must come from a clean commit."""
    porcelain = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") or "?", None if porcelain is None else bool(porcelain)


def machine_info():
    import numba
    import threadpoolctl

    model, feats = _cpuinfo()
    info = {
        "cpu_model": model,
        "cpu_features": feats,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numba_threads": numba.get_num_threads(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "blas": {k: v for k, v in benchlib.blas_info().items() if k != "filepath"},  # no machine paths
        "threadpools": [{"user_api": e.get("user_api"), "internal_api": e.get("internal_api"),
                          "num_threads": e.get("num_threads"), "architecture": e.get("architecture"),
                          "lib": os.path.basename(str(e.get("filepath", "")))}
                     for e in threadpoolctl.threadpool_info()],
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                            "NUMBA_NUM_THREADS", "OPENBLAS_CORETYPE", "SPARSEATTN_COLD_START")},
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


class Report:
    """Markdown lines printed as they come, and the figures for ``--json``."""

    def __init__(self):
        self.data = {}

    def line(self, text=""):
        print(text, flush=True)

    def table(self, header, rows):
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self.line("| " + " | ".join(str(x) for x in r) + " |")
        self.line()


def verdict(value, op, target):
    ok = value <= target if op == "<=" else value >= target
    return f"{'met' if ok else 'MISSED'} (target {op} {target:g})"


def ms(t):
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.3f} s"


# --------------------------------------------------------------------------------------------
# timing: round robin, medians
# --------------------------------------------------------------------------------------------


def round_robin(entries, rounds):
    """Time every entry once per round (order reversed on odd rounds); ``{name: [seconds, ...]}``.

    ``entries``: ``{name: fn}`` or ``{name: (fn, every, ctx)}``: ``fn`` runs only on rounds ``r % every == 0``;
    ``ctx()`` (optional) is a context manager entered around the call, outside the timed region.
    Every entry runs once untimed first (warm-up).
    """
    norm = {}
    for name, e in entries.items():
        fn, every, ctx = (e + (None,) * 3)[:3] if isinstance(e, tuple) else (e, None, None)
        norm[name] = (fn, every or 1, ctx)
    for fn, _, ctx in norm.values():
        with ctx() if ctx else contextlib.nullcontext():
            fn()
    times = {name: [] for name in norm}
    names = list(norm)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, every, ctx = norm[name]
            if r % every:
                continue
            with ctx() if ctx else contextlib.nullcontext():
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
            times[name].append(t1 - t0)
    return times


def med(ts):
    return float(np.median(ts))


def summary(times):
    return {k: {"median_s": med(v), "min_s": float(np.min(v)), "max_s": float(np.max(v)), "runs": len(v), "times_s": list(v)}
            for k, v in times.items()}  # fmt: skip


# --------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------


def rel_err(got, ref):
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise AssertionError(f"shape {got.shape} != reference shape {ref.shape}")
    return float(np.max(np.abs(got - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def check(name, got, ref, tol, errors):
    err = rel_err(got, ref)
    errors[name] = err
    if not err <= tol:
        raise AssertionError(f"{name}: max error {err:.3e} relative to max(1, |ref|) exceeds {tol:g}")
    return err


def torch_dense(q, k, v, mask, *, rows=None, scale=None, softcap=None, slopes=None, sinks=None):
    """Dense softmax attention in torch (float64 autograd), the modifiers in the issue's order.

    q ``(h_q, n_q, d)``, k, v ``(h_kv, n_k, d)`` (GQA: ``h // g``), mask ``(n_q, n_k)`` bool (True = allowed);
    ``rows``: the query positions of q's rows (default ``arange(n_q)``; ALiBi's ``i``).
    """
    import torch

    h_q, n_q, d = q.shape
    n_k = k.shape[1]
    g = h_q // k.shape[0]
    k = k.repeat_interleave(g, 0)
    v = v.repeat_interleave(g, 0)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (q @ k.transpose(1, 2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        # FlashAttention's |i + n_k - n_q - j|; sample ``rows`` are rows of a square call (n_q = n_k)
        i = torch.arange(n_q, dtype=s.dtype) if rows is None else torch.as_tensor(rows, dtype=s.dtype)
        shift = n_k - (n_q if rows is None else n_k)
        dist = (i[:, None] + shift - torch.arange(n_k, dtype=s.dtype)[None, :]).abs()
        s = s - slopes[:, None, None] * dist[None]
    s = s.masked_fill(~mask[None], -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks[:, None, None].expand(h_q, n_q, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v


def window_mask(n_q, n_k, radius, offset, left_only=True):
    i = np.arange(n_q)[:, None] + offset
    j = np.arange(n_k)[None, :]
    return (j <= i) & (j >= i - radius) if left_only else np.abs(i - j) <= radius


def t64(a, grad=False):
    import torch

    t = torch.from_numpy(np.array(a, dtype=np.float64))
    return t.requires_grad_(grad)


def check_fwd_bwd_small(name, hq, hkv, n, d, pattern, mask, errors, *, seed=1, tol=5e-4, **mods):
    """sparseattn fused forward and backward (float32) vs the float64 torch reference's autograd, one small instance.

    ``mods`` are sparseattn's keywords (softcap, alibi_slopes, sinks, score_mod); ``score_mod`` is checked
    as ALiBi (``torch_alibi`` slopes).
    """
    import torch

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    k = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    v = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    go = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused", **mods)
    grads = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused", **mods)
    tq, tk, tv = t64(q[0], True), t64(k[0], True), t64(v[0], True)
    tmods = {}
    if mods.get("softcap") is not None:
        tmods["softcap"] = mods["softcap"]
    slopes = mods.get("alibi_slopes")
    if mods.get("score_mod") is not None:
        slopes = mods["score_mod"].slopes
    if slopes is not None:
        tmods["slopes"] = t64(slopes)
    tsinks = None
    if mods.get("sinks") is not None:
        tsinks = t64(mods["sinks"], True)
        tmods["sinks"] = tsinks
    ref = torch_dense(tq, tk, tv, torch.from_numpy(mask), **tmods)
    ref.backward(t64(go[0]))
    check(f"{name}: out", out[0], ref.detach().numpy(), 2e-4, errors)
    for nm, g, r in zip(("dq", "dk", "dv"), grads[:3], (tq.grad, tk.grad, tv.grad)):
        check(f"{name}: {nm}", g[0], r.numpy(), tol, errors)
    if tsinks is not None:
        check(f"{name}: dsinks", grads[3], tsinks.grad.numpy(), tol, errors)


# --------------------------------------------------------------------------------------------
# 1. decode
# --------------------------------------------------------------------------------------------


def _llc_bytes():
    """The last-level cache's size in bytes (sysfs), or 256 MiB when the system does not say."""
    try:
        sizes = []
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            text = (index / "size").read_text().strip()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        return max(sizes)
    except (OSError, ValueError):
        return 256 * 2**20


def _cache_flush(mode):
    """A context manager factory: ``cold`` reads a buffer of twice the LLC on entry (outside the clock)."""
    if mode != "cold":
        return lambda: contextlib.nullcontext()
    junk = np.ones(2 * _llc_bytes() // 8)

    @contextlib.contextmanager
    def flush():
        np.add.reduce(junk)
        yield

    return flush


def section_decode(rep, args):
    import concurrent.futures

    import torch
    from numba import get_num_threads
    from threadpoolctl import threadpool_limits

    W = args.decode_window
    Ts = args.decode_T
    T_max = max(Ts) + W  # the preallocated cache is longer than any T: k[:, :, :T] is a view, not contiguous
    hq, hkv, d = 32, 8, 128
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((1, hkv, T_max, d), dtype=np.float32)
    vc = rng.standard_normal((1, hkv, T_max, d), dtype=np.float32)
    q = rng.standard_normal((1, hq, 1, d), dtype=np.float32)
    tq = torch.from_numpy(q)
    tkc, tvc = torch.from_numpy(kc), torch.from_numpy(vc)
    flush = _cache_flush(args.decode_cache)
    n_threads = get_num_threads()
    pool = concurrent.futures.ThreadPoolExecutor(n_threads)
    rep.line(f"q {q.shape}, cache {kc.shape} float32 (k and v: {2 * kc.nbytes / 2**30:.2f} GiB), window W = {W}, "
             f"pattern `sa.causal(1, W - 1, n_k=T, offset=T - 1)` built per call, path fused, "
             f"{args.decode_rounds} rounds, {n_threads} threads; LLC {_llc_bytes() / 2**20:.0f} MiB, "
             f"cache **{args.decode_cache}**"
             + (" (a buffer of twice the LLC is read before every timed call, outside the clock: each call "
                "reads its window from memory)" if args.decode_cache == "cold" else
                " (the window may be in the LLC from the round before)"))  # fmt: skip
    rep.line()
    errors = {}
    entries = {}
    for T in Ts:
        k, v = kc[:, :, :T], vc[:, :, :T]
        assert not k.flags.c_contiguous

        def sparse(k=k, v=v, T=T):
            return sa.sparse_attention(q, k, v, sa.causal(1, W - 1, n_k=T, offset=T - 1), path="fused")

        def read_heads(heads, k=k, v=v, T=T):
            for h in heads:  # each head's window is one contiguous (W, d) block of the cache
                np.add.reduce(k[0, h, T - W:T].reshape(-1))
                np.add.reduce(v[0, h, T - W:T].reshape(-1))

        def floor(read_heads=read_heads):
            read_heads(range(hkv))

        def floor_all(read_heads=read_heads):  # the same reads, the heads spread over all threads
            list(pool.map(read_heads, [range(i, hkv, n_threads) for i in range(min(n_threads, hkv))]))

        kw, vw = tkc[:, :, T - W:T], tvc[:, :, T - W:T]

        def sdpa(kw=kw, vw=vw):
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, kw, vw, enable_gqa=True)

        def tiles(k=k, v=v, T=T):  # the route before the decode kernel: the tile kernels after a non-finite scan
            from sparseattn.engine import decode as decode_module

            saved = decode_module._kernel_call
            decode_module._kernel_call = lambda *a: None
            try:
                return sa.sparse_attention(q, k, v, sa.causal(1, W - 1, n_k=T, offset=T - 1), path="fused")
            finally:
                decode_module._kernel_call = saved

        def old(k=k, v=v, T=T):
            kk, vv = np.ascontiguousarray(k), np.ascontiguousarray(v)
            return sa.sparse_attention(q, kk, vv, sa.causal(1, W - 1, n_k=T, offset=T - 1), path="fused")

        ref = sdpa().numpy()
        check(f"T={T}: sparseattn vs SDPA", sparse(), ref, 1e-4, errors)
        check(f"T={T}: old way vs SDPA", old(), ref, 1e-4, errors)
        check(f"T={T}: tile route vs SDPA", tiles(), ref, 1e-4, errors)
        # the floor and the reference: the same window, from the definition
        g = hq // hkv
        ks = kc[0, :, T - W:T].astype(np.float64)
        s = np.einsum("hgd,hkd->hgk", q[0, :, 0].reshape(hkv, g, d).astype(np.float64), ks) / math.sqrt(d)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o64 = np.einsum("hgk,hkd->hgd", p, vc[0, :, T - W:T].astype(np.float64)).reshape(1, hq, 1, d)
        check(f"T={T}: SDPA vs float64", ref, o64, 2e-4, errors)
        @contextlib.contextmanager
        def one_thread():
            with flush(), threadpool_limits(limits=1):
                yield

        entries[f"sparse T={T}"] = (sparse, 1, flush)
        entries[f"floor T={T}"] = (floor, 1, one_thread)
        entries[f"floor_all T={T}"] = (floor_all, 1, flush)
        entries[f"sdpa T={T}"] = (sdpa, 1, flush)
        entries[f"old T={T}"] = (old, args.decode_old_every, flush)
        entries[f"tiles T={T}"] = (tiles, 1, flush)
    times = round_robin(entries, args.decode_rounds)
    pool.shutdown()
    rows, res = [], {}
    window_bytes = 2 * hkv * W * d * 4
    for T in Ts:
        sp, fl, fa, sd, od, tl = (med(times[f"{m} T={T}"]) for m in ("sparse", "floor", "floor_all", "sdpa", "old", "tiles"))
        res[T] = {"sparse_s": sp, "floor_s": fl, "floor_all_threads_s": fa, "sdpa_s": sd, "old_copy_s": od,
                  "tile_route_s": tl, "sparse_over_floor": sp / fl, "sparse_over_floor_all_threads": sp / fa,
                  "sdpa_over_sparse": sd / sp, "tiles_over_sparse": tl / sp, "floor_GBps": window_bytes / fl / 1e9,
                  "floor_all_threads_GBps": window_bytes / fa / 1e9}  # fmt: skip
        rows.append([T, ms(sp), f"{ms(fl)} ({window_bytes / fl / 1e9:.1f} GB/s)",
                     f"{ms(fa)} ({window_bytes / fa / 1e9:.1f} GB/s)", ms(sd), ms(tl), ms(od),
                     f"{sp / fl:.2f}", f"{sp / fa:.2f}", f"{sd / sp:.2f}", f"{tl / sp:.2f}"])  # fmt: skip
    rep.table(["T", "sparseattn", "floor (1 thread reads the window)", f"floor, {n_threads} threads",
               "SDPA on sliced window", "tile route (before the decode kernel)", "old way (cache copied)",
               "sparseattn/floor", f"sparseattn/floor {n_threads} threads", "SDPA/sparseattn",
               "tile route/sparseattn"], rows)  # fmt: skip
    t_lo, t_hi = min(Ts), max(Ts)
    growth = res[t_hi]["sparse_s"] / res[t_lo]["sparse_s"]
    rep.line(f"- sparseattn / floor at T={t_hi}: **{res[t_hi]['sparse_over_floor']:.2f}** "
             f"{verdict(res[t_hi]['sparse_over_floor'], '<=', 1.2)}; worst over T: "
             f"{max(r['sparse_over_floor'] for r in res.values()):.2f}")  # fmt: skip
    rep.line(f"- SDPA / sparseattn (worst over T): **{min(r['sdpa_over_sparse'] for r in res.values()):.2f}** "
             f"{verdict(min(r['sdpa_over_sparse'] for r in res.values()), '>=', 1.5)}")  # fmt: skip
    need = max(r["sdpa_s"] for r in res.values()) / 1.5
    rep.line(f"  - 1.5x SDPA needs at most {ms(need)} per call at every T; reading the window with "
             f"{n_threads} threads takes {ms(min(r['floor_all_threads_s'] for r in res.values()))}-"
             f"{ms(max(r['floor_all_threads_s'] for r in res.values()))}")  # fmt: skip
    rep.line(f"- sparseattn T={t_hi} / T={t_lo}: **{growth:.2f}** {verdict(growth, '<=', 1.2)}")
    rep.line(f"- checks (max error relative to max(1, |ref|)): worst {max(errors.values()):.1e} over {len(errors)}")
    rep.line()
    return {"W": W, "T": Ts, "T_max": T_max, "cache": args.decode_cache, "llc_bytes": _llc_bytes(), "threads": n_threads,
            "results": res, "T_growth": growth, "checks": errors, "timings": summary(times)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# 2. prefill
# --------------------------------------------------------------------------------------------


def _heads(text):
    hq, hkv = (int(x) for x in text.split("/"))
    if hq % hkv:
        raise argparse.ArgumentTypeError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    return hq, hkv


def section_prefill(rep, args):
    import torch

    hq, hkv = args.prefill_heads
    n, W, d = args.prefill_n, args.prefill_window, 128
    pattern = sa.causal(n, W - 1)
    nnz = pattern.nnz
    assert nnz == W * n - W * (W - 1) // 2, (nnz, W, n)
    rep.line(f"heads {hq}/{hkv} (the issue's 32/8 scaled by {32 // hq}: times and the ratio per head scale "
             f"linearly), d {d}, n {n}, causal window {W} (`sa.causal(n, W - 1)`), float32, path fused; "
             f"{args.heavy_rounds} rounds")  # fmt: skip
    rep.line()
    errors = {}
    gemm_n = args.gemm_n
    blas = benchlib.blas_info()
    gemm = benchlib.gemm_rate(gemm_n, repeats=3)["gemm_gflops"]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    k = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    v = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    go = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    tq, tk, tv, tg = (torch.from_numpy(a.copy()) for a in (q, k, v, go))
    tq.requires_grad_()
    tk.requires_grad_()
    tv.requires_grad_()
    F = torch.nn.functional

    def sparse_f():
        return sa.sparse_attention(q, k, v, pattern, path="fused")

    def sparse_fb():
        out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused")
        return sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused")

    def sdpa_f():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    def sdpa_fb():
        for t in (tq, tk, tv):
            t.grad = None
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True).backward(tg)

    # checks: the forward on sample rows vs SDPA with the window as a mask (same inputs); SDPA is_causal on the
    # same rows vs SDPA with the causal mask; the backward on a reduced instance (n 1024) vs float64 autograd
    rows = benchlib.check_rows(n)
    out = sparse_f()
    with torch.inference_mode():
        i = rows[:, None]
        j = np.arange(n)[None, :]
        mw = torch.from_numpy((j <= i) & (j > i - W))
        mc = torch.from_numpy(j <= i)
        qr = tq.detach()[:, :, rows]
        ref_w = F.scaled_dot_product_attention(qr, tk.detach(), tv.detach(), attn_mask=mw, enable_gqa=True)
        ref_c = F.scaled_dot_product_attention(qr, tk.detach(), tv.detach(), attn_mask=mc, enable_gqa=True)
        full_c = sdpa_f()[:, :, rows]
    check("forward vs SDPA(window mask), sample rows", out[:, :, rows], ref_w.numpy(), 1e-4, errors)
    check("SDPA is_causal vs SDPA(causal mask), sample rows", full_c.numpy(), ref_c.numpy(), 1e-4, errors)
    ns, Ws = min(n, 1024), min(W, 256)
    check_fwd_bwd_small("backward, n 1024 window 256", hq, hkv, ns, d, sa.causal(ns, Ws - 1),
                        window_mask(ns, ns, Ws - 1, 0), errors)  # fmt: skip
    del out
    times = round_robin({"sparse fwd": sparse_f, "sdpa fwd": sdpa_f, "sparse fwd+bwd": sparse_fb,
                         "sdpa fwd+bwd": sdpa_fb}, args.heavy_rounds)  # fmt: skip
    sf, df_, sfb, dfb = (med(times[x]) for x in ("sparse fwd", "sdpa fwd", "sparse fwd+bwd", "sdpa fwd+bwd"))
    rate = 4.0 * nnz * d * hq / sf / 1e9
    rep.table(["call", "sparseattn", "SDPA is_causal", "SDPA/sparseattn"],
              [["forward", ms(sf), ms(df_), f"{df_ / sf:.2f}"], ["forward+backward", ms(sfb), ms(dfb), f"{dfb / sfb:.2f}"]])
    rep.line(f"- forward: SDPA / sparseattn **{df_ / sf:.2f}** {verdict(df_ / sf, '>=', 3)}")
    rep.line(f"- forward+backward: SDPA / sparseattn **{dfb / sfb:.2f}** {verdict(dfb / sfb, '>=', 3)}")
    rep.line(f"- forward rate {rate:.0f} GFLOP/s (4 nnz d per head, nnz {nnz}) = **{rate / gemm:.0%}** of the float32 "
             f"GEMM {gemm:.0f} GFLOP/s (numpy matmul {gemm_n}^2, {blas.get('num_threads')} threads, BLAS "
             f"{blas.get('internal_api')} kernel {blas.get('architecture')}) {verdict(rate / gemm, '>=', 0.7)}")
    rep.line(f"- checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    rep.line()
    return {"heads": [hq, hkv], "n": n, "W": W, "d": d, "nnz": nnz, "sparse_fwd_s": sf, "sdpa_fwd_s": df_, "sparse_fwdbwd_s": sfb,
                "sdpa_fwdbwd_s": dfb, "fwd_ratio": df_ / sf, "fwdbwd_ratio": dfb / sfb, "fwd_gflops": rate, "gemm_gflops": gemm,
                "gemm_n": gemm_n, "gemm_fraction": rate / gemm, "blas": blas, "checks": errors, "timings": summary(times)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# 3. Gemma 2
# --------------------------------------------------------------------------------------------


def _eager():
    """transformers' Gemma 2 eager attention (its only CPU route for softcap), or a copy of its recipe."""
    try:
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

        return eager_attention_forward, "transformers.models.gemma2.modeling_gemma2.eager_attention_forward"
    except ImportError:
        import torch

        def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None):
            g = module.num_key_value_groups
            ks = key[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2)
            vs = value[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2)
            w = torch.matmul(query, ks.transpose(2, 3)) * scaling
            w = torch.tanh(w / softcap) * softcap
            w = torch.softmax(w + attention_mask, dim=-1, dtype=torch.float32).to(query.dtype)
            return torch.matmul(w, vs).transpose(1, 2).contiguous(), w

        return eager_attention_forward, "a copy of transformers' Gemma 2 eager recipe (transformers not installed)"


def section_gemma(rep, args):
    import types

    import torch

    n, W, d, cap = args.gemma_n, args.gemma_window, 256, 50.0
    hq, hkv = args.gemma_heads
    g = hq // hkv
    pairs = hkv * (g // 2) if g >= 2 else hkv  # the geometry has 2 query heads per kv head
    eager, eager_name = _eager()
    score_bytes = hq * n * n * 4
    rep.line(f"heads {hq}/{hkv} (the issue's 16/8 scaled to fit: one score tensor of the eager path is "
             f"{score_bytes / 2**30:.2f} GiB), d {d}, n {n}, causal window {W}, softcap {cap:g}, float32; eager = "
             f"`{eager_name}` (repeat_kv, matmul, softcap tanh, additive window mask, softmax, matmul; autograd); "
             f"{args.heavy_rounds} rounds")  # fmt: skip
    rep.line()
    pattern = sa.causal(n, W - 1)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    k = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    v = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    go = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
    tgo = torch.from_numpy(go.transpose(0, 2, 1, 3).copy())  # eager returns (b, n, h, d)
    allowed = torch.from_numpy(window_mask(n, n, W - 1, 0))
    add_mask = torch.zeros((1, 1, n, n), dtype=torch.float32)
    add_mask.masked_fill_(~allowed[None, None], torch.finfo(torch.float32).min)
    del allowed
    module = types.SimpleNamespace(num_key_value_groups=g, head_dim=d, training=False)
    scale = 1.0 / math.sqrt(d)

    def sparse_fb():
        out, lse = sa.sparse_attention(q, k, v, pattern, softcap=cap, return_lse=True, path="fused")
        return out, sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, softcap=cap, path="fused")

    def eager_fb():
        for t in (tq, tk, tv):
            t.grad = None
        out, _ = eager(module, tq, tk, tv, add_mask, dropout=0.0, scaling=scale, softcap=cap)
        out.backward(tgo)
        return out

    errors = {}
    out, grads = sparse_fb()
    ref = eager_fb()
    check("forward vs eager", out, ref.detach().numpy().transpose(0, 2, 1, 3), 1e-4, errors)
    for nm, gr, t in zip(("dq", "dk", "dv"), grads, (tq, tk, tv)):
        check(f"{nm} vs eager autograd", gr, t.grad.numpy(), 1e-3, errors)
    del out, grads, ref
    gc.collect()
    times = round_robin({"sparse fwd+bwd": sparse_fb, "eager fwd+bwd": eager_fb}, args.heavy_rounds)
    s, e = med(times["sparse fwd+bwd"]), med(times["eager fwd+bwd"])
    rep.table(["forward+backward", "total", "per head pair (2 q heads / 1 kv head)"],
              [["sparseattn (softcap)", ms(s), ms(s / pairs)], ["eager (dense, softcap)", ms(e), ms(e / pairs)]])
    rep.line(f"- eager / sparseattn: **{e / s:.2f}** {verdict(e / s, '>=', 10)} (the same per head pair; the issue's "
             f"16/8 heads would take about {ms(s / pairs * 8)} for sparseattn)")  # fmt: skip
    rep.line(f"- checks vs eager (same inputs, float32): worst {max(errors.values()):.1e} over {len(errors)}")
    rep.line()
    return {"heads": [hq, hkv], "head_pairs": pairs, "n": n, "W": W, "d": d, "softcap": cap, "eager": eager_name, "sparse_s": s, "eager_s": e,
                "ratio": e / s, "sparse_per_pair_s": s / pairs, "eager_per_pair_s": e / pairs, "checks": errors,
                "timings": summary(times)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# 4. modifiers at H1
# --------------------------------------------------------------------------------------------


def alibi_score_mod(slopes):
    """ALiBi written as a user's ScoreMod (square calls: ``|i - j|``), float32 arithmetic."""
    sl = np.ascontiguousarray(slopes, dtype=np.float32)

    def alibi(s, b, h, i, j):
        return s - sl[h] * np.float32(abs(i - j))

    def d_alibi(s, b, h, i, j):
        return 1.0

    mod = sa.ScoreMod(alibi, d_alibi)
    mod.slopes = np.asarray(slopes, dtype=np.float64)  # for the checks
    return mod


def section_modifiers(rep, args):
    import torch

    H1 = benchlib.H1
    heads, d, radius, n_glob = H1["heads"], H1["d"], H1["radius"], H1["globals"]
    n = args.mod_n
    pattern = benchlib.band_global_pattern(n, radius, n_glob)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(3))
    go = rng.standard_normal((1, heads, n, d), dtype=np.float32)
    slopes = (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)).astype(np.float32)  # ALiBi's geometric slopes
    sinks = rng.standard_normal(heads).astype(np.float32)
    cap = 50.0
    mod = alibi_score_mod(slopes)
    cases = {"plain": {}, "alibi": {"alibi_slopes": slopes}, "sinks": {"sinks": sinks}, "softcap": {"softcap": cap},
             "scoremod alibi": {"score_mod": mod}}  # fmt: skip
    rep.line(f"H1: {heads} heads, d {d}, band radius {radius} | {n_glob} global token, n {n}, float32, path fused, "
             f"ALiBi slopes 2^(-8h/{heads}), sinks N(0, 1), softcap {cap:g}; {args.mod_rounds} rounds")  # fmt: skip
    rep.line()
    errors = {}
    # warm the built-ins first, so the ScoreMod's first calls below time its compilation only
    outs = {}
    for name in ("plain", "alibi", "sinks", "softcap"):
        out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused", **cases[name])
        sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused", **cases[name])
        outs[name] = (out, lse)
    t0 = time.perf_counter()
    out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused", score_mod=mod)
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused", score_mod=mod)
    compile_bwd = time.perf_counter() - t0
    outs["scoremod alibi"] = (out, lse)
    # checks: every case's forward on sample rows vs float64 torch; the ScoreMod equals the built-in ALiBi;
    # forward and backward of every case on a reduced instance (n 512, radius 64) vs float64 autograd
    rows = benchlib.check_rows(n)
    mrows = torch.from_numpy(np.concatenate([benchlib.dense_mask_rows(n, radius, n_glob, r, r + 1) for r in rows]))
    tq, tk, tv = t64(q[0][:, rows]), t64(k[0]), t64(v[0])
    for name, kw in cases.items():
        tm = {}
        if "softcap" in kw:
            tm["softcap"] = cap
        if "alibi_slopes" in kw or "score_mod" in kw:
            tm["slopes"] = t64(slopes)
        if "sinks" in kw:
            tm["sinks"] = t64(sinks)
        ref = torch_dense(tq, tk, tv, mrows, rows=rows, **tm)
        check(f"{name}: forward, sample rows vs float64", outs[name][0][0][:, rows], ref.numpy(), 2e-4, errors)
    check("scoremod alibi == built-in alibi (forward)", outs["scoremod alibi"][0], outs["alibi"][0], 1e-5, errors)
    ns, rs = min(n, 512), 64
    p_small = benchlib.band_global_pattern(ns, rs, n_glob)
    m_small = benchlib.dense_mask_rows(ns, rs, n_glob, 0, ns)
    for name, kw in cases.items():
        check_fwd_bwd_small(f"{name} (n {ns})", heads, heads, ns, d, p_small, m_small, errors, **kw)
    del outs
    entries = {}
    for name, kw in cases.items():
        out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused", **kw)
        entries[f"{name} fwd"] = (lambda kw=kw: sa.sparse_attention(q, k, v, pattern, path="fused", **kw))
        entries[f"{name} bwd"] = (lambda kw=kw, out=out, lse=lse:
                                  sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused", **kw))
    times = round_robin(entries, args.mod_rounds)
    m = {x: med(t) for x, t in times.items()}
    targets = {"alibi": ("plain", 1.1), "sinks": ("plain", 1.1), "softcap": ("plain", 1.3),
               "scoremod alibi": ("alibi", 1.3)}  # fmt: skip
    rows_t, res = [], {}
    for name in cases:
        row = [name]
        for dirn in ("fwd", "bwd"):
            base, tgt = targets.get(name, ("plain", None))
            ratio = m[f"{name} {dirn}"] / m[f"{base} {dirn}"]
            res[f"{name} {dirn}"] = {"median_s": m[f"{name} {dirn}"], "vs": base, "ratio": ratio, "target": tgt}
            row += [ms(m[f"{name} {dirn}"]), "" if tgt is None else f"{ratio:.3f} vs {base} ({verdict(ratio, '<=', tgt)})"]
        rows_t.append(row)
    rep.table(["case", "forward", "fwd ratio", "backward", "bwd ratio"], rows_t)
    rep.line(f"- ScoreMod ALiBi compile on first use (in memory, per object): forward {compile_fwd:.1f} s, "
             f"backward {compile_bwd:.1f} s (the first call of each, the built-ins' kernels already warm)")
    rep.line(f"- checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    rep.line()
    return {"n": n, "heads": heads, "d": d, "radius": radius, "globals": n_glob, "softcap": cap, "results": res,
                "scoremod_compile_fwd_s": compile_fwd, "scoremod_compile_bwd_s": compile_bwd, "checks": errors,
                "timings": summary(times)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# 5. GQA memory (one fresh subprocess per case)
# --------------------------------------------------------------------------------------------

MEM_CASES = {
    # name: (query heads, kv heads of the arrays passed, repeat_kv inside the measured region)
    "gqa 32/8": (32, 8, False),
    "mha 32/32 (k, v repeated beforehand)": (32, 32, False),
    "mha 32/32 (repeat_kv in the call)": (32, 8, True),
    "mha 8/8": (8, 8, False),
}


def mem_case(name, n, W, d):
    """Run in a fresh process: the peak RSS growth of one forward and forward+backward call, as JSON."""
    from sparseattn._memory import malloc_trim, status_kib

    hq, hkv, repeat = MEM_CASES[name]
    # load the kernels (from Numba's cache) on a tiny call of both layouts, so loading is not counted
    r = np.random.default_rng(1)
    for hk in (hkv, hq):
        a = r.standard_normal((1, hq, 64, d), dtype=np.float32)
        b = r.standard_normal((1, hk, 64, d), dtype=np.float32)
        o, l_ = sa.sparse_attention(a, b, b, sa.causal(64, 15), return_lse=True, path="fused")
        sa.sparse_attention_backward(a, a, b, b, sa.causal(64, 15), o, l_, path="fused")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    k = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    v = rng.standard_normal((1, hkv, n, d), dtype=np.float32)
    go = rng.standard_normal((1, hq, n, d), dtype=np.float32)
    pattern = sa.causal(n, W - 1)
    gc.collect()
    malloc_trim()
    # loading the kernels peaked far above today's resident set (LLVM): reset the high-water mark (Linux >= 4.0:
    # "5" resets VmHWM, which ru_maxrss reads) so the peak after the call is this call's
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss0 = status_kib("VmRSS")
    hwm0 = status_kib("VmHWM")
    max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kk, vv = (np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)) if repeat else (k, v)
    out, lse = sa.sparse_attention(q, kk, vv, pattern, return_lse=True, path="fused")
    hwm1, max1 = status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = sa.sparse_attention_backward(go, q, kk, vv, pattern, out, lse, path="fused")
    hwm2, max2 = status_kib("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # correctness on sample rows (float64, from the definition), after the measurement
    rows = benchlib.check_rows(n)
    g = hq // kk.shape[1]
    kr, vr = np.repeat(kk[0], g, axis=0), np.repeat(vv[0], g, axis=0)
    mask = window_mask(n, n, W - 1, 0)[rows]
    ref = benchlib.oracle_rows(q[0], kr, vr, mask, rows)
    err = rel_err(out[0][:, rows], ref)
    # ru_maxrss also keeps the peak of threads that exited (the kernel loading's), which clear_refs does not
    # reset: the deltas use VmHWM (the same high-water mark of this process's memory, reset above) when it was
    # reset, else ru_maxrss; both are recorded
    if reset and hwm0 is not None:
        src, b0, p1, p2 = "VmHWM", max(hwm0, rss0), hwm1, hwm2
    else:
        src, b0, p1, p2 = "ru_maxrss", max(max0, rss0), max1, max2
    return {"case": name, "peak_source": src, "hq": hq, "hkv": hkv, "repeat_kv_in_call": repeat,
            "rss_before_kib": rss0, "hwm_before_kib": hwm0, "maxrss_before_kib": max0,
            "hwm_after_fwd_kib": hwm1, "hwm_after_bwd_kib": hwm2, "maxrss_after_fwd_kib": max1,
            "maxrss_after_bwd_kib": max2, "fwd_delta_bytes": (p1 - b0) * 1024, "fwdbwd_delta_bytes": (p2 - b0) * 1024,
            "out_bytes": out.nbytes, "grads_bytes": sum(x.nbytes for x in grads), "check_err": err}  # fmt: skip


def section_gqa_memory(rep, args):
    n, W, d = args.mem_n, args.mem_window, 128
    rep.line(f"n {n}, d {d}, causal window {W}, float32, path fused; each case in a fresh process; delta = peak "
             f"resident set after the call minus before (inputs already allocated, kernels loaded)")  # fmt: skip
    rep.line()
    res = {}
    for name in MEM_CASES:
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-case", name, "--mem-n", str(n), "--mem-window", str(W)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise RuntimeError(f"memory case {name!r} failed:\n{r.stderr[-3000:]}")
        res[name] = json.loads(r.stdout.strip().splitlines()[-1])
        if not res[name]["check_err"] <= 2e-4:
            raise AssertionError(f"{name}: output differs from float64 by {res[name]['check_err']:.2e}")
    mib = 2**20
    rep.table(["case", "fwd delta", "fwd+bwd delta", "output", "dq+dk+dv", "check"],
              [[k, f"{r['fwd_delta_bytes'] / mib:.0f} MiB", f"{r['fwdbwd_delta_bytes'] / mib:.0f} MiB",
                f"{r['out_bytes'] / mib:.0f} MiB", f"{r['grads_bytes'] / mib:.0f} MiB", f"{r['check_err']:.1e}"]
               for k, r in res.items()])  # fmt: skip
    gq, mh = res["gqa 32/8"], res["mha 32/32 (k, v repeated beforehand)"]
    slack = 8 * mib  # allocator granularity and thread stacks
    for key, label in (("fwd_delta_bytes", "forward"), ("fwdbwd_delta_bytes", "forward+backward")):
        ok = gq[key] <= mh[key] + slack
        rep.line(f"- {label}: GQA 32/8 {gq[key] / mib:.0f} MiB vs MHA 32/32 {mh[key] / mib:.0f} MiB: "
                 f"{'met' if ok else 'MISSED'} (target: GQA no more, {slack // mib} MiB slack)")  # fmt: skip
    srcs = sorted({r["peak_source"] for r in res.values()})
    worst = max((r["hwm_before_kib"] or r["maxrss_before_kib"]) - r["rss_before_kib"] for r in res.values())
    rep.line(f"- peaks read from {'/'.join(srcs)} (VmHWM: reset through /proc/self/clear_refs after loading the "
             f"kernels; ru_maxrss keeps the peak of threads that exited during loading); largest peak - resident "
             f"set at the baselines: {worst / 1024:.1f} MiB (near 0: the deltas are the calls')")  # fmt: skip
    kv32 = 2 * 32 * n * d * 4
    rep.line(f"- a copy of k and v per query head would be {kv32 / mib:.0f} MiB; GQA's fwd+bwd delta beyond "
             f"its output and gradients: {(gq['fwdbwd_delta_bytes'] - gq['out_bytes'] - gq['grads_bytes']) / mib:.0f} MiB")
    rep.line()
    return {"n": n, "W": W, "d": d, "cases": res}


# --------------------------------------------------------------------------------------------
# 6. head dims
# --------------------------------------------------------------------------------------------


def section_head_dims(rep, args):
    heads, n, W = 8, args.hd_n, args.hd_window
    pattern = sa.causal(n, W - 1)
    nnz = pattern.nnz
    rep.line(f"{heads} heads, n {n}, causal window {W} (nnz {nnz} per head), float32; rate = useful flops / median: "
             f"forward 4 nnz d, backward 10 nnz d (scores recomputed, dV, dP, dQ, dK) per head; "
             f"{args.hd_rounds} rounds")  # fmt: skip
    rep.line()
    errors, entries = {}, {}
    for d in args.head_dims:
        rng = np.random.default_rng(d)
        q, k, v, go = (rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(4))
        out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused")
        staged = sa.sparse_attention(q, k, v, pattern, path="staged")
        rows = benchlib.check_rows(n)
        ref = benchlib.oracle_rows(q[0], k[0], v[0], window_mask(n, n, W - 1, 0)[rows], rows)
        check(f"d {d}: fused forward, sample rows vs float64", out[0][:, rows], ref, 2e-4, errors)
        check(f"d {d}: staged vs fused forward", staged, out, 1e-5, errors)
        ns = min(n, 512)
        check_fwd_bwd_small(f"d {d} (n {ns}, window 128)", 2, 2, ns, d, sa.causal(ns, 127), window_mask(ns, ns, 127, 0),
                            errors)  # fmt: skip
        entries[f"d{d} fused fwd"] = (lambda q=q, k=k, v=v: sa.sparse_attention(q, k, v, pattern, path="fused"))
        entries[f"d{d} fused bwd"] = (lambda q=q, k=k, v=v, go=go, out=out, lse=lse:
                                      sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused"))
        entries[f"d{d} staged fwd"] = (lambda q=q, k=k, v=v: sa.sparse_attention(q, k, v, pattern, path="staged"))
    times = round_robin(entries, args.hd_rounds)
    res, rows_t = {}, []
    for d in args.head_dims:
        row = [d]
        for kind, mult in (("fused fwd", 4), ("fused bwd", 10), ("staged fwd", 4)):
            t = med(times[f"d{d} {kind}"])
            rate = mult * nnz * d * heads / t / 1e9
            res[f"d{d} {kind}"] = {"median_s": t, "gflops": rate}
            row.append(f"{rate:.0f} GFLOP/s ({ms(t)})")
        rows_t.append(row)
    rep.table(["d", "fused forward", "fused backward", "staged forward"], rows_t)
    for kind in ("fused fwd", "fused bwd", "staged fwd"):
        rates = [res[f"d{d} {kind}"]["gflops"] for d in args.head_dims]
        rep.line(f"- {kind}: slowest / fastest rate over d = {min(rates) / max(rates):.2f}")
    rep.line(f"- checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    rep.line()
    return {"heads": heads, "n": n, "W": W, "nnz": nnz, "results": res, "checks": errors, "timings": summary(times)}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run at small sizes (about 1-2.5 minutes with a warm Numba cache, most of it the ScoreMod compile)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--prefill-heads", type=_heads, default=None, help="query/kv heads of the prefill (default 8/2)")
    ap.add_argument("--gemma-heads", type=_heads, default=None,
                    help="query/kv heads of the Gemma 2 case (default: the most pairs whose eager path fits --mem-gb)")
    ap.add_argument("--mem-gb", type=float, default=12.0, help="memory the eager Gemma path may use (default 12)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the heavy sections (prefill, gemma)")
    ap.add_argument("--decode-cache", choices=("cold", "warm"), default="cold",
                    help="cold (default): read twice the LLC before every timed decode call, as a model's step does; "
                         "warm: leave the round-robin's cache state")  # fmt: skip
    # internal: one GQA-memory case in a fresh process
    ap.add_argument("--mem-case", help=argparse.SUPPRESS)
    ap.add_argument("--mem-n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mem-window", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    Q = args.quick
    args.decode_window = 1024 if Q else 4096
    args.decode_T = (2048, 8192, 32768) if Q else (8192, 32768, 131072)
    args.decode_rounds = 15 if Q else 101
    args.decode_old_every = 3 if Q else 10
    args.prefill_heads = args.prefill_heads or ((4, 1) if Q else (8, 2))
    args.prefill_n, args.prefill_window = (1024, 256) if Q else (16384, 4096)
    args.gemm_n = 2048 if Q else 4096
    args.heavy_rounds = args.rounds or (2 if Q else 3)
    args.gemma_n, args.gemma_window = (1024, 256) if Q else (8192, 4096)
    if args.gemma_heads is None:
        if Q:
            args.gemma_heads = (2, 1)
        else:
            pairs = 8
            # the eager fwd+bwd holds about 7 score-sized float32 tensors at its peak (2 query heads per pair)
            while pairs > 1 and 7 * 2 * pairs * args.gemma_n**2 * 4 > args.mem_gb * 2**30:
                pairs //= 2
            args.gemma_heads = (2 * pairs, pairs)
    args.mod_n = 1024 if Q else 8192
    args.mod_rounds = 3 if Q else 7
    args.mem_n = args.mem_n or (2048 if Q else 8192)
    args.mem_window = args.mem_window or (256 if Q else 1024)
    args.hd_n, args.hd_window = (1024, 128) if Q else (8192, 1024)
    args.hd_rounds = 2 if Q else 5
    args.head_dims = (64, 128, 256)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mem_case:
        print(json.dumps(mem_case(args.mem_case, args.mem_n, args.mem_window, 128)))
        return 0
    wanted = chosen_sections(args.sections, SECTIONS)
    rep = Report()
    t_start = time.perf_counter()
    info = machine_info()
    load0 = _uptime()
    rep.line(f"# Issue 17 targets{' (--quick: small sizes, smoke run only)' if args.quick else ''}")
    rep.line()
    rep.line(f"- command: `python benchmarks/models_targets.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    commit, info["dirty"] = git_state()
    info["commit"] = commit
    rep.line(f"- commit {commit}{' (dirty tree)' if info['dirty'] else ''}; CPU {info['cpu_model']}, features {info['cpu_features']}, {info['cpu_count']} CPUs "
             f"({info['affinity']} usable)")  # fmt: skip
    b = info["blas"]
    rep.line(f"- NumPy {info['numpy']} BLAS {b.get('internal_api')} {b.get('version')} kernel **{b.get('architecture')}**, "
             f"{b.get('num_threads')} threads; Numba {info['numba']} ({info['numba_threads']} threads); torch "
             f"{info.get('torch')} ({info.get('torch_threads')} threads)")  # fmt: skip
    rep.line("- thread pools: " + "; ".join(f"{p['lib']} {p['internal_api']} {p['num_threads']} threads"
                                             + (f" ({p['architecture']})" if p.get("architecture") else "")
                                             for p in info["threadpools"]))  # fmt: skip
    rep.line(f"- load at start: `{load0}`")
    rep.line()
    results = {"machine": info, "quick": args.quick, "load_start": load0}
    funcs = {"decode": ("1. Decode (Mistral attention over a KV cache view)", section_decode),
             "prefill": ("2. Prefill (GQA, causal window)", section_prefill),
             "gemma": ("3. Gemma 2 geometry (softcap, GQA, d 256)", section_gemma),
             "modifiers": ("4. Modifiers' cost at H1", section_modifiers),
             "gqa_memory": ("5. GQA memory", section_gqa_memory),
             "head_dims": ("6. Head dims", section_head_dims)}  # fmt: skip
    for name in wanted:
        title, fn = funcs[name]
        rep.line(f"## {title}")
        rep.line()
        t0 = time.perf_counter()
        try:
            results[name] = fn(rep, args)
            results[name]["section_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
            rep.line(f"**FAILED**: {type(e).__name__}: {e}")
            rep.line()
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            traceback.print_exc()
        rep.line(f"_(section took {time.perf_counter() - t0:.0f} s)_")
        rep.line()
        gc.collect()
    load1 = _uptime()
    results["load_end"] = load1
    results["total_s"] = time.perf_counter() - t_start
    rep.line(f"- load at end: `{load1}`; total {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        rep.line(f"- figures written to {args.json}")
    return 1 if any(isinstance(r, dict) and "error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
