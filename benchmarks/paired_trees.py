"""H1 forward and forward + backward of two source trees of sparseattn, alternating in fresh processes.

For changes that must not change speed (a refactor, a move of files): each round runs one process per
tree, in alternating order, and each process times the same calls on the same inputs after a warm-up
call (which also loads or compiles the kernels, each tree into its own Numba cache). The ratio of the
medians (second tree / first) is the figure; rounds alternate because the shared machine's speed drifts.

    python benchmarks/paired_trees.py OLD_TREE NEW_TREE [--n 8192] [--rounds 5] [--repeat 5]

A tree is a directory that holds the ``sparseattn`` package (a checkout or ``git worktree``). Prints one
JSON object: the machine (CPU flags, BLAS kernel), the per-round medians of each tree, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import numpy as np
import sparseattn as sa
assert sa.__file__.startswith(sys.argv[1]), sa.__file__
n, repeat = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((3, 1, 12, n, 64), dtype=np.float32)
go = rng.standard_normal((1, 12, n, 64), dtype=np.float32)
p = sa.sliding_window(n, 256) | sa.global_tokens(n, [0])

def fwd():
    return sa.sparse_attention(q, k, v, p, return_lse=True)

def train():
    out, lse = fwd()
    return sa.sparse_attention_backward(go, q, k, v, p, out, lse)

res = {}
for name, fn in (("forward", fwd), ("forward+backward", train)):
    fn()  # warm-up: kernels, plan
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    res[name] = sorted(ts)[len(ts) // 2]
print(json.dumps(res))
"""


def _machine():
    import numpy as np  # noqa: F401  (loads the BLAS threadpoolctl reports)
    import threadpoolctl

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    feats = [x for x in ("avx512f", "avx2") if f" {x}" in flags]
    blas = [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads")} for i in threadpoolctl.threadpool_info()]
    return {"cpu_features": feats, "blas": blas, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def _run(tree, cache, n, repeat):
    env = dict(os.environ, PYTHONPATH=tree, NUMBA_CACHE_DIR=cache, SPARSEATTN_COLD_START="wait")
    p = subprocess.run([sys.executable, "-c", _CHILD, tree, str(n), str(repeat)], capture_output=True, text=True,
                       env=env, cwd=tempfile.gettempdir(), timeout=1800)  # fmt: skip
    if p.returncode:
        raise SystemExit(f"{tree}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trees", nargs=2, help="two directories holding a sparseattn package")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per process (median)")
    args = ap.parse_args(argv)
    trees = [os.path.abspath(t) for t in args.trees]
    caches = [tempfile.mkdtemp(prefix=f"nc{i}-") for i in range(2)]
    for i in range(2):  # compile into each tree's cache before any timing
        _run(trees[i], caches[i], 512, 1)
    rounds = []
    for r in range(args.rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        got = {}
        for i in order:
            got[i] = _run(trees[i], caches[i], args.n, args.repeat)
        rounds.append([got[0], got[1]])
    out = {"machine": _machine(), "n": args.n, "trees": trees, "rounds": rounds, "ratio_new_over_old": {}}
    for name in rounds[0][0]:
        ratios = [b[name] / a[name] for a, b in rounds]
        out["ratio_new_over_old"][name] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "old_median_s": statistics.median(a[name] for a, _ in rounds),
            "new_median_s": statistics.median(b[name] for _, b in rounds),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
