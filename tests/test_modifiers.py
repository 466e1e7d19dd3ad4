"""Score modifiers and sinks (softcap, ALiBi, ``ScoreMod``, ``sinks``) on every path, against the float64 reference.

The reference (:mod:`sparseattn.reference`) is first checked against torch autograd on a dense computation
written here (independent of sparseattn but for the pattern's dense mask); every path, forward and backward
(``dsinks`` included), is then checked against the reference: float64 within 1e-9, float32 within 2e-4, relative
to the largest value.  Then the models' combinations (Gemma 2, GPT-OSS, ModernBERT), grouped-query ratios,
decode offsets, head dims, the weights of the staged path and the argument checks.

A ``ScoreMod`` compiles its kernels once per object, dtype and direction (seconds each): the module keeps one
object per modifier (module-scoped fixtures) and the cases that need extra compiles are marked slow.
"""

import functools
import math

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.engine import paths
from sparseattn.reference import dense_attention, dense_attention_backward

TOL = {np.dtype(np.float64): 1e-9, np.dtype(np.float32): 2e-4}
PATHS = sorted(paths.PATHS)  # blocked, fused, staged

# the shared geometry: chunked prefill (n_q < n_k, bottom-right causal window), GQA 2, key padding
B, HQ, HKV, NQ, NK, D = 2, 4, 2, 40, 56, 16
SLOPES_BH = np.array([[0.5, 0.25, 0.125, 0.0625], [0.3, 0.2, 0.1, 0.05]])  # ALiBi per (batch, head)
OFFSET = NK - NQ


# -- user modifiers (module level: Numba freezes the globals they read) -------------------------------------


def _alibi_f(s, b, h, i, j):
    return s - SLOPES_BH[b, h] * abs(i + OFFSET - j)


def _alibi_df(s, b, h, i, j):
    return 1.0


def _bias_f(s, b, h, i, j):
    """Non-linear in s, and depends on b, h, i and j."""
    return s + 0.25 * (h + 1) * math.sin(s) + 0.3 * b - 0.05 * ((3 * i + j) % 7) + 0.01 * (h - b) * (i - j)


def _bias_df(s, b, h, i, j):
    return 1.0 + 0.25 * (h + 1) * math.cos(s)


def _bias_torch(torch, s, b, h, i, j):
    """``_bias_f`` in torch (for the autograd cross-check): s (..., n_q, n_k), b, h ints, i, j broadcast tensors."""
    return s + 0.25 * (h + 1) * torch.sin(s) + 0.3 * b - 0.05 * ((3 * i + j) % 7) + 0.01 * (h - b) * (i - j)


@pytest.fixture(scope="module")
def alibi_mod():
    return sa.ScoreMod(_alibi_f, _alibi_df)


@pytest.fixture(scope="module")
def bias_mod():
    return sa.ScoreMod(_bias_f, _bias_df)


# -- the shared case ----------------------------------------------------------------------------------------


