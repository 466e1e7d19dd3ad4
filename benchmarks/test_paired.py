"""Issue 3's ratio targets, each measured as alternating pairs of calls in one process.

H1 (12 heads, d 64, float32, radius 256, one global token) at n = 8192: sparseattn against HF
Longformer's attention core (target >= 10x) and FlexAttention compiled for CPU (>= 1.5x); and
sparseattn at n = 65536 against itself at n = 8192 (target <= 8.8). The machine is shared, so the
load drifts between benchmarks that run one after another; alternating A, B, A, B, ... gives both
calls the same conditions. ``sparseattn report`` lists these under "Paired comparisons".

    pytest benchmarks/test_paired.py --benchmark-json=PAIRED.json
"""

import pytest

import benchlib

N = 512 if benchlib.quick() else 8192
N_LARGE = 2048 if benchlib.quick() else 65536


def _method(name, n):
    return (f"{name} n={n}",) + benchlib.make_method(name, n=n, radius=256, n_globals=1)


@pytest.mark.parametrize("peer, target", [("hf-longformer", ">= 10"), ("torch-flex", ">= 1.5")])
def test_paired_speedup(benchmark, peer, target):
    peer_side = _method(peer, N)  # skips first when the peer is not installed
    benchlib.bench_paired(
        benchmark, _method("sparseattn", N), peer_side,
        label=f"H1 r256 g1 float32, {peer} / sparseattn", target=target,
    )  # fmt: skip


def test_paired_n_scaling(benchmark):
    benchlib.bench_paired(
        benchmark, _method("sparseattn", N), _method("sparseattn", N_LARGE),
        label=f"H1 r256 g1 float32, sparseattn n={N_LARGE} / n={N}", target="<= 8.8",
    )  # fmt: skip
