"""The fused forward path against the dense float64 reference and the staged path."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import assert_attention_close

import sparseattn as sa
from sparseattn.engine import fused_forward
from sparseattn.engine import plan as plan_mod
from sparseattn.engine.validate import prepare
from sparseattn.engine.fused_forward import fused_attention
from sparseattn.patterns import available, examples, get
from sparseattn.reference import dense_attention

DTYPES = [np.float32, np.float64]


def run_fused(q, k, v, pattern, scale=None, key_padding_mask=None):
    """Call fused_attention exactly as sparse_attention does; returns (out, lse) in the leading shape."""
    prep = prepare(q, k, v, pattern, scale, key_padding_mask)
    q0, k0, v0 = prep.q.copy(), prep.k.copy(), prep.v.copy()
    out, lse = fused_attention(
        prep.q, prep.k, prep.v, prep.patterns, prep.slice_pattern, prep.scale, prep.key_valid, prep.slice_batch
    )
    for a, b in ((prep.q, q0), (prep.k, k0), (prep.v, v0)):
        np.testing.assert_array_equal(a, b)  # inputs untouched
    assert out.dtype == prep.q.dtype and lse.dtype == prep.q.dtype
    return out.reshape(prep.lead + out.shape[1:]), lse.reshape(prep.lead + lse.shape[1:])


def check(q, k, v, pattern, dtype, scale=None, key_padding_mask=None):
    out, lse = run_fused(q, k, v, pattern, scale, key_padding_mask)
    ref, ref_lse = dense_attention(q, k, v, pattern, scale=scale, key_padding_mask=key_padding_mask, return_lse=True)
    assert_attention_close(out, ref, dtype)
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_array_equal(out[empty], 0)
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=tol, atol=tol * 10)
    return out, lse


def qkv(rng, lead, n_q, n_k, d, dtype, dv=None, scale=1.0):
    dv = d if dv is None else dv
    q = (rng.standard_normal(lead + (n_q, d)) * scale).astype(dtype)
    k = (rng.standard_normal(lead + (n_k, d)) * scale).astype(dtype)
    v = rng.standard_normal(lead + (n_k, dv)).astype(dtype)
    return q, k, v


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny GEMM chunks, long-row threshold and panel caches, so small inputs exercise every code path."""
    monkeypatch.setattr(plan_mod, "CHUNK", 16)
    monkeypatch.setattr(plan_mod, "LONG_MIN", 24)
    monkeypatch.setattr(fused_forward, "PANEL_CACHE_BYTES", 0)  # two chunks' worth: spans evict their panels
    plan_mod.clear_plan_cache()
    yield
    plan_mod.clear_plan_cache()


