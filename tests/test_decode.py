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
from sparseattn.engine import decode, decode_step
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


# --------------------------------------------------------------------------------------------
# the decode kernel (sparseattn.kernels.decode): which calls it takes, and that they equal the reference
# --------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of calls :func:`sparseattn.engine.decode._kernel_call` answered (not None)."""
    calls = []
    real = decode._kernel_call

    def spy(*args):
        done = real(*args)
        calls.append(done is not None)
        return done

    monkeypatch.setattr(decode, "_kernel_call", spy)
    return calls


def _gqa_ref(q, k, v, p, **kw):
    g = q.shape[-3] // k.shape[-3]
    return dense_attention(q, np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3), p, return_lse=True, **kw)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("h_q, h_kv, n_q", [(8, 2, 1), (8, 8, 1), (8, 1, 1), (4, 2, 5), (3, 1, 16), (16, 2, 2)])
@pytest.mark.parametrize("opts", ["plain", "softcap+alibi", "sinks+padding", "alibi per batch"])
def test_the_decode_kernel_equals_the_reference(kernel_calls, dtype, h_q, h_kv, n_q, opts):
    rng = np.random.default_rng(h_q * 100 + h_kv * 10 + n_q)
    T, W, d, dv = 150, 37, 12, 20
    kc = rng.standard_normal((2, h_kv, 170, d)).astype(dtype)
    vc = rng.standard_normal((2, h_kv, 170, dv)).astype(dtype)
    k, v = kc[:, :, :T], vc[:, :, :T]
    q = rng.standard_normal((2, h_q, n_q, d)).astype(dtype)
    p = sa.causal(n_q, W - 1, n_k=T)
    kw = {}
    if "softcap" in opts:
        kw["softcap"] = 2.5
    if opts == "softcap+alibi":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.5, h_q)
    if opts == "alibi per batch":
        kw["alibi_slopes"] = rng.uniform(0.01, 0.5, (2, h_q))
    if "sinks" in opts:
        kw["sinks"] = rng.standard_normal(h_q)
    if "padding" in opts:  # left padding: batch 0's window is partly padded, batch 1's not at all
        mask = np.zeros((2, T), dtype=bool)
        mask[0, : T - 20] = True
        kw["key_padding_mask"] = mask
    before = (kc.copy(), vc.copy(), q.copy())
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, **kw)
    assert kernel_calls == [True]
    ref, ref_lse = _gqa_ref(q, k, v, p, **kw)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out, ref, **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)
    assert out.dtype == dtype and lse.dtype == dtype and out.shape == (2, h_q, n_q, dv)
    assert all(np.array_equal(a, b) for a, b in zip((kc, vc, q), before))


def test_the_decode_kernel_on_2d_inputs_sliding_windows_and_rows_without_keys(kernel_calls):
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 8)), rng.standard_normal((90, 8)), rng.standard_normal((90, 8))
    for p in (sa.sliding_window(3, 4, n_k=90, offset=40), sa.causal(3, 5, n_k=90, offset=2),
              sa.from_dense(np.eye(3, 90, k=50, dtype=bool) | np.eye(3, 90, k=51, dtype=bool))):  # fmt: skip
        out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
        ref, ref_lse = dense_attention(q, k, v, p, return_lse=True)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-10, atol=1e-12)
    assert kernel_calls == [True] * 3
    # a row with no key at all (a window that ends before key 0): zeros and lse = -inf, with the other rows right
    p = sa.sliding_window(3, 1, n_k=90, offset=-2)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, p, return_lse=True)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert lse[0] == -np.inf and np.all(out[0] == 0) and np.isfinite(lse[1:]).all()


@pytest.mark.parametrize("where", ["q", "k in window", "v in window", "k padded", "v outside window"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_follow_the_policy_through_the_decode_kernel(where, value):
    """The kernel flags a NaN or an infinity it meets, and the call is recomputed on the policy's paths."""
    rng = np.random.default_rng(11)
    T, W, d = 80, 16, 8
    kc, vc = _cache(rng, 1, 2, 100, d)
    q = rng.standard_normal((1, 4, 1, d))
    mask = np.zeros((1, T), dtype=bool)
    mask[0, T - 3] = True
    if where == "q":
        q[0, 1, 0, 2] = value
    elif where == "k in window":
        kc[0, 1, T - 5, 3] = value
    elif where == "v in window":
        vc[0, 0, T - 4, 1] = value
    elif where == "k padded":
        kc[0, 0, T - 3, 0] = value
    else:
        vc[0, 1, T - W - 4, 0] = value
    k, v = kc[:, :, :T], vc[:, :, :T]
    p = sa.causal(1, W - 1, n_k=T)
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=mask, return_lse=True)
    ref, ref_lse = _gqa_ref(q, k, v, p, key_padding_mask=mask)
    for got, want in ((out, ref), (lse, ref_lse)):
        for cls in (np.isnan, np.isposinf, np.isneginf):
            assert np.array_equal(cls(got), cls(want)), (where, value, cls.__name__)
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-10, atol=1e-12)


