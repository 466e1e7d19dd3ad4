"""``sparse_attention``: the one entry point. Validation and dispatch live here."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._validate import prepare
from .patterns.base import index_dtype_for

__all__ = ["sparse_attention", "AttentionWeights"]

_PATHS = ("auto", "fused", "staged", "blocked")


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
    from ._memory import check
    from ._validate import ADVICE

    nnz = np.array([p.nnz for p in prep.patterns], dtype=np.int64)
    total = int(nnz[slice_pattern].sum())
    S = len(slice_pattern)
    copies = sum(S * x[0].nbytes for x, mp in ((prep.qc, prep.qmap), (prep.kc, prep.kmap), (prep.vc, prep.vmap))
                 if len(x) and len(x) != len(mp))  # fmt: skip
    idx = 4 if int(nnz.sum()) < 2**31 - 1 else 8
    why = "return_weights=True" if return_weights else "path='staged' or non-finite inputs"
    check(
        {
            f"per-nonzero scores of the staged path ({why}): {total} values": total * prep.qc.dtype.itemsize,
            "the patterns' CSR": int(nnz.sum()) * idx * 2 + len(prep.patterns) * (prep.n_q + 1) * idx * 2,
            "broadcast inputs repeated per slice": copies,
        },
        "sparse_attention",
        ADVICE,
    )


def _staged(prep, return_weights, slices=None):
    """The staged kernels over all slices, or over ``slices`` (an int64 index array) only."""
    from .kernels.staged import csr_softmax, sddmm, spmm

    sl = np.arange(len(prep.slice_pattern)) if slices is None else slices
    slice_pattern, slice_batch = prep.slice_pattern[sl], prep.slice_batch
    slice_batch = slice_batch[sl] if slice_batch is not None else None
    _check_staged_memory(prep, slice_pattern, return_weights)
    # one row block per slice: the staged kernels index q[s]; a broadcast input is repeated here
    q, k, v = (x if x.shape[0] == len(sl) and np.array_equal(mp[sl], sl) else x[mp[sl]]
               for x, mp in ((prep.qc, prep.qmap), (prep.kc, prep.kmap), (prep.vc, prep.vmap)))  # fmt: skip
    ptr, ind, nnz = _concat_patterns(prep.patterns)
    S = q.shape[0]
    slice_nnz = nnz[slice_pattern]
    slice_off = np.concatenate(([0], np.cumsum(slice_nnz)))
    dt = q.dtype
    vals = np.empty(int(slice_off[-1]), dtype=dt)
    use_valid = prep.key_valid is not None
    key_valid = prep.key_valid if use_valid else np.ones((1, 1), dtype=bool)
    slice_batch = slice_batch if use_valid else np.zeros(S, dtype=np.int64)
    scale = dt.type(prep.scale)
    sddmm(q, k, ptr, ind, slice_pattern, slice_off, scale, key_valid, slice_batch, use_valid, vals)
    lse = np.empty((S, prep.n_q), dtype=dt)
    csr_softmax(vals, ptr, ind, slice_pattern, slice_off, key_valid, slice_batch, use_valid, prep.n_q, lse)
    out = np.zeros((S, prep.n_q, v.shape[-1]), dtype=dt)
    spmm(vals, ptr, ind, slice_pattern, slice_off, key_valid, slice_batch, use_valid, v, out)
    weights = None
    if return_weights:
        weights = AttentionWeights(
            vals, ptr, ind, prep.slice_pattern, slice_off, prep.lead, (prep.n_q, prep.n_k), prep.key_valid, prep.slice_batch
        )
    return out, lse, weights


def _fused(prep, parallel=None):
    """The fused kernels for the slices whose inputs are all finite, the staged ones for the rest.

    ``parallel`` is passed to :func:`~sparseattn.forward.fused_attention`
    (``False``: the calling thread only, as the Dask adapter's tasks want).

    The fused kernels run with fast-math and a finite sentinel for masked
    scores, so they assume finite inputs; a slice with a NaN or an infinity in
    ``q``, ``k`` or ``v`` goes through the staged kernels, which follow the
    non-finite policy exactly (IEEE arithmetic over each row's allowed keys).
    """
    from .forward import fused_attention

    bad = prep.nonfinite
    skip = bad if bad.any() else None
    out, lse = fused_attention(
        prep.qc, prep.kc, prep.vc, prep.patterns, prep.slice_pattern, prep.scale, prep.key_valid, prep.slice_batch,
        skip=skip, maps=(prep.qmap, prep.kmap, prep.vmap), parallel=parallel,
    )  # fmt: skip
    if skip is not None:
        slices = np.flatnonzero(bad)
        out[slices], lse[slices], _ = _staged(prep, False, slices)
    return out, lse


def _blocked(prep):
    """The blocked path (NumPy/BLAS) for the finite slices, the staged kernels for the rest."""
    from .blocked import blocked_attention

    bad = prep.nonfinite_slices(compiled=False)
    skip = bad if bad.any() else None
    out, lse = blocked_attention(
        prep.qc, prep.kc, prep.vc, (prep.qmap, prep.kmap, prep.vmap), prep.patterns, prep.slice_pattern, prep.scale,
        prep.key_valid, prep.slice_batch, skip=skip,
    )  # fmt: skip
    if skip is not None:
        slices = np.flatnonzero(bad)
        out[slices], lse[slices], _ = _staged(prep, False, slices)
    return out, lse


def _fused_available():
    try:
        from . import forward  # noqa: F401
    except ImportError:
        return False
    return True


def sparse_attention(
    q, k, v, pattern, *, scale=None, key_padding_mask=None, return_weights=False, return_lse=False, path="auto",
    check_finite=False,
):
    """Softmax attention evaluated only at a pattern's allowed (query, key) pairs.

    ``out[..., i, :] = sum_j softmax_j(scale * q_i . k_j) v_j`` where the softmax
    runs over the keys ``j`` that ``pattern`` allows for query ``i`` and that
    are not padded.  A query with no allowed key outputs zeros.

    Parameters
    ----------
    q : ndarray, shape (..., n_q, d)
    k : ndarray, shape (..., n_k, d)
    v : ndarray, shape (..., n_k, d_v)
        Floating-point arrays; leading dimensions broadcast as in NumPy, and
        the last leading axis (axis -3) is the heads axis.
    pattern : Pattern, scipy sparse matrix/array, 2-D bool ndarray, or a sequence of them
        The allowed pairs, shape ``(n_q, n_k)``; a sequence gives one pattern per head.
    scale : float, optional
        Multiplies the scores; defaults to ``1 / sqrt(d)``.
    key_padding_mask : bool ndarray, optional
        True marks a padded key, removed from every row of every head.  Shape
        ``(batch, n_k)`` for 4-D inputs; in general it broadcasts against the
        leading shape without the heads axis, followed by ``n_k``.
    return_weights : bool
        Also return an :class:`AttentionWeights` with the probabilities.
    return_lse : bool
        Also return the per-row log-sum-exp of the scaled scores over each
        row's allowed, non-padded keys (what the backward pass needs, see
        :func:`sparseattn.sparse_attention_backward`).
    path : {"auto", "fused", "staged", "blocked"}
        ``"fused"``: the tile-planned online-softmax kernel (O(n d) extra
        memory); ``"staged"``: SDDMM -> softmax -> SpMM (stores one score per
        nonzero and per head); ``"blocked"``: NumPy and BLAS over row blocks,
        no compiled kernels (slower than fused).  ``"auto"`` picks fused, or
        staged when weights are requested; in a fresh environment, while the
        fused kernels of the dtype compile in a background thread, it runs
        blocked (see :mod:`sparseattn._coldstart`; ``SPARSEATTN_COLD_START=wait``
        compiles in the calling thread instead).  Slices (one batch entry and
        head) whose ``q``, ``k`` or ``v`` hold a NaN or an infinity always run
        on the staged kernels (see *Non-finite inputs*).
    check_finite : bool
        Raise a ``ValueError`` naming the array and the index of its first
        NaN or infinity instead of computing (SciPy's name for this check).

    Returns
    -------
    out : ndarray, shape (..., n_q, d_v)
        In ``np.result_type(q, k, v)`` (float32 stays float32).  float32 and
        float64 are computed as such; float16 is computed in float32 and
        returned as float16; longdouble is computed in float64 (not in
        extended precision) and returned as longdouble.  Other dtypes raise
        a ``TypeError``.
    weights : AttentionWeights
        Only with ``return_weights=True``.
    lse : ndarray, shape (..., n_q)
        Only with ``return_lse=True``; the output's dtype, ``-inf`` for a row
        with no allowed key.  Returned last: ``out, weights, lse``.

    Notes
    -----
    *Non-finite inputs.*  The result is what IEEE arithmetic gives for
    softmax attention over each row's allowed, non-padded keys only: a NaN or
    an infinity in ``q[i]`` makes row ``i`` NaN (output and log-sum-exp) if
    the row has any allowed key; a NaN or an infinity in ``k[j]`` or ``v[j]``
    affects exactly the rows that attend key ``j``, never another row, and is
    never turned into zeros.  Scores are ``s_j = scale * q_i . k_j``, the row
    max propagates NaN, the weights are ``exp(s_j - max)``: a ``+inf`` score,
    or all scores ``-inf``, give a NaN row; a ``-inf`` score among finite
    ones gets weight 0, and ``0 * inf`` in ``v`` gives NaN in that column.
    Every path and :func:`sparseattn.reference.dense_attention` follow this.

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 8, 16), dtype=np.float32)  # 2 heads, 8 tokens, d=16
    >>> pattern = sa.longformer(8, attention_window=2, global_indices=[0])
    >>> out = sa.sparse_attention(q, k, v, pattern)
    >>> out.shape, out.dtype
    ((2, 8, 16), dtype('float32'))
    >>> from sparseattn.reference import dense_attention
    >>> bool(np.allclose(out, dense_attention(q, k, v, pattern), atol=1e-5))
    True
    """
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    if return_weights and path in ("fused", "blocked"):
        raise ValueError(f"return_weights=True needs the staged path: use path='staged' or 'auto', not {path!r}")
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, check_finite=check_finite)
    use_fused = path == "fused" or (path == "auto" and not return_weights and _fused_available())
    weights = None
    if path == "auto" and use_fused and prep.n_q and len(prep.qmap):
        from . import _coldstart

        path = _coldstart.choose(prep, "forward")
    if path == "blocked":
        out, lse = _blocked(prep)
    elif use_fused:
        out, lse = _fused(prep)
    else:
        out, lse, weights = _staged(prep, return_weights)
    out = out.reshape(prep.lead + out.shape[1:]).astype(prep.out_dtype, copy=False)
    result = (out,)
    if return_weights:
        result += (weights,)
    if return_lse:
        result += (lse.reshape(prep.lead + lse.shape[1:]).astype(prep.out_dtype, copy=False),)
    return result[0] if len(result) == 1 else result
