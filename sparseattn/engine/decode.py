"""Decode over a KV cache: a forward call with few query rows costs O(the keys it reaches), not O(the cache).

A one-token decode step of a sliding-window model asks
``sparse_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], causal(1, W - 1, n_k=T, offset=T - 1))``:
one query row per head, ``W`` keys out of ``T``.  :func:`rewrite` turns such a
call (at most :data:`MAX_ROWS` query rows) into an equivalent smaller one
before validation:

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

__all__ = ["rewrite", "MAX_ROWS"]

#: calls with at most this many query rows are rewritten
MAX_ROWS = 16


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


# --------------------------------------------------------------------------------------------
# the decode kernel (sparseattn.kernels.decode): K and V of the span read once, in place
# --------------------------------------------------------------------------------------------

#: below this many multiply-adds a call runs in the calling thread
_PARALLEL_MIN_FLOP = 1 << 21


def _runs(pattern, n_q):
    """``(lo, hi)``: each row's one run of keys ``[lo, hi)`` (empty rows: ``lo == hi``), or None if a row has more."""
    if isinstance(pattern, SlidingWindow):
        if pattern.dilation != 1:
            return None
        lo, counts = pattern._bounds(0, n_q)
        lo = np.asarray(lo, dtype=np.int64)
        return lo, lo + np.asarray(counts, dtype=np.int64)
    m = pattern.rows(0, n_q)
    ptr, ind = np.asarray(m.indptr, dtype=np.int64), np.asarray(m.indices, dtype=np.int64)
    lens = np.diff(ptr)
    has = lens > 0
    first, last = ind[ptr[:-1][has]], ind[ptr[1:][has] - 1]
    if (last - first + 1 != lens[has]).any():
        return None
    lo = np.zeros(n_q, dtype=np.int64)
    lo[has] = first
    hi = lo.copy()
    hi[has] = last + 1
    return lo, hi


def _as_slices(x, w):
    """``x`` (..., w, e) as an (S, w, e) view whose slices are contiguous, or None (it would need a copy)."""
    y = x.view()
    try:
        y.shape = (-1, w, x.shape[-1])
    except AttributeError:
        return None
    item = x.dtype.itemsize
    if (x.shape[-1] > 1 and y.strides[2] != item) or (w > 1 and y.strides[1] != x.shape[-1] * item):
        return None
    return y


def _ready(ks, vs):
    """Whether the decode kernel can run on ``k``, ``v`` slices like these without compiling in this call."""
    import numba

    from ..kernels.cache import cached
    from ..kernels.decode import decode_slices
    from . import coldstart

    kt, vt = numba.typeof(ks), numba.typeof(vs)
    if any(sig[1] == kt and sig[2] == vt for sig in decode_slices.signatures):
        return True
    if coldstart.mode() == "wait" or coldstart.in_compile_thread():
        return True
    if coldstart.compiling():
        return False
    views = "A" if "A" in (kt.layout, vt.layout) else None
    return cached(decode_slices, kt.dtype, layout=views)


def compile_kernel(dtype_name):
    """Compile (or load) the decode kernel for ``dtype_name``: k and v contiguous, and views of a cache.

    Part of the cold start's forward compile job (:func:`sparseattn.engine.paths.compile_job`)
    and of ``sparseattn warmup``.
    """
    from ..patterns.windows import causal

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 1, 8)).astype(dtype_name)
    kv = rng.standard_normal((2, 1, 2, 40, 8)).astype(dtype_name)
    p = causal(1, 15, n_k=32)
    _kernel_call(q, kv[0, :, :, :32], kv[1, :, :, :32], p, None, None, {}, "fused")
    k, v = np.ascontiguousarray(kv[0]), np.ascontiguousarray(kv[1])
    _kernel_call(q, k, v, causal(1, 39, n_k=40), None, None, {}, "fused")


#: keys per part, at least, when a slice's keys are cut into parts
_MIN_PART_KEYS = 512


