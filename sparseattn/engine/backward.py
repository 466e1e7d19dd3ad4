"""``sparse_attention_backward``: gradients of :func:`sparseattn.sparse_attention`.

Validation, broadcasting and the reduction of broadcast gradients live here;
the work is done by the fused backward (:mod:`sparseattn.engine.fused_backward`,
the default), the blocked one or the staged one (the cross-check), chosen
by :mod:`sparseattn.engine.paths`.  All three recompute the probabilities from the forward's
log-sum-exp, FlashAttention-2's recipe::

    P  = exp(scale * Q K^T - lse)      on the allowed, non-padded pairs only
    D  = rowsum(dO * O)
    dS = P * (dO V^T - D)
    dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO
"""

from __future__ import annotations

import numpy as np

from . import paths, regroup
from .paths import check_path
from .modifiers import sum_to_shape
from .scan import first_nonfinite
from .validate import prepare

__all__ = ["sparse_attention_backward"]


def _check_like(name, x, shape, what):
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype} with shape {arr.shape}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape} but must have shape {tuple(shape)} ({what})")
    return arr


def _flat(x, n_slices, n_rows, last, dtype):
    # the slice count is given, not inferred: with n_rows == 0 a -1 would be ambiguous
    return np.ascontiguousarray(np.reshape(x, (n_slices, n_rows) + ((last,) if last is not None else ())), dtype=dtype)


def _unbroadcast(g, lead, x):
    """Sum the gradient ``g`` (lead + (n, last)) over the axes that ``x`` was broadcast along; x's shape and dtype."""
    return sum_to_shape(g.reshape(tuple(lead) + g.shape[1:]), x.shape).astype(x.dtype, copy=False)


def _check_finite(prep, grad_out, go, out, o, lse, ls):
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


def sparse_attention_backward(grad_out, q, k, v, pattern, out, lse, *, scale=None, softcap=None, alibi_slopes=None,
                              sinks=None, score_mod=None, key_padding_mask=None, path="auto",
                              check_finite=False):  # fmt: skip
    """Gradients of :func:`sparseattn.sparse_attention` with respect to ``q``, ``k`` and ``v``.

    Parameters
    ----------
    grad_out : ndarray, shape (..., n_q, d_v)
        Gradient of the loss with respect to the attention output (the
        broadcast leading shape of the forward's output).
    q, k, v, pattern, scale, softcap, alibi_slopes, sinks, score_mod, key_padding_mask
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
        :mod:`sparseattn.engine.coldstart`).  Slices with a NaN or an infinity in
        any input run on the staged kernels.

    Returns
    -------
    dq, dk, dv : ndarray
        Each with the shape and dtype of its input; an input that was
        broadcast (e.g. ``k`` of shape ``(b, 1, n, d)`` shared by the heads)
        gets its gradient summed over the broadcast axes, and grouped-query
        ``k`` and ``v`` (``h_kv`` heads for ``h_q = g * h_kv`` query heads)
        get theirs summed over each group of ``g`` query heads, without a
        copy of ``k`` or ``v`` per query head.  Rows with no
        allowed key contribute nothing; keys no row sees get zero gradient.
    dsinks : ndarray
        Only when ``sinks`` is given (returned fourth), in its shape:
        ``-sum_i exp(sink - lse_i) (dO_i . O_i)`` over each head's rows.

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
    check_path(path)
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, score_mod=score_mod)
    args = (grad_out, q, k, v, pattern, out, lse, scale, key_padding_mask, mods, path)
    done = None if check_finite else regroup.backward(sparse_attention_backward, *args)
    if done is not None:
        return done  # a dilated window, class by class as plain bands
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, check_finite=check_finite,
                   caller="sparse_attention_backward", modifiers=mods)  # fmt: skip
    n_q = prep.n_q
    dv_dim = prep.vc.shape[-1]
    out_shape = prep.lead + (n_q, dv_dim)
    go = _check_like("grad_out", grad_out, out_shape, "the forward output's shape")
    o = _check_like("out", out, out_shape, "the forward output's shape")
    ls = _check_like("lse", lse, prep.lead + (n_q,), "the forward output's shape without its last axis")
    dt = prep.qc.dtype
    S = len(prep.qmap)
    go, o = _flat(go, S, n_q, dv_dim, dt), _flat(o, S, n_q, dv_dim, dt)
    ls = _flat(ls, S, n_q, None, dt)
    if check_finite:
        _check_finite(prep, grad_out, go, out, o, lse, ls)
    dq, dk, dvv = paths.backward(prep, go, o, ls, path)
    # dk and dv come one row block per stored slice of k and v (already summed over the heads and batch
    # rows that share one): k's and v's own shapes
    k, v = np.asarray(k), np.asarray(v)
    grads = (_unbroadcast(dq, prep.lead, np.asarray(q)), dk.reshape(k.shape).astype(k.dtype, copy=False),
             dvv.reshape(v.shape).astype(v.dtype, copy=False))  # fmt: skip
    if sinks is None:
        return grads
    return grads + (prep.mods.dsinks(go, o, ls).astype(np.result_type(np.asarray(sinks), np.float32), copy=False),)