@functools.cache
def _inputs(seed=0):
    """q (B, HQ, NQ, D), k, v (B, HKV, NK, D), grad_out; a pattern with an empty row; padding emptying more rows."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, HQ, NQ, D)) * 1.5
    k, v = (rng.standard_normal((B, HKV, NK, D)) for _ in range(2))
    go = rng.standard_normal((B, HQ, NQ, D))
    keep = np.ones((NQ, NK), dtype=bool)
    keep[5] = False  # a row with no allowed key in every slice
    pattern = (sa.causal(NQ, 11, n_k=NK) | sa.random_pattern(NQ, NK, 2, seed=3)) & sa.from_dense(keep)
    kpm = np.zeros((B, NK), dtype=bool)
    kpm[1, 8:] = True  # batch 1: only keys 0..7, so its late window rows lose every key
    allowed = pattern.csr.toarray() & ~kpm[1][None, :]
    assert (~allowed.any(axis=1)).sum() > 5 and allowed.any(axis=1).sum() > 5
    return q, k, v, go, pattern, kpm


def _mods(case, request):
    """The keyword arguments of one modifier case (ScoreMods from the module's fixtures)."""
    rng = np.random.default_rng(7)
    sinks = rng.standard_normal(HQ) + 1.0
    table = {
        "softcap": {"softcap": 2.5},
        "alibi_head": {"alibi_slopes": SLOPES_BH[0]},
        "alibi_batch": {"alibi_slopes": SLOPES_BH},
        "sinks": {"sinks": sinks},
        "sinks_batch": {"sinks": np.stack([sinks, sinks[::-1] - 0.5])},
        "sinks_1h": {"sinks": sinks[None]},  # (1, h_q): dsinks summed over the batch into it
        "score_mod": {"score_mod": "bias_mod"},
        "all": {"softcap": 2.5, "alibi_slopes": SLOPES_BH, "sinks": sinks, "score_mod": "bias_mod"},
    }
    kw = dict(table[case])
    if isinstance(kw.get("score_mod"), str):
        kw["score_mod"] = request.getfixturevalue(kw["score_mod"])
    return kw


CASES = ["softcap", "alibi_head", "alibi_batch", "sinks", "sinks_batch", "sinks_1h", "score_mod", "all"]


def _close(actual, expected, dtype, what, tol=None):
    """``actual`` in ``dtype`` within the tolerance of ``tol`` (the compute dtype; default ``dtype``)."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == np.dtype(dtype), (what, actual.dtype)
    fin = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), fin, err_msg=what)
    scale = max(1.0, float(np.abs(expected[fin]).max(initial=0.0)))
    err = float(np.abs(actual.astype(np.float64)[fin] - expected[fin]).max(initial=0.0))
    assert err <= TOL[np.dtype(tol or dtype)] * scale, (what, err, scale)


def _reference(kw):
    q, k, v, go, pattern, kpm = _inputs()
    out, lse = dense_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, **kw)
    grads = dense_attention_backward(go, q, k, v, pattern, key_padding_mask=kpm, **kw)
    return out, lse, grads


_REF = {}


def _ref(case, kw):
    if case not in _REF:
        _REF[case] = _reference(kw)
    return _REF[case]


# -- the reference against torch autograd -------------------------------------------------------------------


def _torch_attention(torch, q, k, v, mask, scale, softcap=None, slopes=None, sinks=None, bias=False):
    """Dense attention in torch float64, written here: q (B, H, n_q, d), k, v (B, H_kv, n_k, d), mask (B, n_q, n_k)."""
    Bq, H, n_q, _ = q.shape
    g = H // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    n_k = k.shape[2]
    i = torch.arange(n_q, dtype=torch.float64)[:, None]
    j = torch.arange(n_k, dtype=torch.float64)[None, :]
    if slopes is not None:
        sl = slopes.expand(Bq, H)[:, :, None, None]
        s = s - sl * (i + n_k - n_q - j).abs()
    if bias:
        s = torch.stack([torch.stack([_bias_torch(torch, s[b, h], b, h, i, j) for h in range(H)]) for b in range(Bq)])
    s = s.masked_fill(~mask[:, None], -math.inf)
    if sinks is not None:
        col = sinks.expand(Bq, H)[:, :, None, None].expand(Bq, H, n_q, 1)
        lse = torch.logsumexp(torch.cat([s, col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    if sinks is None:
        p = torch.nan_to_num(p, nan=0.0)  # rows without keys (lse = -inf): zeros
    return p @ v, lse


@pytest.mark.parametrize("case", CASES)
def test_reference_equals_torch_autograd(case, request):
    torch = pytest.importorskip("torch")
    q, k, v, go, pattern, kpm = _inputs()
    kw = _mods(case, request)
    out, lse, grads = _ref(case, kw)
    mask = torch.tensor(pattern.csr.toarray()[None] & ~kpm[:, None, :])
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    targs = {}
    if "softcap" in kw:
        targs["softcap"] = kw["softcap"]
    if "alibi_slopes" in kw:
        targs["slopes"] = torch.tensor(kw["alibi_slopes"])
    if "sinks" in kw:
        targs["sinks"] = torch.tensor(kw["sinks"], requires_grad=True)
    if "score_mod" in kw:
        targs["bias"] = True
    t_out, t_lse = _torch_attention(torch, tq, tk, tv, mask, 1 / math.sqrt(D), **targs)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    if "sinks" in kw:
        np.testing.assert_allclose(lse, t_lse.detach().numpy(), rtol=1e-10, atol=1e-12)
    else:
        np.testing.assert_allclose(np.where(np.isinf(lse), 0, lse), np.nan_to_num(t_lse.detach().numpy(), neginf=0))
        assert np.array_equal(np.isneginf(lse), np.isneginf(t_lse.detach().numpy()))
    inputs = [tq, tk, tv] + ([targs["sinks"]] if "sinks" in kw else [])
    t_grads = torch.autograd.grad(t_out, inputs, torch.tensor(go))
    assert len(grads) == len(t_grads)
    for name, mine, theirs in zip(("dq", "dk", "dv", "dsinks"), grads, t_grads):
        assert mine.shape == tuple(theirs.shape), name
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


def test_reference_rows_without_keys_output_zeros_and_lse_sink():
    q, k, v, _go, pattern, kpm = _inputs()
    sinks = np.array([0.5, -1.0, 2.0, 3.0])
    out, w, lse = dense_attention(q, k, v, pattern, key_padding_mask=kpm, sinks=sinks, return_lse=True,
                                  return_weights=True)  # fmt: skip
    empty = ~(pattern.csr.toarray()[None] & ~kpm[:, None, :]).any(axis=-1)  # (B, NQ)
    empty = np.broadcast_to(empty[:, None], lse.shape)
    assert np.all(out[empty] == 0)
    np.testing.assert_array_equal(lse, np.where(empty, sinks[None, :, None], lse))
    np.testing.assert_array_equal(w.sum(-1)[empty], 0)
    sums = w.sum(-1)[~empty]
    assert np.all(sums < 1) and np.all(sums > 0)
    # the sink's share of each row: 1 - sum of the weights = exp(sink - lse)
    np.testing.assert_allclose(1 - w.sum(-1), np.exp(sinks[None, :, None] - lse), rtol=1e-12)


def test_reference_hand_written_alibi_equals_alibi_slopes(alibi_mod):
    q, k, v, go, pattern, kpm = _inputs()
    a = dense_attention(q, k, v, pattern, key_padding_mask=kpm, alibi_slopes=SLOPES_BH, return_lse=True)
    b = dense_attention(q, k, v, pattern, key_padding_mask=kpm, score_mod=alibi_mod, return_lse=True)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-13)
    ga = dense_attention_backward(go, q, k, v, pattern, key_padding_mask=kpm, alibi_slopes=SLOPES_BH)
    gb = dense_attention_backward(go, q, k, v, pattern, key_padding_mask=kpm, score_mod=alibi_mod)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)


# -- every path against the reference -----------------------------------------------------------------------


def _run_forward(path, dtype, kw):
    q, k, v, _go, pattern, kpm = _inputs()
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, path=path, **kw)


#: where a ScoreMod runs in the default run: each (path, dtype, direction) of compiled kernels costs one compile per
#: session (~25 s for a fused direction on a shared 2-core machine, ~3 s staged, ~0 blocked); the rest is slow
SCORE_MOD_DEFAULT = {("fused", "float64", "forward"), ("staged", "float64", "forward"),
                     ("staged", "float64", "backward")}  # fmt: skip


def _grid(direction):
    """(path, case, dtype) params; a ScoreMod case outside ``SCORE_MOD_DEFAULT`` (and not blocked) is slow."""
    out = []
    for path in PATHS:
        for case in CASES:
            for dtype in (np.float64, np.float32):
                slow = case in ("score_mod", "all") and path != "blocked" and (
                    (path, np.dtype(dtype).name, direction) not in SCORE_MOD_DEFAULT)
                marks = (pytest.mark.slow,) if slow else ()
                out.append(pytest.param(path, case, dtype, marks=marks, id=f"{path}-{case}-{np.dtype(dtype).name}"))
    return out


@pytest.mark.parametrize("path,case,dtype", _grid("forward"))
def test_forward_every_path(path, case, dtype, request):
    kw = _mods(case, request)
    ref_out, ref_lse, _ = _ref(case, kw)
    out, lse = _run_forward(path, dtype, kw)
    _close(out, ref_out, dtype, "out")
    _close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("path,case,dtype", _grid("backward"))
def test_backward_every_path(path, case, dtype, request):
    kw = _mods(case, request)
    _, _, ref_grads = _ref(case, kw)
    q, k, v, go, pattern, kpm = _inputs()
    q, k, v, go = (x.astype(dtype) for x in (q, k, v, go))
    # out and lse from the float64 reference (cast): the backward is checked on its own
    ref_out, ref_lse, _ = _ref(case, kw)
    grads = sa.sparse_attention_backward(go, q, k, v, pattern, ref_out.astype(dtype), ref_lse.astype(dtype),
                                         key_padding_mask=kpm, path=path, **kw)  # fmt: skip
    assert len(grads) == (4 if "sinks" in kw else 3)
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        _close(g, r, dtype if name != "dsinks" else np.result_type(kw["sinks"], np.float32), name, tol=dtype)


@pytest.mark.parametrize("path", [pytest.param("fused", marks=pytest.mark.slow), "staged", "blocked"])
def test_forward_then_backward_chained(path, request):
    """The engine's own out and lse feed its backward (float64, every modifier)."""
    kw = _mods("all", request)
    q, k, v, go, pattern, kpm = _inputs()
    out, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, path=path, **kw)
    grads = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, key_padding_mask=kpm, path=path, **kw)
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, _ref("all", kw)[2]):
        _close(g, r, np.float64, name)


