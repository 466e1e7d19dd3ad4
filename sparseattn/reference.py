"""Dense float64 attention with the engine's exact semantics: the oracle for tests.

It builds the dense boolean mask, so it is meant for small ``n`` (or a row
slice of a large pattern, see ``rows=``).
"""

from __future__ import annotations

import numpy as np

from ._validate import prepare

__all__ = ["dense_attention"]


def dense_attention(q, k, v, pattern, *, scale=None, key_padding_mask=None, rows=None, return_lse=False):
    """Masked softmax attention computed densely in float64.

    Parameters
    ----------
    q, k, v, pattern, scale, key_padding_mask
        As for :func:`sparseattn.sparse_attention`.
    rows : (start, stop), optional
        Compute only query rows ``[start, stop)`` (uses ``pattern.rows``, so a
        slice of a very long pattern is cheap).
    return_lse : bool
        Also return the per-row log-sum-exp of the scaled allowed scores
        (``-inf`` for rows without an allowed key).

    Returns
    -------
    out : ndarray, float64, shape ``(..., n_rows, d_v)``
    lse : ndarray, float64, shape ``(..., n_rows)`` (only with ``return_lse``)

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> from sparseattn.reference import dense_attention
    >>> rng = np.random.default_rng(0)
    >>> q = k = v = rng.standard_normal((4, 8))
    >>> out = dense_attention(q, k, v, sa.sliding_window(4, 0))
    >>> bool(np.allclose(out, v))   # each token sees only itself
    True
    """
    prep = prepare(q, k, v, pattern, scale, key_padding_mask)
    n_q = prep.n_q
    start, stop = (0, n_q) if rows is None else rows
    if not 0 <= start <= stop <= n_q:
        raise ValueError(f"rows must satisfy 0 <= start <= stop <= n_q = {n_q}, got {rows}")
    S = prep.q.shape[0]
    dv = prep.v.shape[-1]
    out = np.zeros((S, stop - start, dv))
    lse = np.full((S, stop - start), -np.inf)
    masks = [p.rows(start, stop).toarray() for p in prep.patterns]
    for s in range(S):
        mask = masks[prep.slice_pattern[s]].copy()
        if prep.key_valid is not None:
            mask &= prep.key_valid[prep.slice_batch[s]][None, :]
        qs = prep.q[s, start:stop].astype(np.float64)
        scores = (qs @ prep.k[s].astype(np.float64).T) * prep.scale
        scores = np.where(mask, scores, -np.inf)
        has = mask.any(axis=1)
        m = np.where(has, scores.max(axis=1, initial=-np.inf), 0.0)
        p = np.exp(scores - m[:, None])  # exp(-inf) = 0 for masked keys
        den = p.sum(axis=1)
        safe = np.where(has, den, 1.0)
        out[s] = (p / safe[:, None]) @ prep.v[s].astype(np.float64)
        lse[s] = np.where(has, m + np.log(safe), -np.inf)
    shape = prep.lead + (stop - start,)
    out = out.reshape(shape + (dv,))
    return (out, lse.reshape(shape)) if return_lse else out
