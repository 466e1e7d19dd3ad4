"""Presets (BigBird, Sparse Transformer, block layouts) against brute-force dense constructions."""

import numpy as np
import pytest
import scipy.sparse as sp

import sparseattn as sa
from sparseattn.patterns import presets, registry
from sparseattn.patterns.presets import bigbird, block_sparse, fixed, strided

from helpers import assert_canonical_csr, assert_pattern_equals_dense


def check_rows(p, dense, seed=0, trials=6):
    """Random row ranges of a fresh build agree with the dense brute force."""
    r = np.random.default_rng(seed)
    n_q = dense.shape[0]
    for _ in range(trials):
        a = int(r.integers(0, n_q + 1))
        b = int(r.integers(a, n_q + 1))
        part = p.rows(a, b)
        assert_canonical_csr(part, (b - a, dense.shape[1]))
        np.testing.assert_array_equal(part.toarray(), dense[a:b])


def offsets(n):
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return i, j


# ------------------------------------------------------------------ strided


def strided_dense(n, l, causal, component):
    i, j = offsets(n)
    d = i - j
    if causal:
        local = (d >= 0) & (d < l)
        stri = (d >= 0) & (d % l == 0)
    else:
        local = np.abs(d) < l
        stri = d % l == 0
    return {"local": local, "strided": stri, "both": local | stri}[component]


