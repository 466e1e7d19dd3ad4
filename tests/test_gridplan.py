"""Neighbourhoods planned from their grid (engine/gridplan.py): exact plans, the engine on them, the fallbacks.

Each plan's entries are compared with the pattern's own CSR (itself checked against NATTEN's rule written
out per axis in tests/test_run_builders.py); the engine on the plans against the float64 reference.
"""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine.plan import PANEL, build_plan
from sparseattn.reference import dense_attention, dense_attention_backward

GRID_PLANNED = {
    # narrow kernel rows: every row's runs are residual runs
    "2-D 7x7": lambda: sa.neighborhood((24, 32), 7),
    "2-D even": lambda: sa.neighborhood((10, 16), (4, 6)),
    "3-D": lambda: sa.neighborhood((4, 6, 16), (3, 3, 5)),
    "causal rows": lambda: sa.neighborhood((12, 16), (3, 5), causal=(True, False)),
    "causal both": lambda: sa.neighborhood((12, 16), (3, 5), causal=(True, True)),
    "dilated rows": lambda: sa.neighborhood((12, 16), (3, 5), dilation=(3, 1)),
    "1-D": lambda: sa.neighborhood(64, 9),
    # wide kernel rows: the tile's span and one extra span per other kernel row
    "2-D wide": lambda: sa.neighborhood((6, 64), (3, 25)),
    "3-D wide causal": lambda: sa.neighborhood((4, 3, 64), (2, 3, 17), causal=(True, False, False)),
    "1-D wide": lambda: sa.neighborhood(128, 40),
    "whole lines": lambda: sa.neighborhood((6, 16), (3, 16)),  # a tile's runs on adjacent lines touch
}


def _assert_exact(plan, p):
    rows, cols = plan.entries()
    got = np.sort(rows * p.shape[1] + cols)
    csr = p.csr
    want = np.sort(np.repeat(np.arange(p.shape[0]), np.diff(csr.indptr)) * p.shape[1] + csr.indices)
    np.testing.assert_array_equal(got, want)  # every entry once, nothing else
    assert plan.nnz == p.nnz


@pytest.mark.parametrize("name", sorted(GRID_PLANNED))
def test_grid_plan_is_exact(name):
    p = GRID_PLANNED[name]()
    plan = build_plan(p)
    assert plan.kind == "structured"  # from the grid, not from the pattern's runs
    assert p.grid[-1] % plan.tile_rows == 0  # no tile crosses a line
    assert len(plan.sh_cols) == 0 and len(plan.long_rows) == 0
    lines = int(np.prod(p.kernel_size[:-1]))
    if min(p.kernel_size[-1], p.grid[-1]) < PANEL:
        assert len(plan.xs_k0) == 0 and np.all(plan.tile_k1 == plan.tile_k0)
        assert len(plan.rs_lo) <= p.shape[0] * lines  # one run per row and line: O(n * runs), not O(nnz)
    else:
        assert len(plan.rs_lo) == 0
        assert len(plan.xs_k0) <= plan.n_tiles * (lines - 1)
    _assert_exact(plan, p)


@pytest.mark.parametrize("tile_rows", [8, 16, 32, 64])
def test_grid_plan_any_tile_that_divides_the_line(tile_rows):
    p = sa.neighborhood((8, 64), (3, 7))
    plan = build_plan(p, tile_rows=tile_rows)
    assert plan.kind == "structured" and plan.tile_rows == tile_rows
    _assert_exact(plan, p)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sa.neighborhood((6, 13), 3),  # no tile of 8 rows or more divides a line of 13
        lambda: sa.neighborhood((8, 32), 3, dilation=(1, 2)),  # the last axis dilated: not one run per line
    ],
)
def test_other_neighbourhoods_are_planned_from_their_runs(make):
    p = make()
    plan = build_plan(p)
    assert plan.kind != "structured"
    _assert_exact(plan, p)


@pytest.mark.parametrize("name", sorted(GRID_PLANNED))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_engine_on_grid_plans_matches_the_reference(name, dtype):
    p = GRID_PLANNED[name]()
    n = p.shape[0]
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 4, n, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, n, 16)).astype(dtype)  # grouped-query heads
    v = rng.standard_normal((2, 2, n, 16)).astype(dtype)
    pad = rng.random((2, n)) < 0.1
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=pad, return_lse=True, path="fused")
    tol = dict(rtol=0, atol=1e-9) if dtype == np.float64 else dict(rtol=0, atol=5e-5)
    np.testing.assert_allclose(out, dense_attention(q, k, v, p, key_padding_mask=pad), **tol)
    go = rng.standard_normal(out.shape).astype(dtype)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, key_padding_mask=pad, path="fused")
    gtol = tol if dtype == np.float64 else dict(rtol=0, atol=2e-4)
    for g, r in zip(grads, dense_attention_backward(go, q, k, v, p, key_padding_mask=pad)):
        np.testing.assert_allclose(g, r, **gtol)