def key_parts(slices, keys, n_threads):
    """Into how many key ranges to cut each slice: enough work items for ``n_threads`` (1 when there are).

    A decode step of one batch entry has one slice per key/value head (8 for
    Mistral, 1 for multi-query attention): fewer than a server's threads.
    Each part's softmax is merged afterwards (log-sum-exp), as in
    FlashAttention's split-K decoding.
    """
    if slices >= n_threads:
        return 1
    return max(1, min(-(-n_threads // slices), keys // _MIN_PART_KEYS))


def _merge_parts(out, lse):
    """``(out, lse)`` of whole rows from the softmax of each key range: (S, P, R, dv), (S, P, R) -> (S, R, dv), (S, R)."""
    with np.errstate(invalid="ignore", over="ignore"):
        top = lse.max(axis=1)
        safe = np.where(np.isfinite(top), top, 0)
        wts = np.exp(lse - safe[:, None])  # exp(-inf) = 0: a range where the row had no key
        tot = wts.sum(axis=1)
        merged = np.einsum("spr,sprd->srd", wts, out)
        nz = tot > 0
        merged[nz] /= tot[nz][:, None]
        lse_m = np.where(nz, safe + np.log(np.where(nz, tot, 1)), -np.inf).astype(lse.dtype)
    return merged.astype(out.dtype, copy=False), lse_m


def _kernel_call(q, k, v, pattern, scale, key_padding_mask, mods, path):
    """``(out, lse)`` of a decode call on :func:`sparseattn.kernels.decode.decode_slices`, or None.

    None when the call is not of the kernel's form (equal float dtypes, q's
    leading axes equal to k's but for the grouped heads, one run of keys per
    row, no ``score_mod``), when the kernel is not compiled yet and ``path``
    is ``"auto"`` (the cold start answers on the blocked path meanwhile), or
    when a raw score or an output is not finite: the caller then computes the
    call on the paths that follow the non-finite policy.
    """
    from .modifiers import check_modifiers
    from .threads import run_ranges
    from .validate import check_scale, check_scale_dtype

    if path not in ("auto", "fused") or mods.get("score_mod") is not None:
        return None
    dt = q.dtype
    if dt not in (np.float32, np.float64) or k.dtype != dt or v.dtype != dt or q.ndim < 2 or not k.ndim == v.ndim == q.ndim:
        return None
    n_q, d = q.shape[-2:]
    n_k = k.shape[-2]
    if not 0 < n_q <= MAX_ROWS or k.shape[-1] != d or v.shape[-2] != n_k or d == 0 or v.shape[-1] == 0:
        return None
    if isinstance(pattern, (list, tuple)) or not isinstance(pattern, Pattern) or pattern.shape != (n_q, n_k):
        return None
    h_q, h_kv = (q.shape[-3], k.shape[-3]) if q.ndim > 2 else (1, 1)
    if q.shape[:-3] != k.shape[:-3] or v.shape[:-2] != k.shape[:-2] or h_kv == 0 or h_q == 0 or h_q % h_kv:
        return None
    span = _span(pattern, n_q)
    runs = None if span is None else _runs(pattern, n_q)
    if runs is None or span[0] >= span[1]:
        return None
    a, b = span
    w = b - a
    ks, vs = _as_slices(k[..., a:b, :], w), _as_slices(v[..., a:b, :], w)
    if ks is None or vs is None:
        return None
    lead_b = q.shape[:-3]
    n_b = int(np.prod(lead_b, dtype=np.int64)) if lead_b else 1
    has_mask = key_padding_mask is not None
    kpm = np.zeros((1, 1), dtype=np.uint8)
    if has_mask:
        km = key_padding_mask
        if not isinstance(km, np.ndarray) or km.dtype != bool or km.ndim < 1 or km.shape[-1] != n_k:
            return None
        try:
            kpm = np.ascontiguousarray(np.broadcast_to(km[..., a:b], lead_b + (w,)).reshape(n_b, w)).view(np.uint8)
        except ValueError:
            return None  # the validation names the mask's shape
    if path == "auto" and not _ready(ks, vs):
        return None
    scale = check_scale(scale, d)
    check_scale_dtype(scale, dt.type, scale)
    m = check_modifiers(**mods, lead=q.shape[:-2], n_q=n_q, n_k=n_k, compute=dt)
    mod, slopes = m.kernel_args(dt)
    lo, hi = runs
    lo, hi = np.maximum(lo - a, 0), np.maximum(hi - a, 0)
    lo = np.minimum(lo, hi)
    g = h_q // h_kv
    S, R = n_b * h_kv, g * n_q
    qp = np.ascontiguousarray(q).reshape(S, R, d)
    from numba import get_num_threads

    from ..kernels.decode import decode_slices

    n_threads = get_num_threads()
    if S * R * w * (d + v.shape[-1]) < _PARALLEL_MIN_FLOP:
        n_threads = 1
    parts = key_parts(S, w, n_threads)
    out = np.empty((S * parts, R, v.shape[-1]), dtype=dt)
    lse = np.empty((S * parts, R), dtype=dt)
    bad = np.zeros(S * parts, dtype=np.uint8)
    n_threads = min(n_threads, S * parts)
    bounds = [i * S * parts // n_threads for i in range(n_threads + 1)]
    run_ranges(
        decode_slices,
        (qp, ks, vs, kpm, has_mask, max(h_kv, 1), lo, hi, np.int64(n_q), np.int64(0), np.int64(a), dt.type(scale),
         mod, slopes, np.int64(g), np.int64(parts)),
        (out, lse, bad),
        bounds,
        n_threads,
        per_thread=lambda: (np.zeros((-(-R // 6) * 6, w), dtype=dt), np.empty((-(-R // 6) * 6, v.shape[-1]), dtype=dt)),
    )  # fmt: skip
    if bad.any():
        return None
    if parts > 1:
        out, lse = _merge_parts(out.reshape(S, parts, R, -1), lse.reshape(S, parts, R))
    out = out.reshape(q.shape[:-1] + (v.shape[-1],))
    lse = lse.reshape(q.shape[:-1])
    if m.sinks is not None:
        m.add_sinks(out.reshape(-1, n_q, out.shape[-1]), lse.reshape(-1, n_q))
    return out, lse
