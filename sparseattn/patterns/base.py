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

__all__ = ["Pattern", "as_pattern", "index_dtype_for", "checked_csr"]

_INT32_MAX = np.iinfo(np.int32).max
#: largest size or integer parameter a builder accepts: sums of two stay inside int64 index arithmetic
INDEX_MAX = 2**62


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
    if value > INDEX_MAX:
        raise ValueError(f"{name} must be <= 2**62 (what int64 index arithmetic can hold), got {value}")
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

        return union(self, as_pattern(other, "the right operand of |"))

    def __ror__(self, other):
        from .algebra import union

        return union(as_pattern(other, "the left operand of |"), self)

    def __and__(self, other):
        from .algebra import intersection

        return intersection(self, as_pattern(other, "the right operand of &"))

    def __rand__(self, other):
        from .algebra import intersection

        return intersection(as_pattern(other, "the left operand of &"), self)

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


def _index_array(argname, what, x, shape):
    """A 1-D integer index array as int64; a float, bool or object one is a ``ValueError``."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{argname} has a malformed {what}: expected a 1-D integer array, got shape {x.shape} "
                         f"(matrix shape {shape})")  # fmt: skip
    if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{argname} has {what} of dtype {x.dtype}; sparse indices must be integers "
                         f"(matrix shape {shape})")  # fmt: skip
    if x.dtype == np.uint64 and x.size and int(x.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{argname} has {what} value {int(x.max())}, beyond int64 (matrix shape {shape})")
    return x.astype(np.int64, copy=False)


def _check_compressed(argname, indptr, indices, n_major, n_minor, shape, axes=("row", "column")):
    """Check CSR/CSC structure in O(nnz), vectorised; returns int64 ``(indptr, indices[:nnz])``."""
    major, minor = axes
    indptr = _index_array(argname, "indptr", indptr, shape)
    indices = _index_array(argname, "indices", indices, shape)
    if len(indptr) != n_major + 1:
        raise ValueError(
            f"{argname} has an indptr of length {len(indptr)}, but its shape {shape} needs {n_major + 1} "
            f"({n_major} {major}s + 1)"
        )
    if indptr[0] != 0:
        raise ValueError(f"{argname} has indptr[0] = {int(indptr[0])}, must be 0 (matrix shape {shape})")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        r = int(np.argmax(steps < 0))
        raise ValueError(
            f"{argname} has a decreasing indptr at {major} {r}: indptr[{r}] = {int(indptr[r])} > "
            f"indptr[{r + 1}] = {int(indptr[r + 1])} (matrix shape {shape}); indptr must be non-decreasing"
        )
    nnz = int(indptr[-1])
    if nnz > len(indices):
        raise ValueError(
            f"{argname} has indptr[-1] = {nnz} but only {len(indices)} stored indices (matrix shape {shape})"
        )
    indices = indices[:nnz]
    bad = (indices < 0) | (indices >= n_minor)
    if bad.any():
        e = int(np.argmax(bad))
        r = int(np.searchsorted(indptr, e, side="right")) - 1
        raise ValueError(
            f"{argname} has {minor} index {int(indices[e])} in {major} {r}, out of range for shape {shape} "
            f"({minor}s must lie in [0, {n_minor}))"
        )
    return indptr, indices


def _check_data(argname, data, nnz, shape):
    data = np.asarray(data)
    if data.dtype != bool and not np.issubdtype(data.dtype, np.number):
        raise TypeError(f"{argname} must hold boolean or numeric values (nonzero = allowed), got dtype {data.dtype}")
    if data.shape[:1] and data.shape[0] < nnz:
        raise ValueError(f"{argname} stores {data.shape[0]} values for {nnz} indices (matrix shape {shape})")
    return data


def checked_csr(m, argname="pattern"):
    """Validate any 2-D scipy sparse matrix/array and return it as a canonical bool CSR ``(indptr, indices, shape)``.

    The raw index arrays are checked before scipy touches them (scipy does
    not check them by default, and its compiled routines read out of bounds
    on bad ones): integer dtype, lengths, ``indptr`` starting at 0 and
    non-decreasing, every index inside the shape.  O(nnz), vectorised.  A bad
    structure raises ``ValueError`` naming ``argname``, the offending row and
    value, and the shape.  Indices come back as int64; duplicates are merged
    and stored zeros dropped.
    """
    if not sp.issparse(m):
        raise TypeError(f"{argname} must be a scipy sparse matrix/array, got {type(m).__name__}")
    shape = tuple(int(x) for x in m.shape)
    if len(shape) != 2:
        raise ValueError(f"{argname} must be 2-D, got a scipy sparse object with shape {m.shape}")
    n_rows, n_cols = (_check_size(f"{argname}.shape[{i}]", x) for i, x in enumerate(shape))
    fmt = m.format
    if fmt == "csr":
        indptr, indices = _check_compressed(argname, m.indptr, m.indices, n_rows, n_cols, shape)
        data = _check_data(argname, m.data, len(indices), shape)[: len(indices)]
        csr = sp.csr_array((data.copy(), indices.copy(), indptr.copy()), shape=shape)  # never edit the user's arrays
    elif fmt == "csc":
        indptr, indices = _check_compressed(argname, m.indptr, m.indices, n_cols, n_rows, shape, ("column", "row"))
        data = _check_data(argname, m.data, len(indices), shape)[: len(indices)]
        csr = sp.csc_array((data.copy(), indices.copy(), indptr.copy()), shape=shape).tocsr()
    elif fmt == "bsr":
        R, C = (int(x) for x in m.blocksize)
        if R < 1 or C < 1 or n_rows % R or n_cols % C:
            raise ValueError(f"{argname} has block size {(R, C)} that does not divide its shape {shape}")
        indptr, indices = _check_compressed(argname, m.indptr, m.indices, n_rows // R, n_cols // C, shape,
                                            ("block row", "block column"))  # fmt: skip
        data = _check_data(argname, m.data, len(indices), shape)
        if data.shape[1:] != (R, C):
            raise ValueError(f"{argname} has blocks of shape {data.shape[1:]}, expected {(R, C)} (matrix shape {shape})")
        csr = sp.bsr_array((data[: len(indices)].copy(), indices.copy(), indptr.copy()), shape=shape,
                           blocksize=(R, C)).tocsr()  # fmt: skip
    elif fmt == "coo":
        coords = getattr(m, "coords", None) or (m.row, m.col)
        row = _index_array(argname, "row indices", coords[0], shape)
        col = _index_array(argname, "column indices", coords[1], shape)
        data = _check_data(argname, m.data, len(row), shape)
        if not len(row) == len(col) == len(data):
            raise ValueError(
                f"{argname} has {len(row)} row indices, {len(col)} column indices and {len(data)} values; "
                f"they must have equal lengths (matrix shape {shape})"
            )
        for name, idx, bound in (("row", row, n_rows), ("column", col, n_cols)):
            bad = (idx < 0) | (idx >= bound)
            if bad.any():
                e = int(np.argmax(bad))
                raise ValueError(
                    f"{argname} has {name} index {int(idx[e])} at entry {e} (row {int(row[e])}, column "
                    f"{int(col[e])}), out of range for shape {shape} ({name}s must lie in [0, {bound}))"
                )
        csr = sp.coo_array((data.copy(), (row.copy(), col.copy())), shape=shape).tocsr()
    else:  # dia, lil, dok: scipy converts them with checked Python-level code
        csr = sp.csr_array(m, copy=True)
        indptr, indices = _check_compressed(argname, csr.indptr, csr.indices, n_rows, n_cols, shape)
        data = _check_data(argname, csr.data, len(indices), shape)[: len(indices)]
        csr = sp.csr_array((data.copy(), indices.copy(), indptr.copy()), shape=shape)
    if csr.indices.dtype != np.int64:
        csr = sp.csr_array((csr.data, csr.indices.astype(np.int64), csr.indptr.astype(np.int64)), shape=shape)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr.indptr.astype(np.int64, copy=False), csr.indices.astype(np.int64, copy=False), shape


def _canonical_from_scipy(m, argname):
    indptr, indices, shape = checked_csr(m, argname)
    return CSRPattern(indptr, indices, shape)


def as_pattern(obj, argname="pattern"):
    """Coerce a :class:`Pattern`, scipy sparse matrix/array or 2-D bool ndarray to a Pattern."""
    if isinstance(obj, Pattern):
        return obj
    if sp.issparse(obj):
        return _canonical_from_scipy(obj, argname)
    if isinstance(obj, np.ndarray):
        from .builders import _from_dense

        return _from_dense(obj, argname)
    raise TypeError(
        f"{argname} must be a sparseattn Pattern, a scipy sparse matrix/array or a 2-D boolean ndarray, "
        f"got {type(obj).__name__}"
    )
