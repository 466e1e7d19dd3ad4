"""Grouped-query heads (GQA): k and v with h_kv heads, q with h_q = g * h_kv; query head h reads head h // g.

Every path in ``paths.PATHS``, forward and backward, against the independent float64 reference (which repeats k
and v along the heads axis and sums the gradients back), with batch broadcasting, per-head patterns, key padding,
a row with no allowed key, global rows and long rows; no path copies k or v per query head (tracemalloc); the
torch adapter (gradcheck), the Dask adapter (refused with a clear error) and bad head counts.
"""

import functools
import tracemalloc

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import blocked, fused_backward, paths
from sparseattn.engine.validate import prepare
from sparseattn.reference import dense_attention, dense_attention_backward

N, D = 96, 8
TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4}
#: (h_q, h_kv): g = 1, 2, 4, 8 and multi-query (h_kv = 1)
RATIOS = [(2, 2), (4, 2), (8, 2), (8, 1), (16, 2)]


@functools.lru_cache(maxsize=None)
def _case(h_q, h_kv, seed=0):
    """q (2, h_q, N, D); k, v (1, h_kv, N, D) shared by both batch rows; one pattern per query head; padding."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, h_q, N, D))
    k, v = (rng.standard_normal((1, h_kv, N, D)) for _ in range(2))
    empty = np.ones((N, N), dtype=bool)
    empty[7] = False  # a row with no allowed key
    pats = []
    for h in range(h_q):
        if h % 2 == 0:
            pats.append(sa.longformer(N, attention_window=4 + h, global_indices=[3, 50]))  # global rows
        else:
            pats.append((sa.sliding_window(N, 3, dilation=2) | sa.random_pattern(N, N, 2, seed=h)) & sa.from_dense(empty))
    kpm = np.zeros((2, N), dtype=bool)
    kpm[1, 70:] = True
    go = rng.standard_normal((2, h_q, N, D))
    ref = dense_attention(q, k, v, pats, key_padding_mask=kpm, return_lse=True)
    grads = dense_attention_backward(go, q, k, v, pats, key_padding_mask=kpm)
    return (q, k, v, pats, kpm, go), ref, grads


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    assert err <= TOL[np.dtype(dtype)] * scale, (what, err, scale)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("h_q,h_kv", RATIOS)
@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_every_path_equals_the_reference(name, h_q, h_kv, dtype):
    (q, k, v, pats, kpm, go), (ref, ref_lse), ref_grads = _case(h_q, h_kv)
    q, k, v, go = (x.astype(dtype) for x in (q, k, v, go))
    out, lse = sa.sparse_attention(q, k, v, pats, key_padding_mask=kpm, return_lse=True, path=name)
    assert out.shape == (2, h_q, N, D) and out.dtype == dtype
    _close(out, ref, dtype, "out")
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite)
    _close(np.where(finite, lse, 0), np.where(finite, ref_lse, 0), dtype, "lse")
    assert np.all(out[:, 1::2, 7] == 0)  # the row with no allowed key
    grads = sa.sparse_attention_backward(go, q, k, v, pats, out, lse, key_padding_mask=kpm, path=name)
    for what, g, r, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, what  # dk, dv: h_kv heads, summed over groups and batch
        _close(g, r, dtype, what)


def test_reference_agrees_with_explicitly_repeated_heads():
    """The oracle's GQA is transformers' repeat_kv: head h reads h // g; gradients sum over each group."""
    (q, k, v, pats, kpm, go), (ref, _), (dq, dk, dv) = _case(8, 2)
    kr, vr = (np.repeat(x, 4, axis=-3) for x in (k, v))
    np.testing.assert_allclose(ref, dense_attention(q, kr, vr, pats, key_padding_mask=kpm), rtol=0, atol=0)
    _, dkr, dvr = dense_attention_backward(go, q, kr, vr, pats, key_padding_mask=kpm)
    np.testing.assert_allclose(dk, dkr.reshape(1, 2, 4, N, D).sum(axis=2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dv, dvr.reshape(1, 2, 4, N, D).sum(axis=2), rtol=1e-12, atol=1e-12)


def test_slice_maps_point_query_heads_to_their_kv_head():
    q, k = np.zeros((2, 8, 4, 2)), np.zeros((2, 2, 4, 2))
    prep = prepare(q, k, k[:1], sa.sliding_window(4, 1))
    assert prep.kc.shape == (4, 4, 2) and prep.vc.shape == (2, 4, 2)  # stored once, not per query head
    assert prep.kmap.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert prep.vmap.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_long_rows_threaded(name, dtype, monkeypatch):
    """Global rows long enough to leave the tiles (fused) and the blocks (blocked), on threads cut by kv group."""
    monkeypatch.setattr(blocked, "_GRID", 1 << 10)
    monkeypatch.setattr(blocked, "_LONG_BATCH", 2)
    monkeypatch.setattr(fused_backward, "_PARALLEL_MIN_FLOP", 0)
    n = 2600
    rng = np.random.default_rng(4)
    p = sa.longformer(n, 6, [0, 1300, n - 1])
    q = rng.standard_normal((1, 4, n, 8)).astype(dtype)
    k, v = (rng.standard_normal((1, 2, n, 8)).astype(dtype) for _ in range(2))
    kpm = np.zeros((1, n), bool)
    kpm[0, 1000:1200] = True
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True, path=name)
    _close(out, dense_attention(q, k, v, p, key_padding_mask=kpm), dtype, "out")
    go = rng.standard_normal(out.shape).astype(dtype)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, key_padding_mask=kpm, path=name)
    for what, g, r in zip(("dq", "dk", "dv"), grads, dense_attention_backward(go, q, k, v, p, key_padding_mask=kpm)):
        _close(g, r, dtype, what)


