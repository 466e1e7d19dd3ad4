"""Shared assertions: one place that checks values and CSR canonical form, and the non-finite tests' setting."""

import numpy as np
import scipy.sparse as sp

RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}


def assert_canonical_csr(m, shape=None):
    """A csr_array with sorted unique int indices per row, no explicit zeros."""
    assert isinstance(m, sp.csr_array), type(m)
    if shape is not None:
        assert m.shape == tuple(shape), (m.shape, shape)
    assert m.indptr.dtype in (np.int32, np.int64) and m.indices.dtype == m.indptr.dtype
    if m.nnz < 2**31 and max(m.shape) < 2**31:
        assert m.indices.dtype == np.int32, m.indices.dtype
    assert m.indptr[0] == 0 and m.indptr[-1] == m.nnz and len(m.indptr) == m.shape[0] + 1
    assert np.all(np.diff(m.indptr) >= 0)
    if m.nnz:
        assert m.indices.min() >= 0 and m.indices.max() < m.shape[1]
        row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        key = row.astype(np.int64) * m.shape[1] + m.indices
        assert np.all(np.diff(key) > 0), "indices not sorted/unique within rows"
        assert np.all(m.data != 0), "explicit zeros stored"


def assert_pattern_equals_dense(p, dense):
    dense = np.asarray(dense, dtype=bool)
    assert p.shape == dense.shape
    assert_canonical_csr(p.csr, dense.shape)
    np.testing.assert_array_equal(p.csr.toarray(), dense)
    assert p.nnz == int(dense.sum())


def assert_attention_close(actual, expected, dtype):
    """Compare against a float64 reference: relative to the output's scale, per working precision."""
    dtype = np.dtype(dtype)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0))
    assert err <= RTOL[dtype] * scale, (
        f"max abs error {err:.3g} exceeds tolerance for {dtype} (scale {scale:.3g})"
    )


# The seed notes' two 5-token grids, the reference rendering of a mask.
SEED_LOCAL = """\
    T1 T2 T3 T4 T5
T1  *  *
T2  *  *  *
T3     *  *  *
T4        *  *  *
T5           *  *"""

# As the notes' annotations describe it ("T3 still local, but +T1"); the notes' drawing drops the left
# neighbour from T3 on, the annotations do not.
SEED_GLOBAL = """\
    T1 T2 T3 T4 T5
T1  *  *  *  *  *
T2  *  *  *
T3  *  *  *  *
T4  *     *  *  *
T5  *        *  *"""


# -- the non-finite tests' setting (test_nonfinite.py, test_backward_nonfinite.py) ----------------
# A NaN or an infinity goes into one element of one slice, at a band key, a global key or a padded key.
NF_N, NF_D = 70, 16
NF_GLOBAL, NF_BAND, NF_PADDED = 5, 20, 60
NF_SLICE = (1, 0)  # batch 1, head 0
NF_COL = 3


def nf_pattern_and_padding():
    """The Longformer pattern and the key padding (key NF_PADDED padded in batch 1, where the bad value goes)."""
    import sparseattn as sa

    kpm = np.zeros((2, NF_N), bool)
    kpm[1, NF_PADDED] = True
    return sa.longformer(NF_N, attention_window=8, global_indices=[NF_GLOBAL]), kpm


def assert_same_classes(actual, expected, tol, name="", relative=False):
    """Same NaN / +inf / -inf positions; the finite values close (``relative``: to the largest finite value)."""
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(actual), test(expected), err_msg=f"{name}: {test.__name__}")
    fin = np.isfinite(expected)
    if not relative:
        np.testing.assert_allclose(actual[fin], expected[fin], rtol=tol, atol=tol, err_msg=name)
        return
    scale = max(float(np.max(np.abs(expected[fin]), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(actual[fin].astype(np.float64) - expected[fin]), initial=0.0))
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} vs scale {scale:.3g}"
