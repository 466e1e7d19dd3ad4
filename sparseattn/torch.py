"""PyTorch adapter: :func:`sparse_attention` on CPU tensors, differentiable in ``q``, ``k`` and ``v``.

No math lives here.  The tensors are viewed as NumPy arrays (``Tensor.numpy()``
shares memory, whatever the strides, so nothing is copied on the way in), the
NumPy entry points do the work -- :func:`sparseattn.sparse_attention` with
``return_lse=True`` forward, :func:`sparseattn.sparse_attention_backward`
backward -- and their results come back with ``torch.from_numpy`` (again no
copy).  The autograd node keeps ``q``, ``k``, ``v``, the output and the
log-sum-exp: O(n d) per slice, no attention matrix.

``torch.compile``: the function is excluded from tracing with
:func:`torch.compiler.disable`, so a compiled model breaks its graph at each
call and runs this function eagerly (forward and backward); everything
around it is still compiled.  Double backward is not supported: a backward
with ``create_graph=True`` raises a ``RuntimeError`` (never a silently
missing second derivative).

Importing this module imports torch; ``import sparseattn`` does not.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .engine.attention import sparse_attention as _np_sparse_attention
from .engine.backward import sparse_attention_backward as _np_sparse_attention_backward
from .patterns.base import as_pattern

__all__ = ["sparse_attention"]

_DTYPES = (torch.float32, torch.float64)


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (for NumPy arrays use sparseattn.sparse_attention), "
            f"got {type(t).__name__}"
        )
    if t.device.type != "cpu":
        raise ValueError(
            f"{name} is on device {t.device}, but sparseattn runs on the CPU only; move it with {name}.cpu() "
            f"(or keep attention on the accelerator with torch's own kernels)"
        )
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; use {name}.to_dense()")
    if t.dtype not in _DTYPES:
        hint = " (half precision is not supported: compute in float32)" if t.dtype in (torch.float16, torch.bfloat16) else ""
        raise TypeError(
            f"{name} must be float32 or float64, got {t.dtype} with shape {tuple(t.shape)}{hint}; "
            f"cast it with {name}.float()"
        )


def _to_numpy(t):
    """A NumPy view of a CPU tensor (shares memory; conjugate/negative views resolved first)."""
    try:  # the common case in one call (a decode step makes three of these per layer)
        return t.numpy()
    except RuntimeError:  # it requires grad, or has the conjugate or negative bit set
        return t.detach().resolve_conj().resolve_neg().numpy()


def _mask_to_numpy(name, m):
    """A torch mask (or pattern) as NumPy; anything else is passed through to the NumPy validation."""
    if not isinstance(m, torch.Tensor):
        return m
    if m.device.type != "cpu":
        raise ValueError(f"{name} is on device {m.device}, but sparseattn runs on the CPU only; use {name}.cpu()")
    if m.requires_grad:
        raise ValueError(
            f"{name} requires grad, but it is a boolean mask and has no gradient; pass {name}.detach() "
            f"(for a learned additive bias, sparseattn has no support)"
        )
    if m.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {m.layout}")
    return _to_numpy(m)


def _pattern_of(name, p):
    """A bool tensor becomes a Pattern once (copied), so forward and backward see the same one."""
    if not isinstance(p, torch.Tensor):
        return p
    return as_pattern(_mask_to_numpy(name, p), name)


def _patterns(pattern):
    if isinstance(pattern, (list, tuple)):
        return [_pattern_of(f"pattern[{i}]", p) for i, p in enumerate(pattern)]
    return _pattern_of("pattern", pattern)


def _sinks_numpy(sinks):
    return None if sinks is None else sinks.detach().to(torch.float64).numpy()


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, pattern, scale, key_padding_mask, mods):
        out, lse = _np_sparse_attention(
            _to_numpy(q), _to_numpy(k), _to_numpy(v), pattern, scale=scale, key_padding_mask=key_padding_mask,
            sinks=_sinks_numpy(sinks), return_lse=True, **mods,
        )  # fmt: skip
        out_t, lse_t = torch.from_numpy(out), torch.from_numpy(lse)
        ctx.save_for_backward(q, k, v, out_t, lse_t, sinks)
        ctx.pattern, ctx.scale, ctx.key_padding_mask, ctx.mods = pattern, scale, key_padding_mask, mods
        ctx.mark_non_differentiable(lse_t)
        return out_t, lse_t

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError(
                "sparseattn.torch.sparse_attention has no double backward: its gradient is computed outside "
                "autograd, so create_graph=True (e.g. a gradient penalty) cannot differentiate it again"
            )
        q, k, v, out, lse, sinks = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 8
        go = _to_numpy(grad_out.to(out.dtype))
        grads = _np_sparse_attention_backward(
            go, _to_numpy(q), _to_numpy(k), _to_numpy(v), ctx.pattern, _to_numpy(out), _to_numpy(lse),
            scale=ctx.scale, key_padding_mask=ctx.key_padding_mask, sinks=_sinks_numpy(sinks), **ctx.mods,
        )  # fmt: skip
        need = ctx.needs_input_grad
        out = [torch.from_numpy(g) if n else None for g, n in zip(grads[:3], need[:3])]
        dsinks = torch.from_numpy(grads[3]).to(sinks.dtype) if sinks is not None and need[3] else None
        return (*out, dsinks, None, None, None, None)


def _host_array(name, x):
    """A tensor option (slopes, sinks without grad) as NumPy; refuses one that asks for a gradient it cannot get."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.requires_grad:
        raise ValueError(f"{name} requires grad, but sparseattn has no gradient for {name}; pass {name}.detach()")
    if x.device.type != "cpu":
        raise ValueError(f"{name} is on device {x.device}, but sparseattn runs on the CPU only; use {name}.cpu()")
    return x.detach().to(torch.float64).numpy() if x.is_floating_point() else x.numpy()


