"""sparse_attention_backward against the float64 dense analytic gradient, on both paths."""

import numpy as np
import pytest
import scipy.sparse as sp

import sparseattn as sa
import sparseattn.engine.fused_backward as bf_mod
import sparseattn.engine.fused_forward as ff_mod
from sparseattn.engine import plan as plan_mod
from sparseattn.patterns import registry
from sparseattn.reference import dense_attention_backward

DTYPES = [np.float32, np.float64]
PATHS = ["fused", "staged", "blocked"]
#: float64 within 1e-9, float32 within 2e-4, relative to the gradient's largest entry
GRAD_RTOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}


def assert_grads_close(actual, expected, inputs):
    """Each gradient: the input's shape and dtype, finite, within tolerance of the float64 reference.

    Errors are relative to the gradient's largest entry, floored by the largest entry of all three
    (a gradient that cancels to ~0, e.g. dq of a one-key row, is compared at the others' scale).
    """
    floor = max(float(np.max(np.abs(e), initial=0.0)) for e in expected) * 1e-3
    for name, a, e, x in zip(("dq", "dk", "dv"), actual, expected, inputs):
        x = np.asarray(x)
        assert a.shape == x.shape and a.dtype == x.dtype, (name, a.shape, a.dtype, x.shape, x.dtype)
        assert np.all(np.isfinite(a)), name
        scale = max(float(np.max(np.abs(e), initial=0.0)), floor, 1e-30)
        err = float(np.max(np.abs(a.astype(np.float64) - e), initial=0.0))
        assert err <= GRAD_RTOL[a.dtype] * scale, (
            f"{name}: max abs error {err:.3g} vs scale {scale:.3g} ({a.dtype})"
        )


def qkv(rng, q_shape, k_shape, dv, dtype, logit_scale=1.0):
    q = (rng.standard_normal(q_shape) * logit_scale).astype(dtype)
    k = rng.standard_normal(k_shape).astype(dtype)
    v = rng.standard_normal(k_shape[:-1] + (dv,)).astype(dtype)
    return q, k, v


def run(q, k, v, pattern, path, rng, **kw):
    """Forward with lse, a random grad_out, the backward on ``path``; returns (grads, reference grads)."""
    out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True, **kw)
    go = rng.standard_normal(out.shape).astype(out.dtype)
    copies = [x.copy() for x in (go, q, k, v, out, lse)]
    grads = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path=path, **kw)
    for before, after in zip(copies, (go, q, k, v, out, lse)):
        np.testing.assert_array_equal(before, after)  # nothing modified in place
    ref = dense_attention_backward(go, q, k, v, pattern, **kw)
    assert_grads_close(grads, ref, (q, k, v))
    return grads


