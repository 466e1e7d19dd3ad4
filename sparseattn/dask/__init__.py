"""Sparse attention on Dask arrays, with a task graph that follows the pattern.

:func:`sparse_attention` takes Dask arrays chunked along the sequence axis
(and any leading batch / head axes) and returns a lazy Dask array equal to
:func:`sparseattn.sparse_attention` on the same values.  The adapter holds no
attention math of its own: every task calls the local engine on NumPy blocks
(with ``return_lse``) and partial results over disjoint key sets are merged
with the log-sum-exp formula.

How the graph is built, per output block (query rows ``[a, b)``, one block of
the leading axes):

* **Ordinary rows** need only the keys their pattern rows touch.  For a
  sliding window (dilation 1; unions of windows are one window) that is the
  key range ``[a - left, b + right)``: each key block overlapping it
  contributes a slice taken *on the worker holding it* by a small task, so a
  neighbour contributes a halo of ``left`` or ``right`` rows, never its whole
  chunk, whatever the chunk sizes.  The block then runs the engine on a
  shifted window over the concatenated range.
* **Global columns** (a ``global_tokens`` part) are gathered once per block
  of the leading axes into a small shared block of ``n_globals`` keys; each
  output block runs them as a second partial (the copies of global keys that
  fall inside its window range are masked there, so no key counts twice).
* **Global rows** (full rows) are taken out of the block: one partial per key
  block, computed where that key block lives after that block's own task,
  merged in a chain and written into the block by a small task.  No task
  holds all keys.
* **Any other pattern** (scipy matrices, dilated windows, presets, per-head
  sequences, intersections) goes through the generic path: at graph-build
  time ``pattern.rows(a, b)`` of each query block (never the whole CSR)
  gives the touched key columns, grouped by key block into slices (dense
  runs) or gathers (scattered columns); rows much longer than the block's
  median are split over key blocks like global rows.  The pattern object is
  one node of the graph, shipped once to the workers, which compute
  ``pattern.rows(a, b)`` of their block again and remap it onto the keys they
  received.

The band + global path never calls ``pattern.rows`` while building the
graph: its work list comes from the pattern's parameters, O(number of blocks
+ number of global tokens).

Examples
--------
>>> import numpy as np, dask.array as da, sparseattn as sa
>>> from sparseattn.dask import sparse_attention
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 2, 100, 16))  # 2 heads, 100 tokens, d = 16
>>> p = sa.longformer(100, attention_window=8, global_indices=[0])
>>> dq, dk, dv = (da.from_array(x, chunks=(1, 30, 16)) for x in (q, k, v))
>>> out = sparse_attention(dq, dk, dv, p)
>>> out.chunks[1]
(30, 30, 30, 10)
>>> ref = sa.sparse_attention(q, k, v, p)
>>> bool(np.allclose(out.compute(scheduler="synchronous"), ref, rtol=1e-11, atol=1e-12))
True
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.sparse as sp

from ..engine.validate import check_scale, check_shapes_and_patterns
from ..patterns.algebra import Union
from ..patterns.base import CSRPattern
from ..patterns.builders import GlobalTokens, SlidingWindow, sliding_window

__all__ = ["ContiguousShards", "sparse_attention"]

#: fan-in of each step of the log-sum-exp merge chain of split rows (2: a chain in key-block order,
#: which dask.order follows block by block; a balanced tree made it generate key blocks early)
MERGE_FAN_IN = 2
#: generic path: a row is split over key blocks when longer than max(LONG_MIN, LONG_FACTOR * median row)
LONG_MIN = 2048
LONG_FACTOR = 8


def _import_dask():
    try:
        import dask.array as da
        from dask.highlevelgraph import HighLevelGraph
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sparseattn.dask needs dask[array] and distributed: pip install 'sparseattn[dask]'"
        ) from exc
    return da, HighLevelGraph


# ------------------------------------------------------------------------------------------
# task functions (run on the workers; NumPy blocks in, NumPy blocks out)
# ------------------------------------------------------------------------------------------


def _engine(q, k, v, pattern, scale, kpm, serial):
    """The local engine's forward on one block: ``(out, lse)`` in the compute dtype.

    Through the engine's dispatcher (``paths.forward``, fused), so a block
    whose inputs hold a NaN or an infinity follows the engine's non-finite
    policy (its slices run on the staged kernels) instead of meeting the
    fast-math fused kernels.
    """
    from ..engine import paths
    from ..engine.validate import prepare

    prep = prepare(q, k, v, pattern, scale, kpm)
    out, lse, _ = paths.forward(prep, "fused", parallel=False if serial else None)
    return out.reshape(prep.lead + out.shape[1:]), lse.reshape(prep.lead + lse.shape[1:])


def _merge(parts):
    """Log-sum-exp merge of ``(out, lse)`` partials over disjoint key sets, in the partials' dtype.

    The weights ``exp(lse_i - max)`` lie in [0, 1] and their sum in [1, parts]:
    float32 loses nothing that matters here (``lse_i - max`` of two float32
    values within a factor of two of each other is exact, and a far smaller
    one gets a negligible weight), and it avoids casting whole output blocks
    to float64 and back, which took a fifth of a block task's time.
    """
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    dt = np.result_type(*(p[0].dtype for p in parts))
    lses = np.stack([np.asarray(p[1], dtype=dt) for p in parts])
    with np.errstate(invalid="ignore", divide="ignore"):
        m = lses.max(axis=0)
        m = np.where(np.isfinite(m), m, dt.type(0))  # all -inf: weights become 0, not NaN
        w = np.exp(lses - m)
        total = w.sum(axis=0)
        safe = np.where(total > 0, total, dt.type(1))
        w /= safe
        out = np.multiply(w[0][..., None], parts[0][0], dtype=dt)
        for wi, p in zip(w[1:], parts[1:]):
            out += wi[..., None] * p[0]
        lse = np.where(total > 0, m + np.log(safe), dt.type(-np.inf))
    return out, lse


def _merge_task(*parts):
    return _merge(list(parts))


def _slice_rows(x, lo, hi):
    """Positions ``[lo, hi)`` of a block's sequence axis (a copy: only it crosses to other workers)."""
    return np.array(x[..., lo:hi, :] if _is_data(x) else x[..., lo:hi], copy=True)