@pytest.fixture(params=[False, True], ids=["whole", "chunked"])
def chunking(request):
    """Runs a test with the default chunks and again with ``small_chunks``."""
    if request.param:
        request.getfixturevalue("small_chunks")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_q, n_k, per_row", [(50, 50, 5), (37, 90, 20), (90, 31, 3), (64, 64, 64), (20, 200, 150)]
)
def test_random_patterns(dtype, n_q, n_k, per_row):
    rng = np.random.default_rng(n_q * 1000 + per_row)
    p = sa.random_pattern(n_q, n_k, per_row, seed=per_row)
    check(*qkv(rng, (2, 3), n_q, n_k, 16, dtype), p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("chunking")
def test_band_and_globals(dtype):
    rng = np.random.default_rng(1)
    p = sa.longformer(150, 24, [0, 7, 149])
    check(*qkv(rng, (2,), 150, 150, 8, dtype, dv=5), p, dtype, scale=0.3)
    p2 = sa.sliding_window(150, left=40, right=3) | sa.global_tokens(150, [60])
    check(*qkv(rng, (1, 2), 150, 150, 8, dtype), p2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("chunking")
def test_generic_plans_match(dtype):
    """Dilated, unions with random entries, long rows and dense masks through the CSR planner."""
    rng = np.random.default_rng(2)
    n = 120
    dense = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= 5
    dense[[3, 4, 90]] = True  # identical long rows (grouped) and one alone
    dense[50, ::3] = True
    patterns = [
        sa.sliding_window(n, 20, dilation=3),
        sa.sliding_window(n, 9) | sa.random_pattern(n, n, 6, seed=9),
        sa.from_dense(dense),
        sa.from_dense(rng.random((n, n)) < 0.5),
        sa.causal(n),
    ]
    for p in patterns:
        check(*qkv(rng, (2,), n, n, 12, dtype), p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rectangular_and_per_head(dtype):
    rng = np.random.default_rng(3)
    heads = [
        sa.sliding_window(40, 4, n_k=70),
        sa.random_pattern(40, 70, 9, seed=1),
        sa.sliding_window(40, 6, n_k=70, dilation=2),
    ]
    check(*qkv(rng, (2, 3), 40, 70, 8, dtype, dv=3), heads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_and_empty_pattern(dtype):
    rng = np.random.default_rng(4)
    mask = rng.random((30, 30)) < 0.3
    mask[[0, 5, 29]] = False
    out, lse = check(*qkv(rng, (2,), 30, 30, 8, dtype), sa.from_dense(mask), dtype)
    assert np.all(out[:, [0, 5, 29]] == 0) and np.all(np.isneginf(lse[:, [0, 5, 29]]))
    out, lse = check(*qkv(rng, (2,), 30, 30, 8, dtype), sa.from_dense(np.zeros((30, 30), bool)), dtype)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.usefixtures("chunking")
def test_key_padding(dtype):
    rng = np.random.default_rng(5)
    n = 100
    pad = np.zeros((2, n), dtype=bool)
    pad[0, -17:] = True
    pad[1, 0] = True  # a padded global key
    pad[1, 40:60] = True  # some rows lose their whole band
    for p in (sa.longformer(n, 8, [0, 50]), sa.random_pattern(n, n, 10, seed=2), sa.sliding_window(n, 30, dilation=2)):
        check(*qkv(rng, (2, 3), n, n, 8, dtype), p, dtype, key_padding_mask=pad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(dtype):
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, (2,), 80, 80, 16, dtype, scale=12.0)  # scores of order 1e3
    for p in (sa.longformer(80, 10, [0]), sa.random_pattern(80, 80, 7, seed=3)):
        out, _ = check(q, k, v, p, dtype)
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_and_zero_scale(dtype):
    rng = np.random.default_rng(7)
    p = sa.longformer(60, 10, [2])
    check(*qkv(rng, (2,), 60, 60, 8, dtype), p, dtype, scale=-0.7)
    check(*qkv(rng, (2,), 60, 60, 8, dtype), p, dtype, scale=0.0)


def _registered_cases():
    for name in available():
        for i, kwargs in enumerate(examples(name)):
            yield pytest.param(name, kwargs, id=f"{name}-{i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, kwargs", list(_registered_cases()))
def test_fused_equals_staged_on_registered_builders(name, kwargs, dtype):
    p = get(name)(**kwargs)
    n_q, n_k = (p[0] if isinstance(p, (list, tuple)) else p).shape
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    q, k, v = qkv(rng, (2, len(p) if isinstance(p, (list, tuple)) else 2), n_q, n_k, 8, dtype)
    fused = sa.sparse_attention(q, k, v, p, path="fused")
    staged = sa.sparse_attention(q, k, v, p, path="staged")
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(fused, staged, rtol=tol, atol=tol)
    assert_attention_close(fused, dense_attention(q, k, v, p), dtype)


def test_vectorised_exp_accuracy():
    from sparseattn.kernels.simd import vexp

    x = np.concatenate([-np.logspace(-8, 2.9, 5000), [0.0, -86.9, -87.5, -700.0, -1e30]])
    for dtype, tol in ((np.float32, 3e-7), (np.float64, 1e-13)):
        xs = x.astype(dtype)
        out = np.empty_like(xs)
        vexp(xs, out)
        ref = np.exp(xs.astype(np.float64))
        ok = ref > np.finfo(dtype).tiny * 2**24
        np.testing.assert_allclose(out[ok], ref[ok], rtol=tol)
        assert np.all(out[~ok] <= np.finfo(dtype).tiny * 2**25) and np.all(out >= 0)
        assert out[-1] == 0


@pytest.mark.slow
def test_million_tokens_row_slices_and_memory():
    """n = 2**20, 1 head, d 64, radius 256, float32: correct row slices, O(n d) peak memory (subprocess)."""
    script = textwrap.dedent(
        """
        import resource, numpy as np, sparseattn as sa
        n, d, r = 1 << 20, 64, 256
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, n, d), dtype=np.float32) for _ in range(3))
        p = sa.sliding_window(n, r)
        small = sa.sliding_window(2048, r)
        sa.sparse_attention(q[:, :2048], k[:, :2048], v[:, :2048], small)  # compile / warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = sa.sparse_attention(q, k, v, p)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        worst = 0.0
        for a in (0, 5000, n // 2, n - 40):
            b = a + 40
            for i in range(a, b):
                lo, hi = max(0, i - r), min(n, i + r + 1)
                s = (k[0, lo:hi].astype(np.float64) @ q[0, i].astype(np.float64)) / np.sqrt(d)
                w = np.exp(s - s.max()); w /= w.sum()
                ref = w @ v[0, lo:hi].astype(np.float64)
                worst = max(worst, float(np.max(np.abs(out[0, i] - ref))))
        print(worst, peak - before, out.nbytes, q.nbytes * 3)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-2000:]
    worst, extra, out_bytes, qkv_bytes = (float(x) for x in res.stdout.split()[-4:])
    assert worst < 2e-5
    # the output itself plus at most 0.3x the inputs and output: nothing nnz-sized (nnz * 4 B = 2.1 GB)
    assert extra <= out_bytes + 0.3 * (qkv_bytes + out_bytes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_kernels_match_threaded(dtype, monkeypatch):
    """parallel=False (for callers with their own threads) gives the threaded result."""
    import sparseattn.engine.fused_forward as fused_mod

    monkeypatch.setattr(fused_mod, "_PARALLEL_MIN_FLOP", 0)  # force the threaded kernels at this size
    rng = np.random.default_rng(8)
    p = sa.longformer(300, 40, [0, 299])
    prep = prepare(*qkv(rng, (3,), 300, 300, 16, dtype), p)
    args = (prep.q, prep.k, prep.v, prep.patterns, prep.slice_pattern, prep.scale, None, None)
    threaded, lse_t = fused_attention(*args)
    serial, lse_s = fused_attention(*args, parallel=False)
    np.testing.assert_allclose(serial, threaded, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-7)
    np.testing.assert_allclose(lse_s, lse_t, rtol=1e-6 if dtype == np.float32 else 1e-13)


def test_blas_thread_count_is_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from sparseattn.engine.threads import _numba_blas_controllers
    from sparseattn.engine.threads import blas_single_thread as _blas_single_thread

    libs = _numba_blas_controllers()
    before = [c.get_num_threads() for c in libs]
    with _blas_single_thread():
        assert all(c.get_num_threads() == 1 for c in libs)
        with _blas_single_thread():  # re-entrant
            assert all(c.get_num_threads() == 1 for c in libs)
        assert all(c.get_num_threads() == 1 for c in libs)
    assert [c.get_num_threads() for c in libs] == before
    assert threadpoolctl.threadpool_info()  # still readable
