"""The dtype policy: float32/float64 as such, float16 via float32, longdouble via float64, others refused."""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.reference import dense_attention

P = sa.longformer(48, attention_window=8, global_indices=[0, 30])


def inputs(rng, dtype):
    return [rng.standard_normal((2, 48, 16)).astype(dtype) for _ in range(3)]


@pytest.mark.parametrize("path", ["fused", "staged"])
def test_float16_is_computed_in_float32_and_returned_as_float16(rng, path):
    q, k, v = inputs(rng, np.float16)
    out, lse = sa.sparse_attention(q, k, v, P, path=path, return_lse=True)
    assert out.dtype == lse.dtype == np.float16
    # the float32 computation on the same (exactly representable) values, rounded once to float16
    o32, l32 = sa.sparse_attention(*(x.astype(np.float32) for x in (q, k, v)), P, path=path, return_lse=True)
    np.testing.assert_array_equal(out, o32.astype(np.float16))
    np.testing.assert_array_equal(lse, l32.astype(np.float16))
    ref = dense_attention(q, k, v, P)
    np.testing.assert_allclose(out, ref, rtol=2e-3, atol=2e-3)  # float16 rounding of the float64 result


@pytest.mark.parametrize("path", ["fused", "staged"])
def test_longdouble_is_computed_in_float64(rng, path):
    q, k, v = inputs(rng, np.float64)
    out = sa.sparse_attention(*(x.astype(np.longdouble) for x in (q, k, v)), P, path=path)
    assert out.dtype == np.longdouble
    np.testing.assert_array_equal(out.astype(np.float64), sa.sparse_attention(q, k, v, P, path=path))
    np.testing.assert_allclose(out.astype(np.float64), dense_attention(q, k, v, P), rtol=1e-11, atol=1e-12)


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max, reason="longdouble is float64 here")
def test_longdouble_beyond_float64_is_refused(rng):
    q, k, v = (x.astype(np.longdouble) for x in inputs(rng, np.float64))
    k[1, 3, 2] = np.longdouble(10) ** 400
    with pytest.raises(ValueError, match=r"^k holds 1e\+0*400, beyond float64's range: longdouble inputs are computed in float64"):
        sa.sparse_attention(q, k, v, P)


@pytest.mark.parametrize(
    "mix,expect", [((np.float16, np.float32, np.float16), np.float32), ((np.float32, np.float64, np.float32), np.float64),
                   ((np.float16, np.float16, np.float64), np.float64)],
)
def test_mixed_dtypes_promote(rng, mix, expect):
    arrays = [x.astype(t) for x, t in zip(inputs(rng, np.float64), mix)]
    out = sa.sparse_attention(*arrays, P)
    assert out.dtype == expect
    tol = 2e-5 if expect == np.float32 else 1e-11
    np.testing.assert_allclose(out, dense_attention(*arrays, P), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "bad",
    [np.int64, np.int8, np.uint16, bool, np.complex64, np.complex128, object, "U3", "datetime64[s]", [("a", "f4")]],
    ids=str,
)
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_other_dtypes_are_a_type_error_naming_the_argument(rng, bad, arg):
    arrays = dict(zip("qkv", inputs(rng, np.float32)))
    arrays[arg] = np.zeros((2, 48, 16), dtype=bad)
    with pytest.raises(TypeError, match=rf"^{arg} must be a floating-point array \(float16, float32, float64 or longdouble\), got dtype"):
        sa.sparse_attention(arrays["q"], arrays["k"], arrays["v"], P)
    with pytest.raises(TypeError, match=rf"^{arg} must be a floating-point array"):
        dense_attention(arrays["q"], arrays["k"], arrays["v"], P)
