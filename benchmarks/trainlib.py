"""Forward + backward workloads for the training benchmarks (``test_backward.py``).

Each maker returns ``(fn, info, check)`` like :func:`benchlib.make_method`:
``fn()`` runs one training step of the attention core on H1-shaped inputs
(12 heads, d 64, float32, band radius r plus the first ``g`` tokens global)
and returns the forward output; ``check(out)`` compares that output with the
float64 oracle on a few rows (the gradients are checked against the analytic
float64 gradient in ``tests/test_backward.py``, not here).

Methods
-------
``sparseattn-fwd``
    ``sparse_attention(..., return_lse=True)``: the forward a training step runs.
``sparseattn-bwd``
    ``sparse_attention_backward`` from a saved forward (the backward alone).
``sparseattn-train``
    Both, one after the other.
``hf-longformer-train``
    Hugging Face ``LongformerSelfAttention``'s attention core (projections replaced by
    identities, as in ``benchlib.make_hf_longformer``), forward + ``backward()``.
``torch-sdpa-train``
    ``scaled_dot_product_attention`` with the dense boolean mask, forward + ``backward()``.
``sparseattn-torch-train``
    ``sparseattn.torch.sparse_attention`` forward + ``torch.autograd.grad``: the torch adapter
    around the same two NumPy calls as ``sparseattn-train`` (its overhead is the difference).

:func:`make_hf_layer_train` builds one whole Hugging Face ``LongformerSelfAttention`` layer
(projections included), stock or patched with :func:`sparseattn.hf.patch_longformer`, for a
forward + backward step (``test_hf_layer.py``).
"""

from __future__ import annotations

import numpy as np

import benchlib

#: peers' training steps need about twice their forward memory: keep their sizes below the forward's
TRAIN_PEER_MAX_N = {"hf-longformer-train": 16384, "torch-sdpa-train": 4096}


def _grad_out(shape, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _sparse(method, q, k, v, pattern):
    import sparseattn as sa

    out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True)
    go = _grad_out(out.shape, out.dtype)

    def fwd():
        return sa.sparse_attention(q, k, v, pattern, return_lse=True)[0]

    def bwd():
        sa.sparse_attention_backward(go, q, k, v, pattern, out, lse)
        return out

    def train():
        o, ls = sa.sparse_attention(q, k, v, pattern, return_lse=True)
        sa.sparse_attention_backward(go, q, k, v, pattern, o, ls)
        return o

    return {"sparseattn-fwd": fwd, "sparseattn-bwd": bwd, "sparseattn-train": train}[method]


def _hf_train(x, n, radius, n_globals):
    """HF's attention core with autograd: the forward of ``benchlib.make_hf_longformer``, then backward."""
    torch = benchlib._torch()
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    h, _, d = x.shape
    cfg = LongformerConfig(hidden_size=h * d, num_attention_heads=h, attention_window=[2 * radius],
                           attention_probs_dropout_prob=0.0)  # fmt: skip
    layer = LongformerSelfAttention(cfg, 0)

    class _Copy(torch.nn.Module):
        def forward(self, t):
            return t.clone()

    layer.query = _Copy()
    for name in ("key", "value", "query_global", "key_global", "value_global"):
        setattr(layer, name, torch.nn.Identity())
    base = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (1, 0, 2)).reshape(1, n, h * d)))
    am = torch.zeros(1, n, dtype=base.dtype)
    am[0, torch.from_numpy(benchlib.global_indices(n, n_globals))] = 10000.0
    kw = dict(attention_mask=am, is_index_masked=am < 0, is_index_global_attn=am > 0, is_global_attn=bool(n_globals))
    go = torch.from_numpy(_grad_out((1, n, h * d), np.float32))

    def run():
        hidden = base.detach().clone().requires_grad_(True)
        out = layer(hidden, **kw)[0]
        out.backward(go)
        return out.detach()[0].reshape(n, h, d).permute(1, 0, 2)

    return run


def _sdpa_train(q, k, v, n, radius, n_globals):
    torch = benchlib._torch()
    mask = torch.from_numpy(benchlib.dense_mask_rows(n, radius, n_globals, 0, n))
    go = torch.from_numpy(_grad_out(q.shape, np.float32))[None]
    base = [torch.from_numpy(np.array(a))[None] for a in (q, k, v)]  # writable copies of the cached inputs

    def run():
        tq, tk, tv = (t.detach().requires_grad_(True) for t in base)
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
        out.backward(go)
        return out.detach()[0]

    return run


def _torch_adapter_train(q, k, v, pattern):
    torch = benchlib._torch()
    from sparseattn.torch import sparse_attention

    base = [torch.from_numpy(np.array(a)) for a in (q, k, v)]  # writable copies of the cached inputs
    go = torch.from_numpy(_grad_out(q.shape[:-1] + (v.shape[-1],), q.dtype))

    def run():
        tq, tk, tv = (t.detach().requires_grad_(True) for t in base)
        out = sparse_attention(tq, tk, tv, pattern)
        torch.autograd.grad(out, (tq, tk, tv), go)
        return out.detach()

    return run


