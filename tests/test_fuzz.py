"""Property-based fuzzing of the engine (hypothesis).

One property, drawn over shapes (zero sizes included), dtypes (float16, float32,
float64, mixed), layouts (C, Fortran, negative strides, transposed, read-only,
broadcast with zero strides), patterns (every registered builder's examples;
random scipy matrices in every format, with duplicates, unsorted indices and
explicit zeros; per-head lists), key padding, scale, and now and then one NaN
or infinity: the output equals the float64 reference (class by class for
non-finite values), inputs are unchanged, the dtype and shape are right, the
fused and staged paths agree, and 8 threads calling at once get the same
result.  The default run tries a few dozen examples; ``-m slow`` runs
thousands.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn.patterns import registry
from sparseattn.reference import dense_attention

DTYPES = [np.float16, np.float32, np.float64]
LAYOUTS = ["c", "fortran", "negative", "transposed", "readonly", "broadcast"]
FORMATS = ["csr", "csc", "coo", "bsr", "lil", "dok", "dia", "csr_matrix", "coo_matrix"]
EXAMPLES = [(name, kw) for name in registry.available() for kw in registry.examples(name)]
TOL = {np.dtype(np.float16): 3e-3, np.dtype(np.float32): 3e-5, np.dtype(np.float64): 1e-10}


def scipy_pattern(r, n_q, n_k, fmt):
    """A random scipy matrix with duplicates, unsorted indices and explicit zeros; also its dense truth."""
    m = int(r.integers(0, 2 * n_q * n_k + 1)) if n_q * n_k else 0
    rows = r.integers(0, max(n_q, 1), m)
    cols = r.integers(0, max(n_k, 1), m)
    data = r.integers(0, 3, m).astype(np.float64)  # 0 = explicit zero; duplicates add up
    truth = np.zeros((n_q, n_k))
    np.add.at(truth, (rows, cols), data)
    if fmt == "csr":  # keep duplicates and unsorted indices: build the arrays by hand
        order = np.argsort(rows, kind="stable")
        indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=n_q))))
        mat = sp.csr_array((data[order], cols[order], indptr), shape=(n_q, n_k))
    else:
        coo = sp.coo_array((data, (rows, cols)), shape=(n_q, n_k))
        mat = {
            "csc": lambda: coo.tocsc(),
            "coo": lambda: coo,
            "bsr": lambda: coo.tobsr(blocksize=(1, 1)),
            "lil": lambda: coo.tolil(),
            "dok": lambda: coo.todok(),
            "dia": lambda: coo.todia(),
            "csr_matrix": lambda: sp.csr_matrix(coo),
            "coo_matrix": lambda: sp.coo_matrix(coo),
        }[fmt]()
    return mat, truth != 0


def layout(r, values, kind, full_lead):
    if kind == "fortran":
        return np.asfortranarray(values)
    if kind == "negative":
        return np.ascontiguousarray(values[..., ::-1, ::-1])[..., ::-1, ::-1]
    if kind == "transposed":
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(values, -1, -2)), -1, -2)
    if kind == "readonly":
        x = values.copy()
        x.setflags(write=False)
        return x
    if kind == "broadcast":
        return np.broadcast_to(values, full_lead + values.shape[-2:])
    return values.copy()


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    r = np.random.default_rng(seed)
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    if draw(st.integers(0, 3)) == 0 and EXAMPLES:  # a registered builder's example
        name, kw = EXAMPLES[draw(st.integers(0, len(EXAMPLES) - 1))]
        built = registry.get(name)(**kw)
        heads = built if isinstance(built, list) else [built]
        n_q, n_k = heads[0].shape
        truths = [p.to_dense() for p in heads]
        pattern = heads if isinstance(built, list) else built
        desc = f"{name}{kw}"
    else:
        n_q, n_k = draw(st.integers(0, 24)), draw(st.integers(0, 24))
        n_pat = draw(st.integers(1, 3)) if draw(st.booleans()) else 0  # 0: one pattern, not a list
        fmts = [draw(st.sampled_from(FORMATS)) for _ in range(max(n_pat, 1))]
        made = [scipy_pattern(r, n_q, n_k, f) for f in fmts]
        truths = [t for _, t in made]
        pattern = [m for m, _ in made] if n_pat else made[0][0]
        if not n_pat and draw(st.booleans()):
            pattern = sa.from_sparse(pattern) | sa.sliding_window(n_q, 1, n_k=n_k) if n_q else pattern
            truths = [truths[0] | sa.sliding_window(n_q, 1, n_k=n_k).to_dense()] if n_q else truths
        desc = f"scipy {fmts}"
    if isinstance(pattern, list):
        lead = lead if lead else (len(pattern),)
        lead = lead[:-1] + (len(pattern),)
    d = draw(st.integers(1, 20))
    dv = draw(st.integers(0, 20))
    dts = [draw(st.sampled_from(DTYPES)) for _ in range(3)] if draw(st.booleans()) else [draw(st.sampled_from(DTYPES))] * 3
    arrays = []
    for name, n, last, dt in (("q", n_q, d, dts[0]), ("k", n_k, d, dts[1]), ("v", n_k, dv, dts[2])):
        own = tuple(1 if draw(st.integers(0, 3)) == 0 else x for x in lead)
        if own and draw(st.integers(0, 3)) == 0:  # fewer leading dims (per-head lists keep the heads axis)
            own = own[draw(st.integers(0, len(own) - isinstance(pattern, list))):]
        values = r.standard_normal(own + (n, last)).astype(dt)
        kind = draw(st.sampled_from(LAYOUTS))
        arrays.append(layout(r, values, kind, lead))
    kpm = None
    if draw(st.booleans()):
        actual = np.broadcast_shapes(*(a.shape[:-2] for a in arrays))
        if isinstance(pattern, list):
            actual = actual[:-1] + (len(pattern),)
        kpm = r.random(actual[:-1] + (n_k,)) < 0.25
    scale = draw(st.one_of(st.none(), st.floats(-3, 3, allow_nan=False)))
    bad = None
    if draw(st.integers(0, 4)) == 0:
        which = draw(st.integers(0, 2))
        x = arrays[which]
        if x.size:
            idx = tuple(int(r.integers(0, s)) for s in x.shape)
            bad = (which, idx, draw(st.sampled_from([np.nan, np.inf, -np.inf])))
    return dict(arrays=arrays, pattern=pattern, truths=truths, kpm=kpm, scale=scale, bad=bad, desc=desc)


def assert_matches(out, ref, dtype):
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(out), test(ref), err_msg=test.__name__)
    fin = np.isfinite(ref)
    if fin.any():
        scale = max(1.0, float(np.abs(ref[fin]).max()))
        err = float(np.abs(out[fin].astype(np.float64) - ref[fin]).max())
        assert err <= TOL[np.dtype(dtype)] * scale, (err, scale, dtype)


def check_case(c):
    q, k, v = c["arrays"]
    if c["bad"] is not None:
        which, idx, val = c["bad"]
        x = np.array(c["arrays"][which])  # a writable copy that keeps the values
        x[idx] = val
        q, k, v = [x if i == which else a for i, a in enumerate((q, k, v))]
    kw = dict(scale=c["scale"], key_padding_mask=c["kpm"])
    copies = [np.array(a, copy=True) for a in (q, k, v)]
    pats = c["pattern"] if isinstance(c["pattern"], list) else [c["pattern"]]
    pat_copies = [p.copy() if sp.issparse(p) else p for p in pats]
    for p, truth in zip(pats, c["truths"]):  # the pattern means what its entries say
        got = p.to_dense() if isinstance(p, sa.Pattern) else sa.from_sparse(p).to_dense()
        np.testing.assert_array_equal(got, truth)
    dtype = np.result_type(q, k, v)
    ref = dense_attention(q, k, v, c["pattern"], **kw)
    results = {}
    for path in ("fused", "staged", "blocked"):
        out = sa.sparse_attention(q, k, v, c["pattern"], path=path, **kw)
        assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
        assert_matches(out, ref, dtype)
        results[path] = out
    assert_matches(results["fused"], results["staged"].astype(np.float64), dtype)
    for a, b in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, b)  # inputs unchanged
    for p, p0 in zip(pats, pat_copies):
        if sp.issparse(p) and p.format in ("csr", "csc", "bsr"):  # the raw arrays too, not only the values
            for attr in ("indptr", "indices", "data"):
                np.testing.assert_array_equal(getattr(p, attr), getattr(p0, attr))
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: sa.sparse_attention(q, k, v, c["pattern"], **kw), range(8)))
    for o in outs:
        np.testing.assert_array_equal(o, results["fused"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_fuzz_engine(c):
    check_case(c)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_fuzz_engine_long(c):
    check_case(c)
