"""``patch_longformer``: a loaded transformers Longformer computes its attention with the sparse engine.

Each ``LongformerSelfAttention`` module of the model gets a subclass whose
``forward`` keeps Hugging Face's projections (the same ``nn.Linear``
modules, so weights, state dict and optimiser state are untouched) and
replaces the attention itself:

* ordinary rows: band ``|i - j| <= attention_window // 2`` plus every global
  key, padded keys removed, one softmax -- :func:`sparseattn.torch.sparse_attention`
  (the engine's fused forward and backward), with the global and padded rows
  left out of the pattern;
* global rows: dense over every non-padded key with the ``*_global``
  projections, in torch, as Hugging Face computes them (softmax in float32);
* padded rows: zero.

Batch rows that share their global set and padding go into one engine call.
torch and transformers are imported when :func:`patch_longformer` is called.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ..patterns.builders import _DropRows, global_tokens, sliding_window

__all__ = ["patch_longformer"]

_PATTERN_CACHE_SIZE = 64
_pattern_cache = OrderedDict()
_patched_classes = {}


def _local_pattern(n, radius, is_global, is_pad):
    """Band | global columns, minus the global and padded rows (they are filled another way); cached."""
    key = (n, radius, np.packbits(is_global).tobytes(), np.packbits(is_pad).tobytes())
    p = _pattern_cache.get(key)
    if p is not None:
        _pattern_cache.move_to_end(key)
        return p
    p = sliding_window(n, radius)
    g_idx = np.flatnonzero(is_global)
    if g_idx.size:
        p = p | global_tokens(n, g_idx)
    drop = is_global | is_pad
    if drop.any():
        p = _DropRows(p, drop)
    _pattern_cache[key] = p
    if len(_pattern_cache) > _PATTERN_CACHE_SIZE:
        _pattern_cache.popitem(last=False)
    return p


def _sparse_forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                    is_global_attn=None, output_attentions=False):  # fmt: skip
    """The patched ``LongformerSelfAttention.forward`` (same arguments and outputs as Hugging Face's)."""
    import torch

    from ..torch import sparse_attention

    if output_attentions:  # the engine does not materialise HF's banded probability layout: run HF's code
        return super(type(self), self).forward(
            hidden_states, attention_mask=attention_mask, is_index_masked=is_index_masked,
            is_index_global_attn=is_index_global_attn, is_global_attn=is_global_attn, output_attentions=True,
        )  # fmt: skip
    if self.training and self.dropout > 0:
        raise RuntimeError(
            f"{type(self).__name__} (patched by sparseattn.hf.patch_longformer) cannot apply attention-probability "
            f"dropout (p = {self.dropout}) in training: the engine never materialises the probabilities. Build the "
            f"model with attention_probs_dropout_prob=0.0, or set .dropout = 0.0 on its LongformerSelfAttention "
            f"modules (hidden-state dropout is unaffected)"
        )
    b, n, E = hidden_states.shape
    h, d = self.num_heads, self.head_dim
    if attention_mask is not None:
        if is_index_masked is None:
            is_index_masked = attention_mask < 0
        if is_index_global_attn is None:
            is_index_global_attn = attention_mask > 0
    pad = np.zeros((b, n), bool) if is_index_masked is None else is_index_masked.detach().cpu().numpy().astype(bool)
    glob = np.zeros((b, n), bool) if is_index_global_attn is None else is_index_global_attn.detach().cpu().numpy()
    glob = glob.astype(bool) & ~pad
    scale = 1.0 / math.sqrt(d)

    def heads(t):
        return t.view(b, n, h, d).transpose(1, 2)  # (b, h, n, d), a view

    q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
    groups = {}
    for i in range(b):
        groups.setdefault((glob[i].tobytes(), pad[i].tobytes()), []).append(i)
    parts, order = [], []
    for rows in groups.values():
        r0 = rows[0]
        pattern = _local_pattern(n, self.one_sided_attn_window_size, glob[r0], pad[r0])
        kpm = pad[rows] if pad[r0].any() else None
        if len(rows) == b:
            parts.append(sparse_attention(q, k, v, pattern, scale=scale, key_padding_mask=kpm))
        else:
            sel = torch.as_tensor(rows)
            parts.append(sparse_attention(q[sel], k[sel], v[sel], pattern, scale=scale, key_padding_mask=kpm))
        order.extend(rows)
    ctx = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.as_tensor(np.argsort(order))]
    out = ctx.transpose(1, 2).reshape(b, n, E)

    if glob.any():
        bi, gi = np.nonzero(glob)
        g_out = []
        for i in np.unique(bi):
            rows = torch.as_tensor(gi[bi == i])
            x = hidden_states[i]
            qg = self.query_global(x[rows]).view(-1, h, d).transpose(0, 1) * scale  # (h, G, d)
            kg = self.key_global(x).view(n, h, d).transpose(0, 1)  # (h, n, d)
            vg = self.value_global(x).view(n, h, d).transpose(0, 1)
            scores = torch.matmul(qg, kg.transpose(1, 2))  # (h, G, n)
            if pad[i].any():
                scores = scores.masked_fill(torch.as_tensor(pad[i]), torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)  # as HF: float32 softmax
            g_out.append(torch.matmul(probs, vg).transpose(0, 1).reshape(-1, E))  # (G, E)
        out = out.index_put((torch.as_tensor(bi), torch.as_tensor(gi)), torch.cat(g_out))
    return (out,)


