"""The NumPy Longformer layer against a dense float64 reimplementation and against Hugging Face's layer."""

from __future__ import annotations

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.hf import LongformerSelfAttention
from sparseattn.reference import dense_attention

PROJ = ("query", "key", "value", "query_global", "key_global", "value_global")


def random_state(E, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    sd = {}
    for p in PROJ:
        sd[f"{p}.weight"] = rng.standard_normal((E, E)) * (scale / np.sqrt(E))
        sd[f"{p}.bias"] = rng.standard_normal(E) * 0.1
    return sd


def masks(b, n, glob=(), pad=None, seed=0):
    """attention_mask (1 = token, 0 = padding) and global_attention_mask; pad = {batch_row: n_padded_at_end}."""
    am = np.ones((b, n), dtype=np.int64)
    for row, count in (pad or {}).items():
        if count:
            am[row, n - count :] = 0
    gm = np.zeros((b, n), dtype=np.int64)
    gm[:, list(glob)] = 1
    return am, gm


def dense_longformer(sd, x, am, gm, attention_window, num_heads, dilation=None):
    """Hugging Face's semantics written out densely in float64, one (batch, head) at a time."""
    x = np.asarray(x, dtype=np.float64)
    b, n, E = x.shape
    d = E // num_heads
    dil = [1] * num_heads if dilation is None else ([dilation] * num_heads if np.isscalar(dilation) else list(dilation))
    r = attention_window // 2

    def proj(name, inp):
        return inp @ np.asarray(sd[f"{name}.weight"], dtype=np.float64).T + np.asarray(sd[f"{name}.bias"], np.float64)

    pad = am == 0
    glob = (gm == 1) & ~pad
    out = np.zeros((b, n, E))
    off = np.arange(n)[None, :] - np.arange(n)[:, None]  # j - i
    for bi in range(b):
        q, k, v = proj("query", x[bi]), proj("key", x[bi]), proj("value", x[bi])
        qg, kg, vg = proj("query_global", x[bi]), proj("key_global", x[bi]), proj("value_global", x[bi])
        for hh in range(num_heads):
            sl = slice(hh * d, (hh + 1) * d)
            dh = dil[hh]
            allowed = ((np.abs(off) <= r * dh) & (off % dh == 0)) | glob[bi][None, :]
            allowed &= ~pad[bi][None, :]
            s = q[:, sl] @ k[:, sl].T / np.sqrt(d)
            s = np.where(allowed, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            p = np.exp(s - m)
            den = p.sum(axis=1, keepdims=True)
            local = (p / np.where(den > 0, den, 1.0)) @ v[:, sl]
            out[bi, :, sl] = local
            if glob[bi].any():  # a global token is never padded, so its row has a valid key
                sg = qg[glob[bi], sl] @ kg[:, sl].T / np.sqrt(d)
                sg = np.where(~pad[bi][None, :], sg, -np.inf)
                pg = np.exp(sg - sg.max(axis=1, keepdims=True))
                out[bi, glob[bi], sl] = (pg / pg.sum(axis=1, keepdims=True)) @ vg[:, sl]
        out[bi, pad[bi]] = 0
    return out


# -- against the dense float64 reimplementation (no torch needed) ---------------------------------

CASES = [
    # (n, attention_window, global indices, padding per batch row)
    (1, 2, (), None),
    (9, 2, (), None),
    (23, 6, (0,), None),
    (23, 6, (0, 5, 6, 7, 22), {1: 5}),
    (17, 40, (8,), {0: 3, 1: 16}),  # window wider than n
    (40, 8, (0, 39), {1: 11}),  # both ends
    (31, 4, tuple(range(31)), {1: 4}),  # every token global
    (12, 4, (), {0: 12}),  # a fully padded sequence
]


@pytest.mark.parametrize("n, W, glob, pad", CASES)
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_matches_dense_reference(n, W, glob, pad, dtype, tol):
    E, h, b = 24, 3, 2
    sd = random_state(E, seed=n * 100 + W)
    layer = LongformerSelfAttention.from_state_dict(sd, attention_window=W, num_heads=h)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((b, n, E)).astype(dtype)
    am, gm = masks(b, n, glob, pad)
    x0, am0, gm0 = x.copy(), am.copy(), gm.copy()
    out = layer(x, am, gm)
    assert out.dtype == dtype and out.shape == (b, n, E)
    np.testing.assert_array_equal(x, x0)  # inputs untouched
    np.testing.assert_array_equal(am, am0)
    np.testing.assert_array_equal(gm, gm0)
    ref = dense_longformer(sd, x, am, gm, W, h)
    assert np.abs(out - ref).max() <= tol
    assert np.all(out[am == 0] == 0)


@pytest.mark.parametrize("dilation", [2, (1, 2, 3, 4), (3, 1, 1, 2)])
@pytest.mark.parametrize("glob, pad", [((), None), ((0, 13), {1: 6})])
def test_dilation_matches_dense_reference(dilation, glob, pad):
    E, h, b, n, W = 32, 4, 2, 45, 6
    sd = random_state(E, seed=7)
    layer = LongformerSelfAttention.from_state_dict(sd, attention_window=W, num_heads=h, dilation=dilation)
    x = np.random.default_rng(1).standard_normal((b, n, E))
    am, gm = masks(b, n, glob, pad)
    out = layer(x, am, gm)
    ref = dense_longformer(sd, x, am, gm, W, h, dilation=dilation)
    assert np.abs(out - ref).max() <= 1e-10
    # dilation really changes the result (heads with d > 1 see other keys)
    plain = LongformerSelfAttention.from_state_dict(sd, attention_window=W, num_heads=h)(x, am, gm)
    assert np.abs(out - plain).max() > 1e-3


def test_merged_attention_mask_equals_separate_masks():
    E, h, b, n, W = 16, 2, 3, 20, 4
    sd = random_state(E, seed=3)
    layer = LongformerSelfAttention(sd, W, h)
    x = np.random.default_rng(2).standard_normal((b, n, E))
    am, gm = masks(b, n, (1, 2, 19), {0: 4, 2: 1})
    gm[2, 5] = 1  # row 2 has its own global set
    gm[0, 18] = 1  # a padded position marked global stays padded (HF multiplies the masks)
    merged = am * (gm + 1)
    np.testing.assert_array_equal(layer(x, merged), layer(x, am, gm))
    np.testing.assert_array_equal(layer(x, am, gm), layer(x, am.astype(bool), gm.astype(float)))
    ref = dense_longformer(sd, x, am, gm, W, h)
    assert np.abs(layer(x, am, gm) - ref).max() <= 1e-10


def test_default_masks_mean_no_padding_no_global():
    E, h, n, W = 16, 4, 15, 4
    sd = random_state(E, seed=4)
    layer = LongformerSelfAttention(sd, W, h)
    x = np.random.default_rng(5).standard_normal((2, n, E)).astype(np.float32)
    am, gm = masks(2, n)
    np.testing.assert_array_equal(layer(x), layer(x, am, gm))
    np.testing.assert_array_equal(layer(x, global_attention_mask=gm), layer(x, am, gm))


def test_shared_global_weights_equal_dense_attention_over_longformer_pattern():
    """With *_global = local weights the layer is plain attention over band | global rows | global columns."""
    E, h, b, n, W = 24, 3, 2, 33, 6
    sd = random_state(E, seed=11)
    for p in ("query", "key", "value"):
        sd[f"{p}_global.weight"], sd[f"{p}_global.bias"] = sd[f"{p}.weight"], sd[f"{p}.bias"]
    layer = LongformerSelfAttention(sd, W, h)
    x = np.random.default_rng(9).standard_normal((b, n, E))
    glob = [0, 16, 32]
    am, gm = masks(b, n, glob, {1: 7})
    out = layer(x, am, gm)
    pattern = sa.longformer(n, attention_window=W, global_indices=glob)

    def heads(name):
        y = x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
        return y.reshape(b, n, h, E // h).transpose(0, 2, 1, 3)

    ref = dense_attention(heads("query"), heads("key"), heads("value"), pattern, key_padding_mask=am == 0)
    ref = ref.transpose(0, 2, 1, 3).reshape(b, n, E)
    ref[am == 0] = 0
    assert np.abs(out - ref).max() <= 1e-10


@pytest.mark.parametrize("path", ["staged", "fused"])
def test_engine_paths_agree(path):
    E, h, b, n, W = 32, 4, 2, 50, 8
    sd = random_state(E, seed=12)
    layer = LongformerSelfAttention(sd, W, h, dilation=(1, 1, 2, 2))
    x = np.random.default_rng(3).standard_normal((b, n, E)).astype(np.float32)
    am, gm = masks(b, n, (0, 25), {1: 9})
    try:
        out = layer(x, am, gm, path=path)
    except ImportError:
        pytest.skip(f"the {path} engine path is not available")
    ref = dense_longformer(sd, x, am, gm, W, h, dilation=(1, 1, 2, 2))
    assert np.abs(out - ref).max() <= 1e-5
    np.testing.assert_allclose(out, layer(x, am, gm, path="auto"), atol=1e-5, rtol=0)


def test_batch_rows_are_independent():
    """Each batch row's result does not depend on the other rows (their masks or global sets)."""
    E, h, b, n, W = 16, 2, 4, 26, 4
    sd = random_state(E, seed=13)
    layer = LongformerSelfAttention(sd, W, h)
    x = np.random.default_rng(4).standard_normal((b, n, E))
    am, gm = masks(b, n, (), {1: 3, 3: 10})
    gm[0, [0, 1]] = 1
    gm[2, 25] = 1
    gm[3, 0] = 1
    out = layer(x, am, gm)
    for i in range(b):
        np.testing.assert_allclose(out[i : i + 1], layer(x[i : i + 1], am[i : i + 1], gm[i : i + 1]), atol=1e-12)


def test_prefix_and_extra_keys():
    E = 8
    sd = random_state(E, seed=1)
    prefix = "longformer.encoder.layer.3.attention.self."
    full = {prefix + k: v for k, v in sd.items()}
    full["longformer.encoder.layer.3.attention.output.dense.weight"] = np.zeros((E, E))
    full["longformer.encoder.layer.2.attention.self.query.weight"] = np.ones((E, E))
    layer = LongformerSelfAttention.from_state_dict(full, prefix, attention_window=2, num_heads=2)
    for k, v in sd.items():
        np.testing.assert_array_equal(layer.params[k], v)
    # the layer keeps copies: changing the caller's arrays later changes nothing
    full[prefix + "query.weight"][:] = 0
    assert np.abs(layer.params["query.weight"]).max() > 0
    assert "attention_window=2" in repr(layer)


def test_from_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    E, h, n, W = 16, 2, 21, 4
    sd = {k: v.astype(np.float32) for k, v in random_state(E, seed=21).items()}
    prefix = "encoder.layer.0.attention.self."
    tensors = {prefix + k: v for k, v in sd.items()}
    tensors["encoder.layer.0.attention.output.dense.weight"] = np.zeros((E, E), np.float32)
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, str(path))
    layer = LongformerSelfAttention.from_safetensors(path, prefix, attention_window=W, num_heads=h)
    direct = LongformerSelfAttention.from_state_dict(sd, attention_window=W, num_heads=h)
    x = np.random.default_rng(0).standard_normal((2, n, E)).astype(np.float32)
    am, gm = masks(2, n, (3,), {0: 2})
    np.testing.assert_array_equal(layer(x, am, gm), direct(x, am, gm))
    assert np.abs(layer(x, am, gm) - dense_longformer(sd, x, am, gm, W, h)).max() <= 1e-5
    with pytest.raises(ValueError, match="prefix"):
        LongformerSelfAttention.from_safetensors(path, "nope.", attention_window=W, num_heads=h)
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.key_global\.bias"):
        partial = {k: v for k, v in tensors.items() if not k.endswith("key_global.bias")}
        st.save_file(partial, str(tmp_path / "partial.safetensors"))
        LongformerSelfAttention.from_safetensors(tmp_path / "partial.safetensors", prefix, attention_window=W, num_heads=h)


def test_from_safetensors_bad_files(tmp_path):
    """Unreadable paths are OSError, bad content is ValueError; both name the path."""
    import os
    import re

    st = pytest.importorskip("safetensors.numpy")
    E = 8
    sd = {k: v.astype(np.float32) for k, v in random_state(E, seed=2).items()}
    good = tmp_path / "good.safetensors"
    st.save_file(sd, str(good))
    raw = good.read_bytes()
    kw = dict(attention_window=2, num_heads=2)
    assert LongformerSelfAttention.from_safetensors(good, **kw).embed_dim == E
    assert LongformerSelfAttention.from_safetensors(os.fsencode(good), **kw).embed_dim == E  # bytes paths too

    content_cases = {
        "truncated": raw[:-7],  # the header promises more data than the file holds
        "cut_in_header": raw[:5],
        "empty": b"",
        "garbage": b"this is not a safetensors file at all",
    }
    for name, data in content_cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(str(path))) as info:
            LongformerSelfAttention.from_safetensors(path, **kw)
        assert not isinstance(info.value, OSError)

    # a tensor NumPy cannot hold (bfloat16) is bad content too
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, str(bf16))
    with pytest.raises(ValueError, match=re.escape(str(bf16)) + ".*bfloat16"):
        LongformerSelfAttention.from_safetensors(bf16, **kw)

    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        LongformerSelfAttention.from_safetensors(tmp_path, **kw)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LongformerSelfAttention.from_safetensors(missing, **kw)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.safetensors"
        locked.write_bytes(raw)
        locked.chmod(0)
        try:
            with pytest.raises(PermissionError, match=re.escape(str(locked))):
                LongformerSelfAttention.from_safetensors(locked, **kw)
        finally:
            locked.chmod(0o600)
    # configuration errors are reported before the file is touched
    with pytest.raises(ValueError, match="attention_window"):
        LongformerSelfAttention.from_safetensors(missing, attention_window=3, num_heads=2)
    with pytest.raises(TypeError, match="path must be"):
        LongformerSelfAttention.from_safetensors(123, **kw)


