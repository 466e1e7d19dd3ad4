"""What each task of the Dask graph computes: NumPy blocks in, NumPy blocks out.

These functions run on the workers.  None holds attention math of its own:
a block's partial result comes from the local engine (:func:`_engine`, with
``return_lse``), and partials over disjoint key sets are merged with the
log-sum-exp formula (:func:`_merge`).  The graph that calls them is built in
:mod:`sparseattn.dask.graph`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..engine.validate import check_scale
from ..patterns.base import CSRPattern
from ..patterns.builders import sliding_window


class Score(NamedTuple):
    """How a task turns ``q . k`` into a score: the scale and the softcap (None: none)."""

    scale: float | None
    softcap: float | None = None


def _engine(q, k, v, pattern, score, kpm, serial):
    """The local engine's forward on one block: ``(out, lse)`` in the compute dtype.

    Through the engine's dispatcher (``paths.forward``, fused), so a block
    whose inputs hold a NaN or an infinity follows the engine's non-finite
    policy (its slices run on the staged kernels) instead of meeting the
    fast-math fused kernels.
    """
    from ..engine import paths
    from ..engine.validate import prepare

    prep = prepare(q, k, v, pattern, score.scale, kpm, modifiers=dict(softcap=score.softcap) if score.softcap else None)
    out, lse, _ = paths.forward(prep, "fused", parallel=False if serial else None)
    return out.reshape(prep.lead + out.shape[1:]), lse.reshape(prep.lead + lse.shape[1:])


def _merge(parts):
    """Log-sum-exp merge of ``(out, lse)`` partials over disjoint key sets, in the partials' dtype.

    The weights ``exp(lse_i - max)`` lie in [0, 1] and their sum in [1, parts]:
    float32 loses nothing that matters here (``lse_i - max`` of two float32
    values within a factor of two of each other is exact, and a far smaller
    one gets a negligible weight), and it avoids casting whole output blocks
    to float64 and back, which took a fifth of a block task's time.
    """
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    dt = np.result_type(*(p[0].dtype for p in parts))
    lses = np.stack([np.asarray(p[1], dtype=dt) for p in parts])
    with np.errstate(invalid="ignore", divide="ignore"):
        m = lses.max(axis=0)
        m = np.where(np.isfinite(m), m, dt.type(0))  # all -inf: weights become 0, not NaN
        w = np.exp(lses - m)
        total = w.sum(axis=0)
        safe = np.where(total > 0, total, dt.type(1))
        w /= safe
        out = np.multiply(w[0][..., None], parts[0][0], dtype=dt)
        for wi, p in zip(w[1:], parts[1:]):
            out += wi[..., None] * p[0]
        lse = np.where(total > 0, m + np.log(safe), dt.type(-np.inf))
    return out, lse


def merge_task(*parts):
    return _merge(list(parts))


def slice_rows(x, lo, hi):
    """Positions ``[lo, hi)`` of a block's sequence axis (a copy: only it crosses to other workers)."""
    return np.array(x[..., lo:hi, :] if _is_data(x) else x[..., lo:hi], copy=True)


def _is_data(x):
    """Float blocks (q, k, v) carry the sequence on axis -2, boolean masks on the last axis."""
    return x.dtype.kind == "f"


def take_cols(x, cols):
    """Scattered positions of a block's sequence axis (last axis for masks, axis -2 for data)."""
    return np.take(x, cols, axis=-2 if _is_data(x) else -1)


def concat(parts, axis):
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=axis)


def _combined_mask(masks, extra):
    """User padding pieces (or None) joined along keys, OR-ed with ``extra`` (bool (m,)) when given."""
    mask = None if masks is None else concat(masks, -1)
    if extra is not None and extra.any():
        mask = extra if mask is None else np.logical_or(mask, extra)
    return mask


def _full(n_rows, n_keys):
    """Every row sees every key: a band wide enough to cover the rectangle (planned from parameters)."""
    return sliding_window(n_rows, left=n_rows, right=n_keys, n_k=n_keys)


def block_task(kind, spec, q, kparts, vparts, mparts, shared, scale, serial, dv, out_dtype, after=()):
    """Compute one output block (its split rows, if any, are written in later by :func:`write_rows`).

    ``after`` holds small results this task only waits for (unused): see the graph builder.

    ``kind`` is ``"window"`` (spec: ``left, right, shift, gpos, long_local``: the
    band in the frame of the key segment, the global keys' positions inside
    it, the split rows) or ``"csr"`` (spec: ``pattern, a, b, cols,
    long_local``: the pattern, the block's rows, the sorted key columns that
    ``kparts`` hold, the split rows).
    """
    n_rows = q.shape[-2]
    k_seg = concat(kparts, -2) if kparts else None
    v_seg = concat(vparts, -2) if vparts else None
    part = None
    if kind == "window":
        left, right, shift, gpos, long_local = spec
        if k_seg is not None and k_seg.shape[-2]:
            m = k_seg.shape[-2]
            extra = None
            if len(gpos):
                extra = np.zeros(m, dtype=bool)
                extra[gpos] = True
            mask = _combined_mask(mparts, extra)
            band = sliding_window(n_rows, left=left - shift, right=right + shift, n_k=m)
            part = _engine(q, k_seg, v_seg, band, scale, mask, serial)
        del k_seg, v_seg
        if shared is not None:
            part = _merge_shared(part, q, shared, scale, serial, dv)
    else:
        pattern, a, b, cols, long_local = spec
        if k_seg is not None and len(cols):
            m = pattern.rows(a, b)
            indptr, indices = m.indptr.astype(np.int64), m.indices
            counts = np.diff(indptr)
            if len(long_local):
                keep_row = np.ones(n_rows, dtype=bool)
                keep_row[long_local] = False
                indices = indices[np.repeat(keep_row, counts)]
                counts = np.where(keep_row, counts, 0)
                indptr = np.concatenate(([0], np.cumsum(counts)))
            local = np.searchsorted(cols, indices)
            sub = CSRPattern(indptr, local, (n_rows, len(cols)))
            mask = _combined_mask(mparts, None)
            part = _engine(q, k_seg, v_seg, sub, scale, mask, serial)
    if part is None:
        return np.zeros(q.shape[:-1] + (dv,), dtype=out_dtype)
    return part[0].astype(out_dtype, copy=False)