@pytest.mark.parametrize("n", [0, 1, 7, 16, 33])
@pytest.mark.parametrize("stride", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("component", ["both", "local", "strided"])
def test_strided_brute_force(n, stride, causal, component):
    p = strided(n, stride, causal, component=component)
    dense = strided_dense(n, stride, causal, component)
    assert_pattern_equals_dense(p, dense)
    check_rows(strided(n, stride, causal, component=component), dense)


def test_strided_components_union_and_registry():
    p = registry.get("strided")(n=20, stride=4)
    assert p == strided(20, 4, component="local") | strided(20, 4, component="strided")
    # causal halves: the bidirectional pattern is the causal one plus its transpose
    both = strided(20, 4, causal=False)
    assert both == (p | p.T)


# ------------------------------------------------------------------ fixed


def fixed_dense(n, l, c, causal, component, head=0):
    i, j = offsets(n)
    block = (i // l) == (j // l)
    summary = ((j % l) >= l - (head + 1) * c) & ((j % l) <= l - head * c - 1)
    out = {"block": block, "summary": summary, "both": block | summary}[component]
    if causal:
        out = out & (j <= i)
    return np.broadcast_to(out, (n, n)).copy()


@pytest.mark.parametrize("n", [0, 1, 9, 16, 30])
@pytest.mark.parametrize("l,c", [(1, 1), (4, 1), (4, 2), (5, 3), (8, 8)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("component", ["both", "block", "summary"])
def test_fixed_brute_force(n, l, c, causal, component):
    p = fixed(n, l, c, causal, component=component)
    dense = fixed_dense(n, l, c, causal, component)
    assert_pattern_equals_dense(p, dense)
    check_rows(fixed(n, l, c, causal, component=component), dense)


@pytest.mark.parametrize("causal", [True, False])
def test_fixed_per_head_summary_subblocks(causal):
    n, l, c = 40, 8, 2
    hs = fixed(n, l, c, causal, heads=4)
    assert len(hs) == 4
    for h, p in enumerate(hs):
        assert_pattern_equals_dense(p, fixed_dense(n, l, c, causal, "both", head=h))
        assert p == fixed(n, l, c, causal, head=h)
    assert hs[0] == fixed(n, l, c, causal)
    # the heads' summary columns are disjoint and tile the block
    summ = [fixed_dense(n, l, c, False, "summary", head=h)[0] for h in range(4)]
    assert np.array_equal(np.sum(summ, axis=0), np.ones(n))


def test_fixed_last_block_may_be_short():
    # block does not divide n: the partial last block still follows the formula
    p = fixed(10, 4, 1, causal=False)
    assert_pattern_equals_dense(p, fixed_dense(10, 4, 1, False, "both"))
    assert p.to_dense()[9].nonzero()[0].tolist() == [3, 7, 8, 9]


# ------------------------------------------------------------------ block_sparse


@pytest.mark.parametrize("nb_q,nb_k", [(1, 1), (3, 3), (4, 2), (2, 5), (0, 3)])
@pytest.mark.parametrize("bs", [1, 3, (2, 3)])
def test_block_sparse_brute_force(nb_q, nb_k, bs, rng):
    layout = rng.random((nb_q, nb_k)) < 0.45
    bq, bk = bs if isinstance(bs, tuple) else (bs, bs)
    dense = np.kron(layout.astype(int), np.ones((bq, bk), dtype=int)).astype(bool).reshape(nb_q * bq, nb_k * bk)
    p = block_sparse(layout, bs)
    assert_pattern_equals_dense(p, dense)
    check_rows(block_sparse(layout, bs), dense)
    assert_pattern_equals_dense(p.T, dense.T)
    # scipy layouts and numeric layouts give the same pattern, inputs untouched
    sl = sp.csr_array(layout.astype(np.float64) * 2.0)
    before = sl.copy()
    assert block_sparse(sl, bs) == p
    assert (sl != before).nnz == 0
    assert block_sparse(layout.astype(np.int8), bs) == p
    np.testing.assert_array_equal(p.layout.toarray(), layout)


def test_block_sparse_per_head_layouts(rng):
    layout = rng.random((3, 4, 4)) < 0.5
    ps = block_sparse(layout, 2)
    assert isinstance(ps, list) and len(ps) == 3
    for h in range(3):
        assert ps[h] == block_sparse(layout[h], 2)


# ------------------------------------------------------------------ BigBird


def bigbird_dense(n, b, g, w, random_blocks):
    """Brute force from the definition and the drawn random blocks."""
    nb = n // b
    I, J = offsets(nb)
    glob = (I < g) | (I >= nb - g) | (J < g) | (J >= nb - g)
    win = np.abs(I - J) <= (w - 1) // 2
    rand = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        for k in random_blocks[i]:
            if k >= 0:
                rand[i, k] = True
    layout = glob | win | rand
    return np.kron(layout, np.ones((b, b), dtype=bool))


BIGBIRD_CASES = [
    dict(n=64, block_size=4, num_random_blocks=3, seed=0),
    dict(n=40, block_size=2, num_random_blocks=2, seed=5, num_global_blocks=2, window_blocks=5),
    dict(n=30, block_size=3, num_random_blocks=0, seed=0),
    dict(n=8, block_size=4, num_random_blocks=0, seed=0),
    dict(n=90, block_size=1, num_random_blocks=4, seed=11, num_global_blocks=0, window_blocks=1),
    dict(n=96, block_size=6, num_random_blocks=1, seed=2, window_blocks=7),
]


@pytest.mark.parametrize("kw", BIGBIRD_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_bigbird_brute_force(kw):
    p = bigbird(**kw)
    n, b, r = kw["n"], kw["block_size"], kw["num_random_blocks"]
    g, w = kw.get("num_global_blocks", 1), kw.get("window_blocks", 3)
    nb, wr = n // b, (w - 1) // 2
    rb = p.random_blocks
    assert rb.shape == (nb, r)
    for i in range(nb):
        if i < g or i >= nb - g:
            assert np.all(rb[i] == -1)
            continue
        picked = rb[i].tolist()
        assert len(set(picked)) == r, picked  # without replacement
        for k in picked:
            assert g <= k < nb - g, (i, k)  # never a global block
            assert abs(k - i) > wr, (i, k)  # never inside the window
    dense = bigbird_dense(n, b, g, w, rb)
    assert_pattern_equals_dense(p, dense)
    check_rows(bigbird(**kw), dense)
    # each non-global query row sees exactly (globals + window + random) blocks of b tokens
    counts = np.diff(p.csr.indptr)
    assert np.all(counts % b == 0)


def test_bigbird_seeded_and_per_head():
    a = bigbird(256, 8, 3, seed=1)
    assert a == bigbird(256, 8, 3, seed=1)
    assert np.array_equal(a.random_blocks, bigbird(256, 8, 3, seed=1).random_blocks)
    assert a != bigbird(256, 8, 3, seed=2)
    heads = bigbird(256, 8, 3, seed=1, heads=4)
    assert len(heads) == 4 and heads[0] == a
    assert len({h.random_blocks.tobytes() for h in heads}) == 4  # heads draw independently


def test_bigbird_random_blocks_cover_candidates_uniformly():
    # every candidate block is drawn with frequency near r / (#candidates) over many seeds
    nb, r = 12, 2
    freq = np.zeros(nb)
    trials = 400
    for s in range(trials):
        freq += np.bincount(bigbird(nb, 1, r, seed=s).random_blocks[6], minlength=nb)
    candidates = [k for k in range(1, nb - 1) if abs(k - 6) > 1]  # 7 candidates
    expected = trials * r / len(candidates)
    assert set(np.flatnonzero(freq)) == set(candidates)
    assert np.all(np.abs(freq[candidates] - expected) < 0.25 * expected)


def test_bigbird_matches_hf_deterministic_structure():
    # Hugging Face's ITC in its block notation: q[0], q[-1] global; q[1] sees k[0..2], k[-1];
    # middle q[i] sees k[0], k[i-1..i+1], k[-1]; q[-2] sees k[0], k[-3..-1].
    nb = 9
    p = bigbird(nb * 2, 2, 0, seed=0).layout.toarray()
    expect = np.zeros((nb, nb), dtype=bool)
    expect[0] = expect[-1] = True
    expect[1, [0, 1, 2, nb - 1]] = True
    for i in range(2, nb - 2):
        expect[i, [0, i - 1, i, i + 1, nb - 1]] = True
    expect[nb - 2, [0, nb - 3, nb - 2, nb - 1]] = True
    np.testing.assert_array_equal(p, expect)


def test_bigbird_large_n_is_lazy():
    n, b, r = 1 << 20, 64, 3
    p = bigbird(n, b, r, seed=0)
    nb = n // b
    part = p.rows(5 * b, 5 * b + 10)
    # a middle row: 2 global + 3 window + r random blocks
    assert np.all(np.diff(part.indptr) == (2 + 3 + r) * b)
    assert p.rows(0, 1).nnz == n  # first block is global
    # block rows 1 and nb-2 have a global block inside their window: one block fewer
    assert p.nnz == 2 * b * n + b * b * (2 * (4 + r) + (nb - 4) * (5 + r))


# ------------------------------------------------------------------ dilated windows (existing builder)


def test_dilated_window_is_sliding_window_with_dilation():
    n, r, d = 30, 6, 3
    i, j = offsets(n)
    dense = (np.abs(j - i) <= r) & ((j - i) % d == 0)
    assert_pattern_equals_dense(sa.sliding_window(n, r, dilation=d), dense)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bigbird(30, 4, 1), ValueError, r"block_size=4 must divide n=30"),
        (lambda: bigbird(32, 4, -1), ValueError, r"num_random_blocks must be >= 0, got -1"),
        (lambda: bigbird(32, 4, 1, window_blocks=4), ValueError, r"window_blocks must be odd"),
        (lambda: bigbird(32, 4, 4), ValueError, r"num_random_blocks=4 but some query block has only 3"),
        (lambda: bigbird(32, 0, 1), ValueError, r"block_size must be >= 1"),
        (lambda: bigbird(32, 4, 1, num_global_blocks=-2), ValueError, r"num_global_blocks must be >= 0"),
        (lambda: bigbird(32, 4, 1, heads=0), ValueError, r"heads must be >= 1"),
        (lambda: bigbird(32.0, 4, 1), TypeError, r"n must be an integer, got 32.0"),
        (lambda: strided(10, 0), ValueError, r"stride must be >= 1, got 0"),
        (lambda: strided(10, 2, causal="yes"), TypeError, r"causal must be True or False"),
        (lambda: strided(10, 2, component="global"), ValueError, r"component must be one of"),
        (lambda: fixed(10, 4, 5), ValueError, r"num_summary=5 must be <= block=4"),
        (lambda: fixed(10, 4, 0), ValueError, r"num_summary must be >= 1"),
        (lambda: fixed(10, 8, 3, head=2), ValueError, r"allow at most 2 heads"),
        (lambda: fixed(10, 8, 3, heads=3), ValueError, r"allow at most 2 heads"),
        (lambda: block_sparse(np.ones(4), 2), ValueError, r"layout must be 2-D .* got shape \(4,\)"),
        (lambda: block_sparse(np.ones((2, 2)), 0), ValueError, r"block_size must be >= 1"),
        (lambda: block_sparse(np.ones((2, 2)), (1, 2, 3)), ValueError, r"pair \(bq, bk\)"),
        (lambda: block_sparse(np.array([["a"]]), 1), TypeError, r"layout must be boolean or numeric"),
    ],
)
def test_bad_preset_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_presets_are_registered_with_examples():
    for name in ("bigbird", "strided", "fixed", "block_sparse"):
        assert name in registry.available()
        assert registry.examples(name)
        for kw in registry.examples(name):
            assert isinstance(registry.get(name)(**kw), sa.Pattern)
    assert presets.bigbird is registry.get("bigbird")