# -- bad input ------------------------------------------------------------------------------------


def test_bad_weights():
    E = 8
    sd = random_state(E, seed=0)
    missing = {k: v for k, v in sd.items() if k != "value_global.weight"}
    with pytest.raises(ValueError, match=r"pre\.value_global\.weight"):
        LongformerSelfAttention.from_state_dict({"pre." + k: v for k, v in missing.items()}, "pre.",
                                                attention_window=2, num_heads=2)
    bad = dict(sd, **{"key.bias": np.zeros(E + 1)})
    with pytest.raises(ValueError, match=r"key\.bias has shape \(9,\), expected \(8,\)"):
        LongformerSelfAttention(bad, 2, 2)
    bad = dict(sd, **{"value.weight": np.zeros((E, E + 2))})
    with pytest.raises(ValueError, match=r"value\.weight has shape \(8, 10\), expected \(8, 8\)"):
        LongformerSelfAttention(bad, 2, 2)
    bad = dict(sd, **{"query.weight": np.zeros((E, 3))})
    with pytest.raises(ValueError, match=r"query\.weight has shape \(8, 3\)"):
        LongformerSelfAttention(bad, 2, 2)
    with pytest.raises(TypeError, match="mapping"):
        LongformerSelfAttention([1, 2], 2, 2)
    with pytest.raises(TypeError, match="real numbers"):
        LongformerSelfAttention(dict(sd, **{"key.bias": np.array(["a"] * E)}), 2, 2)


