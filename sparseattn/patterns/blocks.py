"""Block-structured presets: :func:`block_sparse` (any block layout) and :func:`bigbird`.

Stored as a small block-level CSR (one row per query block) and expanded to
tokens on demand.  The conventions are those of :mod:`sparseattn.patterns.presets`,
which re-exports both builders.
"""

from __future__ import annotations

import operator

import numpy as np
import scipy.sparse as sp

from .base import INDEX_MAX, Pattern, checked_csr, counts_to_indptr, ranges_to_indices
from .windows import _check_int as _int
from .registry import register_pattern

__all__ = ["BlockSparse", "BigBird", "bigbird", "block_sparse"]


def _heads(heads):
    if heads is None:
        return None
    return _int("heads", heads, 1)


# --------------------------------------------------------------------------
# block-structured patterns
# --------------------------------------------------------------------------
class BlockSparse(Pattern):
    """Token pattern expanded from a block-level CSR layout.

    Query block ``I`` (tokens ``I*bq .. I*bq+bq-1``) sees key block ``J``
    (tokens ``J*bk .. J*bk+bk-1``) iff the layout has ``(I, J)``.
    """

    name = "block_sparse"

    def __init__(self, bindptr, bindices, block_shape, layout_shape, key=None):
        bq, bk = block_shape
        nb_q, nb_k = layout_shape
        super().__init__((nb_q * bq, nb_k * bk))
        self._bindptr = np.ascontiguousarray(bindptr, dtype=np.int64)
        self._bindices = np.ascontiguousarray(bindices, dtype=np.int64)
        self._bindptr.setflags(write=False)
        self._bindices.setflags(write=False)
        self.block_shape = (bq, bk)
        self.layout_shape = (nb_q, nb_k)
        self._key = key

    @property
    def layout(self):
        """The block layout as a boolean ``scipy.sparse.csr_array`` of shape ``(nb_q, nb_k)``."""
        data = np.ones(len(self._bindices), dtype=bool)
        return sp.csr_array((data, self._bindices.copy(), self._bindptr.copy()), shape=self.layout_shape)

    @property
    def identity(self):
        if self._key is not None:
            return self._key
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(self._bindptr.tobytes())
        h.update(self._bindices.tobytes())
        return ("block_sparse", self.block_shape, self.layout_shape, h.hexdigest())

    def _row_counts(self, start, stop):
        bq, bk = self.block_shape
        br = np.arange(start, stop, dtype=np.int64) // bq
        return (self._bindptr[br + 1] - self._bindptr[br]) * bk

    def _rows(self, start, stop):
        bq, bk = self.block_shape
        br = np.arange(start, stop, dtype=np.int64) // bq
        nblk = self._bindptr[br + 1] - self._bindptr[br]
        # one (row, key block) pair per block of each row, in sorted block order
        kb = self._bindices[ranges_to_indices(self._bindptr[br], nblk)]
        indices = ranges_to_indices(kb * bk, np.full(len(kb), bk, dtype=np.int64))
        return counts_to_indptr(nblk * bk), indices

    def _transpose(self):
        t = self.layout.T.tocsr()
        t.sort_indices()
        bq, bk = self.block_shape
        return BlockSparse(t.indptr, t.indices, (bk, bq), self.layout_shape[::-1])

    def describe(self):
        nb_q, nb_k = self.layout_shape
        return f"block_sparse({nb_q}x{nb_k} blocks of {self.block_shape[0]}x{self.block_shape[1]}, {len(self._bindices)} blocks)"


