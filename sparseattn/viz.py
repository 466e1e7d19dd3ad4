"""Pictures of attention patterns: downsampled density images that scale to a million tokens.

A pattern of ``n_q x n_k`` tokens is drawn as a grid of at most
``max_pixels`` pixels per side; each pixel shows the fraction of its block of
(query, key) pairs that the pattern allows.  The grid is computed by
streaming the pattern's CSR in row chunks (:func:`density_grid`), so memory
stays bounded whatever ``n``.  Thin features (a global row among a million)
stay visible thanks to a power-law colour scale in which any nonzero pixel is
coloured.

matplotlib (extra ``viz``) is imported only inside the plotting functions,
through its object-oriented API with the Agg canvas: no ``pyplot`` state and
no change to the caller's backend.
"""

from __future__ import annotations

import numbers
import os

import numpy as np

__all__ = ["density_grid", "plot_pattern", "plot_receptive_field"]

# about this many nonzeros are streamed per chunk of rows
_CHUNK_NNZ = 1 << 22


def _bins(name, bins, n_q, n_k):
    if isinstance(bins, (tuple, list)):
        if len(bins) != 2:
            raise ValueError(f"{name} must be an int or a pair (rows, cols), got {bins!r}")
        bq, bk = bins
    else:
        bq = bk = bins
    for b in (bq, bk):
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Integral):
            raise TypeError(f"{name} must hold integers, got {bins!r}")
        if b < 1:
            raise ValueError(f"{name} must be >= 1, got {bins!r}")
    return max(1, min(int(bq), n_q)), max(1, min(int(bk), n_k))


