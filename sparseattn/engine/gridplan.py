"""A neighbourhood's tile plan from its parameters (:func:`sparseattn.neighborhood`), not from its runs.

Tiles of ``T`` consecutive tokens that lie on one line of the grid's last axis share their window on
every other axis (it depends only on those coordinates), so a tile's keys are one run per window
position on the other axes: the line at that position, from the first row's window start to the last
row's window end on the last axis.  Per row, the run on that line is the row's own last-axis window.
Nothing here walks the runs of the pattern or its keys: the plan comes from each row's per-axis
windows (:meth:`~sparseattn.patterns.grids.Neighborhood._axis_windows`) in O(n * runs per row).

Where the runs go depends on their width, as the runs planner decides (``tests/test_extra_spans.py``
measured both): runs of at least :data:`sparseattn.engine.plan.PANEL` keys are spans (the tile's span
and its extra spans: the micro-kernels' products), narrower ones are each row's residual runs (per-row
dot products; a 6-row block of 7-key runs would fill under half of the panels it touches).

Used when the last axis is not dilated and ``T`` divides its length (a tile never crosses a line);
any other neighbourhood goes through its runs.  When the last axis' window is narrow and not causal,
the plan also carries each grid line's key lines (``grid``) for the line kernel of
:mod:`sparseattn.kernels.grid`, which the fused forward runs instead of the residual loops.
"""

from __future__ import annotations

import numpy as np

__all__ = ["neighborhood_fields"]


def _tile_for(T, length):
    """``T``, or the largest of its halves down to 8 that divides ``length``; None when none does."""
    while T >= 8:
        if length % T == 0:
            return T
        T //= 2
    return None


def _line_bases(p, wins, r0):
    """Per tile (first row ``r0``): the first key of each line its rows reach, and which of them exist.

    ``(base, valid)`` of shape ``(n_tiles, prod of the other axes' largest counts)``, in row-major order of
    the window positions; ``valid`` is False past a causal axis' count.
    """
    n_tiles = len(r0)
    base = np.zeros((n_tiles, 1), dtype=np.int64)
    valid = np.ones((n_tiles, 1), dtype=bool)
    for a in range(len(p.grid) - 1):
        first, count = wins[a][0][r0], wins[a][1][r0]
        kmax = int(count.max()) if n_tiles else 0
        i = np.arange(kmax, dtype=np.int64)
        off = (first[:, None] + i[None, :] * p.dilation[a]) * p._strides[a]
        base = (base[:, :, None] + off[:, None, :]).reshape(n_tiles, -1)
        valid = (valid[:, :, None] & (i[None, :] < count[:, None])[:, None, :]).reshape(n_tiles, -1)
    return base, valid


