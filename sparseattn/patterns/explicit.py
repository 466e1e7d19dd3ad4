"""Patterns given explicitly: per-query top-k key lists and predicates, compiled to canonical CSR once."""

from __future__ import annotations

import numpy as np

from .base import CSRPattern, counts_to_indptr
from .builders import _check_int
from .registry import register_pattern
from .runs import _int_array

__all__ = ["from_indices", "from_predicate", "PREDICATE_BLOCK"]


def _csr_from_sorted(sorted_rows, valid):
    counts = valid.sum(axis=1, dtype=np.int64)
    return counts_to_indptr(counts), sorted_rows[valid]


class _Compiled(CSRPattern):
    """Explicit CSR compiled from a top-k list or a predicate; identity from the content digest."""

    def __init__(self, indptr, indices, shape, name):
        super().__init__(indptr, indices, shape)
        self.name = name

    def describe(self):
        return f"{self.name}(nnz={len(self._indices)})"


def _topk_pattern(idx, n_k):
    if idx.shape[1] == 0:
        return _Compiled(np.zeros(idx.shape[0] + 1, np.int64), np.zeros(0, np.int64), (idx.shape[0], n_k), "from_indices")
    s = np.sort(idx, axis=1)
    valid = s >= 0
    valid[:, 1:] &= s[:, 1:] != s[:, :-1]  # duplicates merged
    indptr, indices = _csr_from_sorted(s, valid)
    return _Compiled(indptr, indices, (idx.shape[0], n_k), "from_indices")


@register_pattern(
    "from_indices",
    examples=[
        dict(indices=np.array([[0, 2], [1, -1], [3, 3], [-1, -1]]), n_k=5),
        dict(indices=np.array([[[0, 1], [2, 0], [1, 1]], [[2, -1], [0, 2], [-1, 1]]]), n_k=3),
        dict(indices=np.array([[5, 1, 0, 7], [2, 2, 2, 2], [7, 6, 5, 4]]), n_k=8),
    ],
)
def from_indices(indices, n_k):
    """A pattern from per-query key lists: the top-k indices of DeepSeek-V3.2's sparse attention.

    Row ``i`` sees the keys ``indices[i, :]``; ``-1`` marks an unused slot and
    duplicates count once.  A 3-D array ``(h, n_q, k)`` gives one pattern per
    head (a list, which ``sparse_attention`` takes per head).  Compiled to
    canonical CSR once (O(n_q k log k)); the identity is its content digest.

    Parameters
    ----------
    indices : array_like of int, shape (n_q, k) or (h, n_q, k)
        Key indices per query (per head for 3-D); each entry in ``[0, n_k)`` or ``-1``.
    n_k : int
        Number of keys.

    Examples
    --------
    >>> import sparseattn as sa
    >>> sa.from_indices([[2, 0, -1], [1, 1, 1]], n_k=3).to_dense().astype(int)
    array([[1, 0, 1],
           [0, 1, 0]])
    """
    n_k = _check_int("n_k", n_k, 0)
    idx = _int_array("indices", indices, "key indices, -1 for none")
    if idx.ndim not in (2, 3):
        raise ValueError(f"indices must have shape (n_q, k) or (h, n_q, k), got shape {idx.shape}")
    bad = (idx < -1) | (idx >= n_k)
    if bad.any():
        at = tuple(int(x) for x in np.argwhere(bad)[0])
        raise ValueError(f"indices must lie in [0, n_k) = [0, {n_k}) or be -1 (none), got indices{list(at)} = {int(idx[at])}")
    if idx.ndim == 3:
        return [_topk_pattern(h, n_k) for h in idx]
    return _topk_pattern(idx, n_k)


#: the largest block of ``fn`` evaluations held at once (elements of the boolean (rows, n_k) array)
PREDICATE_BLOCK = 1 << 22


def _fn_name(fn):
    return getattr(fn, "__qualname__", None) or repr(fn)


