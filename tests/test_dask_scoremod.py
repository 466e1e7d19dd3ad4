"""``score_mod`` on the Dask path: every task's engine call at the positions of the whole call.

Each case runs :func:`sparseattn.dask.sparse_attention` with a ``ScoreMod`` on a real
``distributed.LocalCluster`` of two worker processes and compares with the dense float64 reference
(float64 within 1e-9, float32 within 2e-4, relative to the output's scale).  The modifier's bias depends
on the flattened batch index, the query head, the row and the key, so a task that passed its local
positions (or a block's local slice numbers) would differ.  Each worker compiles the ``ScoreMod``'s kernels
once per dtype (the module's one object, unpickled once per process): the slow part of this module.
"""

import math
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import sparseattn as sa
from sparseattn.dask import sparse_attention as dask_attention
from sparseattn.dask.graph import slice_positions
from sparseattn.reference import dense_attention

TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4}


# -- user modifiers (module level: the workers import them by reference; Numba freezes the globals) --------


def _bias_f(s, b, h, i, j):
    """A bias whose differences between the keys of a row (what a softmax sees) depend on b, h, i and j."""
    return s + 0.01 * b * (j % 13) - 0.02 * h * ((i + j) % 5) + 0.03 * ((i * 7 + j * 3) % 11)


def _bias_df(s, b, h, i, j):
    return 1.0


ALIBI_NQ, ALIBI_NK = 200, 260
ALIBI_SLOPES = np.array([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.05]])  # (batch, head)


def _alibi_f(s, b, h, i, j):
    return s - ALIBI_SLOPES[b, h] * abs(i + (ALIBI_NK - ALIBI_NQ) - j)


def _alibi_df(s, b, h, i, j):
    return 1.0


def _bad_f(s, b, h, i, j):
    return s + undefined_name  # noqa: F821 - Numba cannot compile it


@pytest.fixture(scope="module")
def bias_mod():
    return sa.ScoreMod(_bias_f, _bias_df)


@pytest.fixture(scope="module")
def alibi_mod():
    return sa.ScoreMod(_alibi_f, _alibi_df)


def _arrays(rng, shape_q, shape_k, dtype):
    return tuple(rng.standard_normal(s).astype(dtype) for s in (shape_q, shape_k, shape_k))


def _close(got, ref, dtype):
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(got.astype(np.float64) - ref).max(initial=0.0))
    assert err <= TOL[np.dtype(dtype)] * scale, f"max abs error {err:.3g} (scale {scale:.3g}, {np.dtype(dtype)})"


def _check(client, q, k, v, p, q_chunks, k_chunks, mask=None, **mods):
    """Dask with ``mods`` against the float64 reference; also that the score_mod changes the result."""
    dq, dk, dv = da.from_array(q, chunks=q_chunks), da.from_array(k, chunks=k_chunks), da.from_array(v, chunks=k_chunks)
    out = dask_attention(dq, dk, dv, p, key_padding_mask=mask, **mods)
    assert out.chunks[:-1] == dq.chunks[:-1]
    got = client.compute(out).result()
    f64 = [x.astype(np.float64) for x in (q, k, v)]
    ref = dense_attention(*f64, p, key_padding_mask=mask, **mods)
    _close(got, ref, q.dtype)
    if "score_mod" in mods:
        plain = {a: b for a, b in mods.items() if a != "score_mod"}
        assert not np.allclose(ref, dense_attention(*f64, p, key_padding_mask=mask, **plain), atol=1e-3)
    return got


# -- the frame of a block of the leading axes ---------------------------------------------------------------


def test_slice_positions_of_blocks_chunked_on_several_axes():
    lead = (2, 3, 4)  # batch axes (2, 3), then 4 heads
    box = (slice(1, 2), slice(1, 3), slice(2, 4))
    got = slice_positions(lead, box)
    want = [(b0 * 3 + b1, h) for b0 in range(1, 2) for b1 in range(1, 3) for h in range(2, 4)]
    assert got.dtype == np.int64 and got.tolist() == [list(x) for x in want]
    assert slice_positions((5,), (slice(2, 4),)).tolist() == [[0, 2], [0, 3]]
    assert slice_positions((), ()) is None


def test_score_mod_pickles_to_the_same_object(bias_mod):
    from dask.base import tokenize

    assert pickle.loads(pickle.dumps(bias_mod)) is bias_mod
    assert tokenize(bias_mod) == tokenize(pickle.loads(pickle.dumps(bias_mod)))
    assert tokenize(bias_mod) != tokenize(sa.ScoreMod(_bias_f, _bias_df))


# -- every kind of task, against the float64 reference -------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)])
def test_band_globals_halos_shared_keys_and_global_rows(client, rng, bias_mod, dtype):
    """Row and key chunks (halos), the shared global-key partial and the split global rows; heads chunked."""
    n, d = 260, 8
    q, k, v = _arrays(rng, (2, 3, n, d), (2, 3, n, d), dtype)
    p = sa.sliding_window(n, 20) | sa.global_tokens(n, [0, 131, n - 1])
    _check(client, q, k, v, p, (1, (2, 1), (90, 70, 100), d), (2, 3, (100, 60, 100), d), score_mod=bias_mod)


def test_generic_pattern_key_runs_and_long_rows_split(client, rng, bias_mod):
    """The generic path: key slices cut into contiguous runs, and full rows split over the key blocks."""
    n, d = 2500, 8
    p = sa.from_sparse((sa.sliding_window(n, 3, dilation=2) | sa.global_tokens(n, [10, 2000])).csr)
    q, k, v = _arrays(rng, (2, n, d), (2, n, d), np.float64)
    _check(client, q, k, v, p, (1, 900, d), (2, 700, d), score_mod=bias_mod)


