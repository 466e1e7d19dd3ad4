"""``sparse_attention``: the one forward entry point: validate once (:mod:`.validate`), dispatch (:mod:`.paths`)."""

from __future__ import annotations

from . import paths
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
    softcap : float, optional
        Caps the scaled scores smoothly: ``s <- softcap * tanh(s / softcap)``
        (Gemma 2; FlashAttention's ``softcap``).
    alibi_slopes : ndarray, optional
        ALiBi: ``s <- s - slope_h * |i + n_k - n_q - j|`` (FlashAttention's
        convention), shape ``(h_q,)`` or ``(batch, h_q)`` (broadcasting to
        the leading shape, query heads last).
    sinks : ndarray, optional
        Shape ``(h_q,)`` (or broadcasting like ``alibi_slopes``): a logit per
        query head that joins every row's softmax denominator and carries no
        value (GPT-OSS's ``s_aux``); the returned ``lse`` includes it.
    score_mod : ScoreMod, optional
        A user's modifier ``f(s, b, h, i, j)`` with its derivative, applied
        after softcap and ALiBi, fused into the kernels (see
        :class:`sparseattn.ScoreMod` and :mod:`sparseattn.engine.modifiers`).
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

    Grouped-query heads: 4 query heads share 2 key/value heads (heads 0, 1
    read kv head 0; heads 2, 3 read kv head 1):

    >>> q = rng.standard_normal((1, 4, 8, 16))
    >>> k, v = rng.standard_normal((2, 1, 2, 8, 16))
    >>> out, lse = sa.sparse_attention(q, k, v, pattern, return_lse=True)
    >>> out.shape
    (1, 4, 8, 16)
    >>> bool(np.allclose(out, sa.sparse_attention(q, k.repeat(2, axis=-3), v.repeat(2, axis=-3), pattern)))
    True
    >>> dq, dk, dv = sa.sparse_attention_backward(np.ones_like(out), q, k, v, pattern, out, lse)
    >>> dk.shape, dv.shape  # k's and v's own shapes, summed over each pair of query heads
    ((1, 2, 8, 16), (1, 2, 8, 16))
    """
    check_path(path, return_weights)
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, score_mod=score_mod)
    prep = prepare(q, k, v, pattern, scale, key_padding_mask, check_finite=check_finite, modifiers=mods)
    out, lse, weights = paths.forward(prep, path, return_weights)
    out = out.reshape(prep.lead + out.shape[1:]).astype(prep.out_dtype, copy=False)
    result = (out,)
    if return_weights:
        result += (weights,)
    if return_lse:
        result += (lse.reshape(prep.lead + lse.shape[1:]).astype(prep.out_dtype, copy=False),)
    return result[0] if len(result) == 1 else result
