"""Issue 18's run-pattern targets, each paired with its peer or the old route in one process (run it alone).

    python benchmarks/runs_targets.py [--quick] [--json PATH] [--sections csr,plans,...] [--rounds N]

Sections (all by default, in this order):

- ``csr``: ``.csr`` of the demo's pattern (n 16,384, radius 256, 32 global tokens): from runs vs the CSR fold of
  the parts (the route before runs), target <= 100 ms;
- ``plans``: build + plan of ``causal(131072)``, ``documents(64 random) & causal(131072)``,
  ``neighborhood((256, 512), 7)`` from runs vs the same pattern planned from its CSR, target <= 20 ms each, with
  the planner's peak (tracemalloc);
- ``first_call``: the first call of ``documents(64 random) & causal(65536)``, 2 heads, d 32, float32 (pattern,
  plan and attention, kernels from the cache) in a fresh process: target <= 5 s and a peak resident set <= 2 GiB;
- ``rates``: a dilated window ``sliding_window(8192, 512, dilation=2)`` (regrouped into one band per residue
  class, ``engine/regroup.py``), forward and forward + backward, against the undilated band of the same keys per
  row and against the same window given as CSR (the route before the regrouping), paired in alternation; the
  short rows (band radius 32, causal window 128; 12 heads, d 64, n 8192) and the 2-D neighbourhood 7x7
  (128 x 128 tokens, 4 heads, d 64: extra spans per tile) against the float32 GEMM;
- ``causal``: ``causal(32768)``, 8 heads, d 64: forward vs torch SDPA ``is_causal=True`` (>= 2x), forward +
  backward (``sparse_attention(return_lse=True)`` + ``sparse_attention_backward``) vs SDPA's (>= 2x); the
  forward call's extra peak memory (peak RSS delta less the output, which sees Numba's allocations too; the
  tracemalloc peak alongside) <= 0.1x the bytes of q, k, v and out;
- ``documents``: 64 random lengths summing to 16,384 tokens, ``documents(lengths) & causal(16384)``, 8 heads,
  d 64: forward vs SDPA with the equivalent dense boolean mask (>= 10x) and vs FlexAttention compiled
  (``torch.compile(flex_attention)``, a document ``mask_mod`` through ``create_block_mask``, CPU; >= 3x); the
  error FlexAttention raises for inputs that require grad on a CPU is recorded; sparseattn forward + backward
  timed (it runs);
- ``neighborhood``: ``neighborhood((128, 128), 7)``, 4 heads, d 32: forward vs FlexAttention compiled with
  NATTEN's ``mask_mod`` (window start ``clamp(x - k // 2, 0, L - k)`` per axis; >= 3x), forward + backward
  timed; the 3-D ``neighborhood((16, 32, 32), (3, 5, 5))`` forward and forward + backward timed; when the
  ``natten`` package imports, its ``na2d`` on the same inputs (on a CPU it runs its Flex backend);
- ``h1``: H1 (12 heads, d 64, band radius 256 | global token 0, n 8192) planned from runs
  (``(band | global) & full(n)``: plan kind ``runs``) vs today's structured plan (``band | global``: plan kind
  ``structured``), forward and forward + backward: no slower, within noise (median of the per-round ratios
  <= 1.05).

Every timed call of the sections ``causal`` to ``h1`` is checked first against an independent reference
(float64 dense attention on sample rows of the full size, with the mask built here from the definition; the
backward on a reduced instance against float64 torch autograd; the peers against the same float64 rows), so
no section times a wrong answer; a failed check marks its section FAILED and the run goes on.  Their timings
are round-robin (every call of a section once per round, the order reversed every other round), medians over
the rounds; ratios are ratios of medians.  Prints one line per measurement; ``--json PATH`` writes every
figure with the machine (no file paths), the commit and whether the tree was dirty.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
import traceback
import tracemalloc

os.environ.setdefault("SPARSEATTN_COLD_START", "wait")  # time the fused kernels, never the cold-start fallback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import benchlib
from models_targets import (Report, check, check_fwd_bwd_small, chosen_sections, git_state, machine_info, med, ms,
                            round_robin, summary, verdict)  # fmt: skip

import sparseattn as sa
from sparseattn.engine.plan import build_plan, get_plan
from sparseattn.patterns.csr import _fold

SECTIONS = ("csr", "plans", "first_call", "rates", "causal", "documents", "neighborhood", "h1")
QUICK = False  # set by main() from --quick


def best(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def within(value, limit, unit):
    """``met (target <= 20 ms)`` or ``MISSED (...)``: ``value`` and ``limit`` in ``unit``."""
    return f"{'met' if value <= limit else 'MISSED'} (target <= {limit:g} {unit})"


def flex_lines(rep, res, times, sf, measured, flex_info, label, spelled):
    """The FlexAttention line of a section (its ratio to sparseattn's forward ``sf``, target >= 3), into ``res`` too."""
    if not measured:
        rep.line(f"{label} forward: FlexAttention not measured: {flex_info['error']}")
        return
    ff = med(times["flex fwd"])
    res.update(flex_fwd_s=ff, flex_ratio=ff / sf, flex_ratio_rounds=ratio_stats(times["flex fwd"], times["sparse fwd"]))
    rep.line(f"{label} forward: FlexAttention compiled{spelled} {ms(ff)} (block mask {ms(flex_info['block_mask_s'])}, "
             f"first call {ms(flex_info['first_call_s'])}, both untimed): Flex / sparseattn **{ff / sf:.2f}** "
             f"{verdict(ff / sf, '>=', 3)}")  # fmt: skip


def doc_lengths(n, k=64, seed=0):
    rng = np.random.default_rng(seed)
    return np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, n), k - 1, replace=False)), n])


