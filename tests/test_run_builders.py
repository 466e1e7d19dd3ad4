"""The builders of "Patterns as runs" against dense definitions written here with plain loops.

full, documents (lengths, cu_seqlens, position ids), prefix_lm, neighborhood (NATTEN's rule: shifted windows,
dilation groups, causal axes, even kernels), from_indices (top-k lists) and from_predicate (mask_mod); their
row ranges, their composition, the engine on every path, the CLI and the argument errors.
"""

import itertools
import tracemalloc

import numpy as np
import pytest
from helpers import assert_canonical_csr, assert_pattern_equals_dense
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.cli import main
from sparseattn.engine import paths
from sparseattn.reference import dense_attention, dense_attention_backward

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)

# ---------------------------------------------------------------- dense definitions, loop by loop


def dense_documents(lengths):
    doc_of = []
    for d, length in enumerate(lengths):
        doc_of += [d] * length
    n = len(doc_of)
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = doc_of[i] == doc_of[j]
    return m


def dense_prefix_lm(n, prefix):
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = (i < prefix and j < prefix) or (i >= prefix and j <= i)
    return m


def natten_axis(xq, xk, length, k, d, causal):
    """NATTEN's rule along one axis: does query position ``xq`` see key position ``xk``?"""
    if xq % d != xk % d:
        return False
    group = [p for p in range(length) if p % d == xq % d]  # the dilation group, in order
    a, b = group.index(xq), group.index(xk)
    if causal:
        return a - k < b <= a  # the k positions ending at the query, cut at the start
    start = a - k // 2  # k // 2 before the query (even k: one more before than after)
    if start < 0:
        start = 0  # shifted right at the start ...
    if start + k > len(group):
        start = len(group) - k  # ... and left at the end
    return start <= b < start + k


def dense_neighborhood(shape, ks, dil, causal):
    cells = list(itertools.product(*[range(s) for s in shape]))  # row-major order
    n = len(cells)
    m = np.zeros((n, n), dtype=bool)
    for qi, cq in enumerate(cells):
        for ki, ck in enumerate(cells):
            m[qi, ki] = all(
                natten_axis(cq[a], ck[a], shape[a], ks[a], dil[a], causal[a]) for a in range(len(shape))
            )
    return m


def dense_topk(indices, n_k):
    m = np.zeros((len(indices), n_k), dtype=bool)
    for i, row in enumerate(indices):
        for j in row:
            if j != -1:
                m[i, j] = True
    return m


def check_rows(p, dense, rng):
    for _ in range(4):
        a = int(rng.integers(0, dense.shape[0] + 1))
        b = int(rng.integers(a, dense.shape[0] + 1))
        part = p.rows(a, b)
        assert_canonical_csr(part, (b - a, dense.shape[1]))
        np.testing.assert_array_equal(part.toarray(), dense[a:b])
        np.testing.assert_array_equal(p._row_counts(a, b), dense[a:b].sum(axis=1))


# ---------------------------------------------------------------- full, documents, prefix-LM


@pytest.mark.parametrize("n,n_k", [(0, 0), (1, 1), (4, 4), (3, 7), (6, 2), (5, 0)])
def test_full(n, n_k):
    p = sa.full(n, n_k=n_k)
    assert_pattern_equals_dense(p, np.ones((n, n_k), dtype=bool))
    assert p.T == sa.full(n_k, n_k=n) and p.T.shape == (n_k, n)


lengths_st = st.lists(st.integers(1, 7), min_size=1, max_size=6)


@SETTINGS
@given(lengths_st, st.integers(0, 2**31))
def test_documents_three_spellings_agree_with_the_definition(lengths, seed):
    dense = dense_documents(lengths)
    cu = [0] + list(itertools.accumulate(lengths))
    pos = [t for length in lengths for t in range(length)]
    a, b, c = sa.documents(lengths), sa.from_cu_seqlens(cu), sa.from_position_ids(pos)
    for p in (a, b, c, sa.from_position_ids(np.array([pos])), sa.documents(np.array(lengths, dtype=np.int32))):
        assert_pattern_equals_dense(p, dense)
        assert p.identity == a.identity and p == a and hash(p) == hash(a)
    check_rows(a, dense, np.random.default_rng(seed))
    assert a.T is a


