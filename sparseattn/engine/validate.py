"""Argument checking and broadcasting shared by the engine and the dense reference.

Everything here runs before any kernel: a bad argument raises a ``ValueError``
or ``TypeError`` naming the argument, what was received and what is expected.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from ..patterns.base import Pattern, as_pattern
from .modifiers import NONE, Modifiers, check_modifiers
from .scan import first_nonfinite, scan_nonfinite


@dataclass(frozen=True)
class Prepared:
    """Validated, broadcast view of one attention call."""

    qc: np.ndarray  # (S_q, n_q, d) compute dtype, C-contiguous: q's distinct slices, stored once
    kc: np.ndarray  # (S_k, n_k, d)
    vc: np.ndarray  # (S_v, n_k, dv)
    qmap: np.ndarray  # (S,) int64: slice s reads qc[qmap[s]] (and likewise for k, v)
    kmap: np.ndarray
    vmap: np.ndarray
    lead: tuple  # broadcast leading shape; S = prod(lead)
    patterns: list  # P Pattern objects of shape (n_q, n_k)
    slice_pattern: np.ndarray  # (S,) int64 index into patterns
    scale: float
    key_valid: np.ndarray | None  # (NB, n_k) bool, True = usable key
    slice_batch: np.ndarray | None  # (S,) int64 row of key_valid per slice
    out_dtype: np.dtype
    mods: Modifiers = NONE  # softcap, ALiBi, score_mod, sinks (see sparseattn.engine.modifiers)

    @cached_property
    def nonfinite(self):
        """(S,) bool: slice ``s`` has a NaN or an infinity in ``q``, ``k`` or ``v`` (one pass over each stored array)."""
        return self.nonfinite_slices()

    def nonfinite_slices(self, compiled=True):
        """:attr:`nonfinite`, scanned in NumPy when ``compiled`` is False (see :func:`scan_nonfinite`)."""
        flags = np.zeros(len(self.qmap), dtype=bool)
        for x, mp in ((self.qc, self.qmap), (self.kc, self.kmap), (self.vc, self.vmap)):
            flags |= scan_nonfinite(x, np.zeros(x.shape[0], dtype=bool), compiled)[mp]
        return flags

    def _full(self, x, mp, name):
        if x.shape[0] == len(mp) and np.array_equal(mp, np.arange(len(mp))):
            return x
        from .._memory import check

        check({f"{name} repeated over the broadcast dims {self.lead}": len(mp) * x[0].nbytes if len(x) else 0},
              "sparse_attention", ADVICE)  # fmt: skip
        return x[mp]

    @cached_property
    def q(self):
        """(S, n_q, d): one row block per slice (materialises a broadcast input; the fused forward does not need it)."""
        return self._full(self.qc, self.qmap, "q")

    @cached_property
    def k(self):
        return self._full(self.kc, self.kmap, "k")

    @cached_property
    def v(self):
        return self._full(self.vc, self.vmap, "v")

    @property
    def n_q(self):
        return self.qc.shape[1]

    @property
    def n_k(self):
        return self.kc.shape[1]


#: the dtype policy: input dtype -> compute dtype (the output keeps np.result_type of the inputs)
DTYPE_POLICY = (
    "float32 and float64 are computed as such; float16 is computed in float32 and returned as float16; "
    "longdouble is computed in float64 and returned as longdouble"
)


def _check_array(name, x):
    if sp.issparse(x):
        raise TypeError(f"{name} must be a dense floating-point array, got a scipy sparse {type(x).__name__}")
    if getattr(x, "requires_grad", False) and type(x).__module__.partition(".")[0] == "torch":
        # torch's own advice (.detach().numpy()) would silently drop the gradient
        raise TypeError(
            f"{name} is a torch tensor that requires grad (shape {tuple(x.shape)}); the NumPy entry point would "
            f"drop its gradient: call sparseattn.torch.sparse_attention with the same arguments to train through "
            f"it (or pass {name}.detach() if no gradient is wanted)"
        )
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise TypeError(f"{name} must be a floating-point array, could not convert {type(x).__name__}: {e}") from None
    if arr.dtype.kind != "f" or arr.dtype.names is not None:
        hint = f"; cast it with {name}.astype(np.float32)" if arr.dtype.kind in "biuf" else ""
        raise TypeError(
            f"{name} must be a floating-point array (float16, float32, float64 or longdouble), got dtype "
            f"{arr.dtype} with shape {arr.shape}{hint} ({DTYPE_POLICY})"
        )
    if arr.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., n, d), got shape {arr.shape}")
    if arr.dtype.itemsize > 8 and arr.size:
        big = np.abs(arr[np.isfinite(arr)]).max(initial=0)
        if big > np.finfo(np.float64).max:
            raise ValueError(
                f"{name} holds {str(big)}, beyond float64's range: longdouble inputs are computed in float64"
            )
    return arr


def _is_pattern_like(p):
    return isinstance(p, (Pattern, np.ndarray)) or sp.issparse(p)


def check_scale(scale, d):
    if scale is None:
        if d == 0:
            raise ValueError("q and k have head dimension d = 0; pass an explicit scale= or use d >= 1")
        return 1.0 / math.sqrt(d)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r} of type {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_scale_dtype(scale, compute, given):
    """``scale`` must stay finite once cast to the compute dtype (``given``: the user's value)."""
    if -1e38 < scale < 1e38:  # finite in every float dtype the engine computes in
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        cast = compute(scale)
    if not np.isfinite(cast):
        raise ValueError(
            f"scale={given!r} is not finite in {np.dtype(compute).name}, the compute dtype of these inputs "
            f"(largest finite {np.dtype(compute).name}: {np.finfo(compute).max:.4g}); pass a smaller scale "
            f"or float64 inputs"
        )


ADVICE = (
    "Pass fewer batch entries or heads per call (or a shorter sequence), use path='fused' "
    "(it stores no per-nonzero scores), or split the work across processes (e.g. with Dask)."
)


def _own_lead(x, lead):
    """``x``'s leading shape aligned to ``lead`` (1 on the axes it is broadcast along; ``h_kv`` on a grouped heads axis)."""
    return (1,) * (len(lead) - (x.ndim - 2)) + tuple(x.shape[:-2])


def _copy_bytes(name, x, own, compute):
    """Bytes of the contiguous compact copy ``prepare`` makes of ``x``, with why (0: used in place)."""
    n_own = int(np.prod(own, dtype=np.int64))
    size = n_own * x.shape[-2] * x.shape[-1] * np.dtype(compute).itemsize
    why = []
    if x.dtype != compute:
        why.append(f"cast to {np.dtype(compute).name}")
    if not x.flags.c_contiguous:
        zero = any(st == 0 and n > 1 for st, n in zip(x.strides, x.shape))
        why.append("made contiguous (it has zero strides: broadcast)" if zero else "made contiguous")
    return (f"{name} {', '.join(why)}", size) if why else (name, 0)


def _heads(x):
    return x.shape[-3] if len(x.shape) >= 3 else 1


def kv_groups(q, k, v):
    """``g``, the query heads per key/value head (grouped-query attention), for any arrays with ``.shape``.

    ``k`` and ``v`` with ``h_kv`` heads (axis -3) and ``q`` with ``h_q = g * h_kv``
    heads, ``1 < h_kv < h_q``: query head ``h`` reads key/value head
    ``h // g``.  ``g = 1`` otherwise (equal heads, or a heads axis of 1 that
    broadcasts).  A ``ValueError`` names the arguments when ``h_q`` is not a
    multiple of ``h_kv`` or when ``k`` and ``v`` disagree.
    """
    h_q, h_k, h_v = _heads(q), _heads(k), _heads(v)
    if h_q == 1 or 0 in (h_q, h_k, h_v) or (h_k in (1, h_q) and h_v in (1, h_q)):
        return 1  # plain broadcasting (a heads axis of 0 broadcasts only against 1 and 0)
    if h_k != h_v:
        raise ValueError(
            f"k and v must have the same number of heads (axis -3) for grouped-query attention: k has shape "
            f"{tuple(k.shape)} ({h_k} heads) but v has {tuple(v.shape)} ({h_v} heads); q has {h_q} heads, "
            f"expected k and v with h_kv heads where h_kv divides {h_q}"
        )
    if h_q % h_k:
        raise ValueError(
            f"q has {h_q} heads (axis -3, shape {tuple(q.shape)}), which is not a multiple of the {h_k} heads of "
            f"k and v (shapes {tuple(k.shape)}, {tuple(v.shape)}): grouped-query attention needs h_q = g * h_kv "
            f"(or k and v with 1 or {h_q} heads)"
        )
    return h_q // h_k


def check_shapes_and_patterns(q, k, v, pattern):
    """The shape rules of an attention call and its pattern(s), for any arrays with ``.shape`` (NumPy or Dask).

    Returns ``(lead, n_q, d, n_k, dv, patterns, per_head)``: the broadcast
    leading shape (its heads axis set to the number of per-head patterns) and
    the patterns, each checked against ``(n_q, n_k)``.
    """
    g = kv_groups(q, k, v)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share the head dimension d (last axis): q has shape {q.shape} but k has {k.shape}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of keys n_k (axis -2): k has shape {k.shape} but v has {v.shape}"
        )
    # grouped heads: k and v take part in the broadcast as if they had q's heads
    kv_lead = [x.shape[:-2] if g == 1 else x.shape[:-3] + (q.shape[-3],) for x in (k, v)]
    try:
        lead = np.broadcast_shapes(q.shape[:-2], *kv_lead)
    except ValueError:
        raise ValueError(
            f"the leading (batch, head) dimensions of q, k and v must broadcast: "
            f"q has shape {q.shape}, k has {k.shape}, v has {v.shape}"
        ) from None
    n_q, d = q.shape[-2:]
    n_k, dv = v.shape[-2:]

    # -- patterns -------------------------------------------------------------
    if _is_pattern_like(pattern):
        patterns = [as_pattern(pattern, "pattern")]
        per_head = False
    elif isinstance(pattern, (list, tuple)):
        if len(pattern) == 0:
            raise ValueError("pattern is an empty sequence; pass one pattern, or one per head")
        if not any(_is_pattern_like(p) for p in pattern):
            raise TypeError(
                f"pattern is a {type(pattern).__name__} of {type(pattern[0]).__name__}; a sequence is read as one "
                f"pattern per head, each a Pattern, a scipy sparse matrix or a 2-D boolean ndarray (for a dense "
                f"mask written as nested lists, pass np.array(mask, dtype=bool))"
            )
        patterns = [as_pattern(p, f"pattern[{i}]") for i, p in enumerate(pattern)]
        per_head = True
    else:
        raise TypeError(
            "pattern must be a sparseattn Pattern, a scipy sparse matrix/array, a 2-D boolean ndarray, "
            f"or a sequence of those (one per head); got {type(pattern).__name__}"
        )
    for i, p in enumerate(patterns):
        if p.shape != (n_q, n_k):
            where = f"pattern[{i}]" if per_head else "pattern"
            raise ValueError(
                f"{where} has shape {p.shape} but q, k imply (n_q, n_k) = ({n_q}, {n_k})"
            )
    if per_head:
        h = len(patterns)
        if len(lead) == 0:
            raise ValueError(
                f"{h} per-head patterns were given but q, k, v have no heads axis "
                f"(shapes {q.shape}, {k.shape}, {v.shape}); use inputs of shape (heads, n, d) or (batch, heads, n, d)"
            )
        if lead[-1] not in (1, h):
            raise ValueError(
                f"{h} per-head patterns were given but the heads axis (axis -3) has size {lead[-1]} "
                f"(q {q.shape}, k {k.shape}, v {v.shape}); pass one pattern per head"
            )
        lead = lead[:-1] + (h,)
    return tuple(lead), n_q, d, n_k, dv, patterns, per_head


