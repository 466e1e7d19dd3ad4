"""Decode over a KV cache: few query rows at the end of a cache view, against the dense float64 reference.

The engine rewrites such calls (``sparseattn.engine.decode``): the keys their
pattern reaches, read in place from views of a larger cache, and grouped
query heads packed as rows.  These tests check the results against the
reference on the untouched call, and that the cache is neither copied nor
changed.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import decode
from sparseattn.reference import dense_attention


def _cache(rng, b, h_kv, t_max, d, dtype=np.float64):
    k = rng.standard_normal((b, h_kv, t_max, d)).astype(dtype)
    v = rng.standard_normal((b, h_kv, t_max, d)).astype(dtype)
    return k, v


@pytest.mark.parametrize("h_q, h_kv", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("path", ["auto", "blocked"])
def test_decode_rows_on_a_cache_view_equal_the_reference(h_q, h_kv, n_q, path):
    rng = np.random.default_rng(h_q * 10 + n_q)
    T, W, d = 300, 40, 16
    kc, vc = _cache(rng, 2, h_kv, 420, d)
    k, v = kc[:, :, :T], vc[:, :, :T]
    assert not k.flags.c_contiguous
    q = rng.standard_normal((2, h_q, n_q, d))
    p = sa.causal(n_q, W - 1, n_k=T)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, path=path)
    ref, ref_lse = dense_attention(q, k, v, p, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kw", ["softcap", "sinks", "padding", "float32"])
def test_decode_with_modifiers_and_padding(kw):
    rng = np.random.default_rng(7)
    T, W, d, h_q, h_kv = 260, 64, 16, 8, 2
    dtype = np.float32 if kw == "float32" else np.float64
    kc, vc = _cache(rng, 2, h_kv, 300, d, dtype)
    k, v = kc[:, :, :T], vc[:, :, :T]
    q = rng.standard_normal((2, h_q, 1, d)).astype(dtype)
    p = sa.causal(1, W - 1, n_k=T, offset=T - 1)
    opts = {}
    if kw == "softcap":
        opts["softcap"] = 1.5
    if kw == "sinks":
        opts["sinks"] = rng.standard_normal(h_q)
    if kw == "padding":  # left padding of the first sequence reaches into the window of neither; the second's does
        mask = np.zeros((2, T), dtype=bool)
        mask[0, :30] = True
        mask[1, T - 50 : T - 20] = True
        opts["key_padding_mask"] = mask
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, **opts)
    ref, ref_lse = dense_attention(q, k, v, p, return_lse=True, **opts)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out, ref, **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)
    assert out.dtype == dtype


def test_a_row_with_every_window_key_padded_outputs_zeros_and_the_sink():
    rng = np.random.default_rng(3)
    T, W, d = 100, 16, 8
    kc, vc = _cache(rng, 1, 2, 128, d)
    q = rng.standard_normal((1, 4, 1, d))
    mask = np.zeros((1, T), dtype=bool)
    mask[0, T - W :] = True
    sinks = np.array([0.5, -1.0, 2.0, 0.0])
    out, lse = sa.sparse_attention(q, kc[:, :, :T], vc[:, :, :T], sa.causal(1, W - 1, n_k=T), sinks=sinks,
                                   key_padding_mask=mask, return_lse=True)  # fmt: skip
    assert np.all(out == 0)
    np.testing.assert_allclose(lse[..., 0], sinks[None], rtol=0, atol=0)


def test_the_rewrite_keeps_only_the_window_and_packs_the_groups():
    rng = np.random.default_rng(0)
    T, W = 1000, 64
    kc, vc = _cache(rng, 1, 2, 1200, 8)
    q = rng.standard_normal((1, 8, 1, 8))
    q2, k2, v2, p2, _, unpack = decode.rewrite(q, kc[:, :, :T], vc[:, :, :T], sa.causal(1, W - 1, n_k=T), None, {})
    assert k2.shape == (1, 2, W, 8) and np.shares_memory(k2, kc) and np.shares_memory(v2, vc)
    assert q2.shape == (1, 2, 4, 8) and p2.shape == (4, W) and p2.nnz == 4 * W
    # the next step's shifted pattern is the same pattern: its plan comes from the cache
    p3 = decode.rewrite(q, kc[:, :, : T + 1], vc[:, :, : T + 1], sa.causal(1, W - 1, n_k=T + 1), None, {})[3]
    assert p3.identity == p2.identity


def test_alibi_and_score_mod_calls_are_left_whole():
    rng = np.random.default_rng(0)
    kc, vc = _cache(rng, 1, 2, 64, 8)
    q = rng.standard_normal((1, 2, 1, 8))
    p = sa.causal(1, 7, n_k=50)
    assert decode.rewrite(q, kc[:, :, :50], vc[:, :, :50], p, None, {"alibi_slopes": np.ones(2)}) is None
    out = sa.sparse_attention(q, kc[:, :, :50], vc[:, :, :50], p, alibi_slopes=np.array([0.3, 0.1]))
    ref = dense_attention(q, kc[:, :, :50], vc[:, :, :50], p, alibi_slopes=np.array([0.3, 0.1]))
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12)


def test_a_step_reads_the_cache_in_place_without_copies():
    """The call allocates O(window), not O(cache): a copy of the cache view would be 2 x 32 MiB."""
    rng = np.random.default_rng(0)
    t_max, T, W, d = 16384, 16000, 256, 64
    kc = rng.standard_normal((1, 8, t_max, d), dtype=np.float32)
    vc = rng.standard_normal((1, 8, t_max, d), dtype=np.float32)
    q = rng.standard_normal((1, 32, 1, d), dtype=np.float32)
    before = (kc.copy(), vc.copy())
    k, v = kc[:, :, :T], vc[:, :, :T]
    sa.sparse_attention(q, k, v, sa.causal(1, W - 1, n_k=T))  # compiles, plans
    tracemalloc.start()
    try:
        out = sa.sparse_attention(q, k, v, sa.causal(1, W - 1, n_k=T))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"a decode step allocated {peak / 2**20:.1f} MiB (the cache view is {k.nbytes / 2**20:.0f} MiB)"
    ref = dense_attention(q, k[:, :, T - W :], v[:, :, T - W :], sa.causal(1, W - 1, n_k=W))
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)
    assert np.array_equal(kc, before[0]) and np.array_equal(vc, before[1])
