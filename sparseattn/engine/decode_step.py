"""The decode kernel's call: a few query rows whose keys are one run each, on :func:`sparseattn.kernels.decode.decode_slices`.

:func:`sparseattn.engine.decode.forward` tries :func:`kernel_call` first.  It
takes calls of the kernel's form (equal float dtypes, q's leading axes equal
to k's but for the grouped heads, one run of keys per row, no ``score_mod``):
the keys the rows reach become views of the cache, the query heads of each
key/value group rows of one slice, and a slice's keys are cut into ranges
when there are fewer slices than threads (merged by log-sum-exp).  Kept apart
from :mod:`sparseattn.engine.decode` (which falls back on the dispatcher) so
that the cold start's compile job (:mod:`sparseattn.engine.paths`) can
compile the kernel without an import cycle.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ..patterns import runsets
from ..patterns.base import Pattern
from ..patterns.windows import SlidingWindow
from .modifiers import check_modifiers
from .threads import run_ranges
from .validate import check_scale, check_scale_dtype

__all__ = ["kernel_call", "key_parts", "compile_kernel", "MAX_ROWS"]

#: calls with at most this many query rows are decode steps
MAX_ROWS = 16


#: below this many multiply-adds a call runs in the calling thread.  Waking a pool thread and waiting for it
#: costs tens of microseconds: measured on a 2-core AVX2 host (16 / 4 heads, d 128), one thread took 300 us
#: against 350-390 us for two at 4.2 M (a 1,024-key window), two threads 440 us against 670 us at 8.4 M
_PARALLEL_MIN_FLOP = 3 << 21


def _runs(pattern, n_q):
    """``(lo, hi)``: each row's one run of keys ``[lo, hi)`` (a row without keys: ``lo == hi == 0``), or None if a row has more.

    Lists of ints: a decode step has at most :data:`MAX_ROWS` rows, and a
    window (what a decode loop builds at every step) gives its runs from its
    four parameters without an array.
    """
    if type(pattern) is SlidingWindow and pattern.dilation == 1:
        n_k, c0, left, right = pattern.shape[1], pattern.offset, pattern.left, pattern.right
        lo, hi = [], []
        for c in range(c0, c0 + n_q):  # query i sits at key position c = i + offset
            a, b = max(c - left, 0), min(c + right + 1, n_k)
            lo.append(a if b > a else 0)
            hi.append(b if b > a else 0)
        return lo, hi
    if pattern.has_runs:
        ptr, lo, hi = pattern.row_runs(0, n_q)
    else:
        m = pattern.rows(0, n_q)
        ptr, lo, hi = runsets.from_csr(m.indptr, m.indices)
    per_row = np.diff(ptr)
    if (per_row > 1).any():
        return None
    if len(lo) == n_q:
        return lo.tolist(), hi.tolist()
    has = per_row == 1
    rlo, rhi = np.zeros(n_q, dtype=np.int64), np.zeros(n_q, dtype=np.int64)
    rlo[has], rhi[has] = lo, hi
    return rlo.tolist(), rhi.tolist()


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
    """Whether the decode kernel can run on ``k``, ``v`` slices like these without compiling in this call
    (:func:`sparseattn.engine.coldstart.kernel_ready`)."""
    from . import coldstart

    key = ("decode", ks.dtype, ks.ndim, ks.flags.c_contiguous, vs.flags.c_contiguous)
    if coldstart.known_ready(key):  # a decode loop's steps after its first: no typeof (tens of us a step)
        return True
    import numba

    from ..kernels.decode import decode_slices

    kt, vt = numba.typeof(ks), numba.typeof(vs)
    views = "A" if "A" in (kt.layout, vt.layout) else None
    return coldstart.kernel_ready(decode_slices, key, lambda sig: sig[1] == kt and sig[2] == vt, kt.dtype, views)


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
    kernel_call(q, kv[0, :, :, :32], kv[1, :, :, :32], p, None, None, {}, "fused")
    k, v = np.ascontiguousarray(kv[0]), np.ascontiguousarray(kv[1])
    kernel_call(q, k, v, causal(1, 39, n_k=40), None, None, {}, "fused")


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


_local = threading.local()

_KERNEL = []


def _kernel():
    """``(decode_slices, numba.get_num_threads)``, imported by the first step (importing the engine loads no Numba).

    Kept once imported: a decode loop calls this per layer and step, and two import statements cost
    about 10 us right after a step's kernel has streamed the window through the caches.
    """
    if not _KERNEL:
        from numba import get_num_threads

        from ..kernels.decode import decode_slices

        _KERNEL[:] = [decode_slices, get_num_threads]
    return _KERNEL[0], _KERNEL[1]

#: the kernel's key padding argument when a call has none (the kernel only reads it)
_NO_MASK = np.zeros((1, 1), dtype=np.uint8)

def _scratch(dt, R, w, dv):
    """This thread's ``(sbuf, acc)`` for the kernel, kept from the last call of the same shapes (a decode loop's)."""
    rows = max(-(-R // 6) * 6, -(-R // 4) * 4)  # whole register blocks: 6 rows, or 4 (the kernel picks by dv)
    key = (np.dtype(dt), rows, w, dv)
    if getattr(_local, "key", None) != key:
        _local.key = key
        _local.bufs = (np.zeros((rows, w), dtype=dt), np.empty((rows, dv), dtype=dt))
    sbuf, acc = _local.bufs
    sbuf[R:] = 0  # the rows of the last register block past the group's rows
    return sbuf, acc


def kernel_call(q, k, v, pattern, scale, key_padding_mask, mods, path):
    """``(out, lse)`` of a decode call on :func:`sparseattn.kernels.decode.decode_slices`, or None.

    None when the call is not of the kernel's form (equal float dtypes, q's
    leading axes equal to k's but for the grouped heads, one run of keys per
    row, no ``score_mod``), when the kernel is not compiled yet and ``path``
    is ``"auto"`` (the cold start answers on the blocked path meanwhile), or
    when a raw score or an output is not finite: the caller then computes the
    call on the paths that follow the non-finite policy.
    """
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
    runs = _runs(pattern, n_q)
    if runs is None:
        return None
    reached = [(x, y) for x, y in zip(*runs) if y > x]
    if not reached:
        return None
    a, b = min(x for x, _ in reached), max(y for _, y in reached)  # the keys the rows reach
    w = b - a
    ks, vs = _as_slices(k[..., a:b, :], w), _as_slices(v[..., a:b, :], w)
    if ks is None or vs is None:
        return None
    lead_b = q.shape[:-3]
    n_b = math.prod(lead_b)  # ints (np.prod took 6-23 us of a step: more after the kernel, in cold caches)
    has_mask = key_padding_mask is not None
    kpm = _NO_MASK
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
    # each row's run on the span (rows without keys: 0, 0)
    lo = np.array([max(x - a, 0) for x in runs[0]], dtype=np.int64)
    hi = np.array([max(y - a, 0) for y in runs[1]], dtype=np.int64)
    g = h_q // h_kv
    S, R = n_b * h_kv, g * n_q
    qp = np.ascontiguousarray(q).reshape(S, R, d)
    decode_slices, get_num_threads = _kernel()
    n_threads = get_num_threads()
    if S * R * w * (d + v.shape[-1]) < _PARALLEL_MIN_FLOP:
        n_threads = 1
    parts = key_parts(S, w, n_threads)
    out = np.empty((S * parts, R, v.shape[-1]), dtype=dt)
    lse = np.empty((S * parts, R), dtype=dt)
    bad = np.zeros(S * parts, dtype=np.uint8)
    n_threads = min(n_threads, S * parts)
    # up to 4 ranges per thread, handed out in turn: a pool thread that wakes late (tens of microseconds, a
    # good part of a decode step) still finds work, and each range costs one kernel dispatch
    n_items = S * parts
    n_ranges = min(n_items, 4 * n_threads) if n_threads > 1 else 1
    bounds = [i * n_items // n_ranges for i in range(n_ranges + 1)]
    run_ranges(
        decode_slices,
        (qp, ks, vs, kpm, has_mask, max(h_kv, 1), lo, hi, np.int64(n_q), np.int64(0), np.int64(a), dt.type(scale),
         mod, slopes, np.int64(g), np.int64(parts)),
        (out, lse, bad),
        bounds,
        n_threads,
        per_thread=lambda: _scratch(dt, R, w, v.shape[-1]),
        flush_denormals=True,
    )  # fmt: skip
    if bad.any():
        return None
    if parts > 1:
        from .blocked import merge_partials

        o4, l3 = out.reshape(S, parts, R, -1), lse.reshape(S, parts, R)
        out, lse = merge_partials([(o4[:, p], l3[:, p]) for p in range(parts)])
    out = out.reshape(q.shape[:-1] + (v.shape[-1],))
    lse = lse.reshape(q.shape[:-1])
    if m.sinks is not None:
        m.add_sinks(out.reshape(-1, n_q, out.shape[-1]), lse.reshape(-1, n_q))
    return out, lse
