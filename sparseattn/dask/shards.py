"""Contiguous shards of the sequence axis over the workers (:class:`ContiguousShards`).

One object places both the inputs (through :meth:`ContiguousShards.annotation`
in a ``dask.annotate`` block) and the attention tasks
(``sparse_attention(..., shards=shards)``, applied by
:mod:`sparseattn.dask.placement`), so that each worker sweeps its own range
of blocks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ContiguousShards"]


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
