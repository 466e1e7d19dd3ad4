"""The blocked path: sparse attention from NumPy and BLAS alone, no compiled kernels.

Rows are taken in blocks; a block's allowed keys are gathered once (the sorted
union of its rows' columns), its scores come from one batched BLAS product
over every slice that shares the pattern, and a boolean mask of the block's
CSR entries keeps each row to its own keys.  Rows far longer than the typical
row (global tokens) run apart, a batch of them at a time, over key chunks
merged with the log-sum-exp formula, so no block's union grows to the whole
sequence.

It is what ``path="auto"`` runs while the fused kernels of a dtype are being
compiled in a background thread (a fresh environment, see
:mod:`sparseattn.engine.coldstart`), and ``path="blocked"`` selects it outright.  It
computes the same quantities as the fused path (softmax over each row's
allowed, non-padded keys; zeros and ``-inf`` for a row without any); a dense
block costs more arithmetic than the fused kernels' tiles, so it is slower
once the kernels exist.  Like the fused kernels it assumes finite inputs: the
caller sends slices with a NaN or an infinity to the staged kernels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["blocked_attention", "blocked_backward", "masked_softmax"]

#: rows per block
_BLOCK = 128
#: a block whose dense (rows x union) grid exceeds this many times its nonzeros is split in two
_WASTE = 16
#: elements of a (slices, rows, keys) score grid computed at once
_GRID = 1 << 22
#: long rows walked together over the keys
_LONG_BATCH = 64


def _gather_rows(indptr, indices, rows):
    """The columns of ``rows`` concatenated, and each one's position in ``rows``."""
    counts = indptr[rows + 1] - indptr[rows]
    total = int(counts.sum())
    owner = np.repeat(np.arange(len(rows)), counts)
    starts = np.repeat(indptr[rows] - (np.cumsum(counts) - counts), counts)
    return indices[starts + np.arange(total)], owner


def _row_set(indptr, indices, rows):
    """The sorted union of ``rows``' columns, each entry's (row, position in the union), and the entry count."""
    cols, owner = _gather_rows(indptr, indices, rows)
    union, pos = np.unique(cols, return_inverse=True)
    return union, owner, pos.reshape(-1), len(cols)


def _entries(n_rows, union, owner, pos):
    """(rows, union) bool: True at each CSR entry."""
    mask = np.zeros((n_rows, len(union)), dtype=bool)
    mask[owner, pos] = True
    return mask


def _blocks(indptr, indices, rows):
    """Split ``rows`` into blocks whose dense (rows x union of columns) grid stays near their nonzeros.

    Yields ``(rows, union, mask)`` (see :func:`_entries`).
    """
    todo = [rows[i : i + _BLOCK] for i in range(0, len(rows), _BLOCK)]
    while todo:
        blk = todo.pop()
        union, owner, pos, nnz = _row_set(indptr, indices, blk)
        if len(blk) > 8 and len(blk) * len(union) > _WASTE * max(nnz, 1):
            half = len(blk) // 2
            todo += [blk[:half], blk[half:]]
            continue
        yield blk, union, _entries(len(blk), union, owner, pos)


def masked_softmax(scores, allowed, v):
    """Softmax of ``scores`` (..., R, U) over the ``allowed`` keys (broadcastable bool), times ``v`` (..., U, dv).

    Returns ``(out, lse)`` in ``scores``' dtype; a row with no allowed key
    gets zeros and ``-inf``.  For finite inputs (callers route the rest).
    """
    dt = scores.dtype
    has = np.broadcast_to(allowed, scores.shape).any(axis=-1)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        scores = np.where(allowed, scores, dt.type(-np.inf))
        m = np.where(has, scores.max(axis=-1), dt.type(0))
        w = np.exp(scores - m[..., None])  # masked entries: exp(-inf) = 0
        den = w.sum(axis=-1)
        safe = np.where(has, den, dt.type(1))
        out = np.matmul(w, v)
        out /= safe[..., None]
        lse = np.where(has, m + np.log(safe), dt.type(-np.inf))
    return out, lse


