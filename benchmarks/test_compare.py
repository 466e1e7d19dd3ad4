"""Workload H1 side by side: sparseattn vs dense NumPy, torch SDPA, FlexAttention, HF Longformer.

H1: batch 1, 12 heads, d 64, float32, radius 256 (HF attention_window 512), one global token
(index 0); also 64 global tokens (the first 64) in the full run. Peers that are not installed
skip with the reason, and each runs only up to the n in ``benchlib.PEER_MAX_N``.

    SPARSEATTN_BENCH_NS=1024,4096,8192 pytest benchmarks/test_compare.py -k g1 --benchmark-json=H1.json
"""

import pytest

import benchlib

NS = benchlib.sizes([1024, 2048, 4096, 8192, 16384], [512])
GLOBALS = [1] if benchlib.quick() else [1, 64]
METHODS = ["sparseattn", "sparseattn-staged", "dense-numpy", "torch-sdpa", "torch-flex", "hf-longformer"]


# the bottom decorator varies slowest: all methods run back to back at each size, so a change in
# the machine's load during the run does not favour one method
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_globals", GLOBALS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("n", NS, ids=lambda n: f"n{n}")
def test_h1_compare(benchmark, method, n_globals, n):
    benchlib.bench_attention(
        benchmark, method, n=n, radius=256, n_globals=n_globals, group=f"H1 compare: r256, g{n_globals}, float32"
    )
