"""The first call in a fresh environment: fresh processes, each with an empty Numba cache.

A: the default (``SPARSEATTN_COLD_START=background``): the first call runs on the
blocked path while the fused kernels compile in a background thread.
B: ``SPARSEATTN_COLD_START=wait``: the first call compiles the fused kernels
itself, as before the cold-start work.
Then C: a fresh process that finds B's kernels in the cache (the second run ever).

Each round runs A and B one after the other (alternating who goes first), so
both see the same machine load; the workload is the issue's: float32, 12 heads,
n 2048, d 64, a window of 512 plus one global token. Times come from inside
each process (``time.perf_counter`` around the call); whole-process wall times
(A's includes waiting for the background compile at exit, so that the kernels
reach the cache) are recorded too.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import benchlib
import numpy as np

_SCRIPT = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import sparseattn as sa
from sparseattn.engine import coldstart as _coldstart
t_import = time.perf_counter() - t0
rng = np.random.default_rng(0)
h, n, d = 12, 2048, 64
q, k, v = (rng.standard_normal((h, n, d), dtype=np.float32) for _ in range(3))
p = sa.longformer(n, attention_window=512, global_indices=[0])
t0 = time.perf_counter()
out = sa.sparse_attention(q, k, v, p)
t_first = time.perf_counter() - t0
background = _coldstart.compiling()
from sparseattn.reference import dense_attention
ref = dense_attention(q[:1], k[:1], v[:1], p, rows=(0, 256))
err = float(np.abs(out[:1, :256] - ref).max() / np.abs(ref).max())
print(json.dumps(dict(import_s=t_import, first_call_s=t_first, blocked_first=background, max_rel_error_vs_float64=err)))
"""

TARGET_S = 6.0


def _fresh(mode, cache):
    env = dict(os.environ)
    env["SPARSEATTN_COLD_START"] = mode
    env["NUMBA_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    rec = json.loads(done.stdout.strip().splitlines()[-1])
    rec["process_s"] = wall
    assert rec["max_rel_error_vs_float64"] < 2e-5, rec
    return rec


def test_first_call_fresh_environment(benchmark):
    rounds = 1 if benchlib.quick() else 3
    series = {"background": [], "wait": [], "warm": []}
    state = {"i": 0}

    def pair():
        order = ("background", "wait") if state["i"] % 2 == 0 else ("wait", "background")
        state["i"] += 1
        for mode in order:
            with tempfile.TemporaryDirectory() as cache:
                series[mode].append(_fresh(mode, cache))
                if mode == "wait":  # the next process finds the kernels in this cache
                    series["warm"].append(_fresh("background", cache))

    benchmark.group = "cold start"
    benchmark.pedantic(pair, rounds=rounds, iterations=1, warmup_rounds=0)
    assert all(r["blocked_first"] for r in series["background"])  # answered while the kernels compiled
    assert not any(r["blocked_first"] for r in series["wait"] + series["warm"])

    def med(mode, key):
        return float(np.median([r[key] for r in series[mode]]))

    ta = [r["first_call_s"] for r in series["background"]]
    tb = [r["first_call_s"] for r in series["wait"]]
    label = "first float32 call (12 heads, n 2048, window 512 + 1 global), fresh process, empty Numba cache"
    benchmark.extra_info.update(
        paired=dict(label=f"{label}: compile in the caller / background compile", a="background (default)", b="wait",
                    target=None, **benchlib.paired_summary(ta, tb)),
        targets=[dict(label=f"{label}, default mode: first call", value=med("background", "first_call_s"), unit="s",
                      target=f"<= {TARGET_S:g}")],
        first_call_s={m: med(m, "first_call_s") for m in series},
        process_s={m: med(m, "process_s") for m in series},
        import_s={m: med(m, "import_s") for m in series},
        runs=series,
        **benchlib.machine_extra(),
    )  # fmt: skip