def _is_data(x):
    """Float blocks (q, k, v) carry the sequence on axis -2, boolean masks on the last axis."""
    return x.dtype.kind == "f"


def _take_cols(x, cols):
    """Scattered positions of a block's sequence axis (last axis for masks, axis -2 for data)."""
    return np.take(x, cols, axis=-2 if _is_data(x) else -1)


def _concat(parts, axis):
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts, axis=axis)


def _combined_mask(masks, extra):
    """User padding pieces (or None) joined along keys, OR-ed with ``extra`` (bool (m,)) when given."""
    mask = None if masks is None else _concat(masks, -1)
    if extra is not None and extra.any():
        mask = extra if mask is None else np.logical_or(mask, extra)
    return mask


def _full(n_rows, n_keys):
    """Every row sees every key: a band wide enough to cover the rectangle (planned from parameters)."""
    return sliding_window(n_rows, left=n_rows, right=n_keys, n_k=n_keys)


def _block_task(kind, spec, q, kparts, vparts, mparts, shared, scale, serial, dv, out_dtype, after=()):
    """Compute one output block (its split rows, if any, are written in later by :func:`_write_rows`).

    ``after`` holds small results this task only waits for (unused): see the graph builder.

    ``kind`` is ``"window"`` (spec: ``left, right, shift, gpos, long_local``: the
    band in the frame of the key segment, the global keys' positions inside
    it, the split rows) or ``"csr"`` (spec: ``pattern, a, b, cols,
    long_local``: the pattern, the block's rows, the sorted key columns that
    ``kparts`` hold, the split rows).
    """
    n_rows = q.shape[-2]
    k_seg = _concat(kparts, -2) if kparts else None
    v_seg = _concat(vparts, -2) if vparts else None
    part = None
    if kind == "window":
        left, right, shift, gpos, long_local = spec
        if k_seg is not None and k_seg.shape[-2]:
            m = k_seg.shape[-2]
            extra = None
            if len(gpos):
                extra = np.zeros(m, dtype=bool)
                extra[gpos] = True
            mask = _combined_mask(mparts, extra)
            band = sliding_window(n_rows, left=left - shift, right=right + shift, n_k=m)
            part = _engine(q, k_seg, v_seg, band, scale, mask, serial)
        del k_seg, v_seg
        if shared is not None:
            part = _merge_shared(part, q, shared, scale, serial, dv)
    else:
        pattern, a, b, cols, long_local = spec
        if k_seg is not None and len(cols):
            m = pattern.rows(a, b)
            indptr, indices = m.indptr.astype(np.int64), m.indices
            counts = np.diff(indptr)
            if len(long_local):
                keep_row = np.ones(n_rows, dtype=bool)
                keep_row[long_local] = False
                indices = indices[np.repeat(keep_row, counts)]
                counts = np.where(keep_row, counts, 0)
                indptr = np.concatenate(([0], np.cumsum(counts)))
            local = np.searchsorted(cols, indices)
            sub = CSRPattern(indptr, local, (n_rows, len(cols)))
            mask = _combined_mask(mparts, None)
            part = _engine(q, k_seg, v_seg, sub, scale, mask, serial)
    if part is None:
        return np.zeros(q.shape[:-1] + (dv,), dtype=out_dtype)
    return part[0].astype(out_dtype, copy=False)


#: rows per engine call against the shared block of global keys (bounds that partial's extra memory)
SHARED_ROWS = 8192


def _shared_partial(q, gk, gv, gm, scale, serial):
    """``(out, lse)`` of rows ``q`` against every shared global key (``gm``: their padding, or None).

    A dense (rows x keys) product: the keys are few, so BLAS does it in one
    call where the engine would plan and walk a tile per row.  Inputs with a
    NaN or an infinity go through the engine instead, for its non-finite
    policy (a padded key must not reach a row even as ``0 * inf``).
    """
    from ..engine.blocked import masked_softmax

    if not (np.isfinite(q).all() and np.isfinite(gk).all() and np.isfinite(gv).all()):
        return _engine(q, gk, gv, _full(q.shape[-2], gk.shape[-2]), scale, gm, serial)
    dt = np.dtype(np.float64 if np.result_type(q, gk, gv).itemsize >= 8 else np.float32)
    sc = dt.type(check_scale(scale, q.shape[-1]))
    q, gk, gv = (np.asarray(x, dtype=dt) for x in (q, gk, gv))
    s = np.matmul(q, np.swapaxes(gk, -1, -2))
    s *= sc
    allowed = np.ones(1, dtype=bool)
    if gm is not None:
        pad = np.asarray(gm, dtype=bool)
        allowed = ~pad.reshape(pad.shape[:-1] + ((1,) if q.ndim >= 3 else ()) + (1, pad.shape[-1]))
    return masked_softmax(s, allowed, gv)


def _merge_shared(part, q, shared, scale, serial, dv):
    """Merge the partial of every row against the shared global keys into ``part`` (``(out, lse)`` or None).

    Row tiles of :data:`SHARED_ROWS` at a time, merged in place, so the extra
    memory is a tile's, not a second output block and its float64 copies.
    """
    gk, gv, gm = shared
    n_rows, n_g = q.shape[-2], gk.shape[-2]
    for t0 in range(0, max(n_rows, 1), SHARED_ROWS):
        t1 = min(t0 + SHARED_ROWS, n_rows)
        g_out, g_lse = _shared_partial(q[..., t0:t1, :], gk, gv, gm, scale, serial)
        if part is None:  # no other keys: the shared partial is the block's result
            part = (np.empty(q.shape[:-1] + (dv,), dtype=g_out.dtype), np.empty(q.shape[:-1], dtype=g_lse.dtype))
            if not n_rows:
                return part
        else:
            g_out, g_lse = _merge([(part[0][..., t0:t1, :], part[1][..., t0:t1]), (g_out, g_lse)])
        part[0][..., t0:t1, :] = g_out
        part[1][..., t0:t1] = g_lse
    return part