@SETTINGS
@given(lengths_st, st.integers(0, 4), st.lists(st.integers(0, 40), max_size=2))
def test_documents_compose_with_causal_windows_and_globals(lengths, radius, globs):
    n = sum(lengths)
    docs, dense = sa.documents(lengths), dense_documents(lengths)
    causal = np.tril(np.ones((n, n), dtype=bool))
    assert_pattern_equals_dense(docs & sa.causal(n), dense & causal)
    band = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= radius
    assert_pattern_equals_dense(docs & sa.sliding_window(n, radius), dense & band)
    g = sorted({x % n for x in globs})
    gm = np.zeros((n, n), dtype=bool)
    gm[g, :] = gm[:, g] = True
    assert_pattern_equals_dense((docs & sa.causal(n)) | sa.global_tokens(n, g), (dense & causal) | gm)


@SETTINGS
@given(st.integers(0, 12), st.data())
def test_prefix_lm(n, data):
    prefix = data.draw(st.integers(0, n))
    p = sa.prefix_lm(n, prefix)
    dense = dense_prefix_lm(n, prefix)
    assert_pattern_equals_dense(p, dense)
    check_rows(p, dense, np.random.default_rng(n))
    assert sa.prefix_lm(n, 0) == sa.causal(n) and sa.prefix_lm(n, n) == sa.full(n)
    assert p == sa.from_predicate(lambda i, j: (j <= i) | (j < prefix), n, n)


def test_prefix_lm_grid():
    assert sa.prefix_lm(4, 2).to_string().splitlines()[1:] == ["T1  *  *", "T2  *  *", "T3  *  *  *", "T4  *  *  *  *"]


# ---------------------------------------------------------------- neighborhood (NATTEN)


