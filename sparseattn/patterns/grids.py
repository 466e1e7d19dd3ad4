"""Neighborhood attention on 1-D, 2-D and 3-D token grids, with NATTEN's window rule."""

from __future__ import annotations

import numbers

import numpy as np

from . import runsets
from .base import INDEX_MAX, Pattern, counts_to_indptr
from .registry import register_pattern

__all__ = ["Neighborhood", "neighborhood"]


#: from this many rows the runs come from the Numba kernel even before it is compiled (~0.3 s, once)
_NUMBA_ROWS = 1 << 16


def _grid_runs_compiled():
    from ..kernels.cache import numba_ready
    from ..kernels.grid_runs import grid_runs

    return numba_ready(grid_runs)


class Neighborhood(Pattern):
    """Tokens of a grid in row-major order, each seeing its NATTEN neighbourhood (see :func:`neighborhood`)."""

    name = "neighborhood"

    def __init__(self, shape, kernel_size, dilation, causal):
        n = int(np.prod(shape, dtype=np.int64))
        super().__init__((n, n))
        self.grid, self.kernel_size, self.dilation, self.causal = shape, kernel_size, dilation, causal
        # row-major strides: the last axis varies fastest
        self._strides = tuple(int(np.prod(shape[a + 1 :], dtype=np.int64)) for a in range(len(shape)))

    @property
    def identity(self):
        return ("neighborhood", self.grid, self.kernel_size, self.dilation, self.causal)

    def _axis_windows(self, rows):
        """Per axis, each row's first key coordinate and key count (keys step by that axis's dilation)."""
        out = []
        for a, (L, k, d, c) in enumerate(zip(self.grid, self.kernel_size, self.dilation, self.causal)):
            x = (rows // self._strides[a]) % L
            r, pos = x % d, x // d  # residue class and position within it
            length = (L - r + d - 1) // d  # tokens of that class along the axis
            if c:
                lo = np.maximum(pos - (k - 1), 0)  # the k positions ending at the query, cut at the start
                count = pos - lo + 1
            else:
                # NATTEN: window_left = k // 2, window_right = k // 2 + k % 2 - 1; the window is shifted
                # (not cut) at the class's borders, so it always holds k positions
                lo = np.clip(pos - k // 2, 0, length - k)
                count = np.full(len(rows), k, dtype=np.int64)
            out.append((r + lo * d, count))
        return out

    @property
    def has_runs(self):
        # along the last axis (stride 1) the window is one run of keys unless that axis is dilated
        return self.dilation[-1] == 1

    def _runs(self, start, stop):
        """One run per window position on the other axes: ``prod(kernel_size[:-1])`` runs per row.

        O(rows * runs per row), never per key.  Without causal axes before the last every row has as many
        runs, laid out as a ``(rows, runs per row)`` grid by broadcasting; runs of consecutive grid lines
        touch (and are merged) only where the window spans the whole last axis.  A block of
        :data:`_NUMBA_ROWS` rows or more, or any block once the kernel is compiled or cached, comes from
        :func:`sparseattn.kernels.grid_runs.grid_runs` instead (the same runs, ~5x faster).
        """
        if stop - start >= _NUMBA_ROWS or _grid_runs_compiled():
            from ..kernels.grid_runs import grid_runs

            ptr, lo, hi = grid_runs(start, stop, *self._kernel_args())
        else:
            ptr, lo, hi = self._runs_numpy(start, stop)
        if len(self.grid) > 1 and stop > start and self.kernel_size[-1] == self.grid[-1]:
            # runs of consecutive grid lines touch when the window spans the whole last axis
            return runsets.canonical(ptr, lo, hi)
        return ptr, lo, hi

    def _runs_numpy(self, start, stop):
        """:meth:`_runs` in NumPy (before the kernel is compiled), not yet merged where runs touch."""
        rows = np.arange(start, stop, dtype=np.int64)
        windows = self._axis_windows(rows)
        first, count = windows[-1]
        m = len(rows)
        if not any(self.causal[:-1]):
            # every row: kernel_size[a] positions on each axis a before the last, the same number of runs
            lo = first.reshape(m, *([1] * (len(windows) - 1)))
            for a, (f, _) in enumerate(windows[:-1]):
                shape = [1] * len(windows)
                shape[0], shape[a + 1] = m, self.kernel_size[a]
                steps = np.arange(self.kernel_size[a], dtype=np.int64) * (self.dilation[a] * self._strides[a])
                shape_f = [m] + [1] * (len(windows) - 1)
                lo = lo + (f * self._strides[a]).reshape(shape_f) + steps.reshape([1] * (a + 1) + [-1] + [1] * (len(windows) - a - 2))
            per = int(np.prod(self.kernel_size[:-1], dtype=np.int64))
            lo = np.ascontiguousarray(np.broadcast_to(lo, (m, *self.kernel_size[:-1]))).reshape(m * per)
            hi = lo + np.repeat(count, per)
            ptr = np.arange(m + 1, dtype=np.int64) * per
        else:
            owner = np.arange(m, dtype=np.int64)
            base = np.zeros(m, dtype=np.int64)
            for a, (f, cnt) in enumerate(windows[:-1]):
                reps = cnt[owner]
                group_start = counts_to_indptr(reps)
                owner = np.repeat(owner, reps)
                step = np.arange(len(owner), dtype=np.int64) - np.repeat(group_start[:-1], reps)
                base = np.repeat(base, reps) + (f[owner] + step * self.dilation[a]) * self._strides[a]
            ptr = counts_to_indptr(np.bincount(owner, minlength=m))
            lo = base + first[owner]
            hi = lo + count[owner]
        return ptr, lo, hi

    def _kernel_args(self):
        as_i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        return (as_i64(self.grid), as_i64(self.kernel_size), as_i64(self.dilation),
                np.asarray(self.causal, dtype=np.uint8), as_i64(self._strides))  # fmt: skip

    def _row_counts(self, start, stop):
        rows = np.arange(start, stop, dtype=np.int64)
        counts = np.ones(len(rows), dtype=np.int64)
        for _, count in self._axis_windows(rows):
            counts *= count
        return counts

    def _rows(self, start, stop):
        rows = np.arange(start, stop, dtype=np.int64)
        windows = self._axis_windows(rows)
        # expand axis by axis: each partial key offset is followed by its run along the next axis, so the
        # keys of a row come out in row-major, i.e. ascending, order
        owner = np.arange(len(rows), dtype=np.int64)  # the row of each partial key
        keys = np.zeros(len(rows), dtype=np.int64)
        for a, (first, count) in enumerate(windows):
            reps = count[owner]
            group_start = counts_to_indptr(reps)
            owner = np.repeat(owner, reps)
            step = np.arange(len(owner), dtype=np.int64) - np.repeat(group_start[:-1], reps)
            keys = np.repeat(keys, reps) + (first[owner] + step * self.dilation[a]) * self._strides[a]
        counts = np.bincount(owner, minlength=len(rows)).astype(np.int64)
        return counts_to_indptr(counts), keys

    def describe(self):
        return f"neighborhood(shape={self.grid}, kernel_size={self.kernel_size}, dilation={self.dilation}, causal={self.causal})"


def _per_axis(name, value, n_axes, kind):
    """An int/bool (every axis) or a sequence of one per axis, as a tuple of ``n_axes`` entries."""
    seq = value if isinstance(value, (tuple, list, np.ndarray)) else None
    items = list(np.asarray(seq).tolist()) if isinstance(seq, np.ndarray) else (list(seq) if seq is not None else [value])
    if seq is not None and len(items) != n_axes:
        raise ValueError(f"{name} has {len(items)} entries but shape has {n_axes} axes; give one per axis or a single value")
    out = []
    for x in items:
        if kind is bool:
            if not isinstance(x, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool or a tuple of bools (one per axis), got {value!r}")
            out.append(bool(x))
        else:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
                raise TypeError(f"{name} must be an integer or a tuple of integers (one per axis), got {value!r}")
            if x < 1 or x > INDEX_MAX:
                raise ValueError(f"{name} must be >= 1 on every axis, got {value!r}")
            out.append(int(x))
    return tuple(out * n_axes if seq is None else out)


@register_pattern(
    "neighborhood",
    examples=[
        dict(shape=7, kernel_size=3),
        dict(shape=8, kernel_size=4),
        dict(shape=10, kernel_size=3, dilation=3),
        dict(shape=(4, 5), kernel_size=(3, 2)),
        dict(shape=(6, 5), kernel_size=3, dilation=(2, 1), causal=(True, False)),
        dict(shape=(3, 4, 4), kernel_size=(2, 3, 2), dilation=(1, 1, 2)),
        dict(shape=9, kernel_size=4, causal=True, dilation=2),
    ],
)
def neighborhood(shape, kernel_size, *, dilation=1, causal=False):
    """Neighborhood attention (NATTEN) over a 1-D, 2-D or 3-D grid of tokens.

    Tokens are the grid's cells in row-major order (the last axis fastest):
    cell ``(y, x)`` of a ``(H, W)`` grid is token ``y * W + x``.  Along each
    axis a query sees a window of ``kernel_size`` positions, and a key is
    seen when it lies in the query's window on every axis, with NATTEN's
    definition:

    - *Shifted at the borders.*  The window spans ``k // 2`` positions before
      the query and ``k // 2 + k % 2 - 1`` after it (odd ``k``: centred; even
      ``k``: one more before than after, as NATTEN does), moved inwards near
      a border rather than cut, so every query sees exactly
      ``prod(kernel_size)`` keys.
    - *Dilation* ``d`` splits an axis into the ``d`` classes of positions
      with equal ``coord % d``; the window is taken among the positions of
      the query's own class (every ``d``-th position) and shifted at that
      class's borders.  NATTEN requires ``kernel_size * dilation <= length``
      on every axis.
    - *Causal* on an axis: the window is the ``kernel_size`` positions of the
      query's class ending at the query, cut (not shifted) at the start, so
      early queries see fewer keys.

    (NATTEN: ``na2d(q, k, v, kernel_size=(kh, kw), dilation=(dh, dw),
    is_causal=(ch, cw))`` on ``(B, H, W, heads, D)`` inputs equals
    ``sparse_attention`` with ``neighborhood((H, W), (kh, kw), dilation=(dh,
    dw), causal=(ch, cw))`` on the inputs flattened to ``(B, heads, H * W, D)``.)

    Parameters
    ----------
    shape : int or tuple of int
        The grid: ``L``, ``(H, W)`` or ``(T, H, W)``.
    kernel_size : int or tuple of int
        Window size per axis (an int applies to every axis); at most the axis length.
    dilation : int or tuple of int
        Dilation per axis; ``kernel_size * dilation`` at most the axis length.
    causal : bool or tuple of bool
        Causal masking per axis.

    Examples
    --------
    >>> import sparseattn as sa
    >>> print(sa.neighborhood(5, 3).to_string())
        T1 T2 T3 T4 T5
    T1  *  *  *
    T2  *  *  *
    T3     *  *  *
    T4        *  *  *
    T5        *  *  *
    >>> sa.neighborhood((4, 4), 3).rows(0, 1).indices.tolist()  # cell (0, 0): rows 0-2, columns 0-2
    [0, 1, 2, 4, 5, 6, 8, 9, 10]
    """
    shape_t = _per_axis("shape", shape, 1, int) if not isinstance(shape, (tuple, list, np.ndarray)) else None
    if shape_t is None:
        items = list(np.asarray(shape).tolist()) if isinstance(shape, np.ndarray) else list(shape)
        if not 1 <= len(items) <= 3:
            raise ValueError(f"shape must be an int or a tuple of 1 to 3 axis lengths, got {shape!r}")
        shape_t = _per_axis("shape", items, len(items), int)
    axes = len(shape_t)
    if int(np.prod([float(x) for x in shape_t])) > INDEX_MAX:
        raise ValueError(f"shape {shape_t} holds more than 2**62 tokens")
    ks = _per_axis("kernel_size", kernel_size, axes, int)
    dil = _per_axis("dilation", dilation, axes, int)
    cau = _per_axis("causal", causal, axes, bool)
    for a, (L, k, d) in enumerate(zip(shape_t, ks, dil)):
        if k > L:
            raise ValueError(f"kernel_size {k} is larger than axis {a} of shape {shape_t} (length {L})")
        if k * d > L:
            raise ValueError(
                f"kernel_size * dilation = {k} * {d} = {k * d} exceeds axis {a} of shape {shape_t} (length {L}); "
                f"NATTEN requires kernel_size * dilation <= length"
            )
    return Neighborhood(shape_t, ks, dil, cau)
