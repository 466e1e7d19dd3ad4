"""The staged path: SDDMM -> row softmax -> SpMM, and its backward; one value per nonzero and slice.

Exact IEEE arithmetic over each row's allowed keys: it backs
``return_weights=True``, runs the slices whose inputs hold a NaN or an
infinity for every other path, and cross-checks the fused path.  Memory is
O(nnz x slices), asked of the memory guard before anything is allocated.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._memory import check
from ..patterns.base import index_dtype_for
from .validate import ADVICE

__all__ = ["AttentionWeights", "staged_forward", "staged_backward"]


def _concat_patterns(patterns):
    """Concatenate P patterns' CSR into ``ptr`` (P, n_q + 1) absolute offsets and ``ind``."""
    csrs = [p.csr for p in patterns]
    nnz = np.array([c.nnz for c in csrs], dtype=np.int64)
    offs = np.concatenate(([0], np.cumsum(nnz)))
    total = int(offs[-1])
    idx_dtype = np.int32 if total < 2**31 - 1 else np.int64
    ptr = np.stack([c.indptr.astype(np.int64) + offs[i] for i, c in enumerate(csrs)]).astype(idx_dtype)
    ind = np.concatenate([c.indices for c in csrs]).astype(idx_dtype, copy=False) if csrs else np.zeros(0, idx_dtype)
    return ptr, ind, nnz


class AttentionWeights:
    """Attention probabilities of one call, one CSR matrix per (batch, head) slice.

    ``weights.to_scipy(b, h)`` (as many indices as the inputs had leading
    dimensions) returns a ``scipy.sparse.csr_array`` of shape ``(n_q, n_k)``;
    its stored entries are the pattern's allowed, non-padded keys and each
    non-empty row sums to 1.
    """

    def __init__(self, vals, ptr, ind, slice_pattern, slice_off, lead, shape, key_valid, slice_batch):
        self._vals, self._ptr, self._ind = vals, ptr, ind
        self._slice_pattern, self._slice_off = slice_pattern, slice_off
        self._key_valid, self._slice_batch = key_valid, slice_batch
        self.lead = lead
        self.shape = shape

    def __len__(self):
        return int(np.prod(self.lead, dtype=np.int64)) if self.lead else 1

    def scale_rows(self, f):
        """Multiply each slice's row ``i`` by ``f[s, i]`` (sinks: the share of the softmax the keys keep)."""
        for s in range(len(self._slice_pattern)):
            row_ptr = self._ptr[self._slice_pattern[s]].astype(np.int64)
            a = self._slice_off[s]
            self._vals[a : a + int(row_ptr[-1] - row_ptr[0])] *= np.repeat(f[s], np.diff(row_ptr)).astype(self._vals.dtype)

    def to_scipy(self, *index):
        """The ``(n_q, n_k)`` weights of one slice, e.g. ``to_scipy(b, h)`` for 4-D inputs."""
        if len(index) != len(self.lead):
            raise ValueError(
                f"to_scipy takes {len(self.lead)} indices for leading shape {self.lead}, got {len(index)}: {index}"
            )
        for ax, (i, n) in enumerate(zip(index, self.lead)):
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for axis {ax} of size {n}")
        s = int(np.ravel_multi_index(tuple(int(i) % n for i, n in zip(index, self.lead)), self.lead)) if self.lead else 0
        p = self._slice_pattern[s]
        row_ptr = self._ptr[p].astype(np.int64)
        a, b = int(row_ptr[0]), int(row_ptr[-1])
        cols = self._ind[a:b]
        data = self._vals[self._slice_off[s] : self._slice_off[s] + (b - a)]
        indptr = row_ptr - a
        if self._key_valid is not None:
            keep = self._key_valid[self._slice_batch[s]][cols]
            kept_before = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
            indptr = kept_before[indptr]
            cols, data = cols[keep], data[keep]
        idx = index_dtype_for(len(cols), self.shape[1])
        return sp.csr_array((data.copy(), cols.astype(idx), indptr.astype(idx)), shape=self.shape)


