"""The neighbourhood line kernel (kernels/grid.py): against the float64 reference and the tile kernels.

Narrow neighbourhoods planned from their grid carry each line's key lines (``TilePlan.grid``), and the
fused forward runs them on the line kernel; the calls here count that it ran (or did not, where it does
not apply) and compare with :func:`sparseattn.reference.dense_attention` and with the same call on the
tile kernels (``fused_lines.LINE_KERNEL = False``).
"""

import io
import numpy as np
import pytest

import sparseattn as sa
import sparseattn.kernels.grid as grid_kernels
from sparseattn.engine import fused_lines
from sparseattn.engine.plan import build_plan
from sparseattn.kernels import VECTOR_BYTES
from sparseattn.reference import dense_attention, dense_attention_backward

LINE_PLANNED = {
    # lines of 40: a last block of 8 (16 lanes) or a whole one (8 lanes); both ends shift their windows
    "2-D 7x7, lines of 40": lambda: sa.neighborhood((12, 40), 7),
    "2-D 7x7, lines of 64": lambda: sa.neighborhood((24, 64), 7),  # large enough to run on the thread pool
    "2-D (5, 7), dilated rows": lambda: sa.neighborhood((16, 32), (5, 7), dilation=(2, 1)),
    "2-D 3x3": lambda: sa.neighborhood((8, 48), 3),
    "2-D (3, 13)": lambda: sa.neighborhood((6, 64), (3, 13)),  # 13 offsets: two shuffle groups inside
    "2-D even (4, 6)": lambda: sa.neighborhood((10, 32), (4, 6)),  # NATTEN's even-size rule
    "3-D, causal first axis": lambda: sa.neighborhood((4, 6, 32), (3, 3, 5), causal=(True, False, False)),
    "1-D": lambda: sa.neighborhood(96, 9),
}

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def _lanes(dtype):
    return VECTOR_BYTES // np.dtype(dtype).itemsize


@pytest.fixture
def calls(monkeypatch):
    """How many times the line kernel ran (a wrapper around it)."""
    count = [0]
    real = grid_kernels.grid_forward

    def counting(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(grid_kernels, "grid_forward", counting)
    return count


def _inputs(p, dtype, d, dv, seed=3):
    n = p.shape[0]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 4, n, d)).astype(dtype)
    k = rng.standard_normal((2, 2, n, d)).astype(dtype)  # grouped-query heads: two query heads per stored slice
    v = rng.standard_normal((2, 2, n, dv)).astype(dtype)
    return q, k, v


def _tol(dtype):
    return dict(rtol=0, atol=1e-10) if dtype == np.float64 else dict(rtol=0, atol=5e-5)


@pytest.mark.parametrize("name", sorted(LINE_PLANNED))
@pytest.mark.parametrize("dtype", DTYPES)
def test_line_kernel_matches_the_reference_and_the_tile_kernels(name, dtype, calls, monkeypatch):
    p = LINE_PLANNED[name]()
    assert build_plan(p).grid is not None
    L = _lanes(dtype)
    q, k, v = _inputs(p, dtype, d=2 * L, dv=2 * L)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, path="fused")
    assert calls[0] >= 1
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), **_tol(dtype))
    monkeypatch.setattr(fused_lines, "LINE_KERNEL", False)
    out2, lse2 = sa.sparse_attention(q, k, v, p, return_lse=True, path="fused")
    np.testing.assert_allclose(out, out2, **_tol(dtype))
    np.testing.assert_allclose(lse, lse2, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_line_kernel_with_wider_queries_than_values_and_its_backward(dtype, calls):
    p = sa.neighborhood((12, 40), (5, 7))
    L = _lanes(dtype)
    q, k, v = _inputs(p, dtype, d=4 * L, dv=2 * L)
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, path="fused")
    assert calls[0] >= 1
    tol = _tol(dtype)
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), **tol)
    go = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, path="fused")
    gtol = tol if dtype == np.float64 else dict(rtol=0, atol=2e-4)
    for g, r in zip(grads, dense_attention_backward(go, q, k, v, p)):
        np.testing.assert_allclose(g, r, **gtol)


def test_line_kernel_reuses_transposed_keys_across_slices_and_calls(calls):
    """One stored key slice for all heads (broadcast), then a second call: each thread's transposed keys are per call."""
    p = sa.neighborhood((16, 32), 7)
    n = p.shape[0]
    rng = np.random.default_rng(8)
    q = rng.standard_normal((3, n, 32)).astype(np.float32)
    k = rng.standard_normal((1, n, 32)).astype(np.float32)
    v = rng.standard_normal((1, n, 32)).astype(np.float32)
    for _ in range(2):
        out = sa.sparse_attention(q, k, v, p, path="fused")
        np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=5e-5)
        k = k[:, ::-1].copy()  # new keys, same shape: nothing stale may survive from the last call
        v = v + 1
    assert calls[0] >= 2


def _softcap(p, q, k, v):
    return dict(softcap=5.0), dense_attention(q, k, v, p, softcap=5.0)


