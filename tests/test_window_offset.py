"""Windows with an offset: query ``i`` sits at key position ``i + offset``.

Every builder against a dense definition written here, the transpose, unions with global tokens, the
planner, the engine on every path (both directions), the Dask adapter, the readers of window parameters
(viz, CLI) and the argument checks.
"""

import io
import itertools
from contextlib import redirect_stdout

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import paths
from sparseattn.engine.plan import build_plan, get_plan
from sparseattn.patterns.windows import SlidingWindow
from sparseattn.reference import dense_attention, dense_attention_backward

from helpers import assert_pattern_equals_dense


def dense_window(n_q, n_k, left, right, dilation=1, offset=0):
    """The definition, one pair at a time."""
    m = np.zeros((n_q, n_k), dtype=bool)
    for i in range(n_q):
        for j in range(n_k):
            rel = j - (i + offset)
            m[i, j] = -left <= rel <= right and rel % dilation == 0
    return m


def _cases():
    """(n_q, n_k, left, right, dilation, offset) over small shapes, every valid offset including the edges."""
    out = []
    for n_q, n_k in [(1, 1), (1, 9), (4, 11), (7, 3), (6, 6), (5, 12)]:
        for left, right, dilation in [(0, 0, 1), (2, 0, 1), (1, 3, 1), (20, 0, 1), (4, 2, 2), (6, 1, 3)]:
            for offset in range(1 - n_q, n_k):
                out.append((n_q, n_k, left, right, dilation, offset))
    return out


CASES = _cases()


def test_sliding_window_equals_the_definition():
    for n_q, n_k, left, right, dilation, offset in CASES:
        p = sa.sliding_window(n_q, left=left, right=right, dilation=dilation, n_k=n_k, offset=offset)
        assert_pattern_equals_dense(p, dense_window(n_q, n_k, left, right, dilation, offset))
        # row ranges and counts agree with the whole
        if n_q > 2:
            dense = dense_window(n_q, n_k, left, right, dilation, offset)
            np.testing.assert_array_equal(p.rows(1, n_q - 1).toarray(), dense[1:-1])
            np.testing.assert_array_equal(p._row_counts(1, n_q - 1), dense[1:-1].sum(1))


def test_default_offset_of_sliding_window_is_top_left():
    for n_q, n_k in [(5, 5), (4, 11), (9, 3)]:
        p = sa.sliding_window(n_q, left=2, right=1, n_k=n_k)
        assert p.offset == 0
        assert_pattern_equals_dense(p, dense_window(n_q, n_k, 2, 1))


@pytest.mark.parametrize("T,W", [(1, 1), (9, 3), (1000, 128), (4096, 4096), (300, 1)])
def test_decode(T, W):
    p = sa.causal(1, W - 1, n_k=T, offset=T - 1)
    assert_pattern_equals_dense(p, dense_window(1, T, W - 1, 0, 1, T - 1))
    np.testing.assert_array_equal(p.csr.indices, np.arange(max(T - W, 0), T))
    assert sa.causal(1, W - 1, n_k=T) == p and sa.causal(1, W - 1, n_k=T).identity == p.identity


def test_chunked_prefill_bottom_right():
    n_q, n_k, W = 64, 1000, 200
    p = sa.causal(n_q, W - 1, n_k=n_k)
    assert p.offset == n_k - n_q
    assert_pattern_equals_dense(p, dense_window(n_q, n_k, W - 1, 0, 1, n_k - n_q))
    full = sa.causal(n_q, n_k=n_k)
    assert_pattern_equals_dense(full, np.tril(np.ones((n_q, n_k), bool), k=n_k - n_q))
    assert full.csr.indices[-1] == n_k - 1  # the last query sees the last key


def test_causal_defaults():
    for n in (0, 1, 2, 9):
        assert_pattern_equals_dense(sa.causal(n), np.tril(np.ones((n, n), bool)))
        assert sa.causal(n).offset == 0
    assert_pattern_equals_dense(sa.causal(9, 2), dense_window(9, 9, 2, 0))
    for n, n_k in [(4, 11), (7, 3), (1, 1), (5, 5)]:
        # bottom-right: query i sees keys j <= i + n_k - n (rows before the keys are empty)
        assert_pattern_equals_dense(sa.causal(n, n_k=n_k), np.tril(np.ones((n, n_k), bool), k=n_k - n))
    # unlimited lookback with an explicit offset, either side of the diagonal
    for n, n_k, offset in [(4, 11, 0), (4, 11, 10), (6, 4, -5), (3, 8, 2)]:
        assert_pattern_equals_dense(sa.causal(n, n_k=n_k, offset=offset), np.tril(np.ones((n, n_k), bool), k=offset))
    assert_pattern_equals_dense(sa.causal(5, 4, n_k=12, offset=2, dilation=2), dense_window(5, 12, 4, 0, 2, 2))


