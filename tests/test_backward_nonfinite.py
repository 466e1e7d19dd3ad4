"""The backward's non-finite policy: the forward's, carried through the gradients.

A NaN or an infinity goes into one element of q, k, v or grad_out of one
slice, at a band, a global or a padded position; every backward path (fused, staged, blocked) must
match the float64 row-by-row reference (``dense_attention_backward``) class by
class (NaN, +inf, -inf, finite values close).  The gradients of rows and keys
that never meet the bad element must equal those of clean inputs (no leak,
e.g. no ``0 * inf`` from a pair outside the pattern or a padded key), and the
other slices must be untouched: they stay on the fused kernels.
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
from sparseattn.reference import dense_attention_backward

PATTERN, KPM = nf_pattern_and_padding()
#: relative to the gradient's largest finite entry
TOL = {np.float32: 2e-4, np.float64: 1e-9}


def inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 2, N, D)).astype(dtype) for _ in range(4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["band", "global", "padded"])
@pytest.mark.parametrize("array", ["q", "k", "v", "grad_out"])
def test_backward_nonfinite_policy_on_every_path(dtype, value, where, array):
    pos = {"band": BAND, "global": GLOBAL, "padded": PADDED}[where]
    q, k, v, go = inputs(dtype)
    clean_ref = dense_attention_backward(go, q, k, v, PATTERN, key_padding_mask=KPM)
    x = {"q": q, "k": k, "v": v, "grad_out": go}[array]
    x[SLICE + (pos, COL)] = value
    out, lse = sa.sparse_attention(q, k, v, PATTERN, key_padding_mask=KPM, return_lse=True)
    ref = dense_attention_backward(go, q, k, v, PATTERN, key_padding_mask=KPM)

    # the reference leaks nothing: the other slices, and in the bad slice the rows/keys that never meet
    # the bad element, keep the clean gradients
    mask = PATTERN.csr.toarray() & ~KPM[SLICE[0]][None, :]
    rows = (np.arange(N) == pos) if array in ("q", "grad_out") else mask[:, pos]
    keys = mask[rows].any(axis=0)  # keys those rows attend
    for name, g, c in zip(("dq", "dk", "dv"), ref, clean_ref):
        other = np.ones(g.shape[:2], bool)
        other[SLICE] = False
        np.testing.assert_allclose(g[other], c[other], rtol=1e-12, atol=1e-12, err_msg=name)
        # rows and keys untouched by the bad element (dk/dv also carry the bad key itself)
        touched = rows if name == "dq" else keys | ((np.arange(N) == pos) & (array in ("k", "v")))
        np.testing.assert_allclose(g[SLICE][~touched], c[SLICE][~touched], rtol=1e-12, atol=1e-12, err_msg=name)
    if not rows.any():
        assert where == "padded" and array in ("k", "v")  # a padded key reaches nothing
    elif array in ("q", "grad_out") and np.isnan(value) or array == "k" and np.isnan(value):
        assert np.isnan(ref[0][SLICE][rows]).all()  # NaN, never zeros

    copies = [a.copy() for a in (go, q, k, v, out, lse)]
    for path in ("fused", "staged", "blocked"):
        grads = sa.sparse_attention_backward(go, q, k, v, PATTERN, out, lse, key_padding_mask=KPM, path=path)
        for a, c in zip((go, q, k, v, out, lse), copies):
            np.testing.assert_array_equal(a, c)
        for name, g, e in zip(("dq", "dk", "dv"), grads, ref):
            assert g.dtype == dtype
            assert_same_classes(g, e, TOL[dtype], name=f"{path} {name}", relative=True)


def test_finite_slices_keep_the_fused_result():
    q, k, v, go = inputs(np.float32, seed=3)
    out, lse = sa.sparse_attention(q, k, v, PATTERN, return_lse=True)
    clean = sa.sparse_attention_backward(go, q, k, v, PATTERN, out, lse, path="fused")
    go = go.copy()
    go[1, 1, BAND, 0] = np.inf
    grads = sa.sparse_attention_backward(go, q, k, v, PATTERN, out, lse, path="fused")
    for g, c in zip(grads, clean):
        np.testing.assert_array_equal(g[0], c[0])
        np.testing.assert_array_equal(g[1, 0], c[1, 0])
        assert not np.isfinite(g[1, 1]).all()


def test_nan_in_out_or_lse_reaches_only_that_row():
    q, k, v, go = inputs(np.float64, seed=4)
    out, lse = sa.sparse_attention(q, k, v, PATTERN, return_lse=True)
    clean = sa.sparse_attention_backward(go, q, k, v, PATTERN, out, lse)
    for name in ("out", "lse"):
        o, ls = out.copy(), lse.copy()
        if name == "out":
            o[SLICE + (BAND, COL)] = np.nan
        else:
            ls[SLICE + (BAND,)] = np.nan
        for path in ("fused", "staged", "blocked"):
            dq, dk, dv = sa.sparse_attention_backward(go, q, k, v, PATTERN, o, ls, path=path)
            assert np.isnan(dq[SLICE][BAND]).all(), (name, path)
            keys = PATTERN.csr.toarray()[BAND]
            np.testing.assert_array_equal(np.isnan(dk[SLICE]).any(axis=1), keys)
            np.testing.assert_allclose(dq[SLICE][np.arange(N) != BAND], clean[0][SLICE][np.arange(N) != BAND], rtol=1e-12)
            np.testing.assert_allclose(dk[SLICE][~keys], clean[1][SLICE][~keys], rtol=1e-12)
            other = np.ones((2, 2), bool)
            other[SLICE] = False
            np.testing.assert_allclose(dv[other], clean[2][other], rtol=1e-12)


@pytest.mark.parametrize(
    "array,index,text",
    [("grad_out", (1, 0, 7, 2), r"\(1, 0, 7, 2\)"), ("out", (0, 1, 69, 15), r"\(0, 1, 69, 15\)"),
     ("lse", (1, 1, 3), r"\(1, 1, 3\)"), ("k", (0, 0, 4, 4), r"\(0, 0, 4, 4\)")],
)  # fmt: skip
def test_check_finite_names_the_array_and_index(array, index, text):
    q, k, v, go = inputs(np.float64, seed=1)
    out, lse = sa.sparse_attention(q, k, v, PATTERN, return_lse=True)
    arrays = {"grad_out": go, "out": out, "lse": lse, "k": k}
    arrays[array][index] = np.inf
    with pytest.raises(ValueError, match=rf"^{array} holds .*at index {text}"):
        sa.sparse_attention_backward(go, q, k, v, PATTERN, out, lse, check_finite=True)
    # -inf in lse marks a row without keys: not refused
    lse2 = lse.copy()
    lse2[0, 0, 0] = -np.inf
    if array != "lse" and array != "k":
        arrays[array][index] = 0.0
        sa.sparse_attention_backward(go, q, k, v, PATTERN, out, lse2, check_finite=True)
