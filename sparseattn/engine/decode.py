"""Decode over a KV cache: a forward call with few query rows costs O(the keys it reaches), not O(the cache).

A one-token decode step of a sliding-window model asks
``sparse_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], causal(1, W - 1, n_k=T, offset=T - 1))``:
one query row per head, ``W`` keys out of ``T``.  :func:`rewrite` turns such a
call (at most :data:`MAX_ROWS` query rows) into an equivalent smaller one
before validation:

0. **The decode kernel** (:mod:`sparseattn.engine.decode_step`): a call whose
   rows each see one run of keys runs there, on the key span read in place
   with the groups as rows, as below; the others are rewritten:
1. **The key span.**  The keys ``[a, b)`` any row can reach (from a window's
   parameters, else from the few rows' CSR); ``k``, ``v`` and the padding mask
   become views of that span and the pattern is shifted onto it.  Nothing
   downstream (validation, the non-finite scan, planning, the kernels) sees
   the rest of the cache, and views of a preallocated cache are read in place
   (:func:`sparseattn.engine.validate.prepare` keeps them).  After the shift
   the pattern of step ``T`` equals that of step ``T + 1`` (once ``T >= W``),
   so its tile plan comes from the plan cache.
2. **Grouped query heads as rows.**  With ``g`` query heads per key/value head
   and every row seeing the whole span (a one-token step), the ``g`` query
   heads of a group become ``g`` rows of one slice (a reshape of ``q``, no
   copy): each key/value head is read once per step instead of ``g`` times,
   and the micro-kernels' 6-row blocks are filled.

ALiBi and a ``score_mod`` see positions and heads, so calls with them are
left as they are; softcap and sinks pass through (sinks are added after the
packed rows are unpacked).
"""

from __future__ import annotations

import numpy as np

from ..patterns.base import CSRPattern, Pattern
from ..patterns.windows import SlidingWindow, sliding_window
from .decode_step import MAX_ROWS
from .decode_step import kernel_call as _kernel_call

__all__ = ["rewrite", "MAX_ROWS"]

def _span(pattern, n_q):
    """``(a, b)``: the keys the rows of ``pattern`` reach (``a == b``: none), or None if unknown cheaply."""
    if isinstance(pattern, SlidingWindow):
        lo, counts = pattern._bounds(0, n_q)
        has = counts > 0
        if not has.any():
            return 0, 0
        return int(lo[has].min()), int((lo + (counts - 1) * pattern.dilation)[has].max()) + 1
    if not isinstance(pattern, Pattern):
        return None
    m = pattern.rows(0, n_q)
    if m.nnz == 0:
        return 0, 0
    return int(m.indices.min()), int(m.indices.max()) + 1


def _shifted(pattern, n_q, a, b):
    """``pattern``'s columns ``[a, b)`` as a pattern of shape ``(n_q, b - a)``."""
    if isinstance(pattern, SlidingWindow):
        return SlidingWindow(n_q, b - a, pattern.left, pattern.right, pattern.dilation, pattern.offset - a)
    m = pattern.rows(0, n_q)
    return CSRPattern(m.indptr, np.asarray(m.indices, dtype=np.int64) - a, (n_q, b - a))


def _full_rows(pattern, n_q, n_k):
    """Whether every row of ``pattern`` (already on its span) sees every key."""
    if isinstance(pattern, SlidingWindow):
        lo, counts = pattern._bounds(0, n_q)
        return pattern.dilation == 1 and bool((counts == n_k).all())
    return pattern.rows(0, n_q).nnz == n_q * n_k


