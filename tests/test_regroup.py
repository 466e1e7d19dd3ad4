"""Dilated windows as plain bands over tokens regrouped by residue class (``engine/regroup.py``).

The rewritten forward and backward against the float64 reference, with grouped-query heads, batch
broadcasting, key padding, sinks and softcap, rectangular windows with offsets; the class map itself
against the window's definition; and the calls the rewrite must leave alone.
"""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import regroup
from sparseattn.reference import dense_attention, dense_attention_backward

WINDOWS = [
    {"n": 40, "radius": 7, "dilation": 2},
    {"n": 37, "left": 9, "right": 4, "dilation": 3},
    {"n": 30, "left": 5, "right": 6, "dilation": 2, "n_k": 41, "offset": 7},
    {"n": 33, "left": 10, "right": 0, "dilation": 4, "n_k": 25, "offset": -3},
    {"n": 29, "radius": 12, "dilation": 5},
]


def _window(spec):
    spec = dict(spec)
    return sa.sliding_window(spec.pop("n"), **spec)


@pytest.mark.parametrize("spec", WINDOWS)
def test_class_windows_cover_the_window(spec):
    p = _window(spec)
    n_q, n_k = p.shape
    dense = np.zeros((n_q, n_k), dtype=bool)
    D = p.dilation
    for c, cp, band in regroup.class_windows(p):
        assert band.dilation == 1
        sub = band.to_dense()
        rows, cols = np.nonzero(sub)
        assert not dense[c + D * rows, cp + D * cols].any()
        dense[c + D * rows, cp + D * cols] = True
    np.testing.assert_array_equal(dense, p.to_dense())


def _inputs(n_q, n_k, seed=0, b=2, h_q=4, h_kv=2, d=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, h_q, n_q, d))
    k = rng.standard_normal((1, h_kv, n_k, d))  # broadcast over the batch, grouped-query heads
    v = rng.standard_normal((1, h_kv, n_k, d + 2))
    kpm = rng.random((b, n_k)) < 0.15
    return q, k, v, kpm


@pytest.mark.parametrize("path", ["auto", "fused", "blocked"])
@pytest.mark.parametrize("spec", WINDOWS)
def test_forward_backward_match_the_reference(spec, path):
    p = _window(spec)
    q, k, v, kpm = _inputs(*p.shape)
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True, path=path)
    ref = dense_attention(q, k, v, p, key_padding_mask=kpm)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)
    go = np.random.default_rng(1).standard_normal(out.shape)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, key_padding_mask=kpm, path=path)
    refs = dense_attention_backward(go, q, k, v, p, key_padding_mask=kpm)
    for g, r, x in zip(grads, refs, (q, k, v)):
        assert g.shape == x.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-9)


def test_sinks_softcap_and_per_head_windows():
    p = sa.sliding_window(48, 9, dilation=3)
    q, k, v, kpm = _inputs(48, 48, seed=2, b=1, h_q=2, h_kv=2)
    sinks = np.array([0.3, -1.2])
    kw = {"softcap": 2.5, "sinks": sinks, "key_padding_mask": kpm}
    out, lse = sa.sparse_attention(q, k, v, [p, p], return_lse=True, **kw)
    np.testing.assert_allclose(out, dense_attention(q, k, v, [p, p], **kw), rtol=0, atol=1e-9)
    go = np.random.default_rng(3).standard_normal(out.shape)
    grads = sa.sparse_attention_backward(go, q, k, v, [p, p], out, lse, **kw)
    refs = dense_attention_backward(go, q, k, v, [p, p], **kw)
    assert len(grads) == len(refs) == 4
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-9)


def test_float32_runs_the_bands(monkeypatch):
    p = sa.sliding_window(64, 16, dilation=2)
    q, k, v, _ = _inputs(64, 64, seed=4)
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    seen = []
    real = regroup.class_windows
    monkeypatch.setattr(regroup, "class_windows", lambda w: seen.append(w) or real(w))
    out = sa.sparse_attention(q, k, v, p)
    assert seen and out.dtype == np.float32
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=2e-5)


def test_left_alone():
    p = sa.sliding_window(24, 4, dilation=2)
    q, k, v, _ = _inputs(24, 24)

    def fwd(q, pattern, mods=None, path="auto"):
        return regroup.forward(sa.sparse_attention, q, k, v, pattern, None, None, mods or {}, path, False)

    assert fwd(q, p) is not None
    assert fwd(q, sa.sliding_window(24, 4)) is None
    assert fwd(q, [p, sa.sliding_window(24, 6, dilation=2)]) is None
    assert fwd(q, p, {"alibi_slopes": np.ones(4)}) is None
    assert fwd(q, p, path="staged") is None
    assert fwd(q[..., :5, :], p) is None  # the validation names it
    # weights and check_finite keep the original order: the entry point does not rewrite them
    out, _w = sa.sparse_attention(q, k, v, p, return_weights=True)
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"index \(0, 0, 3, 1\)"):
        bad = q.copy()
        bad[0, 0, 3, 1] = np.nan
        sa.sparse_attention(bad, k, v, p, check_finite=True)
