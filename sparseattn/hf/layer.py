"""A NumPy port of Hugging Face's ``LongformerSelfAttention`` built on :func:`sparseattn.sparse_attention`.

The layer holds the six projections of a Hugging Face (``transformers``)
Longformer self-attention block -- ``query``, ``key``, ``value`` and their
``*_global`` twins, each a weight ``(E, E)`` and a bias ``(E,)`` in the torch
``Linear`` convention ``y = x @ W.T + b`` -- and reproduces its forward pass:

* an ordinary token ``i`` attends, in one softmax, to the keys of its band
  ``|i - j| <= attention_window // 2`` together with every global key, minus
  the padded keys (local projections ``query``/``key``/``value``);
* a global token attends to every non-padded key, recomputed with the
  ``query_global``/``key_global``/``value_global`` projections;
* padded query rows output exactly zero.

The band part runs on the sparse engine (the global and padded rows are left
out of its pattern); the few global rows are ``n`` long and are computed
densely.  Any sequence length works: there is no ``n % attention_window``
requirement.

Optional per-head dilation (the original allenai Longformer, not in Hugging
Face) is an extension: see :class:`LongformerSelfAttention`.
"""

from __future__ import annotations

import errno
import math
import numbers
import os
from collections.abc import Mapping

import numpy as np

from ..patterns.builders import _DropRows, global_tokens, sliding_window

__all__ = ["LongformerSelfAttention"]

_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")
_PARAM_NAMES = tuple(f"{p}.{s}" for p in _PROJECTIONS for s in ("weight", "bias"))
_PATTERN_CACHE_SIZE = 64
_GLOBAL_CHUNK_ELEMENTS = 1 << 22  # scores held at once in the dense global pass


def _check_positive_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _check_window(attention_window):
    if isinstance(attention_window, (list, tuple)):
        raise TypeError(
            f"attention_window must be one even integer for this layer, got the sequence {attention_window!r}; "
            f"pass config.attention_window[layer_id]"
        )
    if isinstance(attention_window, (bool, np.bool_)) or not isinstance(attention_window, numbers.Integral):
        raise TypeError(
            f"attention_window must be a positive even integer, got {attention_window!r} "
            f"of type {type(attention_window).__name__}"
        )
    w = int(attention_window)
    if w <= 0 or w % 2:
        raise ValueError(
            f"attention_window must be a positive even integer (Hugging Face's total window; each token sees "
            f"attention_window // 2 neighbours on each side), got {w}"
        )
    return w


def _check_dilation(dilation, num_heads):
    if dilation is None:
        return (1,) * num_heads
    if isinstance(dilation, numbers.Integral) and not isinstance(dilation, (bool, np.bool_)):
        return (_check_positive_int("dilation", dilation),) * num_heads
    try:
        values = list(dilation)
    except TypeError:
        raise TypeError(
            f"dilation must be None, a positive integer or a sequence of num_heads={num_heads} positive integers, "
            f"got {dilation!r} of type {type(dilation).__name__}"
        ) from None
    if len(values) != num_heads:
        raise ValueError(
            f"dilation must have one entry per head (num_heads={num_heads}), got {len(values)} entries: {values}"
        )
    return tuple(_check_positive_int(f"dilation[{i}]", d) for i, d in enumerate(values))