# --------------------------------------------------------------------------------------------
# the pattern-side targets (csr, plans, first call, rates)
# --------------------------------------------------------------------------------------------


def report_csr(rep, args):
    n = 2048 if QUICK else 16384
    parts = (sa.sliding_window(n, 256), sa.global_tokens(n, range(32)))
    new = best(lambda: (parts[0] | parts[1]).csr, 3)
    old = best(lambda: _fold(parts, 0, n, union=True), 3)
    rep.line(f"csr demo n={n}: runs {new[0] * 1e3:.1f} ms, CSR fold {old[0] * 1e3:.1f} ms, ratio {old[0] / new[0]:.1f}x"
             f"  {within(new[0] * 1e3, 100, 'ms')}")
    return {"n": n, "runs_s": new[0], "csr_fold_s": old[0]}


def report_plans(rep, args):
    n = 8192 if QUICK else 131072
    cases = {
        f"causal({n})": lambda: sa.causal(n),
        f"documents(64) & causal({n})": lambda: sa.documents(doc_lengths(n)) & sa.causal(n),
        "neighborhood((256, 512), 7)" if not QUICK else "neighborhood((64, 128), 7)":
            lambda: sa.neighborhood((64, 128) if QUICK else (256, 512), 7),
    }
    res = {}
    for name, make in cases.items():
        new = best(lambda: build_plan(make()), 5)
        tracemalloc.start()
        plan = build_plan(make())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        p = make()
        try:
            old_s = best(lambda: build_plan(sa.from_sparse(p.csr), generic=True), 1)[0]
            old = f"{old_s * 1e3:.1f} ms"
        except MemoryError as e:  # the guard refuses the CSR (causal(131072): 8.6 G entries)
            old_s, old = None, f"refused ({type(e).__name__})"
        rep.line(f"build+plan {name}: {new[0] * 1e3:.1f} ms (median {new[1] * 1e3:.1f}), kind {plan.kind}, "
                 f"planner peak {peak / 2**20:.1f} MiB, plan {plan.nbytes / 2**20:.1f} MiB, nnz {p.nnz}, "
                 f"extra spans {len(plan.xs_k0)}, shared {len(plan.sh_cols)}, residual {int(np.sum(plan.rs_hi - plan.rs_lo))} in {len(plan.rs_lo)} runs; "
                 f"from CSR (incl. .csr) {old}  {within(new[0] * 1e3, 20, 'ms')}")
        res[name] = {"best_s": new[0], "median_s": new[1], "kind": plan.kind, "planner_peak_bytes": peak,
                     "plan_bytes": plan.nbytes, "nnz": p.nnz, "from_csr_s": old_s, "from_csr": old}  # fmt: skip
    return res


FIRST_CALL = r"""
import time, numpy as np
t0 = time.perf_counter()
import sparseattn as sa
from sparseattn import _memory
n = {n}
rng = np.random.default_rng(0)
L = np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, n), 63, replace=False)), n])
q, k, v = (rng.standard_normal((1, 2, n, 32), dtype=np.float32) for _ in range(3))
t1 = time.perf_counter()
out = sa.sparse_attention(q, k, v, sa.documents(L) & sa.causal(n), path="fused")
t2 = time.perf_counter()
print(f"{{t2 - t1:.3f}} {{t2 - t0:.3f}} {{_memory.status_kib('VmHWM') / 2**20:.3f}}")
"""


def report_first_call(rep, args):
    n = 8192 if QUICK else 65536
    env = dict(os.environ, SPARSEATTN_COLD_START="wait")
    subprocess.run([sys.executable, "-c", FIRST_CALL.format(n=n)], env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", FIRST_CALL.format(n=n)], env=env, check=True, capture_output=True,
                       text=True)  # fmt: skip
    call, total, rss = (float(x) for x in r.stdout.split())
    rep.line(f"first call documents(64) & causal({n}), 2 heads, d 32: {call:.2f} s (process {total:.2f} s), "
             f"peak RSS {rss:.2f} GiB  {within(call, 5, 's')}, {within(rss, 2, 'GiB')} (kernels from the cache)")
    return {"n": n, "call_s": call, "process_s": total, "peak_rss_gib": rss}


def gflops(pattern, heads, d, repeats=10):
    q, k, v = benchlib.qkv(heads, pattern.shape[0], d, np.float32)
    t = best(lambda: sa.sparse_attention(q, k, v, pattern, path="fused"), repeats)[0]
    return 4.0 * pattern.nnz * d * heads / t / 1e9, t


