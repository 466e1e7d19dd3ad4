"""Pattern builders against brute-force dense constructions, the algebra's laws, the registry."""

import os
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import SEED_GLOBAL, SEED_LOCAL, assert_canonical_csr, assert_pattern_equals_dense
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.patterns import registry

# ---------------------------------------------------------------- brute force


def brute_window(n_q, n_k, left, right, dilation=1):
    i = np.arange(n_q)[:, None]
    j = np.arange(n_k)[None, :]
    off = j - i
    return (off >= -left) & (off <= right) & (off % dilation == 0)


def brute_global(n, idx):
    m = np.zeros((n, n), dtype=bool)
    for g in idx:
        m[g, :] = True
        m[:, g] = True
    return m


# ---------------------------------------------------------------- the seed's grids

def test_seed_grid_local():
    assert sa.sliding_window(5, 1).to_string() == SEED_LOCAL


def test_seed_grid_global():
    p = sa.sliding_window(5, 1) | sa.global_tokens(5, [0])
    assert p.to_string() == SEED_GLOBAL
    assert sa.longformer(5, attention_window=2, global_indices=[0]) == p
    assert sa.longformer(5, attention_window=2, global_indices=[0]).to_string() == SEED_GLOBAL


def test_to_string_refuses_large_and_takes_labels():
    with pytest.raises(ValueError, match="max_size"):
        sa.sliding_window(100, 1).to_string()
    s = sa.sliding_window(3, 0).to_string(labels=["The", "quick", "fox"])
    assert s.splitlines()[1].startswith("The") and s.splitlines()[3].rstrip().endswith("*")


# ---------------------------------------------------------------- builders vs brute force


@pytest.mark.parametrize(
    "n_q,n_k,left,right,dilation",
    [
        (1, 1, 0, 0, 1),
        (5, 5, 1, 1, 1),
        (10, 10, 3, 0, 1),  # causal
        (10, 10, 0, 3, 1),
        (13, 13, 4, 4, 2),  # dilated
        (13, 13, 5, 2, 3),
        (6, 6, 50, 50, 1),  # window wider than n
        (7, 12, 2, 3, 1),  # rectangular, more keys
        (12, 5, 2, 3, 1),  # rectangular, more queries (rows past n_k may be empty)
        (12, 5, 1, 1, 2),
        (0, 0, 1, 1, 1),
        (9, 9, 0, 0, 4),
    ],
)
def test_sliding_window_brute_force(n_q, n_k, left, right, dilation):
    p = sa.sliding_window(n_q, left=left, right=right, dilation=dilation, n_k=n_k)
    assert_pattern_equals_dense(p, brute_window(n_q, n_k, left, right, dilation))


def test_sliding_window_radius_sets_both_sides():
    assert sa.sliding_window(9, 2) == sa.sliding_window(9, left=2, right=2)
    assert sa.sliding_window(9, 2, right=0) == sa.sliding_window(9, left=2, right=0)
    assert sa.causal(9) == sa.from_dense(np.tril(np.ones((9, 9), bool)))
    assert sa.causal(9, 2) == sa.from_dense(brute_window(9, 9, 2, 0))


@pytest.mark.parametrize("n,idx", [(5, [0]), (8, [0, 7, 3, 3]), (6, []), (3, [0, 1, 2]), (10, np.array([9, 2]))])
def test_global_tokens_brute_force(n, idx):
    assert_pattern_equals_dense(sa.global_tokens(n, idx), brute_global(n, idx))


