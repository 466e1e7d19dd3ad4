"""Sliding windows: :class:`SlidingWindow`, :func:`sliding_window` and :func:`causal`.

A window places query ``i`` at key position ``i + offset`` and lets it see the
keys ``left`` before and ``right`` after that position (every ``dilation``-th
one), truncated at the edges.  ``offset`` aligns queries with a longer (or
shorter) key sequence: one-token decode over a cache of ``T`` keys is
``causal(1, W - 1, n_k=T, offset=T - 1)``.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import runsets
from .base import INDEX_MAX, Pattern, counts_to_indptr, ranges_to_indices
from .registry import register_pattern

__all__ = ["SlidingWindow", "sliding_window", "causal"]


def _check_int(name, value, minimum=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if abs(value) > INDEX_MAX:
        raise ValueError(f"{name} must be at most 2**62 in size (what int64 index arithmetic can hold), got {value}")
    return value


def _check_offset(offset, n_q, n_k):
    """``offset`` as an int in ``(-n_q, n_k)``: the diagonal ``j = i + offset`` meets the ``n_q x n_k`` matrix.

    On an empty shape (``n_q == 0`` or ``n_k == 0``) every offset gives the empty pattern and any integer
    is accepted.
    """
    offset = _check_int("offset", offset)
    if n_q and n_k and not -n_q < offset < n_k:
        raise ValueError(
            f"offset must satisfy -n_q < offset < n_k, i.e. lie in [{1 - n_q}, {n_k - 1}] for n_q={n_q}, "
            f"n_k={n_k} (some query must sit on a key position), got {offset}"
        )
    return offset


class SlidingWindow(Pattern):
    """Query ``i`` sees key ``j`` iff ``-left <= j - (i + offset) <= right`` and ``(j - (i + offset)) % dilation == 0``."""

    name = "sliding_window"

    def __init__(self, n_q, n_k, left, right, dilation, offset=0):
        super().__init__((n_q, n_k))
        self.left, self.right, self.dilation, self.offset = left, right, dilation, offset

    @property
    def identity(self):
        return ("sliding_window", self.shape, self.left, self.right, self.dilation, self.offset)

    def _bounds(self, start, stop):
        """First key and key count of rows ``[start, stop)`` (the first key is meaningless where the count is 0)."""
        c = np.arange(start, stop, dtype=np.int64) + self.offset  # each query's key position
        d = self.dilation
        if d == 1:  # the same in fewer passes (causal, bands): [max(c - left, 0), min(c + right, n_k - 1)]
            lo = np.maximum(c - self.left, 0)
            np.minimum(c, self.shape[1] - 1 - self.right, out=c)
            c += self.right + 1
            c -= lo
            return lo, np.maximum(c, 0, out=c)
        lo_m = -(np.minimum(self.left, c) // d)
        hi_m = np.minimum(self.right, self.shape[1] - 1 - c) // d
        counts = np.maximum(hi_m - lo_m + 1, 0)
        return c + lo_m * d, counts

    @property
    def has_runs(self):
        # a dilated window's keys are single keys, one run each: it is planned from its CSR (or regrouped)
        return self.dilation == 1

    def _runs(self, start, stop):
        lo, counts = self._bounds(start, stop)
        return runsets.one_per_row(lo, lo + counts)

    def _row_counts(self, start, stop):
        return self._bounds(start, stop)[1]

    def _rows(self, start, stop):
        lo, counts = self._bounds(start, stop)
        return counts_to_indptr(counts), ranges_to_indices(lo, counts, self.dilation)

    def _transpose(self):
        # key j sees query i iff -left <= j - i - offset <= right, i.e. -right <= i - (j - offset) <= left
        n_q, n_k = self.shape
        return SlidingWindow(n_k, n_q, self.right, self.left, self.dilation, -self.offset)

    def describe(self):
        d = f", dilation={self.dilation}" if self.dilation != 1 else ""
        o = f", offset={self.offset}" if self.offset else ""
        return f"window(left={self.left}, right={self.right}{d}{o})"


@register_pattern(
    "sliding_window",
    examples=[
        dict(n=1, radius=0),
        dict(n=9, radius=2),
        dict(n=7, left=3, right=0),
        dict(n=11, left=1, right=4, dilation=2),
        dict(n=6, radius=10),
        dict(n=12, radius=5, dilation=3),
        dict(n=4, left=3, right=1, n_k=10, offset=6),
        dict(n=9, left=2, right=3, n_k=5, offset=-4, dilation=2),
    ],
)
def sliding_window(n, radius=None, *, left=None, right=None, dilation=1, n_k=None, offset=None):
    """A banded (sliding-window) pattern with explicit radii.

    Query ``i`` sits at key position ``i + offset`` and may attend to key ``j``
    iff ``-left <= j - (i + offset) <= right`` and ``(j - (i + offset)) %
    dilation == 0``.  Windows are truncated at the edges (as in Longformer),
    not shifted.  ``radius`` sets both sides; ``left`` / ``right`` override one
    side each.  A causal window is ``left=r, right=0``.  ``left`` and ``right``
    are FlashAttention's ``window_size=(left, right)``.

    Radii here are one-sided.  Hugging Face's ``attention_window=W`` (the even
    total window) is ``radius=W // 2``; see :func:`longformer`.

    Parameters
    ----------
    n : int
        Number of queries (and keys, unless ``n_k`` is given).
    radius : int, optional
        The reach on each side, in tokens: offsets ``j - i`` up to ``radius``
        away are candidates.  With ``dilation=1`` the query sees all
        ``radius`` tokens on each side; with ``dilation > 1`` only every
        ``dilation``-th offset is kept, i.e. ``radius // dilation`` keys on
        each side.
    left, right : int, optional
        The reach before / after the query, as ``radius``; default to ``radius``.
    dilation : int
        Keep only the offsets that are multiples of ``dilation``, within the
        reach (the reach is kept and the key count drops); ``dilation=1`` is a
        plain band.  The allenai Longformer's dilated window of ``w`` keys per
        side keeps the key count and widens the reach instead: that window is
        ``sliding_window(n, w * dilation, dilation=dilation)``.
    n_k : int, optional
        Number of keys for a rectangular pattern (defaults to ``n``).
    offset : int, optional
        The key position of query 0 (query ``i`` sits at ``i + offset``).
        Defaults to 0 whatever ``n_k`` is (top-left alignment: the window's
        meaning does not change with the number of keys, and a window over a
        key segment is placed explicitly); :func:`causal` defaults to
        bottom-right instead.  Must satisfy ``-n < offset < n_k`` (some query
        sits on a key position); a negative offset places the first queries
        before the first key.

    Examples
    --------
    >>> import sparseattn as sa
    >>> print(sa.sliding_window(5, 1).to_string())
        T1 T2 T3 T4 T5
    T1  *  *
    T2  *  *  *
    T3     *  *  *
    T4        *  *  *
    T5           *  *

    Two queries placed at key positions 3 and 4 of six keys:

    >>> sa.sliding_window(2, 1, n_k=6, offset=3).to_dense().astype(int)
    array([[0, 0, 1, 1, 1, 0],
           [0, 0, 0, 1, 1, 1]])
    """
    n = _check_int("n", n, 0)
    n_k = n if n_k is None else _check_int("n_k", n_k, 0)
    if radius is None and (left is None or right is None):
        raise ValueError(
            f"sliding_window needs radius=, or both left= and right=; got radius={radius}, left={left}, right={right}"
        )
    if radius is not None:
        radius = _check_int("radius", radius, 0)
    left = radius if left is None else _check_int("left", left, 0)
    right = radius if right is None else _check_int("right", right, 0)
    dilation = _check_int("dilation", dilation, 1)
    offset = 0 if offset is None else _check_offset(offset, n, n_k)
    return SlidingWindow(n, n_k, left, right, dilation, offset)


@register_pattern(
    "causal",
    examples=[dict(n=6), dict(n=10, radius=3), dict(n=1, radius=3, n_k=9), dict(n=4, n_k=11), dict(n=7, n_k=3),
              dict(n=5, radius=4, n_k=12, offset=2, dilation=2)],
)
def causal(n, radius=None, *, n_k=None, offset=None, dilation=1):
    """Causal attention: query ``i`` sees keys ``i + offset - radius .. i + offset`` (all earlier keys by default).

    With ``n_k`` keys and no ``offset`` the queries are the *last* ``n`` positions
    (bottom-right alignment, as FlashAttention >= 2.1 and transformers' KV
    caches): ``offset = n_k - n``, so the last query sees the last key.  Square
    calls (``n_k == n``) keep ``offset = 0``.  One-token decode over a cache of
    ``T`` keys with a causal window of ``W`` keys is
    ``causal(1, W - 1, n_k=T)`` (the same as ``offset=T - 1``); chunked prefill
    of ``c`` new tokens is ``causal(c, W - 1, n_k=T)``.

    Parameters
    ----------
    n : int
        Number of queries.
    radius : int, optional
        The reach backwards, in tokens (``None``: back to the first key).
        With ``dilation > 1`` the query sees ``radius // dilation`` earlier
        keys within that reach, not ``radius``.
    n_k : int, optional
        Number of keys (defaults to ``n``).
    offset : int, optional
        The key position of query 0 (defaults to ``n_k - n``: bottom-right).
        Must satisfy ``-n < offset < n_k``.
    dilation : int
        Keep only offsets that are multiples of ``dilation``, within the reach.

    Examples
    --------
    Decode: one query over a cache of 6 keys, a window of 3 keys:

    >>> import sparseattn as sa
    >>> print(sa.causal(1, 2, n_k=6, offset=5).to_string())
        T1 T2 T3 T4 T5 T6
    T1           *  *  *
    >>> sa.causal(1, 2, n_k=6) == sa.causal(1, 2, n_k=6, offset=5)
    True

    Chunked prefill: 3 new queries after 3 cached keys:

    >>> sa.causal(3, n_k=6).to_dense().astype(int)
    array([[1, 1, 1, 1, 0, 0],
           [1, 1, 1, 1, 1, 0],
           [1, 1, 1, 1, 1, 1]])
    """
    n = _check_int("n", n, 0)
    n_k = n if n_k is None else _check_int("n_k", n_k, 0)
    offset = n_k - n if offset is None else _check_offset(offset, n, n_k)
    # unlimited lookback: the last query's position, n - 1 + offset, back to key 0
    left = max(n - 1 + offset, 0) if radius is None else _check_int("radius", radius, 0)
    dilation = _check_int("dilation", dilation, 1)
    return SlidingWindow(n, n_k, left, 0, dilation, offset)