#: rows per engine call against the shared block of global keys (bounds that partial's extra memory)
SHARED_ROWS = 8192


def _shared_partial(q, gk, gv, gm, scale, serial):
    """``(out, lse)`` of rows ``q`` against every shared global key (``gm``: their padding, or None).

    A dense (rows x keys) product: the keys are few, so BLAS does it in one
    call where the engine would plan and walk a tile per row.  Inputs with a
    NaN or an infinity go through the engine instead, for its non-finite
    policy (a padded key must not reach a row even as ``0 * inf``).
    """
    from ..engine.blocked import masked_softmax

    if not (np.isfinite(q).all() and np.isfinite(gk).all() and np.isfinite(gv).all()):
        return _engine(q, gk, gv, _full(q.shape[-2], gk.shape[-2]), scale, gm, serial)
    dt = np.dtype(np.float64 if np.result_type(q, gk, gv).itemsize >= 8 else np.float32)
    sc = dt.type(check_scale(scale.scale, q.shape[-1]))
    q, gk, gv = (np.asarray(x, dtype=dt) for x in (q, gk, gv))
    s = np.matmul(q, np.swapaxes(gk, -1, -2))
    s *= sc
    if scale.softcap is not None:  # the engine's definition (sparseattn.engine.modifiers), as blocked computes it
        s = dt.type(scale.softcap) * np.tanh(s / dt.type(scale.softcap))
    allowed = np.ones(1, dtype=bool)
    if gm is not None:
        pad = np.asarray(gm, dtype=bool)
        allowed = ~pad.reshape(pad.shape[:-1] + ((1,) if q.ndim >= 3 else ()) + (1, pad.shape[-1]))
    return masked_softmax(s, allowed, gv)


def _merge_shared(part, q, shared, scale, serial, dv):
    """Merge the partial of every row against the shared global keys into ``part`` (``(out, lse)`` or None).

    Row tiles of :data:`SHARED_ROWS` at a time, merged in place, so the extra
    memory is a tile's, not a second output block and its float64 copies.
    """
    gk, gv, gm = shared
    n_rows = q.shape[-2]
    for t0 in range(0, max(n_rows, 1), SHARED_ROWS):
        t1 = min(t0 + SHARED_ROWS, n_rows)
        g_out, g_lse = _shared_partial(q[..., t0:t1, :], gk, gv, gm, scale, serial)
        if part is None:  # no other keys: the shared partial is the block's result
            part = (np.empty(q.shape[:-1] + (dv,), dtype=g_out.dtype), np.empty(q.shape[:-1], dtype=g_lse.dtype))
            if not n_rows:
                return part
        else:
            g_out, g_lse = _merge([(part[0][..., t0:t1, :], part[1][..., t0:t1]), (g_out, g_lse)])
        part[0][..., t0:t1, :] = g_out
        part[1][..., t0:t1] = g_lse
    return part


def write_rows(out, rows, part):
    """The block ``out`` with its split ``rows`` set from their merged partial ``part``.

    Writes in place when ``out`` is writeable: it is the block task's own
    result and this task its only reader, and writing the same rows again
    (a retried task) gives the same block.
    """
    out = out if out.flags.writeable else np.array(out, copy=True)
    out[..., rows, :] = part[0]
    return out


def write_edge(out, e, edge):
    """The block ``out`` with its first ``e`` rows set from ``edge`` (as :func:`write_rows`)."""
    return write_rows(out, slice(0, e), (edge,))


def order_token(*_):
    """A token: a dependency that orders a task after another without moving the other's result."""
    return None


def long_partial(q_rows, k, v, mask, csr, scale, serial, after=None):
    """Split rows against one key block: ``(out, lse)``; ``csr`` None means every key of the block.

    ``after`` is an ordering token (unused): the partial waits for the block
    task that reads this key block, so that the key block is released when
    both are done rather than held from an early partial to a late block task.
    """
    n_rows, n_keys = q_rows.shape[-2], k.shape[-2]
    if csr is None:
        pattern = _full(n_rows, n_keys)
    else:
        indptr, indices = csr
        pattern = CSRPattern(indptr, indices, (n_rows, n_keys))
    return _engine(q_rows, k, v, pattern, scale, mask, serial)


def rows_of(q, rows):
    return np.ascontiguousarray(q[..., rows, :])


def empty_partial(q_rows, dv, dtype):
    shape = q_rows.shape[:-1]
    return np.zeros(shape + (dv,), dtype=dtype), np.full(shape, -np.inf, dtype=dtype)

