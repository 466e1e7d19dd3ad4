"""The basic pattern builders (windows live in windows.py and are re-exported): global tokens, Longformer, explicit masks, random."""

from __future__ import annotations

import hashlib
import numbers
import operator

import numpy as np

from . import runsets
from .base import CSRPattern, Pattern, _canonical_from_scipy, _from_dense, counts_to_indptr
from .registry import register_pattern
from .windows import SlidingWindow, _check_int, causal, sliding_window  # noqa: F401  (re-exported)

__all__ = [
    "SlidingWindow",
    "GlobalTokens",
    "sliding_window",
    "causal",
    "global_tokens",
    "longformer",
    "from_sparse",
    "from_dense",
    "random_pattern",
]


class GlobalTokens(Pattern):
    """Full rows and full columns for the global tokens (symmetric)."""

    name = "global_tokens"

    def __init__(self, n, indices):
        super().__init__((n, n))
        self.indices = indices  # sorted unique int64, read-only
        self._is_global = np.zeros(n, dtype=bool)
        self._is_global[indices] = True

    @property
    def identity(self):
        return ("global_tokens", self.shape, tuple(self.indices.tolist()))

    has_runs = True

    def _runs(self, start, stop):
        """A global row is one run ``[0, n)``; any other row holds the global columns' runs."""
        g = self._is_global[start:stop]
        gs, ge = runsets.from_csr(np.array([0, len(self.indices)]), self.indices)[1:]
        if len(gs) == 0:
            return runsets.empty(stop - start)
        valid = np.ones((stop - start, len(gs)), dtype=bool)
        valid[g, 1:] = False
        lo = np.where(g[:, None], 0, gs[None, :])[valid]
        hi = np.where(g[:, None], self.shape[1], ge[None, :])[valid]
        return counts_to_indptr(valid.sum(axis=1)), lo, hi

    def _row_counts(self, start, stop):
        g = self._is_global[start:stop]
        return np.where(g, self.shape[1], len(self.indices)).astype(np.int64)

    def _rows(self, start, stop):
        counts = self._row_counts(start, stop)
        g = self._is_global[start:stop]
        indptr = counts_to_indptr(counts)
        indices = np.empty(int(indptr[-1]), dtype=np.int64)
        n_g = len(self.indices)
        ordinary = np.flatnonzero(~g)
        if n_g and len(ordinary):
            # ordinary rows: exactly the global columns
            pos = indptr[ordinary][:, None] + np.arange(n_g)
            indices[pos.ravel()] = np.tile(self.indices, len(ordinary))
        full = np.arange(self.shape[1], dtype=np.int64)
        for r in np.flatnonzero(g):
            indices[indptr[r] : indptr[r + 1]] = full
        return indptr, indices

    def _transpose(self):
        return self

    def _union_row_counts(self, parts, start, stop):
        return _band_global_counts(parts, start, stop)

    def describe(self):
        shown = self.indices[:8].tolist()
        more = "..." if len(self.indices) > 8 else ""
        return f"global({shown}{more})"


def _check_indices(name, indices, n):
    arr = np.asarray(indices if not isinstance(indices, range) else list(indices))
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token indices, got an array of shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"{name} must lie in [0, {n}) for n={n}, got out-of-range value(s) {bad[:5].tolist()}")
    out = np.unique(arr.astype(np.int64))
    out.setflags(write=False)
    return out


@register_pattern(
    "global_tokens",
    examples=[dict(n=5, indices=[0]), dict(n=8, indices=[0, 7, 3, 3]), dict(n=4, indices=[]), dict(n=3, indices=[0, 1, 2])],
)
def global_tokens(n, indices):
    """Global tokens: each one attends to every token and every token attends to it.

    Duplicate indices are allowed and counted once.

    Parameters
    ----------
    n : int
        Number of tokens.
    indices : sequence of int
        The global tokens, each in ``[0, n)``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> sa.global_tokens(4, [1]).to_dense().astype(int)
    array([[0, 1, 0, 0],
           [1, 1, 1, 1],
           [0, 1, 0, 0],
           [0, 1, 0, 0]])
    """
    n = _check_int("n", n, 0)
    return GlobalTokens(n, _check_indices("indices", indices, n))


