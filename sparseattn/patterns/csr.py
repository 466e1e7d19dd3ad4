"""Canonical CSR arrays: index dtypes, run expansion, and the validation of CSR that users hand in.

Pure functions on NumPy arrays (no :class:`~sparseattn.patterns.base.Pattern`):
every builder emits its rows through these, and every scipy matrix a user
passes goes through :func:`checked_csr` before scipy's compiled routines touch
it.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

__all__ = ["INDEX_MAX", "index_dtype_for", "counts_to_indptr", "ranges_to_indices", "checked_csr"]

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


# -- merging canonical CSR row blocks (the algebra of patterns without runs) --------------------------
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
