"""Patterns as runs: run algebra against brute-force masks and against CSR algebra, the run planner, the engine
on run patterns against the same patterns given as CSR, and the memory guard on nnz-sized arrays."""

import numpy as np
import pytest
import scipy.sparse as sp
from helpers import assert_canonical_csr
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn import _memory
from sparseattn._memory import InsufficientMemoryError
from sparseattn.engine.plan import build_plan
from sparseattn.patterns import runsets
from sparseattn.patterns.base import CSRPattern
from sparseattn.reference import dense_attention, dense_attention_backward

# -- brute-force definitions, written here independently of the builders ------------------------------


def dense_window(n, left, right, offset):
    i, j = np.indices((n, n))
    return (j - (i + offset) >= -left) & (j - (i + offset) <= right)


def dense_globals(n, g):
    m = np.zeros((n, n), bool)
    m[g, :] = True
    m[:, g] = True
    return m


def dense_docs(lengths):
    doc = np.repeat(np.arange(len(lengths)), lengths)
    return doc[:, None] == doc[None, :]


def dense_prefix(n, prefix):
    i, j = np.indices((n, n))
    return (j <= i) | (j < prefix)


@st.composite
def run_leaf(draw, n):
    kind = draw(st.sampled_from(["window", "causal", "globals", "docs", "prefix", "full", "grid"]))
    if kind == "window":
        left, right = draw(st.integers(0, n)), draw(st.integers(0, n))
        offset = draw(st.integers(-(n - 1), n - 1)) if n > 1 else 0
        return sa.sliding_window(n, left=left, right=right, offset=offset), dense_window(n, left, right, offset)
    if kind == "causal":
        return sa.causal(n), dense_window(n, n, 0, 0)
    if kind == "globals":
        g = draw(st.lists(st.integers(0, n - 1), max_size=4))
        return sa.global_tokens(n, g), dense_globals(n, g)
    if kind == "docs":
        cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=4)))) if n > 1 else []
        lengths = np.diff([0, *cuts, n])
        return sa.documents(lengths), dense_docs(lengths)
    if kind == "prefix":
        prefix = draw(st.integers(0, n))
        return sa.prefix_lm(n, prefix), dense_prefix(n, prefix)
    if kind == "grid" and n in (12, 16):
        shape = (3, 4) if n == 12 else (4, 4)
        k = draw(st.integers(1, 3))
        y, x = np.divmod(np.arange(n), shape[1])
        # NATTEN along each axis: a window of k positions, shifted inwards at the borders
        lo_y = np.clip(y - k // 2, 0, shape[0] - k)
        lo_x = np.clip(x - k // 2, 0, shape[1] - k)
        m = ((y[None, :] >= lo_y[:, None]) & (y[None, :] < lo_y[:, None] + k)
             & (x[None, :] >= lo_x[:, None]) & (x[None, :] < lo_x[:, None] + k))  # fmt: skip
        return sa.neighborhood(shape, k), m
    return sa.full(n), np.ones((n, n), bool)


@st.composite
def compositions(draw):
    n = draw(st.sampled_from([1, 2, 5, 12, 16, 23]))
    p, m = draw(run_leaf(n))
    csr = CSRPattern(*_csr_of(m), m.shape)  # the same algebra on explicit CSR operands
    for _ in range(draw(st.integers(1, 4))):
        q, qm = draw(run_leaf(n))
        qc = CSRPattern(*_csr_of(qm), qm.shape)
        if draw(st.booleans()):
            p, m, csr = p | q, m | qm, csr | qc
        else:
            p, m, csr = p & q, m & qm, csr & qc
    return p, m, csr


def _csr_of(m):
    c = sp.csr_array(m)
    c.sort_indices()
    return c.indptr, c.indices


def _assert_canonical_runs(ptr, lo, hi, n_rows, n_k):
    assert len(ptr) == n_rows + 1 and ptr[0] == 0 and np.all(np.diff(ptr) >= 0) and ptr[-1] == len(lo) == len(hi)
    assert np.all(hi > lo) and np.all(lo >= 0) and np.all(hi <= n_k)
    same_row = np.diff(np.repeat(np.arange(n_rows), np.diff(ptr))) == 0
    assert np.all(lo[1:][same_row] > hi[:-1][same_row]), "runs of a row overlap or touch"


@settings(max_examples=150, deadline=None)
@given(compositions())
def test_run_algebra_equals_dense_and_csr_algebra(case):
    p, m, csr = case
    assert p.has_runs
    n = m.shape[0]
    ptr, lo, hi = p.row_runs()
    _assert_canonical_runs(ptr, lo, hi, n, n)
    assert_canonical_csr(p.csr, m.shape)
    np.testing.assert_array_equal(p.csr.toarray(), m)
    assert p.nnz == int(m.sum()) == csr.nnz
    np.testing.assert_array_equal(csr.csr.toarray(), m)  # CSR algebra, the old route
    assert p == csr and csr == p
    # any row range gives the same runs as the whole
    a, b = n // 3, n - n // 4
    sub = p.row_runs(a, b)
    whole = runsets._slice((ptr, lo, hi), a, b)
    for x, y in zip(sub, whole):
        np.testing.assert_array_equal(x, y)


@settings(max_examples=60, deadline=None)
@given(compositions(), st.integers(0, 2**31))
def test_csr_and_runs_intersection_filters_the_csr(case, seed):
    p, m, _ = case
    n = m.shape[0]
    rnd = np.random.default_rng(seed).random(m.shape) < 0.4
    other = sa.from_dense(rnd)
    both = other & p
    np.testing.assert_array_equal(both.csr.toarray(), rnd & m)
    assert_canonical_csr(both.csr, (n, n))


def test_csr_operand_never_expands_the_run_operand(monkeypatch):
    n = 4096
    docs = sa.from_sparse(sp.block_diag([np.ones((256, 256), bool)] * 16, format="csr"))
    causal = sa.causal(n)

    def no(*args, **kwargs):
        raise AssertionError("the run operand was expanded")

    monkeypatch.setattr(type(causal), "_rows", no)
    monkeypatch.setattr(runsets, "expand", no)
    got = (docs & causal).csr
    blocks = np.arange(n) // 256
    i, j = np.indices((n, n))
    np.testing.assert_array_equal(got.toarray(), (blocks[:, None] == blocks[None, :]) & (j <= i))


def test_csr_of_runs_is_canonical_int32_and_fast_path_matches_the_definition():
    n = 2048
    p = sa.sliding_window(n, 64) | sa.global_tokens(n, range(8))
    m = p.csr
    assert_canonical_csr(m, (n, n))
    np.testing.assert_array_equal(m.toarray(), dense_window(n, 64, 64, 0) | dense_globals(n, list(range(8))))


def test_row_runs_bad_input():
    with pytest.raises(TypeError, match="not a run pattern"):
        sa.random_pattern(4, 4, 2).row_runs()
    with pytest.raises(ValueError, match=r"row range \[start, stop\)"):
        sa.causal(4).row_runs(3, 2)
    with pytest.raises(TypeError, match="stop must be an integer"):
        sa.causal(4).row_runs(0, 2.0)
    assert not sa.sliding_window(8, 4, dilation=2).has_runs
    assert not (sa.causal(8) | sa.random_pattern(8, 8, 2)).has_runs


# -- memory guard ------------------------------------------------------------------------------------


def test_csr_of_a_large_run_pattern_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(_memory, "available_bytes", lambda: 64 << 20)
    rng = np.random.default_rng(0)
    n = 65536
    lengths = np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, n), 63, replace=False)), n])
    p = sa.documents(lengths) & sa.causal(n)
    plan = build_plan(p)  # planned from the runs: no CSR needed
    assert plan.kind == "runs" and plan.nnz == p.nnz
    with pytest.raises(InsufficientMemoryError, match=r"building the CSR of <Intersection \(documents\(64 documents\)"):
        p.csr
    big = sa.from_sparse(sp.block_diag([np.ones((2048, 2048), bool)] * 8, format="csr"))
    with pytest.raises(InsufficientMemoryError, match=r"building the CSR of <Union \(\(nnz=33554432 & window"):
        (big & sa.causal(big.shape[0]) | sa.global_tokens(big.shape[0], [0])).csr