# -- ScoreMod -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) for p in ("fused", "staged")] + ["blocked"])
def test_hand_written_alibi_equals_alibi_slopes(path, alibi_mod):
    q, k, v, go, pattern, kpm = _inputs()
    a = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, alibi_slopes=SLOPES_BH, return_lse=True, path=path)
    b = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, score_mod=alibi_mod, return_lse=True, path=path)
    ref = dense_attention(q, k, v, pattern, key_padding_mask=kpm, alibi_slopes=SLOPES_BH, return_lse=True)
    for x, y, r, what in zip(a, b, ref, ("out", "lse")):
        _close(x, r, np.float64, what)
        _close(y, r, np.float64, what)
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
    ga = sa.sparse_attention_backward(go, q, k, v, pattern, *a, key_padding_mask=kpm, alibi_slopes=SLOPES_BH, path=path)
    gb = sa.sparse_attention_backward(go, q, k, v, pattern, *b, key_padding_mask=kpm, score_mod=alibi_mod, path=path)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_score_mod_is_reused_not_recompiled(bias_mod):
    """One ScoreMod object: the second call reuses its kernels (the fixture's object, compiled by earlier tests or here)."""
    q, k, v, _go, pattern, _kpm = _inputs()
    sa.sparse_attention(q, k, v, pattern, score_mod=bias_mod, path="fused")
    kernels = dict(bias_mod._kernels)
    sa.sparse_attention(q, k, v, pattern, score_mod=bias_mod, path="fused")
    assert set(bias_mod._kernels) == set(kernels) and all(bias_mod._kernels[x] is kernels[x] for x in kernels)


