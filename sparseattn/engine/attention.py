"""``sparse_attention``: the one forward entry point: validate once (:mod:`.validate`), dispatch (:mod:`.paths`)."""

from __future__ import annotations

from . import decode, paths, regroup
from .paths import check_path
from .staged import AttentionWeights
from .validate import prepare

__all__ = ["sparse_attention", "AttentionWeights"]


def sparse_attention(
    q, k, v, pattern, *, scale=None, softcap=None, alibi_slopes=None, sinks=None, score_mod=None,
    key_padding_mask=None, return_weights=False, return_lse=False, path="auto", check_finite=False,
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
        the last leading axis (axis -3) is the heads axis.  Grouped-query
        attention (GQA): ``k`` and ``v`` may have ``h_kv`` heads where ``q``
        has ``h_q = g * h_kv``; query head ``h`` then uses key/value head
        ``h // g`` (the order of transformers' ``repeat_kv`` and
        FlashAttention), ``h_kv = 1`` being multi-query attention.  ``k`` and
        ``v`` are read in place, never copied per query head, and
        :func:`sparseattn.sparse_attention_backward` returns their gradients
        in their own shapes, summed over each group.  ``k`` and ``v`` then
        have the same heads, ``h_kv`` dividing ``h_q`` (else a ``ValueError``
        names the shapes); per-head patterns are one per query head.
    pattern : Pattern, scipy sparse matrix/array, 2-D bool ndarray, or a sequence of them
        The allowed pairs, shape ``(n_q, n_k)``; a sequence gives one pattern per head.
    scale : float, optional
        Multiplies the scores; defaults to ``1 / sqrt(d)``.
    softcap, alibi_slopes, sinks, score_mod : optional
        Score modifiers and sinks (Gemma 2, ALiBi models, GPT-OSS), defined in
        :mod:`sparseattn.engine.modifiers`: ``s <- softcap tanh(s / softcap)``,
        then ``s <- s - slope_h |i + n_k - n_q - j|`` (``alibi_slopes`` of
        shape ``(h_q,)`` or ``(batch, h_q)``), then a user's
        :class:`sparseattn.ScoreMod`; ``sinks`` ``(h_q,)``: a logit per query
        head in every row's softmax denominator, with no value.
    key_padding_mask : bool ndarray, optional
        True marks a padded key, removed from every row of every head.  Shape
        ``(batch, n_k)`` for 4-D inputs; in general it broadcasts against the
        leading shape without the heads axis, followed by ``n_k``.
    return_weights : bool
        Also return an :class:`AttentionWeights` with the probabilities (of
        the modified scores; with sinks a row sums to less than 1).
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
        blocked (see :mod:`sparseattn.engine.coldstart`; ``SPARSEATTN_COLD_START=wait``
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
    infinity in ``q[i]`` reaches row ``i`` only, one in ``k[j]`` or ``v[j]``
    exactly the rows that attend key ``j``; never turned into zeros (the
    full rules, softcap and sinks included: ``docs/architecture.md``, "Non-finite inputs").
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

    Grouped-query heads and every modifier: ``tests/test_gqa.py`` and
    ``tests/test_modifiers.py``; ``docs/models.md`` spells today's models.
    """
    check_path(path, return_weights)
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, score_mod=score_mod)
    if not (return_weights or check_finite or path == "staged"):
        done = decode.forward(q, k, v, pattern, scale, key_padding_mask, mods, path, return_lse)
        if done is not None:
            return done
        done = regroup.forward(sparse_attention, q, k, v, pattern, scale, key_padding_mask, mods, path, return_lse)
        if done is not None:
            return done
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, check_finite=check_finite, modifiers=mods)
    out, lse, weights = paths.forward(prep, path, return_weights)
    out = out.reshape(prep.lead + out.shape[1:]).astype(prep.out_dtype, copy=False)
    result = (out,)
    if return_weights:
        result += (weights,)
    if return_lse:
        result += (lse.reshape(prep.lead + lse.shape[1:]).astype(prep.out_dtype, copy=False),)
    return result[0] if len(result) == 1 else result