def test_bad_configuration():
    sd = random_state(12, seed=0)
    for w in (3, 0, -2):
        with pytest.raises(ValueError, match=f"attention_window must be a positive even integer.*got {w}"):
            LongformerSelfAttention(sd, w, 2)
    with pytest.raises(TypeError, match="attention_window"):
        LongformerSelfAttention(sd, 4.0, 2)
    with pytest.raises(TypeError, match=r"config.attention_window\[layer_id\]"):
        LongformerSelfAttention(sd, [4, 4], 2)
    with pytest.raises(ValueError, match="E = 12.*not divisible by num_heads = 5"):
        LongformerSelfAttention(sd, 4, 5)
    with pytest.raises(ValueError, match="num_heads"):
        LongformerSelfAttention(sd, 4, 0)
    with pytest.raises(ValueError, match="one entry per head.*num_heads=3.*got 2"):
        LongformerSelfAttention(sd, 4, 3, dilation=(1, 2))
    with pytest.raises(ValueError, match=r"dilation\[1\]"):
        LongformerSelfAttention(sd, 4, 2, dilation=(1, 0))


def test_bad_forward_inputs():
    E, n = 8, 6
    layer = LongformerSelfAttention(random_state(E, seed=0), 2, 2)
    x = np.zeros((2, n, E), dtype=np.float32)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(batch, n, E\) with E = 8, got shape \(2, 6, 7\)"):
        layer(np.zeros((2, n, 7)))
    with pytest.raises(ValueError, match="got shape"):
        layer(np.zeros((n, E)))
    with pytest.raises(TypeError, match="float32 or float64"):
        layer(np.zeros((2, n, E), dtype=np.int64))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, n\) = \(2, 6\).*got \(2, 5\)"):
        layer(x, np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"global_attention_mask must have shape.*got \(6,\)"):
        layer(x, None, np.ones(n))
    with pytest.raises(ValueError, match=r"attention_mask may only hold the values \[0, 1, 2\], got \[-10000"):
        layer(x, np.full((2, n), -10000.0))
    with pytest.raises(ValueError, match=r"global_attention_mask may only hold the values \[0, 1\], got \[2\]"):
        layer(x, None, np.full((2, n), 2))