# -- return_weights (the staged path) -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sinks", "all"])
def test_weights_equal_the_reference_probabilities(case, request):
    kw = _mods(case, request)
    q, k, v, _go, pattern, kpm = _inputs()
    out, w, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, return_weights=True, return_lse=True,
                                      **kw)  # fmt: skip
    ref_out, ref_w, ref_lse = dense_attention(q, k, v, pattern, key_padding_mask=kpm, return_weights=True,
                                              return_lse=True, **kw)  # fmt: skip
    _close(out, ref_out, np.float64, "out")
    _close(lse, ref_lse, np.float64, "lse")
    sinks = np.broadcast_to(kw["sinks"], (B, HQ))
    for b in range(B):
        for h in range(HQ):
            m = w.to_scipy(b, h).toarray()
            np.testing.assert_allclose(m, ref_w[b, h], rtol=1e-9, atol=1e-12)
            sums = m.sum(axis=1)
            assert np.all(sums < 1)
            has = sums > 0
            np.testing.assert_allclose(1 - sums[has], np.exp(sinks[b, h] - ref_lse[b, h][has]), rtol=1e-9)


# -- rows with no allowed key, non-finite -------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_rows_without_keys_with_sinks(path):
    """A pattern with an empty row, and padding removing all of a row's keys: zeros, lse = sink, zero gradients."""
    q, k, v, go, pattern, kpm = _inputs()
    sinks = np.array([0.5, -1.0, 2.0, 3.0])
    out, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, sinks=sinks, return_lse=True, path=path)
    empty = ~(pattern.csr.toarray()[None] & ~kpm[:, None, :]).any(axis=-1)
    empty = np.broadcast_to(empty[:, None], lse.shape)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[empty], np.broadcast_to(sinks[None, :, None], lse.shape)[empty], rtol=1e-15)
    dq, dk, dv, ds = sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, key_padding_mask=kpm, sinks=sinks,
                                                  path=path)  # fmt: skip
    assert np.all(dq[empty] == 0)
    r = dense_attention_backward(go, q, k, v, pattern, key_padding_mask=kpm, sinks=sinks)
    for name, g, x in zip(("dq", "dk", "dv", "dsinks"), (dq, dk, dv, ds), r):
        _close(g, x, np.float64, name)


