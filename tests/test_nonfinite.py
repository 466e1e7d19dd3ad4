"""The non-finite policy: IEEE arithmetic over each row's allowed keys, the same on every path and in the reference.

A NaN or an infinity is put into one element of q, k or v of one slice, at a
band key, a global key or a padded key; every path's output and
log-sum-exp must match the float64 reference class by class (NaN, +inf,
-inf, finite values close), the rows that cannot see the bad element must
equal the result for clean inputs, and the rows that do see it must show it
as the policy says (NaN row for a bad query, NaN where a NaN key or value is
attended, never zeros).
"""

import numpy as np
import pytest
from helpers import NF_BAND as BAND
from helpers import NF_COL as COL
from helpers import NF_D as D
from helpers import NF_GLOBAL as GLOBAL
from helpers import NF_N as N
from helpers import NF_PADDED as PADDED
from helpers import NF_SLICE as SLICE
from helpers import assert_same_classes, nf_pattern_and_padding

import sparseattn as sa
from sparseattn.reference import dense_attention

PATTERN, KPM = nf_pattern_and_padding()
TOL = {np.float32: 2e-5, np.float64: 1e-11}


def inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 2, N, D)).astype(dtype) for _ in range(3)]


def attends(key):
    """Rows of slice SLICE that attend ``key`` (pattern and padding)."""
    if KPM[SLICE[0], key]:
        return np.zeros(N, bool)
    return PATTERN.csr.toarray()[:, key]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["band", "global", "padded"])
@pytest.mark.parametrize("array", ["q", "k", "v"])
def test_nonfinite_policy_on_every_path(dtype, value, where, array):
    pos = {"band": BAND, "global": GLOBAL, "padded": PADDED}[where]
    clean = inputs(dtype)
    clean_ref = dense_attention(*clean, PATTERN, key_padding_mask=KPM)
    q, k, v = (x.copy() for x in clean)
    x = {"q": q, "k": k, "v": v}[array]
    x[SLICE + (pos, COL)] = value
    copies = [a.copy() for a in (q, k, v)]
    ref, ref_lse = dense_attention(q, k, v, PATTERN, key_padding_mask=KPM, return_lse=True)

    # which rows may change: the bad query row, or the rows attending the bad key
    hit = np.zeros((2, 2, N), bool)
    hit[SLICE] = (np.arange(N) == pos) if array == "q" else attends(pos)
    np.testing.assert_allclose(ref[~hit], clean_ref[~hit], rtol=1e-12, atol=1e-12)  # no leak in the reference
    rows = ref[SLICE][hit[SLICE]]
    assert rows.size > 0 or (where == "padded" and array != "q")  # a padded key reaches no row
    if array == "q" or (array == "k" and np.isnan(value)):
        assert np.isnan(rows).all()  # the row becomes NaN, never zeros
        assert np.isnan(ref_lse[SLICE][hit[SLICE]]).all()
    elif array == "v" and rows.size:
        # attended with a positive weight: the bad value shows in its column, the other columns stay finite
        expect = np.full(len(rows), value)
        np.testing.assert_array_equal(rows[:, COL], expect)
        assert np.isfinite(np.delete(rows, COL, axis=1)).all()
    elif array == "k" and rows.size:
        # score +inf gives a NaN row (inf - inf); -inf gives weight 0; NaN (inf * 0) a NaN row
        assert (np.isnan(rows).all(axis=1) | np.isfinite(rows).all(axis=1)).all()

    for path in ("fused", "staged", "blocked"):
        out, lse = sa.sparse_attention(q, k, v, PATTERN, key_padding_mask=KPM, return_lse=True, path=path)
        for a, c in zip((q, k, v), copies):
            np.testing.assert_array_equal(a, c)
        assert out.dtype == dtype
        assert_same_classes(out, ref, TOL[dtype])
        assert_same_classes(lse, ref_lse, TOL[dtype])


@pytest.mark.parametrize("path", ["fused", "staged", "blocked"])
def test_all_scores_minus_inf_give_nan_not_an_empty_row(path):
    # k[0] = -inf in one coordinate and q > 0 there: the only allowed score is -inf (-inf - -inf is NaN)
    q = np.ones((3, 4))
    k = np.ones((3, 4))
    v = np.ones((3, 4))
    k[0, 0] = -np.inf
    p = sa.from_dense(np.eye(3, dtype=bool))
    out, lse = sa.sparse_attention(q, k, v, p, path=path, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, p, return_lse=True)
    assert np.isnan(out[0]).all() and np.isnan(lse[0]) and np.isnan(ref[0]).all() and np.isnan(ref_lse[0])
    np.testing.assert_allclose(out[1:], 1.0)
    # an empty row stays zeros with lse -inf, even next to non-finite inputs
    p2 = sa.from_dense(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 1]], bool))
    out, lse = sa.sparse_attention(q, k, v, p2, path=path, return_lse=True)
    assert (out[0] == 0).all() and lse[0] == -np.inf


def test_finite_slices_stay_on_the_fused_path_result():
    q, k, v = inputs(np.float32, seed=3)
    clean = sa.sparse_attention(q, k, v, PATTERN, path="fused")
    k[1, 1, BAND, 0] = np.nan
    out = sa.sparse_attention(q, k, v, PATTERN, path="fused")
    np.testing.assert_array_equal(out[0], clean[0])
    np.testing.assert_array_equal(out[1, 0], clean[1, 0])


@pytest.mark.parametrize("array,index", [("q", (1, 0, 7, 2)), ("k", (0, 1, 69, 15)), ("v", (1, 1, 0, 0))])
def test_check_finite_names_the_array_and_index(array, index):
    q, k, v = inputs(np.float64, seed=1)
    {"q": q, "k": k, "v": v}[array][index] = np.inf
    with pytest.raises(ValueError, match=rf"^{array} holds a non-finite value \(inf\) at index \({', '.join(map(str, index))}\)"):
        sa.sparse_attention(q, k, v, PATTERN, check_finite=True)
    sa.sparse_attention(*inputs(np.float64), PATTERN, check_finite=True)  # finite: computes


def test_check_finite_index_of_a_broadcast_input():
    q, k, v = inputs(np.float32, seed=2)
    kb = k[:, :1].copy()  # (2, 1, N, D), shared by the heads
    kb[1, 0, 9, 4] = np.nan
    with pytest.raises(ValueError, match=r"^k holds a non-finite value \(nan\) at index \(1, 0, 9, 4\) \(shape \(2, 1, 70, 16\)\)"):
        sa.sparse_attention(q, kb, v, PATTERN, check_finite=True)


def test_scale_must_be_finite_in_the_compute_dtype():
    q, k, v = inputs(np.float32)
    with pytest.raises(ValueError, match=r"scale=1e\+39 is not finite in float32"):
        sa.sparse_attention(q, k, v, PATTERN, scale=1e39)
    with pytest.raises(ValueError, match=r"scale=1e\+39 is not finite in float32"):
        dense_attention(q, k, v, PATTERN, scale=1e39)
    out = sa.sparse_attention(*(x.astype(np.float64) for x in (q, k, v)), PATTERN, scale=1e39)
    ref = dense_attention(*(x.astype(np.float64) for x in (q, k, v)), PATTERN, scale=1e39)
    assert_same_classes(out, ref, 1e-9)
