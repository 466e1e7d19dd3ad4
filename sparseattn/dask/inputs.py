"""The arguments of :func:`sparseattn.dask.sparse_attention`, checked and laid out for the graph.

The same shape and pattern rules as the local engine
(:func:`~sparseattn.engine.validate.check_shapes_and_patterns`), plus what
Dask adds: NumPy inputs wrapped as Dask arrays, the inputs broadcast to the
common leading shape, one chunk along the head dimension, ``k`` and ``v``
chunked like ``q`` on the leading axes (grouped-query heads: ``k`` and ``v``
keep their ``h_kv`` heads, chunked to match ``q``'s head chunks) and alike
along the keys, and the padding mask chunked like the keys.  The modifiers
are checked by the engine's ``check_modifiers`` (a ``score_mod`` compiled
here, for the inputs' compute dtype, so that one Numba cannot compile fails
on the client, not on a worker).  Dask is imported only when called.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp

from ..engine.modifiers import check_modifiers, check_score_mod
from ..engine.validate import check_scale, check_shapes_and_patterns, kv_groups
from .shards import ContiguousShards
from .tasks import Score


def import_dask():
    """``dask.array``, or an ImportError that says which extra to install."""
    try:
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph  # noqa: F401  (the graph needs it too)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sparseattn.dask needs dask[array] and distributed: pip install 'sparseattn[dask]'"
        ) from exc
    return da


class Inputs(NamedTuple):
    """The inputs laid out for the graph builder, with what the checks found."""

    q: Any  #: dask array (..., n_q, d), one chunk along d, broadcast to the leading shape
    k: Any  #: dask array (..., n_k, d), chunked like q on the leading axes
    v: Any  #: dask array (..., n_k, d_v), chunked like k
    mask: Any  #: dask bool array (lead[:-1]..., n_k) chunked like the keys, or None
    lead: tuple  #: the leading (batch, heads) shape
    n_k: int
    dv: int
    patterns: list  #: the distinct patterns (one per head when per_head)
    per_head: bool
    scale: Any  #: a tasks.Score: the scale, softcap, score_mod and n_k - n_q (each block's gets its slopes, sinks, bh)
    serial: bool
    out_dtype: np.dtype
    q_user_chunks: tuple  #: q's chunks before one head per task: the output is rechunked back to them
    lead_chunks: tuple  #: the chunks of the leading axes, shared by q, k and v
    k_chunks: tuple  #: the chunks of the key axis, shared by k, v and the mask
    kv_heads: tuple | None = None  #: grouped heads: q's head block -> k's and v's head block (else None)
    slopes: Any = None  #: ALiBi slopes broadcast to ``lead`` (float64), or None
    sinks: Any = None  #: sink logits broadcast to ``lead`` (float64), or None


def prepare_inputs(q, k, v, pattern, scale, key_padding_mask, serial, pin, shards, da, mods=None):
    """Check the arguments of :func:`sparse_attention` (in its order: the errors it documents) and lay them out."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_input(name, x, da)
    if not any(isinstance(x, da.Array) for x in (q, k, v)):
        raise TypeError(
            "sparseattn.dask.sparse_attention needs at least one dask array among q, k, v (got NumPy arrays only); "
            "use sparseattn.sparse_attention for NumPy arrays"
        )
    for flag, value in (("serial", serial), ("pin", pin)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if shards is not None and not isinstance(shards, ContiguousShards):
        raise TypeError(f"shards must be a sparseattn.dask.ContiguousShards or None, got {type(shards).__name__}")
    if shards is not None and pin:
        raise ValueError("pin=True and shards place the tasks in two ways: pass one of them")
    kd = k if isinstance(k, da.Array) else (v if isinstance(v, da.Array) else None)
    qd = q if isinstance(q, da.Array) else None
    k = _wrap(k, kd if kd is not None else qd, da)
    v = _wrap(v, k, da)
    q = _wrap(q, qd if qd is not None else k, da)
    # the same shape and pattern rules as the local engine
    lead, n_q, d, n_k, dv, patterns, per_head = check_shapes_and_patterns(q, k, v, pattern)
    kv_groups(q, k, v)  # the engine's errors for heads that do not group
    h_q = lead[-1] if lead else 1
    h_kv = _heads(k)
    # grouped-query heads (multi-query too): k and v keep their h_kv heads, each task reads the kv heads
    # of its query heads; a heads axis that broadcasts otherwise (k with 1 head, v with h_q) is broadcast
    grouped = bool(lead) and h_q > 1 and h_kv == _heads(v) and h_kv < h_q
    out_dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    checked = _modifiers(mods or {}, lead, n_q, n_k, out_dtype)
    scale = Score(check_scale(scale, d), checked.softcap, n_k - n_q, score_mod=checked.score_mod)
    slopes = None if checked.slopes is None else checked.slopes.reshape(lead)
    sinks = None if checked.sinks is None else checked.sinks.reshape(lead)

    # -- layout: broadcast, one chunk along d, k/v chunked like q on the leading axes -------
    q = da.broadcast_to(q, lead + (n_q, d)) if q.shape[:-2] != lead else q
    q_user_chunks = q.chunks
    if per_head and any(c != 1 for c in q.chunks[-3]):
        q = q.rechunk({q.ndim - 3: 1})  # one head per task; the output is rechunked back
    kv_heads = None
    kv_lead = lead
    if grouped:
        q, kv_chunks, kv_heads = _group_heads(q, h_q // h_kv)
        kv_lead = lead[:-1] + (h_kv,)
    q = q.rechunk({q.ndim - 1: -1})
    lead_chunks = q.chunks[:-2]
    kv_lead_chunks = lead_chunks if not grouped else lead_chunks[:-1] + (kv_chunks,)
    k = da.broadcast_to(k, kv_lead + (n_k, d)) if k.shape[:-2] != kv_lead else k
    k = k.rechunk(kv_lead_chunks + (k.chunks[-2], (d,)))
    k_chunks = k.chunks[-2]
    v = da.broadcast_to(v, kv_lead + (n_k, dv)) if v.shape[:-2] != kv_lead else v
    v = v.rechunk(kv_lead_chunks + (k_chunks, (dv,)))
    mask = None
    if key_padding_mask is not None:
        mask = _prepare_mask(key_padding_mask, lead, n_k, lead_chunks, k_chunks, da)
    return Inputs(
        q, k, v, mask, lead, n_k, dv, patterns, per_head, scale, serial, out_dtype, q_user_chunks, lead_chunks,
        k_chunks, kv_heads, slopes, sinks,
    )  # fmt: skip


def _heads(x):
    return x.shape[-3] if x.ndim >= 3 else 1


def _group_heads(q, g):
    """q's head chunks made to fit groups of ``g`` query heads, and the matching k / v head chunks.

    A chunk of query heads must read one chunk of key heads: it either lies
    inside one group (it reads one key head), or starts and ends on group
    boundaries (its ``h / g`` key heads, grouped like the local engine's).
    Other chunks are rechunked to whole groups, about as many heads as the
    largest chunk (the output is rechunked back).  Returns
    ``(q, kv_chunks, kv_heads)``: ``kv_heads[i]`` is the key head block of
    query head block ``i``.
    """
    def spans(chunks):
        b = np.concatenate(([0], np.cumsum(chunks))).astype(np.int64)
        return list(zip(b[:-1].tolist(), b[1:].tolist()))

    def fits(h0, h1):
        return h1 > h0 and (h0 // g == (h1 - 1) // g or (h0 % g == 0 and h1 % g == 0))

    if not all(fits(h0, h1) for h0, h1 in spans(q.chunks[-3])):
        q = q.rechunk({q.ndim - 3: g * max(1, round(max(q.chunks[-3]) / g))})
    ranges = [(h0 // g, (h1 - 1) // g + 1) for h0, h1 in spans(q.chunks[-3])]
    distinct = sorted(set(ranges))
    return q, tuple(r1 - r0 for r0, r1 in distinct), tuple(distinct.index(r) for r in ranges)


def _modifiers(mods, lead, n_q, n_k, out_dtype):
    """The modifiers, checked as the local engine checks them (its messages).

    Slopes and sinks are laid out in float64 (each task casts its block's);
    a ``score_mod`` is compiled for the compute dtype the workers will use
    (the engine's dtype policy), so a function Numba cannot compile raises
    here with the engine's message.
    """
    checked = check_modifiers(**{name: mods.get(name) for name in ("softcap", "alibi_slopes", "sinks")},
                              lead=lead, n_q=n_q, n_k=n_k, compute=np.float64)  # fmt: skip
    score_mod = mods.get("score_mod")
    if score_mod is None:
        return checked
    compute = np.float64 if np.dtype(out_dtype).itemsize >= 8 else np.float32  # the engine's DTYPE_POLICY
    from dataclasses import replace

    return replace(checked, score_mod=check_score_mod(score_mod, compute))


def _check_input(name, x, da):
    """Refuse an input the engine would refuse later, on a worker, and one whose chunk sizes are unknown."""
    if sp.issparse(x):
        raise TypeError(f"{name} must be a dense floating-point array, got a scipy sparse {type(x).__name__}")
    if not isinstance(x, (da.Array, np.ndarray)):
        raise TypeError(f"{name} must be a dask array or a NumPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype} with shape {x.shape}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., n, d), got shape {x.shape}")
    if isinstance(x, da.Array) and any(np.isnan(c) for c in itertools.chain.from_iterable(x.chunks)):
        raise ValueError(f"{name} has unknown chunk sizes {x.chunks}; call {name}.compute_chunk_sizes() first")


def _wrap(x, like, da):
    """A NumPy input as a dask array, chunked along the sequence axis like ``like`` (one chunk otherwise)."""
    if isinstance(x, da.Array):
        return x
    seq = like.chunks[-2] if like is not None and like.shape[-2] == x.shape[-2] else -1
    return da.from_array(x, chunks=(-1,) * (x.ndim - 2) + (seq, -1))



def _prepare_mask(key_padding_mask, lead, n_k, lead_chunks, k_chunks, da):
    """The padding mask as a dask bool array of shape ``lead[:-1] + (n_k,)``, chunked like the keys."""
    kpm = key_padding_mask
    if not isinstance(kpm, da.Array):
        kpm = np.asarray(kpm)
    if kpm.dtype != bool:
        raise TypeError(
            f"key_padding_mask must be a boolean array (True = padded key), got dtype {kpm.dtype}; "
            f"convert 0/1 attention masks with key_padding_mask = (attention_mask == 0)"
        )
    target = lead[:-1] + (n_k,)
    ok = 1 <= kpm.ndim <= len(target) and kpm.shape[-1] == n_k
    if ok:
        try:
            np.broadcast_shapes(kpm.shape, target)
            ok = np.broadcast_shapes(kpm.shape, target) == target
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"key_padding_mask has shape {kpm.shape} but must broadcast to {target} "
            f"(batch dims of q/k/v {lead} without the heads axis, then n_k = {n_k})"
        )
    if not isinstance(kpm, da.Array):
        kpm = da.from_array(np.ascontiguousarray(np.broadcast_to(kpm, target)), chunks=lead_chunks[:-1] + (k_chunks,))
    else:
        kpm = da.broadcast_to(kpm, target) if kpm.shape != target else kpm
        kpm = kpm.rechunk(lead_chunks[:-1] + (k_chunks,))
    return kpm