_COMPILE_REASON = (
    "sparseattn runs NumPy and Numba code that torch.compile cannot trace: each call is a graph break "
    "(run it eagerly between compiled regions; fullgraph=True is not possible)"
)


@functools.partial(torch.compiler.disable, reason=_COMPILE_REASON)
def sparse_attention(q, k, v, pattern, *, scale=None, softcap=None, alibi_slopes=None, sinks=None, score_mod=None,
                     key_padding_mask=None):  # fmt: skip
    """Differentiable sparse attention on CPU tensors.

    The torch face of :func:`sparseattn.sparse_attention`: same pattern
    semantics, shapes and broadcasting (leading dimensions broadcast as in
    NumPy; ``k``/``v`` shared by the heads as ``(b, 1, n, d)`` get their
    gradients summed over the heads; grouped-query ``k``/``v`` of shape
    ``(..., h_kv, n, d)`` with ``q`` of shape ``(..., g * h_kv, n, d)``
    are read without copies and get their gradients, of their own shapes,
    summed over each group of ``g`` query heads).

    Parameters
    ----------
    q : Tensor, shape (..., n_q, d)
    k : Tensor, shape (..., n_k, d)
    v : Tensor, shape (..., n_k, d_v)
        CPU, float32 or float64, all three of the same dtype; any strides.
    pattern
        As for :func:`sparseattn.sparse_attention`: a ``Pattern``, a scipy
        sparse matrix, a 2-D boolean array or CPU bool tensor, or a sequence
        of those (one per head).
    scale : float, optional
        Default ``1 / sqrt(d)``.
    softcap, alibi_slopes, score_mod : optional
        As for :func:`sparseattn.sparse_attention` (tensors or arrays; no gradient).
    sinks : Tensor of shape (h_q,), optional
        The sink logit per query head; when it requires grad, its gradient
        ``-sum_i exp(sink - lse_i) dO_i . O_i`` flows back (GPT-OSS's ``s_aux``).
    key_padding_mask : bool Tensor or array, shape broadcastable to (..., n_k), optional
        True = padded key, removed from every row.  Never differentiable.

    Returns
    -------
    Tensor, shape (broadcast leading dims..., n_q, d_v)
        Same dtype as the inputs.  When grad mode is on and one of ``q``,
        ``k``, ``v`` requires grad it carries an autograd node whose backward
        is :func:`sparseattn.sparse_attention_backward`; otherwise (e.g. under
        ``torch.no_grad()``) the plain forward runs and nothing is saved.

    Raises
    ------
    TypeError
        A non-tensor ``q``/``k``/``v``, a dtype other than float32/float64
        (float16 and bfloat16 included), mixed dtypes, a sparse tensor.
    ValueError
        A tensor on another device than the CPU, a mask that requires grad,
        and every shape error of the NumPy entry point.

    Notes
    -----
    Under ``torch.compile`` the call is a graph break (it is wrapped in
    :func:`torch.compiler.disable`): compiled code runs before and after it,
    this function runs eagerly, gradients flow through it.

    Examples
    --------
    >>> import torch, sparseattn as sa
    >>> from sparseattn.torch import sparse_attention
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k, v = (torch.randn(2, 4, 32, 16, generator=g, requires_grad=True) for _ in range(3))
    >>> out = sparse_attention(q, k, v, sa.longformer(32, attention_window=8, global_indices=[0]))
    >>> out.shape, out.dtype
    (torch.Size([2, 4, 32, 16]), torch.float32)
    >>> out.square().sum().backward()
    >>> q.grad.shape, k.grad.shape, v.grad.shape
    (torch.Size([2, 4, 32, 16]), torch.Size([2, 4, 32, 16]), torch.Size([2, 4, 32, 16]))
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad:
            raise ValueError("scale requires grad, but sparseattn has no gradient for scale; pass a number")
        scale = scale.item()
    kpm = _mask_to_numpy("key_padding_mask", key_padding_mask)
    if isinstance(kpm, np.ndarray):
        kpm = kpm.copy()  # the autograd node keeps it: later in-place changes must not reach the backward
    pattern = _patterns(pattern)
    mods = dict(softcap=softcap.item() if isinstance(softcap, torch.Tensor) else softcap,
                alibi_slopes=_host_array("alibi_slopes", alibi_slopes), score_mod=score_mod)  # fmt: skip
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        sinks = torch.as_tensor(np.asarray(sinks))
    if sinks is not None and (sinks.device.type != "cpu" or not sinks.is_floating_point()):
        raise ValueError(f"sinks must be a floating-point CPU tensor, got {sinks.dtype} on {sinks.device}")
    grad_sinks = sinks is not None and sinks.requires_grad
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or grad_sinks):
        out, _lse = _SparseAttention.apply(q, k, v, sinks, pattern, scale, kpm, mods)
        return out
    out = _np_sparse_attention(_to_numpy(q), _to_numpy(k), _to_numpy(v), pattern, scale=scale, key_padding_mask=kpm,
                               sinks=_sinks_numpy(sinks), **mods)  # fmt: skip
    return torch.from_numpy(out)
