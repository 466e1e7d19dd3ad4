"""The register-blocked span path (kernels/simd.py: qk_block, pv_block) against the float64 reference and the BLAS path."""

import numpy as np
import pytest
from helpers import assert_attention_close

import sparseattn as sa
import sparseattn.engine.fused_forward as fused_mod
from sparseattn.engine import plan as plan_mod
from sparseattn.engine.validate import prepare
from sparseattn.reference import dense_attention

DTYPES = [np.float32, np.float64]


def _width(dtype):
    from sparseattn.kernels.simd import block_width

    return block_width(dtype)


@pytest.fixture
def spy(monkeypatch):
    """Records, for every thread's buffers, whether the micro-kernel path was selected; ``force_blas`` turns it off."""
    real = fused_mod.panel_buffers
    state = {"simd": [], "force_blas": False}

    def wrapped(n_k, d, dv, dtype, chunk, span=0):
        kp, packed = real(n_k, d, dv, dtype, chunk, span)
        if state["force_blas"]:
            kp, packed = kp[:0], packed[:0]
        state["simd"].append(packed.size > 0)
        return kp, packed

    monkeypatch.setattr(fused_mod, "panel_buffers", wrapped)
    plan_mod.clear_plan_cache()
    yield state
    plan_mod.clear_plan_cache()


def _run(q, k, v, pattern, key_padding_mask=None):
    prep = prepare(q, k, v, pattern, None, key_padding_mask)
    out, lse = fused_mod.fused_attention(
        prep.q, prep.k, prep.v, prep.patterns, prep.slice_pattern, prep.scale, prep.key_valid, prep.slice_batch
    )
    return out.reshape(prep.lead + out.shape[1:])


def _qkv(rng, lead, n_q, n_k, d, dv, dtype):
    return (
        rng.standard_normal(lead + (n_q, d)).astype(dtype),
        rng.standard_normal(lead + (n_k, d)).astype(dtype),
        rng.standard_normal(lead + (n_k, dv)).astype(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_panel_buffers_select_the_path(dtype):
    w = _width(dtype)
    kp, packed = fused_mod.panel_buffers(100, 24, 2 * w, dtype, 1024)  # fewer keys than two chunks
    assert packed.shape == (-(-100 // w),) and np.all(packed == -1)
    assert kp.shape == (len(packed) * 24 * w,) and kp.dtype == dtype
    kp, packed = fused_mod.panel_buffers(10**6, 24, 2 * w, dtype, 64)  # long sequence: two chunks' worth
    assert packed.shape == (2 * (64 // w + 2),) and kp.shape == (len(packed) * 24 * w,)
    two = 2 * (64 // w + 2)
    kp, packed = fused_mod.panel_buffers(10**6, 24, 2 * w, dtype, 64, 5000)  # a tile's whole span and a chunk
    assert packed.shape == (-(-5000 // w) + 64 // w + 2,)
    kp, packed = fused_mod.panel_buffers(3000, 24, 2 * w, dtype, 64, 5000)  # never more than the keys
    assert packed.shape == (-(-3000 // w),)
    cap = fused_mod.PANEL_CACHE_BYTES // (24 * w * np.dtype(dtype).itemsize)
    kp, packed = fused_mod.panel_buffers(10**9, 24, 2 * w, dtype, 64, 10**8)  # capped in bytes
    assert packed.shape == (cap,) and kp.nbytes <= fused_mod.PANEL_CACHE_BYTES
    kp, packed = fused_mod.panel_buffers(10**6, 24, 2 * w, dtype, 64, 10)  # a narrow span: two chunks still
    assert packed.shape == (two,)
    kp, packed = fused_mod.panel_buffers(100, 24, w + 4, dtype, 1024)  # dv not a whole register block
    assert kp.size == 0 and packed.size == 0


# shapes chosen for the micro-kernels' edges: rows not a multiple of 6 or of the tile, keys not
# a multiple of the panel width, rectangular, d not a multiple of the lanes, several slices per plan
CASES = [
    # (n_q, n_k, d, dv in register blocks, pattern)
    (197, 197, 64, 4, lambda n, m: sa.longformer(n, 50, [0, 100])),
    (131, 131, 20, 1, lambda n, m: sa.sliding_window(n, left=30, right=2)),
    (90, 143, 7, 2, lambda n, m: sa.sliding_window(n, 11, n_k=m)),
    (64, 64, 32, 2, lambda n, m: sa.sliding_window(n, 200)),  # window wider than n: one dense span
    (150, 150, 16, 3, lambda n, m: sa.sliding_window(n, 9) | sa.random_pattern(n, n, 5, seed=3)),
    (120, 120, 12, 1, lambda n, m: sa.causal(n)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("chunk", [None, 40, 1], ids=["chunk-default", "chunk40", "chunk1"])
@pytest.mark.parametrize("cache", ["span", "two-chunks"])
def test_simd_spans_match_reference_and_blas(dtype, case, chunk, cache, spy, monkeypatch):
    if chunk is not None:  # spans cut into several chunks (online-softmax rescaling)
        monkeypatch.setattr(plan_mod, "CHUNK", chunk)
    if cache == "two-chunks":  # panel caches smaller than a tile's span: its panels evict each other
        monkeypatch.setattr(fused_mod, "PANEL_CACHE_BYTES", 0)
    n_q, n_k, d, blocks, make = CASES[case]
    rng = np.random.default_rng(case)
    q, k, v = _qkv(rng, (2, 3), n_q, n_k, d, blocks * _width(dtype), dtype)
    p = make(n_q, n_k)
    out = _run(q, k, v, p)
    assert spy["simd"] and all(spy["simd"])
    assert_attention_close(out, dense_attention(q, k, v, p), dtype)
    spy["force_blas"] = True
    spy["simd"].clear()
    plan_mod.clear_plan_cache()
    blas = _run(q, k, v, p)
    assert spy["simd"] and not any(spy["simd"])
    np.testing.assert_allclose(out, blas, rtol=2e-5 if dtype == np.float32 else 1e-12, atol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simd_key_padding_and_per_head(dtype, spy):
    rng = np.random.default_rng(7)
    n = 161
    q, k, v = _qkv(rng, (2, 3), n, n, 24, 2 * _width(dtype), dtype)
    kpm = np.ones((2, n), bool)
    kpm[0, 120:] = False  # a padded tail
    kpm[1, ::4] = False  # scattered padding inside every window
    heads = [sa.longformer(n, 40, [0]), sa.sliding_window(n, 13), sa.sliding_window(n, 70) | sa.global_tokens(n, [80])]
    out = _run(q, k, v, heads, key_padding_mask=kpm)
    assert all(spy["simd"])
    ref = dense_attention(q, k, v, heads, key_padding_mask=kpm)
    assert_attention_close(out, ref, dtype)


def test_simd_extreme_logits_stay_finite(spy):
    """Scores in the thousands (exp underflow over most of a row) give the reference's one-hot rows."""
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, (2,), 100, 100, 16, _width(np.float32), np.float32)
    q *= 40.0
    p = sa.sliding_window(100, 30)
    out = _run(q, k, v, p)
    assert all(spy["simd"]) and np.all(np.isfinite(out))
    assert_attention_close(out, dense_attention(q, k, v, p), np.float32)
