"""Errors speak the user's words: each bad argument of a public entry point gets a ValueError or TypeError
whose message starts with that argument's name (as the caller wrote it) and says what was received."""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.reference import dense_attention

Q = np.zeros((2, 12, 4), np.float32)
P = sa.sliding_window(12, 1)


def attn(**kw):
    args = dict(q=Q, k=Q, v=Q, pattern=P)
    args.update(kw)
    return lambda: sa.sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("pattern"), **args)


BIG = 2**64
CASES = [
    # (id, call, exception, the message starts with, and contains)
    ("scale-overflows-float32", attn(scale=1e39), ValueError, "scale=1e+39", "not finite in float32"),
    ("scale-nan", attn(scale=float("nan")), ValueError, "scale", "finite"),
    ("scale-str", attn(scale="1"), TypeError, "scale", "'1'"),
    ("pattern-3d-bool", attn(pattern=np.zeros((2, 12, 12), bool)), ValueError, "pattern", "(2, 12, 12)"),
    ("pattern-object", attn(pattern=np.zeros((12, 12), object)), TypeError, "pattern", "object"),
    ("pattern-nested-list", attn(pattern=[[True] * 12] * 12), TypeError, "pattern", "np.array(mask, dtype=bool)"),
    ("pattern-per-head-3d", attn(pattern=[P, np.zeros((1, 12, 12), bool)]), ValueError, "pattern[1]", "(1, 12, 12)"),
    ("pattern-int", attn(pattern=3), TypeError, "pattern", "int"),
    ("q-int", attn(q=Q.astype(int)), TypeError, "q", "int64"),
    ("v-1d", attn(v=np.zeros(4, np.float32)), ValueError, "v", "(4,)"),
    ("kpm-float", attn(key_padding_mask=np.zeros(12)), TypeError, "key_padding_mask", "float64"),
    ("kpm-shape", attn(key_padding_mask=np.zeros(11, bool)), ValueError, "key_padding_mask", "(11,)"),
    ("path", attn(path="fast"), ValueError, "path", "'fast'"),
    ("radius-2**64", lambda: sa.sliding_window(12, radius=BIG), ValueError, "radius", str(BIG)),
    ("left-negative", lambda: sa.sliding_window(12, left=-1, right=0), ValueError, "left", "-1"),
    ("dilation-float", lambda: sa.sliding_window(12, 1, dilation=1.5), TypeError, "dilation", "1.5"),
    ("n-2**64", lambda: sa.sliding_window(BIG, 1), ValueError, "n", str(BIG)),
    ("n_k-2**64", lambda: sa.sliding_window(3, 1, n_k=BIG), ValueError, "n_k", str(BIG)),
    ("causal-radius", lambda: sa.causal(5, radius=BIG), ValueError, "radius", str(BIG)),
    ("global-indices-out", lambda: sa.global_tokens(5, [7]), ValueError, "indices", "[7]"),
    ("global-indices-float", lambda: sa.global_tokens(5, [0.5]), TypeError, "indices", "float64"),
    ("longformer-window-odd", lambda: sa.longformer(8, 3), ValueError, "attention_window", "3"),
    ("longformer-global", lambda: sa.longformer(8, 2, [9]), ValueError, "global_indices", "[9]"),
    ("random-per-row", lambda: sa.random_pattern(4, 4, 5), ValueError, "per_row", "5"),
    ("random-seed-float", lambda: sa.random_pattern(4, 4, 2, seed=1.5), TypeError, "seed", "1.5"),
    ("random-n_q-2**64", lambda: sa.random_pattern(BIG, 4, 2), ValueError, "n_q", str(BIG)),
    ("from_dense-3d", lambda: sa.from_dense(np.zeros((2, 2, 2))), ValueError, "mask", "(2, 2, 2)"),
    ("from_sparse-dense", lambda: sa.from_sparse(np.eye(3)), TypeError, "m", "ndarray"),
    ("block_size-2**64", lambda: sa.block_sparse([[1]], BIG), ValueError, "block_size", str(BIG)),
    ("block-layout-object", lambda: sa.block_sparse(np.array([[None]]), 2), TypeError, "layout", "object"),
    ("bigbird-block", lambda: sa.bigbird(10, 3, 0), ValueError, "bigbird: block_size=3", "n=10"),
    ("strided-stride", lambda: sa.strided(8, 0), ValueError, "stride", "0"),
    ("fixed-summary", lambda: sa.fixed(8, 2, 3), ValueError, "fixed: num_summary=3", "block=2"),
    ("rows-range", lambda: P.rows(5, 3), ValueError, "row range", "[5, 3)"),
    ("union-shapes", lambda: P | sa.sliding_window(5, 1), ValueError, "pattern union (a | b): shapes differ", "(5, 5)"),
    ("reference-rows", lambda: dense_attention(Q, Q, Q, P, rows=(3, 20)), ValueError, "rows", "(3, 20)"),
]


@pytest.mark.parametrize("case,call,exc,start,contains", CASES, ids=[c[0] for c in CASES])
def test_error_names_the_argument(case, call, exc, start, contains):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc
    msg = str(info.value)
    assert msg.startswith(start), msg
    assert contains in msg, msg