def test_long_row_ranges_never_share_a_kv_slice():
    """The fused backward's long-row ranges hold whole groups of slices sharing a stored k or v slice."""
    slices = np.arange(8, dtype=np.int64)
    kmap = np.repeat(np.arange(2), 4)  # GQA 8/2
    order, starts = fused_backward._disjoint_groups(slices, kmap, kmap)
    assert starts.tolist() == [0, 4]
    assert fused_backward._long_ranges(starts, 8, 2) == [0, 4, 8]
    vmap = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # v per pair of heads, k per four: two groups of four
    order, starts = fused_backward._disjoint_groups(slices, kmap, vmap)
    assert starts.tolist() == [0, 4]
    bridged = np.array([0, 1, 1, 2, 2, 3, 3, 3])  # chains k slices 0 and 1 together: one group
    order, starts = fused_backward._disjoint_groups(slices, kmap, bridged)
    assert starts.tolist() == [0]
    assert fused_backward._long_ranges(starts, 8, 2) == [0, 8]


@pytest.mark.parametrize("name", sorted(paths.PATHS))
@pytest.mark.parametrize("h_kv", [1, 2])
def test_no_copy_of_k_per_query_head(name, h_kv):
    """Peak Python-side allocation of a GQA forward + backward stays far below 8 copies of k and v.

    Few queries, many keys: dq, dout and the per-nonzero values are small, k and v large, so one copy of k and v
    per query head (or per-slice dk, dv summed afterwards) would dominate the peak.
    """
    rng = np.random.default_rng(1)
    n_q, n_k, d, h_q = 64, 16384, 32, 8
    p = sa.random_pattern(n_q, n_k, 8, seed=2)
    q = rng.standard_normal((1, h_q, n_q, d))
    k, v = (rng.standard_normal((1, h_kv, n_k, d)) for _ in range(2))
    def call():
        out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, path=name)
        return sa.sparse_attention_backward(out, q, k, v, p, out, lse, path=name)

    call()  # compile outside the measurement
    tracemalloc.start()
    try:
        grads = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grads[1].shape == k.shape
    copies = h_q * (k.nbytes + v.nbytes) / h_kv  # k and v repeated per query head: 64 MB
    own = 2 * (k.nbytes + v.nbytes)  # dk, dv, and one k/v-sized pair of buffers (the fused path's per thread)
    assert peak < own + copies / 4, (name, peak, own, copies)