def paired(patterns, heads, d, rounds=5, backward=False):
    """Best seconds per pattern, the calls alternating (forward, or forward + backward), for one nnz each."""
    q, k, v = benchlib.qkv(heads, patterns[0].shape[0], d, np.float32)
    go = np.ones_like(q)

    def call(p):
        out, lse = sa.sparse_attention(q, k, v, p, path="fused", return_lse=True)
        if backward:
            sa.sparse_attention_backward(go, q, k, v, p, out, lse, path="fused")

    times = [[] for _ in patterns]
    for p in patterns:
        call(p)
    for _ in range(rounds):
        for i, p in enumerate(patterns):
            t0 = time.perf_counter()
            call(p)
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def report_dilated(rep, n):
    dil = sa.sliding_window(n, 512, dilation=2)
    band = sa.sliding_window(n, 256)
    as_csr = sa.from_sparse(dil.csr)  # the route before the regrouping: planned from the CSR's runs
    res = {}
    for what, backward, flops in (("forward", False, 4.0), ("forward+backward", True, 14.0)):
        # the target pair alternates alone: a CSR-route call (a second, gigabytes of index) between them left the
        # next call its page faults and cold caches; the CSR route is timed after, for its ratio only
        t_dil, t_band = paired([dil, band], 12, 64, backward=backward)
        (t_csr,) = paired([as_csr], 12, 64, rounds=2, backward=backward)
        rate = lambda p, t: flops * p.nnz * 64 * 12 / t / 1e9  # noqa: E731
        frac = t_band / t_dil * dil.nnz / band.nnz
        rep.line(f"dilated r512/2 n={n} {what}: regrouped {rate(dil, t_dil):.0f} GFLOP/s ({t_dil * 1e3:.1f} ms), "
                 f"undilated r256 {rate(band, t_band):.0f} GFLOP/s ({t_band * 1e3:.1f} ms), as CSR "
                 f"{rate(as_csr, t_csr):.0f} GFLOP/s ({t_csr * 1e3:.1f} ms): {frac:.0%} "
                 f"of the band ({verdict(frac, '>=', 0.7)}), {t_csr / t_dil:.2f}x the CSR route")
        res[what] = {"regrouped_s": t_dil, "band_s": t_band, "csr_s": t_csr, "fraction_of_band": frac}
    return res


def report_rates(rep, args):
    n = 2048 if QUICK else 8192
    gemm = benchlib.gemm_rate()["gemm_gflops"]
    res = {"gemm_gflops": gemm, "dilated": report_dilated(rep, n)}
    grid = (32, 64) if QUICK else (128, 128)
    for name, p, heads in (("band r32", sa.sliding_window(n, 32), 12), ("causal window 128", sa.causal(n, 127), 12),
                           (f"neighborhood({grid}, 7)", sa.neighborhood(grid, 7), 4)):  # fmt: skip
        rate, t = gflops(p, heads, 64)
        rep.line(f"{name} n={p.shape[0]}: {rate:.0f} GFLOP/s ({t * 1e3:.1f} ms), {rate / gemm:.0%} of the float32 GEMM "
                 f"({gemm:.0f} GFLOP/s) {verdict(rate / gemm, '>=', 0.4)}")
        res[name] = {"gflops": rate, "s": t, "gemm_fraction": rate / gemm}
    return res


# --------------------------------------------------------------------------------------------
# the engine-side targets (causal, documents, neighbourhoods, H1): paired, checked first
# --------------------------------------------------------------------------------------------


def inputs(heads, n, d, seed=0):
    """q, k, v, grad_out ``(1, heads, n, d)`` float32 and torch copies (q, k, v requiring grad, grad_out)."""
    import torch

    rng = np.random.default_rng(seed)
    arrs = [rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(4)]
    ts = [torch.from_numpy(a.copy()) for a in arrs]
    for t in ts[:3]:
        t.requires_grad_()
    return arrs, ts


def sample_rows(n, extra=8, seed=1):
    """benchlib's check rows (edges, middle) and ``extra`` random rows."""
    rng = np.random.default_rng(seed)
    return np.unique(np.r_[benchlib.check_rows(n), rng.integers(0, n, extra)]).astype(np.int64)


def check_rows_vs_f64(name, out, q, k, v, mask_rows, rows, errors, tol=1e-4):
    """``out`` ``(1, h, n, d)`` on ``rows`` vs float64 dense attention with the boolean ``mask_rows``."""
    ref = benchlib.oracle_rows(q[0], k[0], v[0], mask_rows, rows)
    check(name, np.asarray(out)[0][:, rows], ref, tol, errors)


def ratio_stats(num, den):
    """Per-round ratios ``num / den`` (both timed every round): median, min, max."""
    r = np.asarray(num) / np.asarray(den)
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


def sparse_calls(q, k, v, go, pattern):
    def fwd():
        return sa.sparse_attention(q, k, v, pattern, path="fused")

    def fwd_bwd():
        out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, path="fused")
        return sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused")

    return fwd, fwd_bwd