@pytest.mark.parametrize("n,w,g", [(16, 4, [0]), (9, 20, [8, 0]), (12, 2, []), (10, 6, [3, 4, 5])])
def test_longformer_brute_force(n, w, g):
    dense = brute_window(n, n, w // 2, w // 2) | brute_global(n, g)
    assert_pattern_equals_dense(sa.longformer(n, w, g), dense)


def test_from_sparse_canonicalises_without_changing_input():
    rows = np.array([0, 0, 2, 2, 1])
    cols = np.array([3, 3, 0, 1, 2])
    data = np.array([1.0, 1.0, 0.0, 5.0, 2.0])  # a duplicate and an explicit zero
    coo = sp.coo_matrix((data, (rows, cols)), shape=(3, 4))
    before = coo.copy()
    p = sa.from_sparse(coo)
    expected = np.zeros((3, 4), bool)
    expected[0, 3] = expected[2, 1] = expected[1, 2] = True
    assert_pattern_equals_dense(p, expected)
    np.testing.assert_array_equal(coo.data, before.data)
    # csr with unsorted indices
    csr = sp.csr_array((np.ones(3), np.array([2, 0, 1]), np.array([0, 3])), shape=(1, 3))
    assert_pattern_equals_dense(sa.from_sparse(csr), np.ones((1, 3), bool))


def test_from_dense_numeric_and_bool(rng):
    m = rng.random((7, 9)) < 0.3
    assert_pattern_equals_dense(sa.from_dense(m), m)
    assert_pattern_equals_dense(sa.from_dense(m.astype(np.float32)), m)


def test_random_pattern_reproducible_and_exact(rng):
    a = sa.random_pattern(50, 30, 7, seed=3)
    b = sa.random_pattern(50, 30, 7, seed=3)
    c = sa.random_pattern(50, 30, 7, seed=4)
    assert a == b and a != c
    assert_canonical_csr(a.csr, (50, 30))
    assert np.all(np.diff(a.csr.indptr) == 7)
    big = sa.random_pattern(20, 100000, 5, seed=1)  # sparse-draw branch
    assert np.all(np.diff(big.csr.indptr) == 5)
    assert_canonical_csr(big.csr)


def test_large_pattern_rows_without_dense_grid():
    n = 1 << 20
    p = sa.longformer(n, 512, [0])
    tracemalloc.start()
    part = p.rows(500_000, 500_064)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20  # an n x n grid would be a terabyte; a full row of CSR ~ 8 MB
    assert part.shape == (64, n)
    assert np.all(np.diff(part.indptr) == 514)  # 513 band keys + the global key
    band = sa.sliding_window(n, 256)
    assert band.nnz == n * 513 - 2 * sum(range(1, 257))  # closed form, edges truncated


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="radius must be >= 0, got -1"):
        sa.sliding_window(5, -1)
    with pytest.raises(ValueError, match="dilation must be >= 1, got 0"):
        sa.sliding_window(5, 1, dilation=0)
    with pytest.raises(ValueError, match="needs radius="):
        sa.sliding_window(5, left=1)
    with pytest.raises(TypeError, match="n must be an integer"):
        sa.sliding_window(5.0, 1)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\).*\[5\]"):
        sa.global_tokens(5, [0, 5])
    with pytest.raises(ValueError, match="indices must lie"):
        sa.global_tokens(5, [-1])
    with pytest.raises(ValueError, match="attention_window must be a positive even integer.*got 3"):
        sa.longformer(8, 3)
    with pytest.raises(ValueError, match="attention_window must be a positive even integer.*got 0"):
        sa.longformer(8, 0)
    with pytest.raises(ValueError, match="must be 2-D"):
        sa.from_sparse(sp.coo_array(np.ones(3)))
    with pytest.raises(TypeError, match="scipy sparse"):
        sa.from_sparse(np.ones((2, 2)))
    with pytest.raises(ValueError, match="per_row must be <= n_k"):
        sa.random_pattern(3, 4, 5)
    with pytest.raises(ValueError, match=r"shapes differ, left is \(4, 4\) and right is \(5, 5\)"):
        sa.sliding_window(4, 1) | sa.sliding_window(5, 1)
    with pytest.raises(ValueError, match=r"row range"):
        sa.sliding_window(4, 1).rows(2, 9)


# ---------------------------------------------------------------- every registered builder


def registered_cases():
    cases = []
    for name in registry.available():
        for i, kw in enumerate(registry.examples(name)):
            cases.append(pytest.param(name, kw, id=f"{name}-{i}"))
    return cases


def build(name, kw):
    out = registry.get(name)(**kw)
    return out if isinstance(out, sa.Pattern) else out[0]  # per-head builders return one pattern per head


def test_every_builder_has_examples():
    missing = [n for n in registry.available() if not registry.examples(n)]
    assert not missing, f"registered builders without examples for the shared suite: {missing}"


@pytest.mark.parametrize("name,kw", registered_cases())
def test_registered_builder_suite(name, kw):
    p = build(name, kw)
    n_q, n_k = p.shape
    dense = p.to_dense()
    assert_pattern_equals_dense(p, dense)
    # any row range, rebuilt from scratch, agrees with the whole
    fresh = build(name, kw)
    r = np.random.default_rng(0)
    for _ in range(5):
        a = int(r.integers(0, n_q + 1))
        b = int(r.integers(a, n_q + 1))
        part = fresh.rows(a, b)
        assert_canonical_csr(part, (b - a, n_k))
        np.testing.assert_array_equal(part.toarray(), dense[a:b])
    # identity, equality and hashing
    assert p == fresh and hash(p) == hash(fresh) and p.identity == fresh.identity
    clone = sa.from_dense(dense)
    assert clone == p and hash(clone) == hash(p)
    # transpose and algebra against dense boolean ops
    assert_pattern_equals_dense(p.T, dense.T)
    assert p.T.T == p
    other = sa.random_pattern(n_q, n_k, min(2, n_k), seed=7)
    od = other.to_dense()
    assert_pattern_equals_dense(p | other, dense | od)
    assert_pattern_equals_dense(p & other, dense & od)
    assert 0.0 <= p.density <= 1.0