def test_transpose_is_a_window_with_the_opposite_offset():
    for n_q, n_k, left, right, dilation, offset in CASES[::3]:
        p = sa.sliding_window(n_q, left=left, right=right, dilation=dilation, n_k=n_k, offset=offset)
        t = p.T
        assert isinstance(t, SlidingWindow) and t.offset == -offset
        assert (t.left, t.right, t.shape) == (right, left, (n_k, n_q))
        assert_pattern_equals_dense(t, dense_window(n_q, n_k, left, right, dilation, offset).T)
        assert t.T == p


def test_identity_and_describe_carry_the_offset():
    a = sa.sliding_window(4, 1, n_k=10, offset=3)
    b = sa.sliding_window(4, 1, n_k=10, offset=4)
    assert a.identity != b.identity and a != b
    assert "offset=3" in repr(a)
    assert "offset" not in repr(sa.sliding_window(4, 1))


@pytest.mark.parametrize("offset", [-11, -3, 0, 2, 11])
@pytest.mark.parametrize("dilation", [1, 2])
def test_union_and_intersection_with_global_tokens(offset, dilation):
    n = 12
    band = sa.sliding_window(n, left=3, right=1, dilation=dilation, offset=offset)
    g = sa.global_tokens(n, [0, 5, 11])
    dense_b = dense_window(n, n, 3, 1, dilation, offset)
    dense_g = g.to_dense()
    u = band | g
    assert_pattern_equals_dense(u, dense_b | dense_g)
    # the closed-form counts (no rows merged) agree with the dense count, on the whole and on a range
    np.testing.assert_array_equal(u._row_counts(0, n), (dense_b | dense_g).sum(1))
    np.testing.assert_array_equal(u._row_counts(3, 9), (dense_b | dense_g)[3:9].sum(1))
    assert (g | band).nnz == int((dense_b | dense_g).sum())
    assert_pattern_equals_dense(band & g, dense_b & dense_g)
    assert_pattern_equals_dense(band | sa.sliding_window(n, 1), dense_b | dense_window(n, n, 1, 1))


def _plan_cases():
    return [
        sa.causal(1, 63, n_k=300),  # decode
        sa.causal(64, 199, n_k=1000),  # chunked prefill
        sa.causal(64, n_k=3000),  # long rows: spans over several chunks
        sa.sliding_window(40, left=5, right=7, n_k=30, offset=-12),  # queries before the keys
        sa.sliding_window(50, left=4, right=2, offset=9) | sa.global_tokens(50, [0, 33]),
        sa.sliding_window(20, left=3, right=3, n_k=100, offset=79),
    ]


@pytest.mark.parametrize("p", _plan_cases(), ids=lambda p: repr(p))
def test_the_plan_honours_the_offset(p):
    plan = build_plan(p)
    assert plan.kind == "structured"  # planned from the parameters, offset included
    rows, cols = plan.entries()
    csr = p.csr
    assert plan.nnz == p.nnz == len(rows)
    got = np.sort(rows * p.shape[1] + cols)
    want = np.repeat(np.arange(p.shape[0]), np.diff(csr.indptr)) * p.shape[1] + csr.indices
    np.testing.assert_array_equal(got, np.sort(want))  # every allowed pair exactly once
    assert get_plan(p).nnz == p.nnz


def _engine_cases():
    return [
        (1, 300, sa.causal(1, 63, n_k=300)),
        (64, 1000, sa.causal(64, 255, n_k=1000)),
        (64, 1500, sa.causal(64, n_k=1500)),
        (40, 30, sa.sliding_window(40, left=5, right=7, n_k=30, offset=-12)),  # rows with no key
        (50, 50, sa.sliding_window(50, left=4, right=2, offset=9) | sa.global_tokens(50, [0, 33])),
        (30, 90, sa.sliding_window(30, left=9, right=4, n_k=90, offset=50, dilation=3)),
    ]


