"""Dense float64 attention with the engine's exact semantics: the oracle for tests.

It builds the dense boolean mask, so it is meant for small ``n`` (or a row
slice of a large pattern, see ``rows=``).
"""

from __future__ import annotations

import numpy as np

from .engine.validate import prepare

__all__ = ["dense_attention", "dense_attention_backward"]


def _scores(q, k):
    """``q @ k.T`` with IEEE results for NaN and infinities.

    Finite rows go through BLAS; the rows of ``q`` and of ``k`` that hold a
    NaN or an infinity are recomputed element by element (IEEE products and
    sums, independent of how the BLAS treats them).  Entries outside
    ``mask`` are discarded by the caller.
    """
    fq, fk = np.isfinite(q).all(axis=1), np.isfinite(k).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.where(fq[:, None], q, 0.0) @ np.where(fk[:, None], k, 0.0).T
        for i in np.flatnonzero(~fq):
            out[i] = (q[i] * k).sum(axis=1)
        for j in np.flatnonzero(~fk):
            out[:, j] = (q * k[j]).sum(axis=1)
    return out


def _weighted_values(p, v, mask):
    """``p @ v`` summed over each row's allowed keys only (``mask``), IEEE for NaN and infinities.

    A key the row does not attend never enters its sum, so an infinity in
    ``v[j]`` cannot leak into other rows as ``0 * inf``; for an allowed key,
    a weight of 0 times an infinity is NaN, as IEEE arithmetic gives it.
    """
    fp, fv = np.isfinite(p).all(axis=1), np.isfinite(v).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.where(fp[:, None], p, 0.0) @ np.where(fv[:, None], v, 0.0)
        for j in np.flatnonzero(~fv):
            rows = np.flatnonzero(mask[:, j] & fp)
            out[rows] += p[rows, j][:, None] * v[j][None, :]
        for i in np.flatnonzero(~fp):
            cols = np.flatnonzero(mask[i])
            out[i] = (p[i, cols][:, None] * v[cols]).sum(axis=0)
    return out


def _repeat_kv(q, k, v):
    """Grouped-query heads made plain: ``k`` and ``v`` repeated ``g`` times along the heads axis, and ``g``.

    The oracle's own reading of grouped-query attention (``transformers``'
    ``repeat_kv`` order: query head ``h`` sees key/value head ``h // g``),
    independent of the engine's slice maps; it copies, as an oracle may.
    Anything but a clean ``h_q = g * h_kv`` is left to ``prepare``'s checks.
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    if min(q.ndim, k.ndim, v.ndim) < 3:
        return k, v, 1
    h_q, h_kv = q.shape[-3], k.shape[-3]
    if v.shape[-3] != h_kv or 0 in (h_q, h_kv) or h_kv in (1, h_q) or h_q % h_kv:
        return k, v, 1
    g = h_q // h_kv
    return np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3), g


def _sum_groups(grad, g):
    """The gradient of repeated heads summed back over each group of ``g`` (the adjoint of :func:`_repeat_kv`)."""
    if g == 1:
        return grad
    shape = grad.shape[:-3] + (grad.shape[-3] // g, g) + grad.shape[-2:]
    return grad.reshape(shape).sum(axis=-3)


def _per_slice(x, lead):
    """A per-head parameter (query heads last, broadcasting to ``lead``) as one float64 value per slice."""
    if x is None:
        return None
    return np.broadcast_to(np.asarray(x, dtype=np.float64), lead if lead else (1,)).reshape(-1).copy()


class _Mods:
    """The score modifiers as the oracle reads them, in float64, independent of the engine's kernels.

    ``prep.mods`` (validated by ``prepare``) is used only for what it checked
    (softcap's value, the ``ScoreMod``); slopes and sinks are re-read from the
    user's arrays in float64, and every formula is written here.
    """

    def __init__(self, prep, alibi_slopes, sinks):
        self.softcap = prep.mods.softcap
        self.score_mod = prep.mods.score_mod
        self.slopes = _per_slice(alibi_slopes, prep.lead)
        self.sinks = _per_slice(sinks, prep.lead)
        self.heads = prep.lead[-1] if prep.lead else 1
        self.offset = prep.n_k - prep.n_q  # ALiBi's diagonal: bottom right

    def scores(self, s0, s, i, j):
        """Slice ``s``'s modified scores from the raw scaled ones ``s0`` at rows ``i`` and keys ``j`` (broadcast), and ds/ds0."""
        fac = np.ones_like(s0)
        x = s0
        if self.softcap is not None:  # s <- c tanh(s / c); +-inf -> +-c, NaN stays NaN
            c = self.softcap
            t = np.tanh(x / c)
            x = c * t
            fac = fac * (1.0 - t * t)
        if self.slopes is not None:  # s <- s - slope |i + n_k - n_q - j|
            x = x - self.slopes[s] * np.abs(np.asarray(i, dtype=np.float64) + self.offset - np.asarray(j))
        if self.score_mod is not None:  # s <- f(s, b, h, i, j), ds <- df
            x, d = self.score_mod.grid(np.ascontiguousarray(x, dtype=np.float64), s // self.heads, s % self.heads,
                                       np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))  # fmt: skip
            fac = fac * d
        return x, fac

    def sink(self, s):
        return None if self.sinks is None else float(self.sinks[s])


