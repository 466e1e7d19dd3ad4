"""The engine against the float64 dense reference, and its argument checks."""

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import assert_attention_close, assert_canonical_csr
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.patterns import registry
from sparseattn.reference import dense_attention

DTYPES = [np.float32, np.float64]
PATHS = ["staged", "auto", "blocked"]  # "auto" is the fused kernel (the tests run with SPARSEATTN_COLD_START=wait)


def qkv(rng, lead, n_q, n_k, d, dv=None, dtype=np.float64, scale=1.0):
    dv = d if dv is None else dv
    q = (rng.standard_normal(lead + (n_q, d)) * scale).astype(dtype)
    k = (rng.standard_normal(lead + (n_k, d)) * scale).astype(dtype)
    v = rng.standard_normal(lead + (n_k, dv)).astype(dtype)
    return q, k, v


def check(q, k, v, pattern, path, **kw):
    copies = [x.copy() for x in (q, k, v)]
    out = sa.sparse_attention(q, k, v, pattern, path=path, **kw)
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)  # inputs never modified
    ref = dense_attention(q, k, v, pattern, **kw)
    assert_attention_close(out, ref, np.result_type(q, k, v))
    return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,n_q,n_k,d,dv",
    [((), 33, 33, 16, 16), ((3,), 40, 40, 8, 5), ((2, 3), 64, 64, 32, 32), ((2, 2), 17, 29, 4, 7)],
)
def test_random_patterns_match_reference(rng, path, dtype, lead, n_q, n_k, d, dv):
    pattern = sa.random_pattern(n_q, n_k, min(5, n_k), seed=1)
    if n_q == n_k:
        pattern = pattern | sa.longformer(n_q, 4, [0, n_q - 1])
    check(*qkv(rng, lead, n_q, n_k, d, dv, dtype), pattern, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_longformer_band_and_globals(rng, path, dtype):
    n = 300
    p = sa.longformer(n, 64, [0, 1, 150, 299])
    check(*qkv(rng, (2, 3), n, n, 64, dtype=dtype), p, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_give_zeros(rng, path, dtype):
    mask = np.zeros((10, 12), bool)
    mask[1, [2, 5]] = True
    mask[4, :] = True
    mask[9, 11] = True
    q, k, v = qkv(rng, (2,), 10, 12, 8, dtype=dtype)
    out = check(q, k, v, sa.from_dense(mask), path)
    empty = ~mask.any(axis=1)
    assert np.all(out[:, empty] == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_including_a_global_key(rng, path, dtype):
    n = 48
    p = sa.longformer(n, 6, [0, 20])
    q, k, v = qkv(rng, (3, 2), n, n, 16, dtype=dtype)
    kpm = np.zeros((3, n), bool)
    kpm[0, 40:] = True  # trailing padding
    kpm[1, 20] = True  # the global key is padded
    kpm[2, :] = True  # everything padded: all rows empty
    out = check(q, k, v, p, path, key_padding_mask=kpm)
    assert np.all(out[2] == 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_patterns(rng, path, dtype):
    n = 40
    heads = [sa.sliding_window(n, 2), sa.longformer(n, 8, [3]), sa.random_pattern(n, n, 6, seed=2), sa.causal(n)]
    check(*qkv(rng, (2, 4), n, n, 8, dtype=dtype), heads, path)
    # a scipy matrix and a dense mask are accepted per head too
    mixed = [sp.csr_matrix(heads[0].to_dense()), heads[1].to_dense(), heads[2], heads[3]]
    check(*qkv(rng, (4,), n, n, 8, dtype=dtype), mixed, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_do_not_overflow(rng, path, dtype):
    n = 64
    q, k, v = qkv(rng, (2,), n, n, 32, dtype=dtype, scale=30.0)  # |q.k| / sqrt(d) in the thousands
    p = sa.longformer(n, 16, [0])
    out = sa.sparse_attention(q, k, v, p, path=path)
    s = np.abs(np.einsum("hid,hjd->hij", q.astype(np.float64), k.astype(np.float64))).max() / np.sqrt(32)
    assert s > 1000
    assert np.all(np.isfinite(out))
    check(q, k, v, p, path)


@pytest.mark.parametrize("path", PATHS)
def test_broadcasting_and_mixed_dtypes(rng, path):
    n = 20
    q = rng.standard_normal((2, 3, n, 8)).astype(np.float32)
    k = rng.standard_normal((1, 3, n, 8))  # float64, broadcasts over batch
    v = rng.standard_normal((n, 5)).astype(np.float32)  # shared by all heads
    out = check(q, k, v, sa.sliding_window(n, 3), path)
    assert out.shape == (2, 3, n, 5) and out.dtype == np.float64


@pytest.mark.parametrize("path", PATHS)
def test_explicit_scale_and_scipy_pattern(rng, path):
    q, k, v = qkv(rng, (2,), 30, 30, 8)
    m = sp.random(30, 30, density=0.2, random_state=0, format="coo")
    check(q, k, v, m, path, scale=0.7)


def test_return_weights_rows_sum_to_one_and_reproduce_output(rng):
    n = 50
    p = sa.longformer(n, 8, [0]) | sa.random_pattern(n, n, 3, seed=5)
    q, k, v = qkv(rng, (2, 3), n, n, 16)
    kpm = np.zeros((2, n), bool)
    kpm[1, 45:] = True
    out, w = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, return_weights=True)
    ref_q = dense_attention(q, k, v, p, key_padding_mask=kpm)
    assert_attention_close(out, ref_q, np.float64)
    for b in range(2):
        for h in range(3):
            m = w.to_scipy(b, h)
            assert isinstance(m, sp.csr_array) and m.shape == (n, n)
            np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-12)
            np.testing.assert_allclose(m @ v[b, h], out[b, h], rtol=1e-12, atol=1e-12)
            stored = sp.csr_array((np.ones(m.nnz, bool), m.indices, m.indptr), shape=m.shape)
            assert_canonical_csr(stored)
            allowed = p.to_dense() & ~kpm[b][None, :]
            np.testing.assert_array_equal(stored.toarray(), allowed)
    with pytest.raises(ValueError, match="2 indices"):
        w.to_scipy(0)
    for path in ("fused", "blocked"):
        with pytest.raises(ValueError, match=f"return_weights=True needs the staged path.*not '{path}'"):
            sa.sparse_attention(q, k, v, p, return_weights=True, path=path)


@pytest.mark.parametrize("name,kw", [pytest.param(n, kw, id=f"{n}-{i}") for n in registry.available() for i, kw in enumerate(registry.examples(n))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_registered_builder_through_the_engine(rng, name, kw, dtype):
    built = registry.get(name)(**kw)
    pattern = built if isinstance(built, sa.Pattern) else list(built)
    heads = 1 if isinstance(pattern, sa.Pattern) else len(pattern)
    first = pattern if heads == 1 else pattern[0]
    n_q, n_k = first.shape
    q, k, v = qkv(rng, (2, heads), n_q, n_k, 8, dtype=dtype)
    staged = check(q, k, v, pattern, "staged")
    auto = sa.sparse_attention(q, k, v, pattern)
    assert_attention_close(auto, staged.astype(np.float64), dtype)


@settings(max_examples=25, deadline=None)
@given(
    n_q=st.integers(1, 24),
    n_k=st.integers(1, 24),
    d=st.integers(1, 12),
    heads=st.integers(1, 3),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    f32=st.booleans(),
)
def test_engine_property(n_q, n_k, d, heads, density, seed, f32):
    r = np.random.default_rng(seed)
    dtype = np.float32 if f32 else np.float64
    mask = r.random((n_q, n_k)) < density
    q, k, v = qkv(r, (heads,), n_q, n_k, d, dtype=dtype)
    kpm = r.random(n_k) < 0.2
    for path in PATHS:
        check(q, k, v, sa.from_dense(mask), path, key_padding_mask=kpm)


# ---------------------------------------------------------------- bad input


def _ok(rng):
    return qkv(rng, (2, 3), 10, 10, 4)


def test_bad_shapes(rng):
    q, k, v = _ok(rng)
    p = sa.sliding_window(10, 1)
    with pytest.raises(ValueError, match=r"q has shape \(2, 3, 10, 4\) but k has \(2, 3, 10, 5\)"):
        sa.sparse_attention(q, np.zeros((2, 3, 10, 5)), v, p)
    with pytest.raises(ValueError, match=r"k has shape \(2, 3, 10, 4\) but v has \(2, 3, 9, 4\)"):
        sa.sparse_attention(q, k, v[..., :9, :], p)
    with pytest.raises(ValueError, match=r"pattern has shape \(11, 11\) but q, k imply \(n_q, n_k\) = \(10, 10\)"):
        sa.sparse_attention(q, k, v, sa.sliding_window(11, 1))
    with pytest.raises(ValueError, match="2 per-head patterns were given but the heads axis .* has size 3"):
        sa.sparse_attention(q, k, v, [p, p])
    with pytest.raises(ValueError, match="no heads axis"):
        sa.sparse_attention(q[0, 0], k[0, 0], v[0, 0], [p, p])
    with pytest.raises(ValueError, match=r"k and v must have the same number of heads .* k has shape \(2, 2, 10, 4\)"):
        sa.sparse_attention(q, k[:, :2], v, p)  # 2 heads: a grouped-query k, but v has 3
    with pytest.raises(ValueError, match="must broadcast"):
        sa.sparse_attention(q, np.zeros((3, 3, 10, 4)), np.zeros((3, 3, 10, 4)), p)  # batch 3 against 2
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sa.sparse_attention(q[0, 0, 0], k, v, p)
    with pytest.raises(ValueError, match=r"pattern\[1\] has shape"):
        sa.sparse_attention(q, k, v, [p, sa.sliding_window(9, 1), p])


def test_bad_dtypes_and_values(rng):
    q, k, v = _ok(rng)
    p = sa.sliding_window(10, 1)
    for bad, name in [(q.astype(np.int64), "q"), (q.astype(bool), "q"), (q.astype(np.complex128), "q")]:
        with pytest.raises(TypeError, match=f"{name} must be a floating-point array.*got dtype"):
            sa.sparse_attention(bad, k, v, p)
    with pytest.raises(TypeError, match="v must be a floating-point array"):
        sa.sparse_attention(q, k, v.astype(np.int32), p)
    for s in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            sa.sparse_attention(q, k, v, p, scale=s)
    for s in ("1", True, 1j):
        with pytest.raises(TypeError, match="scale must be a real number"):
            sa.sparse_attention(q, k, v, p, scale=s)
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean array"):
        sa.sparse_attention(q, k, v, p, key_padding_mask=np.zeros((2, 10), int))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(3, 10\) but must broadcast to \(2, 10\)"):
        sa.sparse_attention(q, k, v, p, key_padding_mask=np.zeros((3, 10), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 9\)"):
        sa.sparse_attention(q, k, v, p, key_padding_mask=np.zeros((2, 9), bool))
    with pytest.raises(TypeError, match="pattern must be"):
        sa.sparse_attention(q, k, v, "band")
    with pytest.raises(ValueError, match="must be 2-D"):
        sa.sparse_attention(q, k, v, sp.coo_array(np.ones(10)))
    with pytest.raises(ValueError, match="path must be one of"):
        sa.sparse_attention(q, k, v, p, path="gpu")
