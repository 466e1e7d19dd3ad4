"""Union, intersection and transpose of patterns, evaluated lazily per row range."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from .base import CSRPattern, Pattern, _keys_to_csr, _row_keys

__all__ = ["union", "intersection", "transpose", "Union", "Intersection"]


def _same_shape(op, a, b):
    if a.shape != b.shape:
        raise ValueError(f"pattern {op}: shapes differ, left is {a.shape} and right is {b.shape}")


def _merge_sorted(arrays):
    """Merge already-sorted key arrays (each part's keys are row-major, hence sorted).

    A stable sort (timsort on integers) merges the sorted runs in linear time.
    """
    return np.sort(np.concatenate(arrays), kind="stable")


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
        n_k = self.shape[1]
        keys = _merge_sorted([_row_keys(*p._rows(start, stop), n_k) for p in self.parts])
        if len(keys) > 1:
            keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        return _keys_to_csr(keys, stop - start, n_k)


class Intersection(_Combine):
    """Entries allowed by every part."""

    name = "intersection"
    symbol = "&"

    def _rows(self, start, stop):
        n_k = self.shape[1]
        keys = _row_keys(*self.parts[0]._rows(start, stop), n_k)
        for p in self.parts[1:]:
            both = _merge_sorted([keys, _row_keys(*p._rows(start, stop), n_k)])
            keys = both[:-1][both[1:] == both[:-1]]
        return _keys_to_csr(keys, stop - start, n_k)


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
