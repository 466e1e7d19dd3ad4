"""NumPy float32 GEMM rate, the physical limit the attention kernels are measured against.

The BLAS kernel name (threadpoolctl's 'architecture') and the rate measured in a subprocess
with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset go into extra_info.
"""

import numpy as np

import benchlib


def test_gemm_float32(benchmark):
    n = 1024 if benchlib.quick() else 2048
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty_like(a)

    def gemm():
        np.matmul(a, b, out=c)
        return c

    # the check: the BLAS product against a float64 product
    ref = a[:16].astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(gemm()[:16], ref, rtol=1e-4, atol=1e-3 * np.sqrt(n))
    benchmark.group = "gemm: numpy float32"
    g = benchlib.session_gemm()
    benchmark.extra_info.update(method="numpy-sgemm", n=n, useful_flop=2 * n**3)
    benchmark.extra_info.update({f"in_process_{k}": v for k, v in g["in_process"].items()})
    benchmark.extra_info.update({f"hardware_default_{k}": v for k, v in g["hardware_default"].items()})
    benchmark.pedantic(gemm, rounds=3 if benchlib.quick() else 10, iterations=1, warmup_rounds=1)
