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

Reach sets are word-packed bitsets (``n / 64`` words per traced token; the
kernels are in ``sparseattn.kernels.reach``) and pattern rows are packed as
their nonzero words, loaded only for the tokens a layer expands (a small
pattern is packed whole once).  While every reached token has its diagonal,
a layer only expands the tokens reached last layer (a breadth-first search);
a traced token stops costing anything once it is full or at a fixed point.
The pattern is never densified, and for long sequences ``tokens=`` traces a
subset of query tokens (rows are processed in chunks, so memory is bounded by
the chunk's bitsets, not by ``n x n`` entries).  :func:`survey` returns the
per-layer table and the layers-to-cover answer of one pass.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp


__all__ = ["receptive_field", "coverage_by_layer", "layers_to_cover", "survey"]

# patterns up to this many nonzeros are compiled once; larger ones are streamed per row range
_MATERIALISE_NNZ = 1 << 24
# reach words (uint64) per chunk of traced rows: 32 MiB of reach, as much of frontier
_CHUNK_BUDGET = 1 << 22


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
    """Pattern rows as word-packed bitsets (see ``sparseattn.kernels.reach``), loaded on demand.

    Small patterns are packed whole once; large ones are streamed: the rows a
    layer needs are grouped into runs (gaps of up to ``_GAP`` rows are
    bridged), each run is built from the pattern directly and packed.
    """

    _GAP = 64

    def __init__(self, p):
        self.p = p
        n = p.shape[0]
        self.slot = np.full(max(n, 1), -1, dtype=np.int64)
        self.wstart = np.zeros(0, dtype=np.int64)
        self.wend = np.zeros(0, dtype=np.int64)
        self.widx = np.zeros(0, dtype=np.int64)
        self.wval = np.zeros(0, dtype=np.uint64)
        self.loop = np.zeros(0, dtype=bool)
        if p.nnz <= _MATERIALISE_NNZ and n:
            m = p.csr
            self._add(m.indptr, m.indices, 0, n)

    def _add(self, indptr, indices, start, stop):
        from .kernels.reach import pack_rows

        ids = np.arange(start, stop, dtype=np.int64)
        wptr, widx, wval, loop = pack_rows(
            np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64), ids
        )
        base_slot, base_word = len(self.loop), len(self.widx)
        new = self.slot[start:stop] < 0
        self.slot[start:stop][new] = base_slot + np.flatnonzero(new)
        self.wstart = np.concatenate((self.wstart, base_word + wptr[:-1]))
        self.wend = np.concatenate((self.wend, base_word + wptr[1:]))
        self.widx = np.concatenate((self.widx, widx))
        self.wval = np.concatenate((self.wval, wval))
        self.loop = np.concatenate((self.loop, loop))

    def load(self, bits):
        """Make sure every token set in the bit vector ``bits`` has its row loaded."""
        want = _bit_indices(bits)
        want = want[self.slot[want] < 0]
        if not len(want):
            return
        cut = np.flatnonzero(np.diff(want) > self._GAP) + 1
        starts = want[np.concatenate(([0], cut))]
        stops = want[np.concatenate((cut - 1, [len(want) - 1]))] + 1
        for a, b in zip(starts.tolist(), stops.tolist()):
            indptr, indices = self.p.row_arrays(a, b)
            self._add(indptr, indices, a, b)


def _bit_indices(bits):
    """Token indices of the set bits of a 1-D uint64 word vector."""
    return np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")).astype(np.int64)


def _any_rows(bits, rows):
    """OR of the selected rows of a 2-D word array (a 1-D word vector)."""
    if not rows.any():
        return np.zeros(bits.shape[1], dtype=np.uint64)
    return np.bitwise_or.reduce(bits[rows], axis=0)