def neighborhood_fields(p, T, panel):
    """``(T, fields)`` of the plan of Neighborhood ``p`` (the keys of :class:`~sparseattn.engine.plan.TilePlan`
    that describe spans and residuals), or None when its tiles would cross the grid's lines.

    ``T``: the tile rows asked for (or the default for the row length); ``panel``: the narrowest run
    that is planned as a span.
    """
    length = p.grid[-1]
    if p.dilation[-1] != 1:
        return None
    T = _tile_for(T, length)
    if T is None:
        return None
    n = p.shape[0]
    n_tiles = n // T
    rows = np.arange(n, dtype=np.int64)
    wins = p._axis_windows(rows)
    first, count = wins[-1]  # the last axis: each row's window on its line
    seg_lo = first.reshape(n_tiles, T)
    seg_hi = (first + count).reshape(n_tiles, T)
    base, valid = _line_bases(p, wins, rows[::T])
    per_tile = valid.sum(axis=1)
    keys = base[valid]  # each tile's lines, in order
    if int(count.min()) < panel:  # narrow runs: every row's runs are its residual
        fields = _residual_fields(n, T, keys, per_tile, seg_lo, seg_hi)
        if not p.causal[-1]:  # every row sees kernel_size[-1] keys of each line: the line kernel applies
            fields["grid"] = _line_fields(length, int(p.kernel_size[-1]), first[:length], keys, per_tile, length // T)
        return T, fields
    first_line = np.cumsum(per_tile) - per_tile
    main = keys[first_line]
    extra = np.ones(len(keys), dtype=bool)
    extra[first_line] = False
    xt = np.repeat(np.arange(n_tiles), per_tile)[extra]
    xb = keys[extra]
    fields = dict(
        tile_k0=main + seg_lo.min(axis=1),
        tile_k1=main + seg_hi.max(axis=1),
        row_lo=(main[:, None] + seg_lo).ravel(),
        row_hi=(main[:, None] + seg_hi).ravel(),
        xs_ptr=np.concatenate(([0], np.cumsum(per_tile - 1))),
        xs_k0=xb + seg_lo.min(axis=1)[xt],
        xs_k1=xb + seg_hi.max(axis=1)[xt],
        xs_lo=(xb[:, None] + seg_lo[xt]).ravel(),
        xs_hi=(xb[:, None] + seg_hi[xt]).ravel(),
        rs_ptr=np.zeros(n + 1, np.int64),
        rs_lo=np.zeros(0, np.int64),
        rs_hi=np.zeros(0, np.int64),
        rs_tile=0,
    )
    return T, fields


def _residual_fields(n, T, keys, per_tile, seg_lo, seg_hi):
    """Every row's runs as its residual: for each row, the run on each line of its tile, in line order."""
    n_tiles = len(per_tile)
    C = int(per_tile[0]) if n_tiles else 0
    if n_tiles and np.all(per_tile == C):  # the same number of lines for every tile: one broadcast
        lines = keys.reshape(n_tiles, 1, C)
        rs_lo = (lines + seg_lo[:, :, None]).ravel()
        rs_hi = (lines + seg_hi[:, :, None]).ravel()
        rs_ptr = np.arange(0, n * C + 1, C, dtype=np.int64)
    else:  # a causal axis before the last: tiles near its start reach fewer lines
        rs_ptr = np.concatenate(([0], np.cumsum(np.repeat(per_tile, T))))
        line, row = _rows_major(per_tile, T)
        tile = np.repeat(np.arange(n_tiles), per_tile)[line]
        rs_lo = keys[line] + seg_lo[tile, row]
        rs_hi = keys[line] + seg_hi[tile, row]
    empty = np.zeros(n_tiles, np.int64)
    z = np.zeros(0, np.int64)
    return dict(tile_k0=empty, tile_k1=empty, row_lo=np.zeros(n, np.int64), row_hi=np.zeros(n, np.int64),
                xs_ptr=np.zeros(n_tiles + 1, np.int64), xs_k0=z, xs_k1=z, xs_lo=z, xs_hi=z,
                rs_ptr=rs_ptr, rs_lo=rs_lo, rs_hi=rs_hi, rs_tile=per_tile * T * 4)  # fmt: skip


def _line_fields(W, kw, sx, keys, per_tile, tiles_per_line):
    """``(W, kw, sx, ln_ptr, ln_base)`` for :mod:`sparseattn.kernels.grid`: each grid line's key lines.

    The tiles of one line of the last axis share their key lines (the windows on the other axes depend
    only on the other coordinates), so a line's are those of its first tile.
    """
    starts = (np.cumsum(per_tile) - per_tile)[::tiles_per_line]
    counts = per_tile[::tiles_per_line]
    ln_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    within = np.arange(int(ln_ptr[-1]), dtype=np.int64) - np.repeat(ln_ptr[:-1], counts)
    ln_base = keys[np.repeat(starts, counts) + within]
    return W, kw, np.ascontiguousarray(sx, dtype=np.int64), ln_ptr, np.ascontiguousarray(ln_base, dtype=np.int64)


def _rows_major(per_tile, T):
    """For each tile, for each of its ``T`` rows, every line of the tile: ``(line index, row in the tile)``."""
    starts = np.cumsum(per_tile) - per_tile
    tile = np.repeat(np.arange(len(per_tile)), per_tile * T)
    within = np.arange(int(np.sum(per_tile * T))) - np.repeat(starts * T, per_tile * T)
    return starts[tile] + within % per_tile[tile], within // per_tile[tile]
