"""Compile a pattern into a tile plan for the fused kernel.

A :class:`TilePlan` cuts the query rows into tiles of ``T`` rows and, for
each tile, splits the allowed keys into three kinds of work:

``span``
    One contiguous key range ``[tile_k0, tile_k1)`` per tile, evaluated as
    dense products.  Each row uses only its own run ``[row_lo, row_hi)`` inside
    the span, so a band is masked only at the span's edges (a band becomes
    exactly one span per tile).
``shared``
    A short list of scattered key columns per tile (global keys, dense
    leftovers) gathered into a small dense block, with a per-(column, row)
    membership byte.
``residual``
    Whatever is left, per row (random patterns, stray entries), evaluated
    with per-row dot products.

Rows that are much longer than the others (global tokens' full rows) are
taken out of the tiles: they are ``long`` rows, grouped (consecutive long rows
with identical columns share one GEMM), cut into column chunks that the
threads share, and merged with the log-sum-exp formula.

Every nonzero of the pattern is covered by exactly one of these (checked in
``tests/test_plan.py``).  Building a plan never makes an ``n x n`` anything:
sliding windows (dilation 1, any offset), global tokens and unions of them
are planned from their parameters in O(n), neighbourhoods from their grid in
O(n * runs per row) (:mod:`sparseattn.engine.gridplan`); other run patterns (causal,
documents, prefix-LM, neighbourhoods, their unions and intersections: see
:mod:`sparseattn.patterns.runsets`) from their runs in O(n * runs per row),
never building their CSR; any other pattern from the maximal runs of its CSR
in O(nnz).
Plans are cached by the pattern's identity (:func:`get_plan`).

Examples
--------
>>> import sparseattn as sa
>>> from sparseattn.engine.plan import build_plan
>>> plan = build_plan(sa.longformer(256, attention_window=64, global_indices=[0]))
>>> plan.kind, plan.tile_rows, plan.n_tiles, plan.long_rows.tolist()
('structured', 32, 8, [0])
>>> int(plan.tile_k0[1]), int(plan.tile_k1[1])  # rows 32..63 see keys 0..95
(0, 96)
>>> plan.n_entries() == plan.nnz
True
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from ..patterns import runsets
from ..patterns.base import Pattern, Union
from ..patterns.builders import GlobalTokens
from ..patterns.grids import Neighborhood
from ..patterns.windows import SlidingWindow
from .planrows import long_items, longest_runs, tile_quartile

__all__ = ["TilePlan", "build_plan", "get_plan", "clear_plan_cache", "plan_cache_info"]

#: keys per dense chunk (span chunks and long-row chunks)
CHUNK = 1024
#: a row is "long" when it has more than max(LONG_MIN, LONG_FACTOR * median count) entries
LONG_MIN = 2048
LONG_FACTOR = 8
#: shortest contiguous run that the generic planner puts into a span
MIN_RUN = 8
#: a span is kept only when the rows' runs fill at least this fraction of it
MIN_SPAN_FILL = 0.5
#: keys per micro-kernel panel assumed by the extra spans' fill rule (narrow runs waste most of a panel)
PANEL = 16
#: number of cached plans
CACHE_SIZE = 8


def _tile_rows_for(width):
    """Rows per tile for rows of about ``width`` keys: wide rows amortise bigger tiles."""
    if width >= 160:
        return 64
    if width >= 48:
        return 32
    return 16


class TilePlan:
    """The compiled work list of one pattern (see the module docstring).

    Attributes
    ----------
    shape : tuple of int
        ``(n_q, n_k)`` of the pattern.
    nnz : int
        The number of (row, col) pairs the plan computes (the pattern's nonzero count).
    tile_rows : int
        ``T``, rows per tile; tile ``t`` holds rows ``[t*T, min(n_q, (t+1)*T))``.
    chunk : int
        Keys per dense chunk.
    tile_k0, tile_k1 : int64 ndarray, shape (n_tiles,)
        Each tile's key span (empty when equal).
    row_lo, row_hi : int64 ndarray, shape (n_q,)
        Each row's run inside its tile's span.
    xs_ptr, xs_k0, xs_k1, xs_lo, xs_hi
        Extra spans: tile ``t`` also has the spans ``x`` in ``xs_ptr[t]:xs_ptr[t+1]``, keys
        ``[xs_k0[x], xs_k1[x])``, row ``r`` of the tile running over ``[xs_lo[x*T + r], xs_hi[x*T + r])``
        (one span per kernel row of a neighbourhood, the second document of a tile across a boundary).
    sh_ptr, sh_cols, sh_mask
        Shared columns of tile ``t``: ``sh_cols[sh_ptr[t]:sh_ptr[t+1]]``; row
        ``r`` of the tile uses column ``c`` iff ``sh_mask[c*T + r]`` (global
        position ``c``).
    rs_ptr, rs_lo, rs_hi
        Per-row residual runs: row ``i`` also has the keys ``[rs_lo[e], rs_hi[e])`` for ``e`` in
        ``rs_ptr[i]:rs_ptr[i+1]`` (O(runs), never one index per key).
    tile_cost : int64 ndarray
        Estimated work per tile (for splitting tiles across threads).
    long_rows, grp_ptr : int64 ndarray
        Long rows, grouped: group ``g`` is ``long_rows[grp_ptr[g]:grp_ptr[g+1]]``.
    it_grp, it_a, it_b, it_off, grp_it_ptr : int64 ndarray
        Long-row work items: group ``it_grp[i]`` over keys ``[it_a[i], it_b[i])``;
        items of group ``g`` are ``grp_it_ptr[g]:grp_it_ptr[g+1]``; partial row
        ``rr`` of item ``i`` lives at ``it_off[i] + rr``.
    max_span : int
        The most keys one tile's spans hold together (its span and its extra spans): what a thread's panel
        cache holds so that a tile never evicts its own panels.
    kind : str
        ``"structured"`` (planned from a band's and global tokens' parameters, or from a neighbourhood's
        grid), ``"runs"`` (from the
        pattern's runs) or ``"generic"`` (from the maximal runs of its CSR).
    grid : tuple or None
        ``(W, kw, sx, ln_ptr, ln_base)`` of a neighbourhood with a narrow, non-causal last-axis window
        (:func:`sparseattn.engine.gridplan.neighborhood_fields`): the forward's line kernel
        (:mod:`sparseattn.kernels.grid`) runs it instead of the residual runs; None otherwise.
    """

    grid = None

    def __init__(self, **fields):
        for name, value in fields.items():
            for a in value if isinstance(value, tuple) else (value,):
                if isinstance(a, np.ndarray):
                    a.setflags(write=False)
            setattr(self, name, value)
        self.n_tiles = len(self.tile_k0)
        cost = self.tile_cost.astype(np.int64)
        self.cost_prefix = np.concatenate(([0], np.cumsum(cost)))
        self.n_part_rows = int(self.it_off[-1] + self._item_rows()[-1]) if len(self.it_off) else 0
        spans = self.tile_k1 - self.tile_k0 + _extra_keys(self.xs_ptr, self.xs_k0, self.xs_k1)
        self.max_span = int(spans.max()) if self.n_tiles else 0
        long_nnz = int(np.sum((self.it_b - self.it_a) * self._item_rows())) if len(self.it_off) else 0
        self.nnz = (
            int(np.sum(self.row_hi - self.row_lo))
            + int(np.sum(self.xs_hi - self.xs_lo))
            + int(np.count_nonzero(self.sh_mask))
            + int(np.sum(self.rs_hi - self.rs_lo))
            + long_nnz
        )

    def _item_rows(self):
        return (self.grp_ptr[1:] - self.grp_ptr[:-1])[self.it_grp]

    @property
    def nbytes(self):
        """Bytes held by the plan's arrays."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def entries(self):
        """All ``(row, col)`` pairs the plan computes, with multiplicity (for tests).

        Returns two int64 arrays; a correct plan lists every nonzero of its
        pattern exactly once.
        """
        n_q = self.shape[0]
        T = self.tile_rows
        rows, cols = [], []
        # spans
        t_of = np.arange(n_q) // T
        lo = np.maximum(self.row_lo, self.tile_k0[t_of]) if n_q else self.row_lo
        hi = np.minimum(self.row_hi, self.tile_k1[t_of]) if n_q else self.row_hi
        cnt = np.maximum(hi - lo, 0)
        rows.append(np.repeat(np.arange(n_q), cnt))
        starts = np.repeat(lo, cnt)
        offs = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cols.append(starts + offs)
        # extra spans
        x_of = np.repeat(np.arange(len(self.xs_k0)), T)
        tile_of = np.repeat(np.arange(self.n_tiles), np.diff(self.xs_ptr))
        row = np.repeat(tile_of, T) * T + np.tile(np.arange(T), len(self.xs_k0))
        xcnt = np.maximum(np.minimum(self.xs_hi, self.xs_k1[x_of]) - np.maximum(self.xs_lo, self.xs_k0[x_of]), 0)
        xcnt = np.where(self.xs_hi > self.xs_lo, xcnt, 0)
        rows.append(np.repeat(row, xcnt))
        cols.append(np.repeat(self.xs_lo, xcnt) + np.arange(int(xcnt.sum())) - np.repeat(np.cumsum(xcnt) - xcnt, xcnt))
        # shared
        for t in range(self.n_tiles):
            for c in range(self.sh_ptr[t], self.sh_ptr[t + 1]):
                rr = np.flatnonzero(self.sh_mask[c * T : (c + 1) * T])
                rows.append(t * T + rr)
                cols.append(np.full(len(rr), self.sh_cols[c]))
        # residual
        rw = self.rs_hi - self.rs_lo
        rows.append(np.repeat(np.repeat(np.arange(n_q), np.diff(self.rs_ptr)), rw))
        cols.append(np.repeat(self.rs_lo, rw) + np.arange(int(rw.sum())) - np.repeat(np.cumsum(rw) - rw, rw))
        # long rows
        for it in range(len(self.it_grp)):
            g = self.it_grp[it]
            for r in self.long_rows[self.grp_ptr[g] : self.grp_ptr[g + 1]]:
                rows.append(np.full(self.it_b[it] - self.it_a[it], r))
                cols.append(np.arange(self.it_a[it], self.it_b[it]))
        return (
            np.concatenate(rows).astype(np.int64),
            np.concatenate(cols).astype(np.int64),
        )

    def n_entries(self):
        """Number of (row, col) pairs the plan computes (equals ``nnz`` for a correct plan)."""
        return len(self.entries()[0])

    def __repr__(self):
        return (
            f"<TilePlan {self.kind} shape={self.shape} T={self.tile_rows} tiles={self.n_tiles} "
            f"extra={len(self.xs_k0)} shared={len(self.sh_cols)} residual={int(np.sum(self.rs_hi - self.rs_lo))} in {len(self.rs_lo)} runs long_rows={len(self.long_rows)} "
            f"items={len(self.it_grp)} {self.nbytes / 2**20:.1f} MiB>"
        )


# -- numba helpers (imported lazily: building plans needs numba) ------------------
class _Helpers:
    def __getattr__(self, name):
        from ..kernels import planning

        return getattr(planning, "plan_" + name)


def _helpers():
    return _Helpers()


def _span_of_tiles(lo, hi, T, n_k):
    """Per-tile [min lo, max hi) over the rows with a non-empty run."""
    n_q = len(lo)
    n_tiles = -(-n_q // T)
    nonempty = hi > lo
    lo_m = np.where(nonempty, lo, n_k)
    hi_m = np.where(nonempty, hi, 0)
    starts = np.arange(0, n_q, T)
    k0 = np.minimum.reduceat(lo_m, starts) if n_q else np.zeros(0, np.int64)
    k1 = np.maximum.reduceat(hi_m, starts) if n_q else np.zeros(0, np.int64)
    empty = k1 <= k0
    k0 = np.where(empty, 0, k0).astype(np.int64)
    k1 = np.where(empty, 0, k1).astype(np.int64)
    assert len(k0) == n_tiles
    return k0, k1


def _extra_keys(xs_ptr, xs_k0, xs_k1):
    """Per tile, the keys of its extra spans together."""
    widths = np.concatenate(([0], np.cumsum(xs_k1 - xs_k0)))
    return widths[xs_ptr[1:]] - widths[xs_ptr[:-1]]


def _tile_cost(n_q, T, k0, k1, sh_ptr, rs_tile, xs=None):
    """Work estimate per tile for balancing threads: span and shared keys per row, residuals, overhead."""
    rows_per_tile = np.diff(np.append(np.arange(0, n_q, T), n_q))
    extra = 0
    if xs is not None and len(xs["xs_k0"]):
        extra = _extra_keys(xs["xs_ptr"], xs["xs_k0"], xs["xs_k1"]) + 16 * np.diff(xs["xs_ptr"])
    return rows_per_tile * ((k1 - k0) + extra + np.diff(sh_ptr)) + 4 * rs_tile + 64


def _no_extra_spans(n_tiles):
    z = np.zeros(0, np.int64)
    return {"xs_ptr": np.zeros(n_tiles + 1, np.int64), "xs_k0": z, "xs_k1": z, "xs_lo": z, "xs_hi": z}


def _structure(p):
    """(band or None, sorted global indices) when ``p`` is a union of one plain band and global tokens."""
    parts = p.parts if isinstance(p, Union) else (p,)
    band, glob = None, []
    for part in parts:
        if type(part) is SlidingWindow and part.dilation == 1 and band is None:
            band = part
        elif type(part) is GlobalTokens:
            glob.append(part.indices)
        else:
            return None
    g = np.unique(np.concatenate(glob)) if glob else np.zeros(0, np.int64)
    return band, g.astype(np.int64)


def _structured_plan(p, band, g, T, chunk):
    n_q, n_k = p.shape
    i = np.arange(n_q, dtype=np.int64)
    if band is not None:
        c = i + band.offset  # each query's key position
        lo = np.clip(c - band.left, 0, n_k)
        hi = np.clip(c + band.right + 1, lo, n_k)
        width = band.left + band.right + 1
    else:
        lo = np.zeros(n_q, np.int64)
        hi = np.zeros(n_q, np.int64)
        width = len(g)
    if T is None:
        T = _tile_rows_for(min(width, n_k))
    is_long = np.zeros(n_q, dtype=bool)
    is_long[g] = True
    lo[is_long] = 0
    hi[is_long] = 0
    k0, k1 = _span_of_tiles(lo, hi, T, n_k)
    sh_ptr, sh_cols, sh_mask = _helpers().shared_globals(lo, hi, is_long, g, T)
    full = (np.zeros(1, np.int64), np.full(1, n_k, np.int64))
    longs = long_items(g, [full] * len(g), T, chunk)
    cost = _tile_cost(n_q, T, k0, k1, sh_ptr, 0)
    return dict(
        kind="structured",
        tile_rows=T,
        tile_k0=k0,
        tile_k1=k1,
        row_lo=lo,
        row_hi=hi,
        sh_ptr=sh_ptr,
        sh_cols=sh_cols,
        sh_mask=sh_mask,
        rs_ptr=np.zeros(n_q + 1, np.int64),
        rs_lo=np.zeros(0, np.int64),
        rs_hi=np.zeros(0, np.int64),
        tile_cost=cost.astype(np.int64),
        **_no_extra_spans(len(k0)),
        **longs,
    )


def _runs_plan(p, runs, T, chunk, long_min, kind):
    """The plan of any pattern from its runs (a run pattern's own, or a CSR's maximal runs): O(rows + runs).

    Each row's longest run (at least :data:`MIN_RUN` keys) is its span; a tile keeps its span when the runs
    fill at least :data:`MIN_SPAN_FILL` of it; the other runs' keys become shared columns or residuals.
    """
    n_q, n_k = p.shape
    ptr, run_lo, run_hi = runs
    counts = _helpers().row_counts(ptr, run_lo, run_hi)
    med = float(np.median(counts)) if n_q else 0.0
    if T is None:
        T = _tile_rows_for(max(int(med), 1))
    is_long = (counts > max(long_min, LONG_FACTOR * med)) & (counts > LONG_FACTOR * tile_quartile(counts, T))
    lo, hi = longest_runs(ptr, run_lo, run_hi, is_long, MIN_RUN)
    # a tile's span: the hull of its rows' runs, or of the best cluster of them, when they fill enough of it
    k0, k1 = _helpers().tile_spans(lo, hi, is_long, T, MIN_SPAN_FILL)
    # the runs outside the spans: extra spans where they cluster, else shared columns or residuals
    *xs, in_span = _helpers().extra_spans(ptr, run_lo, run_hi, is_long, lo, hi, T, MIN_SPAN_FILL, MIN_RUN, PANEL)
    xs = dict(zip(("xs_ptr", "xs_k0", "xs_k1", "xs_lo", "xs_hi"), xs))
    sh_ptr, sh_cols, sh_mask, rs_ptr, rs_lo, rs_hi, rs_tile = _helpers().leftovers(
        ptr, run_lo, run_hi, is_long, in_span, T, n_k
    )
    long_rows = np.flatnonzero(is_long)
    row_runs = [(run_lo[ptr[r] : ptr[r + 1]], run_hi[ptr[r] : ptr[r + 1]]) for r in long_rows]
    longs = long_items(long_rows, row_runs, T, chunk)
    cost = _tile_cost(n_q, T, k0, k1, sh_ptr, rs_tile, xs)
    return dict(
        kind=kind,
        tile_rows=T,
        tile_k0=k0.astype(np.int64),
        tile_k1=k1.astype(np.int64),
        row_lo=lo,
        row_hi=hi,
        sh_ptr=sh_ptr,
        sh_cols=sh_cols,
        sh_mask=sh_mask,
        rs_ptr=rs_ptr,
        rs_lo=rs_lo,
        rs_hi=rs_hi,
        tile_cost=cost.astype(np.int64),
        **xs,
        **longs,
    )


def _neighborhood_plan(p, T, chunk):
    """A neighbourhood planned from its grid (:mod:`sparseattn.engine.gridplan`), or None where that does not apply."""
    from .gridplan import neighborhood_fields

    got = neighborhood_fields(p, T or _tile_rows_for(int(np.prod(p.kernel_size))), PANEL)
    if got is None:
        return None
    T, f = got
    n_q = p.shape[0]
    rs_tile = f.pop("rs_tile")
    grid = f.pop("grid", None)
    sh_ptr = np.zeros(len(f["tile_k0"]) + 1, np.int64)
    xs = {key: f[key] for key in ("xs_ptr", "xs_k0", "xs_k1", "xs_lo", "xs_hi")}
    cost = _tile_cost(n_q, T, f["tile_k0"], f["tile_k1"], sh_ptr, rs_tile, xs)
    longs = long_items(np.zeros(0, np.int64), [], T, chunk)
    z = np.zeros(0, np.int64)
    return dict(kind="structured", tile_rows=T, sh_ptr=sh_ptr, sh_cols=z, sh_mask=np.zeros(0, np.uint8),
                tile_cost=cost.astype(np.int64), grid=grid, **f, **longs)  # fmt: skip


def _generic_plan(p, T, chunk, long_min):
    csr = p.csr
    runs = runsets.from_csr(csr.indptr, csr.indices)
    return _runs_plan(p, runs, T, chunk, long_min, "generic")


def build_plan(pattern, *, tile_rows=None, chunk=None, long_min=None, generic=False):
    """Compile ``pattern`` into a :class:`TilePlan` (uncached; see :func:`get_plan`).

    Parameters
    ----------
    pattern : Pattern
        The pattern to plan.
    tile_rows : int, optional
        Rows per tile; chosen from the typical row length when omitted.
    chunk : int, optional
        Keys per dense chunk (spans and long rows are cut to this);
        defaults to :data:`CHUNK`.
    long_min : int, optional
        Defaults to :data:`LONG_MIN`.  Rows longer than ``max(long_min, 8 * median row length)`` are long
        rows (generic planner; the structured planner makes global tokens'
        rows long).
    generic : bool
        Force the CSR-based planner even when the pattern's structure or runs are known.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparseattn Pattern, got {type(pattern).__name__}")
    if tile_rows is not None and (not isinstance(tile_rows, int) or tile_rows < 1):
        raise ValueError(f"tile_rows must be a positive int, got {tile_rows!r}")
    chunk = CHUNK if chunk is None else chunk
    long_min = LONG_MIN if long_min is None else long_min
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    struct = None if generic else _structure(pattern)
    fields = None
    if struct is not None:
        fields = _structured_plan(pattern, struct[0], struct[1], tile_rows, chunk)
    elif not generic and type(pattern) is Neighborhood:
        fields = _neighborhood_plan(pattern, tile_rows, chunk)  # None where its tiles would cross grid lines
    if fields is None:
        if not generic and pattern.has_runs:
            runs = pattern.row_runs(0, pattern.shape[0])
            fields = _runs_plan(pattern, runs, tile_rows, chunk, long_min, "runs")
        else:
            fields = _generic_plan(pattern, tile_rows, chunk, long_min)
    return TilePlan(shape=pattern.shape, chunk=chunk, **fields)


_cache = OrderedDict()
_cache_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


def get_plan(pattern):
    """The cached :class:`TilePlan` of ``pattern`` (LRU of :data:`CACHE_SIZE` plans, keyed by identity)."""
    key = pattern.identity
    with _cache_lock:
        plan = _cache.get(key)
        if plan is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return plan
    plan = build_plan(pattern)
    with _cache_lock:
        _stats["misses"] += 1
        _cache[key] = plan
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return plan


def clear_plan_cache():
    """Forget every cached plan."""
    with _cache_lock:
        _cache.clear()
        _stats["hits"] = _stats["misses"] = 0


def plan_cache_info():
    """``{"hits", "misses", "size", "maxsize"}`` of the plan cache."""
    with _cache_lock:
        return dict(_stats, size=len(_cache), maxsize=CACHE_SIZE)
