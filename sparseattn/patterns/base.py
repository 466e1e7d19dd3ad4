"""The :class:`Pattern` value and its algebra: union, intersection, transpose.

A pattern is a boolean matrix of shape ``(n_q, n_k)``: entry ``(i, j)`` is True
when query ``i`` may attend to key ``j``.  Patterns are lazy: a builder records
its parameters and produces the CSR of any row range ``[start, stop)`` on
demand, in time proportional to the nonzeros of that range.  No builder ever
materialises an ``n_q x n_k`` dense grid.  ``a | b``, ``a & b`` and ``p.T``
give patterns of this module (:class:`Union`, :class:`Intersection`,
:class:`Transposed`), evaluated lazily per row range; the CSR helpers live in
:mod:`sparseattn.patterns.csr`.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .csr import (  # noqa: F401  (re-exported: builders and adapters import them from here)
    INDEX_MAX,
    _check_size,
    _csr_array,
    checked_csr,
    counts_to_indptr,
    index_dtype_for,
    ranges_to_indices,
)

__all__ = ["Pattern", "CSRPattern", "as_pattern", "index_dtype_for", "checked_csr", "union", "intersection",
           "transpose", "Union", "Intersection", "Transposed"]


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

    def _union_row_counts(self, parts, start, stop):
        """Row counts of the union of ``parts`` (this pattern among them) in closed form, or None (merge the rows)."""
        return None

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
        return union(self, as_pattern(other, "the right operand of |"))

    def __ror__(self, other):
        return union(as_pattern(other, "the left operand of |"), self)

    def __and__(self, other):
        return intersection(self, as_pattern(other, "the right operand of &"))

    def __rand__(self, other):
        return intersection(as_pattern(other, "the left operand of &"), self)

    @property
    def T(self):
        """The transpose: key ``j`` sees query ``i`` in ``p.T`` iff ``p`` allows ``(i, j)``."""
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
    indptr, indices, shape = checked_csr(m, argname)
    return CSRPattern(indptr, indices, shape)


def _from_dense(mask, argname):
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{argname} must be a 2-D array (n_q, n_k) when given as an ndarray, got shape {arr.shape}")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
        raise TypeError(f"{argname} must be boolean or numeric (nonzero = allowed), got dtype {arr.dtype}")
    m = sp.csr_array(arr != 0)
    m.sort_indices()
    return CSRPattern(m.indptr, m.indices, m.shape)


def as_pattern(obj, argname="pattern"):
    """Coerce a :class:`Pattern`, scipy sparse matrix/array or 2-D bool ndarray to a Pattern."""
    if isinstance(obj, Pattern):
        return obj
    if sp.issparse(obj):
        return _canonical_from_scipy(obj, argname)
    if isinstance(obj, np.ndarray):
        return _from_dense(obj, argname)
    raise TypeError(
        f"{argname} must be a sparseattn Pattern, a scipy sparse matrix/array or a 2-D boolean ndarray, "
        f"got {type(obj).__name__}"
    )


# -- algebra ----------------------------------------------------------------------------------------


def _same_shape(op, a, b):
    if a.shape != b.shape:
        sym = {"union": "a | b", "intersection": "a & b"}[op]
        raise ValueError(f"pattern {op} ({sym}): shapes differ, left is {a.shape} and right is {b.shape}")


_SMALL = 1 << 16  # below this many entries a NumPy merge beats starting Numba's threads


#: up to this many entries, NumPy merges while Numba's merge is not compiled yet (its compile takes ~2 s)
_NUMPY_COLD = 1 << 23


def _merge_compiled():
    from ..kernels.cache import numba_ready
    from ..kernels.csr_ops import _merge

    return numba_ready(_merge)


def _merge_small(a, b, n_rows, union):
    """NumPy merge of two small CSR row blocks through sorted ``row * width + col`` keys."""
    width = int(max(a[1].max(initial=-1), b[1].max(initial=-1))) + 1
    keys = []
    for indptr, indices in (a, b):
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
        keys.append(rows * width + indices)
    # each key list is sorted and unique: a stable sort of the two runs is a linear merge (timsort), and a
    # repeated key is one both sides hold
    both = np.concatenate(keys)
    both.sort(kind="stable")
    same = both[1:] == both[:-1]
    if union:
        merged = both[np.concatenate(([True], ~same))] if len(both) else both
    else:
        merged = both[:-1][same]
    rows = merged // max(width, 1)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, merged - rows * width


def _fold(parts, start, stop, union):
    """Merge the parts' CSR row blocks pairwise, row by row (Numba for large blocks)."""
    acc = parts[0]._rows(start, stop)
    for p in parts[1:]:
        nxt = p._rows(start, stop)
        size = len(acc[1]) + len(nxt[1])
        if size <= _SMALL or (size <= _NUMPY_COLD and not _merge_compiled()):
            acc = _merge_small(acc, nxt, stop - start, union)
        else:
            from ..kernels.csr_ops import merge_rows

            acc = merge_rows(acc, nxt, union)
    return acc


class _Combine(Pattern):
    symbol = "?"

    def __init__(self, parts):
        super().__init__(parts[0].shape)
        self.parts = tuple(parts)

    @cached_property
    def identity(self):
        # Union and intersection are commutative and associative; sort the flattened parts.
        return (self.name, tuple(sorted((p.identity for p in self.parts), key=repr)))

    def describe(self):
        return "(" + f" {self.symbol} ".join(p.describe() for p in self.parts) + ")"


class Union(_Combine):
    """Entries allowed by any part (de-duplicated)."""

    name = "union"
    symbol = "|"

    def _rows(self, start, stop):
        return _fold(self.parts, start, stop, union=True)

    def _row_counts(self, start, stop):
        # a part may know the union's row counts in closed form (a window with global tokens does)
        for p in self.parts:
            counts = p._union_row_counts(self.parts, start, stop)
            if counts is not None:
                return counts
        return super()._row_counts(start, stop)


class Intersection(_Combine):
    """Entries allowed by every part."""

    name = "intersection"
    symbol = "&"

    def _rows(self, start, stop):
        return _fold(self.parts, start, stop, union=False)


def _flatten(cls, patterns):
    out = []
    for p in patterns:
        out.extend(p.parts if isinstance(p, cls) else [p])
    return out


def union(*patterns):
    """The union of patterns of one shape: ``union(a, b) == a | b``."""
    if not patterns:
        raise ValueError("union() needs at least one pattern")
    for p in patterns[1:]:
        _same_shape("union", patterns[0], p)
    parts = _flatten(Union, patterns)
    return parts[0] if len(parts) == 1 else Union(parts)


def intersection(*patterns):
    """The intersection of patterns of one shape: ``intersection(a, b) == a & b``."""
    if not patterns:
        raise ValueError("intersection() needs at least one pattern")
    for p in patterns[1:]:
        _same_shape("intersection", patterns[0], p)
    parts = _flatten(Intersection, patterns)
    return parts[0] if len(parts) == 1 else Intersection(parts)


class Transposed(CSRPattern):
    """Transpose of a pattern (materialised once: a transpose needs every row)."""

    name = "transpose"

    def __init__(self, base):
        t = base.csr.T.tocsr()
        t.sort_indices()
        super().__init__(t.indptr, t.indices, t.shape)
        self.base = base

    @cached_property
    def identity(self):
        return ("transpose", self.base.identity)

    @property
    def T(self):
        return self.base

    def describe(self):
        return f"{self.base.describe()}.T"


def transpose(p):
    t = getattr(p, "_transpose", None)
    if t is not None:
        return t()
    return Transposed(p)