@register_pattern(
    "longformer",
    examples=[dict(n=5, attention_window=2, global_indices=[0]), dict(n=16, attention_window=4), dict(n=9, attention_window=20, global_indices=[8, 0])],
)
def longformer(n, attention_window, global_indices=()):
    """Longformer's pattern in Hugging Face's convention.

    ``attention_window`` is the *total* window and must be even and positive;
    each token sees ``attention_window // 2`` neighbours on each side, plus the
    global tokens, which see everything (``LongformerConfig.attention_window``).

    Parameters
    ----------
    n : int
        Number of tokens.
    attention_window : int
        Hugging Face's total window (even, > 0); the radius is half of it.
    global_indices : sequence of int
        Tokens with global attention (e.g. the question in QA).

    Examples
    --------
    >>> import sparseattn as sa
    >>> sa.longformer(5, attention_window=2, global_indices=[0]) == (
    ...     sa.sliding_window(5, 1) | sa.global_tokens(5, [0]))
    True
    """
    n = _check_int("n", n, 0)
    w = _check_int("attention_window", attention_window)
    if w <= 0 or w % 2:
        raise ValueError(
            f"attention_window must be a positive even integer (Hugging Face's total window; radius = window // 2), got {w}"
        )
    band = sliding_window(n, w // 2)
    g = _check_indices("global_indices", global_indices, n)
    if g.size == 0:
        return band
    return band | GlobalTokens(n, g)


def from_sparse(m):
    """A pattern from any 2-D scipy sparse matrix or array; stored zeros are dropped.

    Parameters
    ----------
    m : scipy sparse matrix or array, 2-D
        Nonzero entries are the allowed (query, key) pairs; duplicates are merged.
    """
    return _canonical_from_scipy(m, "m")


def from_dense(mask):
    """A pattern from a 2-D array; nonzero (True) entries are allowed.

    Parameters
    ----------
    mask : array_like, 2-D, boolean or numeric
        ``mask[i, j]`` nonzero means query ``i`` may attend to key ``j``.
    """
    return _from_dense(mask, "mask")


class RandomPattern(CSRPattern):
    name = "random"

    def __init__(self, n_q, n_k, per_row, seed):
        self._params = (n_q, n_k, per_row, seed)
        rng = np.random.default_rng(seed)
        indices = np.empty(n_q * per_row, dtype=np.int64)
        chunk = max(1, (1 << 22) // max(n_k, 1))
        for s in range(0, n_q, chunk):
            e = min(n_q, s + chunk)
            if per_row == 0:
                break
            if per_row * 8 >= n_k:
                r = rng.random((e - s, n_k))
                pick = np.argpartition(r, per_row - 1, axis=1)[:, :per_row] if per_row < n_k else np.broadcast_to(np.arange(n_k), (e - s, n_k))
            else:
                pick = np.empty((e - s, per_row), dtype=np.int64)
                for row in range(e - s):
                    pick[row] = rng.choice(n_k, per_row, replace=False)
            indices[s * per_row : e * per_row] = np.sort(pick, axis=1).ravel()
        indptr = np.arange(n_q + 1, dtype=np.int64) * per_row
        super().__init__(indptr, indices, (n_q, n_k))

    @property
    def identity(self):
        return ("random",) + self._params

    def describe(self):
        return f"random(per_row={self._params[2]}, seed={self._params[3]})"


@register_pattern(
    "random_pattern",
    examples=[dict(n_q=7, n_k=9, per_row=3, seed=0), dict(n_q=10, n_k=10, per_row=10, seed=1), dict(n_q=5, n_k=40, per_row=2, seed=2)],
)
def random_pattern(n_q, n_k, per_row, seed=0):
    """Each query sees ``per_row`` distinct keys drawn uniformly; reproducible for a given ``seed``.

    Parameters
    ----------
    n_q : int
        Number of queries.
    n_k : int
        Number of keys.
    per_row : int
        Keys per query, at most ``n_k``.
    seed : int
        Seed of the NumPy random generator.
    """
    n_q = _check_int("n_q", n_q, 0)
    n_k = _check_int("n_k", n_k, 0)
    per_row = _check_int("per_row", per_row, 0)
    if per_row > n_k:
        raise ValueError(f"per_row must be <= n_k = {n_k}, got {per_row}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r} of type {type(seed).__name__}")
    seed = operator.index(seed)
    return RandomPattern(n_q, n_k, per_row, seed)


def _band_global_counts(parts, start, stop):
    """Row counts of one sliding window | global tokens by interval arithmetic, else None.

    A global row is full; an ordinary row ``i`` holds its window plus the global
    columns outside it.  Global column ``g`` lies in the window of the rows
    ``g - offset - m * dilation`` for ``-left <= m * dilation <= right``.
    """
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
    rows = (g[:, None] - band.offset - m[None, :] * d).ravel()  # rows whose window holds g
    rows = rows[(rows >= start) & (rows < stop)]
    inside = np.bincount(rows - start, minlength=stop - start)
    counts += len(g) - inside
    is_global = np.zeros(stop - start, dtype=bool)
    gi = g[(g >= start) & (g < stop)] - start
    is_global[gi] = True
    counts[is_global] = n_k
    return counts


class _DropRows(Pattern):
    """``inner`` with some query rows emptied (rows the layer fills in another way)."""

    name = "drop_rows"

    def __init__(self, inner, drop):
        super().__init__(inner.shape)
        self._inner = inner
        self._drop = np.array(drop, dtype=bool)
        self._drop.setflags(write=False)
        self._digest = hashlib.blake2b(np.packbits(self._drop).tobytes(), digest_size=16).hexdigest()

    @property
    def identity(self):
        return ("drop_rows", self._inner.identity, self.shape, self._digest)

    @property
    def has_runs(self):
        return self._inner.has_runs

    def _runs(self, start, stop):
        ptr, lo, hi = self._inner._runs(start, stop)
        keep = np.repeat(~self._drop[start:stop], np.diff(ptr))
        return runsets.counts_to_ptr(ptr, keep), lo[keep], hi[keep]

    def _rows(self, start, stop):
        indptr, indices = self._inner._rows(start, stop)
        keep = ~self._drop[start:stop]
        if keep.all():
            return indptr, indices
        counts = np.diff(indptr)
        return counts_to_indptr(np.where(keep, counts, 0)), indices[np.repeat(keep, counts)]

    def _row_counts(self, start, stop):
        return np.where(self._drop[start:stop], 0, self._inner._row_counts(start, stop))

    def describe(self):
        return f"{self._inner.describe()} minus {int(self._drop.sum())} rows"