def test_register_and_get_custom_builder():
    @sa.register_pattern("test_first_column", examples=[dict(n=4)])
    def first_column(n):
        return sa.sliding_window(n, 0)

    try:
        assert "test_first_column" in sa.patterns.available()
        assert sa.patterns.get("test_first_column") is first_column
    finally:
        registry._BUILDERS.pop("test_first_column")
        registry._EXAMPLES.pop("test_first_column")
    with pytest.raises(ValueError, match="unknown pattern builder 'nope'; known builders: .*sliding_window"):
        sa.patterns.get("nope")


def test_entry_point_discovery(tmp_path, monkeypatch):
    pkg = tmp_path / "thirdparty_patterns.py"
    pkg.write_text(
        textwrap.dedent(
            """
            import sparseattn as sa

            def diagonal(n):
                return sa.sliding_window(n, 0)

            diagonal.sparseattn_examples = [dict(n=3)]
            """
        )
    )
    dist = tmp_path / "thirdparty_patterns-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-patterns\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sparseattn.patterns]\nthirdparty_diag = thirdparty_patterns:diagonal\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "thirdparty_diag" in sa.patterns.available()
        p = sa.patterns.get("thirdparty_diag")(n=3)
        assert_pattern_equals_dense(p, np.eye(3, dtype=bool))
        assert sa.patterns.examples("thirdparty_diag") == [dict(n=3)]
    finally:
        registry._BUILDERS.pop("thirdparty_diag", None)
        registry._EXAMPLES.pop("thirdparty_diag", None)
        sys.modules.pop("thirdparty_patterns", None)


# ---------------------------------------------------------------- the algebra's laws

N = 7


@st.composite
def patterns(draw):
    kind = draw(st.sampled_from(["dense", "window", "global"]))
    if kind == "dense":
        bits = draw(st.lists(st.booleans(), min_size=N * N, max_size=N * N))
        return sa.from_dense(np.array(bits).reshape(N, N))
    if kind == "window":
        return sa.sliding_window(
            N, left=draw(st.integers(0, 8)), right=draw(st.integers(0, 8)), dilation=draw(st.integers(1, 3))
        )
    return sa.global_tokens(N, draw(st.lists(st.integers(0, N - 1), max_size=3)))


@settings(max_examples=60, deadline=None)
@given(patterns(), patterns(), patterns())
def test_algebra_laws(a, b, c):
    A, B, C = a.to_dense(), b.to_dense(), c.to_dense()
    assert_pattern_equals_dense(a | b, A | B)
    assert_pattern_equals_dense(a & b, A & B)
    assert (a | b) == (b | a) and (a & b) == (b & a)
    assert ((a | b) | c) == (a | (b | c)) and ((a & b) & c) == (a & (b & c))
    assert (a | a) == a and (a & a) == a
    assert (a | (a & b)) == a and (a & (a | b)) == a  # absorption
    assert (a & (b | c)) == ((a & b) | (a & c))  # distributivity
    assert (a | b).T == (a.T | b.T)
    assert hash(a | b) == hash(b | a)


def test_scipy_and_dense_operands_in_algebra(rng):
    a = sa.sliding_window(6, 1)
    m = rng.random((6, 6)) < 0.3
    assert_pattern_equals_dense(a | sp.csr_array(m), a.to_dense() | m)
    assert_pattern_equals_dense(sp.csr_array(m) & a, a.to_dense() & m)


def test_import_is_light():
    code = "import sys, sparseattn; bad = [m for m in ('numba', 'torch', 'matplotlib', 'transformers', 'dask') if m in sys.modules]; print(bad)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ))
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("seed", range(40))
def test_band_global_row_counts_match_built_rows(seed):
    # the interval-arithmetic row counts of window | global (what nnz uses) against the merged rows
    from sparseattn.patterns.base import Union, _fold

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    left, right = (int(x) for x in rng.integers(0, 8, size=2))
    dilation = int(rng.integers(1, 4))
    g = rng.choice(n, size=int(rng.integers(0, min(n, 5) + 1)), replace=False)
    p = sa.sliding_window(n, left=left, right=right, dilation=dilation) | sa.global_tokens(n, g)
    if seed % 3 == 0:
        p = p | sa.global_tokens(n, rng.choice(n, size=1))
    assert isinstance(p, Union)
    start = int(rng.integers(0, n + 1))
    stop = int(rng.integers(start, n + 1))
    indptr, _ = _fold(p.parts, start, stop, union=True)
    np.testing.assert_array_equal(p._row_counts(start, stop), np.diff(indptr))
    assert p.nnz == int(p.to_dense().sum())
