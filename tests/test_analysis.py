"""Receptive field and coverage against dense boolean matrix powers and closed forms."""

import numpy as np
import pytest
import scipy.sparse as sp

import sparseattn as sa
from sparseattn.analysis import coverage_by_layer, layers_to_cover, receptive_field

from helpers import assert_canonical_csr


def dense_reach(a, layers):
    """Brute force: boolean A^L by dense integer products, clipped to 0/1 every step."""
    a = np.asarray(a, dtype=np.int64)
    r = np.eye(a.shape[0], dtype=np.int64)
    for _ in range(layers):
        r = np.minimum(r @ a, 1)
    return r.astype(bool)


def dense_cover(a, limit):
    for L in range(0, limit + 1):
        if dense_reach(a, L).all():
            return L
    return None


def random_dense(rng, n, density, diag=None):
    a = rng.random((n, n)) < density
    if diag is not None:
        np.fill_diagonal(a, diag)
    return a


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("layers", [0, 1, 2, 3, 5])
def test_receptive_field_matches_dense_powers(seed, layers):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    a = random_dense(rng, n, float(rng.uniform(0.02, 0.25)), diag=None if seed % 2 else True)
    expect = dense_reach(a, layers)
    counts, sets = receptive_field(sa.from_dense(a), layers, return_sets=True)
    assert_canonical_csr(sets, (n, n))
    np.testing.assert_array_equal(sets.toarray(), expect)
    np.testing.assert_array_equal(counts, expect.sum(axis=1))
    assert counts.dtype == np.int64
    # a token subset, out of order and repeated, gives the same rows
    tok = rng.integers(0, n, size=5)
    c2, s2 = receptive_field(a, layers, return_sets=True, tokens=tok)
    np.testing.assert_array_equal(s2.toarray(), expect[tok])
    np.testing.assert_array_equal(c2, expect[tok].sum(axis=1))
    # residual connections: within L layers
    within = dense_reach(a | np.eye(n, dtype=bool), layers)
    np.testing.assert_array_equal(receptive_field(a, layers, residual=True), within.sum(axis=1))


@pytest.mark.parametrize("seed", range(4))
def test_coverage_by_layer_matches_each_layer(seed):
    rng = np.random.default_rng(100 + seed)
    n = 25
    a = random_dense(rng, n, 0.08)
    per = coverage_by_layer(sa.from_dense(a), 6)
    assert per.shape == (6, n)
    for L in range(1, 7):
        np.testing.assert_array_equal(per[L - 1], dense_reach(a, L).sum(axis=1))
    assert coverage_by_layer(a, 0).shape == (0, n)


@pytest.mark.parametrize("n,r", [(1, 0), (10, 1), (37, 3), (50, 7), (20, 30)])
@pytest.mark.parametrize("layers", [1, 2, 4, 9])
def test_band_closed_form(n, r, layers):
    # band of radius r: tokens within L * r, clipped at the edges
    i = np.arange(n)
    expect = np.minimum(i + layers * r, n - 1) - np.maximum(i - layers * r, 0) + 1
    np.testing.assert_array_equal(receptive_field(sa.sliding_window(n, r), layers), expect)


@pytest.mark.parametrize("n,r", [(10, 1), (64, 4), (100, 8), (33, 32), (5, 10)])
def test_layers_to_cover_band_closed_form(n, r):
    expect = 1 if r >= n - 1 else -(-(n - 1) // r)
    assert layers_to_cover(sa.sliding_window(n, r)) == expect


@pytest.mark.parametrize("n,r,g", [(50, 2, [0]), (64, 1, [63]), (40, 3, [17]), (30, 1, [0, 29])])
def test_band_plus_global_covers_in_two_layers(n, r, g):
    p = sa.sliding_window(n, r) | sa.global_tokens(n, g)
    assert layers_to_cover(p) == 2
    assert np.all(receptive_field(p, 2) == n)
    assert not np.all(receptive_field(p, 1) == n)
    assert layers_to_cover(sa.longformer(n, 2 * r, g)) == 2


def test_layers_to_cover_never():
    assert layers_to_cover(sa.causal(40)) is None
    assert layers_to_cover(sa.causal(40, radius=3)) is None
    swap = np.array([[0, 1], [1, 0]], dtype=bool)  # periodic: alternates forever
    assert layers_to_cover(swap) is None
    assert dense_cover(swap, 10) is None
    two_islands = sa.from_dense(np.kron(np.eye(2, dtype=bool), np.ones((3, 3), dtype=bool)))
    assert layers_to_cover(two_islands) is None
    empty_row = np.ones((4, 4), dtype=bool)
    empty_row[2] = False
    assert layers_to_cover(empty_row) is None
    # a subset of tokens can be covered even if the whole pattern never is
    assert layers_to_cover(sa.causal(40), tokens=[39]) == 1
    assert layers_to_cover(sa.causal(40, radius=4), tokens=[39]) == 10
    assert layers_to_cover(sa.causal(40, radius=4), tokens=[0]) is None  # detected as a fixed point


@pytest.mark.parametrize("seed", range(12))
def test_layers_to_cover_matches_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(2, 14))
    a = random_dense(rng, n, float(rng.uniform(0.1, 0.4)), diag=True if seed % 3 == 0 else None)
    # Wielandt: a primitive n x n boolean matrix has A^L all-ones for L <= (n - 1)^2 + 1
    expect = dense_cover(a, (n - 1) ** 2 + 1)
    assert layers_to_cover(a) == expect
    if expect is not None:
        assert layers_to_cover(a, max_layers=expect) == expect
        if expect > 1:
            assert layers_to_cover(a, max_layers=expect - 1) is None


