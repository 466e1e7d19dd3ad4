"""The tile planner: every nonzero covered exactly once, structure exploited, plans cached."""

import numpy as np
import pytest
import scipy.sparse as sp

import sparseattn as sa
from sparseattn.engine import plan as plan_mod
from sparseattn.patterns import available, examples, get
from sparseattn.engine.plan import TilePlan, build_plan, clear_plan_cache, get_plan, plan_cache_info


def assert_plan_covers(plan, pattern):
    """Brute force: the plan's (row, col) list equals the pattern's nonzeros, each exactly once."""
    assert isinstance(plan, TilePlan)
    n_q, n_k = pattern.shape
    rows, cols = plan.entries()
    assert len(rows) == plan.nnz
    if len(rows):
        assert rows.min() >= 0 and rows.max() < n_q and cols.min() >= 0 and cols.max() < n_k
    keys = rows * max(n_k, 1) + cols
    assert len(np.unique(keys)) == len(keys), "an entry is computed twice"
    got = sp.csr_array((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n_q, n_k)).toarray()
    np.testing.assert_array_equal(got, pattern.to_dense())
    assert plan.nnz == pattern.nnz
    # spans: each row's run lies inside its tile's span
    t_of = np.arange(n_q) // plan.tile_rows
    run = plan.row_hi > plan.row_lo
    assert np.all(plan.row_lo[run] >= plan.tile_k0[t_of[run]])
    assert np.all(plan.row_hi[run] <= plan.tile_k1[t_of[run]])


def _random_mask(rng, n_q, n_k, density):
    return rng.random((n_q, n_k)) < density