class BigBird(BlockSparse):
    """BigBird ITC pattern; see :func:`bigbird`.  ``random_blocks`` holds the drawn blocks."""

    name = "bigbird"

    def __init__(self, n, block_size, num_random_blocks, seed, num_global_blocks, window_blocks, head):
        b, r, g, w = block_size, num_random_blocks, num_global_blocks, window_blocks
        nb = n // b
        rng = np.random.default_rng([seed, head])
        rand = _bigbird_random_blocks(nb, r, g, w, rng)
        bindptr, bindices = _bigbird_layout(nb, g, w, rand)
        key = ("bigbird", n, b, r, int(seed), g, w, head)
        super().__init__(bindptr, bindices, (b, b), (nb, nb), key=key)
        rand.setflags(write=False)
        #: ``(nb, num_random_blocks)`` int64: the random key blocks of each query
        #: block; rows of global query blocks are -1.
        self.random_blocks = rand
        self.params = dict(
            n=n, block_size=b, num_random_blocks=r, seed=seed, num_global_blocks=g, window_blocks=w, head=head
        )

    def describe(self):
        p = self.params
        return (
            f"bigbird(block_size={p['block_size']}, random={p['num_random_blocks']}, global={p['num_global_blocks']}, "
            f"window={p['window_blocks']}, seed={p['seed']}, head={p['head']})"
        )


def _window_gap(nb, g, wr):
    """For every block row, the window ``[lo, hi]`` clipped to the middle (non-global) blocks."""
    i = np.arange(nb, dtype=np.int64)
    lo = np.maximum(i - wr, g)
    hi = np.minimum(i + wr, nb - g - 1)
    gap = np.maximum(hi - lo + 1, 0)
    return lo, gap


def _bigbird_random_blocks(nb, r, g, w, rng):
    wr = (w - 1) // 2
    rand = np.full((nb, r), -1, dtype=np.int64)
    if r == 0 or nb <= 2 * g:
        return rand
    lo, gap = _window_gap(nb, g, wr)
    n_mid = nb - 2 * g
    for i in range(g, nb - g):
        # candidate middle blocks outside the window, ranked 0 .. n_mid - gap - 1
        v = rng.choice(n_mid - gap[i], size=r, replace=False)
        v = np.sort(v) + g
        rand[i] = np.where(v < lo[i], v, v + gap[i])
    return rand


def _bigbird_layout(nb, g, w, rand):
    """Block CSR of the BigBird ITC layout (global blocks, window blocks, random blocks)."""
    wr = (w - 1) // 2
    r = rand.shape[1]
    rows = []
    all_blocks = np.arange(nb, dtype=np.int64)
    globals_ = np.concatenate([np.arange(min(g, nb)), np.arange(max(nb - g, g), nb)]).astype(np.int64)
    for i in range(nb):
        if i < g or i >= nb - g:
            rows.append(all_blocks)
            continue
        win = np.arange(max(i - wr, 0), min(i + wr, nb - 1) + 1, dtype=np.int64)
        parts = [globals_, win, rand[i]] if r else [globals_, win]
        rows.append(np.unique(np.concatenate(parts)))
    counts = np.array([len(x) for x in rows], dtype=np.int64)
    bindptr = counts_to_indptr(counts)
    bindices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return bindptr, bindices