def make_train_method(method, *, n, radius=256, n_globals=1, heads=12, d=64):
    """``(fn, info, check)`` for one training-step method on H1-shaped float32 inputs."""
    import pytest

    if method in TRAIN_PEER_MAX_N:
        for mod in ("torch",) + (("transformers",) if method.startswith("hf") else ()):
            pytest.importorskip(mod, reason=f"{method} needs {mod} (extra 'compare')")
        if n > TRAIN_PEER_MAX_N[method]:
            pytest.skip(f"{method} is only run up to n={TRAIN_PEER_MAX_N[method]} (memory/time), asked n={n}")
        if method.startswith("hf") and n % (2 * radius):
            pytest.skip(f"HF Longformer needs n % (2*radius) == 0, got n={n}, radius={radius}")
    if benchlib.quick():
        heads = min(heads, 2)
    q, k, v = benchlib.qkv(heads, n, d, "float32")
    nnz = benchlib.band_global_nnz(n, radius, n_globals)
    if method == "sparseattn-torch-train":
        import pytest

        pytest.importorskip("torch", reason="the torch adapter needs torch (extra 'compat')")
        fn, ref = _torch_adapter_train(q, k, v, benchlib.band_global_pattern(n, radius, n_globals)), (q, k, v)
    elif method.startswith("sparseattn"):
        fn, ref = _sparse(method, q, k, v, benchlib.band_global_pattern(n, radius, n_globals)), (q, k, v)
    elif method == "hf-longformer-train":
        fn, ref = _hf_train(q, n, radius, n_globals), (q, q, q)
    elif method == "torch-sdpa-train":
        fn, ref = _sdpa_train(q, k, v, n, radius, n_globals), (q, k, v)
    else:
        raise ValueError(f"unknown training method {method!r}")
    products = {"sparseattn-fwd": 2, "sparseattn-bwd": 5}.get(method, 7)  # matmuls per allowed pair
    info = dict(
        method=method, n=n, radius=radius, globals=n_globals, heads=heads, d=d, batch=1, dtype="float32",
        nnz=nnz, density=nnz / float(n) ** 2, useful_flop=2 * products * nnz * d * heads,
        qkvo_bytes=4 * q.nbytes, out_bytes=q.nbytes,
        qkv_out_grad_bytes=5 * q.nbytes,  # q, k, v, out and grad_out: the backward's memory yardstick
    )  # fmt: skip

    def check(out):
        return benchlib.assert_matches(benchlib.to_numpy(out), *ref, n, radius, n_globals, method)

    return fn, info, check


def make_hf_layer_train(which, *, n, hidden=768, heads=12, attention_window=512, n_globals=1, batch=1):
    """``(fn, info, check)``: one HF ``LongformerSelfAttention`` layer, forward + backward (inputs and weights).

    ``which`` is ``"stock"`` (Hugging Face's code) or ``"patched"``
    (:func:`sparseattn.hf.patch_longformer`). Both are built from the same seeded
    weights; the first ``n_globals`` tokens are global, nothing is padded. ``check``
    compares the output with :class:`sparseattn.hf.LongformerSelfAttention` in
    float64 (an independent NumPy implementation) on the whole output.
    """
    import pytest

    pytest.importorskip("torch", reason="needs torch (extra 'compat')")
    pytest.importorskip("transformers", reason="needs transformers (extra 'compat')")
    torch = benchlib._torch()
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    from sparseattn.hf import LongformerSelfAttention as NumpyLayer
    from sparseattn.hf import patch_longformer

    if which not in ("stock", "patched"):
        raise ValueError(f"which must be 'stock' or 'patched', got {which!r}")
    if benchlib.quick():
        heads, hidden = min(heads, 2), min(heads, 2) * (hidden // heads)
    if n % attention_window:
        pytest.skip(f"HF's layer needs n % attention_window == 0, got n={n}, attention_window={attention_window}")
    cfg = LongformerConfig(hidden_size=hidden, num_attention_heads=heads, attention_window=[attention_window],
                           attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    layer = LongformerSelfAttention(cfg, 0)
    if which == "patched":
        holder = torch.nn.ModuleList([layer])
        patch_longformer(holder)
        layer = holder[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, n, hidden, generator=gen)
    go = torch.randn(batch, n, hidden, generator=gen)
    mask = torch.zeros(batch, n)
    mask[:, :n_globals] = torch.finfo(torch.float32).max  # HF's layer-level mask: > 0 global, < 0 padded
    kw = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=n_globals > 0)
    params = list(layer.parameters())

    def run():
        hidden_states = x.detach().requires_grad_(True)
        out = layer(hidden_states, **kw)[0]
        torch.autograd.grad(out, [hidden_states] + params, go)
        return out.detach()

    def check(out):
        ref_layer = NumpyLayer.from_state_dict({k: v.double().numpy() for k, v in layer.state_dict().items()},
                                               attention_window=attention_window, num_heads=heads)  # fmt: skip
        gm = np.zeros((batch, n), dtype=np.int8)
        gm[:, :n_globals] = 1
        ref = ref_layer(x.double().numpy(), None, gm)
        err = float(np.max(np.abs(benchlib.to_numpy(out) - ref)) / max(1.0, np.max(np.abs(ref))))
        if not err <= 1e-4:
            raise AssertionError(f"HF layer ({which}): output differs from the float64 NumPy layer by {err:.3e}")
        return err

    d = hidden // heads
    band = benchlib.band_global_nnz(n, attention_window // 2, n_globals)
    info = dict(
        method=f"hf-layer-{which}", n=n, hidden=hidden, heads=heads, d=d, batch=batch, attention_window=attention_window,
        radius=attention_window // 2, globals=n_globals, dtype="float32", nnz=band,
    )  # fmt: skip
    return run, info, check