# -- the planner reads runs ----------------------------------------------------------------------------


RUN_CASES = {
    "docs&causal": lambda: sa.documents([7, 60, 3, 90, 40]) & sa.causal(200),
    "docs&window|globals": lambda: (sa.documents([50, 150]) & sa.sliding_window(200, 20)) | sa.global_tokens(200, [0, 1, 120]),
    "prefix_lm": lambda: sa.prefix_lm(150, 40),
    "grid": lambda: sa.neighborhood((12, 16), (3, 5)),
    "grid3d": lambda: sa.neighborhood((4, 6, 8), (3, 3, 5), causal=(True, False, False)),
    "causal offset": lambda: sa.causal(100, 30, n_k=180),
    "full": lambda: sa.full(70, n_k=90),
}


@pytest.mark.parametrize("name", sorted(RUN_CASES))
def test_run_plan_equals_the_csr_plan_and_covers(name):
    p = RUN_CASES[name]()
    plan = build_plan(p)
    assert plan.kind in ("runs", "structured")
    rows, cols = plan.entries()
    got = sp.csr_array((np.ones(len(rows), bool), (rows, cols)), shape=p.shape)
    assert got.nnz == len(rows) == p.nnz  # every entry once
    np.testing.assert_array_equal(got.toarray(), p.to_dense())
    if plan.kind == "runs":
        csr_plan = build_plan(CSRPattern(p.csr.indptr, p.csr.indices, p.shape))
        for field in ("tile_k0", "tile_k1", "row_lo", "row_hi", "xs_ptr", "xs_k0", "xs_k1", "xs_lo", "xs_hi",
                      "sh_ptr", "sh_cols", "sh_mask", "rs_ptr", "rs_lo", "rs_hi", "long_rows", "it_a", "it_b"):  # fmt: skip
            np.testing.assert_array_equal(getattr(plan, field), getattr(csr_plan, field), err_msg=field)


