"""The :class:`Pattern` value and the CSR helpers every builder shares.

A pattern is a boolean matrix of shape ``(n_q, n_k)``: entry ``(i, j)`` is True
when query ``i`` may attend to key ``j``.  Patterns are lazy: a builder records
its parameters and produces the CSR of any row range ``[start, stop)`` on
demand, in time proportional to the nonzeros of that range.  No builder ever
materialises an ``n_q x n_k`` dense grid.
"""

from __future__ import annotations

import hashlib
import numbers
from functools import cached_property

import numpy as np
import scipy.sparse as sp

__all__ = ["Pattern", "as_pattern", "index_dtype_for"]

_INT32_MAX = np.iinfo(np.int32).max


def index_dtype_for(nnz, n_cols):
    """int32 while both the nonzero count and column count fit, else int64."""
    if nnz <= _INT32_MAX and n_cols <= _INT32_MAX:
        return np.int32
    return np.int64


def _check_size(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _csr_array(indptr, indices, shape):
    """Wrap canonical (sorted, unique) CSR arrays without copying or re-checking."""
    nnz = int(indptr[-1]) if len(indptr) else 0
    idx_dtype = index_dtype_for(nnz, shape[1])
    indptr = np.asarray(indptr, dtype=idx_dtype)
    indices = np.asarray(indices, dtype=idx_dtype)
    data = np.ones(len(indices), dtype=bool)
    m = sp.csr_array((data, indices, indptr), shape=shape, copy=False)
    m.has_sorted_indices = True
    m.has_canonical_format = True
    return m


def counts_to_indptr(counts):
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr


def ranges_to_indices(lo, counts, step=1):
    """Concatenate ``lo[r] + step * arange(counts[r])`` for all rows, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    indptr = counts_to_indptr(counts)
    row_of = np.repeat(np.arange(len(counts)), counts)
    pos = np.arange(total, dtype=np.int64) - indptr[row_of]
    return np.asarray(lo, dtype=np.int64)[row_of] + step * pos


class Pattern:
    """An immutable boolean attention pattern of shape ``(n_q, n_k)``.

    Subclasses implement :meth:`_rows`, returning canonical CSR arrays
    ``(indptr, indices)`` for a row range, and :attr:`identity`, a hashable
    description used for caching compiled plans.

    Patterns compose: ``a | b`` is the union, ``a & b`` the intersection,
    ``p.T`` the transpose.  Two patterns compare equal when they allow the
    same entries.

    Examples
    --------
    >>> import sparseattn as sa
    >>> p = sa.sliding_window(5, 1) | sa.global_tokens(5, [0])
    >>> p.shape, p.nnz
    ((5, 5), 19)
    >>> print(p.to_string())
        T1 T2 T3 T4 T5
    T1  *  *  *  *  *
    T2  *  *  *
    T3  *  *  *  *
    T4  *     *  *  *
    T5  *        *  *
    """

    #: short name used in ``repr`` and in identities
    name = "pattern"

    def __init__(self, shape):
        n_q, n_k = shape
        self._shape = (_check_size("n_q", n_q), _check_size("n_k", n_k))

    # -- the two things a subclass provides --------------------------------
    def _rows(self, start, stop):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def identity(self):  # pragma: no cover - abstract
        """A hashable value; equal identities imply equal patterns."""
        raise NotImplementedError

    # -- structure hints for the planner (optional) ------------------------
    def _row_counts(self, start, stop):
        indptr, _ = self._rows(start, stop)
        return np.diff(indptr)

    # -- public API -----------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @cached_property
    def csr(self):
        """The whole pattern as a canonical ``scipy.sparse.csr_array`` (bool)."""
        return self.rows(0, self._shape[0])

    def rows(self, start, stop):
        """The canonical CSR of rows ``[start, stop)`` as a ``csr_array``.

        Built in time proportional to the nonzeros in that range.
        """
        n_q = self._shape[0]
        start = _check_size("start", start)
        stop = _check_size("stop", stop)
        if not start <= stop <= n_q:
            raise ValueError(
                f"row range [start, stop) = [{start}, {stop}) must satisfy 0 <= start <= stop <= n_q = {n_q}"
            )
        if "csr" in self.__dict__:
            return self.__dict__["csr"][start:stop]
        indptr, indices = self._rows(start, stop)
        return _csr_array(indptr, indices, (stop - start, self._shape[1]))

    def row_arrays(self, start, stop):
        """Raw ``(indptr, indices)`` for rows ``[start, stop)``; indptr starts at 0."""
        m = self.rows(start, stop)
        return m.indptr, m.indices

    @cached_property
    def nnz(self):
        """Number of allowed (query, key) pairs."""
        if "csr" in self.__dict__:
            return int(self.__dict__["csr"].nnz)
        total = 0
        n_q = self._shape[0]
        step = 65536
        for s in range(0, n_q, step):
            total += int(np.sum(self._row_counts(s, min(n_q, s + step)), dtype=np.int64))
        return total

    @property
    def density(self):
        """``nnz / (n_q * n_k)``; 0.0 for an empty shape."""
        n_q, n_k = self._shape
        return self.nnz / (n_q * n_k) if n_q and n_k else 0.0

    def to_dense(self, max_elements=1 << 26):
        """The pattern as a dense boolean ndarray (refuses very large patterns)."""
        n_q, n_k = self._shape
        if n_q * n_k > max_elements:
            raise ValueError(
                f"to_dense() of a {n_q}x{n_k} pattern needs {n_q * n_k} elements, more than "
                f"max_elements={max_elements}; use .csr or .rows(start, stop) instead"
            )
        return self.csr.toarray()

    def to_string(self, labels=None, max_size=64):
        """Render as text in the seed notes' style: ``*`` where query sees key.

        Rows are queries, columns are keys, labelled ``T1 .. Tn`` by default.
        """
        n_q, n_k = self._shape
        if max(n_q, n_k) > max_size:
            raise ValueError(
                f"to_string() renders patterns up to {max_size} tokens per side, got shape {self._shape}; "
                f"pass max_size= to raise the limit or use sparseattn.viz.plot_pattern"
            )
        if labels is None:
            row_labels = [f"T{i + 1}" for i in range(n_q)]
            col_labels = [f"T{j + 1}" for j in range(n_k)]
        else:
            labels = [str(x) for x in labels]
            if len(labels) != max(n_q, n_k):
                raise ValueError(f"labels has {len(labels)} entries, expected {max(n_q, n_k)}")
            row_labels, col_labels = labels[:n_q], labels[:n_k]
        cw = max([len(c) for c in col_labels] + [1]) + 1
        rw = max([len(r) for r in row_labels] + [0]) + 2
        dense = self.to_dense()
        lines = [(" " * rw + "".join(c.ljust(cw) for c in col_labels)).rstrip()]
        for i in range(n_q):
            cells = "".join(("*" if dense[i, j] else "").ljust(cw) for j in range(n_k))
            lines.append((row_labels[i].ljust(rw) + cells).rstrip())
        return "\n".join(lines)

    # -- algebra ---------------------------------------------------------------
    def __or__(self, other):
        from .algebra import union

        return union(self, as_pattern(other, "other"))

    def __ror__(self, other):
        from .algebra import union

        return union(as_pattern(other, "other"), self)

    def __and__(self, other):
        from .algebra import intersection

        return intersection(self, as_pattern(other, "other"))

    def __rand__(self, other):
        from .algebra import intersection

        return intersection(as_pattern(other, "other"), self)

    @property
    def T(self):
        """The transpose: key ``j`` sees query ``i`` in ``p.T`` iff ``p`` allows ``(i, j)``."""
        from .algebra import transpose

        return transpose(self)

    def __eq__(self, other):
        if not isinstance(other, Pattern):
            return NotImplemented
        if self is other or self.identity == other.identity:
            return True
        if self.shape != other.shape or self.nnz != other.nnz:
            return False
        a, b = self.csr, other.csr
        return bool(np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices))

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        # Equal patterns share shape and nnz, so this is consistent with __eq__.
        return hash((self._shape, self.nnz))

    def __repr__(self):
        return f"<{type(self).__name__} {self.describe()} shape={self._shape}>"

    def describe(self):
        return self.name


class CSRPattern(Pattern):
    """A pattern given by explicit canonical CSR arrays (from scipy or dense input)."""

    name = "csr"

    def __init__(self, indptr, indices, shape):
        super().__init__(shape)
        self._indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        self._indices = np.ascontiguousarray(indices, dtype=np.int64)
        self._indptr.setflags(write=False)
        self._indices.setflags(write=False)

    def _rows(self, start, stop):
        a, b = self._indptr[start], self._indptr[stop]
        return self._indptr[start : stop + 1] - a, self._indices[a:b]

    def _row_counts(self, start, stop):
        return np.diff(self._indptr[start : stop + 1])

    @cached_property
    def identity(self):
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(self._shape, dtype=np.int64).tobytes())
        h.update(self._indptr.tobytes())
        h.update(self._indices.tobytes())
        return ("csr", self._shape, h.hexdigest())

    def describe(self):
        return f"nnz={len(self._indices)}"


def _canonical_from_scipy(m, argname):
    if not sp.issparse(m):
        raise TypeError(f"{argname} must be a scipy sparse matrix/array, got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{argname} must be 2-D, got a scipy sparse object with shape {m.shape}")
    csr = sp.csr_array(m, copy=True)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    return CSRPattern(csr.indptr, csr.indices, csr.shape)


def as_pattern(obj, argname="pattern"):
    """Coerce a :class:`Pattern`, scipy sparse matrix/array or 2-D bool ndarray to a Pattern."""
    if isinstance(obj, Pattern):
        return obj
    if sp.issparse(obj):
        return _canonical_from_scipy(obj, argname)
    if isinstance(obj, np.ndarray):
        from .builders import from_dense

        return from_dense(obj)
    raise TypeError(
        f"{argname} must be a sparseattn Pattern, a scipy sparse matrix/array or a 2-D boolean ndarray, "
        f"got {type(obj).__name__}"
    )
