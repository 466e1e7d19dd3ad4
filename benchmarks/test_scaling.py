"""Issue 3 scaling: time against n for several radii, and against the radius at fixed n.

Sweeps (full mode): n = 1024 .. 65536 for radii 32, 128, 256, 512 (float32, 1 global token);
at radius 256 also float64, 64 global tokens, and the staged path; radius 16 .. 1024 at
n = 8192 for both paths. 12 heads, d 64 throughout.

    pytest benchmarks/test_scaling.py --benchmark-json=SCALING.json
"""

import pytest

import benchlib

NS = benchlib.sizes([1024, 2048, 4096, 8192, 16384, 32768, 65536], [256, 1024])
RADII = [32, 128] if benchlib.quick() else [32, 128, 256, 512]
N_FIXED = 512 if benchlib.quick() else 8192
RADIUS_SWEEP = [32, 128] if benchlib.quick() else [16, 32, 64, 128, 256, 512, 1024]


def _n_cases():
    cases = [("sparseattn", r, 1, "float32") for r in sorted(set(RADII) | {256})]
    cases += [("sparseattn-staged", 256, 1, "float32"), ("sparseattn", 256, 1, "float64"), ("sparseattn", 256, 64, "float32")]
    return [
        pytest.param(m, r, g, dt, n, id=f"{m}-r{r}-g{g}-{dt}-n{n}")
        for (m, r, g, dt) in cases
        for n in NS
    ]


@pytest.mark.parametrize("method, radius, n_globals, dtype, n", _n_cases())
def test_scale_n(benchmark, method, radius, n_globals, dtype, n):
    if radius == 256 and n_globals == 1 and dtype == "float32":
        group = "n-scaling: r256, g1, float32 (fused vs staged)"
    else:
        group = f"n-scaling: r{radius}, g{n_globals}, {dtype}"
    benchlib.bench_attention(benchmark, method, n=n, radius=radius, n_globals=n_globals, dtype=dtype, group=group)


@pytest.mark.parametrize("method", ["sparseattn", "sparseattn-staged"])
@pytest.mark.parametrize("radius", RADIUS_SWEEP, ids=lambda r: f"r{r}")  # bottom = slowest: paths back to back
def test_scale_radius(benchmark, method, radius):
    benchlib.bench_attention(
        benchmark, method, n=N_FIXED, radius=radius, n_globals=1, group=f"radius-scaling: n{N_FIXED}, g1, float32"
    )
