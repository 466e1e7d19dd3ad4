"""Union, intersection and transpose of patterns, evaluated lazily per row range."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from .base import CSRPattern, Pattern

__all__ = ["union", "intersection", "transpose", "Union", "Intersection"]


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
        counts = _band_global_counts(self.parts, start, stop)
        return super()._row_counts(start, stop) if counts is None else counts


def _band_global_counts(parts, start, stop):
    """Row counts of one sliding window | global tokens by interval arithmetic, else None.

    A global row is full; an ordinary row ``i`` holds its window plus the global
    columns outside it.  Global column ``g`` lies in the window of the rows
    ``g - m * dilation`` for ``-left <= m * dilation <= right``.
    """
    from .builders import GlobalTokens, SlidingWindow

    bands = [p for p in parts if isinstance(p, SlidingWindow)]
    globs = [p for p in parts if isinstance(p, GlobalTokens)]
    if len(bands) != 1 or len(bands) + len(globs) != len(parts):
        return None
    band = bands[0]
    n_q, n_k = band.shape
    if n_q != n_k:
        return None
    counts = band._row_counts(start, stop).astype(np.int64)
    if not globs:
        return counts
    g = np.unique(np.concatenate([p.indices for p in globs])).astype(np.int64)
    d = band.dilation
    m = np.arange(-(band.left // d), band.right // d + 1, dtype=np.int64)
    if len(g) * len(m) > 1 << 26:
        return None  # very many global tokens: merge the rows instead
    rows = (g[:, None] - m[None, :] * d).ravel()  # rows whose window holds g
    rows = rows[(rows >= start) & (rows < stop)]
    inside = np.bincount(rows - start, minlength=stop - start)
    counts += len(g) - inside
    is_global = np.zeros(stop - start, dtype=bool)
    gi = g[(g >= start) & (g < stop)] - start
    is_global[gi] = True
    counts[is_global] = n_k
    return counts


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