def _check_staged_memory(prep, slice_pattern, return_weights):
    """The staged path stores one score per nonzero and slice: refuse up front if that cannot fit."""
    nnz = np.array([p.nnz for p in prep.patterns], dtype=np.int64)
    total = int(nnz[slice_pattern].sum())
    idx = 4 if int(nnz.sum()) < 2**31 - 1 else 8
    why = "return_weights=True" if return_weights else "path='staged' or non-finite inputs"
    check(
        {
            f"per-nonzero scores of the staged path ({why}): {total} values": total * prep.qc.dtype.itemsize,
            "the patterns' CSR": int(nnz.sum()) * idx * 2 + len(prep.patterns) * (prep.n_q + 1) * idx * 2,
        },
        "sparse_attention",
        ADVICE,
    )


def staged_forward(prep, return_weights, slices=None):
    """The staged kernels over all slices, or over ``slices`` (an int64 index array) only."""
    from ..kernels.staged import csr_softmax, modify_values, sddmm, spmm

    sl = np.arange(len(prep.slice_pattern)) if slices is None else slices
    slice_pattern, slice_batch = prep.slice_pattern[sl], prep.slice_batch
    slice_batch = slice_batch[sl] if slice_batch is not None else None
    _check_staged_memory(prep, slice_pattern, return_weights)
    # the kernels read the stored slices through the maps: a broadcast or grouped-query input is not repeated
    q, k, v = prep.qc, prep.kc, prep.vc
    qmap, kmap, vmap = (np.ascontiguousarray(mp[sl]) for mp in (prep.qmap, prep.kmap, prep.vmap))
    ptr, ind, nnz = _concat_patterns(prep.patterns)
    S = len(sl)
    slice_nnz = nnz[slice_pattern]
    slice_off = np.concatenate(([0], np.cumsum(slice_nnz)))
    dt = q.dtype
    vals = np.empty(int(slice_off[-1]), dtype=dt)
    use_valid = prep.key_valid is not None
    key_valid = prep.key_valid if use_valid else np.ones((1, 1), dtype=bool)
    slice_batch = slice_batch if use_valid else np.zeros(S, dtype=np.int64)
    scale = dt.type(prep.scale)
    sddmm(q, k, qmap, kmap, ptr, ind, slice_pattern, slice_off, scale, key_valid, slice_batch, use_valid, vals)
    mods = prep.mods
    if mods.on_scores:
        if mods.score_mod is not None:
            modify_values = mods.score_mod.kernels("staged")["modify_values"]
        mod, slopes = mods.kernel_args(dt)
        modify_values(vals, ptr, ind, slice_pattern, slice_off, key_valid, slice_batch, use_valid, prep.n_q, mod,
                      slopes, np.ascontiguousarray(sl, dtype=np.int64))  # fmt: skip
    lse = np.empty((S, prep.n_q), dtype=dt)
    csr_softmax(vals, ptr, ind, slice_pattern, slice_off, key_valid, slice_batch, use_valid, prep.n_q, lse)
    out = np.zeros((S, prep.n_q, v.shape[-1]), dtype=dt)
    spmm(vals, ptr, ind, slice_pattern, slice_off, key_valid, slice_batch, use_valid, v, vmap, out)
    weights = None
    if return_weights:
        weights = AttentionWeights(
            vals, ptr, ind, prep.slice_pattern, slice_off, prep.lead, (prep.n_q, prep.n_k), prep.key_valid, prep.slice_batch
        )
    return out, lse, weights


