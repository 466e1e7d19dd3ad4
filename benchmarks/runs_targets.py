"""Issue 18's run-pattern targets, each paired with the old route in one process (run it alone).

    python benchmarks/runs_targets.py [--quick]

- ``.csr`` of the demo's pattern (n 16,384, radius 256, 32 global tokens): from runs vs the CSR fold of
  the parts (the route before runs), target <= 100 ms;
- build + plan of ``causal(131072)``, ``documents(64 random) & causal(131072)``, ``neighborhood((256, 512), 7)``
  from runs vs the same pattern planned from its CSR, target <= 20 ms each, with the planner's peak
  (tracemalloc);
- the first call of ``documents(64 random) & causal(65536)``, 2 heads, d 32, float32 (pattern, plan and
  attention, kernels from the cache) in a fresh process: target <= 5 s and a peak resident set <= 2 GiB;
- a dilated window ``sliding_window(8192, 512, dilation=2)`` (regrouped into one band per residue class,
  ``engine/regroup.py``), forward and forward + backward, against the undilated band of the same keys per row
  and against the same window given as CSR (the route before the regrouping), paired in alternation;
- the short rows (band radius 32, causal window 128; 12 heads, d 64, n 8192) and the 2-D neighbourhood 7x7
  (128 x 128 tokens, 4 heads, d 64: extra spans per tile) against the float32 GEMM.
Prints one line per measurement, the ratios, the CPU's vector features and the BLAS kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

import benchlib

import sparseattn as sa
from sparseattn.engine.plan import build_plan
from sparseattn.patterns.csr import _fold

QUICK = "--quick" in sys.argv


def best(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def doc_lengths(n, k=64, seed=0):
    rng = np.random.default_rng(seed)
    return np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, n), k - 1, replace=False)), n])


def report_csr():
    n = 2048 if QUICK else 16384
    parts = (sa.sliding_window(n, 256), sa.global_tokens(n, range(32)))
    new = best(lambda: (parts[0] | parts[1]).csr, 3)
    old = best(lambda: _fold(parts, 0, n, union=True), 3)
    print(f"csr demo n={n}: runs {new[0] * 1e3:.1f} ms, CSR fold {old[0] * 1e3:.1f} ms, ratio {old[0] / new[0]:.1f}x"
          f"  (target <= 100 ms)")


def report_plans():
    n = 8192 if QUICK else 131072
    cases = {
        f"causal({n})": lambda: sa.causal(n),
        f"documents(64) & causal({n})": lambda: sa.documents(doc_lengths(n)) & sa.causal(n),
        "neighborhood((256, 512), 7)" if not QUICK else "neighborhood((64, 128), 7)":
            lambda: sa.neighborhood((64, 128) if QUICK else (256, 512), 7),
    }
    for name, make in cases.items():
        new = best(lambda: build_plan(make()), 5)
        tracemalloc.start()
        plan = build_plan(make())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        p = make()
        try:
            old = f"{best(lambda: build_plan(sa.from_sparse(p.csr), generic=True), 1)[0] * 1e3:.1f} ms"
        except MemoryError as e:  # the guard refuses the CSR (causal(131072): 8.6 G entries)
            old = f"refused ({type(e).__name__})"
        print(f"build+plan {name}: {new[0] * 1e3:.1f} ms (median {new[1] * 1e3:.1f}), kind {plan.kind}, "
              f"planner peak {peak / 2**20:.1f} MiB, plan {plan.nbytes / 2**20:.1f} MiB, nnz {p.nnz}, "
              f"extra spans {len(plan.xs_k0)}, shared {len(plan.sh_cols)}, residual {len(plan.rs_cols)}; "
              f"from CSR (incl. .csr) {old}  (target <= 20 ms)")


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


def report_first_call():
    n = 8192 if QUICK else 65536
    env = dict(os.environ, SPARSEATTN_COLD_START="wait")
    subprocess.run([sys.executable, "-c", FIRST_CALL.format(n=n)], env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", FIRST_CALL.format(n=n)], env=env, check=True, capture_output=True,
                       text=True)  # fmt: skip
    call, total, rss = (float(x) for x in r.stdout.split())
    print(f"first call documents(64) & causal({n}), 2 heads, d 32: {call:.2f} s (process {total:.2f} s), "
          f"peak RSS {rss:.2f} GiB  (target <= 5 s, <= 2 GiB; kernels from the cache)")


def gflops(pattern, heads, d, repeats=3):
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


def report_dilated(n):
    dil = sa.sliding_window(n, 512, dilation=2)
    band = sa.sliding_window(n, 256)
    as_csr = sa.from_sparse(dil.csr)  # the route before the regrouping: planned from the CSR's runs
    for what, backward, flops in (("forward", False, 4.0), ("forward+backward", True, 14.0)):
        t_dil, t_band, t_csr = paired([dil, band, as_csr], 12, 64, backward=backward)
        rate = lambda p, t: flops * p.nnz * 64 * 12 / t / 1e9  # noqa: E731
        print(f"dilated r512/2 n={n} {what}: regrouped {rate(dil, t_dil):.0f} GFLOP/s ({t_dil * 1e3:.1f} ms), "
              f"undilated r256 {rate(band, t_band):.0f} GFLOP/s ({t_band * 1e3:.1f} ms), as CSR "
              f"{rate(as_csr, t_csr):.0f} GFLOP/s ({t_csr * 1e3:.1f} ms): {t_band / t_dil * dil.nnz / band.nnz:.0%} "
              f"of the band (target >= 70%), {t_csr / t_dil:.2f}x the CSR route")


def report_rates():
    n = 2048 if QUICK else 8192
    gemm = benchlib.gemm_rate()["gemm_gflops"]
    report_dilated(n)
    grid = (32, 64) if QUICK else (128, 128)
    for name, p, heads in (("band r32", sa.sliding_window(n, 32), 12), ("causal window 128", sa.causal(n, 127), 12),
                           (f"neighborhood({grid}, 7)", sa.neighborhood(grid, 7), 4)):  # fmt: skip
        rate, t = gflops(p, heads, 64)
        print(f"{name} n={n}: {rate:.0f} GFLOP/s ({t * 1e3:.1f} ms), {rate / gemm:.0%} of the float32 GEMM "
              f"({gemm:.0f} GFLOP/s)")


def report_machine():
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    vec = [x for x in ("avx512f", "avx512_bf16", "avx2", "fma") if f" {x}" in flags]
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"cpu features {vec}, BLAS {benchlib.blas_info().get('architecture')}, load average {load}")


if __name__ == "__main__":
    report_machine()
    report_csr()
    report_plans()
    report_first_call()
    report_rates()
    report_machine()
