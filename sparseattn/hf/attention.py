"""The attention half of ``attn_implementation="sparseattn"``: one call of the torch adapter per layer.

transformers calls :func:`sparse_attention_forward` with ``query`` of shape
``(batch, h_q, n_q, d)`` (rotary applied), ``key``/``value`` of shape
``(batch, h_kv, n_k, d)`` (the whole cache, not repeated for grouped-query
heads), the mask object its mask function made (:class:`~.masks.SparseMask`),
and the layer's options.  Here they become one
:func:`sparseattn.torch.sparse_attention` call (forward and backward on the
engine; grouped-query heads read ``k``/``v`` in place on the heads axis):

* ``scaling`` -> ``scale``; ``softcap`` -> ``softcap``; ``s_aux`` (GPT-OSS's
  learned sink logits, one per query head) -> ``sinks``, differentiable;
* the mask's pattern and ``key_padding_mask``; ``sliding_window`` and
  ``is_causal`` are already in the pattern (the mask is the one source of
  truth: ModernBERT passes ``sliding_window = half window + 1`` for
  FlashAttention's convention while its mask says ``|i - j| <= half window``).
  Only without a mask (``attention_mask=None``, a direct call) do they pick the
  pattern: causal (bottom-right) with ``W`` keys per query, or full;
* the result comes back as ``(batch, n_q, h_q, d)`` and ``None`` weights.

Refused with an error that names the option: attention-probability dropout
while training (``dropout > 0``; set the config's ``attention_dropout`` to 0),
``position_bias``, half-precision inputs, a mask whose lengths disagree with
``query``/``key``.  ``output_attentions=True`` warns once and returns ``None``
weights, as transformers' ``sdpa`` does (use ``eager`` to see the weights).
"""

from __future__ import annotations

import functools
import inspect
import logging

from ..patterns.base import as_pattern
from ..patterns.windows import causal
from ..patterns.windows import sliding_window as _sliding_window
from .masks import SparseMask

__all__ = ["sparse_attention_forward"]

logger = logging.getLogger(__name__)
_warned = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


@functools.cache
def _engine_options():
    from ..torch import sparse_attention

    return set(inspect.signature(sparse_attention).parameters)


@functools.cache
def _softcap_applied():
    """Whether the engine's kernels apply ``softcap`` (a keyword that validates but changes nothing would be wrong)."""
    import numpy as np

    from ..engine.attention import sparse_attention
    from ..patterns.runs import full

    q, k, v = np.ones((1, 1)), np.array([[3.0], [0.0]]), np.array([[1.0], [0.0]])
    plain = sparse_attention(q, k, v, full(1, n_k=2), scale=1.0)
    capped = sparse_attention(q, k, v, full(1, n_k=2), scale=1.0, softcap=1.0)
    return not np.allclose(plain, capped)


def _check_supported(name, value, options, what):
    if value is None:
        return
    if name not in options or (name == "softcap" and not _softcap_applied()):
        raise NotImplementedError(
            f"{what} ({name}={value if not hasattr(value, 'shape') else tuple(value.shape)}) needs the engine's "
            f"'{name}' option, which this version of sparseattn does not apply; run this model with "
            f"attn_implementation='eager' until it lands"
        )