def test_empty_inputs():
    E = 8
    layer = LongformerSelfAttention(random_state(E, seed=0), 2, 2)
    assert layer(np.zeros((0, 5, E))).shape == (0, 5, E)
    out = layer(np.zeros((2, 0, E), dtype=np.float32))
    assert out.shape == (2, 0, E) and out.dtype == np.float32


# -- against Hugging Face transformers ----------------------------------------------------------


def _hf_layer(E, h, W, dtype_name, seed):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFLayer

    dtype = getattr(torch, dtype_name)
    cfg = LongformerConfig(hidden_size=E, num_attention_heads=h, attention_window=[W], attention_probs_dropout_prob=0.0)
    layer = HFLayer(cfg, layer_id=0).eval().to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 2.0 / np.sqrt(E) if name.endswith("weight") else 0.1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * scale)
    return torch, layer


def _hf_forward(torch, layer, x, am, gm, W):
    """Run HF's layer the way LongformerModel does: merge masks, pad to a multiple of W, strip the padding."""
    b, n, E = x.shape
    n_pad = (W - n % W) % W
    filler = np.random.default_rng(99).standard_normal((b, n_pad, E)).astype(x.dtype)  # padded keys must not matter
    xp = np.concatenate([x, filler], axis=1)
    merged = np.concatenate([am * (gm + 1), np.zeros((b, n_pad), dtype=am.dtype)], axis=1)
    mask = torch.tensor(np.where(merged == 0, -10000.0, np.where(merged == 2, 10000.0, 0.0)), dtype=layer.query.weight.dtype)
    with torch.no_grad():
        out = layer(
            torch.from_numpy(xp),
            attention_mask=mask,
            is_index_masked=mask < 0,
            is_index_global_attn=mask > 0,
            is_global_attn=bool((mask > 0).any()),
        )[0]
    return out.numpy()[:, :n]