def test_layers_to_cover_sparse_transformer_presets():
    from sparseattn.patterns.presets import bigbird, fixed, strided

    # bidirectional strided: jump by a multiple of l, then a local step -> 2 layers
    for n, l in [(30, 5), (64, 8), (50, 7)]:
        p = strided(n, l, causal=False)
        assert layers_to_cover(p) == dense_cover(p.to_dense(), 6) == 2
    p = fixed(48, 8, 2, causal=False)
    assert layers_to_cover(p) == dense_cover(p.to_dense(), 6)
    assert layers_to_cover(strided(30, 5)) is None  # causal
    b = bigbird(64, 4, 2, seed=0)
    assert layers_to_cover(b) == dense_cover(b.to_dense(), 6) == 2


def test_subset_tracing_on_long_band_without_dense():
    n, r, L = 1 << 20, 256, 6
    p = sa.sliding_window(n, r)
    tok = [0, 1000, n // 2, n - 1]
    counts, sets = receptive_field(p, L, return_sets=True, tokens=tok)
    t = np.array(tok)
    expect = np.minimum(t + L * r, n - 1) - np.maximum(t - L * r, 0) + 1
    np.testing.assert_array_equal(counts, expect)
    assert sets.shape == (4, n) and sets.nnz == expect.sum()
    assert layers_to_cover(sa.sliding_window(1 << 13, 128), tokens=[0, (1 << 13) - 1]) == 64


def test_inputs_are_not_modified_and_scipy_accepted(rng):
    a = random_dense(rng, 12, 0.3)
    m = sp.csr_array(a)
    before = m.copy()
    a_copy = a.copy()
    assert np.array_equal(receptive_field(m, 3), receptive_field(a, 3))
    assert (m != before).nnz == 0 and np.array_equal(a, a_copy)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: receptive_field(sa.random_pattern(3, 4, 1), 1), ValueError, r"must be square; got shape \(3, 4\)"),
        (lambda: receptive_field(sa.causal(4), -1), ValueError, r"layers must be >= 0, got -1"),
        (lambda: receptive_field(sa.causal(4), 1.5), TypeError, r"layers must be an integer"),
        (lambda: receptive_field(sa.causal(4), 1, tokens=[4]), ValueError, r"tokens must lie in \[0, 4\).*\[4\]"),
        (lambda: receptive_field(sa.causal(4), 1, tokens=[[0]]), ValueError, r"tokens must be a 1-D"),
        (lambda: receptive_field(sa.causal(4), 1, tokens=[0.5]), TypeError, r"tokens must hold integers"),
        (lambda: receptive_field(sa.causal(4), 1, return_sets="yes"), TypeError, r"return_sets must be True or False"),
        (lambda: receptive_field(sa.causal(4), 1, residual=1), TypeError, r"residual must be True or False"),
        (lambda: receptive_field("band", 1), TypeError, r"pattern must be a sparseattn Pattern"),
        (lambda: layers_to_cover(sa.causal(4), max_layers=-2), ValueError, r"max_layers must be >= 0"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("seed", range(6))
def test_streamed_rows_match_compiled(seed, monkeypatch):
    # force the large-pattern path (rows built per run, never compiled whole) on small patterns
    import sparseattn.analysis as an

    rng = np.random.default_rng(300 + seed)
    n = 150
    a = random_dense(rng, n, 0.01, diag=True if seed % 2 else None)
    a[rng.integers(0, n, 5)] = False  # a few empty rows
    expect = {L: dense_reach(a, L) for L in (1, 2, 4)}
    cover = layers_to_cover(sa.sliding_window(n, 3) | sa.from_dense(a))
    monkeypatch.setattr(an, "_MATERIALISE_NNZ", 0)
    monkeypatch.setattr(an._Rows, "_GAP", 2)
    for L, e in expect.items():
        counts, sets = receptive_field(sa.from_dense(a), L, return_sets=True)
        np.testing.assert_array_equal(sets.toarray(), e)
    assert layers_to_cover(sa.sliding_window(n, 3) | sa.from_dense(a)) == cover


@pytest.mark.parametrize("seed", range(10))
def test_survey_matches_dense_powers_and_cover(seed):
    from sparseattn.analysis import survey

    rng = np.random.default_rng(500 + seed)
    n = int(rng.integers(2, 40))
    a = random_dense(rng, n, float(rng.uniform(0.03, 0.3)), diag=True if seed % 3 else None)
    layers = int(rng.integers(1, 8))
    table, cover, never = survey(a, layers)
    expect = np.stack([dense_reach(a, L).sum(axis=1) for L in range(1, layers + 1)])
    np.testing.assert_array_equal(table, expect)
    full = [L for L in range(1, layers + 1) if dense_reach(a, L).all()]
    assert cover == (full[0] if full else None)
    truth = layers_to_cover(a)
    if full:
        assert truth == cover
    if never:
        assert truth is None
