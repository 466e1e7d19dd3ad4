"""Issue 2's first benchmark: sparse_attention vs dense NumPy attention.

n in {1024, 4096, 16384}, band radius 256 (no global token), 12 heads, d 64, float32.
Dense attention computes every one of the n x n scores, head by head in row blocks
so that n = 16384 fits in memory.

    pytest benchmarks/test_engine.py --benchmark-json=BENCH.json
"""

import pytest

import benchlib

NS = benchlib.sizes([1024, 4096, 16384], [256, 1024])
METHODS = ["sparseattn", "sparseattn-staged", "dense-numpy"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", NS, ids=lambda n: f"n{n}")  # bottom = slowest: methods back to back per n
def test_engine_vs_dense(benchmark, method, n):
    benchlib.bench_attention(benchmark, method, n=n, radius=256, n_globals=0, group="engine: band r256, float32")