@st.composite
def grids(draw):
    axes = draw(st.integers(1, 3))
    shape, ks, dil, causal = [], [], [], []
    for _ in range(axes):
        length = draw(st.integers(1, 9 if axes == 1 else (6 if axes == 2 else 4)))
        d = draw(st.integers(1, length))
        k = draw(st.integers(1, length // d))
        shape.append(length), ks.append(k), dil.append(d), causal.append(draw(st.booleans()))
    return tuple(shape), tuple(ks), tuple(dil), tuple(causal)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(grids())
def test_neighborhood_against_natten_rule(case):
    shape, ks, dil, causal = case
    p = sa.neighborhood(shape, ks, dilation=dil, causal=causal)
    dense = dense_neighborhood(shape, ks, dil, causal)
    assert_pattern_equals_dense(p, dense)
    check_rows(p, dense, np.random.default_rng(sum(shape)))
    if not any(causal):  # shifted, not cut: every query sees exactly prod(kernel_size) keys
        assert np.all(dense.sum(axis=1) == np.prod(ks))
    if p.has_runs:  # the runs, from NumPy and from the Numba kernel, on a random row block
        rng = np.random.default_rng(len(shape) + sum(ks))
        a = int(rng.integers(0, dense.shape[0] + 1))
        b = int(rng.integers(a, dense.shape[0] + 1))
        for numba in (False, True):
            ptr, lo, hi = runs_by(p, a, b, numba)
            assert len(ptr) == b - a + 1 and np.all(hi > lo)  # non-empty runs
            got = np.zeros((b - a, dense.shape[1]), dtype=bool)
            for r in range(b - a):
                for k in range(ptr[r], ptr[r + 1]):
                    got[r, lo[k] : hi[k]] = True
                    if k > ptr[r]:
                        assert lo[k] > hi[k - 1]  # ascending, disjoint and not touching (canonical)
            np.testing.assert_array_equal(got, dense[a:b])


def runs_by(p, a, b, numba):
    """The pattern's runs of rows a:b from the Numba kernel or from NumPy (whatever the kernel's state)."""
    from sparseattn.patterns import grids as g

    saved = g._NUMBA_ROWS, g._grid_runs_compiled
    g._NUMBA_ROWS, g._grid_runs_compiled = (0, saved[1]) if numba else (1 << 62, lambda: False)
    try:
        return p._runs(a, b)
    finally:
        g._NUMBA_ROWS, g._grid_runs_compiled = saved


@pytest.mark.parametrize(
    "shape,k,d,causal",
    [
        (8, 4, 1, False),  # even kernel: two before, one after
        (8, 2, 1, False),
        (10, 4, 2, False),  # even kernel in dilation groups of different lengths (5 and 5)
        (11, 3, 3, False),  # groups of 4, 4 and 3
        ((5, 6), (4, 2), (1, 3), (False, False)),
        ((4, 7), 3, (1, 2), (True, False)),
        ((3, 3, 4), (3, 2, 2), (1, 1, 2), (False, True, False)),
        (7, 7, 1, False),  # kernel = axis: full
        (9, 3, 3, True),
    ],
)
def test_neighborhood_cases(shape, k, d, causal):
    p = sa.neighborhood(shape, k, dilation=d, causal=causal)
    shp = (shape,) if isinstance(shape, int) else shape
    per = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * len(shp)
    assert_pattern_equals_dense(p, dense_neighborhood(shp, per(k), per(d), per(causal)))


def test_neighborhood_even_kernel_window_is_left_heavy():
    # NATTEN: window_left = k // 2, window_right = k // 2 - 1 for even k
    rows = sa.neighborhood(8, 4).to_dense()
    assert np.flatnonzero(rows[4]).tolist() == [2, 3, 4, 5]
    assert np.flatnonzero(rows[0]).tolist() == [0, 1, 2, 3] and np.flatnonzero(rows[7]).tolist() == [4, 5, 6, 7]


def test_neighborhood_equals_its_1d_definitions():
    assert sa.neighborhood(9, 9) == sa.full(9)
    assert sa.neighborhood(9, 9, causal=True) == sa.causal(9)
    assert sa.neighborhood(12, 3, causal=True) == sa.causal(12, 2)
    assert sa.neighborhood((1, 9), (1, 3)) == sa.neighborhood(9, 3)
    assert sa.neighborhood([4, 4], [3, 3]) == sa.neighborhood((4, 4), 3)


def test_large_grid_rows_without_a_dense_grid():
    p = sa.neighborhood((512, 512, 4), (7, 7, 3), dilation=(2, 1, 1))  # a million tokens
    tracemalloc.start()
    part = p.rows(300_000, 300_256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20
    assert np.all(np.diff(part.indptr) == 147)
    assert_canonical_csr(part)
    docs = sa.documents(np.full(1 << 12, 256))
    assert docs.nnz == (1 << 12) * 256 * 256 and docs.rows(1 << 19, (1 << 19) + 3).indices[0] == 1 << 19


# ---------------------------------------------------------------- top-k lists and predicates


@SETTINGS
@given(st.integers(1, 9), st.integers(0, 9), st.integers(0, 5), st.integers(0, 2**31))
def test_from_indices_with_padding_and_duplicates(n_q, n_k, k, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(-1, max(n_k, 1), size=(n_q, k)) if n_k else np.full((n_q, k), -1)
    p = sa.from_indices(idx, n_k)
    dense = dense_topk(idx.tolist(), n_k)
    assert_pattern_equals_dense(p, dense)
    check_rows(p, dense, rng)
    heads = sa.from_indices(np.stack([idx, idx[::-1]]), n_k)
    assert isinstance(heads, list) and len(heads) == 2
    assert_pattern_equals_dense(heads[1], dense_topk(idx[::-1].tolist(), n_k))


def test_predicates_document_and_causal_masks():
    doc = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    n = len(doc)
    p = sa.from_predicate(lambda i, j: doc[i] == doc[j], n, n)
    assert p == sa.documents([3, 2, 4])
    c = sa.from_predicate(lambda i, j: (doc[i] == doc[j]) & (j <= i), n, n)
    assert_pattern_equals_dense(c, dense_documents([3, 2, 4]) & np.tril(np.ones((n, n), dtype=bool)))
    assert c == sa.documents([3, 2, 4]) & sa.causal(n)
    assert c.identity == sa.from_dense(c.to_dense()).identity  # a content digest


def test_predicate_is_evaluated_in_bounded_row_blocks(monkeypatch):
    from sparseattn.patterns import explicit

    monkeypatch.setattr(explicit, "PREDICATE_BLOCK", 64)
    seen = []

    def causal(i, j):
        seen.append(i.shape[0] * j.shape[1])
        return j <= i

    assert sa.from_predicate(causal, 50, 30) == sa.from_dense(np.tril(np.ones((50, 30), dtype=bool)))
    assert max(seen) <= 64 and sum(seen) == 50 * 30


# ---------------------------------------------------------------- the engine on every path


def _heads():
    n = 36
    return n, [
        sa.documents([10, 1, 15, 10]) & sa.causal(n),
        sa.prefix_lm(n, 7),
        sa.neighborhood((6, 6), (3, 2), dilation=(2, 1), causal=(False, True)),
        sa.from_indices(np.random.default_rng(1).integers(-1, n, size=(n, 5)), n),
        sa.from_predicate(lambda i, j: (i + j) % 4 == 0, n, n) | sa.full(n) & sa.sliding_window(n, 1),
    ]


@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_every_path_equals_the_reference(name):
    n, heads = _heads()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, len(heads), n, 8))
    k, v = (rng.standard_normal((2, len(heads), n, 8)) for _ in range(2))
    kpm = np.zeros((2, n), dtype=bool)
    kpm[1, 30:] = True  # key padding on the second batch row
    for pattern in (heads, heads[2]):  # per head, and one pattern for every head
        out, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, path=name)
        ref = dense_attention(q, k, v, pattern, key_padding_mask=kpm)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)
        go = rng.standard_normal(out.shape)
        grads = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, key_padding_mask=kpm, path=name)
        for g, r in zip(grads, dense_attention_backward(go, q, k, v, pattern, key_padding_mask=kpm)):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- the command line


