"""Receptive field of stacked sparse-attention layers, by sparse boolean reachability.

Definition used throughout
--------------------------
For a square pattern ``A`` (``A[i, j]``: query ``i`` attends to key ``j``),
token ``i`` is *influenced* by token ``j``

* after 0 layers iff ``i == j``;
* after 1 layer iff ``A[i, j]``;
* after ``L`` layers iff there is a path ``i = t0, t1, ..., tL = j`` with
  ``A[t(k), t(k+1)]`` for every step, i.e. ``(A^L)[i, j] != 0`` in boolean
  arithmetic.

A layer carries a token's own state forward only if the pattern allows
``(i, i)``: Longformer's band contains the diagonal, so for it "influenced
after ``L`` layers" and "within ``L`` layers" coincide; a pattern without the
diagonal can lose a token's own position.  ``residual=True`` adds the diagonal
to every layer (a residual connection keeps each token's state), which turns
"exactly ``L``" into "at most ``L``" for any pattern.

Everything is computed with sparse boolean products of the reach rows with
the pattern's rows; the pattern is never densified, and for long sequences
``tokens=`` traces only a subset of query tokens (rows are processed in
chunks, so memory is bounded by the chunk's reach, not by ``n x n``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from .patterns.base import counts_to_indptr

__all__ = ["receptive_field", "coverage_by_layer", "layers_to_cover"]

# patterns up to this many nonzeros are compiled once; larger ones are streamed per row range
_MATERIALISE_NNZ = 1 << 24
# target number of reach entries per chunk of traced rows
_CHUNK_BUDGET = 1 << 24


def _square_pattern(pattern, residual):
    from .patterns import as_pattern, sliding_window

    p = as_pattern(pattern, "pattern")
    n_q, n_k = p.shape
    if n_q != n_k:
        raise ValueError(
            f"receptive-field analysis stacks layers, so the pattern must be square; got shape {p.shape}"
        )
    if not isinstance(residual, (bool, np.bool_)):
        raise TypeError(f"residual must be True or False, got {residual!r}")
    if residual:
        p = p | sliding_window(n_q, 0)
    return p


def _check_layers(name, layers):
    if isinstance(layers, (bool, np.bool_)) or not isinstance(layers, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {layers!r} of type {type(layers).__name__}")
    layers = int(layers)
    if layers < 0:
        raise ValueError(f"{name} must be >= 0, got {layers}")
    return layers


def _check_tokens(tokens, n):
    if tokens is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(tokens)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of token indices, got an array of shape {arr.shape}")
    if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"tokens must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"tokens must lie in [0, {n}) for a pattern of n={n} tokens, got {bad[:5].tolist()}")
    return arr


class _Rows:
    """The rows of a pattern the reach touches, as one csr_array plus a column map.

    Small patterns are compiled once and rows are gathered from that CSR; large
    ones are streamed: the touched rows are grouped into runs (gaps of up to
    ``_GAP`` rows are bridged) and each run is built from the pattern directly.
    """

    _GAP = 64

    def __init__(self, p):
        self.p = p
        self.full = p.csr if p.nnz <= _MATERIALISE_NNZ else None

    def gather(self, cols):
        """``(sub, new_cols, self_loops)``: ``sub[new_cols[k]]`` is pattern row ``cols[k]``.

        ``self_loops`` tells whether every gathered row ``t`` contains ``t``.
        """
        u = np.unique(cols)
        if self.full is not None:
            sub, base, starts = self.full[u], np.arange(len(u), dtype=np.int64), u
            seg = np.searchsorted(u, cols)
        else:
            cut = np.flatnonzero(np.diff(u) > self._GAP) + 1
            starts = u[np.concatenate(([0], cut))]
            stops = u[np.concatenate((cut - 1, [len(u) - 1]))] + 1
            parts = [self.p.rows(int(a), int(b)) for a, b in zip(starts, stops)]
            base = counts_to_indptr(stops - starts)[:-1]
            seg = np.searchsorted(starts, cols, side="right") - 1
            sub = parts[0] if len(parts) == 1 else sp.csr_array(sp.vstack(parts, format="csr"))
        new_cols = base[seg] + (cols - starts[seg])
        # does row (position of u[m] in sub) hold u[m]?  Compare sorted row-major keys.
        n = np.int64(sub.shape[1])
        keys = np.repeat(np.arange(sub.shape[0], dtype=np.int64), np.diff(sub.indptr)) * n + sub.indices
        useg = np.searchsorted(starts, u, side="right") - 1
        want = (base[useg] + (u - starts[useg])) * n + u
        pos = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        self_loops = bool(len(keys)) and bool(np.all(keys[pos] == want))
        return sub, new_cols, self_loops


def _keys(m):
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return rows * np.int64(m.shape[1]) + m.indices.astype(np.int64)


def _from_keys(keys, k, n):
    rows = keys // n
    return sp.csr_array(
        (np.ones(len(keys), dtype=bool), keys - rows * n, counts_to_indptr(np.bincount(rows, minlength=k))),
        shape=(k, n),
    )


class _Tracer:
    """Reach sets of a chunk of query tokens, one layer at a time.

    While every token reached so far has a self-loop, reach only grows and only
    the newly reached tokens (the frontier) need expanding:
    ``R(L) = R(L-1) | F(L-1) @ A`` -- a breadth-first search costing the
    pattern rows of each reached token once.  Otherwise (a token without its
    diagonal) it falls back to the full product ``R(L) = R(L-1) @ A``.
    """

    def __init__(self, rows, tokens, n):
        self.rows, self.n = rows, n
        self.tokens = tokens
        self.reach = _identity_rows(tokens, n)
        self.frontier = self.reach
        self.monotone = True
        self.stable = False  # every later layer equals the current one

    def _product(self, m):
        if m.nnz == 0:
            return m, True
        sub, new_cols, loops = self.rows.gather(m.indices.astype(np.int64))
        shifted = sp.csr_array((np.ones(m.nnz, dtype=bool), new_cols, m.indptr), shape=(m.shape[0], sub.shape[0]))
        out = sp.csr_array(shifted @ sub, dtype=bool)
        out.eliminate_zeros()
        out.sort_indices()
        return out, loops

    def step(self):
        if self.stable:
            return
        if self.monotone:
            reached, loops = self._product(self.frontier)
            if loops:
                k = self.reach.shape[0]
                old = _keys(self.reach)
                new = np.setdiff1d(_keys(reached), old, assume_unique=True)
                self.reach = _from_keys(np.union1d(old, new), k, self.n)
                self.stable = len(new) == 0
                full = np.flatnonzero(np.diff(self.reach.indptr) == self.n)
                if len(full):  # a full row cannot grow: do not expand its frontier
                    new = new[~np.isin(new // self.n, full)]
                self.frontier = _from_keys(new, k, self.n)
                return
            self.monotone = False
        nxt, _ = self._product(self.reach)
        self.stable = np.array_equal(nxt.indptr, self.reach.indptr) and np.array_equal(
            nxt.indices, self.reach.indices
        )
        self.reach = nxt

    def counts(self):
        return np.diff(self.reach.indptr).astype(np.int64)

    def keep(self, rows):
        """Drop all but ``rows`` of the chunk."""
        self.tokens = self.tokens[rows]
        self.reach = sp.csr_array(self.reach[rows])
        self.frontier = sp.csr_array(self.frontier[rows])

    def state(self):
        h = hashlib.blake2b(digest_size=16)
        for a in (self.tokens, self.reach.indptr, self.reach.indices):
            h.update(np.asarray(a, dtype=np.int64).tobytes())
        return h.digest()


def _identity_rows(tokens, n):
    k = len(tokens)
    return sp.csr_array(
        (np.ones(k, dtype=bool), tokens.copy(), np.arange(k + 1, dtype=np.int64)), shape=(k, n)
    )


def _chunks(k, n):
    size = max(16, _CHUNK_BUDGET // max(n, 1))
    for s in range(0, k, size):
        yield s, min(k, s + size)


def _trace(p, tokens, layers, keep_sets, per_layer):
    n = p.shape[0]
    rows = _Rows(p)
    k = len(tokens)
    counts = np.zeros((layers, k) if per_layer else (k,), dtype=np.int64)
    sets = []
    for s, e in _chunks(k, n):
        t = _Tracer(rows, tokens[s:e], n)
        for layer in range(1, layers + 1):
            t.step()
            if per_layer:
                counts[layer - 1, s:e] = t.counts()
            if t.stable:  # every later layer gives the same reach
                if per_layer:
                    counts[layer:, s:e] = t.counts()
                break
        if not per_layer:
            counts[s:e] = t.counts()
        if keep_sets:
            sets.append(t.reach)
    if keep_sets:
        m = sp.csr_array(sp.vstack(sets, format="csr")) if sets else sp.csr_array((0, n), dtype=bool)
        m.sort_indices()
        from .patterns.base import _csr_array

        return counts, _csr_array(m.indptr, m.indices, m.shape)
    return counts


def receptive_field(pattern, layers, return_sets=False, *, tokens=None, residual=False):
    """How many tokens can influence each token after ``layers`` stacked layers.

    Token ``i`` is influenced by ``j`` after ``L`` layers iff the pattern has a
    path of exactly ``L`` steps from ``i`` to ``j`` (see the module docstring;
    0 layers: only itself).  Every layer uses the same pattern.

    Parameters
    ----------
    pattern : Pattern, scipy sparse or 2-D bool ndarray
        A square pattern.
    layers : int
        Number of stacked layers, >= 0.
    return_sets : bool
        Also return which tokens, as a boolean ``scipy.sparse.csr_array`` with
        one row per traced token.
    tokens : sequence of int, optional, keyword-only
        Trace only these query tokens (in this order); default all.  Use it
        for long sequences: cost grows with the traced tokens' reach, and a
        full trace of ``n`` tokens can hold up to ``n * n`` entries.
    residual : bool, keyword-only
        Add the diagonal to every layer (a residual connection), so that the
        result is "within ``layers``" rather than "exactly ``layers``".

    Returns
    -------
    counts : ndarray of int64, shape (len(tokens),)
    sets : scipy.sparse.csr_array of bool, shape (len(tokens), n)
        Only with ``return_sets=True``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> from sparseattn.analysis import receptive_field
    >>> band = sa.sliding_window(10, 1)
    >>> receptive_field(band, 2).tolist()  # tokens within 2 * radius, clipped
    [3, 4, 5, 5, 5, 5, 5, 5, 4, 3]
    >>> receptive_field(band | sa.global_tokens(10, [0]), 2).tolist()
    [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    >>> counts, sets = receptive_field(band, 3, return_sets=True, tokens=[5])
    >>> sets.indices.tolist()
    [2, 3, 4, 5, 6, 7, 8]
    """
    p = _square_pattern(pattern, residual)
    layers = _check_layers("layers", layers)
    tokens = _check_tokens(tokens, p.shape[0])
    if not isinstance(return_sets, (bool, np.bool_)):
        raise TypeError(f"return_sets must be True or False, got {return_sets!r}")
    return _trace(p, tokens, layers, bool(return_sets), per_layer=False)


def coverage_by_layer(pattern, layers, *, tokens=None, residual=False):
    """Receptive-field sizes after 1, 2, ..., ``layers`` layers in one pass.

    Returns
    -------
    ndarray of int64, shape (layers, len(tokens))
        Row ``L - 1`` equals ``receptive_field(pattern, L, tokens=tokens)``.

    Examples
    --------
    >>> import sparseattn as sa
    >>> from sparseattn.analysis import coverage_by_layer
    >>> coverage_by_layer(sa.sliding_window(7, 1), 3, tokens=[0, 3]).tolist()
    [[2, 3], [3, 5], [4, 7]]
    """
    p = _square_pattern(pattern, residual)
    layers = _check_layers("layers", layers)
    tokens = _check_tokens(tokens, p.shape[0])
    return _trace(p, tokens, layers, False, per_layer=True)


def _never_covers(p):
    """True when no power of the pattern is all-ones: not strongly connected, or periodic."""
    from scipy.sparse import csgraph

    n = p.shape[0]
    a = p.csr
    if np.any(np.diff(a.indptr) == 0) or len(np.unique(a.indices)) < n:
        return True  # an empty row or an empty column
    ncomp, _ = csgraph.connected_components(a, directed=True, connection="strong")
    if ncomp > 1:
        return True
    # strongly connected: the powers become all-ones iff the period (gcd of cycle lengths) is 1;
    # the period is the gcd over edges u -> v of level(u) + 1 - level(v), levels from one BFS.
    level = csgraph.shortest_path(a, method="D", unweighted=True, indices=0)
    rows = np.repeat(np.arange(n), np.diff(a.indptr))
    diff = np.abs(level[rows] + 1 - level[a.indices]).astype(np.int64)
    return int(np.gcd.reduce(diff)) != 1


def layers_to_cover(pattern, max_layers=None, *, tokens=None, residual=False):
    """Fewest stacked layers after which every token is influenced by every token.

    Uses the definition of :func:`receptive_field` (paths of exactly ``L``
    steps).  Returns ``None`` when that never happens -- e.g. a causal pattern
    (token 0 only ever sees itself), a pattern that is not strongly connected,
    or a periodic one (``[[0, 1], [1, 0]]`` alternates forever) -- detected
    exactly for compiled patterns, and otherwise by the reach sets repeating
    (a fixed point or a cycle).

    Parameters
    ----------
    pattern : Pattern, scipy sparse or 2-D bool ndarray
        A square pattern.
    max_layers : int, optional
        Give up after this many layers and return ``None``.
    tokens : sequence of int, optional, keyword-only
        Only require these query tokens to be fully covered (for long
        sequences; e.g. the two ends of a band).
    residual : bool, keyword-only
        Add the diagonal to every layer, as in :func:`receptive_field`.

    Returns
    -------
    int or None

    Notes
    -----
    When every reached token has its diagonal (Longformer, BigBird, the
    Sparse Transformer presets), each traced token costs one breadth-first
    search: the pattern rows of every token it reaches, once.  Covering all
    ``n`` tokens therefore costs about ``n * nnz`` operations when many layers
    are needed (a plain band), but little when global tokens cover in two
    layers.  For long bands pass ``tokens=`` (for a band the two end tokens
    are the last to be covered).

    Examples
    --------
    >>> import sparseattn as sa
    >>> from sparseattn.analysis import layers_to_cover
    >>> layers_to_cover(sa.sliding_window(100, 8))  # ceil(99 / 8)
    13
    >>> layers_to_cover(sa.sliding_window(100, 8) | sa.global_tokens(100, [50]))
    2
    >>> print(layers_to_cover(sa.causal(100)))
    None
    """
    p = _square_pattern(pattern, residual)
    n = p.shape[0]
    if max_layers is not None:
        max_layers = _check_layers("max_layers", max_layers)
    traced = _check_tokens(tokens, n)
    if len(traced) == 0 or n <= 1:
        return 0  # after 0 layers each token sees itself, which is everything when n == 1
    if tokens is None and p.nnz <= _MATERIALISE_NNZ and _never_covers(p):
        return None
    rows = _Rows(p)
    answer = 0
    for s, e in _chunks(len(traced), n):
        t = _Tracer(rows, traced[s:e], n)
        seen = set()
        layer = 0
        while True:
            layer += 1
            if max_layers is not None and layer > max_layers:
                return None
            t.step()
            # a full row stays full: once some row is full, no column of the pattern is empty
            open_rows = np.flatnonzero(t.counts() < n)
            if len(open_rows) < len(t.tokens):
                t.keep(open_rows)
            if len(t.tokens) == 0:
                break
            if t.stable:
                return None  # a fixed point that is not full
            if not t.monotone:
                key = t.state()
                if key in seen:
                    return None  # the reach sets cycle without ever filling up
                seen.add(key)
        answer = max(answer, layer)
    return answer

