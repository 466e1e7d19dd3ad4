"""Patterns whose rows are runs of keys: full attention, packed documents, prefix-LM.

Each row of :func:`full`, :func:`documents` and :func:`prefix_lm` is one
contiguous run of keys, computed per row range from the parameters in
O(rows) (:meth:`~sparseattn.patterns.base.Pattern.row_runs`); the planner
reads these runs, and the CSR is built from them only when asked for.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

from . import runsets
from .base import Pattern, counts_to_indptr, ranges_to_indices
from .builders import _check_int
from .registry import register_pattern

__all__ = [
    "Full",
    "Documents",
    "PrefixLM",
    "full",
    "documents",
    "from_cu_seqlens",
    "from_position_ids",
    "prefix_lm",
]


def _digest(*arrays):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def _int_array(name, value, what):
    """``value`` as an int64 array; a clear error for bools, floats and objects."""
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.dtype == np.float64:  # [] reads as float64
            return arr.astype(np.int64)
        raise TypeError(f"{name} must hold integers ({what}), got dtype {arr.dtype}: {_show(arr)}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, beyond int64")
    return arr.astype(np.int64)


def _show(arr, limit=8):
    flat = np.asarray(arr).ravel()
    more = ", ..." if flat.size > limit else ""
    return "[" + ", ".join(str(x) for x in flat[:limit].tolist()) + more + "]"


class Full(Pattern):
    """Every query sees every key."""

    name = "full"
    has_runs = True

    def _runs(self, start, stop):
        rows = stop - start
        return runsets.one_per_row(np.zeros(rows, np.int64), np.full(rows, self.shape[1], np.int64))

    @property
    def identity(self):
        return ("full", self.shape)

    def _row_counts(self, start, stop):
        return np.full(stop - start, self.shape[1], dtype=np.int64)

    def _rows(self, start, stop):
        rows, n_k = stop - start, self.shape[1]
        return np.arange(rows + 1, dtype=np.int64) * n_k, np.tile(np.arange(n_k, dtype=np.int64), rows)

    def _transpose(self):
        return Full((self.shape[1], self.shape[0]))


@register_pattern("full", examples=[dict(n=1), dict(n=5), dict(n=4, n_k=7), dict(n=6, n_k=2)])
def full(n, n_k=None):
    """Dense attention as a pattern: every query sees every key.

    Parameters
    ----------
    n : int
        Number of queries (and keys, unless ``n_k`` is given).
    n_k : int, optional
        Number of keys for a rectangular pattern.

    Examples
    --------
    >>> import sparseattn as sa
    >>> sa.full(3).nnz, sa.full(2, n_k=5).shape
    (9, (2, 5))
    """
    n = _check_int("n", n, 0)
    n_k = n if n_k is None else _check_int("n_k", n_k, 0)
    return Full((n, n_k))


class Documents(Pattern):
    """Block-diagonal: each token sees the tokens of its own document (consecutive runs of ``lengths``)."""

    name = "documents"

    def __init__(self, lengths):
        self.lengths = lengths  # positive int64, read-only
        self.offsets = counts_to_indptr(lengths)  # cu_seqlens
        self.offsets.setflags(write=False)
        n = int(self.offsets[-1])
        super().__init__((n, n))
        self._digest = _digest(lengths)

    @property
    def identity(self):
        return ("documents", self.shape, self._digest)

    def _doc_of(self, start, stop):
        return np.searchsorted(self.offsets, np.arange(start, stop, dtype=np.int64), side="right") - 1

    has_runs = True

    def _runs(self, start, stop):
        # each document's bounds repeated over its rows in [start, stop): no search per row
        a, b = np.searchsorted(self.offsets, [start, stop], side="right") - 1
        b = min(b, len(self.lengths) - 1)
        if stop <= start:
            return runsets.empty(0)
        first = self.offsets[a : b + 1]
        last = self.offsets[a + 1 : b + 2]
        reps = np.minimum(last, stop) - np.maximum(first, start)
        return runsets.one_per_row(np.repeat(first, reps), np.repeat(last, reps))

    def _row_counts(self, start, stop):
        return self.lengths[self._doc_of(start, stop)]

    def _rows(self, start, stop):
        doc = self._doc_of(start, stop)
        counts = self.lengths[doc]
        return counts_to_indptr(counts), ranges_to_indices(self.offsets[doc], counts)

    def _transpose(self):
        return self

    def describe(self):
        return f"documents({len(self.lengths)} documents)"


def _documents(lengths):
    lengths = np.asarray(lengths, dtype=np.int64)
    lengths.setflags(write=False)
    return Documents(lengths)


@register_pattern(
    "documents",
    examples=[dict(lengths=[5]), dict(lengths=[2, 3, 1]), dict(lengths=[1, 1, 1, 1]), dict(lengths=[4, 1, 6, 2])],
)
def documents(lengths):
    """Packed documents: each token attends to every token of its own document.

    The documents are consecutive runs of ``lengths[0], lengths[1], ...``
    tokens; the pattern is block-diagonal over them.  FlashAttention's varlen
    ``cu_seqlens`` and the ``position_ids`` of a packed row give the same
    pattern (:func:`from_cu_seqlens`, :func:`from_position_ids`).  Compose
    with ``&``: ``documents(lengths) & causal(n)`` is causal within each
    document, ``& sliding_window(n, r)`` a window that stops at document
    borders; ``| global_tokens(n, ...)`` adds tokens that cross them.

    Parameters
    ----------
    lengths : sequence of int
        The documents' lengths, each >= 1, in order (at least one).

    Examples
    --------
    >>> import sparseattn as sa
    >>> print(sa.documents([2, 3]).to_string())
        T1 T2 T3 T4 T5
    T1  *  *
    T2  *  *
    T3        *  *  *
    T4        *  *  *
    T5        *  *  *
    """
    if isinstance(lengths, numbers.Integral):
        raise TypeError(f"lengths must be a sequence of document lengths, got the single integer {lengths!r}")
    arr = _int_array("lengths", lengths, "document lengths")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence of positive integers, got shape {arr.shape}")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        raise ValueError(f"lengths must be positive integers, got lengths[{int(bad[0])}] = {int(arr[bad[0]])}")
    if int(arr.sum(dtype=np.float64)) > 2**62:
        raise ValueError(f"lengths add up to more than 2**62 tokens ({float(arr.sum(dtype=np.float64)):.3g})")
    return _documents(arr)


@register_pattern("from_cu_seqlens", examples=[dict(cu_seqlens=[0, 4]), dict(cu_seqlens=[0, 2, 5, 6])])
def from_cu_seqlens(cu_seqlens):
    """Packed documents from FlashAttention's varlen boundaries ``[0, l0, l0 + l1, ..., n]``.

    The same pattern as ``documents(np.diff(cu_seqlens))`` (equal identity).

    Parameters
    ----------
    cu_seqlens : sequence of int
        Cumulative document lengths: starts at 0, strictly increasing, at least two entries.

    Examples
    --------
    >>> import sparseattn as sa
    >>> sa.from_cu_seqlens([0, 2, 5]) == sa.documents([2, 3])
    True
    """
    arr = _int_array("cu_seqlens", cu_seqlens, "cumulative sequence lengths")
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D sequence [0, l0, l0 + l1, ..., n] with at least two entries, got {_show(arr)}"
        )
    if arr[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(arr[0])}")
    steps = np.diff(arr)
    bad = np.flatnonzero(steps < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"cu_seqlens must be strictly increasing, got cu_seqlens[{i}] = {int(arr[i])} and "
            f"cu_seqlens[{i + 1}] = {int(arr[i + 1])}"
        )
    return _documents(steps)


@register_pattern(
    "from_position_ids",
    examples=[dict(position_ids=[0, 1, 2, 0, 1]), dict(position_ids=np.array([[0, 1, 0, 0, 1, 2, 3]])), dict(position_ids=[0, 0, 1])],
)
def from_position_ids(position_ids):
    """Packed documents from the ``position_ids`` of one packed row.

    The layout of transformers' ``DataCollatorWithFlattening``: positions
    count up within each document and restart at 0 where a new one begins,
    e.g. ``[0, 1, 2, 0, 1]`` is two documents of 3 and 2 tokens.  Every 0
    starts a document (as transformers derives ``cu_seqlens`` from them).

    Parameters
    ----------
    position_ids : array_like of int, shape (n,) or (1, n)
        The positions of one packed row; ``position_ids[0]`` must be 0.

    Examples
    --------
    >>> import sparseattn as sa
    >>> sa.from_position_ids([[0, 1, 2, 0, 1]]) == sa.documents([3, 2])
    True
    """
    arr = _int_array("position_ids", position_ids, "token positions")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"position_ids must be one packed row: 1-D of length n or 2-D of shape (1, n) with n >= 1, "
            f"got shape {np.shape(position_ids)}"
        )
    if arr[0] != 0:
        raise ValueError(f"position_ids must start at 0 (the first document's first token), got {_show(arr)}")
    starts = np.flatnonzero(arr == 0)
    return _documents(np.diff(np.append(starts, arr.size)))


class PrefixLM(Pattern):
    """Bidirectional over the first ``prefix`` tokens, causal after."""

    name = "prefix_lm"

    def __init__(self, n, prefix):
        super().__init__((n, n))
        self.prefix = prefix

    @property
    def identity(self):
        return ("prefix_lm", self.shape, self.prefix)

    has_runs = True

    def _runs(self, start, stop):
        return runsets.one_per_row(np.zeros(stop - start, np.int64), self._row_counts(start, stop))

    def _row_counts(self, start, stop):
        return np.maximum(np.arange(start + 1, stop + 1, dtype=np.int64), self.prefix)

    def _rows(self, start, stop):
        counts = self._row_counts(start, stop)
        return counts_to_indptr(counts), ranges_to_indices(np.zeros(stop - start, dtype=np.int64), counts)

    def describe(self):
        return f"prefix_lm(prefix={self.prefix})"


@register_pattern(
    "prefix_lm", examples=[dict(n=6, prefix=2), dict(n=5, prefix=0), dict(n=4, prefix=4), dict(n=9, prefix=5), dict(n=0, prefix=0)]
)
def prefix_lm(n, prefix):
    """Prefix-LM attention: the prefix sees itself in both directions, the rest is causal.

    Token ``i < prefix`` sees keys ``0 .. prefix - 1``; token ``i >= prefix``
    sees keys ``0 .. i``.  ``prefix=0`` is :func:`causal`, ``prefix=n`` is
    :func:`full`.  (FlexAttention: ``mask_mod = lambda b, h, i, j: (j <= i) |
    (j < prefix)``; here ``from_predicate(lambda i, j: (j <= i) | (j < prefix),
    n, n)`` gives the same pattern.)

    Parameters
    ----------
    n : int
        Number of tokens.
    prefix : int
        Length of the bidirectional prefix, in ``[0, n]``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> print(sa.prefix_lm(4, 2).to_string())
        T1 T2 T3 T4
    T1  *  *
    T2  *  *
    T3  *  *  *
    T4  *  *  *  *
    """
    n = _check_int("n", n, 0)
    prefix = _check_int("prefix", prefix)
    if not 0 <= prefix <= n:
        raise ValueError(f"prefix must lie in [0, n] = [0, {n}], got {prefix}")
    return PrefixLM(n, prefix)