def rewrite(q, k, v, pattern, key_padding_mask, mods):
    """The smaller equivalent call, or None: ``(q, k, v, pattern, key_padding_mask, unpack)``.

    ``unpack(out, lse)`` turns the rewritten call's results back into the
    original's shapes (``lse`` may be None).  Only for plain NumPy arrays with
    one pattern for every head, at most :data:`MAX_ROWS` query rows and no
    ALiBi or ``score_mod``.
    """
    if mods.get("alibi_slopes") is not None or mods.get("score_mod") is not None:
        return None
    if not all(isinstance(x, np.ndarray) for x in (q, k, v)) or min(q.ndim, k.ndim, v.ndim) < 2:
        return None
    if isinstance(pattern, (list, tuple)) or not isinstance(pattern, Pattern):
        return None
    n_q, n_k = q.shape[-2], k.shape[-2]
    if not 0 < n_q <= MAX_ROWS or pattern.shape != (n_q, n_k) or v.shape[-2] != n_k:
        return None
    span = _span(pattern, n_q)
    if span is None:
        return None
    a, b = span
    unpack = _identity
    if b - a < n_k and b > a:
        k, v = k[..., a:b, :], v[..., a:b, :]
        if key_padding_mask is not None:
            kpm = np.asarray(key_padding_mask)
            if kpm.ndim == 0 or kpm.shape[-1] != n_k:
                return None  # let the validation name the bad mask
            key_padding_mask = kpm[..., a:b]
        pattern = _shifted(pattern, n_q, a, b)
    packed = _pack_groups(q, k, pattern)
    if packed is not None:
        q, pattern, unpack = packed
    return q, k, v, pattern, key_padding_mask, unpack


def _identity(out, lse):
    return out, lse


def _pack_groups(q, k, pattern):
    """Grouped query heads as rows of their key/value head's slice (a one-token step), or None."""
    if q.ndim < 3 or k.ndim < 3:
        return None
    h_q, h_kv = q.shape[-3], k.shape[-3]
    n_q, n_k = pattern.shape
    if h_kv in (0, 1, h_q) or h_q % h_kv or k.shape[:-3] != q.shape[:-3] or not _full_rows(pattern, n_q, n_k):
        return None
    g = h_q // h_kv
    lead = q.shape[:-3]
    rows = g * n_q
    qp = q.reshape(lead + (h_kv, rows, q.shape[-1]))
    # every packed row sees every key of the span: a band that covers the rectangle (planned from parameters)
    full = sliding_window(rows, left=rows, right=n_k, n_k=n_k)

    def unpack(out, lse):
        out = out.reshape(out.shape[:-3] + (h_q, n_q, out.shape[-1]))
        return out, (None if lse is None else lse.reshape(lse.shape[:-2] + (h_q, n_q)))

    return qp, full, unpack


def forward(q, k, v, pattern, scale, key_padding_mask, mods, path, return_lse):
    """:func:`sparseattn.sparse_attention` through :func:`rewrite`, or None when the call is not a decode step."""
    from . import paths
    from .modifiers import check_modifiers
    from .validate import prepare

    if not all(isinstance(x, np.ndarray) and x.dtype.kind == "f" for x in (q, k, v)):
        return None  # bad input: the full validation names it in the user's shapes
    done = _kernel_call(q, k, v, pattern, scale, key_padding_mask, mods, path)
    if done is not None:
        out, lse = done
        return (out, lse) if return_lse else out
    rw = rewrite(q, k, v, pattern, key_padding_mask, mods)
    if rw is None:
        return None
    q2, k2, v2, pattern2, kpm2, unpack = rw
    sinks = mods.get("sinks")
    prep = prepare(q2, k2, v2, pattern2, scale, kpm2, modifiers=dict(mods, sinks=None))
    out, lse, _ = paths.forward(prep, path)
    out, lse = unpack(out.reshape(prep.lead + out.shape[1:]), lse.reshape(prep.lead + lse.shape[1:]))
    if sinks is not None:
        lead, n_q = out.shape[:-2], out.shape[-2]
        m = check_modifiers(sinks=sinks, lead=lead, n_q=n_q, n_k=k.shape[-2], compute=out.dtype)
        S = int(np.prod(lead, dtype=np.int64)) if lead else 1
        o, ls = out.reshape(S, n_q, out.shape[-1]), lse.reshape(S, n_q)  # views of the arrays just made
        m.add_sinks(o, ls)
    out = out.astype(prep.out_dtype, copy=False)
    return (out, lse.astype(prep.out_dtype, copy=False)) if return_lse else out
