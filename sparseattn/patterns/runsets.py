"""Rows as runs of keys: ``[start, stop)`` pairs per row, their algebra and their CSR.

A *run set* of ``m`` rows is three int64 arrays ``(ptr, lo, hi)``: the runs of
row ``r`` are ``lo[ptr[r]:ptr[r+1]]`` to ``hi[ptr[r]:ptr[r+1]]``.  Canonical
run sets have, per row, non-empty runs sorted by start, neither overlapping
nor touching (``hi[k] < lo[k + 1]``), so a pattern has exactly one: two run
patterns are equal iff their arrays are.  Everything here is vectorised
NumPy in O(runs) (a merge of sorted lists for :func:`combine`), never
O(nonzeros), except :func:`expand` (which builds the CSR, nnz-sized by
definition) and :func:`filter_csr` / :func:`from_csr` (O(nnz of the CSR they
are given)).
"""

from __future__ import annotations

import numpy as np

__all__ = ["empty", "canonical", "combine", "counts", "expand", "filter_csr", "from_csr", "one_per_row"]

_I64 = np.int64
#: encoded positions ``row * (n_k + 1) + col`` (times 2 for the event kind) must stay below this
_ENC_MAX = 1 << 62


def empty(m):
    """The run set of ``m`` empty rows."""
    return np.zeros(m + 1, _I64), np.zeros(0, _I64), np.zeros(0, _I64)


def one_per_row(lo, hi):
    """At most one run per row: ``[lo[r], hi[r])``, dropped where empty."""
    lo = np.asarray(lo, dtype=_I64)
    hi = np.asarray(hi, dtype=_I64)
    keep = hi > lo
    if keep.all():  # every row has its run (windows, documents, causal): no copies
        return np.arange(len(lo) + 1, dtype=_I64), lo, hi
    ptr = np.zeros(len(lo) + 1, _I64)
    np.cumsum(keep, out=ptr[1:])
    return ptr, lo[keep], hi[keep]


def counts_to_ptr(ptr, keep):
    """The ``ptr`` of a run set after dropping the runs where ``keep`` is False."""
    kept = np.zeros(len(keep) + 1, _I64)
    np.cumsum(keep, out=kept[1:])
    return kept[ptr]


def _row_of(ptr):
    return np.repeat(np.arange(len(ptr) - 1, dtype=_I64), np.diff(ptr))


def canonical(ptr, lo, hi):
    """Drop empty runs and merge touching or overlapping ones (runs must be sorted by start within each row)."""
    ptr = np.asarray(ptr, dtype=_I64)
    lo = np.asarray(lo, dtype=_I64)
    hi = np.asarray(hi, dtype=_I64)
    keep = hi > lo
    row = _row_of(ptr)[keep]
    lo, hi = lo[keep], hi[keep]
    if len(lo) == 0:
        return empty(len(ptr) - 1)
    # a run starts a new merged run unless it begins at or before the running end of its row so far
    width = int(hi.max()) + 1
    end = np.maximum.accumulate(row * width + hi)
    new = np.ones(len(lo), dtype=bool)
    new[1:] = row[1:] * width + lo[1:] > end[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(lo)) - 1
    out_row = row[first]
    out_ptr = np.searchsorted(out_row, np.arange(len(ptr), dtype=_I64), side="left").astype(_I64)
    return out_ptr, lo[first], end[last] - out_row * width


def counts(ptr, lo, hi):
    """Keys per row."""
    cl = np.zeros(len(lo) + 1, _I64)
    np.cumsum(hi - lo, out=cl[1:])
    return cl[ptr[1:]] - cl[ptr[:-1]]


