"""``sparse_attention_backward``: gradients of :func:`sparseattn.sparse_attention`.

Validation, broadcasting and the reduction of broadcast gradients live here;
the work is done by the fused backward (:mod:`sparseattn.backward_fused`,
the default) or the staged one (:mod:`sparseattn.kernels.staged_backward`,
the cross-check).  Both recompute the probabilities from the forward's
log-sum-exp, FlashAttention-2's recipe::

    P  = exp(scale * Q K^T - lse)      on the allowed, non-padded pairs only
    D  = rowsum(dO * O)
    dS = P * (dO V^T - D)
    dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO
"""

from __future__ import annotations

import numpy as np

from ._validate import first_nonfinite, prepare, scan_nonfinite

__all__ = ["sparse_attention_backward"]

_PATHS = ("auto", "fused", "staged", "blocked")


def _check_like(name, x, shape, what):
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype} with shape {arr.shape}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape} but must have shape {tuple(shape)} ({what})")
    return arr


def _flat(x, n_rows, last, dtype):
    return np.ascontiguousarray(np.reshape(x, (-1, n_rows) + ((last,) if last is not None else ())), dtype=dtype)


def _unbroadcast(g, lead, x):
    """Sum the gradient ``g`` (lead + (n, last)) over the axes that ``x`` was broadcast along; x's shape and dtype."""
    g = g.reshape(tuple(lead) + g.shape[1:])
    extra = g.ndim - x.ndim
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape[:-2], g.shape[:-2])) if a == 1 and b != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(x.shape).astype(x.dtype, copy=False)