def _patched_class(cls):
    sub = _patched_classes.get(cls)
    if sub is None:
        sub = type(
            f"Sparse{cls.__name__}",
            (cls,),
            {
                "forward": _sparse_forward,
                "__doc__": f"{cls.__name__} whose attention runs on sparseattn (see sparseattn.hf.patch_longformer).",
                "__module__": __name__,
                "_sparseattn_patched": True,
            },
        )
        _patched_classes[cls] = sub
    return sub


def patch_longformer(model):
    """Make every ``LongformerSelfAttention`` of a transformers model compute its attention with sparseattn.

    Works on any model that contains Hugging Face's
    ``transformers.models.longformer.modeling_longformer.LongformerSelfAttention``
    (``LongformerModel``, ``LongformerForMaskedLM``,
    ``LongformerForSequenceClassification``, ...).  Each such module keeps its
    parameters, buffers, hooks and state-dict names; only its ``forward``
    changes (the module's class becomes a subclass of Hugging Face's).
    Patching twice is harmless.

    The patched attention gives Hugging Face's outputs and gradients (up to
    rounding): ordinary tokens attend to their band and to every global token
    through :func:`sparseattn.torch.sparse_attention`; global tokens attend to
    every non-padded key with the ``*_global`` projections, computed densely
    in torch as Hugging Face does; padded tokens output zero.  The masks keep
    their meaning (``attention_mask`` 1/0, ``global_attention_mask`` 1 =
    global).

    Parameters
    ----------
    model : torch.nn.Module
        A loaded transformers model, on the CPU, in float32 or float64.

    Returns
    -------
    torch.nn.Module
        ``model`` itself (patched in place).

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``.
    ValueError
        The model holds no ``LongformerSelfAttention``.

    Notes
    -----
    * ``output_attentions=True``: that call runs Hugging Face's own code (same
      result, stock speed), since the engine never materialises the banded
      probabilities Hugging Face returns.
    * Attention-probability dropout is not applied by the engine: a patched
      module in training mode with ``dropout > 0`` raises a ``RuntimeError``
      (build the model with ``attention_probs_dropout_prob=0.0``).
    * Non-CPU devices and float16/bfloat16 raise the adapter's clear
      ``ValueError``/``TypeError``.
    * ``torch.compile``: each attention call is a graph break.
    """
    import torch
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFSelfAttention

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    found = 0
    for module in model.modules():
        if isinstance(module, HFSelfAttention):
            found += 1
            if not getattr(type(module), "_sparseattn_patched", False):
                module.__class__ = _patched_class(type(module))
    if not found:
        raise ValueError(
            f"model ({type(model).__name__}) holds no transformers LongformerSelfAttention module to patch; "
            f"pass a Longformer model such as LongformerModel or LongformerForMaskedLM"
        )
    return model