def _walk(patterns, slice_pattern, skip, key_valid, slice_batch):
    """The work of a call, in the order both directions take it.

    Yields ``("block", slices, rows, union, mask)`` for a block of ordinary
    rows (``mask``: (rows, union) bool, the allowed, non-padded pairs; a block
    of rows without any key has an empty union) and ``("long", slices, rows,
    union, mask)`` for up to ``_LONG_BATCH`` long rows, which the caller
    walks over key chunks of ``union`` (the keys are gathered once per chunk
    for all of them).  ``slices`` share the pattern and the ``key_valid`` row;
    for blocks they come in groups small enough that a (slices, rows, union)
    grid has at most ``_GRID`` elements.  A block's structure is built once
    for all rows of ``key_valid``.
    """
    for p_idx, pattern in enumerate(patterns):
        mine = slice_pattern == p_idx
        if skip is not None:
            mine &= ~skip
        slices = np.flatnonzero(mine)
        if len(slices) == 0:
            continue
        csr = pattern.csr
        indptr, indices = csr.indptr.astype(np.int64), csr.indices.astype(np.int64)
        counts = np.diff(indptr)
        mean = counts.mean() if len(counts) else 0.0
        long = counts > max(4 * _BLOCK, 8 * mean)
        # slices that share a row of key_valid share the masks
        if key_valid is None:
            groups = [(slices, None)]
        else:
            batches = (slices[slice_batch[slices] == b] for b in np.unique(slice_batch[slices]))
            groups = [(g, key_valid[slice_batch[g[0]]]) for g in batches]
        for blk, union, mask in _blocks(indptr, indices, np.flatnonzero(~long)):
            per = max(1, _GRID // max(1, len(blk) * len(union)))
            for group, valid in groups:
                m = mask if valid is None else mask & valid[union][None, :]
                for g0 in range(0, len(group), per):
                    yield "block", group[g0 : g0 + per], blk, union, m
        long_rows = np.flatnonzero(long)
        for r0 in range(0, len(long_rows), _LONG_BATCH):
            rows = long_rows[r0 : r0 + _LONG_BATCH]
            union, owner, pos, _ = _row_set(indptr, indices, rows)
            mask = _entries(len(rows), union, owner, pos)
            for group, valid in groups:
                yield "long", group, rows, union, (mask if valid is None else mask & valid[union][None, :])


def blocked_attention(qc, kc, vc, maps, patterns, slice_pattern, scale, key_valid, slice_batch, skip=None, mods=None):
    """Sparse attention over flattened slices on NumPy/BLAS; arguments as for ``forward.fused_attention``.

    ``qc``, ``kc``, ``vc`` hold the distinct slices and ``maps = (qmap, kmap,
    vmap)`` says which one slice ``s`` reads.  Returns ``out`` (S, n_q, dv)
    and ``lse`` (S, n_q) in ``qc``'s dtype; rows of skipped slices are left
    uninitialised.  ``mods``: the score modifiers
    (:meth:`~sparseattn.engine.modifiers.Modifiers.apply`, in NumPy).

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> from sparseattn.reference import dense_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 40, 8))
    >>> p = sa.longformer(40, attention_window=6, global_indices=[3])
    >>> out = sa.sparse_attention(q, k, v, p, path="blocked")
    >>> bool(np.allclose(out, dense_attention(q, k, v, p), rtol=1e-11, atol=1e-12))
    True
    """
    from .threads import numpy_blas_single_thread

    with numpy_blas_single_thread():
        return _blocked(qc, kc, vc, maps, patterns, slice_pattern, scale, key_valid, slice_batch, skip, _mods(mods))


def _mods(mods):
    """The modifiers of a call, or None when none changes a score."""
    return mods if mods is not None and mods.on_scores else None


def _grid(mods, s, sl, rows, cols, grad=False):
    """``s`` (slices, rows, cols) with the modifiers applied (and ds'/ds with ``grad``)."""
    if mods is None:
        return (s, None) if grad else s
    return mods.apply(s, sl[:, None, None], rows[None, :, None], cols[None, None, :], grad=grad)


def _blocked(qc, kc, vc, maps, patterns, slice_pattern, scale, key_valid, slice_batch, skip, mods):
    qmap, kmap, vmap = maps
    S = len(slice_pattern)
    n_q, dv = qc.shape[1], vc.shape[2]
    dt = qc.dtype
    out = np.empty((S, n_q, dv), dtype=dt)
    lse = np.empty((S, n_q), dtype=dt)
    sc = dt.type(scale)
    for kind, sl, *work in _walk(patterns, slice_pattern, skip, key_valid, slice_batch):
        if kind == "long":
            _long_rows(qc, kc, vc, qmap, kmap, vmap, sl, *work, sc, out, lse, mods)
            continue
        blk, union, mask = work
        rows = (sl[:, None], blk[None, :])
        if len(union) == 0:  # rows without an allowed key
            out[rows], lse[rows] = 0, -np.inf
            continue
        q = qc[qmap[sl][:, None], blk[None, :]]
        k = kc[kmap[sl][:, None], union[None, :]]
        v = vc[vmap[sl][:, None], union[None, :]]
        scores = np.matmul(q, k.transpose(0, 2, 1))
        scores *= sc
        out[rows], lse[rows] = masked_softmax(_grid(mods, scores, sl, blk, union), mask[None], v)
    return out, lse


def merge_partials(parts):
    """Log-sum-exp merge of softmax partials ``(out, lse)`` over disjoint key sets, in the partials' dtype.

    ``out`` is each partial's normalised output and ``lse`` its log-sum-exp
    (``-inf`` for a row without a key there); rows without a key in any part
    get zeros and ``-inf``.  The Dask tasks merge their blocks' partials with
    it, and the decode step its key ranges.

    The weights ``exp(lse_i - max)`` lie in [0, 1] and their sum in [1, parts]:
    float32 loses nothing that matters here (``lse_i - max`` of two float32
    values within a factor of two of each other is exact, and a far smaller
    one gets a negligible weight), and it avoids casting whole output blocks
    to float64 and back, which took a fifth of a block task's time.
    """
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


def _long_rows(qc, kc, vc, qmap, kmap, vmap, group, rows, union, mask, sc, out, lse, mods):
    """Long ``rows`` of every slice in ``group`` over key chunks of ``union``, merged by log-sum-exp."""
    dt = qc.dtype
    G, L, dv = len(group), len(rows), vc.shape[2]
    m = np.full((G, L), -np.inf, dtype=dt)
    den = np.zeros((G, L), dtype=dt)
    acc = np.zeros((G, L, dv), dtype=dt)
    q = qc[qmap[group][:, None], rows[None, :]]  # (G, L, d)
    step = max(1024, _GRID // (G * max(L, qc.shape[2], dv, 1)))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for c0 in range(0, len(union), step):
            cc, mk = union[c0 : c0 + step], mask[None, :, c0 : c0 + step]
            k = kc[kmap[group][:, None], cc[None, :]]
            v = vc[vmap[group][:, None], cc[None, :]]
            s = _grid(mods, np.matmul(q, k.transpose(0, 2, 1)) * sc, group, rows, cc)
            s = np.where(mk, s, dt.type(-np.inf))  # (G, L, C)
            m_new = np.maximum(m, s.max(axis=2))
            keep = np.where(m == m_new, dt.type(1), np.exp(m - m_new))  # 1 while both are -inf
            w = np.where(mk, np.exp(s - m_new[..., None]), dt.type(0))
            den = den * keep + w.sum(axis=2)
            acc = acc * keep[..., None] + np.matmul(w, v)
            m = m_new
        has = den > 0
        safe = np.where(has, den, dt.type(1))
        where = (group[:, None], rows[None, :])
        out[where] = np.where(has[..., None], acc / safe[..., None], dt.type(0))
        lse[where] = np.where(has, m + np.log(safe), dt.type(-np.inf))


def blocked_backward(q, k, v, go, o, ls, patterns, slice_pattern, scale, key_valid, slice_batch, skip=None,
                     maps=None, mods=None):  # fmt: skip
    """Gradients on NumPy/BLAS, from the forward's ``lse``: the fused backward's recipe over the same blocks.

    ``q``, ``k``, ``v`` hold the distinct slices and ``maps = (qmap, kmap,
    vmap)`` says which one slice ``s`` reads (identity when None); ``go``
    (grad of the output), ``o`` and ``ls`` hold one row block per slice:
    shapes (S, n_q, dv), (S, n_q, dv), (S, n_q).  Returns ``dq`` (S, n_q, d),
    one row block per slice, and ``dk``, ``dv`` of k's and v's shapes: the
    slices that share a stored slice (broadcast or grouped-query heads) add
    into it, summed over the block's slices before the scatter.  The rows of
    skipped slices are left zero for the caller to fill.  Per block, with
    ``P = exp(scale Q K^T - lse)`` on the allowed pairs: ``dV += P^T dO``,
    ``dS = P (dO V^T - D)`` with ``D = rowsum(dO o)``, ``dQ = scale dS K``,
    ``dK += scale dS^T Q``.
    """
    from .threads import numpy_blas_single_thread

    if maps is None:
        maps = (np.arange(len(slice_pattern)),) * 3
    with numpy_blas_single_thread():
        return _blocked_backward(q, k, v, go, o, ls, patterns, slice_pattern, scale, key_valid, slice_batch, skip, maps,
                                 _mods(mods))  # fmt: skip


def _add_into(dst, m, cols, c):
    """``dst[m[g], cols] += c[g]`` for every ``g``: slices that share a stored slice are summed first.

    (A fancy-indexed ``+=`` with a repeated ``m[g]`` would keep only one of them.)
    """
    u, inv = np.unique(m, return_inverse=True)
    if len(u) < len(m):
        order = np.argsort(inv, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0])
        c, m = np.add.reduceat(c[order], starts, axis=0), u
    dst[m[:, None], cols[None, :]] += c


def _blocked_backward(qc, kc, vc, go, o, ls, patterns, slice_pattern, scale, key_valid, slice_batch, skip, maps, mods):
    qmap, kmap, vmap = maps
    dt = qc.dtype
    sc = dt.type(scale)
    dq = np.zeros((len(slice_pattern),) + qc.shape[1:], dtype=dt)
    dk, dv = np.zeros_like(kc), np.zeros_like(vc)
    D = np.einsum("snd,snd->sn", go, o)
    for kind, sl, *work in _walk(patterns, slice_pattern, skip, key_valid, slice_batch):
        if kind == "long":
            _long_rows_backward(qc, kc, vc, maps, go, ls, D, sl, *work, sc, dq, dk, dv, mods)
            continue
        blk, union, mask = work
        if len(union) == 0:
            continue
        rows = (sl[:, None], blk[None, :])
        qb, gb = qc[qmap[sl][:, None], blk[None, :]], go[rows]
        kb, vb = kc[kmap[sl][:, None], union[None, :]], vc[vmap[sl][:, None], union[None, :]]
        with np.errstate(over="ignore", invalid="ignore"):
            s = np.matmul(qb, kb.transpose(0, 2, 1))
            s *= sc
            s, fac = _grid(mods, s, sl, blk, union, grad=True)
            p = np.where(mask[None], np.exp(s - ls[rows][..., None]), dt.type(0))
        ds = np.matmul(gb, vb.transpose(0, 2, 1))
        ds -= D[rows][..., None]
        ds *= p
        if fac is not None:
            ds *= fac
        dq[rows] = np.matmul(ds, kb) * sc
        _add_into(dk, kmap[sl], union, np.matmul(ds.transpose(0, 2, 1), qb) * sc)
        _add_into(dv, vmap[sl], union, np.matmul(p.transpose(0, 2, 1), gb))
    return dq, dk, dv


def _long_rows_backward(qc, kc, vc, maps, go, ls, D, group, rows, union, mask, sc, dq, dk, dv, mods):
    """The gradient contributions of long ``rows`` in every slice of ``group``, over key chunks of ``union``."""
    qmap, kmap, vmap = maps
    dt = qc.dtype
    G, L = len(group), len(rows)
    where = (group[:, None], rows[None, :])
    qi = qc[qmap[group][:, None], rows[None, :]]
    gi, li, di = go[where], ls[where][..., None], D[where][..., None]  # (G, L, dv), (G, L, 1), (G, L, 1)
    acc = np.zeros((G, L, qc.shape[2]), dtype=dt)
    step = max(1024, _GRID // (G * max(L, qc.shape[2], vc.shape[2], 1)))
    for c0 in range(0, len(union), step):
        cc, mk = union[c0 : c0 + step], mask[None, :, c0 : c0 + step]
        kb, vb = kc[kmap[group][:, None], cc[None, :]], vc[vmap[group][:, None], cc[None, :]]
        with np.errstate(over="ignore", invalid="ignore"):
            s, fac = _grid(mods, np.matmul(qi, kb.transpose(0, 2, 1)) * sc, group, rows, cc, grad=True)
            p = np.where(mk, np.exp(s - li), dt.type(0))  # (G, L, C)
        ds = p * (np.matmul(gi, vb.transpose(0, 2, 1)) - di)
        if fac is not None:
            ds *= fac
        acc += np.matmul(ds, kb)
        _add_into(dk, kmap[group], cc, np.matmul(ds.transpose(0, 2, 1), qi) * sc)
        _add_into(dv, vmap[group], cc, np.matmul(p.transpose(0, 2, 1), gi))
    dq[where] = acc * sc