def _write_rows(out, rows, part):
    """The block ``out`` with its split ``rows`` set from their merged partial ``part``.

    Writes in place when ``out`` is writeable: it is the block task's own
    result and this task its only reader, and writing the same rows again
    (a retried task) gives the same block.
    """
    out = out if out.flags.writeable else np.array(out, copy=True)
    out[..., rows, :] = part[0]
    return out


def _write_edge(out, e, edge):
    """The block ``out`` with its first ``e`` rows set from ``edge`` (as :func:`_write_rows`)."""
    return _write_rows(out, slice(0, e), (edge,))


def _after(*_):
    """A token: a dependency that orders a task after another without moving the other's result."""
    return None


def _long_partial(q_rows, k, v, mask, csr, scale, serial, after=None):
    """Split rows against one key block: ``(out, lse)``; ``csr`` None means every key of the block.

    ``after`` is an ordering token (unused): the partial waits for the block
    task that reads this key block, so that the key block is released when
    both are done rather than held from an early partial to a late block task.
    """
    n_rows, n_keys = q_rows.shape[-2], k.shape[-2]
    if csr is None:
        pattern = _full(n_rows, n_keys)
    else:
        indptr, indices = csr
        pattern = CSRPattern(indptr, indices, (n_rows, n_keys))
    return _engine(q_rows, k, v, pattern, scale, mask, serial)


def _rows_of(q, rows):
    return np.ascontiguousarray(q[..., rows, :])


def _empty_partial(q_rows, dv, dtype):
    shape = q_rows.shape[:-1]
    return np.zeros(shape + (dv,), dtype=dtype), np.full(shape, -np.inf, dtype=dtype)


# ------------------------------------------------------------------------------------------
# the per-block work lists (graph-build time)
# ------------------------------------------------------------------------------------------


def _structure(p):
    """``(left, right, globals)`` for a union of dilation-1 windows and global tokens, else None."""
    parts = p.parts if isinstance(p, Union) else (p,)
    left = right = None
    g = []
    for part in parts:
        if isinstance(part, SlidingWindow) and part.dilation == 1:
            left = part.left if left is None else max(left, part.left)
            right = part.right if right is None else max(right, part.right)
        elif isinstance(part, GlobalTokens):
            g.append(part.indices)
        else:
            return None
    glob = np.unique(np.concatenate(g)).astype(np.int64) if g else np.zeros(0, dtype=np.int64)
    return left, right, glob


def _ranges(bounds, lo, hi):
    """``[(j, local_lo, local_hi)]`` of the blocks (with edges ``bounds``) overlapping ``[lo, hi)``."""
    if hi <= lo:
        return []
    j0 = int(np.searchsorted(bounds, lo, side="right")) - 1
    j1 = int(np.searchsorted(bounds, hi, side="left"))
    return [(j, int(max(lo, bounds[j]) - bounds[j]), int(min(hi, bounds[j + 1]) - bounds[j])) for j in range(j0, j1)]


class _WindowPlan:
    """Work lists of a band (+ global tokens) pattern, from its parameters."""

    kind = "window"

    def __init__(self, left, right, glob, n_k, kb):
        self.left, self.right, self.glob, self.n_k, self.kb = left, right, glob, n_k, kb

    def block(self, a, b, from_a=False):
        """``(slices, shared, spec, long_rows, long_csr)`` for query rows ``[a, b)``.

        ``from_a``: only the keys from ``a`` on (no left halo; the rows
        ``[a, a + left)`` then miss keys and are computed by another task).
        """
        glob, n_k = self.glob, self.n_k
        slices, shift, gpos = [], 0, np.zeros(0, dtype=np.int64)
        if self.left is not None:
            kl = min(a if from_a else max(a - self.left, 0), n_k)
            kh = min(b + self.right, n_k)
            slices = _ranges(self.kb, kl, kh)
            shift = a - kl
            gpos = glob[(glob >= kl) & (glob < kh)] - kl
        long_rows = glob[(glob >= a) & (glob < b)]
        long_blocks = [(j, None) for j in range(len(self.kb) - 1)] if len(long_rows) else []
        spec = (self.left or 0, self.right or 0, shift, gpos, long_rows - a)
        return slices, len(glob) > 0, spec, long_rows, long_blocks

    def shared_sources(self):
        """``[(j, local_cols)]``: where the global keys live."""
        glob, kb = self.glob, self.kb
        blk = np.searchsorted(kb, glob, side="right") - 1
        return [(int(j), glob[blk == j] - kb[j]) for j in np.unique(blk)]


