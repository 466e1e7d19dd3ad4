"""The backward's per-row residual runs, in groups of keys (kernels/pair_grads.py), against the float64 reference.

Rows of a narrow neighbourhood are a few short key runs that the span micro-kernels do not cover; the
fused backward takes each run in groups of four keys, then the last three or two as one group, or the last
one alone.  Runs of every length from 1 to 9 (so every mix of groups), with each score modifier and with a
padding mask (which sends a run key by key), in both dtypes, must match
:func:`sparseattn.reference.dense_attention_backward`.
"""

import math

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.reference import dense_attention_backward

TOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-10}


def _runs_pattern(n, seed):
    """Each row: two or three key runs of lengths 1..9 at random places (rows of a few short runs)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        keys = set()
        for _ in range(int(rng.integers(2, 4))):
            length = int(rng.integers(1, 10))
            start = int(rng.integers(0, n - length + 1))
            keys.update(range(start, start + length))
        rows.append(sorted(keys))
    width = max(len(r) for r in rows)
    idx = np.full((n, width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
    return sa.from_indices(idx, n)


PATTERNS = {
    "runs 1..9": lambda: _runs_pattern(96, 0),
    "neighbourhood 7x7": lambda: sa.neighborhood((12, 12), 7),
    "neighbourhood (3, 6)": lambda: sa.neighborhood((10, 14), (3, 6)),
    "3-D (3, 5, 5)": lambda: sa.neighborhood((4, 6, 8), (3, 5, 5)),
}

def _wave_f(s, b, h, i, j):
    """Non-linear in the score and dependent on the query and the key (a copied kernel must call it)."""
    return s + 0.3 * math.sin(s) - 0.02 * ((2 * i + j) % 5) + 0.1 * h


def _wave_df(s, b, h, i, j):
    return 1.0 + 0.3 * math.cos(s)


MODS = {
    "plain": {},
    "softcap": {"softcap": 2.0},
    "alibi": {"alibi_slopes": np.array([0.5, 0.25])},
    "sinks": {"sinks": np.array([0.3, -1.0])},
    "score_mod": {"score_mod": sa.ScoreMod(_wave_f, _wave_df)},
}


def _check(actual, expected, dtype, what):
    assert actual.dtype == np.dtype(dtype), what
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    assert err <= TOL[np.dtype(dtype)] * scale, (what, err)


# a user's ScoreMod compiles its own copies of the kernels (about half a minute per dtype): float64 in the slow set
CASES = [
    pytest.param(mods, dtype, id=f"{mods}-{np.dtype(dtype).name}",
                 marks=[pytest.mark.slow] if mods == "score_mod" and dtype is np.float64 else [])
    for mods in MODS
    for dtype in (np.float32, np.float64)
]  # fmt: skip


@pytest.mark.parametrize(("mods", "dtype"), CASES)
@pytest.mark.parametrize("name", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("padded", [False, True], ids=["whole runs", "padding"])
def test_residual_runs_backward_matches_the_reference(name, mods, dtype, padded):
    p = PATTERNS[name]()
    n = p.shape[0]
    rng = np.random.default_rng(7)
    q, k, v, go = (rng.standard_normal((1, 2, n, 24)).astype(dtype) for _ in range(4))
    kpm = None
    if padded:
        kpm = np.zeros((1, n), dtype=bool)
        kpm[0, rng.choice(n, n // 5, replace=False)] = True  # True: a padded key
    kw = {key: (val.astype(dtype) if key == "sinks" else val) for key, val in MODS[mods].items()}
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True, path="fused", **kw)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, key_padding_mask=kpm, path="fused", **kw)
    ref = dense_attention_backward(*(x.astype(np.float64) for x in (go, q, k, v)), p, key_padding_mask=kpm, **kw)
    assert len(grads) == len(ref)
    for what, a, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref):
        _check(np.asarray(a), np.asarray(r), dtype, what)