def _transposed(csr):
    """Entries of each column of a canonical CSR: ``(tptr, trow, tpos)`` (rows ascending within a column)."""
    n_q, n_k = csr.shape
    indices = np.asarray(csr.indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    rows = np.repeat(np.arange(n_q, dtype=np.int64), np.diff(csr.indptr))
    tptr = np.zeros(n_k + 1, dtype=np.int64)
    np.cumsum(np.bincount(indices, minlength=n_k), out=tptr[1:])
    return tptr, rows[order], order


def _check_backward_memory(prep, slice_pattern):
    """The staged backward stores two values per nonzero and slice: refuse up front if that cannot fit."""
    nnz = np.array([p.nnz for p in prep.patterns], dtype=np.int64)
    total = int(nnz[slice_pattern].sum())
    check(
        {
            f"per-nonzero probabilities and score gradients of the staged backward: 2 x {total} values": (
                2 * total * prep.qc.dtype.itemsize
            ),
            "the patterns' CSR and its transpose": int(nnz.sum()) * 8 * 4 + len(prep.patterns) * (prep.n_q + prep.n_k + 2) * 8,
        },
        "sparse_attention_backward",
        ADVICE,
    )


def _readers(mp, n):
    """The slices reading each of ``n`` stored slices: ``(ptr, slices)``, ``slices[ptr[t]:ptr[t + 1]]`` read ``t``."""
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(mp, minlength=n), out=ptr[1:])
    return ptr, np.argsort(mp, kind="stable").astype(np.int64)


def staged_backward(prep, go, o, ls, slices=None):
    """The staged backward over all slices, or over ``slices`` (an int64 index array) only.

    Returns ``dq`` (one row block per slice computed) and ``dk``, ``dv`` of
    ``prep.kc``'s and ``prep.vc``'s shapes: the computed slices' share of
    each stored slice's gradient (grouped-query and broadcast heads summed).
    """
    from ..kernels.staged_backward import cols_backward, rows_backward

    sl = np.arange(len(prep.slice_pattern)) if slices is None else slices
    slice_pattern, slice_batch = prep.slice_pattern[sl], prep.slice_batch
    slice_batch = slice_batch[sl] if slice_batch is not None else None
    if slices is not None:
        go, o, ls = (x[slices] for x in (go, o, ls))
    qmap, kmap, vmap = (np.ascontiguousarray(mp[sl]) for mp in (prep.qmap, prep.kmap, prep.vmap))
    _check_backward_memory(prep, slice_pattern)
    ptr, ind, nnz = _concat_patterns(prep.patterns)
    S = len(sl)
    slice_off = np.concatenate(([0], np.cumsum(nnz[slice_pattern])))
    dt = prep.qc.dtype
    use_valid = prep.key_valid is not None
    key_valid = prep.key_valid if use_valid else np.ones((1, 1), dtype=bool)
    slice_batch = slice_batch if use_valid else np.zeros(S, dtype=np.int64)
    pvals = np.empty(int(slice_off[-1]), dtype=dt)
    dsvals = np.empty_like(pvals)
    dq = np.empty((S,) + prep.qc.shape[1:], dtype=dt)
    sc = dt.type(prep.scale)
    if prep.mods.score_mod is not None:
        rows_backward = prep.mods.score_mod.kernels("staged")["rows_backward"]
    mod, slopes = prep.mods.kernel_args(dt)
    rows_backward(prep.qc, prep.kc, prep.vc, qmap, kmap, vmap, go, o, ls, ptr, ind, slice_pattern, slice_off, sc,
                  key_valid, slice_batch, use_valid, mod, slopes, np.ascontiguousarray(sl, dtype=np.int64),
                  pvals, dsvals, dq)  # fmt: skip
    trans = [_transposed(p.csr) for p in prep.patterns]
    tptr = np.stack([t[0] for t in trans])
    offs = np.concatenate(([0], np.cumsum(nnz)))
    trow = np.concatenate([t[1] for t in trans])
    tpos = np.concatenate([t[2] + offs[i] for i, t in enumerate(trans)])
    tptr = tptr + np.concatenate(([0], np.cumsum([len(t[1]) for t in trans])))[:-1, None]
    common = (tptr, trow, tpos, slice_pattern, slice_off, ptr.astype(np.int64))
    dk = np.empty_like(prep.kc)
    dvv = np.empty_like(prep.vc)
    cols_backward(prep.qc, qmap, dsvals, *_readers(kmap, len(dk)), *common, sc, key_valid, slice_batch, use_valid, dk)
    cols_backward(go, np.arange(S, dtype=np.int64), pvals, *_readers(vmap, len(dvv)), *common, dt.type(1),
                  key_valid, slice_batch, use_valid, dvv)  # fmt: skip
    return dq, dk, dvv