class _CSRPlan:
    """Work lists of any pattern, from ``pattern.rows(a, b)`` of each query block."""

    kind = "csr"

    def __init__(self, pattern, kb):
        self.pattern, self.kb = pattern, kb

    def block(self, a, b):
        m = self.pattern.rows(a, b)
        indptr, indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)
        counts = np.diff(indptr)
        kb = self.kb
        long_local = np.zeros(0, dtype=np.int64)
        if len(counts) and len(kb) > 2:
            thr = max(LONG_MIN, LONG_FACTOR * float(np.median(counts)))
            long_local = np.flatnonzero(counts > thr)
        row_long = np.zeros(len(counts), dtype=bool)
        row_long[long_local] = True
        nz_long = np.repeat(row_long, counts)
        cols = np.unique(indices[~nz_long])
        blk = np.searchsorted(kb, cols, side="right") - 1
        slices, gathers = [], []
        for j in np.unique(blk):
            c = cols[blk == j] - kb[j]
            if c[-1] - c[0] + 1 <= 2 * len(c):
                slices.append((int(j), int(c[0]), int(c[-1]) + 1))
            else:
                gathers.append((int(j), c))
        # the key columns the block task will hold, in the order it concatenates them
        pieces = sorted([(j, lo, hi, None) for j, lo, hi in slices] + [(j, None, None, c) for j, c in gathers], key=lambda t: t[0])
        held = [kb[j] + (np.arange(lo, hi) if c is None else c) for j, lo, hi, c in pieces]
        held = np.concatenate(held).astype(np.int64) if held else np.zeros(0, dtype=np.int64)
        long_blocks = []
        if len(long_local):
            lp = indptr[long_local]
            lc = counts[long_local]
            rows_of = np.repeat(np.arange(len(long_local)), lc)
            idx = indices[np.repeat(lp, lc) + (np.arange(int(lc.sum())) - np.repeat(np.cumsum(lc) - lc, lc))]
            lblk = np.searchsorted(kb, idx, side="right") - 1
            for j in np.unique(lblk):
                sel = lblk == j
                ptr = np.concatenate(([0], np.cumsum(np.bincount(rows_of[sel], minlength=len(long_local)))))
                long_blocks.append((int(j), (ptr, idx[sel] - kb[j])))
        spec = (self.pattern, a, b, held, long_local)
        return pieces, False, spec, long_local + a, long_blocks


# ------------------------------------------------------------------------------------------
# placement: contiguous shards of the sequence over the workers
# ------------------------------------------------------------------------------------------