def _predicate_block(fn, a, b, n_k):
    i = np.arange(a, b, dtype=np.int64)[:, None]
    j = np.arange(n_k, dtype=np.int64)[None, :]
    out = fn(i, j)
    got = np.asarray(out) if isinstance(out, (np.ndarray, np.generic, bool)) else None
    expect = f"a boolean array of shape (rows, n_k) = ({b - a}, {n_k})"
    if got is None or got.dtype != bool:
        what = f"dtype {got.dtype}" if got is not None else f"a {type(out).__name__}"
        raise TypeError(
            f"from_predicate: fn={_fn_name(fn)} returned {what} for rows [{a}, {b}); expected {expect} "
            f"(fn(i, j) gets i of shape ({b - a}, 1) and j of shape (1, {n_k}))"
        )
    if got.shape != (b - a, n_k):
        raise ValueError(
            f"from_predicate: fn={_fn_name(fn)} returned shape {got.shape} for rows [{a}, {b}); expected {expect} "
            f"(fn(i, j) gets i of shape ({b - a}, 1) and j of shape (1, {n_k}); "
            f"use np.broadcast_to(result, (len(i), n_k)) for a predicate that ignores i or j)"
        )
    return got


# module-level predicates for the registered examples
def _example_causal(i, j):
    return j <= i


def _example_documents(i, j):
    doc = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    return doc[i] == doc[j]


def _example_stripes(i, j):
    return ((i + j) % 3 == 0) & (j < 5)


@register_pattern(
    "from_predicate",
    examples=[
        dict(fn=_example_causal, n_q=6, n_k=6),
        dict(fn=_example_documents, n_q=8, n_k=8),
        dict(fn=_example_stripes, n_q=4, n_k=7),
    ],
)
def from_predicate(fn, n_q, n_k):
    """A pattern from a predicate on index arrays: FlexAttention's ``mask_mod`` for NumPy.

    ``fn(i, j)`` receives broadcastable int64 arrays, ``i`` of shape
    ``(rows, 1)`` (query indices) and ``j`` of shape ``(1, n_k)`` (key
    indices), and returns a boolean array of shape ``(rows, n_k)``: True
    where query ``i`` may attend to key ``j``.  It is called on blocks of
    rows of at most 2**22 elements, so memory stays bounded, and the pattern
    is compiled to CSR once (O(n_q n_k) calls' worth of work; use the
    closed-form builders where one exists).  FlexAttention's
    ``mask_mod(b, h, q_idx, kv_idx)`` becomes ``fn(i, j)`` with the same
    body.

    Parameters
    ----------
    fn : callable
        ``fn(i, j) -> bool ndarray of shape (rows, n_k)``.
    n_q : int
        Number of queries.
    n_k : int
        Number of keys.

    Examples
    --------
    >>> import numpy as np, sparseattn as sa
    >>> doc = np.array([0, 0, 1, 1, 1])
    >>> p = sa.from_predicate(lambda i, j: (doc[i] == doc[j]) & (j <= i), 5, 5)
    >>> p == (sa.documents([2, 3]) & sa.causal(5))
    True
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(i, j) -> bool array, got {fn!r} of type {type(fn).__name__}")
    n_q = _check_int("n_q", n_q, 0)
    n_k = _check_int("n_k", n_k, 0)
    step = max(1, PREDICATE_BLOCK // max(n_k, 1))
    counts, cols = [], []
    for a in range(0, n_q, step):
        b = min(n_q, a + step)
        block = _predicate_block(fn, a, b, n_k)
        counts.append(block.sum(axis=1, dtype=np.int64))
        cols.append(np.nonzero(block)[1].astype(np.int64))
    indptr = counts_to_indptr(np.concatenate(counts) if counts else np.zeros(0, np.int64))
    indices = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return _Compiled(indptr, indices, (n_q, n_k), "from_predicate")