def test_scattered_generic_pattern(client, rng, bias_mod):
    n, d = 300, 8
    p = sa.from_sparse(sp.random(n, n, density=0.05, random_state=1, format="csr") + sp.eye(n))
    q, k, v = _arrays(rng, (2, n, d), (2, n, d), np.float64)
    _check(client, q, k, v, p, (1, (120, 180), d), (2, (100, 150, 50), d), score_mod=bias_mod)


def test_several_batch_axes_chunked(client, rng, bias_mod):
    """Leading shape (2, 3, 4) chunked on every axis: a block's flattened batch indices are not one range."""
    n, d = 120, 8
    q, k, v = _arrays(rng, (2, 3, 4, n, d), (2, 3, 4, n, d), np.float64)
    p = sa.sliding_window(n, 9) | sa.global_tokens(n, [5])
    kpm = np.zeros((2, 3, n), dtype=bool)
    kpm[1, 2, 100:] = True
    kpm[0, 1, 5] = True  # a padded global key
    _check(client, q, k, v, p, (1, (2, 1), (3, 1), 50, d), (2, 3, 4, 40, d), mask=kpm, score_mod=bias_mod)


def test_per_head_patterns_with_key_padding(client, rng, bias_mod):
    n, d = 200, 8
    q, k, v = _arrays(rng, (2, 3, n, d), (2, 3, n, d), np.float64)
    heads = [sa.sliding_window(n, 5), sa.longformer(n, attention_window=16, global_indices=[17]),
             sa.sliding_window(n, 4, dilation=3)]  # fmt: skip
    kpm = np.zeros((2, n), dtype=bool)
    kpm[0, 150:] = True
    kpm[1, 17] = True
    _check(client, q, k, v, heads, (1, 3, 80, d), (2, 3, 70, d), mask=kpm, score_mod=bias_mod)


@pytest.mark.parametrize("dtype", [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)])
def test_grouped_heads_with_softcap_alibi_and_sinks(client, rng, bias_mod, dtype):
    """4 query heads over 2 kv heads, head chunks (3, 1) (rechunked to groups), every modifier at once."""
    n, d = 260, 8
    q, k, v = _arrays(rng, (2, 4, n, d), (2, 2, n, d), dtype)
    q *= 3  # scores past the cap
    mods = {"softcap": 2.0, "alibi_slopes": rng.uniform(0.02, 0.3, (2, 4)), "sinks": rng.standard_normal(4),
            "score_mod": bias_mod}  # fmt: skip
    for p in (sa.sliding_window(n, 20) | sa.global_tokens(n, [0, 131]), sa.sliding_window(n, 6, dilation=3)):
        _check(client, q, k, v, p, (1, (3, 1), (90, 70, 100), d), (2, 2, (100, 60, 100), d), **mods)


@pytest.mark.slow  # a second ScoreMod to compile on every worker and locally: about 30 s
def test_hand_written_alibi_equals_alibi_slopes_and_the_local_engine(client, rng, alibi_mod):
    """ALiBi as a ScoreMod on Dask (chunked prefill, n_q < n_k) equals alibi_slopes, and the local engine."""
    d = 8
    q, k, v = _arrays(rng, (2, 4, ALIBI_NQ, d), (2, 4, ALIBI_NK, d), np.float64)
    p = sa.causal(ALIBI_NQ, 30, n_k=ALIBI_NK) | sa.random_pattern(ALIBI_NQ, ALIBI_NK, 2, seed=3)
    dq = da.from_array(q, chunks=(1, 2, 70, d))
    dk, dv = (da.from_array(x, chunks=(2, 2, 90, d)) for x in (k, v))
    a = client.compute(dask_attention(dq, dk, dv, p, score_mod=alibi_mod)).result()
    b = client.compute(dask_attention(dq, dk, dv, p, alibi_slopes=ALIBI_SLOPES)).result()
    ref = dense_attention(q, k, v, p, alibi_slopes=ALIBI_SLOPES)
    _close(a, ref, np.float64)
    _close(b, ref, np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    local = sa.sparse_attention(q, k, v, p, score_mod=alibi_mod)
    np.testing.assert_allclose(a, local, rtol=1e-11, atol=1e-12)


# -- errors on the client -----------------------------------------------------------------------------------


def test_bad_score_mod_fails_on_the_client(rng):
    q, k, v = _arrays(rng, (2, 64, 8), (2, 64, 8), np.float32)
    dq = da.from_array(q, chunks=(1, 32, 8))
    p = sa.causal(64)
    with pytest.raises(TypeError, match=r"score_mod's f \(_bad_f\) cannot be compiled by Numba for \(s: float32"):
        dask_attention(dq, k, v, p, score_mod=sa.ScoreMod(_bad_f, _bias_df))
    with pytest.raises(TypeError, match=r"score_mod must be a sparseattn.ScoreMod"):
        dask_attention(dq, k, v, p, score_mod=lambda s, b, h, i, j: s)


def test_bias_depends_on_every_argument():
    """The bias's difference between two keys of a row changes with b, h, i and j: a softmax sees each of them.

    (A bias constant per batch and head would cancel in the softmax, and a task that got b or h wrong would
    pass unnoticed.)
    """

    def gap(b, h, i, j):
        return _bias_f(0.0, b, h, i, j) - _bias_f(0.0, b, h, i, j + 4)

    base = gap(1, 1, 5, 9)
    assert all(not math.isclose(base, x) for x in (gap(2, 1, 5, 9), gap(1, 2, 5, 9), gap(1, 1, 6, 9), gap(1, 1, 5, 10)))