def test_cli_show_prefix_lm(capsys):
    assert main(["show", "prefix_lm", "--n", "6", "--prefix", "2"]) == 0
    out = capsys.readouterr().out
    assert "nnz 22" in out
    assert out.rstrip().splitlines()[-6:] == [
        "T1  *  *",
        "T2  *  *",
        "T3  *  *  *",
        "T4  *  *  *  *",
        "T5  *  *  *  *  *",
        "T6  *  *  *  *  *  *",
    ]


def test_cli_neighborhood_takes_per_axis_tuples(capsys):
    argv = ["show", "neighborhood", "--shape", "4", "5", "--kernel-size", "3,2", "--dilation", "1", "2", "--causal", "true", "false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expect = sa.neighborhood((4, 5), (3, 2), dilation=(1, 2), causal=(True, False))
    assert f"nnz {expect.nnz}" in out and "causal=(True, False)" in out
    assert main(["show", "neighborhood", "--shape", "5", "--kernel-size", "3", "--causal"]) == 0
    assert f"nnz {sa.neighborhood(5, 3, causal=True).nnz}" in capsys.readouterr().out


def test_cli_documents_and_receptive(capsys):
    assert main(["show", "from_cu_seqlens", "--cu-seqlens", "0", "2", "5"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "T5        *  *  *"
    assert main(["receptive", "neighborhood", "--shape", "64", "--kernel-size", "5", "--layers", "3"]) == 0
    out = capsys.readouterr().out
    assert "neighborhood(shape=64, kernel_size=5)" in out and "layer" in out


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,exc,needle",
    [
        (lambda: sa.documents([]), ValueError, "lengths must be a non-empty"),
        (lambda: sa.documents([3, 0, 2]), ValueError, r"lengths must be positive integers, got lengths\[1\] = 0"),
        (lambda: sa.documents([2.0, 3.0]), TypeError, "lengths must hold integers"),
        (lambda: sa.documents(5), TypeError, "lengths must be a sequence"),
        (lambda: sa.from_cu_seqlens([1, 3]), ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\] = 1"),
        (lambda: sa.from_cu_seqlens([0, 3, 3]), ValueError, r"strictly increasing, got cu_seqlens\[1\] = 3 and cu_seqlens\[2\] = 3"),
        (lambda: sa.from_cu_seqlens([0]), ValueError, "at least two entries"),
        (lambda: sa.from_position_ids([0.0, 1.0]), TypeError, "position_ids must hold integers"),
        (lambda: sa.from_position_ids([1, 2, 0]), ValueError, "position_ids must start at 0"),
        (lambda: sa.from_position_ids(np.zeros((2, 3), int)), ValueError, r"one packed row.*\(2, 3\)"),
        (lambda: sa.prefix_lm(5, 6), ValueError, r"prefix must lie in \[0, n\] = \[0, 5\], got 6"),
        (lambda: sa.prefix_lm(5, -1), ValueError, "prefix must lie in"),
        (lambda: sa.neighborhood(5, 6), ValueError, r"kernel_size 6 is larger than axis 0 of shape \(5,\)"),
        (lambda: sa.neighborhood((8, 8), 3, dilation=(3, 1)), ValueError, r"kernel_size \* dilation = 3 \* 3 = 9 exceeds axis 0"),
        (lambda: sa.neighborhood((8, 8), (3, 3, 3)), ValueError, "kernel_size has 3 entries but shape has 2 axes"),
        (lambda: sa.neighborhood((8, 8), 3, causal=(True,)), ValueError, "causal has 1 entries but shape has 2 axes"),
        (lambda: sa.neighborhood((2, 2, 2, 2), 1), ValueError, "1 to 3 axis lengths"),
        (lambda: sa.neighborhood(8, 0), ValueError, "kernel_size must be >= 1"),
        (lambda: sa.neighborhood(8, 2.0), TypeError, "kernel_size must be an integer"),
        (lambda: sa.neighborhood(8, 3, causal=1), TypeError, "causal must be a bool"),
        (lambda: sa.from_indices([[0, 5]], 5), ValueError, r"indices must lie in \[0, n_k\) = \[0, 5\) or be -1.*= 5"),
        (lambda: sa.from_indices([[0, -2]], 5), ValueError, r"indices\[0, 1\] = -2"),
        (lambda: sa.from_indices([[0.0, 1.0]], 5), TypeError, "indices must hold integers"),
        (lambda: sa.from_indices([0, 1], 5), ValueError, r"shape \(n_q, k\) or \(h, n_q, k\), got shape \(2,\)"),
        (lambda: sa.from_predicate("j <= i", 3, 3), TypeError, "fn must be a callable"),
    ],
)
def test_bad_input(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


def test_bad_predicates_name_fn_and_what_it_returned():
    def wrong_shape(i, j):
        return j < 2

    def wrong_dtype(i, j):
        return (i + j).astype(np.int8)

    with pytest.raises(ValueError, match=r"fn=.*wrong_shape returned shape \(1, 4\) for rows \[0, 3\); expected a boolean array of shape \(rows, n_k\) = \(3, 4\)"):
        sa.from_predicate(wrong_shape, 3, 4)
    with pytest.raises(TypeError, match=r"fn=.*wrong_dtype returned dtype int8 .*expected a boolean array"):
        sa.from_predicate(wrong_dtype, 3, 4)
    with pytest.raises(TypeError, match=r"returned a list"):
        sa.from_predicate(lambda i, j: [[True]], 1, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: sa.documents([40, 100, 52, 64]) & sa.causal(n),
        lambda n: sa.neighborhood((16, 16), 5, dilation=2),
        lambda n: sa.prefix_lm(n, 30) | sa.global_tokens(n, [100]),
    ],
    ids=["documents&causal", "neighborhood", "prefix_lm|global"],
)
def test_dask_equals_the_local_engine(make):
    """The Dask adapter plans these from their rows (its generic path): same result as the local engine."""
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")
    from sparseattn.dask import sparse_attention as dask_attention

    n = 256
    p = make(n)
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, n, 16)) for _ in range(3))
    lazy = dask_attention(*(da.from_array(x, chunks=(1, 64, 16)) for x in (q, k, v)), p)
    with dask.config.set(scheduler="synchronous"):
        got = lazy.compute()
    np.testing.assert_allclose(got, sa.sparse_attention(q, k, v, p), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, dense_attention(q, k, v, p), rtol=1e-9, atol=1e-11)