def _row_max(m, sink):
    """The softmax's shift: the keys' max, raised to the sink when both are finite (NaN and infinities kept)."""
    if sink is None:
        return m
    return np.where(np.isfinite(m), np.maximum(m, sink), m)


def dense_attention(q, k, v, pattern, *, scale=None, softcap=None, alibi_slopes=None, sinks=None, score_mod=None,
                    key_padding_mask=None, rows=None, return_lse=False, return_weights=False):  # fmt: skip
    """Masked softmax attention computed densely in float64.

    Parameters
    ----------
    q, k, v, pattern, scale, key_padding_mask
        As for :func:`sparseattn.sparse_attention` (grouped-query ``k`` and
        ``v`` are repeated ``g`` times along the heads axis here: the oracle
        copies, the engine does not).
    softcap, alibi_slopes, sinks, score_mod
        The score modifiers of :func:`sparseattn.sparse_attention`, computed
        here on the whole dense score grid in float64, in the engine's order
        (:mod:`sparseattn.engine.modifiers`): ``s <- c tanh(s / c)``, then
        ``s <- s - slope |i + n_k - n_q - j|``, then ``s <- f(s, b, h, i, j)``
        (``score_mod.grid``), then the masks, then a softmax whose denominator
        also holds ``exp(sink)``.  With sinks a row with no allowed key
        outputs zeros with ``lse = sink``; a row whose keys' maximum is not
        finite stays as without sinks (NaN).
    rows : (start, stop), optional
        Compute only query rows ``[start, stop)`` (uses ``pattern.rows``, so a
        slice of a very long pattern is cheap).
    return_lse : bool
        Also return the per-row log-sum-exp of the modified allowed scores
        (and the sink): ``-inf`` for rows without an allowed key and no sink.
    return_weights : bool
        Also return the dense probabilities, zero outside each row's allowed
        keys (with sinks a row sums to less than 1).

    Returns
    -------
    out : ndarray, float64, shape ``(..., n_rows, d_v)``
    weights : ndarray, float64, shape ``(..., n_rows, n_k)`` (only with ``return_weights``)
    lse : ndarray, float64, shape ``(..., n_rows)`` (only with ``return_lse``; returned last)

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
    k, v, _ = _repeat_kv(q, k, v)
    mods = {"softcap": softcap, "alibi_slopes": alibi_slopes, "sinks": sinks, "score_mod": score_mod}
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, caller="dense_attention", modifiers=mods)
    md = _Mods(prep, alibi_slopes, sinks)
    n_q = prep.n_q
    start, stop = (0, n_q) if rows is None else rows
    if not 0 <= start <= stop <= n_q:
        raise ValueError(f"rows must satisfy 0 <= start <= stop <= n_q = {n_q}, got {rows}")
    S = len(prep.qmap)
    dv = prep.vc.shape[-1]
    from ._memory import check

    cells = (stop - start) * prep.n_k
    check(
        {"dense masks": len(prep.patterns) * cells, "dense float64 scores and weights of one slice": 6 * 8 * cells},
        "dense_attention",
        "It builds dense (rows, n_k) masks: pass rows=(start, stop) to compute a slice of the rows.",
    )
    out = np.zeros((S, stop - start, dv))
    lse = np.full((S, stop - start), -np.inf)
    weights = np.zeros((S, stop - start, prep.n_k)) if return_weights else None
    masks = [p.rows(start, stop).toarray() for p in prep.patterns]
    ii = np.arange(start, stop)[:, None]
    jj = np.arange(prep.n_k)[None, :]
    for s in range(S):
        mask = masks[prep.slice_pattern[s]].copy()
        if prep.key_valid is not None:
            mask &= prep.key_valid[prep.slice_batch[s]][None, :]
        qs = prep.qc[prep.qmap[s], start:stop].astype(np.float64)
        ks = prep.kc[prep.kmap[s]].astype(np.float64)
        vs = prep.vc[prep.vmap[s]].astype(np.float64)
        has = mask.any(axis=1)
        sink = md.sink(s)
        with np.errstate(invalid="ignore", over="ignore"):
            raw = _scores(qs, ks) * prep.scale  # inf * 0 is NaN, as IEEE says
            modified, _ = md.scores(raw, s, ii, jj)
            scores = np.where(mask, modified, -np.inf)
            m = np.where(has, scores.max(axis=1, initial=-np.inf), 0.0)  # max propagates NaN
            m = np.where(has, _row_max(m, sink), 0.0 if sink is None else sink)
            p = np.where(mask, np.exp(scores - m[:, None]), 0.0)  # IEEE: -inf - -inf and inf - inf are NaN
            den = p.sum(axis=1)
            if sink is None:
                safe = np.where(has, den, 1.0)
                lse[s] = np.where(has, m + np.log(safe), -np.inf)
            else:  # the sink joins every row's denominator; a row without keys: den 1, lse = sink
                safe = den + np.exp(sink - m)
                lse[s] = m + np.log(safe)
            out[s] = _weighted_values(p / safe[:, None], vs, mask)
            if return_weights:
                weights[s] = p / safe[:, None]
    shape = prep.lead + (stop - start,)
    result = (out.reshape(shape + (dv,)),)
    if return_weights:
        result += (weights.reshape(shape + (prep.n_k,)),)
    if return_lse:
        result += (lse.reshape(shape),)
    return result[0] if len(result) == 1 else result


def dense_attention_backward(grad_out, q, k, v, pattern, *, scale=None, softcap=None, alibi_slopes=None, sinks=None,
                             score_mod=None, key_padding_mask=None):  # fmt: skip
    """Gradients of :func:`dense_attention` in float64, from the masked softmax, row by row.

    The analytic gradient of ``out = softmax(s over allowed keys [, sink]) v`` with
    ``s = m(s0)``, ``s0 = scale * q k^T`` and ``m`` the score modifiers
    (softcap, ALiBi, ``score_mod``, see :func:`dense_attention`):
    for row ``i`` with allowed, non-padded keys ``J``, ``p = exp(s_J - lse_i)`` where
    ``lse_i = log(sum_J exp(s_J) [+ exp(sink)])``,
    ``dp = dO_i v_J^T``, ``ds0 = p * (dp - dO_i . O_i) * m'(s0)`` with ``O_i = p v_J`` and
    ``m'(s0) = (1 - tanh(s0 / c)^2) * df(s2)`` (each factor 1 where its modifier is absent),
    ``dq_i = scale * ds0 k_J``, ``dk_J += scale * ds0 q_i``, ``dv_J += p dO_i``, and
    ``dsink -= exp(sink - lse_i) (dO_i . O_i)``; gradients of broadcast inputs
    are summed over the broadcast axes, and those of grouped-query ``k`` and ``v``
    (``h_kv`` heads for ``h_q = g * h_kv`` query heads) over each group, those of
    ``sinks`` over the rows and every axis it was broadcast along.  Every product runs over the allowed
    pairs only (never ``0 * x`` for a masked pair), so a NaN or an infinity
    reaches exactly the gradients of the rows and keys that use it: the
    non-finite policy of :func:`sparseattn.sparse_attention`, carried through
    IEEE arithmetic.  Independent of the engine's kernels (no tiles, the
    probabilities recomputed from the scores): the oracle for the backward tests.  Meant for small ``n``.

    Returns
    -------
    dq, dk, dv : ndarray, float64, shapes of ``q``, ``k``, ``v``
    dsinks : ndarray, float64, the shape of ``sinks`` (only when ``sinks`` is given)
    """
    k_user, v_user = np.asarray(k), np.asarray(v)
    k, v, g = _repeat_kv(q, k, v)
    mods = {"softcap": softcap, "alibi_slopes": alibi_slopes, "sinks": sinks, "score_mod": score_mod}
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, caller="dense_attention_backward", modifiers=mods)
    md = _Mods(prep, alibi_slopes, sinks)
    S, n_q, _ = prep.q.shape
    dv_dim = prep.v.shape[-1]
    go = np.broadcast_to(np.asarray(grad_out, dtype=np.float64), prep.lead + (n_q, dv_dim)).reshape(S, n_q, dv_dim)
    csrs = [p.csr for p in prep.patterns]
    dq = np.zeros(prep.q.shape)
    dk = np.zeros(prep.k.shape)
    dvv = np.zeros(prep.v.shape)
    dsk = np.zeros(S)
    with np.errstate(invalid="ignore", over="ignore"):
        for s in range(S):
            csr = csrs[prep.slice_pattern[s]]
            valid = prep.key_valid[prep.slice_batch[s]] if prep.key_valid is not None else None
            qs, ks, vs = (x[s].astype(np.float64) for x in (prep.q, prep.k, prep.v))
            sink = md.sink(s)
            for i in range(n_q):
                cols = csr.indices[csr.indptr[i] : csr.indptr[i + 1]].astype(np.int64)
                if valid is not None:
                    cols = cols[valid[cols]]
                if cols.size == 0:
                    continue  # no key: out = 0, so D = 0 and the sink's gradient gets nothing either
                raw = (ks[cols] @ qs[i]) * prep.scale
                scores, fac = md.scores(raw, s, i, cols)
                m = _row_max(scores.max(), sink)
                e = np.exp(scores - m)
                den = e.sum() + (0.0 if sink is None else np.exp(sink - m))
                p = e / den
                dp = vs[cols] @ go[s, i]
                D = go[s, i] @ (p @ vs[cols])  # D = dO . O, as the policy states it
                ds = p * (dp - D) * fac
                dq[s, i] = prep.scale * (ds @ ks[cols])
                dk[s, cols] += prep.scale * ds[:, None] * qs[i][None, :]
                dvv[s, cols] += p[:, None] * go[s, i][None, :]
                if sink is not None:
                    dsk[s] -= np.exp(sink - m) / den * D

    def reduce(g, x):
        x = np.asarray(x)
        g = g.reshape(prep.lead + g.shape[1:])
        g = g.sum(axis=tuple(range(g.ndim - x.ndim))) if g.ndim > x.ndim else g
        axes = tuple(i for i, (a, b) in enumerate(zip(x.shape[:-2], g.shape[:-2])) if a == 1 and b != 1)
        return g.sum(axis=axes, keepdims=True).reshape(x.shape) if axes else g.reshape(x.shape)

    dk, dvv = reduce(dk, k), reduce(dvv, v)
    if g > 1:  # grouped-query heads: each key/value head's gradient is the sum over its query heads
        dk, dvv = _sum_groups(dk, g), _sum_groups(dvv, g)
        assert dk.shape == k_user.shape and dvv.shape == v_user.shape
    grads = (reduce(dq, q), dk, dvv)
    if sinks is None:
        return grads
    # the sinks' gradient per slice, summed over the leading axes sinks was broadcast along
    shape = np.shape(sinks)
    gs = dsk.reshape(prep.lead) if prep.lead else dsk.reshape(())
    gs = gs.sum(axis=tuple(range(gs.ndim - len(shape)))) if gs.ndim > len(shape) else gs
    axes = tuple(i for i, (a, b) in enumerate(zip(shape, gs.shape)) if a == 1 and b != 1)
    gs = gs.sum(axis=axes, keepdims=True) if axes else gs
    return grads + (gs.reshape(shape),)