def test_every_row_without_keys():
    """Every key padded: out 0 and lse = sink everywhere, every gradient 0."""
    q, k, v, go, pattern, _ = _inputs()
    kpm = np.ones((B, NK), dtype=bool)
    sinks = np.array([0.5, -1.0, 2.0, 3.0])
    out, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, sinks=sinks, softcap=3.0, return_lse=True)
    assert np.all(out == 0)
    np.testing.assert_array_equal(lse, np.broadcast_to(sinks[None, :, None], lse.shape))
    for g in sa.sparse_attention_backward(go, q, k, v, pattern, out, lse, key_padding_mask=kpm, sinks=sinks,
                                          softcap=3.0):  # fmt: skip
        assert np.all(g == 0)


def test_softcap_maps_an_infinite_score_to_the_cap():
    """Non-finite policy through tanh: an infinity in k makes scores +-inf, softcap maps them to +-c (a finite row)."""
    q, k, v, _go, pattern, kpm = _inputs()
    k = k.copy()
    k[0, 0, 30, 2] = np.inf
    kw = {"softcap": 2.5, "sinks": np.array([0.0, 1.0, -1.0, 0.5])}
    out, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, **kw)
    _close(out, ref_out, np.float64, "out")
    _close(lse, ref_lse, np.float64, "lse")
    assert np.isfinite(ref_out).all()  # every score of key 30 was capped
    no_cap = dense_attention(q, k, v, pattern, key_padding_mask=kpm, sinks=kw["sinks"])
    assert not np.isfinite(no_cap).all()


# -- the models' combinations -------------------------------------------------------------------------------