@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_every_path_equals_the_reference(name):
    rng = np.random.default_rng(0)
    for n_q, n_k, p in _engine_cases():
        q = rng.standard_normal((2, n_q, 16))
        k, v = (rng.standard_normal((2, n_k, 16)) for _ in range(2))
        out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, path=name)
        ref, ref_lse = dense_attention(q, k, v, p, return_lse=True)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-9)
        go = rng.standard_normal(out.shape)
        grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, path=name)
        for g, r in zip(grads, dense_attention_backward(go, q, k, v, p)):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-9)


def test_dask_equals_the_local_engine():
    da = pytest.importorskip("dask.array")
    from sparseattn.dask import sparse_attention as dask_attention
    from sparseattn.dask.plans import block_bounds, plan_patterns

    rng = np.random.default_rng(1)
    for n_q, n_k, p in [(64, 1000, sa.causal(64, 255, n_k=1000)),
                        (50, 50, sa.sliding_window(50, left=4, right=2, offset=9) | sa.global_tokens(50, [0, 33]))]:
        assert plan_patterns([p], n_k, block_bounds((n_k // 2, n_k - n_k // 2)))[0].kind == "csr"
        q = rng.standard_normal((n_q, 16))
        k, v = (rng.standard_normal((n_k, 16)) for _ in range(2))
        ref = sa.sparse_attention(q, k, v, p)
        out = dask_attention(da.from_array(q, chunks=(17, 16)), da.from_array(k, chunks=(300, 16)),
                             da.from_array(v, chunks=(300, 16)), p)
        np.testing.assert_allclose(out.compute(scheduler="synchronous"), ref, rtol=0, atol=1e-9)


def test_viz_reads_the_offset():
    from sparseattn.viz import density_grid

    p = sa.sliding_window(40, left=5, right=2, n_k=64, offset=20)
    np.testing.assert_array_equal(density_grid(p, (8, 16)), density_grid(sa.from_dense(p.to_dense()), (8, 16)))


def test_cli_show_renders_an_offset_window():
    from sparseattn.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["show", "causal", "--n", "4", "--n-k", "8", "--radius", "2"]) == 0
    text = buf.getvalue()
    assert "causal(n=4, radius=2, n_k=8)" in text
    assert text.rstrip().endswith("T4                 *  *  *")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["show", "sliding_window", "--n", "3", "--n-k", "6", "--radius", "1", "--offset", "-1"]) == 0
    assert "nnz 6" in buf.getvalue()


@pytest.mark.parametrize("builder", [sa.causal, lambda n, **kw: sa.sliding_window(n, 2, **kw)])
def test_bad_offsets_are_clear_errors(builder):
    with pytest.raises(TypeError, match="offset must be an integer, got 1.5"):
        builder(4, n_k=8, offset=1.5)
    with pytest.raises(TypeError, match="offset must be an integer"):
        builder(4, n_k=8, offset=True)
    for bad in (8, 100, -4, -50):
        with pytest.raises(ValueError, match=rf"offset must satisfy -n_q < offset < n_k.*\[-3, 7\].*got {bad}$"):
            builder(4, n_k=8, offset=bad)
    with pytest.raises(ValueError, match="n_k must be >= 0, got -1"):
        builder(4, n_k=-1)
    with pytest.raises(TypeError, match="n_k must be an integer"):
        builder(4, n_k=8.0)
    assert builder(4, n_k=8, offset=7).nnz > 0 and builder(4, n_k=8, offset=-3).nnz >= 0
    # an empty shape accepts any offset: the pattern is empty whatever it is
    assert builder(0, n_k=8, offset=100).nnz == 0 and builder(3, n_k=0, offset=-9).nnz == 0


def test_every_valid_offset_is_accepted_and_covers_the_range():
    n_q, n_k = 3, 5
    for offset in range(1 - n_q, n_k):
        p = sa.causal(n_q, 1, n_k=n_k, offset=offset)
        assert p.nnz == int(dense_window(n_q, n_k, 1, 0, 1, offset).sum()) > 0
    for offset, (left, right) in itertools.product([-n_q, n_k], [(0, 0), (9, 9)]):
        with pytest.raises(ValueError, match="offset"):
            sa.sliding_window(n_q, left=left, right=right, n_k=n_k, offset=offset)
