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

from .._memory import check as _memory_check
from . import runsets
from .csr import (  # noqa: F401  (re-exported: builders and adapters import them from here)
    INDEX_MAX,
    _check_size,
    _csr_array,
    checked_csr,
    counts_to_indptr,
    index_dtype_for,
    ranges_to_indices,
)
from .csr import _fold, _merge_small  # noqa: F401  (re-exported: tests import them from here)

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

    # -- runs (optional): rows that are a few contiguous key ranges ----------
    #: True when :meth:`_runs` gives the rows as canonical runs (see :mod:`sparseattn.patterns.runsets`)
    has_runs = False

    def _runs(self, start, stop):  # pragma: no cover - provided by run patterns
        """Canonical runs ``(ptr, lo, hi)`` of rows ``[start, stop)``, in O(rows * runs per row)."""
        raise NotImplementedError

    def row_runs(self, start=0, stop=None):
        """The rows ``[start, stop)`` as runs of keys: ``(ptr, lo, hi)``, int64.

        Row ``start + r`` allows the keys ``lo[k] <= j < hi[k]`` for ``k`` in
        ``ptr[r]:ptr[r+1]``; runs are sorted, non-empty and neither overlap
        nor touch.  Only patterns with :attr:`has_runs`; others raise
        ``TypeError`` (use :meth:`rows`).

        >>> import sparseattn as sa
        >>> ptr, lo, hi = (sa.sliding_window(6, 1) | sa.global_tokens(6, [5])).row_runs(0, 3)
        >>> ptr.tolist(), lo.tolist(), hi.tolist()
        ([0, 2, 4, 6], [0, 5, 0, 5, 1, 5], [2, 6, 3, 6, 4, 6])
        """
        n_q = self._shape[0]
        stop = n_q if stop is None else _check_size("stop", stop)
        start = _check_size("start", start)
        if not start <= stop <= n_q:
            raise ValueError(
                f"row range [start, stop) = [{start}, {stop}) must satisfy 0 <= start <= stop <= n_q = {n_q}"
            )
        if not self.has_runs:
            raise TypeError(f"{self!r} is not a run pattern (has_runs is False); use .rows(start, stop)")
        return self._runs(start, stop)

    # -- structure hints for the planner (optional) ------------------------
    def _row_counts(self, start, stop):
        if self.has_runs:
            return runsets.counts(*self._runs(start, stop))
        indptr, _ = self._rows(start, stop)
        return np.diff(indptr)

    def _nnz_estimate(self, start, stop):
        """Entries of rows ``[start, stop)`` without building them (an upper bound for folds), or None."""
        if self.has_runs or type(self)._row_counts is not Pattern._row_counts:
            return int(np.sum(self._row_counts(start, stop), dtype=np.int64))
        return None

    def _guard(self, nnz, start, stop, extra=0):
        """Ask the memory guard before building ``nnz`` CSR entries (plus ``extra`` bytes of temporaries)."""
        if nnz is None:
            return
        isz = np.dtype(index_dtype_for(nnz, self._shape[1])).itemsize
        _memory_check(
            {"CSR indices": nnz * isz, "CSR data (bool)": nnz, "indptr": 8 * (stop - start + 1), "temporaries": extra},
            f"building the CSR of {self!r} (rows [{start}, {stop}), {nnz} entries)",
            "The fused path plans run patterns (windows, causal, documents, prefix_lm, neighborhood, global "
            "tokens and their unions and intersections) without a CSR; otherwise build fewer rows at a time "
            "with .rows(start, stop).",
        )

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
        if self.has_runs:
            runs = self._runs(start, stop)
            nnz = int(np.sum(runs[2] - runs[1], dtype=np.int64))
            self._guard(nnz, start, stop)
            indptr, indices = runsets.expand(*runs, dtype=index_dtype_for(nnz, self._shape[1]))
        else:
            nnz = self._nnz_estimate(start, stop)
            self._guard(nnz, start, stop, extra=self._fold_bytes(nnz))
            indptr, indices = self._rows(start, stop)
        return _csr_array(indptr, indices, (stop - start, self._shape[1]))

    def _fold_bytes(self, nnz):
        return 0

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
        if self.shape != other.shape:
            return False
        if self.has_runs and other.has_runs:  # canonical runs are unique: compare them, not the CSR
            n_q = self._shape[0]
            a, b = self._runs(0, n_q), other._runs(0, n_q)
            return all(np.array_equal(x, y) for x, y in zip(a, b))
        if self.nnz != other.nnz:
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

    @cached_property
    def has_runs(self):
        return all(p.has_runs for p in self.parts)

    def _combined_runs(self, parts, start, stop, need):
        return runsets.combine([p._runs(start, stop) for p in parts], self._shape[1], need)

    def _nnz_estimate(self, start, stop):
        if self.has_runs:
            return super()._nnz_estimate(start, stop)
        # a fold builds every operand's rows: bound the result by their sum
        sizes = [p._nnz_estimate(start, stop) for p in self.parts]
        return None if None in sizes else sum(sizes)

    def _fold_bytes(self, nnz):
        return 0 if nnz is None else 24 * nnz  # merge keys and their copies (int64)


class Union(_Combine):
    """Entries allowed by any part (de-duplicated)."""

    name = "union"
    symbol = "|"

    def _runs(self, start, stop):
        return self._combined_runs(self.parts, start, stop, 1)

    def _rows(self, start, stop):
        if self.has_runs:
            return runsets.expand(*self._runs(start, stop))
        return _fold(self.parts, start, stop, union=True)

    def _row_counts(self, start, stop):
        if self.has_runs:
            return runsets.counts(*self._runs(start, stop))
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

    def _runs(self, start, stop):
        return self._combined_runs(self.parts, start, stop, len(self.parts))

    def _rows(self, start, stop):
        if self.has_runs:
            return runsets.expand(*self._runs(start, stop))
        run_parts = [p for p in self.parts if p.has_runs]
        other = [p for p in self.parts if not p.has_runs]
        acc = _fold(other, start, stop, union=False)
        if not run_parts:
            return acc
        # keep the CSR operands' entries that lie in the run operands' runs: the runs are never expanded
        runs = self._combined_runs(run_parts, start, stop, len(run_parts))
        return runsets.filter_csr(acc[0], acc[1], runs, self._shape[1])

    def _nnz_estimate(self, start, stop):
        if self.has_runs:
            return super()._nnz_estimate(start, stop)
        sizes = [p._nnz_estimate(start, stop) for p in self.parts if not p.has_runs]
        return None if None in sizes else sum(sizes)


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