def _model_check(q, k, v, pattern, kw, dtype=np.float64, paths_=PATHS, kpm=None, backward=("fused",), scale=None):
    rng = np.random.default_rng(1)
    go = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
    ref_out, ref_lse = dense_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True, scale=scale, **kw)
    ref_grads = dense_attention_backward(go, q, k, v, pattern, key_padding_mask=kpm, scale=scale, **kw)
    qc, kc, vc, goc = (x.astype(dtype) for x in (q, k, v, go))
    for path in paths_:
        out, lse = sa.sparse_attention(qc, kc, vc, pattern, key_padding_mask=kpm, return_lse=True, path=path,
                                       scale=scale, **kw)  # fmt: skip
        _close(out, ref_out, dtype, f"{path} out")
        _close(lse, ref_lse, dtype, f"{path} lse")
    for path in backward:
        grads = sa.sparse_attention_backward(goc, qc, kc, vc, pattern, ref_out.astype(dtype), ref_lse.astype(dtype),
                                             key_padding_mask=kpm, path=path, scale=scale, **kw)  # fmt: skip
        for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
            _close(g, r, dtype if name != "dsinks" else np.result_type(kw["sinks"], np.float32), f"{path} {name}",
                   tol=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gemma2(dtype):
    """Sliding window (causal, 16 keys) + softcap 50 + GQA 2, d 256; scale 1 so scores reach the cap."""
    rng = np.random.default_rng(2)
    n = 48
    q = rng.standard_normal((1, 4, n, 256))
    k, v = (rng.standard_normal((1, 2, n, 256)) for _ in range(2))
    _model_check(q, k, v, sa.causal(n, 15), {"softcap": 50.0}, dtype, scale=1.0, backward=PATHS)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpt_oss(dtype):
    """Causal window 128 + sinks + GQA 8 (8 query heads over 1 kv head), d 64, n 200."""
    rng = np.random.default_rng(3)
    n = 200
    q = rng.standard_normal((1, 8, n, 64))
    k, v = (rng.standard_normal((1, 1, n, 64)) for _ in range(2))
    sinks = rng.standard_normal(8) * 2
    _model_check(q, k, v, sa.causal(n, 127), {"sinks": sinks}, dtype, backward=PATHS)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_modernbert(dtype):
    """Bidirectional window +-64 with key padding (batch 2, batch 1 padded), d 64."""
    rng = np.random.default_rng(4)
    n = 160
    q, k, v = (rng.standard_normal((2, 4, n, 64)) for _ in range(3))
    kpm = np.zeros((2, n), dtype=bool)
    kpm[1, 110:] = True
    _model_check(q, k, v, sa.sliding_window(n, 64), {}, dtype, kpm=kpm, backward=PATHS)


# -- grouped-query ratios, offsets, head dims ---------------------------------------------------------------

RATIOS = [(2, 2), (4, 2), (8, 2), (8, 1), (16, 2)]  # g = 1, 2, 4, 8 and multi-query


@pytest.mark.parametrize("h_q,h_kv", RATIOS)
def test_gqa_ratios_with_modifiers(h_q, h_kv):
    rng = np.random.default_rng(h_q * 10 + h_kv)
    n = 32
    q = rng.standard_normal((2, h_q, n, 8))
    k, v = (rng.standard_normal((2, h_kv, n, 8)) for _ in range(2))
    kw = {"softcap": 3.0, "alibi_slopes": rng.uniform(0.01, 0.5, (2, h_q)), "sinks": rng.standard_normal(h_q)}
    _model_check(q, k, v, sa.causal(n, 9) | sa.random_pattern(n, n, 1, seed=h_q), kw, backward=PATHS)


@pytest.mark.parametrize("n_q", [1, 4])
def test_decode_rows_at_the_end_of_a_cache(n_q):
    """Decode / chunked prefill: sa.causal(n_q, W - 1, n_k=T, offset=T - n_q); ALiBi's diagonal at the bottom right."""
    rng = np.random.default_rng(n_q)
    T, W = 300, 64
    q = rng.standard_normal((1, 4, n_q, 32))
    k, v = (rng.standard_normal((1, 2, T, 32)) for _ in range(2))
    kw = {"softcap": 4.0, "alibi_slopes": np.array([0.5, 0.1, 0.02, 0.004]), "sinks": rng.standard_normal(4)}
    _model_check(q, k, v, sa.causal(n_q, W - 1, n_k=T, offset=T - n_q), kw, backward=PATHS)
    for dtype in (np.float32,):
        _model_check(q, k, v, sa.causal(n_q, W - 1, n_k=T, offset=T - n_q), kw, dtype, paths_=("fused",))


@pytest.mark.parametrize("d", [64, 128, 256])
def test_head_dims(d):
    rng = np.random.default_rng(d)
    n = 40
    q = rng.standard_normal((1, 2, n, d))
    k, v = (rng.standard_normal((1, 2, n, d)) for _ in range(2))
    kw = {"softcap": 5.0, "alibi_slopes": np.array([0.2, 0.05]), "sinks": np.array([1.0, -0.5])}
    _model_check(q, k, v, sa.causal(n, 20), kw, np.float32, backward=PATHS, scale=0.5)


# -- bad input ----------------------------------------------------------------------------------------------


def _bad_f(s, b, h, i, j):
    return {"s": s}["s"] + object()  # nothing Numba can type


def _tuple_f(s, b, h, i, j):
    return (s, s)


def _small():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 8, 4)) for _ in range(3))
    return q, k, v, sa.causal(8)


