"""Every execution path behind the one interface (``sparseattn.engine.paths``), both directions, one suite.

Parametrised over ``paths.PATHS``, so a path added there gets the whole suite: forward and backward against
the float64 reference (per-head patterns, key padding, broadcast k/v, a row with no key, global rows),
what the path says it cannot do, and the dispatcher's routing of non-finite slices to the staged path.
The entry points and the Dask tasks reach the paths only through the dispatcher: asserted here too.
"""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import paths
from sparseattn.engine.staged import staged_backward
from sparseattn.engine.validate import prepare
from sparseattn.reference import dense_attention, dense_attention_backward

from helpers import RTOL, assert_attention_close, assert_same_classes

N, D = 150, 16


def _call(dtype, seed=0):
    """Two batch rows, two heads with their own patterns, k and v shared by the heads, key padding."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 2, N, D)).astype(dtype)
    k, v = (rng.standard_normal((2, 1, N, D)).astype(dtype) for _ in range(2))
    p0 = sa.longformer(N, attention_window=16, global_indices=[3, 90])
    p1 = sa.sliding_window(N, 5, dilation=2) | sa.random_pattern(N, N, 3, seed=seed)
    empty = np.ones((N, N), dtype=bool)
    empty[7] = False  # a row with no allowed key
    p1 = p1 & sa.from_dense(empty)
    kpm = np.zeros((2, N), dtype=bool)
    kpm[1, 100:] = True
    return q, k, v, [p0, p1], kpm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_every_path_forward_and_backward_equal_the_reference(name, dtype):
    q, k, v, pats, kpm = _call(dtype)
    out, lse = sa.sparse_attention(q, k, v, pats, key_padding_mask=kpm, return_lse=True, path=name)
    ref, ref_lse = dense_attention(q, k, v, pats, key_padding_mask=kpm, return_lse=True)
    assert_attention_close(out, ref, dtype)
    np.testing.assert_allclose(lse, ref_lse, rtol=RTOL[np.dtype(dtype)] * 10, atol=RTOL[np.dtype(dtype)] * 10)
    assert np.all(out[:, 1, 7] == 0) and np.all(np.isneginf(lse[:, 1, 7]))
    go = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    grads = sa.sparse_attention_backward(go, q, k, v, pats, out, lse, key_padding_mask=kpm, path=name)
    for g, r, x in zip(grads, dense_attention_backward(go, q, k, v, pats, key_padding_mask=kpm), (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype  # k, v broadcast over heads: summed back
        scale = max(1.0, float(np.abs(r).max()))
        assert float(np.abs(g - r).max()) <= 50 * RTOL[np.dtype(dtype)] * scale


@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_each_path_says_what_it_cannot_do(name):
    path = paths.PATHS[name]
    why = path.not_supported_reason(return_weights=True)
    assert (why is None) == path.gives_weights
    q, k, v, pats, _ = _call(np.float64)
    if why is not None:
        with pytest.raises(ValueError, match=f"return_weights=True needs the staged path.*not '{name}'"):
            sa.sparse_attention(q, k, v, pats, return_weights=True, path=name)
    with pytest.raises(ValueError, match=r"path must be one of \('auto', .*got 'gpu'"):
        sa.sparse_attention(q, k, v, pats, path="gpu")


@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_the_dispatcher_sends_non_finite_slices_to_the_staged_path(name, monkeypatch):
    """A NaN in one slice: that slice comes from the staged path, the others from the path asked for."""
    q, k, v, pats, kpm = _call(np.float64, seed=1)
    q[1, 0, 40, 2] = np.nan
    seen = []
    staged = paths.staged_forward

    def spy(prep, return_weights, slices=None):
        seen.append(None if slices is None else slices.tolist())
        return staged(prep, return_weights, slices)

    monkeypatch.setattr(paths, "staged_forward", spy)
    prep = prepare(q, k, v, pats, None, kpm)
    out, lse, _ = paths.forward(prep, name)
    assert seen == ([None] if name == "staged" else [[2]])  # slice 2 = batch 1, head 0
    ref = dense_attention(q, k, v, pats, key_padding_mask=kpm).reshape(out.shape)
    assert_same_classes(out, ref, 1e-9)
    assert np.isnan(out[2, 40]).all() and np.isfinite(out[[0, 1, 3]]).all()


def test_entry_points_reach_the_paths_through_the_dispatcher(monkeypatch):
    calls = []
    forward, backward = paths.forward, paths.backward
    monkeypatch.setattr(paths, "forward", lambda prep, path="auto", *a, **kw: calls.append(("f", path)) or forward(prep, path, *a, **kw))
    monkeypatch.setattr(paths, "backward", lambda prep, *a, **kw: calls.append(("b",)) or backward(prep, *a, **kw))
    q, k, v, pats, kpm = _call(np.float32)
    out, lse = sa.sparse_attention(q, k, v, pats, key_padding_mask=kpm, return_lse=True, path="blocked")
    sa.sparse_attention_backward(out, q, k, v, pats, out, lse, key_padding_mask=kpm)
    assert calls == [("f", "blocked"), ("b",)]


def test_dask_tasks_run_through_the_dispatcher(monkeypatch):
    """The Dask adapter's tasks call the engine's dispatcher (so every option a path honours reaches them)."""
    dask = pytest.importorskip("dask")
    pytest.importorskip("dask.array")
    import dask.array as da

    from sparseattn.dask import sparse_attention as dask_attention

    calls = []
    forward = paths.forward

    def spy(prep, path="auto", *a, **kw):
        calls.append(path)
        return forward(prep, path, *a, **kw)

    monkeypatch.setattr(paths, "forward", spy)
    rng = np.random.default_rng(3)
    n = 256
    q, k, v = (rng.standard_normal((2, n, D)) for _ in range(3))
    p = sa.sliding_window(n, 8) | sa.global_tokens(n, [0])
    out = dask_attention(*(da.from_array(x, chunks=(1, 64, D)) for x in (q, k, v)), p)
    with dask.config.set(scheduler="synchronous"):
        got = out.compute()
    assert calls and set(calls) == {"fused"}
    np.testing.assert_allclose(got, dense_attention(q, k, v, p), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_skip_leaves_the_flagged_slices_to_the_caller(name):
    """The interface: ``forward``/``backward`` with ``skip`` answer every other slice, full-size arrays."""
    q, k, v, pats, kpm = _call(np.float64, seed=2)
    prep = prepare(q, k, v, pats, None, kpm)
    skip = np.array([False, True, False, False])
    full_out, full_lse, _ = paths.forward(prep, "staged")
    out, lse = paths.PATHS[name].forward(prep, skip)
    assert out.shape == full_out.shape and lse.shape == full_lse.shape
    keep = ~skip
    np.testing.assert_allclose(out[keep], full_out[keep], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse[keep]), np.isneginf(full_lse[keep]))
    go = np.random.default_rng(0).standard_normal(full_out.shape)
    full_dq = paths.backward(prep, go, full_out, full_lse, "staged")[0]
    kept_dq, kept_dk, kept_dv = staged_backward(prep, go, full_out, full_lse, np.flatnonzero(keep))
    dq, dk, dv = paths.PATHS[name].backward(prep, go, full_out, full_lse, skip)
    assert dq.shape == full_dq.shape and dk.shape == prep.kc.shape and dv.shape == prep.vc.shape
    np.testing.assert_allclose(dq[keep], full_dq[keep], rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dq[keep], kept_dq, rtol=1e-9, atol=1e-11)
    # dk, dv are per stored slice (k, v shared by the heads): the kept slices' share only
    np.testing.assert_allclose(dk, kept_dk, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dv, kept_dv, rtol=1e-9, atol=1e-11)