PATTERNS = {
    "band": lambda: sa.sliding_window(100, 7),
    "band_asym": lambda: sa.sliding_window(70, left=9, right=2),
    "band_rect": lambda: sa.sliding_window(50, 4, n_k=80),
    "band_rect_short": lambda: sa.sliding_window(90, 3, n_k=40),
    "causal": lambda: sa.causal(60),
    "longformer": lambda: sa.longformer(130, 16, [0, 5, 129]),
    "globals_only": lambda: sa.global_tokens(40, [3, 17]),
    "dilated": lambda: sa.sliding_window(90, 12, dilation=3),
    "random": lambda: sa.random_pattern(64, 48, 7, seed=3),
    "random_rect": lambda: sa.random_pattern(33, 120, 11, seed=4),
    "band_or_random": lambda: sa.sliding_window(96, 10) | sa.random_pattern(96, 96, 4, seed=5),
    "band_and_random": lambda: sa.sliding_window(96, 30) & sa.random_pattern(96, 96, 40, seed=6),
    "transposed_rect": lambda: sa.sliding_window(40, 3, n_k=70).T,
    "dense_mask": lambda: sa.from_dense(_random_mask(np.random.default_rng(7), 45, 61, 0.3)),
    "empty_rows": lambda: sa.from_dense(np.triu(_random_mask(np.random.default_rng(8), 50, 50, 0.4), 20)),
    "all_empty": lambda: sa.from_dense(np.zeros((20, 30), dtype=bool)),
    "full": lambda: sa.from_dense(np.ones((37, 29), dtype=bool)),
    "one_row": lambda: sa.sliding_window(1, 0),
    "zero_keys": lambda: sa.sliding_window(5, 2, n_k=0),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("generic", [False, True])
def test_plan_covers_pattern(name, generic):
    p = PATTERNS[name]()
    assert_plan_covers(build_plan(p, generic=generic), p)


@pytest.mark.parametrize("tile_rows", [1, 3, 16, 64])
@pytest.mark.parametrize("name", ["longformer", "band_or_random", "dilated", "random_rect"])
def test_plan_covers_pattern_any_tile_size(name, tile_rows):
    p = PATTERNS[name]()
    assert_plan_covers(build_plan(p, tile_rows=tile_rows, chunk=7), p)


def test_long_rows_generic_grouping():
    # force long rows in the CSR planner: identical full rows group, others stay alone
    n = 80
    dense = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= 3
    dense[[2, 3, 4, 40]] = True
    dense[60] = True
    dense[60, [10, 20, 30]] = False  # long, but not identical to the full rows
    p = sa.from_dense(dense)
    plan = build_plan(p, long_min=10, chunk=16, tile_rows=8)
    assert plan.long_rows.tolist() == [2, 3, 4, 40, 60]
    groups = [plan.long_rows[plan.grp_ptr[g] : plan.grp_ptr[g + 1]].tolist() for g in range(len(plan.grp_ptr) - 1)]
    assert groups == [[2, 3, 4, 40], [60]]  # identical rows share a group
    assert_plan_covers(plan, p)


def test_structured_band_is_one_span_per_tile():
    n, r = 1000, 40
    plan = build_plan(sa.sliding_window(n, r))
    assert plan.kind == "structured"
    T = plan.tile_rows
    t = np.arange(plan.n_tiles)
    np.testing.assert_array_equal(plan.tile_k0, np.maximum(0, t * T - r))
    np.testing.assert_array_equal(plan.tile_k1, np.minimum(n, np.minimum(n, (t + 1) * T) - 1 + r + 1))
    assert len(plan.sh_cols) == 0 and len(plan.rs_lo) == 0 and len(plan.long_rows) == 0


def test_structured_globals_are_shared_columns_and_long_rows():
    n = 300
    p = sa.longformer(n, 20, [0, 150])
    plan = build_plan(p)
    assert plan.kind == "structured"
    assert plan.long_rows.tolist() == [0, 150]
    assert len(plan.grp_ptr) == 2  # one group: both rows see every key
    assert set(plan.sh_cols.tolist()) <= {0, 150}
    assert_plan_covers(plan, p)


def test_generic_plan_of_band_matches_structured_work():
    p = sa.sliding_window(500, 30)
    s, g = build_plan(p), build_plan(sa.from_sparse(p.csr))
    assert g.kind == "generic"
    np.testing.assert_array_equal(s.tile_k0, g.tile_k0)
    np.testing.assert_array_equal(s.tile_k1, g.tile_k1)
    assert len(g.rs_lo) == 0 and len(g.sh_cols) == 0


@pytest.mark.parametrize("name", available())
def test_plan_covers_every_registered_builder(name):
    for kwargs in examples(name):
        p = get(name)(**kwargs)
        if isinstance(p, (list, tuple)):
            patterns = list(p)
        else:
            patterns = [p]
        for q in patterns:
            assert_plan_covers(build_plan(q), q)
            assert_plan_covers(build_plan(q, generic=True, tile_rows=4), q)


def test_million_token_plans_are_linear():
    n = 1 << 20
    for p in (sa.longformer(n, 512, [0]), sa.sliding_window(n, 256)):
        plan = build_plan(p)
        assert plan.kind == "structured"
        assert plan.nbytes < 40 * n  # O(n), nothing nnz- or n^2-sized
        # a few tiles checked against the definition
        T = plan.tile_rows
        for t in (0, 1, plan.n_tiles // 2, plan.n_tiles - 1):
            rows = np.arange(t * T, min(n, t * T + T))
            rows = rows[rows != 0]
            assert plan.tile_k0[t] == max(0, rows.min() - 256)
            assert plan.tile_k1[t] == min(n, rows.max() + 257)
    assert plan.nnz == sa.sliding_window(n, 256)._row_counts(0, n).sum()


def test_max_span_is_the_widest_tile_s_keys():
    """What a thread's panel cache is sized from: the keys of a tile's spans, counted by hand."""
    assert build_plan(sa.causal(1000), tile_rows=64).max_span == 1000  # the last tile spans every key
    assert build_plan(sa.sliding_window(1000, 50), tile_rows=64).max_span == 64 + 2 * 50  # an interior tile
    p = sa.sliding_window(1000, 50) | sa.global_tokens(1000, [500])  # a global column in a tile: shared, not span
    assert build_plan(p, tile_rows=64).max_span == 64 + 2 * 50


def test_plan_cache_reuses_by_identity():
    clear_plan_cache()
    a = get_plan(sa.sliding_window(64, 3))
    b = get_plan(sa.sliding_window(64, 3))  # a different object with the same identity
    assert a is b
    info = plan_cache_info()
    assert info["hits"] == 1 and info["misses"] == 1 and info["size"] == 1
    for r in range(plan_mod.CACHE_SIZE + 3):
        get_plan(sa.sliding_window(64, r + 10))
    assert plan_cache_info()["size"] == plan_mod.CACHE_SIZE
    assert get_plan(sa.sliding_window(64, 3)) is not a  # evicted and rebuilt
    clear_plan_cache()
    assert plan_cache_info()["size"] == 0


def test_build_plan_rejects_bad_arguments():
    with pytest.raises(TypeError, match="pattern must be a sparseattn Pattern"):
        build_plan(np.ones((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="tile_rows must be a positive int, got 0"):
        build_plan(sa.sliding_window(4, 1), tile_rows=0)
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        build_plan(sa.sliding_window(4, 1), chunk=-2)
