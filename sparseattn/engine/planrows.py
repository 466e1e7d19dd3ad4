"""Row-level parts of the planner (:mod:`sparseattn.engine.plan`): long rows, each row's longest run."""

from __future__ import annotations

import numpy as np

__all__ = ["long_items", "longest_runs", "tile_quartile"]


def long_items(long_rows, row_runs, T, chunk):
    """Group long rows (consecutive, identical runs, at most T per group) and cut their runs into items.

    ``row_runs[i]`` is the (starts, stops) pair of long row ``long_rows[i]``.
    """
    grp_ptr = [0]
    grp_runs = []
    for i in range(len(long_rows)):
        runs = row_runs[i]
        if (
            grp_runs
            and i - grp_ptr[-1] < T
            and np.array_equal(grp_runs[-1][0], runs[0])
            and np.array_equal(grp_runs[-1][1], runs[1])
        ):
            continue  # joins the current group
        if grp_runs:
            grp_ptr.append(i)
        grp_runs.append(runs)
    if len(long_rows):
        grp_ptr.append(len(long_rows))
    it_grp, it_a, it_b, grp_it_ptr = [], [], [], [0]
    for g, (starts, stops) in enumerate(grp_runs):
        for a, b in zip(starts.tolist(), stops.tolist()):
            n = b - a
            pieces = max(1, -(-n // chunk))
            step = -(-n // pieces)
            for x in range(a, b, step):
                it_grp.append(g)
                it_a.append(x)
                it_b.append(min(b, x + step))
        grp_it_ptr.append(len(it_grp))
    i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    grp_ptr = i64(grp_ptr)
    it_grp = i64(it_grp)
    sizes = (grp_ptr[1:] - grp_ptr[:-1])[it_grp] if len(it_grp) else i64([])
    it_off = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64) if len(it_grp) else i64([])
    return dict(
        long_rows=i64(long_rows),
        grp_ptr=grp_ptr if len(long_rows) else i64([0]),
        grp_it_ptr=i64(grp_it_ptr),
        it_grp=it_grp,
        it_a=i64(it_a),
        it_b=i64(it_b),
        it_off=it_off,
    )


def longest_runs(ptr, run_lo, run_hi, is_long, min_run):
    """Each row's longest run ``[lo, hi)`` (the first of equal ones; empty if shorter than ``min_run`` or long).

    One Numba pass over the runs (:func:`sparseattn.kernels.planning.plan_longest_runs`).
    """
    from ..kernels.planning import plan_longest_runs

    return plan_longest_runs(
        np.asarray(ptr, dtype=np.int64),
        np.asarray(run_lo, dtype=np.int64),
        np.asarray(run_hi, dtype=np.int64),
        np.asarray(is_long, dtype=np.bool_),
        int(min_run),
    )


def tile_quartile(counts, T):
    """Per row, the lower quartile of its tile's row counts: a long row is long next to its own tile's rows.

    (Rows late in a long causal document are all long, and a span serves them best; a global row among
    band rows is long next to them.)
    """
    n_q = len(counts)
    n_tiles = -(-n_q // T)
    grid = np.full(n_tiles * T, np.iinfo(np.int64).max, np.int64)
    grid[:n_q] = counts
    grid = np.sort(grid.reshape(n_tiles, T), axis=1)
    in_tile = np.minimum(T, n_q - np.arange(n_tiles) * T)
    q = grid[np.arange(n_tiles), in_tile // 4]
    return np.repeat(q, T)[:n_q]