def _padding(p, q, k, v):
    pad = np.zeros((2, p.shape[0]), dtype=bool)
    pad[:, 5] = True
    return dict(key_padding_mask=pad), dense_attention(q, k, v, p, key_padding_mask=pad)


@pytest.mark.parametrize(
    "make, extra",
    [
        pytest.param(lambda: sa.neighborhood((8, 32), 7), _softcap, id="softcap"),
        pytest.param(lambda: sa.neighborhood((8, 32), 7), _padding, id="key padding"),
        pytest.param(lambda: sa.neighborhood((8, 32), (3, 5), causal=(False, True)), None, id="causal last axis"),
        pytest.param(lambda: sa.neighborhood((8, 32), (3, 17)), None, id="wide last axis (spans)"),
    ],
)
def test_where_the_line_kernel_does_not_apply(make, extra, calls):
    p = make()
    q, k, v = _inputs(p, np.float32, d=32, dv=32)
    kw, ref = extra(p, q, k, v) if extra else ({}, dense_attention(q, k, v, p))
    out = sa.sparse_attention(q, k, v, p, path="fused", **kw)
    assert calls[0] == 0
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-5)


def test_line_kernel_needs_whole_vectors_of_features(calls):
    p = sa.neighborhood((8, 32), 7)
    L = _lanes(np.float32)
    q, k, v = _inputs(p, np.float32, d=L + 1, dv=2 * L)  # d not a multiple of the lanes: the tile kernels
    out = sa.sparse_attention(q, k, v, p, path="fused")
    assert calls[0] == 0
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=5e-5)
    q, k, v = _inputs(p, np.float32, d=2 * L, dv=2 * L)
    cache = np.concatenate([k, v], axis=-2)  # k and v as views of a larger cache: the tile kernels
    out = sa.sparse_attention(q, cache[..., : p.shape[0], :], cache[..., p.shape[0] :, :], p, path="fused")
    assert calls[0] == 0
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=5e-5)


def test_an_uncompiled_line_kernel_leaves_the_call_to_the_tile_kernels(monkeypatch):
    """Outside ``SPARSEATTN_COLD_START=wait``, a call never waits for the line kernel to compile."""
    from sparseattn.engine import coldstart

    count = [0]
    real = grid_kernels.grid_forward

    class Uncompiled:  # no signature in this process
        signatures = []

        def __call__(self, *args):
            count[0] += 1
            return real(*args)

    monkeypatch.setattr(grid_kernels, "grid_forward", Uncompiled())
    monkeypatch.setattr(coldstart, "cached", lambda disp, want=None, layout=None: False)  # nor in the disk cache
    monkeypatch.setattr(coldstart, "_kernels_ready", set())
    monkeypatch.setattr(coldstart, "mode", lambda: "background")
    p = sa.neighborhood((8, 32), 7)
    q, k, v = _inputs(p, np.float32, d=32, dv=32)
    out = sa.sparse_attention(q, k, v, p, path="fused")
    assert count[0] == 0
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=5e-5)
    monkeypatch.setattr(coldstart, "mode", lambda: "wait")  # compiling in the caller's thread is what was asked
    sa.sparse_attention(q, k, v, p, path="fused")
    assert count[0] >= 1


def test_warmup_compiles_the_line_kernel_that_a_call_would_leave(monkeypatch):
    """``sparseattn warmup`` runs the line kernel even where a user's call would not yet (not compiled, not cached,
    no compile job): otherwise, with the fused kernels cached, nothing ever compiles it."""
    from sparseattn.engine import coldstart, warmup

    seen = []
    real = grid_kernels.grid_forward

    class Uncompiled:
        signatures = []

        def __call__(self, *args):
            seen.append(args[0].dtype)
            return real(*args)

    monkeypatch.setattr(grid_kernels, "grid_forward", Uncompiled())
    monkeypatch.setattr(coldstart, "cached", lambda disp, want=None, layout=None: False)
    monkeypatch.setattr(coldstart, "_kernels_ready", set())
    monkeypatch.setattr(coldstart, "mode", lambda: "background")
    p = sa.neighborhood((8, 32), 7)
    q, k, v = _inputs(p, np.float32, d=32, dv=32)
    sa.sparse_attention(q, k, v, p, path="fused")
    assert seen == []  # a user's call: the tile kernels answer
    with coldstart.compile_here():
        out = sa.sparse_attention(q, k, v, p, path="fused")
    assert seen and set(seen) == {np.dtype(np.float32)}  # one call per thread's range of lines
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=5e-5)
    n = len(seen)
    sa.sparse_attention(q, k, v, p, path="fused")
    assert len(seen) == n  # compile_here ends with its block
    monkeypatch.setattr(warmup, "steps", lambda: [("fused forward", warmup._forward("float64", path="fused"))])
    warmup.warmup(out=io.StringIO())
    assert len(seen) > n and set(seen[n:]) == {np.dtype(np.float64)}
