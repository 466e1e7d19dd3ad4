"""Extra spans per tile (``TilePlan.xs_*``): rows with several runs and tiles across document boundaries.

A 2-D neighbourhood's rows are k runs of k keys, shared by too few rows of a tile to be shared columns: with
wide kernel rows each becomes an extra span of the tile (7-key rows stay residuals: they waste most of a
micro-kernel panel).  A tile across a document boundary keeps one span per document.  The plans carry no nnz-sized residual list, cover every entry once, and the
engine on them (both span routes: micro-kernels and BLAS) equals the float64 reference, both directions.
"""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import plan as plan_mod
from sparseattn.engine.plan import build_plan
from sparseattn.reference import dense_attention, dense_attention_backward


def _doc_lengths(n, k=64, seed=0):
    rng = np.random.default_rng(seed)
    return np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, n), k - 1, replace=False)), n])


def _covers(plan, p):
    rows, cols = plan.entries()
    assert len(rows) == p.nnz
    key = rows * p.shape[1] + cols
    assert len(np.unique(key)) == p.nnz
    csr = p.csr
    want = np.repeat(np.arange(p.shape[0]), np.diff(csr.indptr)) * p.shape[1] + csr.indices
    np.testing.assert_array_equal(np.sort(key), np.sort(want))


def _from_runs(p):
    """The plan the runs planner makes (a plain neighbourhood is planned from its grid: tests/test_gridplan.py)."""
    fields = plan_mod._runs_plan(p, p.row_runs(0, p.shape[0]), None, plan_mod.CHUNK, plan_mod.LONG_MIN, "runs")
    return plan_mod.TilePlan(shape=p.shape, chunk=plan_mod.CHUNK, **fields)


def test_wide_neighbourhood_plan_has_no_residual_list():
    n = 16 * 256
    p = sa.neighborhood((16, 256), (5, 31))
    plan = _from_runs(p)
    assert plan.kind == "runs"
    assert len(plan.rs_lo) == 0 and len(plan.sh_cols) == 0
    assert np.all(plan.tile_k1 > plan.tile_k0)  # the span (a row's first longest run) and
    assert len(plan.xs_k0) == 4 * plan.n_tiles  # one extra span per other kernel row
    assert plan.nbytes < 160 * n  # O(n): the 155 n entries as residual indices would be 1240 n bytes
    _covers(plan, p)


def test_narrow_neighbourhood_runs_stay_residual():
    # 7-key runs fill under half of the 16-key panels their 6-row blocks touch: per-row residuals run faster
    # (measured: 147 ms against 250 ms as extra spans, 128 x 128 tokens, 4 heads, d 64)
    plan = _from_runs(sa.neighborhood((32, 64), 7))
    assert len(plan.xs_k0) == 0
    _covers(plan, sa.neighborhood((32, 64), 7))


def test_documents_and_causal_plan_has_no_leftovers_at_boundaries():
    n = 16384
    p = sa.documents(_doc_lengths(n)) & sa.causal(n)
    plan = build_plan(p)
    assert plan.kind == "runs"
    assert int(np.sum(plan.rs_hi - plan.rs_lo)) + len(plan.sh_cols) <= n  # was ~0.7 M keys walked at n = 131072
    assert len(plan.xs_k0) > 0
    _covers(plan, p)


CASES = {
    "grid 2-D": lambda: sa.neighborhood((6, 64), (3, 25)),
    "grid 3-D": lambda: sa.neighborhood((3, 4, 40), (3, 3, 21)),
    "docs & causal": lambda: sa.documents([37, 90, 5, 60, 48]) & sa.causal(240),
    "grid | globals": lambda: sa.neighborhood((6, 64), (3, 25)) | sa.global_tokens(384, [3, 100]),
}


@pytest.mark.parametrize("dims", [(8, 8), (6, 5), (16, 16)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_on_extra_spans_matches_the_reference(name, dims):
    p = CASES[name]()
    assert len(build_plan(p).xs_k0) > 0
    d, dv = dims
    n = p.shape[0]
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, n, d))
    k = rng.standard_normal((2, 2, n, d))  # grouped-query heads
    v = rng.standard_normal((2, 2, n, dv))
    pad = rng.random((2, n)) < 0.1
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=pad, return_lse=True, path="fused")
    np.testing.assert_allclose(out, dense_attention(q, k, v, p, key_padding_mask=pad), rtol=0, atol=1e-9)
    go = rng.standard_normal(out.shape)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, key_padding_mask=pad, path="fused")
    for g, r in zip(grads, dense_attention_backward(go, q, k, v, p, key_padding_mask=pad)):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-9)


def test_float32_extra_spans():
    p = sa.neighborhood((8, 48), (3, 25))
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 384, 32)).astype(np.float32) for _ in range(3))
    out, lse = sa.sparse_attention(q, k, v, p, return_lse=True, path="fused")
    np.testing.assert_allclose(out, dense_attention(q, k, v, p), rtol=0, atol=5e-5)
    go = rng.standard_normal(out.shape).astype(np.float32)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, path="fused")
    for g, r in zip(grads, dense_attention_backward(go, q, k, v, p)):
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-4)