class _Tracer:
    """Reach sets of a chunk of query tokens, one layer at a time, as bitsets.

    While every token a row has reached has its diagonal, reach only grows and
    only the newly reached tokens (the frontier) are expanded -- a breadth-first
    search costing the packed rows of each reached token once.  A row that
    reaches a token without its diagonal falls back to the full product
    ``R(L) = R(L-1) @ A`` from then on.

    A row stops being worked on (``live`` False) once it is full -- every
    column then has an entry, so a full row stays full -- or once a layer
    leaves it unchanged, a fixed point.
    """

    def __init__(self, rows, tokens, n):
        self.rows, self.n = rows, n
        self.tokens = tokens
        k, nw = len(tokens), (n + 63) // 64
        self.reach = np.zeros((k, nw), dtype=np.uint64)
        np.bitwise_or.at(self.reach, (np.arange(k), tokens >> 6), np.left_shift(np.uint64(1), (tokens & 63).astype(np.uint64)))
        self.frontier = self.reach.copy()
        self.counts = np.ones(k, dtype=np.int64)
        self.mono = np.ones(k, dtype=bool)
        self.live = self.counts < n
        self.stuck = np.zeros(k, dtype=bool)  # a fixed point short of full

    @property
    def done(self):
        return not self.live.any()

    def step(self):
        from .kernels.reach import find_loopless, layer_step

        live, rows = self.live, self.rows
        if not live.any():
            return
        rows.load(_any_rows(self.frontier, live & self.mono) | _any_rows(self.reach, live & ~self.mono))
        switch = find_loopless(self.frontier, live & self.mono, rows.slot, rows.loop)
        if switch.any():
            self.mono &= ~switch
            rows.load(_any_rows(self.reach, switch))
        changed = layer_step(
            self.reach, self.frontier, live, self.mono, self.counts,
            rows.slot, rows.wstart, rows.wend, rows.widx, rows.wval,
        )
        self.stuck |= live & ~changed & (self.counts < self.n)
        self.live = live & changed & (self.counts < self.n)

    def state(self):
        """A digest of the rows still worked on (for cycle detection)."""
        h = hashlib.blake2b(digest_size=16)
        live = np.flatnonzero(self.live)
        h.update(live.tobytes())
        h.update(np.ascontiguousarray(self.reach[live]).tobytes())
        return h.digest()

    def sets(self):
        """The reach as a canonical boolean csr_array, one row per token of the chunk."""
        from .kernels.reach import to_csr
        from .patterns.base import _csr_array

        indptr, indices = to_csr(self.reach, self.counts)
        return _csr_array(indptr, indices, (len(self.tokens), self.n))


def _chunks(k, n):
    size = max(16, _CHUNK_BUDGET // max((n + 63) // 64, 1))
    for s in range(0, k, size):
        yield s, min(k, s + size)


def _trace(p, tokens, layers, keep_sets, per_layer, on_chunk=None):
    """Counts (per layer, or after ``layers``) and optionally the sets, one pass per chunk.

    ``on_chunk(s, e, tracer)`` is called with each finished chunk.
    """
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
                counts[layer - 1, s:e] = t.counts
            if t.done:  # every later layer gives the same reach
                if per_layer:
                    counts[layer:, s:e] = t.counts
                break
        if not per_layer:
            counts[s:e] = t.counts
        if keep_sets:
            sets.append(t.sets())
        if on_chunk is not None:
            on_chunk(s, e, t)
    if keep_sets:
        from .patterns.base import _csr_array

        if len(sets) == 1:
            return counts, sets[0]
        m = sp.csr_array(sp.vstack(sets, format="csr")) if sets else sp.csr_array((0, n), dtype=bool)
        m.sort_indices()
        return counts, _csr_array(m.indptr, m.indices, m.shape)
    return counts


def survey(pattern, layers, *, tokens=None, residual=False):
    """The coverage table and the layers-to-cover answer of up to ``layers`` layers, in one pass.

    Parameters
    ----------
    pattern : Pattern, scipy sparse or 2-D bool ndarray
        A square pattern.
    layers : int
        Trace at most this many layers (>= 0); the work is bounded by it.
    tokens : sequence of int, optional, keyword-only
        Trace only these query tokens (default: all).
    residual : bool, keyword-only
        Add the diagonal to every layer, as in :func:`receptive_field`.

    Returns
    -------
    table : ndarray of int64, shape (layers, len(tokens))
        Row ``L - 1`` equals ``receptive_field(pattern, L, tokens=tokens)``.
    cover : int or None
        :func:`layers_to_cover` for the same tokens if it is at most ``layers``, else None.
    never : bool
        True when some traced token reached a fixed point short of all ``n``
        tokens: no number of layers covers it.

    Examples
    --------
    >>> import sparseattn as sa
    >>> from sparseattn.analysis import survey
    >>> table, cover, never = survey(sa.sliding_window(9, 2), 6, tokens=[0, 4])
    >>> table.tolist(), cover, never
    ([[3, 5], [5, 9], [7, 9], [9, 9], [9, 9], [9, 9]], 4, False)
    """
    p = _square_pattern(pattern, residual)
    layers = _check_layers("layers", layers)
    n = p.shape[0]
    traced = _check_tokens(tokens, n)
    stuck = []
    table = _trace(p, traced, layers, False, per_layer=True, on_chunk=lambda s, e, t: stuck.append(t.stuck.any()))
    if len(traced) == 0 or n <= 1:
        return table, 0, False
    full = np.all(table >= n, axis=1)
    cover = int(np.argmax(full)) + 1 if full.any() else None
    never = cover is None and bool(any(stuck) or (tokens is None and p.nnz <= _MATERIALISE_NNZ and _never_covers(p)))
    return table, cover, never


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
        while not t.done:
            layer += 1
            if max_layers is not None and layer > max_layers:
                return None
            t.step()
            if t.stuck.any():
                return None  # a fixed point that is not full
            if not t.mono[t.live].all():
                key = t.state()
                if key in seen:
                    return None  # the reach sets cycle without ever filling up
                seen.add(key)
        answer = max(answer, layer)
    return answer
