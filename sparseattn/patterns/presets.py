"""Published sparse-attention patterns: BigBird, Sparse Transformer, block layouts.

Every preset is a registered builder (``sparseattn.patterns.get("bigbird")``)
that returns a lazy :class:`~sparseattn.patterns.Pattern`: the CSR of any row
range is produced in time proportional to its nonzeros, never through an
``n x n`` dense grid.

Conventions
-----------
* Block patterns (:func:`bigbird`, :func:`block_sparse`) are stored as a small
  block-level CSR (one row per query block) and expanded to tokens on demand.
* Per-head variants: :func:`bigbird` and :func:`fixed` take ``heads=h`` and
  then return a list of ``h`` patterns (head ``k`` draws its own random blocks,
  resp. uses its own summary sub-block); ``heads=None`` returns head 0 alone.
  :func:`strided` and :func:`fixed` expose the paper's two component heads
  through ``component=``.  :func:`block_sparse` accepts a 3-D
  ``(heads, nb_q, nb_k)`` layout (DeepSpeed's layout shape) and returns a list.
* Dilated windows are :func:`~sparseattn.patterns.sliding_window` with
  ``dilation=``.
"""

from __future__ import annotations


import numpy as np

from .base import Pattern, counts_to_indptr, ranges_to_indices, union
from .blocks import BigBird, BlockSparse, _heads, bigbird, block_sparse
from .windows import SlidingWindow
from .windows import _check_int as _int
from .registry import register_pattern

__all__ = [
    "BlockSparse",
    "BigBird",
    "bigbird",
    "strided",
    "fixed",
    "block_sparse",
]


def _bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


# --------------------------------------------------------------------------
@register_pattern(
    "strided",
    examples=[
        dict(n=10, stride=3),
        dict(n=16, stride=4, causal=False),
        dict(n=9, stride=3, component="local"),
        dict(n=9, stride=3, causal=False, component="strided"),
        dict(n=5, stride=1),
        dict(n=7, stride=20),
    ],
)
def strided(n, stride, causal=True, *, component="both"):
    """The Sparse Transformer's *strided* pattern (Child et al., 2019).

    Two component heads with stride ``l``:

    * ``"local"``: query ``i`` sees the previous ``l`` positions,
      ``0 <= i - j < l``;
    * ``"strided"``: query ``i`` sees every ``l``-th earlier position,
      ``i - j >= 0`` and ``(i - j) % l == 0``.

    ``component="both"`` (default) is their union, the merged single-head form;
    the paper's factorised heads are ``component="local"`` and
    ``component="strided"``.  With ``causal=False`` the conditions use
    ``|i - j|`` (both directions), a bidirectional extension of the paper's
    causal definition.  Suits data with period ``l`` (images with row length
    ``l``).

    Parameters
    ----------
    n : int
        Sequence length.
    stride : int
        ``l`` >= 1 (the paper uses ``l`` close to ``sqrt(n)``).
    causal : bool
        Only keys ``j <= i`` (default True).
    component : {"both", "local", "strided"}, keyword-only

    Examples
    --------
    >>> from sparseattn.patterns.presets import strided
    >>> print(strided(6, 2).to_string())
        T1 T2 T3 T4 T5 T6
    T1  *
    T2  *  *
    T3  *  *  *
    T4     *  *  *
    T5  *     *  *  *
    T6     *     *  *  *
    """
    n = _int("n", n, 0)
    s = _int("stride", stride, 1)
    causal = _bool("causal", causal)
    component = _choice("component", component, ("both", "local", "strided"))
    reach = max(n - 1, 0)
    right = 0 if causal else 1
    parts = []
    if component in ("both", "local"):
        parts.append(SlidingWindow(n, n, s - 1, (s - 1) * right, 1))
    if component in ("both", "strided"):
        parts.append(SlidingWindow(n, n, reach, reach * right, s))
    return union(*parts)


class _FixedSummary(Pattern):
    """Columns ``j`` with ``j % block`` in ``[first, last]`` (and ``j <= i`` if causal)."""

    name = "fixed_summary"

    def __init__(self, n, block, first, last, causal):
        super().__init__((n, n))
        self.block, self.first, self.last, self.causal = block, first, last, causal
        m = np.arange(0, n, block, dtype=np.int64)
        c = last - first + 1
        cols = (m[:, None] + np.arange(first, last + 1, dtype=np.int64)).ravel() if c > 0 else m[:0]
        self._cols = cols[cols < n]
        self._cols.setflags(write=False)

    @property
    def identity(self):
        return ("fixed_summary", self.shape, self.block, self.first, self.last, self.causal)

    def _row_counts(self, start, stop):
        if not self.causal:
            return np.full(stop - start, len(self._cols), dtype=np.int64)
        i = np.arange(start, stop, dtype=np.int64)
        return np.searchsorted(self._cols, i, side="right").astype(np.int64)

    def _rows(self, start, stop):
        counts = self._row_counts(start, stop)
        pos = ranges_to_indices(np.zeros(len(counts), dtype=np.int64), counts)
        return counts_to_indptr(counts), self._cols[pos]

    def describe(self):
        return f"summary(j % {self.block} in [{self.first}, {self.last}]{', causal' if self.causal else ''})"