class ContiguousShards:
    """Contiguous shards of the sequence axis over workers, as sequence-parallel systems place them.

    Worker ``i`` of ``W`` owns the positions ``[i n / W, (i + 1) n / W)`` of a
    sequence of length ``n``; a block of that axis belongs to the worker owning
    its middle row.  With 64 equal blocks on 2 workers, blocks 0-31 go to the
    first worker and 32-63 to the second.  Use the same object to place the
    generation (or loading) of the inputs, with :meth:`annotation` in a
    ``dask.annotate`` block, and the attention tasks, with
    ``sparse_attention(..., shards=shards)``: then every worker sweeps its own
    shard, and only halos, the global keys and split-row partials cross
    between workers.

    Parameters
    ----------
    workers : sequence of str, or a ``distributed.Client``
        Worker addresses, in shard order; a client stands for its workers'
        addresses, sorted.

    Examples
    --------
    >>> from sparseattn.dask import ContiguousShards
    >>> shards = ContiguousShards(["tcp://10.0.0.1:4000", "tcp://10.0.0.2:4000"])
    >>> chunks = (1000,) * 8                     # the sequence axis: 8 blocks
    >>> [shards.worker(chunks, j) for j in (0, 3, 4, 7)]
    ['tcp://10.0.0.1:4000', 'tcp://10.0.0.1:4000', 'tcp://10.0.0.2:4000', 'tcp://10.0.0.2:4000']
    >>> place = shards.annotation(chunks)        # for dask.annotate(workers=place)
    >>> place(("q-name", 0, 5, 0))               # a block key: (name, ..., block, 0)
    ['tcp://10.0.0.2:4000']
    """

    def __init__(self, workers):
        if type(workers).__name__ == "Client" and hasattr(workers, "scheduler_info"):
            workers = sorted(workers.scheduler_info(n_workers=-1)["workers"])
        if isinstance(workers, str) or not hasattr(workers, "__iter__"):
            raise TypeError(
                f"workers must be a sequence of worker addresses or a distributed Client, got {type(workers).__name__}"
            )
        workers = tuple(workers)
        if not workers:
            raise ValueError("workers must hold at least one worker address (got none)")
        bad = [w for w in workers if not isinstance(w, str)]
        if bad:
            raise TypeError(f"workers must be worker addresses (str), got {bad[0]!r}")
        if len(set(workers)) != len(workers):
            raise ValueError(f"workers holds the same address twice: {workers}")
        self.workers = workers

    def __repr__(self):
        return f"ContiguousShards({list(self.workers)!r})"

    def __eq__(self, other):
        return isinstance(other, ContiguousShards) and other.workers == self.workers

    def __hash__(self):
        return hash(self.workers)

    def __dask_tokenize__(self):
        return ("ContiguousShards", self.workers)

    @staticmethod
    def _bounds(chunks):
        if isinstance(chunks, (int, np.integer)) or not all(
            isinstance(c, (int, np.integer)) and c >= 0 for c in np.ravel(np.asarray(chunks, dtype=object))
        ):
            raise TypeError(f"chunks must be the block sizes of the sequence axis (a tuple of ints), got {chunks!r}")
        return np.concatenate(([0], np.cumsum(np.asarray(chunks, dtype=np.int64))))

    def _owners(self, bounds):
        n = int(bounds[-1])
        mid2 = bounds[:-1] + bounds[1:] - 1  # twice the middle row of each block
        return np.minimum(np.maximum(mid2, 0) * len(self.workers) // max(2 * n, 1), len(self.workers) - 1)

    def worker(self, chunks, j):
        """The address of the worker owning block ``j`` of a sequence axis chunked ``chunks``."""
        bounds = self._bounds(chunks)
        n_blocks = len(bounds) - 1
        if not isinstance(j, (int, np.integer)) or not -n_blocks <= j < n_blocks:
            raise IndexError(f"j must be a block index in [0, {n_blocks}) of chunks with {n_blocks} blocks, got {j!r}")
        return self.workers[int(self._owners(bounds)[j])]

    def annotation(self, chunks, index=-2):
        """A function of a task key giving its worker list, for ``dask.annotate(workers=...)``.

        ``index`` is the position of the sequence block's index in the keys
        of the arrays to place: ``-2`` (default) for q, k and v blocks
        ``(name, ..., j, 0)``, ``-1`` for a mask ``(name, ..., j)`` or one
        task per block ``(name, j)``.  Keys of another form (too short, or
        an index out of range) get no restriction (None).
        """
        bounds = self._bounds(chunks)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int (a position in the task keys), got {index!r}")
        owners = [self.workers[int(w)] for w in self._owners(bounds)]
        index = int(index)

        def place(key):
            if not isinstance(key, tuple) or not 1 <= (index if index >= 0 else len(key) + index) < len(key):
                return None
            j = key[index]
            if isinstance(j, (int, np.integer)) and 0 <= j < len(owners):
                return [owners[j]]
            return None

        return place


# ------------------------------------------------------------------------------------------
# the public function
# ------------------------------------------------------------------------------------------


def _check_input(name, x, da):
    if sp.issparse(x):
        raise TypeError(f"{name} must be a dense floating-point array, got a scipy sparse {type(x).__name__}")
    if not isinstance(x, (da.Array, np.ndarray)):
        raise TypeError(f"{name} must be a dask array or a NumPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a floating-point array (float32 or float64), got dtype {x.dtype} with shape {x.shape}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., n, d), got shape {x.shape}")
    if isinstance(x, da.Array) and any(np.isnan(c) for c in itertools.chain.from_iterable(x.chunks)):
        raise ValueError(f"{name} has unknown chunk sizes {x.chunks}; call {name}.compute_chunk_sizes() first")


def _wrap(x, like, da):
    """A NumPy input as a dask array, chunked along the sequence axis like ``like`` (one chunk otherwise)."""
    if isinstance(x, da.Array):
        return x
    seq = like.chunks[-2] if like is not None and like.shape[-2] == x.shape[-2] else -1
    return da.from_array(x, chunks=(-1,) * (x.ndim - 2) + (seq, -1))


def sparse_attention(q, k, v, pattern, *, scale=None, key_padding_mask=None, serial=True, pin=False, shards=None):
    """:func:`sparseattn.sparse_attention` on Dask arrays: a lazy result chunked like ``q``.

    Parameters
    ----------
    q : dask array, shape (..., n_q, d)
    k : dask array, shape (..., n_k, d)
    v : dask array, shape (..., n_k, d_v)
        Floating-point; chunked along the sequence axis and any leading
        (batch, heads) axes, with any chunk sizes (uneven, different for q
        and k, smaller than the window).  NumPy arrays are accepted next to
        Dask ones and wrapped, chunked along the sequence like a Dask input
        of the same length (else one chunk); at least one must be a Dask
        array.  The head dimension is rechunked to one chunk; ``v`` is
        rechunked to ``k``'s sequence chunks when they differ, and ``k`` and
        ``v`` to ``q``'s chunks on the leading axes.
    pattern : Pattern, scipy sparse matrix/array, 2-D bool ndarray, or a sequence of them
        As for :func:`sparseattn.sparse_attention` (a sequence: one per head,
        axis -3).
    scale : float, optional
        Multiplies the scores; defaults to ``1 / sqrt(d)``.
    key_padding_mask : bool NumPy or dask array, optional
        True marks a padded key; broadcasts like the local engine's (the
        leading shape without the heads axis, then ``n_k``).
    serial : bool
        True (default): every task runs the engine's kernels in its own worker
        thread (Dask supplies the parallelism; use as many threads per
        worker as cores).  False: every task uses the engine's thread pool
        (``numba.get_num_threads()`` threads), for workers started with
        ``threads_per_worker=1`` on machines with more cores than workers.
    pin : bool
        False (default): the scheduler places tasks; to balance load it may
        move whole input chunks between workers.  True: every task is
        restricted to the worker holding the block it reads most of (its
        query block, or the key block it slices or splits rows over), so
        only halos, global keys and split-row partials cross between
        workers.  Needs a ``distributed`` client and ``q`` and ``k`` whose
        blocks are in the workers' memory (``client.persist``).
    shards : ContiguousShards, optional
        Places every task with its home block (as ``pin=True`` does) by the
        block's index instead of by where it is held: a task reading query
        block ``i`` runs on ``shards.worker(q.chunks[-2], i)``, one reading
        key block ``j`` on ``shards.worker(k.chunks[-2], j)``.  The inputs
        need not exist yet: generate or load them under
        ``dask.annotate(workers=shards.annotation(chunks))`` with the same
        shards, and each worker sweeps its own contiguous range of blocks,
        holding about two blocks of each input at a time.  Cannot be
        combined with ``pin=True``.  The restrictions are strict (a task
        waits for its worker), and the synchronous and threaded schedulers
        ignore them.

    Returns
    -------
    dask array, shape (..., n_q, d_v)
        Chunked like ``q`` on every axis but the last (one chunk);
        dtype ``np.result_type(q, k, v)``.

    Examples
    --------
    Inputs generated on contiguous shards, and the attention placed with
    them (on a cluster, ``ContiguousShards(client)``; compute with
    ``dask.config.set({"optimization.fuse.active": False})`` or
    ``client.compute(..., optimize_graph=False)``: Dask's low-level fusion
    drops worker annotations):

    >>> import dask, numpy as np, dask.array as da, sparseattn as sa
    >>> from sparseattn.dask import ContiguousShards, sparse_attention
    >>> shards = ContiguousShards(["tcp://10.0.0.1:4000", "tcp://10.0.0.2:4000"])
    >>> chunks = ((1,), (250,) * 4, (16,))
    >>> with dask.annotate(workers=shards.annotation(chunks[1])):
    ...     q, k, v = (da.random.default_rng(i).standard_normal((1, 1000, 16), chunks=chunks) for i in range(3))
    >>> p = sa.sliding_window(1000, 32) | sa.global_tokens(1000, [0])
    >>> out = sparse_attention(q, k, v, p, shards=shards)
    >>> layer = out.__dask_graph__().layers[out.name]
    >>> layer.annotations["workers"]((out.name, 0, 3, 0))  # output block 3 runs on the second worker
    ['tcp://10.0.0.2:4000']
    >>> ref = sa.sparse_attention(*dask.compute(q, k, v, scheduler="synchronous"), p)
    >>> bool(np.allclose(out.compute(scheduler="synchronous"), ref, rtol=1e-11, atol=1e-12))
    True
    """
    da, HighLevelGraph = _import_dask()
    from dask.base import tokenize

    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_input(name, x, da)
    if not any(isinstance(x, da.Array) for x in (q, k, v)):
        raise TypeError(
            "sparseattn.dask.sparse_attention needs at least one dask array among q, k, v (got NumPy arrays only); "
            "use sparseattn.sparse_attention for NumPy arrays"
        )
    for flag, value in (("serial", serial), ("pin", pin)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if shards is not None and not isinstance(shards, ContiguousShards):
        raise TypeError(f"shards must be a sparseattn.dask.ContiguousShards or None, got {type(shards).__name__}")
    if shards is not None and pin:
        raise ValueError("pin=True and shards place the tasks in two ways: pass one of them")
    kd = k if isinstance(k, da.Array) else (v if isinstance(v, da.Array) else None)
    qd = q if isinstance(q, da.Array) else None
    k = _wrap(k, kd if kd is not None else qd, da)
    v = _wrap(v, k, da)
    q = _wrap(q, qd if qd is not None else k, da)
    # the same shape and pattern rules as the local engine
    lead, n_q, d, n_k, dv, patterns, per_head = check_shapes_and_patterns(q, k, v, pattern)
    scale = check_scale(scale, d)
    out_dtype = np.result_type(q.dtype, k.dtype, v.dtype)

    # -- layout: broadcast, one chunk along d, k/v chunked like q on the leading axes -------
    q = da.broadcast_to(q, lead + (n_q, d)) if q.shape[:-2] != lead else q
    q_user_chunks = q.chunks
    if per_head and any(c != 1 for c in q.chunks[-3]):
        q = q.rechunk({q.ndim - 3: 1})  # one head per task; the output is rechunked back
    q = q.rechunk({q.ndim - 1: -1})
    lead_chunks = q.chunks[:-2]
    k = da.broadcast_to(k, lead + (n_k, d)) if k.shape[:-2] != lead else k
    k = k.rechunk(lead_chunks + (k.chunks[-2], (d,)))
    k_chunks = k.chunks[-2]
    v = da.broadcast_to(v, lead + (n_k, dv)) if v.shape[:-2] != lead else v
    v = v.rechunk(lead_chunks + (k_chunks, (dv,)))
    mask = None
    if key_padding_mask is not None:
        mask = _prepare_mask(key_padding_mask, lead, n_k, lead_chunks, k_chunks, da)

    # -- work lists, one per distinct pattern ----------------------------------------------
    qb = np.concatenate(([0], np.cumsum(q.chunks[-2]))).astype(np.int64)
    kb = np.concatenate(([0], np.cumsum(k_chunks))).astype(np.int64)
    plans = []
    for p in patterns:
        st = _structure(p)
        plans.append(_WindowPlan(*st, n_k, kb) if st is not None else _CSRPlan(p, kb))

    token = tokenize(q.name, k.name, v.name, None if mask is None else mask.name,
                     [p.identity for p in patterns], scale, serial, per_head, pin, shards)  # fmt: skip
    name = f"sparse-attention-{token}"
    dsk = {}
    lead_blocks = list(itertools.product(*(range(len(c)) for c in lead_chunks)))
    blocks = [[None] * (len(qb) - 1) for _ in plans]  # work lists, per pattern and query block
    pattern_keys = {}
    home = {}  # task key -> the input block it reads most of (for pin=True)
    for pi, plan in enumerate(plans):
        if plan.kind == "csr":
            key = (f"{name}-pattern", pi)
            dsk[key] = plan.pattern
            pattern_keys[pi] = key
    q_owner = k_owner = None
    if shards is not None:
        q_owner, k_owner = shards._owners(qb), shards._owners(kb)

    def add_parts(pieces, i):
        """The keys, values and mask pieces of a work list: whole blocks, or slice / gather tasks."""
        kparts, vparts, mparts = [], [], []
        for piece in pieces:
            j, lo, hi = piece[:3]
            cols = piece[3] if len(piece) > 3 else None
            for arr, parts, bidx in ((k, kparts, lb + (j, 0)), (v, vparts, lb + (j, 0)), (mask, mparts, mb + (j,))):
                if arr is None:
                    continue
                src = (arr.name,) + bidx
                full = cols is None and lo == 0 and hi == kb[j + 1] - kb[j]
                if full:
                    parts.append(src)
                elif cols is None:
                    key = (f"{name}-slice-{arr.name}",) + bidx + (lo, hi)
                    dsk.setdefault(key, (_slice_rows, src, lo, hi))
                    parts.append(key)
                    home[key] = src
                    taken.setdefault(j, set()).add(key)
                else:
                    key = (f"{name}-gather-{arr.name}",) + bidx + (i,)
                    dsk[key] = (_take_cols, src, cols)
                    parts.append(key)
                    home[key] = src
                    taken.setdefault(j, set()).add(key)
        return kparts, vparts, mparts

    for lb in lead_blocks:
        pi = lb[-1] if per_head else 0
        plan = plans[pi]
        mb = lb[:-1] if lead else ()
        shared_key = None
        readers = {}  # key block j -> (rows read, the block task reading the most of it, its q block)
        pending = []  # query blocks with split rows
        after = {}  # ordering tokens of _add_long (key -> True)
        mains = []  # the block task of each query block
        splits = {}  # key block j -> the split-row partials over it
        taken = {}  # key block j -> the slices and gathers taken out of it (for any block task)
        for i in range(len(qb) - 1):
            a, b = int(qb[i]), int(qb[i + 1])
            if blocks[pi][i] is None:
                blocks[pi][i] = plan.block(a, b)
            pieces, uses_shared, spec, long_rows, long_blocks = blocks[pi][i]
            if uses_shared and shared_key is None:
                shared_key = _add_shared(dsk, name, lb, mb, plan, k, v, mask)
                for j, _ in plan.shared_sources():
                    taken.setdefault(j, set()).update(
                        (f"{name}-global-{arr.name}",) + bidx + (j,) for arr, bidx in ((k, lb), (v, lb), (mask, mb))
                        if arr is not None
                    )  # fmt: skip
            q_key = (q.name,) + lb + (i, 0)
            # a band block whose left halo comes from another shard's block (the first block of a
            # shard): that block is computed at the end of the other worker's sweep, so the rows
            # that see it, [a, a + left), are computed by a small edge task, and the block task
            # takes keys from a on (it need not wait, holding q, k and v of its block)
            edge = None
            if k_owner is not None and plan.kind == "window" and plan.left and plan.left < b - a:
                if any(kb[piece[0]] < a and k_owner[piece[0]] != q_owner[i] for piece in pieces):
                    e = int(plan.left)
                    pieces, uses_shared, spec, long_rows, long_blocks = plan.block(a, b, from_a=True)
                    edge_pieces, _, edge_spec, _, _ = plan.block(a, a + e)
                    edge = (e, edge_pieces, edge_spec)
            kparts, vparts, mparts = add_parts(pieces, i)
            if plan.kind == "csr":
                spec = (pattern_keys[pi],) + spec[1:]
            out_key = (name,) + lb + (i, 0)
            main_key = (f"{name}-main",) + lb + (i, 0) if len(long_rows) or edge else out_key
            dsk[main_key] = (
                _block_task, plan.kind, (tuple, list(spec)), q_key, kparts, vparts,
                mparts if mask is not None else None, shared_key, scale, serial, dv, out_dtype, [],
            )  # fmt: skip
            home[main_key] = q_key
            if edge is not None:
                e, edge_pieces, edge_spec = edge
                q_edge = (f"{name}-slice-{q.name}",) + lb + (i, 0, 0, e)
                dsk[q_edge] = (_slice_rows, q_key, 0, e)
                home[q_edge] = q_key
                dsk[main_key] = dsk[main_key][:-1] + ([q_edge],)  # q's block is released with the block task
                ek, ev, em = add_parts(edge_pieces, i)
                edge_key = (f"{name}-edge",) + lb + (i, 0)
                dsk[edge_key] = (
                    _block_task, "window", (tuple, list(edge_spec)), q_edge, ek, ev,
                    em if mask is not None else None, shared_key, scale, serial, dv, out_dtype, [],
                )  # fmt: skip
                home[edge_key] = q_key
                fixed_key = (f"{name}-edged",) + lb + (i, 0) if len(long_rows) else out_key
                dsk[fixed_key] = (_write_edge, main_key, e, edge_key)
                home[fixed_key] = q_key
                main_key_done = fixed_key
            else:
                main_key_done = main_key
            for piece in pieces:  # the block task reading most of key block j
                j, lo, hi = piece[:3]
                cols = piece[3] if len(piece) > 3 else None
                size = hi - lo if cols is None else len(cols)
                if size > readers.get(j, (0, None))[0]:
                    readers[j] = (size, main_key, q_key)
            if len(long_rows):
                pending.append((i, q_key, main_key, main_key_done, out_key, spec[-1], long_blocks))
            mains.append(main_key)
        # split rows last, once every block task of this block of the leading axes is known
        for i, q_key, block_key, main_key, out_key, long_local, long_blocks in pending:
            long_key = _add_long(dsk, home, name, lb, mb, i, q_key, long_local, long_blocks, k, v, mask, scale, serial,
                                 dv, out_dtype, readers, after, (q_owner, k_owner), splits)  # fmt: skip
            # the split rows' q rows are cut out before the block task, which then releases q's block, and
            # the split partial over the block's own keys can run right after it
            qrows = (f"{name}-qrows",) + lb + (i,)
            dsk[block_key] = dsk[block_key][:-1] + (dsk[block_key][-1] + [qrows],)
            dsk[out_key] = (_write_rows, main_key, long_local, long_key)
            home[out_key] = q_key
        # ... and, placed on shards, also for the split-row partials over the previous key block (small
        # results): else dask.order runs them later, and that key block is held meanwhile
        if q_owner is not None and plan.kind == "window":
            for i in range(1, len(mains)):
                if q_owner[i - 1] == q_owner[i] and k_owner[i - 1] == q_owner[i] and splits.get(i - 1):
                    task = dsk[mains[i]]
                    dsk[mains[i]] = task[:-1] + (task[-1] + splits[i - 1],)
        # the block task reading most of key block j also waits for everything else cut out of that
        # block (halo slices and gathers for other block tasks, global keys): then nothing is left to
        # hold key block j once it and its split partial have run
        for j, (_, main_key, _) in readers.items():
            task = dsk[main_key]
            own = set(task[4]) | set(task[5]) | set(task[6] or ())
            extra = sorted(taken.get(j, set()) - own, key=str)
            if extra:
                dsk[main_key] = task[:-1] + (task[-1] + extra,)
    deps = [x for x in (q, k, v, mask) if x is not None]
    if pin:
        graph = HighLevelGraph.from_collections(name, _pinned(dsk, home, deps), dependencies=deps)
    elif shards is not None:
        seq = {q.name: (q.chunks[-2], -2), k.name: (k_chunks, -2), v.name: (k_chunks, -2)}
        if mask is not None:
            seq[mask.name] = (k_chunks, -1)
        layer = _sharded(dsk, home, shards, seq)
        graph = HighLevelGraph.from_collections(name, layer, dependencies=deps)
    else:
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    out = da.Array(graph, name, lead_chunks + (q.chunks[-2], (dv,)), dtype=out_dtype)
    if out.chunks[:-1] != q_user_chunks[:-1]:
        out = out.rechunk(q_user_chunks[:-1] + ((dv,),))
    return out


def _future_of(key, inputs):
    """The future holding an input block (persisted arrays keep one per block in their graph), or None."""
    for arr in inputs:
        if key[0] == arr.name:
            value = arr.__dask_graph__().get(key)
            value = getattr(value, "value", value)  # a graph node wrapping the future
            return value if type(value).__name__ == "Future" else None
    return None


def _pinned(dsk, home, inputs):
    """A layer whose tasks are restricted to the workers holding their home input blocks."""
    from dask.highlevelgraph import MaterializedLayer

    try:
        from distributed import get_client
    except ImportError as exc:  # pragma: no cover
        raise ImportError("pin=True needs distributed") from exc
    try:
        client = get_client()
    except ValueError:
        raise ValueError("pin=True needs a distributed Client (none is active)") from None
    blocks = sorted(set(home.values()), key=str)
    futures = {key: _future_of(key, inputs) for key in blocks}
    who = client.who_has([f for f in futures.values() if f is not None])
    where = {}
    for key in blocks:
        f = futures[key]
        addrs = who.get(f.key) if f is not None else None
        if not addrs:
            raise ValueError(
                f"pin=True needs q and k held in the workers' memory (q, k = client.persist([q, k]) and wait), "
                f"but block {key} is not"
            )
        where[key] = list(addrs)
    workers = {task: where[src] for task, src in home.items()}
    return MaterializedLayer(
        dsk, annotations={"workers": workers.get, "allow_other_workers": lambda key: key not in workers}
    )


def _sharded(dsk, home, shards, seq):
    """A layer whose tasks are restricted to the shard of their home input blocks (``seq``: name -> chunks, index)."""
    from dask.highlevelgraph import MaterializedLayer

    places = {name: shards.annotation(chunks, index) for name, (chunks, index) in seq.items()}
    workers = {task: places[src[0]](src) for task, src in home.items()}
    return MaterializedLayer(dsk, annotations={"workers": workers.get})


def _prepare_mask(key_padding_mask, lead, n_k, lead_chunks, k_chunks, da):
    kpm = key_padding_mask
    if not isinstance(kpm, da.Array):
        kpm = np.asarray(kpm)
    if kpm.dtype != bool:
        raise TypeError(
            f"key_padding_mask must be a boolean array (True = padded key), got dtype {kpm.dtype}; "
            f"convert 0/1 attention masks with key_padding_mask = (attention_mask == 0)"
        )
    target = lead[:-1] + (n_k,)
    ok = 1 <= kpm.ndim <= len(target) and kpm.shape[-1] == n_k
    if ok:
        try:
            np.broadcast_shapes(kpm.shape, target)
            ok = np.broadcast_shapes(kpm.shape, target) == target
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"key_padding_mask has shape {kpm.shape} but must broadcast to {target} "
            f"(batch dims of q/k/v {lead} without the heads axis, then n_k = {n_k})"
        )
    if not isinstance(kpm, da.Array):
        kpm = da.from_array(np.ascontiguousarray(np.broadcast_to(kpm, target)), chunks=lead_chunks[:-1] + (k_chunks,))
    else:
        kpm = da.broadcast_to(kpm, target) if kpm.shape != target else kpm
        kpm = kpm.rechunk(lead_chunks[:-1] + (k_chunks,))
    return kpm


def _add_shared(dsk, name, lb, mb, plan, k, v, mask):
    """The small shared block of global keys for one block of the leading axes: ``(k, v, mask)``."""
    srcs = plan.shared_sources()
    out = []
    for arr, bidx in ((k, lb), (v, lb), (mask, mb)):
        if arr is None:
            out.append(None)
            continue
        parts = []
        for j, cols in srcs:
            key = (f"{name}-global-{arr.name}",) + bidx + (j,)
            dsk[key] = (_take_cols, (arr.name,) + bidx + ((j, 0) if arr is not mask else (j,)), cols)
            parts.append(key)
        ckey = (f"{name}-globals-{arr.name}",) + bidx
        dsk[ckey] = (_concat, parts, -2 if arr is not mask else -1)
        out.append(ckey)
    key = (f"{name}-shared",) + lb
    dsk[key] = (tuple, out)
    return key


def _add_long(dsk, home, name, lb, mb, i, q_key, long_local, long_blocks, k, v, mask, scale, serial, dv, out_dtype,
              readers, after, owners=(None, None), splits=None):  # fmt: skip
    """Split rows of query block ``i``: one partial per key block, a merge chain; returns its last key.

    The partial over key block ``j`` waits for a token of the block task that
    reads the most of that key block (``readers``; tokens cached in
    ``after``), so that the scheduler runs it next to that block task instead
    of generating or keeping every key block early for the split rows.
    """
    qrows = (f"{name}-qrows",) + lb + (i,)
    dsk[qrows] = (_rows_of, q_key, long_local)
    home[qrows] = q_key
    level = []
    for j, csr in long_blocks:
        key = (f"{name}-split",) + lb + (i, j)
        m_key = None if mask is None else (mask.name,) + mb + (j,)
        token = None
        if j in readers:
            _, reader, reader_q = readers[j]
            token = (f"{name}-after",) + reader[1:]
            q_owner, k_owner = owners
            if q_owner is not None and q_owner[reader_q[-2]] == k_owner[j]:
                token = reader  # placed on the same worker: wait for the block task itself (one step less)
            elif token not in after:
                dsk[token] = (_after, reader)
                home[token] = reader_q
                after[token] = True
        dsk[key] = (_long_partial, qrows, (k.name,) + lb + (j, 0), (v.name,) + lb + (j, 0), m_key,
                    None if csr is None else (tuple, list(csr)), scale, serial, token)  # fmt: skip
        home[key] = (k.name,) + lb + (j, 0)
        level.append(key)
        if splits is not None:
            splits.setdefault(j, []).append(key)
    if not level:
        key = (f"{name}-split",) + lb + (i, -1)
        dsk[key] = (_empty_partial, qrows, dv, out_dtype)
        return key
    acc = level[0]
    for step, g in enumerate(range(1, len(level), MERGE_FAN_IN - 1)):
        key = (f"{name}-merge",) + lb + (i, step)
        dsk[key] = (_merge_task, acc) + tuple(level[g : g + MERGE_FAN_IN - 1])
        home[key] = q_key
        acc = key
    return acc