def flex_peer(ts, mask_mod, n):
    """FlexAttention compiled (CPU) on the torch inputs, forward, or ``(None, error)`` when it fails."""
    import torch

    try:
        from torch.nn.attention.flex_attention import create_block_mask

        t0 = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, n, n, device="cpu")
        setup = time.perf_counter() - t0
        flex = benchlib._compiled_flex((tuple(ts[0].shape), str(ts[0].dtype)))
        tq, tk, tv = (t.detach() for t in ts[:3])

        def fwd():
            with torch.inference_mode():
                return flex(tq, tk, tv, block_mask=block_mask)

        t0 = time.perf_counter()
        out = fwd()
        first = time.perf_counter() - t0
        return fwd, {"block_mask_s": setup, "first_call_s": first, "out": out.numpy()}
    except Exception as e:  # noqa: BLE001 - record why, go on without the peer
        return None, {"error": f"{type(e).__name__}: {e}"}


FLEX_BACKWARD = r"""
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
n, h, d = 256, 2, {d}
doc = torch.arange(n) // 32
bm = create_block_mask(lambda b, hh, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, n, n, device="cpu")
q, k, v = (torch.randn(1, h, n, d, requires_grad=True) for _ in range(3))
try:
    torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm).sum().backward()
    print("ran (no error)")
except Exception as e:
    print(f"{{type(e).__name__}}: {{str(e).splitlines()[0] if str(e) else ''}}")
"""