def _slices_contiguous(xs, compute):
    """Whether each ``xs[s]`` of a 3-D array is C-contiguous, in the compute dtype and aligned (a cache view)."""
    item = np.dtype(compute).itemsize
    return (xs.dtype == compute and xs.ndim == 3 and xs.strides[2] == item and xs.strides[1] == xs.shape[2] * item
            and xs.strides[0] > 0 and xs.strides[0] % item == 0 and xs.ctypes.data % item == 0)  # fmt: skip


def prepare(q, k, v, pattern, scale=None, key_padding_mask=None, check_finite=False, caller="sparse_attention",
            modifiers=None):  # fmt: skip
    """Validate and broadcast the arguments of an attention call.

    Before copying anything, the bytes of the contiguous input copies, the
    output and the log-sum-exp are checked against the memory available
    (:mod:`sparseattn._memory`); a call that cannot fit raises
    :class:`~sparseattn._memory.InsufficientMemoryError` naming ``caller``.
    ``modifiers``: a dict of the modifier keywords (``softcap``,
    ``alibi_slopes``, ``sinks``, ``score_mod``), checked by
    :func:`~sparseattn.engine.modifiers.check_modifiers`.
    """
    user_scale = scale
    q = _check_array("q", q)
    k = _check_array("k", k)
    v = _check_array("v", v)
    lead, n_q, d, n_k, dv, patterns, per_head = check_shapes_and_patterns(q, k, v, pattern)

    S = int(np.prod(lead, dtype=np.int64)) if lead else 1
    H = lead[-1] if lead else 1
    slice_pattern = (np.arange(S, dtype=np.int64) % H) if per_head else np.zeros(S, dtype=np.int64)

    # -- scale ------------------------------------------------------------------
    scale = check_scale(scale, d)

    # -- key padding --------------------------------------------------------------
    key_valid = slice_batch = None
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask)
        if kpm.dtype != bool:
            raise TypeError(
                f"key_padding_mask must be a boolean array (True = padded key), got dtype {kpm.dtype}; "
                f"convert 0/1 attention masks with key_padding_mask = (attention_mask == 0)"
            )
        batch_shape = lead[:-1]
        target = batch_shape + (n_k,)
        ok = kpm.ndim >= 1 and kpm.ndim <= len(target) and kpm.shape[-1] == n_k
        if ok:
            try:
                kpm = np.broadcast_to(kpm, target)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(
                f"key_padding_mask has shape {np.shape(key_padding_mask)} but must broadcast to {target} "
                f"(batch dims of q/k/v {lead} without the heads axis, then n_k = {n_k})"
            )
        NB = int(np.prod(batch_shape, dtype=np.int64)) if batch_shape else 1
        key_valid = np.ascontiguousarray(~kpm.reshape(NB, n_k))
        slice_batch = np.arange(S, dtype=np.int64) // H

    # -- dtypes and layout ------------------------------------------------------
    out_dtype = np.result_type(q, k, v)  # float16, float32, float64 or longdouble
    compute = np.float64 if out_dtype.itemsize >= 8 else np.float32  # DTYPE_POLICY

    check_scale_dtype(scale, compute, user_scale)
    scale = float(compute(scale))  # what the kernels multiply by; the reference uses the same value
    mods = check_modifiers(**(modifiers or {}), lead=lead, n_q=n_q, n_k=n_k, compute=compute) if modifiers else NONE

    from .._memory import check as check_memory

    owns = [_own_lead(x, lead) for x in (q, k, v)]
    items = dict(_copy_bytes(name, x, own, compute) for name, x, own in zip("qkv", (q, k, v), owns))
    item = np.dtype(compute).itemsize
    items["output"] = S * n_q * dv * item * (1 if out_dtype == compute else 2)
    items["log-sum-exp"] = S * n_q * item
    check_memory(items, caller, ADVICE)

    def compact(x, own, view_ok=False):
        """x's distinct slices, stored once, and the slice -> stored slice map (broadcast axes are not repeated).

        With ``view_ok`` (k and v of a forward call) a view whose slices are
        each contiguous (a KV cache's ``[:, :, :L]``) is kept, not copied.
        """
        n_own = int(np.prod(own, dtype=np.int64))
        xs = np.reshape(x, (n_own,) + x.shape[-2:]) if x.ndim > 2 or n_own != 1 else x[None]
        mp = np.arange(n_own, dtype=np.int64).reshape(own)
        if own and own[-1] not in (1, lead[-1]):  # grouped heads: query head h reads stored head h // g
            mp = np.repeat(mp, lead[-1] // own[-1], axis=-1)
        mp = np.broadcast_to(mp, lead).reshape(S)
        if not (view_ok and _slices_contiguous(xs, compute)):
            xs = np.ascontiguousarray(xs, dtype=compute)
        return xs, np.ascontiguousarray(mp)

    views = caller == "sparse_attention"
    (qc, qmap), (kc, kmap), (vc, vmap) = (compact(x, own, views and i > 0) for i, (x, own) in enumerate(zip((q, k, v), owns)))
    if check_finite:
        for name, user, x, own in (("q", q, qc, owns[0]), ("k", k, kc, owns[1]), ("v", v, vc, owns[2])):
            err = first_nonfinite(name, user, x, own)
            if err is not None:
                raise err
    return Prepared(
        qc=qc,
        kc=kc,
        vc=vc,
        qmap=qmap,
        kmap=kmap,
        vmap=vmap,
        lead=tuple(lead),
        patterns=patterns,
        slice_pattern=slice_pattern,
        scale=scale,
        key_valid=key_valid,
        slice_batch=slice_batch,
        out_dtype=out_dtype,
        mods=mods,
    )