def _as_param(name, value, shape, where):
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. a tensor that needs .detach() or a bfloat16 tensor
        raise TypeError(
            f"{where}{name} could not be converted to a NumPy array ({type(value).__name__}: {exc}); "
            f"convert it first, e.g. tensor.detach().float().numpy()"
        ) from None
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise TypeError(f"{where}{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{where}{name} has shape {arr.shape}, expected {shape}")
    dtype = arr.dtype if arr.dtype in (np.float32, np.float64) else np.float64
    out = np.array(arr, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


class LongformerSelfAttention:
    """Hugging Face's ``LongformerSelfAttention`` forward pass in NumPy.

    Parameters
    ----------
    weights : mapping
        The twelve parameters of the layer under their Hugging Face names:
        ``query.weight``, ``query.bias``, ``key.weight``, ... ,
        ``value_global.bias``.  Weights have shape ``(E, E)`` and biases
        ``(E,)`` (torch ``Linear``: ``y = x @ W.T + b``).  Values may be any
        array-like; they are copied.  Other keys are ignored.
    attention_window : int
        Hugging Face's ``config.attention_window[layer_id]``: the *total*,
        even window.  Each ordinary token sees ``attention_window // 2``
        tokens on each side (the original allenai code passes that one-sided
        value instead).
    num_heads : int
        ``config.num_attention_heads``; must divide ``E``.
    dilation : int or sequence of int, optional
        Extension (not in Hugging Face): per-head dilation ``d_h`` as in the
        allenai Longformer kernel.  Head ``h`` of an ordinary token ``i``
        sees keys ``j = i + d_h * m`` for ``m = -r .. r`` with
        ``r = attention_window // 2`` (so the reach is ``r * d_h`` tokens
        while the number of band keys stays ``2 r + 1``), plus the global keys.
        Global rows are not dilated.  ``None`` or ``1`` is Hugging Face's layer.

    Notes
    -----
    Masks follow Hugging Face's ``LongformerModel``: ``attention_mask`` is 1
    for real tokens and 0 for padding, ``global_attention_mask`` is 1 for
    global tokens.  A padded token is never global.  The merged
    ``0 / 1 / 2`` mask (0 = padding, 1 = local, 2 = global) is accepted as
    ``attention_mask`` too.

    Examples
    --------
    >>> import numpy as np
    >>> from sparseattn.hf import LongformerSelfAttention
    >>> rng = np.random.default_rng(0)
    >>> E = 16
    >>> sd = {f"{p}.{s}": rng.standard_normal((E, E) if s == "weight" else E) / 4
    ...       for p in ("query", "key", "value", "query_global", "key_global", "value_global")
    ...       for s in ("weight", "bias")}
    >>> layer = LongformerSelfAttention.from_state_dict(sd, attention_window=4, num_heads=2)
    >>> x = rng.standard_normal((2, 10, E)).astype(np.float32)
    >>> attention_mask = np.ones((2, 10), dtype=int); attention_mask[1, 7:] = 0   # pad row 1
    >>> global_mask = np.zeros((2, 10), dtype=int); global_mask[:, 0] = 1         # token 0 is global
    >>> out = layer(x, attention_mask, global_mask)
    >>> out.shape, out.dtype
    ((2, 10, 16), dtype('float32'))
    >>> bool(np.all(out[1, 7:] == 0))                                             # padded rows are zero
    True
    """

    def __init__(self, weights, attention_window, num_heads, dilation=None, *, _where=""):
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"weights must be a mapping from parameter names (e.g. 'query.weight') to arrays, "
                f"got {type(weights).__name__}"
            )
        self.attention_window = _check_window(attention_window)
        self.num_heads = _check_positive_int("num_heads", num_heads)
        missing = [name for name in _PARAM_NAMES if name not in weights]
        if missing:
            raise ValueError(
                f"missing Longformer self-attention parameter(s) {[_where + m for m in missing]}; "
                f"expected the keys {[_where + n for n in _PARAM_NAMES]}"
            )
        q_shape = np.shape(weights["query.weight"])
        if len(q_shape) != 2 or q_shape[0] != q_shape[1] or q_shape[0] == 0:
            raise ValueError(f"{_where}query.weight has shape {q_shape}, expected a square (E, E) matrix")
        E = int(q_shape[0])
        if E % self.num_heads:
            raise ValueError(
                f"the embedding size E = {E} (from {_where}query.weight) is not divisible by num_heads = {self.num_heads}"
            )
        self.embed_dim = E
        self.head_dim = E // self.num_heads
        self.dilation = _check_dilation(dilation, self.num_heads)
        self.params = {}
        for name in _PARAM_NAMES:
            shape = (E, E) if name.endswith(".weight") else (E,)
            self.params[name] = _as_param(name, weights[name], shape, _where)
        self._cast_cache = {}
        self._pattern_cache = {}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state_dict, prefix="", *, attention_window, num_heads, dilation=None):
        """Build the layer from a (model's) state dict.

        Parameters
        ----------
        state_dict : mapping
            Names to arrays (NumPy arrays, or anything ``np.asarray`` accepts,
            such as CPU torch tensors from ``layer.state_dict()``).
        prefix : str
            Prepended to every parameter name, e.g.
            ``"longformer.encoder.layer.3.attention.self."`` to pick one layer
            out of a whole model's state dict.
        attention_window, num_heads, dilation
            As for :class:`LongformerSelfAttention`.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        weights = {name: state_dict[prefix + name] for name in _PARAM_NAMES if prefix + name in state_dict}
        return cls(weights, attention_window, num_heads, dilation, _where=prefix)

    @classmethod
    def from_safetensors(cls, path, prefix="", *, attention_window, num_heads, dilation=None):
        """Build the layer from a ``.safetensors`` file (read with ``safetensors.numpy``; no torch, no pickle).

        ``prefix`` selects the layer inside a whole checkpoint, as for
        :meth:`from_state_dict`.

        Raises
        ------
        OSError
            The file cannot be read: it does not exist, is a directory, or is
            not readable (the subclass follows the cause, e.g.
            ``FileNotFoundError``, ``IsADirectoryError``, ``PermissionError``).
            The message names ``path``.
        ValueError
            The file is not a valid safetensors file (truncated, corrupt), holds
            a tensor NumPy cannot represent (e.g. bfloat16), or lacks the
            layer's parameters.  The message names ``path``.
        """
        try:
            from safetensors import SafetensorError, safe_open
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError(
                "from_safetensors needs the 'safetensors' package (pip install 'sparseattn[safetensors]')"
            ) from None
        try:
            fspath = os.fsdecode(os.fspath(path))
        except TypeError:
            raise TypeError(f"path must be a str or os.PathLike, got {path!r} of type {type(path).__name__}") from None
        _check_window(attention_window)  # configuration errors first, so that the rest are about the file
        _check_dilation(dilation, _check_positive_int("num_heads", num_heads))
        if os.path.isdir(fspath):
            raise IsADirectoryError(
                errno.EISDIR, f"from_safetensors needs a .safetensors file, got the directory {fspath!r}", fspath
            )
        state = {}
        name = None
        try:
            with safe_open(fspath, framework="np") as f:
                available = set(f.keys())
                for name in _PARAM_NAMES:
                    if prefix + name in available:
                        state[prefix + name] = f.get_tensor(prefix + name)
        except OSError as exc:  # not found, permission, I/O error: keep the subclass, add the path
            msg = f"cannot read safetensors file {fspath!r}: {exc.strerror or exc}"
            raise (type(exc)(exc.errno, msg, fspath) if exc.errno is not None else type(exc)(msg)) from exc
        except SafetensorError as exc:
            raise ValueError(f"{fspath!r} is not a valid safetensors file (truncated or corrupt?): {exc}") from exc
        except TypeError as exc:  # a dtype NumPy lacks, e.g. bfloat16
            if name is None:
                raise
            raise ValueError(
                f"{fspath!r}: tensor {prefix + name!r} cannot be read as a NumPy array ({exc}); "
                f"convert the checkpoint to float32 first"
            ) from exc
        if not state and available:
            shown = sorted(available)[:8]
            raise ValueError(
                f"{fspath} holds no parameter starting with prefix {prefix!r} "
                f"(first keys: {shown}); pass e.g. prefix='longformer.encoder.layer.0.attention.self.'"
            )
        try:
            return cls.from_state_dict(
                state, prefix, attention_window=attention_window, num_heads=num_heads, dilation=dilation
            )
        except ValueError as exc:
            raise ValueError(f"{fspath}: {exc}") from exc

    def __repr__(self):
        dil = "" if all(d == 1 for d in self.dilation) else f", dilation={list(self.dilation)}"
        return (
            f"LongformerSelfAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"attention_window={self.attention_window}{dil})"
        )

    # -- helpers -------------------------------------------------------------------------------
    def _weights(self, dtype):
        """Transposed, concatenated weights in ``dtype`` (cached per dtype)."""
        dtype = np.dtype(dtype)
        cached = self._cast_cache.get(dtype)
        if cached is None:
            p = self.params

            def cat(names):
                w = np.concatenate([p[f"{n}.weight"].T for n in names], axis=1).astype(dtype)
                b = np.concatenate([p[f"{n}.bias"] for n in names]).astype(dtype)
                return np.ascontiguousarray(w), b

            cached = {
                "qkv": cat(("query", "key", "value")),
                "q_global": cat(("query_global",)),
                "kv_global": cat(("key_global", "value_global")),
            }
            self._cast_cache[dtype] = cached
        return cached

    def _patterns(self, n, is_global, is_pad):
        """Per-head patterns of the local pass for one (global set, padding) combination."""
        key = (n, np.packbits(is_global).tobytes(), np.packbits(is_pad).tobytes())
        pats = self._pattern_cache.get(key)
        if pats is not None:
            return pats
        radius = self.attention_window // 2
        g_idx = np.flatnonzero(is_global)
        drop = is_global | is_pad
        by_dilation = {}
        for d in sorted(set(self.dilation)):
            p = sliding_window(n, radius * d, dilation=d)
            if g_idx.size:
                p = p | global_tokens(n, g_idx)
            if drop.any():
                p = _DropRows(p, drop)
            by_dilation[d] = p
        if len(by_dilation) == 1:
            pats = next(iter(by_dilation.values()))
        else:
            pats = [by_dilation[d] for d in self.dilation]
        if len(self._pattern_cache) >= _PATTERN_CACHE_SIZE:
            self._pattern_cache.pop(next(iter(self._pattern_cache)))
        self._pattern_cache[key] = pats
        return pats

    def _check_inputs(self, hidden_states, attention_mask, global_attention_mask):
        x = np.asarray(hidden_states)
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"hidden_states must have shape (batch, n, E) with E = {self.embed_dim}, got shape {x.shape}"
            )
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(
                f"hidden_states must be float32 or float64, got dtype {x.dtype}; cast it with .astype(np.float32)"
            )
        b, n, _ = x.shape

        def mask(name, m, allowed):
            if m is None:
                return None
            arr = np.asarray(m)
            if arr.shape != (b, n):
                raise ValueError(
                    f"{name} must have shape (batch, n) = {(b, n)} to match hidden_states {x.shape}, got {arr.shape}"
                )
            if arr.dtype == bool:
                return arr.astype(np.int8)
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"{name} must be boolean or numeric, got dtype {arr.dtype}")
            bad = ~np.isin(arr, allowed)
            if bad.any():
                raise ValueError(
                    f"{name} may only hold the values {list(allowed)}, got {np.unique(arr[bad])[:5].tolist()}"
                )
            return arr.astype(np.int8)

        am = mask("attention_mask", attention_mask, (0, 1, 2))
        gm = mask("global_attention_mask", global_attention_mask, (0, 1))
        is_pad = np.zeros((b, n), dtype=bool) if am is None else am == 0
        is_global = np.zeros((b, n), dtype=bool) if am is None else am == 2
        if gm is not None:
            is_global |= gm == 1
        is_global &= ~is_pad  # Hugging Face merges attention_mask * (global_attention_mask + 1)
        return x, is_pad, is_global

    # -- forward -------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, global_attention_mask=None, *, path="auto"):
        """Run the layer.

        Parameters
        ----------
        hidden_states : ndarray, shape (batch, n, E)
            float32 or float64; the output has the same dtype.
        attention_mask : array, shape (batch, n), optional
            1 = real token, 0 = padding (Hugging Face's convention); the
            merged form with 2 = global is accepted too.  Default: no padding.
        global_attention_mask : array, shape (batch, n), optional
            1 = global token.  Default: no global token.
        path : {"auto", "fused", "staged", "blocked"}
            Passed to :func:`sparseattn.sparse_attention` for the band part.

        Returns
        -------
        ndarray, shape (batch, n, E)
            The attention context (Hugging Face's ``LongformerSelfAttention``
            output, before ``LongformerSelfOutput``); padded rows are 0.
        """
        from ..engine.attention import sparse_attention

        x, is_pad, is_global = self._check_inputs(hidden_states, attention_mask, global_attention_mask)
        b, n, E = x.shape
        h, d = self.num_heads, self.head_dim
        dtype = x.dtype
        out = np.zeros((b, n, E), dtype=dtype)
        if b == 0 or n == 0:
            return out
        W = self._weights(dtype)
        scale = 1.0 / math.sqrt(d)

        # local pass: band + global keys for ordinary rows, on the sparse engine
        w_qkv, b_qkv = W["qkv"]
        qkv = x.reshape(b * n, E) @ w_qkv
        qkv += b_qkv
        qkv = qkv.reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)  # (3, b, h, n, d), a view
        groups = {}
        for i in range(b):
            key = (np.packbits(is_global[i]).tobytes(), np.packbits(is_pad[i]).tobytes())
            groups.setdefault(key, []).append(i)
        ctx = np.zeros((b, h, n, d), dtype=dtype)
        for rows in groups.values():
            r0 = rows[0]
            if is_pad[r0].all():
                continue  # fully padded sequences output zeros
            pats = self._patterns(n, is_global[r0], is_pad[r0])
            sel = slice(None) if len(rows) == b else np.asarray(rows)
            kpm = is_pad[sel] if is_pad[r0].any() else None
            ctx[sel] = sparse_attention(qkv[0][sel], qkv[1][sel], qkv[2][sel], pats, scale=scale,
                                        key_padding_mask=kpm, path=path)
        out[:] = ctx.transpose(0, 2, 1, 3).reshape(b, n, E)

        # global pass: the few global rows, dense over all non-padded keys, global projections
        if is_global.any():
            self._global_rows(x, is_pad, is_global, out, W, scale)
        out[is_pad] = 0
        return out

    __call__ = forward

    def _global_rows(self, x, is_pad, is_global, out, W, scale):
        b, n, E = x.shape
        h, d = self.num_heads, self.head_dim
        w_q, b_q = W["q_global"]
        w_kv, b_kv = W["kv_global"]
        for i in np.flatnonzero(is_global.any(axis=1)):
            g_idx = np.flatnonzero(is_global[i])
            kv = x[i] @ w_kv
            kv += b_kv
            kv = kv.reshape(n, 2, h, d).transpose(1, 2, 0, 3)  # (2, h, n, d)
            k, v = kv[0], kv[1]
            chunk = max(1, _GLOBAL_CHUNK_ELEMENTS // (h * n))
            for s in range(0, len(g_idx), chunk):
                rows = g_idx[s : s + chunk]
                q = x[i, rows] @ w_q
                q += b_q
                q = q.reshape(len(rows), h, d).transpose(1, 0, 2)  # (h, G, d)
                scores = np.matmul(q, k.transpose(0, 2, 1))  # (h, G, n)
                scores *= scores.dtype.type(scale)
                scores[:, :, is_pad[i]] = -np.inf
                scores -= scores.max(axis=-1, keepdims=True)  # a global token is never padded: finite max
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                ctx = np.matmul(scores, v)  # (h, G, d)
                out[i, rows] = ctx.transpose(1, 0, 2).reshape(len(rows), E)