def combine(sets, n_k, need):
    """Rows covered by at least ``need`` of the canonical run ``sets`` (1: union; ``len(sets)``: intersection).

    Each set's starts and stops, encoded as ``row * (n_k + 1) + col``, form a
    sorted list of events; a stable sort merges the lists, a cumulative sum
    counts how many sets cover each stretch, and the stretches covered
    ``need`` times (touching ones merged) are the result.  O(runs) memory,
    O(runs log sets) time.
    """
    m = len(sets[0][0]) - 1
    width = n_k + 1
    if m == 0 or not any(len(s[1]) for s in sets):
        return empty(m)
    if need == len(sets) and all(len(s[1]) == m for s in sets) and all(_one_each(s[0]) for s in sets):
        # an intersection of one run per row each (windows, documents, causal): elementwise, O(rows)
        lo, hi = sets[0][1].copy(), sets[0][2].copy()
        for s in sets[1:]:
            np.maximum(lo, s[1], out=lo)
            np.minimum(hi, s[2], out=hi)
        return one_per_row(lo, hi)
    if 2 * m * width >= _ENC_MAX:  # too wide to encode: halve the rows
        half = m // 2
        a = combine([_slice(s, 0, half) for s in sets], n_k, need)
        b = combine([_slice(s, half, m) for s in sets], n_k, need)
        return _concat(a, b)
    events = []
    for ptr, lo, hi in sets:
        base = _row_of(ptr) * width
        ev = np.empty(2 * len(lo), _I64)
        ev[0::2] = (base + lo) * 2 + 1  # a start (odd) sorts after a stop (even) at the same position
        ev[1::2] = (base + hi) * 2
        events.append(ev)
    ev = np.concatenate(events)
    ev.sort(kind="stable")  # sorted lists: a linear merge
    depth = np.cumsum(np.where(ev & 1, 1, -1))
    pos = ev >> 1
    seg = np.flatnonzero((depth[:-1] >= need) & (pos[1:] > pos[:-1]))
    a, b = pos[seg], pos[seg + 1]
    row = a // width
    ptr = np.searchsorted(row, np.arange(m + 1, dtype=_I64), side="left").astype(_I64)
    return canonical(ptr, a - row * width, b - row * width)


def _one_each(ptr):
    """True when ``ptr`` gives every row exactly one run (``ptr == arange``)."""
    return ptr[-1] == len(ptr) - 1 and bool(np.all(ptr[1:] != ptr[:-1]))  # non-decreasing, m steps, none 0


def _slice(s, a, b):
    ptr, lo, hi = s
    return ptr[a : b + 1] - ptr[a], lo[ptr[a] : ptr[b]], hi[ptr[a] : ptr[b]]


def _concat(a, b):
    return (np.concatenate((a[0], b[0][1:] + a[0][-1])), np.concatenate((a[1], b[1])), np.concatenate((a[2], b[2])))


def expand(ptr, lo, hi, dtype=np.int64):
    """The CSR ``(indptr, indices)`` of a canonical run set, vectorised (a fill and a cumulative sum).

    ``indices`` has ``dtype``; ``indptr`` is int64.
    """
    lens = hi - lo
    cl = np.zeros(len(lo) + 1, _I64)
    np.cumsum(lens, out=cl[1:])
    indptr = cl[ptr]
    total = int(cl[-1])
    idx = np.ones(total, dtype=dtype)
    if total:
        # each run's first index minus the previous run's last one; inside a run every step is 1
        step = lo.copy()
        step[1:] -= hi[:-1] - 1
        idx[cl[:-1]] = step
        np.cumsum(idx, out=idx)
    return indptr, idx


def filter_csr(indptr, indices, runs, n_k):
    """The entries of CSR rows ``(indptr, indices)`` that lie inside the same rows' runs (an intersection).

    O(nnz log runs): each entry's position is looked up among the runs' starts;
    the run operand is never expanded.
    """
    ptr, lo, hi = runs
    m = len(indptr) - 1
    width = n_k + 1
    if 2 * m * width >= _ENC_MAX:
        raise OverflowError(f"a {m} x {n_k} run intersection is too large to encode in int64")
    if len(lo) == 0:
        return np.zeros(m + 1, _I64), np.asarray(indices)[:0]
    base = _row_of(ptr) * width
    starts, stops = base + lo, base + hi
    e = np.repeat(np.arange(m, dtype=_I64), np.diff(indptr)) * width + indices
    k = np.searchsorted(starts, e, side="right") - 1
    inside = (k >= 0) & (e < stops[np.maximum(k, 0)])
    kept = np.zeros(len(e) + 1, _I64)
    np.cumsum(inside, out=kept[1:])
    return kept[indptr], np.asarray(indices)[inside]


def from_csr(indptr, indices):
    """The canonical run set of canonical CSR rows (maximal runs of consecutive columns)."""
    indptr = np.asarray(indptr, dtype=_I64)
    indices = np.asarray(indices, dtype=_I64)
    nnz = len(indices)
    if nnz == 0:
        return empty(len(indptr) - 1)
    brk = np.ones(nnz, dtype=bool)
    brk[1:] = indices[1:] != indices[:-1] + 1
    brk[indptr[:-1][indptr[:-1] < nnz]] = True  # every row starts a run
    first = np.flatnonzero(brk)
    last = np.append(first[1:], nnz) - 1
    ptr = np.searchsorted(first, indptr, side="left").astype(_I64)
    return ptr, indices[first], indices[last] + 1