@pytest.mark.parametrize("h_q,h_kv", [(4, 2), (4, 1)])
def test_torch_gradcheck(h_q, h_kv):
    torch = pytest.importorskip("torch")
    from sparseattn.torch import sparse_attention

    n = 12
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, h_q, n, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, h_kv, n, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    pats = [sa.longformer(n, 2, [0]) if h % 2 else sa.sliding_window(n, 1) for h in range(h_q)]
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, 9:] = True
    f = lambda q, k, v: sparse_attention(q, k, v, pats, key_padding_mask=pad)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v))
    f(q, k, v).square().sum().backward()
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
    kr, vr = (x.detach().repeat_interleave(h_q // h_kv, dim=-3).requires_grad_() for x in (k, v))
    f(q.detach(), kr, vr).square().sum().backward()
    torch.testing.assert_close(k.grad, kr.grad.reshape(1, h_kv, h_q // h_kv, n, 4).sum(2), rtol=1e-12, atol=1e-12)


def test_dask_reads_grouped_heads_without_copies():
    pytest.importorskip("dask.array")
    import dask.array as da

    from sparseattn.dask import sparse_attention as dask_attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 64, 4))
    k, v = rng.standard_normal((2, 1, 2, 64, 4))
    p = sa.sliding_window(64, 2)
    out = dask_attention(da.from_array(q, chunks=(1, 8, 32, 4)), da.from_array(k, chunks=(1, 2, 32, 4)),
                         da.from_array(v, chunks=(1, 2, 32, 4)), p)  # fmt: skip
    assert not any(name.startswith(("broadcast", "repeat")) for name in out.__dask_graph__().layers)
    np.testing.assert_allclose(out.compute(scheduler="synchronous"), sa.sparse_attention(q, k, v, p),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize(
    "k_shape,v_shape,match",
    [
        ((2, 3, 16, 4), (2, 3, 16, 4), r"q has 8 heads \(axis -3, shape \(2, 8, 16, 4\)\), which is not a multiple "
                                       r"of the 3 heads of k and v \(shapes \(2, 3, 16, 4\), \(2, 3, 16, 4\)\)"),
        ((2, 2, 16, 4), (2, 4, 16, 4), r"k and v must have the same number of heads \(axis -3\) for grouped-query "
                                       r"attention: k has shape \(2, 2, 16, 4\) \(2 heads\) but v has \(2, 4, 16, 4\)"),
        ((2, 16, 16, 4), (2, 16, 16, 4), r"q has 8 heads .* not a multiple of the 16 heads of k and v"),
    ],
)
def test_bad_head_counts_name_the_arguments(k_shape, v_shape, match):
    q = np.zeros((2, 8, 16, 4))
    p = sa.sliding_window(16, 2)
    for call in (
        lambda: sa.sparse_attention(q, np.zeros(k_shape), np.zeros(v_shape), p),
        lambda: sa.sparse_attention_backward(q, q, np.zeros(k_shape), np.zeros(v_shape), p, q, q[..., 0]),
        lambda: dense_attention(q, np.zeros(k_shape), np.zeros(v_shape), p),
    ):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("q_heads,kv_heads", [(1, 0), (0, 2), (3, 0), (0, 0)])
def test_empty_heads_axes_broadcast_as_numpy_does(q_heads, kv_heads):
    """A heads axis of 0 is never read as grouped-query heads: it broadcasts as in NumPy (against 1 or 0)."""
    q = np.zeros((1, q_heads, 8, 2))
    k = v = np.zeros((1, kv_heads, 8, 2))
    p = sa.sliding_window(8, 1)
    try:
        want = np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (8, 2)
    except ValueError:
        with pytest.raises(ValueError, match="broadcast"):
            sa.sparse_attention(q, k, v, p)
        with pytest.raises(ValueError, match="broadcast"):
            dense_attention(q, k, v, p)
        return
    assert sa.sparse_attention(q, k, v, p).shape == want
    assert dense_attention(q, k, v, p).shape == want