def _transposed(csr):
    """Entries of each column of a canonical CSR: ``(tptr, trow, tpos)`` (rows ascending within a column)."""
    n_q, n_k = csr.shape
    indices = np.asarray(csr.indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    rows = np.repeat(np.arange(n_q, dtype=np.int64), np.diff(csr.indptr))
    tptr = np.zeros(n_k + 1, dtype=np.int64)
    np.cumsum(np.bincount(indices, minlength=n_k), out=tptr[1:])
    return tptr, rows[order], order


def _check_staged_memory(prep, slice_pattern):
    """The staged backward stores two values per nonzero and slice: refuse up front if that cannot fit."""
    from ._memory import check
    from ._validate import ADVICE

    nnz = np.array([p.nnz for p in prep.patterns], dtype=np.int64)
    total = int(nnz[slice_pattern].sum())
    check(
        {
            f"per-nonzero probabilities and score gradients of the staged backward: 2 x {total} values": (
                2 * total * prep.q.dtype.itemsize
            ),
            "the patterns' CSR and its transpose": int(nnz.sum()) * 8 * 4 + len(prep.patterns) * (prep.n_q + prep.n_k + 2) * 8,
        },
        "sparse_attention_backward",
        ADVICE,
    )


def _staged_backward(prep, go, o, ls, slices=None):
    """The staged backward over all slices, or over ``slices`` (an int64 index array) only."""
    from .attention import _concat_patterns
    from .kernels.staged_backward import cols_backward, rows_backward

    q, k, v, slice_pattern, slice_batch = prep.q, prep.k, prep.v, prep.slice_pattern, prep.slice_batch
    if slices is not None:
        q, k, v, go, o, ls = (x[slices] for x in (q, k, v, go, o, ls))
        slice_pattern = slice_pattern[slices]
        slice_batch = slice_batch[slices] if slice_batch is not None else None
    _check_staged_memory(prep, slice_pattern)
    ptr, ind, nnz = _concat_patterns(prep.patterns)
    S = q.shape[0]
    slice_off = np.concatenate(([0], np.cumsum(nnz[slice_pattern])))
    dt = q.dtype
    use_valid = prep.key_valid is not None
    key_valid = prep.key_valid if use_valid else np.ones((1, 1), dtype=bool)
    slice_batch = slice_batch if use_valid else np.zeros(S, dtype=np.int64)
    pvals = np.empty(int(slice_off[-1]), dtype=dt)
    dsvals = np.empty_like(pvals)
    dq = np.empty_like(q)
    sc = dt.type(prep.scale)
    rows_backward(q, k, v, go, o, ls, ptr, ind, slice_pattern, slice_off, sc,
                  key_valid, slice_batch, use_valid, pvals, dsvals, dq)  # fmt: skip
    trans = [_transposed(p.csr) for p in prep.patterns]
    tptr = np.stack([t[0] for t in trans])
    offs = np.concatenate(([0], np.cumsum(nnz)))
    trow = np.concatenate([t[1] for t in trans])
    tpos = np.concatenate([t[2] + offs[i] for i, t in enumerate(trans)])
    tptr = tptr + np.concatenate(([0], np.cumsum([len(t[1]) for t in trans])))[:-1, None]
    dk = np.empty_like(k)
    dvv = np.empty_like(v)
    cols_backward(q, go, tptr, trow, tpos, slice_pattern, slice_off, ptr.astype(np.int64), sc,
                  key_valid, slice_batch, use_valid, pvals, dsvals, dk, dvv)  # fmt: skip
    return dq, dk, dvv


def _bad_lse(ls):
    """(S,) bool: a slice's log-sum-exp holds a NaN or ``+inf`` (``-inf`` marks a row without keys: fine)."""
    with np.errstate(invalid="ignore"):
        return (np.isnan(ls) | (ls == np.inf)).any(axis=1)


def sparse_attention_backward(grad_out, q, k, v, pattern, out, lse, *, scale=None, key_padding_mask=None,
                              path="auto", check_finite=False):  # fmt: skip
    """Gradients of :func:`sparseattn.sparse_attention` with respect to ``q``, ``k`` and ``v``.

    Parameters
    ----------
    grad_out : ndarray, shape (..., n_q, d_v)
        Gradient of the loss with respect to the attention output (the
        broadcast leading shape of the forward's output).
    q, k, v, pattern, scale, key_padding_mask
        Exactly as given to the forward call.
    out, lse : ndarray
        The forward's output and log-sum-exp, from
        ``sparse_attention(..., return_lse=True)``.
    path : {"auto", "fused", "staged", "blocked"}
        ``"fused"`` (``"auto"``): tile by tile from ``lse`` with O(n d) extra
        memory; ``"staged"``: per-nonzero probabilities and score gradients
        (memory proportional to nnz x slices), the cross-check;
        ``"blocked"``: NumPy and BLAS over row blocks, no compiled kernels,
        what ``"auto"`` runs while the fused backward of the dtype compiles
        in a background thread in a fresh environment (see
        :mod:`sparseattn._coldstart`).  Slices with a NaN or an infinity in
        any input run on the staged kernels.

    Returns
    -------
    dq, dk, dv : ndarray
        Each with the shape and dtype of its input; an input that was
        broadcast (e.g. ``k`` of shape ``(b, 1, n, d)`` shared by the heads)
        gets its gradient summed over the broadcast axes.  Rows with no
        allowed key contribute nothing; keys no row sees get zero gradient.

    Notes
    -----
    *Non-finite inputs.*  The gradients are the IEEE evaluation of the
    formulas in this module's docstring summed over each row's allowed,
    non-padded pairs only, as the forward's policy (see
    :func:`sparseattn.sparse_attention`): a NaN or an infinity reaches the
    gradients of exactly the rows and keys that use it, never another row's
    or key's (no ``0 * inf`` from a pair outside the pattern), and is never
    turned into zeros.  :func:`sparseattn.reference.dense_attention_backward`
    follows the same rule.

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 16, 8))
    >>> p = sa.longformer(16, attention_window=4, global_indices=[0])
    >>> out, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
    >>> dq, dk, dv = sa.sparse_attention_backward(np.ones_like(out), q, k, v, p, out, lse)
    >>> dq.shape, dk.shape, dv.shape
    ((2, 16, 8), (2, 16, 8), (2, 16, 8))
    >>> bool(np.allclose(dv.sum(axis=1), 16))  # each row's probabilities sum to 1
    True
    """
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, check_finite=check_finite,
                   caller="sparse_attention_backward")  # fmt: skip
    S, n_q, _ = prep.q.shape
    dv_dim = prep.v.shape[-1]
    out_shape = prep.lead + (n_q, dv_dim)
    go = _check_like("grad_out", grad_out, out_shape, "the forward output's shape")
    o = _check_like("out", out, out_shape, "the forward output's shape")
    ls = _check_like("lse", lse, prep.lead + (n_q,), "the forward output's shape without its last axis")
    dt = prep.q.dtype
    go, o = _flat(go, n_q, dv_dim, dt), _flat(o, n_q, dv_dim, dt)
    ls = _flat(ls, n_q, None, dt)
    if check_finite:
        for name, user, x in (("grad_out", grad_out, go), ("out", out, o)):
            err = first_nonfinite(name, user, x, prep.lead)
            if err is not None:
                raise err
        bad = np.argwhere(np.isnan(ls) | (ls == np.inf))
        if len(bad):
            s, i = (int(a) for a in bad[0])
            idx = (np.unravel_index(s, prep.lead) if prep.lead else ()) + (i,)
            raise ValueError(
                f"lse holds {ls[s, i]} at index {tuple(int(a) for a in idx)} (shape {np.shape(lse)}); "
                f"check_finite=True refuses NaN and +inf in lse (-inf marks a row without keys)"
            )
    if path == "auto" and S and n_q:
        from . import _coldstart

        path = _coldstart.choose(prep, "backward")
    if path == "staged":
        dq, dk, dvv = _staged_backward(prep, go, o, ls)
    else:
        # the fused kernels (fast-math, finite sentinels) and the blocked path assume finite inputs:
        # non-finite slices go staged (the blocked path scans in NumPy: it compiles nothing)
        if path == "blocked":
            from .blocked import blocked_backward as run
        else:
            from .backward_fused import fused_backward as run
        compiled = path != "blocked"
        bad = prep.nonfinite_slices(compiled)
        scan_nonfinite(go, bad, compiled)
        scan_nonfinite(o, bad, compiled)
        bad |= _bad_lse(ls)
        skip = bad if bad.any() else None
        dq, dk, dvv = run(
            prep.q, prep.k, prep.v, go, o, ls, prep.patterns, prep.slice_pattern, prep.scale,
            prep.key_valid, prep.slice_batch, skip=skip,
        )  # fmt: skip
        if skip is not None:
            slices = np.flatnonzero(bad)
            dq[slices], dk[slices], dvv[slices] = _staged_backward(prep, go, o, ls, slices)
    arrays = [np.asarray(x) for x in (q, k, v)]
    return tuple(_unbroadcast(g, prep.lead, x) for g, x in zip((dq, dk, dvv), arrays))