def test_tile_straddling_two_documents_keeps_a_span():
    p = sa.documents([1000, 1000]) & sa.causal(2000)
    plan = build_plan(p, tile_rows=64)
    t = 990 // 64  # rows 960..1023 hold the end of document 0 and the start of document 1
    assert plan.tile_k1[t] > plan.tile_k0[t]
    rows, cols = plan.entries()
    assert len(rows) == p.nnz


# -- the engine on run patterns equals the same pattern as CSR, every path, both directions -----------


@pytest.mark.parametrize("path", ["fused", "staged", "blocked"])
def test_engine_on_runs_equals_csr_every_path(path):
    rng = np.random.default_rng(3)
    n, d, h = 96, 8, 2
    runs = [sa.documents([30, 50, 16]) & sa.causal(n), sa.neighborhood((8, 12), 3) | sa.global_tokens(n, [5])]
    as_csr = [sa.from_sparse(p.csr) for p in runs]
    q, k, v = (rng.standard_normal((2, h, n, d)).astype(np.float64) for _ in range(3))
    pad = np.zeros((2, n), bool)
    pad[1, -7:] = True
    go = rng.standard_normal((2, h, n, d))
    res = []
    for pats in (runs, as_csr):
        out, lse = sa.sparse_attention(q, k, v, pats, key_padding_mask=pad, return_lse=True, path=path)
        grads = sa.sparse_attention_backward(go, q, k, v, pats, out, lse, key_padding_mask=pad, path=path)
        res.append((out, lse, *grads))
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    ref = dense_attention(q, k, v, as_csr, key_padding_mask=pad)
    np.testing.assert_allclose(res[0][0], ref, rtol=1e-9, atol=1e-10)
    ref_grads = dense_attention_backward(go, q, k, v, as_csr, key_padding_mask=pad)
    for a, b in zip(res[0][2:], ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