def _call_all(kw):
    """Every entry point with the modifier keywords ``kw``: forward, backward, the reference and its backward."""
    q, k, v, p = _small()
    yield lambda: sa.sparse_attention(q, k, v, p, **kw)
    yield lambda: sa.sparse_attention_backward(q, q, k, v, p, q, q[..., 0], **kw)
    yield lambda: dense_attention(q, k, v, p, **kw)
    yield lambda: dense_attention_backward(q, q, k, v, p, **kw)


BAD = [
    ({"alibi_slopes": np.ones(3)}, ValueError, r"alibi_slopes has shape \(3,\)"),
    ({"alibi_slopes": np.ones((3, 4))}, ValueError, r"alibi_slopes has shape \(3, 4\)"),
    ({"alibi_slopes": np.ones((4, 1))}, ValueError, r"alibi_slopes has shape \(4, 1\)"),
    ({"alibi_slopes": np.ones(4, dtype=bool)}, TypeError, r"alibi_slopes must be a real floating-point array"),
    ({"alibi_slopes": np.ones(4, dtype=complex)}, TypeError, r"alibi_slopes must be a real floating-point array"),
    ({"alibi_slopes": np.array(["a"] * 4)}, TypeError, r"alibi_slopes must be a real floating-point array"),
    ({"alibi_slopes": np.array([0.1, np.nan, 0.1, 0.1])}, ValueError, r"alibi_slopes must be finite"),
    ({"sinks": np.ones(2)}, ValueError, r"sinks has shape \(2,\)"),
    ({"sinks": np.ones((2, 4, 1))}, ValueError, r"sinks has shape \(2, 4, 1\)"),
    ({"sinks": np.ones(4, dtype=bool)}, TypeError, r"sinks must be a real floating-point array"),
    ({"sinks": np.array([0.0, np.inf, 0.0, 0.0])}, ValueError, r"sinks must be finite"),
    ({"softcap": 0.0}, ValueError, r"softcap must be a finite positive number"),
    ({"softcap": -1.0}, ValueError, r"softcap must be a finite positive number"),
    ({"softcap": np.inf}, ValueError, r"softcap must be a finite positive number"),
    ({"softcap": np.nan}, ValueError, r"softcap must be a finite positive number"),
    ({"softcap": True}, ValueError, r"softcap must be a finite positive number"),
    ({"softcap": np.bool_(True)}, ValueError, r"softcap must be a finite positive number"),
    ({"softcap": "50"}, ValueError, r"softcap must be a finite positive number"),
    ({"score_mod": lambda s, b, h, i, j: s}, TypeError, r"score_mod must be a sparseattn.ScoreMod"),
    ({"score_mod": (_alibi_f, _alibi_df)}, TypeError, r"score_mod must be a sparseattn.ScoreMod"),
]


@pytest.mark.parametrize("kw,exc,match", BAD, ids=[f"{next(iter(kw))}-{i}" for i, (kw, _, _) in enumerate(BAD)])
def test_bad_modifier_arguments(kw, exc, match):
    for call in _call_all(kw):
        with pytest.raises(exc, match=match):
            call()


def test_score_mod_numba_cannot_compile():
    mod = sa.ScoreMod(_bad_f, _alibi_df)
    for call in _call_all({"score_mod": mod}):
        with pytest.raises(TypeError, match=r"score_mod's f \(_bad_f\) cannot be compiled by Numba"):
            call()
    mod = sa.ScoreMod(_alibi_df, _bad_f)  # the derivative
    with pytest.raises(TypeError, match=r"score_mod's df \(_bad_f\) cannot be compiled by Numba"):
        sa.sparse_attention(*_small(), score_mod=mod)
    with pytest.raises(TypeError, match=r"score_mod's f must return a number"):
        sa.sparse_attention(*_small(), score_mod=sa.ScoreMod(_tuple_f, _alibi_df))
    with pytest.raises(TypeError, match=r"ScoreMod's f must be a function"):
        sa.ScoreMod(3.0, _alibi_df)