HF_CASES = [
    # (n, W, global indices, padding per batch row)
    (32, 8, (), None),
    (45, 8, (0,), None),
    (45, 8, (0, 11, 20, 31), {1: 9}),  # many, padding in one row
    (40, 16, (5, 6, 7), {0: 3}),  # adjacent
    (50, 6, (0, 49), {1: 1}),  # both ends
    (13, 32, (4,), {1: 5}),  # window wider than n
    (64, 64, (0, 1, 62, 63), {0: 20, 1: 2}),
    (27, 4, tuple(range(0, 27, 3)), None),  # HF fails for W = 2 (one-sided 1); ours handles it
]


@pytest.mark.compat
@pytest.mark.parametrize("n, W, glob, pad", HF_CASES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_matches_transformers(n, W, glob, pad, dtype_name):
    E, h, b = 48, 4, 2
    torch, hf = _hf_layer(E, h, W, dtype_name, seed=n + W)
    np_dtype = np.dtype(dtype_name)
    layer = LongformerSelfAttention.from_state_dict(
        {k: v.numpy() for k, v in hf.state_dict().items()}, attention_window=W, num_heads=h
    )
    x = np.random.default_rng(n * W).standard_normal((b, n, E)).astype(np_dtype)
    am, gm = masks(b, n, glob, pad)
    out = layer(x, am, gm)
    ref = _hf_forward(torch, hf, x, am, gm, W)
    assert out.dtype == np_dtype
    # HF runs the softmax in float32 even for float64 input: compare at float32 precision.
    assert np.abs(out - ref).max() <= 1e-5
    assert np.all(out[am == 0] == 0) and np.all(ref[am == 0] == 0)


@pytest.mark.compat
def test_matches_transformers_per_row_global_sets():
    E, h, b, n, W = 32, 2, 3, 30, 10
    torch, hf = _hf_layer(E, h, W, "float32", seed=5)
    layer = LongformerSelfAttention.from_state_dict(hf.state_dict(), attention_window=W, num_heads=h)
    x = np.random.default_rng(6).standard_normal((b, n, E)).astype(np.float32)
    am, gm = masks(b, n, (), {2: 12})
    gm[0, [0, 29]] = 1
    gm[2, [3, 4, 5, 6]] = 1  # row 1 has no global token at all
    out = layer(x, am, gm)
    assert np.abs(out - _hf_forward(torch, hf, x, am, gm, W)).max() <= 1e-5


@pytest.mark.compat
def test_matches_transformers_model_hidden_layer():
    """One layer of a real LongformerModel: user-facing masks, the model's own padding, a prefixed state dict."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    E, h, W, n = 32, 4, 8, 21
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(
        hidden_size=E, num_attention_heads=h, num_hidden_layers=2, intermediate_size=64, attention_window=[W, W],
        vocab_size=100, max_position_embeddings=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )
    model = transformers.LongformerModel(cfg).eval()
    captured = {}

    def hook(module, args, kwargs, output):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        captured["out"] = output[0].detach().clone()

    handle = model.encoder.layer[1].attention.self.register_forward_hook(hook, with_kwargs=True)
    ids = torch.randint(3, 100, (2, n), generator=torch.Generator().manual_seed(1))
    am, gm = masks(2, n, (0, 7), {1: 6})
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.from_numpy(am), global_attention_mask=torch.from_numpy(gm))
    handle.remove()
    layer = LongformerSelfAttention.from_state_dict(
        model.state_dict(), "encoder.layer.1.attention.self.", attention_window=W, num_heads=h
    )
    x = captured["x"].numpy()[:, :n]
    out = layer(x, am, gm)
    assert np.abs(out - captured["out"].numpy()[:, :n]).max() <= 1e-5


def test_longformer_name_is_only_the_pattern_builder():
    """``sparseattn.longformer`` is the pattern builder; the layer lives in ``sparseattn.hf``."""
    import inspect

    import sparseattn.hf

    assert inspect.isfunction(sa.longformer)
    assert sa.longformer(7, attention_window=2, global_indices=[0]) == (sa.sliding_window(7, 1) | sa.global_tokens(7, [0]))
    assert list(inspect.signature(sa.longformer).parameters) == ["n", "attention_window", "global_indices"]
    assert not hasattr(sa.longformer, "LongformerSelfAttention")
    assert sparseattn.hf.LongformerSelfAttention is LongformerSelfAttention


def test_hf_imports_without_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys; import sparseattn.hf as h; from sparseattn.hf import LongformerSelfAttention; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.compat
@pytest.mark.slow
def test_matches_transformers_base_size():
    """longformer-base geometry (E = 768, 12 heads) with its default initialisation, uneven n, padding, globals."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFLayer

    E, h, W, n, b = 768, 12, 256, 700, 2
    torch.manual_seed(0)
    cfg = LongformerConfig(hidden_size=E, num_attention_heads=h, attention_window=[W], attention_probs_dropout_prob=0.0)
    hf = HFLayer(cfg, layer_id=0).eval()
    layer = LongformerSelfAttention.from_state_dict(hf.state_dict(), attention_window=W, num_heads=h)
    x = np.random.default_rng(0).standard_normal((b, n, E)).astype(np.float32)
    am, gm = masks(b, n, (0, 1, 2, 350, 699), {1: 123})
    out = layer(x, am, gm)
    assert np.abs(out - _hf_forward(torch, hf, x, am, gm, W)).max() <= 1e-5
