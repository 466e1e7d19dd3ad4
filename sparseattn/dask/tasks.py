"""What each task of the Dask graph computes: NumPy blocks in, NumPy blocks out.

These functions run on the workers.  None holds attention math of its own:
a block's partial result comes from the local engine (:func:`_engine`, with
``return_lse``), and partials over disjoint key sets are merged with the
log-sum-exp formula (:func:`_merge`).  The graph that calls them is built in
:mod:`sparseattn.dask.graph`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..engine.validate import check_scale
from ..patterns.base import CSRPattern
from ..patterns.builders import sliding_window


class Score(NamedTuple):
    """How a task turns ``q . k`` into a score, for one block of the leading axes.

    ``scale``, ``softcap`` and ``score_mod`` (None: none) are the call's;
    ``slopes`` and ``sinks`` (None: none) are the ALiBi slopes and sink
    logits of the block's query heads, shaped like the block's leading axes
    (``(1,)`` without leading axes); ``delta`` is the call's ``n_k - n_q``
    (ALiBi's diagonal); ``bh`` (with ``score_mod``; None without leading
    axes) the flattened batch index and query head in the whole call of each
    of the block's slices, int64 ``(S, 2)``.  ALiBi and ``score_mod`` need
    absolute positions: every engine call of a task passes ``at``, the
    positions of its first row and first key in the whole call
    (:func:`_engine`).  Sinks carry no value: they are applied once per
    output row, after its partials are merged (:func:`_add_sinks`).
    """

    scale: float | None
    softcap: float | None = None
    delta: int = 0
    slopes: np.ndarray | None = None
    sinks: np.ndarray | None = None
    score_mod: Any = None
    bh: np.ndarray | None = None

    @property
    def positional(self):
        """Whether the scores depend on where the rows and keys are in the whole call (ALiBi, ``score_mod``)."""
        return self.slopes is not None or self.score_mod is not None


def _engine(q, k, v, pattern, score, kpm, serial, at=None):
    """The local engine's forward on one block: ``(out, lse)`` in the compute dtype, without sinks.

    Through the engine's dispatcher (``paths.forward``, fused), so a block
    whose inputs hold a NaN or an infinity follows the engine's non-finite
    policy (its slices run on the staged kernels) instead of meeting the
    fast-math fused kernels.

    With ALiBi or a ``score_mod`` (``score.positional``), ``at = (r0, k0)``
    are the positions in the whole attention of this call's first row and
    first key; its rows and keys must be contiguous positions from there
    (the callers cut scattered rows and keys into such calls).  ALiBi's
    diagonal in the call's local frame is then ``offset = r0 + n_k - n_q -
    k0`` (row ``i`` and key ``j`` of the call are at distance ``|i + offset
    - j|``), and the user's function sees row ``i + r0``, key ``j + k0`` and,
    for each slice of the block, its batch index and query head in the whole
    call (``score.bh``).  The modifiers are checked by the engine's
    ``check_modifiers`` and only the frame is replaced: the formulas stay the
    engine's.
    """
    from dataclasses import replace

    from ..engine import paths
    from ..engine.validate import prepare

    mods = {}
    if score.softcap is not None:
        mods["softcap"] = score.softcap
    if score.slopes is not None:
        mods["alibi_slopes"] = score.slopes
    if score.score_mod is not None:
        mods["score_mod"] = score.score_mod
    if score.positional and at is None:  # pragma: no cover - a programming error in the graph, not a user's
        raise AssertionError("a partial with ALiBi or score_mod needs the position of its rows and keys")
    prep = prepare(q, k, v, pattern, score.scale, kpm, modifiers=mods or None)
    if score.positional:
        r0, k0 = int(at[0]), int(at[1])
        frame = {}
        if score.slopes is not None:
            frame["offset"] = r0 + score.delta - k0
        if score.score_mod is not None:
            bh = score.bh
            if bh is not None and len(bh) != len(prep.slice_pattern):  # pragma: no cover - a graph error
                raise AssertionError(f"a block of {len(prep.slice_pattern)} slices got a map of {len(bh)}")
            frame.update(i0=r0, j0=k0, slice_bh=bh)
        prep = replace(prep, mods=replace(prep.mods, **frame))
    out, lse, _ = paths.forward(prep, "fused", parallel=False if serial else None)
    return out.reshape(prep.lead + out.shape[1:]), lse.reshape(prep.lead + lse.shape[1:])


def _add_sinks(part, score):
    """``(out, lse)`` of whole rows (every partial merged) with the block's sinks, in place (the engine's formula)."""
    if score.sinks is None or part is None:
        return part
    from ..engine.modifiers import Modifiers

    out, lse = part
    n, dv = out.shape[-2], out.shape[-1]
    S = int(np.prod(out.shape[:-2], dtype=np.int64)) if out.ndim > 2 else 1
    o3, l2 = out.reshape(S, n, dv), lse.reshape(S, n)
    Modifiers(sinks=np.asarray(score.sinks, dtype=lse.dtype).reshape(S)).add_sinks(o3, l2)
    return o3.reshape(out.shape), l2.reshape(lse.shape)


def _rowwise(q_rows, rows_abs, k, v, mask, csr, score, serial, k0):
    """Scattered rows against contiguous keys (from position ``k0``) with ALiBi or ``score_mod``: a call per row.

    Each row has its own position (ALiBi's diagonal, the user's ``i``); rows
    are few (split rows, global rows), so a call per row costs a planning
    step each, not a kernel.
    """
    n_rows, n_keys = q_rows.shape[-2], k.shape[-2]
    outs, lses = [], []
    for r in range(n_rows):
        if csr is None:
            pattern = _full(1, n_keys)
        else:
            indptr, indices = csr
            lo, hi = int(indptr[r]), int(indptr[r + 1])
            pattern = CSRPattern(np.array([0, hi - lo], dtype=np.int64), indices[lo:hi], (1, n_keys))
        o, l_ = _engine(q_rows[..., r : r + 1, :], k, v, pattern, score, mask, serial, at=(rows_abs[r], k0))
        outs.append(o)
        lses.append(l_)
    if not outs:
        dt = np.float64 if np.result_type(q_rows, k, v).itemsize >= 8 else np.float32
        return empty_partial(q_rows, v.shape[-1], dt)
    return np.concatenate(outs, axis=-2), np.concatenate(lses, axis=-1)


def _csr_runs(q, k_seg, v_seg, indptr, local, cols, a, score, mask, serial):
    """A CSR block with ALiBi or ``score_mod``: one engine call per run of contiguous key positions in ``cols``, merged.

    ``cols`` (sorted absolute key positions the segment holds) is cut where
    it jumps; within a run the keys are contiguous, so the run's first key
    places all of them (:func:`_engine`'s ``at``).
    """
    n_rows = q.shape[-2]
    cuts = np.flatnonzero(np.diff(cols) != 1) + 1
    starts = np.concatenate(([0], cuts)).astype(np.int64)
    ends = np.concatenate((cuts, [len(cols)])).astype(np.int64)
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    parts = []
    for r0, r1 in zip(starts, ends):
        keep = (local >= r0) & (local < r1)
        if not keep.any():
            continue
        ptr = np.concatenate(([0], np.cumsum(np.bincount(row_of[keep], minlength=n_rows)))).astype(np.int64)
        sub = CSRPattern(ptr, local[keep] - r0, (n_rows, int(r1 - r0)))
        m = None if mask is None else mask[..., r0:r1]
        parts.append(_engine(q, k_seg[..., r0:r1, :], v_seg[..., r0:r1, :], sub, score, m, serial,
                             at=(a, cols[r0])))  # fmt: skip
    return _merge(parts) if parts else None


def _merge(parts):
    """Log-sum-exp merge of ``(out, lse)`` partials (None: no key there): the engine's ``merge_partials``."""
    from ..engine.blocked import merge_partials

    return merge_partials([p for p in parts if p is not None])


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


def block_task(kind, spec, q, kparts, vparts, mparts, shared, scale, serial, dv, out_dtype, a=0, after=()):
    """Compute one output block (its split rows, if any, are written in later by :func:`write_rows`).

    ``a`` is the position of the block's first query row in the whole
    attention (ALiBi's and ``score_mod``'s positions); ``scale`` the block's
    :class:`Score`.

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
            part = _engine(q, k_seg, v_seg, band, scale, mask, serial, at=(a, a - shift))
        del k_seg, v_seg
        if shared is not None:
            part = _merge_shared(part, q, shared, scale, serial, dv, a)
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
            mask = _combined_mask(mparts, None)
            if not scale.positional:
                sub = CSRPattern(indptr, local, (n_rows, len(cols)))
                part = _engine(q, k_seg, v_seg, sub, scale, mask, serial)
            else:
                part = _csr_runs(q, k_seg, v_seg, indptr, local, cols, a, scale, mask, serial)
    if part is None:  # no key at all: zeros, with or without sinks
        return np.zeros(q.shape[:-1] + (dv,), dtype=out_dtype)
    part = _add_sinks(part, scale)
    return part[0].astype(out_dtype, copy=False)


#: rows per engine call against the shared block of global keys (bounds that partial's extra memory)
SHARED_ROWS = 8192


def _shared_partial(q, gk, gv, gm, scale, serial, r0=0, gpos=None):
    """``(out, lse)`` of rows ``q`` against every shared global key (``gm``: their padding, or None).

    A dense (rows x keys) product: the keys are few, so BLAS does it in one
    call where the engine would plan and walk a tile per row.  Inputs with a
    NaN or an infinity go through the engine instead, for its non-finite
    policy (a padded key must not reach a row even as ``0 * inf``).  ``r0``
    is the position of the first row and ``gpos`` those of the keys (ALiBi,
    ``score_mod``); the global keys are scattered, so with either the
    engine's fallback runs one call per global key (each a single key, so
    one position holds).
    """
    from ..engine.blocked import masked_softmax
    from ..engine.modifiers import Modifiers

    if not (np.isfinite(q).all() and np.isfinite(gk).all() and np.isfinite(gv).all()):
        if not scale.positional:
            return _engine(q, gk, gv, _full(q.shape[-2], gk.shape[-2]), scale, gm, serial)
        parts = [_engine(q, gk[..., c : c + 1, :], gv[..., c : c + 1, :], _full(q.shape[-2], 1), scale,
                         None if gm is None else gm[..., c : c + 1], serial, at=(r0, gpos[c]))
                 for c in range(gk.shape[-2])]  # fmt: skip
        return _merge(parts)
    dt = np.dtype(np.float64 if np.result_type(q, gk, gv).itemsize >= 8 else np.float32)
    sc = dt.type(check_scale(scale.scale, q.shape[-1]))
    q, gk, gv = (np.asarray(x, dtype=dt) for x in (q, gk, gv))
    g = _groups(q, gk)
    if g > 1:  # grouped-query heads: query head h reads key head h // g, by broadcasting (no copies)
        hk = gk.shape[-3]
        qg = q.reshape(q.shape[:-3] + (hk, g) + q.shape[-2:])
        gk, gv = gk[..., None, :, :], gv[..., None, :, :]
        s = np.matmul(qg, np.swapaxes(gk, -1, -2)).reshape(q.shape[:-1] + (gk.shape[-2],))
    else:
        s = np.matmul(q, np.swapaxes(gk, -1, -2))
    s *= sc
    if scale.softcap is not None or scale.positional:
        # the engine's definition (sparseattn.engine.modifiers), as its blocked path computes it, at the
        # rows' and keys' positions in the whole attention (and the slices' batch index and head in it)
        S = int(np.prod(q.shape[:-2], dtype=np.int64)) if q.ndim > 2 else 1
        slopes = None if scale.slopes is None else np.asarray(scale.slopes, dtype=dt).reshape(S)
        mods = Modifiers(softcap=scale.softcap, slopes=slopes, offset=scale.delta, score_mod=scale.score_mod,
                         heads=q.shape[-3] if q.ndim > 2 else 1, slice_bh=scale.bh)  # fmt: skip
        sl = np.arange(S).reshape(q.shape[:-2] + (1, 1))
        rows = (r0 + np.arange(q.shape[-2]))[:, None]
        s = mods.apply(s, sl, rows, np.asarray(gpos if gpos is not None else np.arange(gk.shape[-2]))[None, :])
    allowed = np.ones(1, dtype=bool)
    if gm is not None:
        pad = np.asarray(gm, dtype=bool)
        allowed = ~pad.reshape(pad.shape[:-1] + ((1,) if q.ndim >= 3 else ()) + (1, pad.shape[-1]))
    if g > 1:
        grouped = q.shape[:-3] + (q.shape[-3] // g, g) + s.shape[-2:]
        if allowed.ndim > 1:
            allowed = allowed[..., None, :, :]
        out, lse = masked_softmax(s.reshape(grouped), allowed, gv)
        return out.reshape(q.shape[:-1] + out.shape[-1:]), lse.reshape(q.shape[:-1])
    return masked_softmax(s, allowed, gv)


def _groups(q, k):
    """The query heads per key head of a block (1 unless ``k`` has fewer, more than one, heads than ``q``)."""
    if q.ndim < 3 or k.ndim < 3 or k.shape[-3] in (q.shape[-3], 1):
        return 1
    return q.shape[-3] // k.shape[-3]


def _merge_shared(part, q, shared, scale, serial, dv, a=0):
    """Merge the partial of every row against the shared global keys into ``part`` (``(out, lse)`` or None).

    Row tiles of :data:`SHARED_ROWS` at a time, merged in place, so the extra
    memory is a tile's, not a second output block and its float64 copies.
    """
    gk, gv, gm, gpos = shared
    n_rows = q.shape[-2]
    for t0 in range(0, max(n_rows, 1), SHARED_ROWS):
        t1 = min(t0 + SHARED_ROWS, n_rows)
        g_out, g_lse = _shared_partial(q[..., t0:t1, :], gk, gv, gm, scale, serial, a + t0, gpos)
        if part is None:  # no other keys: the shared partial is the block's result
            part = (np.empty(q.shape[:-1] + (dv,), dtype=g_out.dtype), np.empty(q.shape[:-1], dtype=g_lse.dtype))
            if not n_rows:
                return part
        else:
            g_out, g_lse = _merge([(part[0][..., t0:t1, :], part[1][..., t0:t1]), (g_out, g_lse)])
        part[0][..., t0:t1, :] = g_out
        part[1][..., t0:t1] = g_lse
    return part


def write_rows(out, rows, part, score=None):
    """The block ``out`` with its split ``rows`` set from their merged partial ``part``.

    Writes in place when ``out`` is writeable: it is the block task's own
    result and this task its only reader, and writing the same rows again
    (a retried task) gives the same block.  With ``score`` (a :class:`Score`
    holding sinks), ``part`` is every partial of these rows merged: the sinks
    are added to it here, once.
    """
    out = out if out.flags.writeable else np.array(out, copy=True)
    if score is not None and score.sinks is not None:
        part = _add_sinks((np.array(part[0], copy=True), np.array(part[1], copy=True)), score)
    out[..., rows, :] = part[0]
    return out


def write_edge(out, e, edge):
    """The block ``out`` with its first ``e`` rows set from ``edge`` (as :func:`write_rows`)."""
    return write_rows(out, slice(0, e), (edge,))


def order_token(*_):
    """A token: a dependency that orders a task after another without moving the other's result."""
    return None


def long_partial(q_rows, k, v, mask, csr, scale, serial, after=None, rows_abs=None, k0=0):
    """Split rows against one key block: ``(out, lse)``; ``csr`` None means every key of the block.

    ``after`` is an ordering token (unused): the partial waits for the block
    task that reads this key block, so that the key block is released when
    both are done rather than held from an early partial to a late block task.
    ``rows_abs`` are the rows' positions and ``k0`` the key block's first
    position in the whole attention (ALiBi, ``score_mod``: one engine call
    per row).
    """
    if scale.positional:
        return _rowwise(q_rows, rows_abs, k, v, mask, csr, scale, serial, k0)
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