def _mask_from_tensor(mask, n_q, n_k):
    """A user's 4-D mask tensor (bool: True = attend; float: 0 = attend) as one pattern per batch row."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (n_q, n_k):
        raise ValueError(
            f"attention_mask must be a sparseattn mask (from the 'sparseattn' mask function) or a 4-D tensor of shape "
            f"(batch, 1, {n_q}, {n_k}), got shape {tuple(mask.shape)}"
        )
    allowed = (mask == 0) if mask.dtype.is_floating_point else mask.bool()
    allowed = allowed.detach().cpu().numpy().astype(bool)
    return [as_pattern(allowed[b, 0], "attention_mask") for b in range(allowed.shape[0])]


def _default_pattern(n_q, n_k, causal_layer, sliding_window):
    if causal_layer:
        return causal(n_q, None if sliding_window is None else int(sliding_window) - 1, n_k=n_k)
    if sliding_window is not None:
        raise ValueError(
            f"attention_mask is None and the layer is bidirectional with sliding_window={sliding_window}: the window's "
            f"convention is the model's own; build the mask with transformers' mask functions "
            f"(attn_implementation='sparseattn' does this for a model)"
        )
    return _sliding_window(n_q, left=n_q + n_k, right=n_q + n_k, n_k=n_k, offset=0)


def _check_shapes(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape (batch, heads, length, head_dim), got {tuple(t.shape)}")
    if key.shape[:3] != value.shape[:3] or query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)}: expected "
            f"(b, h_q, n_q, d), (b, h_kv, n_k, d), (b, h_kv, n_k, d_v) with h_q a multiple of h_kv"
        )
    if query.dtype not in _float_dtypes():
        raise TypeError(
            f"sparseattn computes in float32 or float64, got {query.dtype} for query {tuple(query.shape)}; load the "
            f"model in float32 (dtype=torch.float32) or use another attn_implementation for half precision"
        )


def _float_dtypes():
    import torch

    return (torch.float32, torch.float64)


def _patterns_and_padding(attention_mask, n_b, n_q, n_k, causal_layer, sliding_window):
    if isinstance(attention_mask, SparseMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (n_q, n_k) or attention_mask.batch_size not in (1, n_b):
            raise ValueError(
                f"the sparseattn mask has shape {attention_mask.shape} but query and key give (batch, 1, n_q, n_k) = "
                f"({n_b}, 1, {n_q}, {n_k}); the cache and the mask disagree on the layer's keys"
            )
        return attention_mask.patterns, attention_mask.key_padding_mask
    if attention_mask is None:
        return _default_pattern(n_q, n_k, causal_layer, sliding_window), None
    import torch

    if isinstance(attention_mask, torch.Tensor):
        pats = _mask_from_tensor(attention_mask, n_q, n_k)
        return (pats[0] if len(pats) == 1 else pats), None
    raise TypeError(
        f"attention_mask must be a sparseattn mask, a 4-D tensor or None, got {type(attention_mask).__name__}; "
        f"was the model's mask built by another attn_implementation's mask function?"
    )


def sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, softcap=None, s_aux=None, is_causal=None, **kwargs):  # fmt: skip
    """The ``AttentionInterface`` function of ``"sparseattn"``; returns ``(out (b, n_q, h_q, d), None)``."""
    import torch

    from ..torch import sparse_attention

    if dropout:
        raise RuntimeError(
            f"sparseattn cannot apply attention-probability dropout (dropout={dropout} in training in "
            f"{type(module).__name__}): the engine never materialises the probabilities. Set the model config's "
            f"attention_dropout to 0.0 (config.attention_dropout = 0.0 before building the model), or call model.eval()"
        )
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("sparseattn has no additive position_bias (T5-style); use attn_implementation='eager'")
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions", "sparseattn does not return attention weights (output_attentions=True gives "
                   "None per layer, as sdpa does); use attn_implementation='eager' to inspect them")  # fmt: skip
    options = _engine_options()
    _check_supported("softcap", softcap, options, "an attention logit soft-cap")
    _check_supported("sinks", s_aux, options, "attention sinks (s_aux)")
    _check_shapes(query, key, value)
    n_b, _, n_q, _ = query.shape
    n_k = key.shape[2]
    causal_layer = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    patterns, kpm = _patterns_and_padding(attention_mask, n_b, n_q, n_k, causal_layer, sliding_window)
    extra = {}
    if softcap is not None:
        extra["softcap"] = float(softcap)
    if s_aux is not None:
        extra["sinks"] = s_aux.to(query.dtype)
    if not isinstance(patterns, list):
        out = sparse_attention(query, key, value, patterns, scale=scaling, key_padding_mask=kpm, **extra)
    else:  # one engine call per batch row: their patterns differ
        outs = []
        for b in range(n_b):
            row_kpm = None if kpm is None else kpm[b : b + 1]
            sl = slice(b, b + 1)
            outs.append(sparse_attention(query[sl], key[sl], value[sl], patterns[b], scale=scaling,
                                         key_padding_mask=row_kpm, **extra))  # fmt: skip
        out = torch.cat(outs, dim=0)
    return out.transpose(1, 2).contiguous(), None
