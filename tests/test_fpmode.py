"""Denormals flushed inside the fused kernels' threads only: results against the float64 reference where the
softmax's terms fall in the denormal range, and the caller's floating-point mode unchanged after every path."""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.kernels import fpmode
from sparseattn.reference import dense_attention, dense_attention_backward

TINY = np.float32(1e-39)  # a float32 denormal (the smallest normal is 1.2e-38)


def denormals_kept():
    """True when this thread's arithmetic keeps denormals (FTZ and DAZ clear), seen through NumPy."""
    return bool((np.array([TINY], dtype=np.float32) * np.float32(1.0))[0] != 0)


@pytest.mark.skipif(not fpmode.X86, reason="MXCSR is x86's")
def test_enter_flushes_and_exit_restores_this_thread():
    assert denormals_kept()
    old = fpmode.ftz_enter()
    try:
        assert not denormals_kept()
        assert fpmode.ftz_enter() & ((1 << 15) | (1 << 6))  # nested: the bits read back as set
    finally:
        fpmode.ftz_exit(old)
    assert denormals_kept()


def _inputs(n, heads, d, seed):
    rng = np.random.default_rng(seed)
    q, k, v, go = (rng.standard_normal((1, heads, n, d)).astype(np.float32) for _ in range(4))
    return q, k, v, go


@pytest.mark.parametrize("path", ["fused", "staged", "blocked"])
def test_steep_alibi_matches_float64_and_leaves_the_callers_mode(path):
    # slopes up to 1.5 over a 120-key band: exp(s - max) spans 1 .. 1e-78, so many terms (and their products
    # with v and dO) pass through the denormal range that the fused threads flush
    n, heads, d = 160, 4, 16
    q, k, v, go = _inputs(n, heads, d, 0)
    slopes = np.array([1.5, 0.9, 0.6, 0.05], dtype=np.float32)
    pattern = sa.sliding_window(n, 60) | sa.global_tokens(n, [0])
    out, lse = sa.sparse_attention(q, k, v, pattern, alibi_slopes=slopes, return_lse=True, path=path)
    assert denormals_kept()
    f64 = [x.astype(np.float64) for x in (q, k, v, go)]
    ref, ref_lse = dense_attention(*f64[:3], pattern, alibi_slopes=slopes.astype(np.float64), return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-4, atol=1e-4)
    grads = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, alibi_slopes=slopes, path=path)
    assert denormals_kept()
    ref_g = dense_attention_backward(f64[3], *f64[:3], pattern, alibi_slopes=slopes.astype(np.float64))
    for got, want in zip(grads, ref_g):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_decode_leaves_the_callers_mode():
    T, W = 300, 128
    q, k, v, _ = _inputs(T, 2, 16, 1)
    out = sa.sparse_attention(q[:, :, -1:], k, v, sa.causal(1, W - 1, n_k=T, offset=T - 1), alibi_slopes=np.float32([2.0, 1.0]))
    assert denormals_kept()
    ref = dense_attention(*(x.astype(np.float64) for x in (q[:, :, -1:], k, v)), sa.causal(1, W - 1, n_k=T, offset=T - 1),
                          alibi_slopes=np.float64([2.0, 1.0]))  # fmt: skip
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