def flex_backward_error(d):
    """What compiled FlexAttention does with inputs that require grad on a CPU (a small document mask).

    In a fresh process: a compile that raised inside this one would leave flex_attention running eagerly
    (seen: the timed compiled calls 30x slower after such a probe).
    """
    try:
        r = subprocess.run([sys.executable, "-c", FLEX_BACKWARD.format(d=d)], check=False, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        lines = r.stdout.strip().splitlines()
        return lines[-1] if lines else f"probe failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"probe failed: {type(e).__name__}: {e}"


def section_causal(rep, args):
    import torch

    F = torch.nn.functional
    heads, d = 8, 64
    n = args.causal_n
    pattern = sa.causal(n)
    rep.line(f"causal({n}), {heads} heads, d {d}, float32, path fused; torch SDPA is_causal=True "
             f"({torch.get_num_threads()} threads); {args.causal_rounds} rounds")
    (q, k, v, go), ts = inputs(heads, n, d)
    tq, tk, tv, tg = ts
    sparse_f, sparse_fb = sparse_calls(q, k, v, go, pattern)

    def sdpa_f():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    def sdpa_fb():
        for t in (tq, tk, tv):
            t.grad = None
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(tg)

    errors = {}
    rows = sample_rows(n)
    mask = np.arange(n)[None, :] <= rows[:, None]
    out = sparse_f()
    check_rows_vs_f64("sparseattn forward, sample rows vs float64", out, q, k, v, mask, rows, errors)
    check_rows_vs_f64("SDPA is_causal, sample rows vs float64", sdpa_f().numpy(), q, k, v, mask, rows, errors)
    ns = min(n, 1024)
    check_fwd_bwd_small(f"forward+backward, n {ns}, 2 heads", 2, 2, ns, d, sa.causal(ns), np.tril(np.ones((ns, ns), bool)), errors)
    # memory: the forward call once more, its peak over the resident set before it, less its output
    _, mem = benchlib.measure_peak(sparse_f)
    io_bytes = 4 * out.nbytes  # q, k, v, out (same shapes)
    rss_extra = max(0, mem.get("rss_peak_delta_bytes", 0) - out.nbytes) if "rss_peak_delta_bytes" in mem else None
    tm_extra = max(0, mem["tracemalloc_peak_bytes"] - out.nbytes)
    del out
    times = round_robin({"sparse fwd": sparse_f, "sdpa fwd": sdpa_f, "sparse fwd+bwd": sparse_fb,
                         "sdpa fwd+bwd": sdpa_fb}, args.causal_rounds)  # fmt: skip
    sf, df_, sfb, dfb = (med(times[x]) for x in ("sparse fwd", "sdpa fwd", "sparse fwd+bwd", "sdpa fwd+bwd"))
    rep.line(f"causal({n}) forward: sparseattn {ms(sf)}, SDPA {ms(df_)}: SDPA / sparseattn **{df_ / sf:.2f}** "
             f"{verdict(df_ / sf, '>=', 2)}")
    rep.line(f"causal({n}) forward+backward: sparseattn {ms(sfb)}, SDPA {ms(dfb)}: SDPA / sparseattn "
             f"**{dfb / sfb:.2f}** {verdict(dfb / sfb, '>=', 2)}")
    if rss_extra is not None:
        rep.line(f"causal({n}) forward extra peak memory (peak RSS delta less the output): {rss_extra / 2**20:.1f} MiB "
                 f"= **{rss_extra / io_bytes:.3f}x** q, k, v and out ({io_bytes / 2**20:.0f} MiB) "
                 f"{verdict(rss_extra / io_bytes, '<=', 0.1)}; tracemalloc peak less the output "
                 f"{tm_extra / 2**20:.1f} MiB ({tm_extra / io_bytes:.3f}x)")
    else:
        rep.line(f"causal({n}) forward extra peak memory: RSS high-water mark cannot be reset here; tracemalloc peak "
                 f"less the output {tm_extra / 2**20:.1f} MiB = {tm_extra / io_bytes:.3f}x q, k, v and out "
                 f"{verdict(tm_extra / io_bytes, '<=', 0.1)} (misses Numba's allocations)")
    rep.line(f"checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    return {"n": n, "heads": heads, "d": d, "sparse_fwd_s": sf, "sdpa_fwd_s": df_, "sparse_fwdbwd_s": sfb,
            "sdpa_fwdbwd_s": dfb, "fwd_ratio": df_ / sf, "fwdbwd_ratio": dfb / sfb,
            "fwd_ratio_rounds": ratio_stats(times["sdpa fwd"], times["sparse fwd"]),
            "fwdbwd_ratio_rounds": ratio_stats(times["sdpa fwd+bwd"], times["sparse fwd+bwd"]),
            "qkv_out_bytes": io_bytes, "rss_extra_bytes": rss_extra, "tracemalloc_extra_bytes": tm_extra,
            "memory": mem, "checks": errors, "timings": summary(times)}  # fmt: skip


def section_documents(rep, args):
    import torch

    F = torch.nn.functional
    heads, d = 8, 64
    n = args.docs_n
    lengths = doc_lengths(n)
    pattern = sa.documents(lengths) & sa.causal(n)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    rep.line(f"documents(64 random lengths, {lengths.min()}..{lengths.max()} tokens) & causal({n}), {heads} heads, "
             f"d {d}, float32, nnz {pattern.nnz} per head ({pattern.nnz / n**2:.2%} of n^2); {args.docs_rounds} rounds")
    (q, k, v, go), ts = inputs(heads, n, d)
    tq, tk, tv = (t.detach() for t in ts[:3])
    sparse_f, sparse_fb = sparse_calls(q, k, v, go, pattern)
    dense_mask = torch.from_numpy((doc[:, None] == doc[None, :]) & np.tri(n, dtype=bool))

    def sdpa_f():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=dense_mask)

    tdoc = torch.from_numpy(doc)

    def doc_mask_mod(b, h, qi, ki):
        return (tdoc[qi] == tdoc[ki]) & (qi >= ki)

    errors = {}
    rows = sample_rows(n)
    mask = (doc[rows][:, None] == doc[None, :]) & (np.arange(n)[None, :] <= rows[:, None])
    check_rows_vs_f64("sparseattn forward, sample rows vs float64", sparse_f(), q, k, v, mask, rows, errors)
    check_rows_vs_f64("SDPA (dense bool mask), sample rows vs float64", sdpa_f().numpy(), q, k, v, mask, rows, errors)
    flex_f, flex_info = flex_peer(ts, doc_mask_mod, n)
    if flex_f is not None:
        check_rows_vs_f64("FlexAttention, sample rows vs float64", flex_info.pop("out"), q, k, v, mask, rows, errors)
    ns = min(n, 1024)
    ls = doc_lengths(ns, 16)
    ds = np.repeat(np.arange(len(ls)), ls)
    check_fwd_bwd_small(f"forward+backward, n {ns}, 16 documents, 2 heads", 2, 2, ns, d, sa.documents(ls) & sa.causal(ns),
                        (ds[:, None] == ds[None, :]) & np.tri(ns, dtype=bool), errors)  # fmt: skip
    flex_bwd = flex_backward_error(d) if flex_f is not None else None
    entries = {"sparse fwd": sparse_f, "sdpa fwd": sdpa_f, "sparse fwd+bwd": sparse_fb}
    if flex_f is not None:
        entries["flex fwd"] = flex_f
    times = round_robin(entries, args.docs_rounds)
    sf, df_, sfb = (med(times[x]) for x in ("sparse fwd", "sdpa fwd", "sparse fwd+bwd"))
    res = {"n": n, "heads": heads, "d": d, "lengths": lengths.tolist(), "nnz": pattern.nnz, "sparse_fwd_s": sf,
           "sdpa_mask_fwd_s": df_, "sparse_fwdbwd_s": sfb, "sdpa_ratio": df_ / sf,
           "sdpa_ratio_rounds": ratio_stats(times["sdpa fwd"], times["sparse fwd"]), "flex": flex_info,
           "flex_backward_error": flex_bwd}  # fmt: skip
    rep.line(f"documents forward: sparseattn {ms(sf)}, SDPA (dense bool mask) {ms(df_)}: SDPA / sparseattn "
             f"**{df_ / sf:.1f}** {verdict(df_ / sf, '>=', 10)}")
    flex_lines(rep, res, times, sf, flex_f is not None, flex_info, "documents", "")
    rep.line(f"documents forward+backward: sparseattn {ms(sfb)} (runs); FlexAttention compiled with inputs requiring "
             f"grad on CPU (n 256, in a fresh process): {flex_bwd or 'not tried'}")
    rep.line(f"checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    res.update(checks=errors, timings=summary(times))
    return res


def natten_window(x, L, k):
    """NATTEN's window along one axis (dilation 1, not causal): ``[start, start + k)``, shifted at the borders."""
    start = np.clip(x - k // 2, 0, L - k)
    return start, start + k


def grid_mask_rows(shape, kernel, rows):
    """Boolean mask rows of the NATTEN neighbourhood on a row-major grid, from the definition (per axis)."""
    n = int(np.prod(shape))
    keys = np.arange(n)
    m = np.ones((len(rows), n), dtype=bool)
    for a, (L, kk) in enumerate(zip(shape, kernel)):
        stride = int(np.prod(shape[a + 1 :]))
        xq, xk = (rows // stride) % L, (keys // stride) % L
        lo, hi = natten_window(xq, L, kk)
        m &= (xk[None, :] >= lo[:, None]) & (xk[None, :] < hi[:, None])
    return m


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def natten_peer(q, k, v, shape, kernel):
    """``natten.functional.na2d`` on the same inputs (forward), or ``(None, why)``."""
    try:
        import natten
        import torch
        from natten.functional import na2d
    except ImportError as e:
        return None, {"error": f"natten does not import ({e}); `pip install natten` (0.21.7: pure Python, on a CPU "
                               "its Flex backend) to compare"}  # fmt: skip
    H, W = shape
    heads, d = q.shape[1], q.shape[3]
    scores = heads * (H * W) ** 2 * 4  # its eager Flex backend holds the dense float32 scores
    avail = _mem_available()
    if avail is not None and 4 * scores > avail:
        return None, {"version": natten.__version__, "error": f"natten {natten.__version__} skipped: its eager Flex "
                      f"backend holds {scores / 2**30:.1f} GiB of scores (and temporaries), {avail / 2**30:.1f} GiB "
                      "available"}  # fmt: skip
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(a[0].reshape(heads, H, W, d).transpose(1, 2, 0, 3)))[None]
                  for a in (q, k, v))  # fmt: skip

    def fwd():
        with torch.inference_mode():
            return na2d(tq, tk, tv, kernel_size=kernel)

    try:
        t0 = time.perf_counter()
        out = fwd()
        first = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        return None, {"version": natten.__version__, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    out = out[0].numpy().transpose(2, 0, 1, 3).reshape(1, heads, H * W, d)
    return fwd, {"version": natten.__version__, "first_call_s": first, "out": out,
                 "note": "natten chooses its backend (on a CPU: flex-fna, not compiled: NATTEN compiles Flex only for "
                         "float16/bfloat16)"}  # fmt: skip


def section_neighborhood(rep, args):
    heads, d = 4, 32
    H, W = args.nb_grid
    K = 7
    n = H * W
    pattern = sa.neighborhood((H, W), K)
    rep.line(f"neighborhood(({H}, {W}), {K}), {heads} heads, d {d}, float32, nnz {pattern.nnz} per head; "
             f"{args.nb_rounds} rounds")
    (q, k, v, go), ts = inputs(heads, n, d)
    sparse_f, sparse_fb = sparse_calls(q, k, v, go, pattern)

    def natten_mask_mod(b, h, qi, ki):  # NATTEN's rule per axis: start = clamp(x - K // 2, 0, L - K)
        qy, qx, ky, kx = qi // W, qi % W, ki // W, ki % W
        sy = (qy - K // 2).clamp(0, H - K)
        sx = (qx - K // 2).clamp(0, W - K)
        return (ky >= sy) & (ky < sy + K) & (kx >= sx) & (kx < sx + K)

    errors = {}
    rows = sample_rows(n)
    mask = grid_mask_rows((H, W), (K, K), rows)
    got = pattern.rows(int(rows.min()), int(rows.max()) + 1)  # the pattern itself vs the definition, on these rows
    dense = np.zeros((int(rows.max() - rows.min()) + 1, n), bool)
    dense[np.repeat(np.arange(dense.shape[0]), np.diff(got.indptr)), got.indices] = True
    if not np.array_equal(dense[rows - rows.min()], mask):
        raise AssertionError("neighborhood((H, W), 7) differs from NATTEN's definition on the sample rows")
    check_rows_vs_f64("sparseattn forward, sample rows vs float64", sparse_f(), q, k, v, mask, rows, errors)
    flex_f, flex_info = flex_peer(ts, natten_mask_mod, n)
    if flex_f is not None:
        check_rows_vs_f64("FlexAttention, sample rows vs float64", flex_info.pop("out"), q, k, v, mask, rows, errors)
    nat_f, nat_info = natten_peer(q, k, v, (H, W), K)
    if nat_f is not None:
        check_rows_vs_f64("natten na2d, sample rows vs float64", nat_info.pop("out"), q, k, v, mask, rows, errors)
    gs = (16, 16)
    ms_ = grid_mask_rows(gs, (K, K), np.arange(256))
    check_fwd_bwd_small("2-D forward+backward, 16x16 grid, kernel 7, 2 heads", 2, 2, 256, d, sa.neighborhood(gs, K), ms_, errors)
    # 3-D
    g3, k3 = args.nb_grid3, (3, 5, 5)
    p3 = sa.neighborhood(g3, k3)
    n3 = int(np.prod(g3))
    (q3, k3_, v3, go3), _ = inputs(heads, n3, d, seed=2)
    s3_f, s3_fb = sparse_calls(q3, k3_, v3, go3, p3)
    rows3 = sample_rows(n3)
    check_rows_vs_f64(f"3-D {g3} forward, sample rows vs float64", s3_f(), q3, k3_, v3, grid_mask_rows(g3, k3, rows3),
                      rows3, errors)  # fmt: skip
    gs3 = (4, 8, 8)
    check_fwd_bwd_small(f"3-D forward+backward, {gs3} grid, kernel {k3}, 2 heads", 2, 2, 256, d, sa.neighborhood(gs3, k3),
                        grid_mask_rows(gs3, k3, np.arange(256)), errors)  # fmt: skip
    entries = {"sparse fwd": sparse_f, "sparse fwd+bwd": sparse_fb, "3-D fwd": s3_f, "3-D fwd+bwd": s3_fb}
    if flex_f is not None:
        entries["flex fwd"] = flex_f
    if nat_f is not None:
        entries["natten fwd"] = (nat_f, args.nb_rounds)  # an O(n^2) eager call: timed on the first round only
    times = round_robin(entries, args.nb_rounds)
    sf, sfb, tf3, tfb3 = (med(times[x]) for x in ("sparse fwd", "sparse fwd+bwd", "3-D fwd", "3-D fwd+bwd"))
    res = {"grid": [H, W], "kernel": K, "heads": heads, "d": d, "nnz": pattern.nnz, "sparse_fwd_s": sf,
           "sparse_fwdbwd_s": sfb, "grid3": list(g3), "kernel3": list(k3), "nnz3": p3.nnz, "sparse3_fwd_s": tf3,
           "sparse3_fwdbwd_s": tfb3, "flex": flex_info, "natten": nat_info}  # fmt: skip
    rep.line(f"neighborhood(({H}, {W}), 7) forward: sparseattn {ms(sf)} ({4.0 * pattern.nnz * d * heads / sf / 1e9:.0f} "
             f"GFLOP/s); forward+backward {ms(sfb)} (runs)")
    flex_lines(rep, res, times, sf, flex_f is not None, flex_info, "neighborhood", " (NATTEN mask_mod)")
    if nat_f is not None:
        nf = med(times["natten fwd"])
        res.update(natten_fwd_s=nf, natten_ratio=nf / sf)
        rep.line(f"neighborhood forward: natten {nat_info['version']} na2d {ms(nf)} (one timed call; first call "
                 f"{ms(nat_info['first_call_s'])}): natten / sparseattn **{nf / sf:.2f}** ({nat_info['note']})")
    else:
        rep.line(f"neighborhood forward: natten not measured: {nat_info['error']}")
    rep.line(f"neighborhood({g3}, {k3}) (n {n3}, nnz {p3.nnz} per head): forward {ms(tf3)}, forward+backward "
             f"{ms(tfb3)} (runs)")
    rep.line(f"checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    res.update(checks=errors, timings=summary(times))
    return res


def section_h1(rep, args):
    H1 = benchlib.H1
    heads, d, radius = H1["heads"], H1["d"], H1["radius"]
    n = args.h1_n
    structured = sa.sliding_window(n, radius) | sa.global_tokens(n, benchlib.global_indices(n, H1["globals"]))
    runs = structured & sa.full(n)  # the same set, not a band | globals union: planned from its runs
    kinds = {"structured": get_plan(structured).kind, "runs": get_plan(runs).kind}
    if kinds != {"structured": "structured", "runs": "runs"}:
        raise AssertionError(f"plan kinds {kinds}: expected structured and runs")
    if not runs == structured:
        raise AssertionError("(band | global) & full(n) differs from band | global")
    rep.line(f"H1 (n {n}, {heads} heads, d {d}, radius {radius}, {H1['globals']} global): structured "
             f"`sliding_window | global_tokens` (plan kind {kinds['structured']}) vs runs `(...) & full(n)` "
             f"(plan kind {kinds['runs']}), nnz {structured.nnz}; {args.h1_rounds} rounds")
    (q, k, v, go), _ = inputs(heads, n, d)
    st_f, st_fb = sparse_calls(q, k, v, go, structured)
    ru_f, ru_fb = sparse_calls(q, k, v, go, runs)
    errors = {}
    rows = sample_rows(n)
    mask = np.concatenate([benchlib.dense_mask_rows(n, radius, H1["globals"], r, r + 1) for r in rows])
    out_s, out_r = st_f(), ru_f()
    check_rows_vs_f64("structured forward, sample rows vs float64", out_s, q, k, v, mask, rows, errors)
    check_rows_vs_f64("runs forward, sample rows vs float64", out_r, q, k, v, mask, rows, errors)
    check("runs vs structured forward (all rows)", out_r, out_s, 1e-5, errors)
    gs, gr = st_fb(), ru_fb()
    for nm, a, b in zip(("dq", "dk", "dv"), gr[:3], gs[:3]):
        check(f"runs vs structured {nm} (all rows)", a, b, 1e-4, errors)
    ns = min(n, 1024)
    small = sa.sliding_window(ns, radius) | sa.global_tokens(ns, [0])
    check_fwd_bwd_small(f"runs forward+backward, n {ns}, 2 heads", 2, 2, ns, d, small & sa.full(ns),
                        benchlib.dense_mask_rows(ns, radius, 1, 0, ns), errors)  # fmt: skip
    del out_s, out_r, gs, gr
    times = round_robin({"structured fwd": st_f, "runs fwd": ru_f, "structured fwd+bwd": st_fb, "runs fwd+bwd": ru_fb},
                        args.h1_rounds)  # fmt: skip
    res = {"n": n, "heads": heads, "d": d, "radius": radius, "plan_kinds": kinds}
    for what in ("fwd", "fwd+bwd"):
        a, b = med(times[f"runs {what}"]), med(times[f"structured {what}"])
        r = ratio_stats(times[f"runs {what}"], times[f"structured {what}"])
        res[what] = {"runs_s": a, "structured_s": b, "ratio_of_medians": a / b, "ratio_rounds": r}
        rep.line(f"H1 {what}: runs {ms(a)}, structured {ms(b)}: runs / structured {a / b:.3f} (per round: median "
                 f"**{r['median']:.3f}**, {r['min']:.2f}..{r['max']:.2f}) {verdict(r['median'], '<=', 1.05)}")
    rep.line(f"checks: worst error {max(errors.values()):.1e} over {len(errors)}")
    res.update(checks=errors, timings=summary(times))
    return res


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run at small sizes (checks that it works; no measurement)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every paired section (default: per section)")
    args = ap.parse_args(argv)
    Q = args.quick
    args.causal_n = 2048 if Q else 32768
    args.causal_rounds = args.rounds or 3
    args.docs_n = 2048 if Q else 16384
    args.docs_rounds = args.rounds or (3 if Q else 5)
    args.nb_grid = (32, 64) if Q else (128, 128)
    args.nb_grid3 = (4, 16, 32) if Q else (16, 32, 32)
    args.nb_rounds = args.rounds or (3 if Q else 5)
    args.h1_n = 2048 if Q else 8192
    args.h1_rounds = args.rounds or (5 if Q else 15)
    return args


def scrub(text):
    """``text`` without this machine's paths (the interpreter, the checkout, site-packages) for the JSON."""
    text = text.replace(sys.executable, "python").replace(os.path.dirname(HERE) + os.sep, "")
    return re.sub(r'"/[^"]*/((?:site|dist)-packages/[^"]+)"', r'"\1"', text)


def main(argv=None):
    global QUICK
    args = parse_args(argv)
    QUICK = args.quick
    wanted = chosen_sections(args.sections, SECTIONS)
    rep = Report()
    t_start = time.perf_counter()
    info = machine_info()
    info["commit"], info["dirty"] = git_state()
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rep.line(f"# Issue 18 targets{' (--quick: small sizes, smoke run only)' if args.quick else ''}")
    rep.line(f"command: python benchmarks/runs_targets.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    rep.line(f"commit {info['commit']}{' (dirty tree)' if info['dirty'] else ''}; CPU {info['cpu_model']}, features "
             f"{info['cpu_features']}, {info['cpu_count']} CPUs ({info['affinity']} usable)")  # fmt: skip
    b = info["blas"]
    rep.line(f"NumPy {info['numpy']} BLAS {b.get('internal_api')} {b.get('version')} kernel {b.get('architecture')}, "
             f"{b.get('num_threads')} threads; Numba {info['numba']} ({info['numba_threads']} threads); torch "
             f"{info.get('torch')} ({info.get('torch_threads')} threads); load average at start {load0}")  # fmt: skip
    results = {"machine": info, "quick": args.quick, "load_start": load0, "sections": {}}
    funcs = {"csr": report_csr, "plans": report_plans, "first_call": report_first_call, "rates": report_rates,
             "causal": section_causal, "documents": section_documents, "neighborhood": section_neighborhood,
             "h1": section_h1}  # fmt: skip
    for name in wanted:
        rep.line()
        rep.line(f"## {name}")
        t0 = time.perf_counter()
        try:
            res = funcs[name](rep, args)
            res["section_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one failed section must not hide the others
            rep.line(f"**FAILED**: {type(e).__name__}: {e}")
            res = {"error": scrub(f"{type(e).__name__}: {e}"), "traceback": scrub(traceback.format_exc())}
            traceback.print_exc()
        results["sections"][name] = res
        rep.line(f"(section took {time.perf_counter() - t0:.0f} s)")
        gc.collect()
    load1 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["load_end"] = load1
    results["total_s"] = time.perf_counter() - t_start
    rep.line()
    rep.line(f"load average at end {load1}; total {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        rep.line(f"figures written to {args.json}")
    return 1 if any("error" in r for r in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