@register_pattern(
    "bigbird",
    examples=[
        dict(n=8, block_size=1, num_random_blocks=1, seed=0),
        dict(n=32, block_size=4, num_random_blocks=2, seed=3),
        dict(n=48, block_size=3, num_random_blocks=1, seed=1, num_global_blocks=2, window_blocks=5),
        dict(n=12, block_size=4, num_random_blocks=0),
        dict(n=4, block_size=2, num_random_blocks=0),
    ],
)
def bigbird(n, block_size, num_random_blocks, seed=0, *, num_global_blocks=1, window_blocks=3, heads=None):
    """BigBird's block-sparse ITC pattern (Zaheer et al., 2020).

    The sequence is cut into ``nb = n // block_size`` blocks of ``block_size``
    tokens, and attention is decided per (query block, key block):

    * **global**: the first and the last ``num_global_blocks`` blocks attend to
      every block and every block attends to them (full rows and columns);
    * **window**: query block ``I`` sees key blocks ``I - w .. I + w`` with
      ``w = (window_blocks - 1) // 2`` (its own block and one neighbour on each
      side for the paper's 3-block window), truncated at the sequence ends;
    * **random**: every non-global query block sees ``num_random_blocks`` key
      blocks drawn uniformly without replacement from the non-global blocks
      outside its window, from ``numpy.random.default_rng([seed, head])``.

    This is the Internal Transformer Construction (ITC) of the paper and of
    Hugging Face's ``block_sparse`` attention (which uses one global block at
    each end and a 3-block window).  Two documented differences from that
    code: its last two query blocks may draw random blocks inside their own
    window (its comments call it a missing slice), and in eval mode it turns
    the random blocks off; here the random blocks always follow the rule above.

    Parameters
    ----------
    n : int
        Sequence length; must be a multiple of ``block_size``.
    block_size : int
        Tokens per block (``b`` in the paper), >= 1.
    num_random_blocks : int
        Random key blocks per non-global query block (``r``), >= 0.
    seed : int
        Seed of the random blocks; the same arguments give the same pattern.
    num_global_blocks : int, keyword-only
        Global blocks at *each* end (default 1: first and last block).
    window_blocks : int, keyword-only
        Total window width in blocks, odd and >= 1 (default 3).
    heads : int, optional, keyword-only
        With ``heads=h``, return a list of ``h`` patterns whose random blocks
        are drawn independently per head (head ``k`` uses
        ``default_rng([seed, k])``, as BigBird draws per head); head 0 equals
        the pattern returned for ``heads=None``.

    Returns
    -------
    BigBird or list of BigBird
        A :class:`BlockSparse` pattern; ``.random_blocks`` holds the drawn
        key blocks per query block (``-1`` for global query blocks).

    Raises
    ------
    ValueError
        If ``block_size`` does not divide ``n``, a count is negative,
        ``window_blocks`` is even, or a query block has fewer than
        ``num_random_blocks`` candidate blocks left.

    Examples
    --------
    >>> from sparseattn.patterns.presets import bigbird
    >>> p = bigbird(16, block_size=2, num_random_blocks=1, seed=0)
    >>> p.shape, p.layout_shape
    ((16, 16), (8, 8))
    >>> p.layout.toarray().astype(int)  # global first/last, 3-block window, 1 random
    array([[1, 1, 1, 1, 1, 1, 1, 1],
           [1, 1, 1, 0, 0, 0, 1, 1],
           [1, 1, 1, 1, 0, 1, 0, 1],
           [1, 0, 1, 1, 1, 1, 0, 1],
           [1, 1, 0, 1, 1, 1, 0, 1],
           [1, 1, 0, 0, 1, 1, 1, 1],
           [1, 1, 0, 0, 0, 1, 1, 1],
           [1, 1, 1, 1, 1, 1, 1, 1]])
    >>> p.random_blocks[:, 0].tolist()
    [-1, 6, 5, 5, 1, 1, 1, -1]
    >>> [h.random_blocks[1, 0].item() for h in bigbird(16, 2, 1, seed=0, heads=3)]
    [6, 5, 6]
    """
    n = _int("n", n, 0)
    b = _int("block_size", block_size, 1)
    r = _int("num_random_blocks", num_random_blocks, 0)
    seed = operator.index(seed)
    g = _int("num_global_blocks", num_global_blocks, 0)
    w = _int("window_blocks", window_blocks, 1)
    heads = _heads(heads)
    if n % b:
        raise ValueError(
            f"bigbird: block_size={b} must divide n={n} (n % block_size = {n % b}); pad the sequence to a multiple "
            f"of block_size, e.g. n={-(-n // b) * b}"
        )
    if w % 2 == 0:
        raise ValueError(f"bigbird: window_blocks must be odd (own block plus equal neighbours each side), got {w}")
    nb = n // b
    if r and nb > 2 * g:
        _, gap = _window_gap(nb, g, (w - 1) // 2)
        fewest = int((nb - 2 * g - gap[g : nb - g]).min())
        if fewest < r:
            raise ValueError(
                f"bigbird: num_random_blocks={r} but some query block has only {fewest} candidate blocks "
                f"(n={n}, block_size={b} gives {nb} blocks; {2 * g} global, window of {w}); "
                f"use num_random_blocks <= {fewest} or a longer sequence"
            )
    make = lambda head: BigBird(n, b, r, seed, g, w, head)  # noqa: E731
    return make(0) if heads is None else [make(k) for k in range(heads)]


def _layout_to_block_csr(layout):
    if sp.issparse(layout):
        indptr, indices, shape = checked_csr(layout, "layout")
        m = sp.csr_array((np.ones(len(indices), dtype=bool), indices, indptr), shape=shape)
    else:
        arr = np.asarray(layout)
        if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.number)):
            raise TypeError(f"layout must be boolean or numeric (nonzero = block allowed), got dtype {arr.dtype}")
        m = sp.csr_array(arr != 0)
    m.sort_indices()
    return m