def _edges(n, bins):
    """Pixel ``p`` covers tokens ``[edges[p], edges[p + 1])``; token ``t`` is in pixel ``t * bins // n``."""
    return -((-np.arange(bins + 1, dtype=np.int64) * n) // bins)


def _merge(row, lo, hi):
    """Sort intervals by (row, lo) and merge overlapping or touching ones within each row."""
    if len(row) == 0:
        return row, lo, hi
    order = np.lexsort((lo, row))
    row, lo, hi = row[order], lo[order], hi[order]
    span = np.int64(max(int(hi.max()), 1) + 1)
    reach = np.maximum.accumulate(row * span + hi) - row * span  # running max of hi within the row
    start = np.ones(len(row), dtype=bool)
    start[1:] = (row[1:] != row[:-1]) | (lo[1:] > reach[:-1])
    first = np.flatnonzero(start)
    return row[first], lo[first], np.maximum.reduceat(hi, first)


def _intervals(p, start, stop):
    """Allowed keys of rows ``[start, stop)`` as disjoint intervals ``(row - start, lo, hi)``.

    Known builders give O(intervals) work instead of O(nnz); returns None for
    patterns without an interval form (then the CSR is streamed).
    """
    from .patterns.base import Union
    from .patterns.builders import GlobalTokens, SlidingWindow
    from .patterns.presets import BlockSparse, _SameBlock

    k = stop - start
    if isinstance(p, SlidingWindow) and p.dilation == 1:
        lo, counts = p._bounds(start, stop)
    elif isinstance(p, _SameBlock):
        lo, counts = p._bounds(start, stop)
    elif isinstance(p, GlobalTokens):
        g = p.indices
        n_k = p.shape[1]
        is_g = p._is_global[start:stop]
        if len(g):
            brk = np.flatnonzero(np.diff(g) > 1) + 1
            run_lo = g[np.concatenate(([0], brk))]
            run_hi = g[np.concatenate((brk - 1, [len(g) - 1]))] + 1
        else:
            run_lo = run_hi = g
        ordinary = np.flatnonzero(~is_g)
        full = np.flatnonzero(is_g)
        row = np.concatenate((np.repeat(ordinary, len(run_lo)), full))
        lo = np.concatenate((np.tile(run_lo, len(ordinary)), np.zeros(len(full), dtype=np.int64)))
        hi = np.concatenate((np.tile(run_hi, len(ordinary)), np.full(len(full), n_k, dtype=np.int64)))
        return _merge(row.astype(np.int64), lo, hi)
    elif isinstance(p, BlockSparse):
        bq, bk = p.block_shape
        br = np.arange(start, stop, dtype=np.int64) // bq
        nblk = p._bindptr[br + 1] - p._bindptr[br]
        from .patterns.base import ranges_to_indices

        kb = p._bindices[ranges_to_indices(p._bindptr[br], nblk)]
        row = np.repeat(np.arange(k, dtype=np.int64), nblk)
        return _merge(row, kb * bk, kb * bk + bk)
    elif isinstance(p, Union):
        parts = [_intervals(q, start, stop) for q in p.parts]
        if any(x is None for x in parts):
            return None
        return _merge(*(np.concatenate(a) for a in zip(*parts)))
    else:
        return None
    keep = counts > 0
    row = np.flatnonzero(keep).astype(np.int64)
    return row, lo[keep], lo[keep] + counts[keep]


def _add_intervals(counts, row_px, lo, hi, n_k, ce):
    """Add the allowed pairs of key intervals ``[lo, hi)`` (pixel rows ``row_px``) to ``counts``."""
    bq, bk = counts.shape
    flat = counts.reshape(-1)
    size = flat.size

    def add(idx, w):
        flat[:] += np.rint(np.bincount(idx, weights=w, minlength=size)).astype(np.int64)

    cl = (lo * bk) // n_k
    ch = ((hi - 1) * bk) // n_k
    same = cl == ch
    add(row_px[same] * bk + cl[same], (hi - lo)[same])
    d = ~same
    rp, cl, ch, lo, hi = row_px[d], cl[d], ch[d], lo[d], hi[d]
    add(rp * bk + cl, ce[cl + 1] - lo)  # partial first pixel column
    add(rp * bk + ch, hi - ce[ch])  # partial last pixel column
    inner = ch - cl > 1  # fully covered columns cl+1 .. ch-1, through a difference array
    if np.any(inner):
        diff = np.zeros((bq, bk + 1), dtype=np.int64)
        np.add.at(diff, (rp[inner], cl[inner] + 1), 1)
        np.add.at(diff, (rp[inner], ch[inner]), -1)
        counts += np.cumsum(diff, axis=1)[:, :bk] * np.diff(ce)


def density_grid(pattern, bins, *, return_counts=False):
    """The numbers :func:`plot_pattern` draws: allowed fraction per pixel block.

    Query ``i`` falls in pixel row ``i * bins_q // n_q`` and key ``j`` in pixel
    column ``j * bins_k // n_k`` (so pixel ``p`` covers tokens
    ``ceil(p * n / bins) .. ceil((p + 1) * n / bins) - 1``); ``bins`` larger
    than the side is reduced to it, one token per pixel.

    Parameters
    ----------
    pattern : Pattern, scipy sparse or 2-D bool ndarray
    bins : int or (int, int)
        Pixels per side (rows, columns).
    return_counts : bool, keyword-only
        Also return the integer counts of allowed pairs per pixel and the
        pixel edges.

    Returns
    -------
    density : ndarray of float64, shape (bins_q, bins_k)
        ``count / (rows in pixel * cols in pixel)``, in ``[0, 1]``.
    counts, row_edges, col_edges : ndarray
        Only with ``return_counts=True``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> from sparseattn.viz import density_grid
    >>> density_grid(sa.sliding_window(4, 1), 2)
    array([[1.  , 0.25],
           [0.25, 1.  ]])
    """
    from .patterns import as_pattern

    p = as_pattern(pattern, "pattern")
    n_q, n_k = p.shape
    if n_q == 0 or n_k == 0:
        raise ValueError(f"density_grid needs a non-empty pattern, got shape {p.shape}")
    bq, bk = _bins("bins", bins, n_q, n_k)
    re, ce = _edges(n_q, bq), _edges(n_k, bk)
    counts = np.zeros((bq, bk), dtype=np.int64)
    if _intervals(p, 0, min(n_q, 1)) is not None:
        step = 1 << 18  # rows per chunk: work is O(intervals), a few per row
        for s in range(0, n_q, step):
            e = min(n_q, s + step)
            row, lo, hi = _intervals(p, s, e)
            if len(row):
                _add_intervals(counts, ((row + s) * bq) // n_q, lo, hi, n_k, ce)
    else:
        flat = counts.reshape(-1)
        head = min(n_q, 256)  # estimate the row length from the first rows
        step = max(1, int(_CHUNK_NNZ * head // max(p.rows(0, head).nnz, 1)))
        for s in range(0, n_q, step):
            e = min(n_q, s + step)
            m = p.rows(s, e)
            if m.nnz == 0:
                continue
            pr = (np.arange(s, e, dtype=np.int64) * bq) // n_q
            idx = np.repeat(pr * bk, np.diff(m.indptr)) + (m.indices.astype(np.int64) * bk) // n_k
            flat += np.bincount(idx, minlength=bq * bk)
    density = counts / np.outer(np.diff(re), np.diff(ce))
    if return_counts:
        return density, counts, re, ce
    return density


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    return os.fspath(path)


def _draw_density(ax, fig, density, n_q, n_k, gamma):
    # any allowed pair is visible: nonzero densities map to [0.2, 1] on a power scale
    shown = np.ma.masked_equal(density, 0.0)
    shown = 0.2 + 0.8 * np.ma.power(shown, gamma)
    im = ax.imshow(
        shown,
        cmap=_cmap(),
        vmin=0.0,
        vmax=1.0,
        extent=(0, n_k, n_q, 0),
        interpolation="nearest",
        aspect="auto" if max(n_q, n_k) > 3 * min(n_q, n_k) else "equal",
    )
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.array([0.001, 0.01, 0.1, 0.5, 1.0])
    cb.set_ticks(0.2 + 0.8 * ticks**gamma, labels=[f"{t:g}" for t in ticks])
    cb.set_label("fraction allowed per pixel (white: none)")
    return im


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis_r"].with_extremes(bad="white")  # white: nothing allowed


def _check_pixels(max_pixels):
    if isinstance(max_pixels, (bool, np.bool_)) or not isinstance(max_pixels, numbers.Integral) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    return int(max_pixels)


def plot_pattern(pattern, path, max_pixels=1024, *, title=None, gamma=0.35):
    """Save a density image of a pattern to ``path`` (PNG, SVG, PDF ... by extension).

    Parameters
    ----------
    pattern : Pattern, scipy sparse or 2-D bool ndarray
    path : str or os.PathLike
    max_pixels : int
        Pixels per side; patterns with fewer tokens get one pixel per token.
    title : str, optional
        Defaults to the pattern's description, shape and density.
    gamma : float, keyword-only
        Exponent of the power-law colour scale (1 = linear); small values make
        sparse pixels visible.

    Returns
    -------
    numpy.ndarray
        The density grid that was drawn (see :func:`density_grid`).

    Examples
    --------
    >>> import os, tempfile
    >>> import sparseattn as sa
    >>> from sparseattn.viz import plot_pattern
    >>> path = os.path.join(tempfile.mkdtemp(), "band.png")
    >>> plot_pattern(sa.sliding_window(4096, 64) | sa.global_tokens(4096, [0]), path, max_pixels=256).shape
    (256, 256)
    >>> os.path.getsize(path) > 0
    True
    """
    from .patterns import as_pattern

    p = as_pattern(pattern, "pattern")
    path = _check_path(path)
    max_pixels = _check_pixels(max_pixels)
    density, counts, _, _ = density_grid(p, max_pixels, return_counts=True)
    n_q, n_k = p.shape
    nnz = int(counts.sum())  # cheaper than p.nnz for compositions of builders
    side = max(5.6, min(density.shape[0], 1200) / 100 * 1.3)  # about one screen pixel per grid pixel
    fig = _figure((side * 1.15, side))
    ax = fig.add_subplot(1, 1, 1)
    _draw_density(ax, fig, density, n_q, n_k, gamma)
    if title is None:
        title = f"{p.describe()}\n{n_q} x {n_k}, nnz={nnz:,}, density={nnz / (n_q * n_k):.3g}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return density


def plot_receptive_field(
    pattern, layers, path, *, tokens=None, max_pixels=512, max_tokens=256, residual=False, title=None
):
    """Save a picture of what stacking ``layers`` layers of a pattern lets each token see.

    Left: the density image of the reach after ``layers`` layers (row ``i``:
    the tokens that influence query ``i``; see
    :func:`sparseattn.analysis.receptive_field` for the definition).  Right:
    the receptive-field size as a fraction of ``n`` after 1 .. ``layers``
    layers (minimum, mean and maximum over the traced tokens).

    Long sequences trace a subset: ``tokens`` (default: all tokens when
    ``n <= max_pixels``, else ``max_tokens`` evenly spaced ones including both
    ends).  Tracing costs up to one breadth-first search per traced token.

    Returns
    -------
    numpy.ndarray of int64, shape (layers, len(tokens))
        The receptive-field sizes that were plotted.

    Examples
    --------
    >>> import os, tempfile
    >>> import sparseattn as sa
    >>> from sparseattn.viz import plot_receptive_field
    >>> path = os.path.join(tempfile.mkdtemp(), "rf.png")
    >>> sizes = plot_receptive_field(sa.sliding_window(64, 4), 3, path)
    >>> sizes[:, 32].tolist()  # a middle token sees 9, 17, 25 tokens
    [9, 17, 25]
    """
    from .analysis import _check_layers, _check_tokens, _square_pattern, _trace

    p = _square_pattern(pattern, residual)
    path = _check_path(path)
    layers = _check_layers("layers", layers)
    if layers < 1:
        raise ValueError(f"plot_receptive_field needs layers >= 1, got {layers}")
    max_pixels = _check_pixels(max_pixels)
    n = p.shape[0]
    if n == 0:
        raise ValueError("plot_receptive_field needs a non-empty pattern, got n=0")
    if tokens is None:
        tokens = np.arange(n) if n <= max_pixels else np.unique(np.linspace(0, n - 1, max_tokens).round().astype(np.int64))
    tokens = _check_tokens(tokens, n)
    if len(tokens) == 0:
        raise ValueError("tokens must name at least one token to trace")
    k = len(tokens)
    bk = min(n, max_pixels)
    ce = _edges(n, bk)
    counts = np.zeros((k, bk), dtype=np.int64)

    def add(s, e, tracer):
        reach = tracer.sets()
        idx = np.repeat(np.arange(s, e, dtype=np.int64) * bk, np.diff(reach.indptr))
        idx += (reach.indices.astype(np.int64) * bk) // n
        counts.reshape(-1)[:] += np.bincount(idx, minlength=counts.size)

    per_layer = _trace(p, tokens, layers, False, per_layer=True, on_chunk=add)
    density = counts / np.diff(ce)

    fig = _figure((11.0, 4.8))
    ax = fig.add_subplot(1, 2, 1)
    _draw_density(ax, fig, density, len(tokens), n, 0.35)
    ax.set_ylabel("traced query" if len(tokens) < n else "query i")
    if len(tokens) < n:
        ax.set_yticks([0, len(tokens)], [str(tokens[0]), str(tokens[-1])])
    ax.set_title(f"reach after {layers} layer{'s' if layers != 1 else ''}", fontsize=9)
    ax2 = fig.add_subplot(1, 2, 2)
    x = np.arange(1, layers + 1)
    frac = per_layer / n
    ax2.plot(x, frac.max(axis=1), "o-", label="max")
    ax2.plot(x, frac.mean(axis=1), "s-", label="mean")
    ax2.plot(x, frac.min(axis=1), "^-", label="min")
    ax2.set_xlabel("layers")
    ax2.set_ylabel("receptive field / n")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlim(0.5, layers + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))  # layer counts are whole numbers
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="lower right")
    ax2.set_title(f"coverage ({len(tokens)} traced of n={n})", fontsize=9)
    fig.suptitle(title if title is not None else p.describe(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return per_layer
