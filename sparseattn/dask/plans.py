"""The work list of every query block, planned at graph-build time.

A plan says, for the query rows ``[a, b)`` of one block, which key slices it
reads, whether it uses the shared block of global keys, the spec its block
task runs, and its split rows with their key blocks.  Two kinds:

* :class:`WindowPlan`, for a union of dilation-1 windows without an offset
  and global tokens, planned from the pattern's parameters alone (never
  ``pattern.rows``);
* :class:`CSRPlan`, for any other pattern (a window with an offset among
  them: decode and chunked prefill are short query blocks, whose rows are
  cheap), from ``pattern.rows(a, b)`` of each query block (never the whole CSR).
"""

from __future__ import annotations

import numpy as np

from ..patterns.base import Union
from ..patterns.builders import GlobalTokens
from ..patterns.windows import SlidingWindow

#: generic path: a row is split over key blocks when longer than max(LONG_MIN, LONG_FACTOR * median row)
LONG_MIN = 2048
LONG_FACTOR = 8


def block_bounds(chunks):
    """The edges ``[0, c0, c0 + c1, ...]`` (int64) of the blocks of a sequence axis chunked ``chunks``."""
    return np.concatenate(([0], np.cumsum(chunks))).astype(np.int64)


def plan_patterns(patterns, n_k, kb, contiguous=False):
    """One plan per distinct pattern (``kb``: the key blocks' edges): a :class:`WindowPlan` where it can be one.

    ``contiguous`` (ALiBi, ``score_mod``): the generic path reads key slices only, no gathers (see :class:`CSRPlan`).
    """
    plans = []
    for p in patterns:
        st = _structure(p)
        plans.append(WindowPlan(*st, n_k, kb) if st is not None else CSRPlan(p, kb, contiguous))
    return plans


def _structure(p):
    """``(left, right, globals)`` for a union of dilation-1, offset-0 windows and global tokens, else None."""
    parts = p.parts if isinstance(p, Union) else (p,)
    left = right = None
    g = []
    for part in parts:
        if isinstance(part, SlidingWindow) and part.dilation == 1 and part.offset == 0:
            left = part.left if left is None else max(left, part.left)
            right = part.right if right is None else max(right, part.right)
        elif isinstance(part, GlobalTokens):
            g.append(part.indices)
        else:
            return None
    glob = np.unique(np.concatenate(g)).astype(np.int64) if g else np.zeros(0, dtype=np.int64)
    return left, right, glob


def _ranges(bounds, lo, hi):
    """``[(j, local_lo, local_hi)]`` of the blocks (with edges ``bounds``) overlapping ``[lo, hi)``."""
    if hi <= lo:
        return []
    j0 = int(np.searchsorted(bounds, lo, side="right")) - 1
    j1 = int(np.searchsorted(bounds, hi, side="left"))
    return [(j, int(max(lo, bounds[j]) - bounds[j]), int(min(hi, bounds[j + 1]) - bounds[j])) for j in range(j0, j1)]


class WindowPlan:
    """Work lists of a band (+ global tokens) pattern, from its parameters."""

    kind = "window"

    def __init__(self, left, right, glob, n_k, kb):
        self.left, self.right, self.glob, self.n_k, self.kb = left, right, glob, n_k, kb

    def block(self, a, b, from_a=False):
        """``(slices, shared, spec, long_rows, long_csr)`` for query rows ``[a, b)``.

        ``from_a``: only the keys from ``a`` on (no left halo; the rows
        ``[a, a + left)`` then miss keys and are computed by another task).
        """
        glob, n_k = self.glob, self.n_k
        slices, shift, gpos = [], 0, np.zeros(0, dtype=np.int64)
        if self.left is not None:
            kl = min(a if from_a else max(a - self.left, 0), n_k)
            kh = min(b + self.right, n_k)
            slices = _ranges(self.kb, kl, kh)
            shift = a - kl
            gpos = glob[(glob >= kl) & (glob < kh)] - kl
        long_rows = glob[(glob >= a) & (glob < b)]
        long_blocks = [(j, None) for j in range(len(self.kb) - 1)] if len(long_rows) else []
        spec = (self.left or 0, self.right or 0, shift, gpos, long_rows - a)
        return slices, len(glob) > 0, spec, long_rows, long_blocks

    def shared_sources(self):
        """``[(j, local_cols)]``: where the global keys live."""
        glob, kb = self.glob, self.kb
        blk = np.searchsorted(kb, glob, side="right") - 1
        return [(int(j), glob[blk == j] - kb[j]) for j in np.unique(blk)]


class CSRPlan:
    """Work lists of any pattern, from ``pattern.rows(a, b)`` of each query block.

    The keys of a key block are a slice (the columns' span) when dense, else
    a gather.  With ``contiguous`` (ALiBi, ``score_mod``) always a slice: the
    block task then holds runs of contiguous key positions, and runs one
    engine call per run at that run's position (a gather's scattered keys
    have no single ALiBi offset, nor one key position for the user's
    function).  The cost: up to a whole key block read where a gather would
    have taken a few columns.
    """

    kind = "csr"

    def __init__(self, pattern, kb, contiguous=False):
        self.pattern, self.kb, self.contiguous = pattern, kb, contiguous

    def block(self, a, b):
        m = self.pattern.rows(a, b)
        indptr, indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)
        counts = np.diff(indptr)
        kb = self.kb
        long_local = np.zeros(0, dtype=np.int64)
        if len(counts) and len(kb) > 2:
            thr = max(LONG_MIN, LONG_FACTOR * float(np.median(counts)))
            long_local = np.flatnonzero(counts > thr)
        row_long = np.zeros(len(counts), dtype=bool)
        row_long[long_local] = True
        nz_long = np.repeat(row_long, counts)
        cols = np.unique(indices[~nz_long])
        blk = np.searchsorted(kb, cols, side="right") - 1
        slices, gathers = [], []
        for j in np.unique(blk):
            c = cols[blk == j] - kb[j]
            if self.contiguous or c[-1] - c[0] + 1 <= 2 * len(c):
                slices.append((int(j), int(c[0]), int(c[-1]) + 1))
            else:
                gathers.append((int(j), c))
        # the key columns the block task will hold, in the order it concatenates them
        pieces = sorted([(j, lo, hi, None) for j, lo, hi in slices] + [(j, None, None, c) for j, c in gathers], key=lambda t: t[0])
        held = [kb[j] + (np.arange(lo, hi) if c is None else c) for j, lo, hi, c in pieces]
        held = np.concatenate(held).astype(np.int64) if held else np.zeros(0, dtype=np.int64)
        long_blocks = []
        if len(long_local):
            lp = indptr[long_local]
            lc = counts[long_local]
            rows_of = np.repeat(np.arange(len(long_local)), lc)
            idx = indices[np.repeat(lp, lc) + (np.arange(int(lc.sum())) - np.repeat(np.cumsum(lc) - lc, lc))]
            lblk = np.searchsorted(kb, idx, side="right") - 1
            for j in np.unique(lblk):
                sel = lblk == j
                ptr = np.concatenate(([0], np.cumsum(np.bincount(rows_of[sel], minlength=len(long_local)))))
                long_blocks.append((int(j), (ptr, idx[sel] - kb[j])))
        spec = (self.pattern, a, b, held, long_local)
        return pieces, False, spec, long_local + a, long_blocks
