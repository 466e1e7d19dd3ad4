"""The fused forward's own non-finite check, route by route of its kernels.

The fused forward scans nothing before it runs: its kernels test the raw scores of the allowed pairs
and the output rows (``|x| <= largest finite``) and flag the slice; ``sparse_attention`` then scans the
inputs and recomputes the slices that hold a NaN or an infinity on the staged path.  Each route of
the kernels (span micro-kernels, the span through BLAS, a few shared columns, gathered shared
columns, long rows, residual runs, the neighbourhood line kernel, documents) gets one bad element of
q, k or v at an attended position: the kernel must flag exactly that slice, and the call must match
the float64 reference class by class (tests/test_nonfinite.py covers the policy itself).
"""

import numpy as np
import pytest
from helpers import assert_same_classes

import sparseattn as sa
from sparseattn.engine.fused_forward import fused_attention
from sparseattn.engine.plan import get_plan
from sparseattn.reference import dense_attention

N = 288
BAD = (1, 0)  # the slice that gets the bad element, of (2, 2) slices
ROW = 150  # an attended position of every pattern below (a query row, or the key of q[ROW]'s run)


def _route(name):
    """``(pattern, d, dv, what the plan must show)`` of one route through the fused forward."""
    if name == "span":
        return sa.sliding_window(N, 20), 32, 32, lambda p: p.rs_ptr[-1] == 0
    if name == "blas":  # dv not a multiple of two vectors: the span through BLAS
        return sa.sliding_window(N, 20), 32, 20, lambda p: True
    if name == "few shared":  # global keys as direct dot products, global rows as long rows
        return sa.sliding_window(N, 4) | sa.global_tokens(N, [3, 50]), 32, 32, lambda p: len(p.it_grp) > 0
    if name == "gathered":  # more than 8 shared columns per tile: gathered into a GEMM
        pat = sa.sliding_window(N, 4) | sa.global_tokens(N, range(0, 240, 20))
        return pat, 32, 32, lambda p: int(np.diff(p.sh_ptr).max()) > 8
    if name == "residual":  # a neighbourhood with d off the vector lanes (the line kernel's): residual runs
        return sa.neighborhood((12, 24), 3), 20, 32, lambda p: p.rs_ptr[-1] > 0
    if name == "grid":  # the same neighbourhood on the line kernel
        return sa.neighborhood((12, 24), 3), 32, 32, lambda p: p.grid is not None
    lengths = [100, 60, 128]
    return sa.documents(lengths) & sa.causal(N), 32, 32, lambda p: True


ROUTES = ["span", "blas", "few shared", "gathered", "residual", "grid", "documents"]
TOL = {np.float32: 2e-5, np.float64: 1e-11}


def _inputs(dtype, d, dv, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 2, N, d)).astype(dtype)
    k = rng.standard_normal((2, 2, N, d)).astype(dtype)
    v = rng.standard_normal((2, 2, N, dv)).astype(dtype)
    return q, k, v


def _flags(q, k, v, pattern):
    """The flags the fused kernels set on the flattened slices (no scan, no recompute)."""
    flat = [np.ascontiguousarray(x.reshape((-1,) + x.shape[2:])) for x in (q, k, v)]
    flags = np.zeros(len(flat[0]), dtype=np.uint8)
    fused_attention(*flat, [pattern], np.zeros(len(flags), np.int64), q.shape[-1] ** -0.5, None, None, flags=flags)
    return flags


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("array", ["q", "k", "v"])
@pytest.mark.parametrize("route", ROUTES)
def test_each_kernel_route_flags_its_slice_and_the_call_follows_the_policy(route, array, value, dtype):
    pattern, d, dv, shows = _route(route)
    assert shows(get_plan(pattern)), f"the plan of {route!r} does not take that route"
    q, k, v = _inputs(dtype, d, dv)
    assert not _flags(q, k, v, pattern).any()  # finite inputs: nothing flagged
    x = {"q": q, "k": k, "v": v}[array]
    x[BAD + (ROW, 1)] = value
    want = np.zeros((2, 2), np.uint8)
    want[BAD] = 1
    np.testing.assert_array_equal(_flags(q, k, v, pattern), want.ravel())
    copies = [a.copy() for a in (q, k, v)]
    out, lse = sa.sparse_attention(q, k, v, pattern, path="fused", return_lse=True)
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)
    ref, ref_lse = dense_attention(q, k, v, pattern, return_lse=True)
    assert not np.isfinite(ref[BAD]).all()  # the bad element reaches some row
    assert_same_classes(out, ref, TOL[dtype], "out")
    assert_same_classes(lse, ref_lse, TOL[dtype], "lse")


@pytest.mark.parametrize("route", ROUTES)
def test_an_infinite_value_under_a_zero_weight_is_nan_on_every_route(route):
    """Every key of row ``ROW`` but its first scores far below the others for every row (a weight of exactly 0
    in both dtypes) and holds an infinity in ``v``: 0 x inf is NaN in that column of every row that attends
    one (no row sees it with a positive weight, so no infinity gives the slice away), on the fused path as in
    the reference, whichever part of the kernels (span, shared column, residual run, line) computes the pair."""
    pattern, d, dv, _ = _route(route)
    q, k, v = _inputs(np.float32, d, dv)
    csr = pattern.csr
    zero_weight = csr.indices[csr.indptr[ROW] + 1 : csr.indptr[ROW + 1]]
    q[BAD + (slice(None), 0)] = 50
    k[BAD + (slice(None), 0)] = 0
    k[BAD + (zero_weight, 0)] = -250  # scaled scores of about -2200 below every row's others
    v[BAD + (zero_weight, 3)] = np.inf
    out = sa.sparse_attention(q, k, v, pattern, path="fused")
    ref = dense_attention(q, k, v, pattern)
    assert np.isnan(ref[BAD + (ROW, 3)]) and not np.isinf(ref).any()
    assert_same_classes(out, ref, TOL[np.float32], "out")