def test_calls_outside_the_kernel_s_form_take_the_other_paths(kernel_calls):
    rng = np.random.default_rng(2)
    kc, vc = _cache(rng, 1, 2, 64, 8)
    q = rng.standard_normal((1, 4, 1, 8))
    k, v = kc[:, :, :50], vc[:, :, :50]
    cases = [
        (q, k, v, sa.sliding_window(1, 6, n_k=50, offset=40, dilation=2), {}),  # two runs per row
        (q, k[:1, :1], v[:1, :1], sa.causal(1, 7, n_k=50), {}),  # one k/v head, q's batch axis broadcast: equal here
        (q.astype(np.float32), k, v, sa.causal(1, 7, n_k=50), {}),  # mixed dtypes
        (q, k, v, sa.causal(1, 7, n_k=50), {"path": "blocked"}),
    ]
    for qq, kk, vv, p, kw in cases:
        out = sa.sparse_attention(qq, kk, vv, p, **kw)
        ref = _gqa_ref(qq.astype(np.float64), kk, vv, p)[0]
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert kernel_calls[0] is False and kernel_calls[2:] == [False] * (len(kernel_calls) - 2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_spans_longer_than_a_value_chunk_equal_the_reference(kernel_calls, dtype):
    """The P.V pass walks the span in chunks of value rows: spans of several chunks, rows ending apart, dv with a tail."""
    from sparseattn.kernels import decode as kernel

    rng = np.random.default_rng(11)
    T, W, d, dv = 700, 3 * kernel._KC + 29, 16, 2 * 16 + 5
    kc = rng.standard_normal((2, 2, 760, d)).astype(dtype)
    vc = rng.standard_normal((2, 2, 760, dv)).astype(dtype)
    k, v = kc[:, :, :T], vc[:, :, :T]
    q = rng.standard_normal((2, 6, 4, d)).astype(dtype)
    p = sa.causal(4, W - 1, n_k=T, offset=T - 70)  # each row's run starts and ends 1 key after the last row's
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
    assert kernel_calls == [True]
    ref, ref_lse = _gqa_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), p)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out, ref, **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("h_q, h_kv, n_q", [(8, 2, 1), (3, 1, 1), (7, 1, 1), (16, 2, 2), (2, 2, 1), (6, 2, 5)])
@pytest.mark.parametrize("dv", [64, 96])
def test_the_decode_kernel_s_vector_tiles_equal_the_reference(kernel_calls, dtype, h_q, h_kv, n_q, dv):
    """d a multiple of the lanes: scores by tiles of 4, 2 and 1 rows (and the keys after the last whole tile);
    dv a multiple of 4 vectors: values by 4-row blocks (dv 96 in float32 on AVX-512: the 6-row blocks)."""
    rng = np.random.default_rng(h_q * 100 + h_kv * 10 + n_q + dv)
    T, W, d = 300, 77, 64  # 77 keys: a partial tile at the end of every row's run
    kc = rng.standard_normal((2, h_kv, 320, d)).astype(dtype)
    vc = rng.standard_normal((2, h_kv, 320, dv)).astype(dtype)
    k, v = kc[:, :, :T], vc[:, :, :T]
    q = rng.standard_normal((2, h_q, n_q, d)).astype(dtype)
    p = sa.causal(n_q, W - 1, n_k=T, offset=T - 3)  # the rows' windows end 2 keys before the span's end: runs differ
    mask = np.zeros((2, T), dtype=bool)
    mask[1, T - 90 : T - 60] = True
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, softcap=4.0, key_padding_mask=mask)
    assert kernel_calls == [True]
    ref, ref_lse = _gqa_ref(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), p, softcap=4.0,
                            key_padding_mask=mask)  # fmt: skip
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out, ref, **tol)
    np.testing.assert_allclose(lse, ref_lse, **tol)


@pytest.mark.parametrize("parts", [2, 3, 7])
@pytest.mark.parametrize("opts", ["plain", "alibi+sinks+padding", "softcap"])
def test_keys_cut_into_parts_merge_to_the_reference(monkeypatch, kernel_calls, parts, opts):
    """A few slices on many threads: each slice's keys in ``parts`` ranges, merged by log-sum-exp."""
    monkeypatch.setattr(decode_step, "key_parts", lambda slices, keys, n_threads: parts)
    monkeypatch.setattr(decode_step, "_PARALLEL_MIN_FLOP", 0)  # the ranges on the pool's threads, however small
    rng = np.random.default_rng(parts)
    T, W, d = 200, 61, 16
    kc, vc = _cache(rng, 2, 1, 230, d)
    k, v = kc[:, :, :T], vc[:, :, :T]
    q = rng.standard_normal((2, 4, 5, d))
    p = sa.causal(5, W - 1, n_k=T, offset=T - 20)  # rows' windows end 20 keys before the last: parts differ per row
    kw = {"softcap": 3.0} if opts == "softcap" else {}
    if opts == "alibi+sinks+padding":  # batch 0: a padded stretch that covers whole parts of its window
        mask = np.zeros((2, T), dtype=bool)
        mask[0, : T - 45] = True
        kw = {"alibi_slopes": rng.uniform(0.05, 0.3, 4), "sinks": rng.standard_normal(4), "key_padding_mask": mask}
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, **kw)
    assert kernel_calls == [True]
    ref, ref_lse = _gqa_ref(q, k, v, p, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-10, atol=1e-12)


def test_key_parts_fill_the_threads_with_ranges_of_at_least_512_keys():
    assert decode_step.key_parts(8, 4096, 2) == 1  # enough slices
    assert decode_step.key_parts(8, 4096, 16) == 2
    assert decode_step.key_parts(1, 4096, 16) == 8  # multi-query, batch 1: 8 ranges of 512 keys
    assert decode_step.key_parts(1, 100000, 16) == 16
    assert decode_step.key_parts(3, 300, 16) == 1  # too few keys to cut


def test_the_compile_job_s_decode_step_runs_the_kernel():
    """What the cold start's compile job and ``sparseattn warmup`` run for the decode kernel (both layouts)."""
    import numba

    from sparseattn.kernels.decode import decode_slices

    decode_step.compile_kernel("float64")
    f64 = numba.float64
    layouts = {(sig[1].layout, sig[2].layout) for sig in decode_slices.signatures if sig[1].dtype == f64}
    assert ("C", "C") in layouts and any("A" in pair for pair in layouts)