class _SameBlock(Pattern):
    """``j // block == i // block`` (and ``j <= i`` if causal)."""

    name = "fixed_block"

    def __init__(self, n, block, causal):
        super().__init__((n, n))
        self.block, self.causal = block, causal

    @property
    def identity(self):
        return ("fixed_block", self.shape, self.block, self.causal)

    def _bounds(self, start, stop):
        i = np.arange(start, stop, dtype=np.int64)
        lo = (i // self.block) * self.block
        hi = i if self.causal else np.minimum(lo + self.block, self.shape[1]) - 1
        return lo, hi - lo + 1

    def _row_counts(self, start, stop):
        return self._bounds(start, stop)[1]

    def _rows(self, start, stop):
        lo, counts = self._bounds(start, stop)
        return counts_to_indptr(counts), ranges_to_indices(lo, counts)

    def describe(self):
        return f"same_block({self.block}{', causal' if self.causal else ''})"


@register_pattern(
    "fixed",
    examples=[
        dict(n=12, block=4, num_summary=1),
        dict(n=14, block=4, num_summary=2, causal=False),
        dict(n=10, block=5, num_summary=2, component="summary"),
        dict(n=10, block=3, num_summary=1, component="block", causal=False),
        dict(n=16, block=8, num_summary=2, head=2),
        dict(n=6, block=6, num_summary=6),
    ],
)
def fixed(n, block, num_summary, causal=True, *, component="both", head=0, heads=None):
    """The Sparse Transformer's *fixed* pattern (Child et al., 2019).

    With block length ``l = block`` and ``c = num_summary``, two component
    heads:

    * ``"block"``: query ``i`` sees the keys of its own block,
      ``j // l == i // l``;
    * ``"summary"``: query ``i`` sees the last ``c`` positions of every block,
      ``j % l in {l - c, ..., l - 1}``, which carry a summary of their block.

    ``component="both"`` (default) is the union.  ``causal=True`` (the paper's
    setting) additionally requires ``j <= i``; ``causal=False`` keeps both
    directions.  The paper found it better for different heads to use
    distinct summary sub-blocks: head ``h`` uses
    ``j % l in {l - (h + 1) c, ..., l - h c - 1}`` (``head=h``, or
    ``heads=H`` for the list of heads ``0 .. H - 1``; needs ``(h + 1) c <= l``).
    ``block`` need not divide ``n``: the last block is shorter.

    Parameters
    ----------
    n : int
        Sequence length.
    block : int
        ``l`` >= 1.
    num_summary : int
        ``c``, 1 <= c <= l.
    causal : bool
        Only keys ``j <= i`` (default True).
    component : {"both", "block", "summary"}, keyword-only
    head : int, keyword-only
        Which summary sub-block this head uses (default 0: the last ``c``).
    heads : int, optional, keyword-only
        Return a list of ``heads`` patterns, heads ``0 .. heads-1``.

    Examples
    --------
    >>> from sparseattn.patterns.presets import fixed
    >>> print(fixed(6, block=3, num_summary=1).to_string())
        T1 T2 T3 T4 T5 T6
    T1  *
    T2  *  *
    T3  *  *  *
    T4        *  *
    T5        *  *  *
    T6        *  *  *  *
    """
    n = _int("n", n, 0)
    l = _int("block", block, 1)  # noqa: E741
    c = _int("num_summary", num_summary, 1)
    causal = _bool("causal", causal)
    component = _choice("component", component, ("both", "block", "summary"))
    head = _int("head", head, 0)
    heads = _heads(heads)
    if c > l:
        raise ValueError(f"fixed: num_summary={c} must be <= block={l}")
    last_head = head if heads is None else heads - 1
    if (last_head + 1) * c > l:
        raise ValueError(
            f"fixed: head {last_head} needs summary positions {l - (last_head + 1) * c}..{l - last_head * c - 1} "
            f"of each block, but block={l} and num_summary={c} allow at most {l // c} heads"
        )
    if heads is not None:
        return [fixed(n, l, c, causal, component=component, head=h) for h in range(heads)]
    parts = []
    if component in ("both", "block"):
        parts.append(_SameBlock(n, l, causal))
    if component in ("both", "summary"):
        parts.append(_FixedSummary(n, l, l - (head + 1) * c, l - head * c - 1, causal))
    return union(*parts)
