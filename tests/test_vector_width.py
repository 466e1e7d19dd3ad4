"""Both micro-kernel vector widths (256-bit AVX2, 512-bit AVX-512) on any host, forced per process."""

import os
import subprocess
import sys
import textwrap

import pytest

from sparseattn.kernels import VECTOR_BYTES

SCRIPT = textwrap.dedent(
    """
    import numpy as np, sparseattn as sa
    import sparseattn.engine.fused_forward as fwd
    from sparseattn.kernels import VECTOR_BYTES
    from sparseattn.kernels.simd import block_width
    from sparseattn.reference import dense_attention, dense_attention_backward

    assert VECTOR_BYTES == {nbytes}, VECTOR_BYTES
    rng = np.random.default_rng(0)
    n = 150
    p = sa.longformer(n, 40, [0, 77]) | sa.random_pattern(n, n, 3, seed=1)
    for dtype, tol in ((np.float32, 2e-4), (np.float64, 1e-9)):
        w = block_width(dtype)
        assert w == 2 * VECTOR_BYTES // np.dtype(dtype).itemsize
        q, k, v = (rng.standard_normal((2, 3, n, 2 * w)).astype(dtype) for _ in range(3))
        assert fwd.panel_buffers(n, 2 * w, 2 * w, dtype, 1024)[1].size > 0  # the micro-kernel path
        out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
        ref = dense_attention(q, k, v, p)
        assert np.abs(out - ref).max() <= tol * max(1.0, np.abs(ref).max()), np.abs(out - ref).max()
        go = rng.standard_normal(out.shape).astype(dtype)
        grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse)
        refs = dense_attention_backward(go, q, k, v, p)
        top = max(np.abs(r).max() for r in refs)
        for g, r in zip(grads, refs):
            assert np.abs(g - r).max() <= tol * top, np.abs(g - r).max()
        # a narrow neighbourhood: the line kernel (kernels/grid.py) at this width
        g = sa.neighborhood((6, 40), (3, 7))
        qg, kg, vg = (rng.standard_normal((2, g.shape[0], w)).astype(dtype) for _ in range(3))
        ref = dense_attention(qg, kg, vg, g)
        assert np.abs(sa.sparse_attention(qg, kg, vg, g, path="fused") - ref).max() <= tol * max(1.0, np.abs(ref).max())
        # a decode step (seven query heads per key/value head): the decode kernel's score tiles of 4, 2 and 1 rows
        # and its 4-row value blocks at this width
        kc, vc = (rng.standard_normal((1, 2, 90, 2 * w)).astype(dtype) for _ in range(2))
        qd = rng.standard_normal((1, 14, 1, 2 * w)).astype(dtype)
        pd = sa.causal(1, 40, n_k=80)
        kd, vd = (np.repeat(x[:, :, :80], 7, axis=1) for x in (kc, vc))
        ref = dense_attention(qd, kd, vd, pd)
        got = sa.sparse_attention(qd, kc[:, :, :80], vc[:, :, :80], pd, path="fused")
        assert np.abs(got - ref).max() <= tol * max(1.0, np.abs(ref).max())
    print("ok", VECTOR_BYTES)
    """
)


def _run(bits, code):
    env = dict(os.environ, SPARSEATTN_SIMD_BITS=str(bits))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    "bits",
    [pytest.param(b, marks=() if b == VECTOR_BYTES * 8 else pytest.mark.slow) for b in (256, 512)],
)
def test_forced_width_forward_and_backward_match_the_reference(bits):
    r = _run(bits, SCRIPT.format(nbytes=bits // 8))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ok", str(bits // 8)]


def test_a_bad_width_is_refused_by_name():
    r = _run(300, "import sparseattn.kernels")
    assert r.returncode != 0 and "SPARSEATTN_SIMD_BITS must be 256 or 512, got '300'" in r.stderr