@pytest.fixture(params=[False, True], ids=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Default chunks, and again with tiny chunks, long-row threshold and panel caches (two chunks' worth: spans
    evict their own panels) so small inputs use every code path."""
    if request.param:
        monkeypatch.setattr(plan_mod, "CHUNK", 16)
        monkeypatch.setattr(plan_mod, "LONG_MIN", 24)
        monkeypatch.setattr(ff_mod, "PANEL_CACHE_BYTES", 0)
    plan_mod.clear_plan_cache()
    yield
    plan_mod.clear_plan_cache()


@pytest.mark.usefixtures("chunking")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, dv", [(64, 64), (16, 32), (20, 12)], ids=["simd", "simd-dv", "blas"])
def test_band_and_globals(rng, path, dtype, d, dv):
    n = 150
    p = sa.longformer(n, attention_window=24, global_indices=[0, 7, 149])
    run(*qkv(rng, (2, 3, n, d), (2, 3, n, d), dv, dtype), p, path, rng)


@pytest.mark.usefixtures("chunking")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dilated_asymmetric_windows(rng, path, dtype):
    n = 120
    p = sa.sliding_window(n, left=30, right=7, dilation=3) | sa.global_tokens(n, [50])
    run(*qkv(rng, (3, n, 16), (3, n, 16), 16, dtype), p, path, rng, scale=0.4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_scipy_pattern_with_empty_rows(rng, path, dtype):
    n_q, n_k = 70, 45
    m = sp.random(n_q, n_k, density=0.2, random_state=3, format="coo").tocsr()
    m = m.tolil()
    m[[0, 5, 6, 69], :] = 0  # empty rows: zero gradient, never NaN
    m = m.tocsr()
    q, k, v = qkv(rng, (2, n_q, 16), (2, n_k, 16), 8, dtype)
    dq, dk, dv = run(q, k, v, m, path, rng)
    assert np.all(dq[:, [0, 5, 6, 69]] == 0)
    unseen = np.flatnonzero(np.asarray(m.sum(axis=0)).ravel() == 0)
    assert np.all(dk[:, unseen] == 0) and np.all(dv[:, unseen] == 0)


@pytest.mark.usefixtures("chunking")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_patterns(rng, path, dtype):
    n = 96
    pats = [sa.longformer(n, 16, [0]), sa.causal(n), sa.random_pattern(n, n, 9, seed=2), sa.sliding_window(n, 3)]
    run(*qkv(rng, (2, 4, n, 16), (2, 4, n, 16), 16, dtype), pats, path, rng)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_with_a_padded_global_key(rng, path, dtype):
    n = 100
    p = sa.longformer(n, 20, [0, 40])
    kpm = np.zeros((2, n), dtype=bool)
    kpm[0, 90:] = True
    kpm[1, [40, 3, 4]] = True  # a padded global key
    run(*qkv(rng, (2, 3, n, 32), (2, 3, n, 32), 32, dtype), p, path, rng, key_padding_mask=kpm)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_keys_padded_gives_zero_gradients(rng, path, dtype):
    n = 40
    p = sa.longformer(n, 8, [0])
    kpm = np.ones((1, n), dtype=bool)
    q, k, v = qkv(rng, (1, 2, n, 16), (1, 2, n, 16), 16, dtype)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, key_padding_mask=kpm)
    assert np.all(np.isneginf(lse)) and np.all(out == 0)
    grads = sa.sparse_attention_backward(np.ones_like(out), q, k, v, p, out, lse, key_padding_mask=kpm, path=path)
    for g in grads:
        assert np.all(g == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_broadcast_over_heads_sums_their_gradients(rng, path, dtype):
    n = 80
    p = sa.longformer(n, 16, [3])
    q, k, v = qkv(rng, (2, 4, n, 16), (2, 1, n, 16), 24, dtype)
    dq, dk, dv = run(q, k, v, p, path, rng)
    assert dk.shape == (2, 1, n, 16) and dv.shape == (2, 1, n, 24)
    # against the same call with k, v materialised per head: the broadcast gradient is the sum over heads
    kk, vv = np.broadcast_to(k, (2, 4, n, 16)).copy(), np.broadcast_to(v, (2, 4, n, 24)).copy()
    out, lse = sa.sparse_attention(q, kk, vv, p, return_lse=True)
    go = rng.standard_normal(out.shape).astype(dtype)
    full = sa.sparse_attention_backward(go, q, kk, vv, p, out, lse, path=path)
    bcast = sa.sparse_attention_backward(go, q, k, v, p, out, lse, path=path)
    tol = GRAD_RTOL[np.dtype(dtype)] * 10
    np.testing.assert_allclose(bcast[1], full[1].sum(axis=1, keepdims=True), rtol=tol, atol=tol)
    np.testing.assert_allclose(bcast[2], full[2].sum(axis=1, keepdims=True), rtol=tol, atol=tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(rng, path, dtype):
    n = 90
    p = sa.longformer(n, 16, [0, 1])
    run(*qkv(rng, (2, n, 16), (2, n, 16), 16, dtype, logit_scale=25.0), p, path, rng)


@pytest.mark.parametrize("name,kw", [pytest.param(n, kw, id=f"{n}-{i}") for n in registry.available() for i, kw in enumerate(registry.examples(n))])
def test_every_registered_builder_fused_equals_staged(rng, name, kw):
    built = registry.get(name)(**kw)
    pattern = built if isinstance(built, sa.Pattern) else list(built)
    heads = 1 if isinstance(pattern, sa.Pattern) else len(pattern)
    first = pattern if heads == 1 else pattern[0]
    n_q, n_k = first.shape
    q, k, v = qkv(rng, (2, heads, n_q, 16), (2, heads, n_k, 16), 16, np.float64)
    fused = run(q, k, v, pattern, "fused", rng)
    out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True)
    go = rng.standard_normal(out.shape)
    a = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="fused")
    b = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, path="staged")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
    assert fused[0].shape == q.shape


def test_the_span_path_that_ran(rng, monkeypatch):
    """d and d_v multiples of 2L take the micro-kernels; others BLAS; both agree with the reference."""
    seen = []
    real = bf_mod._thread_buffers

    def spy(*args):
        bufs = real(*args)
        seen.append(bufs[-1].size > 0)
        return bufs

    monkeypatch.setattr(bf_mod, "_thread_buffers", spy)
    n = 64
    p = sa.longformer(n, 16, [0])
    run(*qkv(rng, (2, n, 32), (2, n, 32), 32, np.float32), p, "fused", rng)
    assert seen and all(seen)
    seen.clear()
    run(*qkv(rng, (2, n, 12), (2, n, 12), 32, np.float32), p, "fused", rng)
    assert seen and not any(seen)


def test_threaded_work_ranges_equal_serial(rng, monkeypatch):
    """Many slices on the thread pool: ranges are cut at slice boundaries and keys flushed under locks."""
    monkeypatch.setattr(bf_mod, "_PARALLEL_MIN_FLOP", 0)
    n = 200
    p = sa.longformer(n, 40, [0, 100])
    q, k, v = qkv(rng, (3, 4, n, 16), (3, 4, n, 16), 16, np.float64)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
    go = rng.standard_normal(out.shape)
    from sparseattn.engine.validate import prepare

    prep = prepare(q, k, v, p)
    flat = lambda x: np.ascontiguousarray(x.reshape(prep.q.shape[0], n, -1))  # noqa: E731
    args = (prep.q, prep.k, prep.v, flat(go), flat(out), np.ascontiguousarray(lse.reshape(-1, n)),
            prep.patterns, prep.slice_pattern, prep.scale, None, None)  # fmt: skip
    threaded = bf_mod.fused_backward(*args)
    serial = bf_mod.fused_backward(*args, parallel=False)
    for a, b in zip(threaded, serial):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    ref = dense_attention_backward(go, q, k, v, p)
    assert_grads_close(tuple(g.reshape(x.shape) for g, x in zip(threaded, (q, k, v))), ref, (q, k, v))


def test_bad_input_names_the_argument(rng):
    n = 20
    p = sa.sliding_window(n, 2)
    q, k, v = qkv(rng, (2, n, 8), (2, n, 8), 8, np.float32)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
    with pytest.raises(ValueError, match=r"grad_out has shape \(2, 20, 7\)"):
        sa.sparse_attention_backward(np.zeros((2, n, 7), np.float32), q, k, v, p, out, lse)
    with pytest.raises(ValueError, match=r"lse has shape \(2, 21\)"):
        sa.sparse_attention_backward(out, q, k, v, p, out, np.zeros((2, 21), np.float32))
    with pytest.raises(ValueError, match=r"^out has shape"):
        sa.sparse_attention_backward(out, q, k, v, p, out[:1], lse)
    with pytest.raises(TypeError, match="grad_out must be a floating-point array"):
        sa.sparse_attention_backward(np.zeros(out.shape, int), q, k, v, p, out, lse)
    with pytest.raises(ValueError, match="path must be one of"):
        sa.sparse_attention_backward(out, q, k, v, p, out, lse, path="dense")


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_lse_matches_the_reference(rng, dtype):
    from sparseattn.reference import dense_attention

    n = 60
    p = sa.longformer(n, 10, [0])
    kpm = np.zeros((1, n), dtype=bool)
    kpm[0, 10:20] = True
    q, k, v = qkv(rng, (1, 2, n, 16), (1, 2, n, 16), 16, dtype)
    _, ref_lse = dense_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True)
    for path in ("fused", "staged", "blocked"):
        out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True, path=path)
        assert lse.shape == out.shape[:-1] and lse.dtype == dtype
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-5 if dtype == np.float32 else 1e-12)
    out, w, lse = sa.sparse_attention(q, k, v, p, return_weights=True, return_lse=True)
    assert lse.shape == (1, 2, n) and w.to_scipy(0, 0).shape == (n, n)