@register_pattern(
    "block_sparse",
    examples=[
        dict(layout=[[1, 0, 0], [1, 1, 0], [0, 1, 1]], block_size=2),
        dict(layout=[[1, 0, 1, 0], [0, 1, 0, 1]], block_size=3),
        dict(layout=[[0, 0], [0, 0]], block_size=2),
        dict(layout=[[1, 1], [0, 1], [1, 0]], block_size=(2, 5)),
    ],
)
def block_sparse(layout, block_size):
    """A pattern from a boolean block layout (DeepSpeed / Triton block-sparse style).

    Query token ``i`` sees key token ``j`` iff
    ``layout[i // bq, j // bk]`` is nonzero, where ``block_size`` is ``b``
    (square blocks) or ``(bq, bk)``.  The token shape is
    ``(nb_q * bq, nb_k * bk)``; rectangular layouts give cross-attention
    patterns.

    Parameters
    ----------
    layout : array_like or scipy sparse, shape (nb_q, nb_k) or (heads, nb_q, nb_k)
        Nonzero entries mark allowed blocks.  A 3-D array (the per-head
        layouts DeepSpeed's sparsity configs produce) returns one pattern per
        head.
    block_size : int or (int, int)
        Block size in tokens, >= 1.

    Returns
    -------
    BlockSparse or list of BlockSparse

    Examples
    --------
    >>> from sparseattn.patterns.presets import block_sparse
    >>> p = block_sparse([[1, 0], [1, 1]], block_size=2)
    >>> p.to_dense().astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 1],
           [1, 1, 1, 1]])
    """
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (bq, bk), got {block_size!r}")
        bq, bk = _int("block_size[0]", block_size[0], 1), _int("block_size[1]", block_size[1], 1)
    else:
        bq = bk = _int("block_size", block_size, 1)
    if not sp.issparse(layout):
        arr = np.asarray(layout)
        if arr.ndim == 3:
            return [block_sparse(arr[h], (bq, bk)) for h in range(arr.shape[0])]
        if arr.ndim != 2:
            raise ValueError(f"layout must be 2-D (nb_q, nb_k) or 3-D (heads, nb_q, nb_k), got shape {arr.shape}")
    elif layout.ndim != 2:
        raise ValueError(f"layout must be 2-D, got a scipy sparse object with shape {layout.shape}")
    m = _layout_to_block_csr(layout)
    for name, nb, b in (("rows", m.shape[0], bq), ("columns", m.shape[1], bk)):
        if nb * b > INDEX_MAX:
            raise ValueError(
                f"layout has {nb} block {name} of {b} tokens: {nb * b} tokens, more than 2**62 (what int64 index "
                f"arithmetic can hold)"
            )
    return BlockSparse(m.indptr, m.indices, (bq, bk), m.shape)


# --------------------------------------------------------------------------
# Sparse Transformer (Child et al., 2019)
