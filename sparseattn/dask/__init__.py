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

Modifiers: ``softcap``, ``alibi_slopes``, ``sinks`` and ``score_mod`` as in
the local engine, and grouped-query heads (``k``, ``v`` with ``h_kv`` heads,
read per block of query heads without copies).  ALiBi and ``score_mod`` see
the positions of the whole attention: every engine call of a task gets the
position of its own rows and keys (and a ``ScoreMod`` the batch index and
query head of each slice of its block).  A ``ScoreMod`` is compiled once per
worker process, on the first task that uses it.  Sinks carry no value, so
they are added once per output row, after its partials are merged.

The package holds one module per role: :mod:`~sparseattn.dask.api` (the
public function), :mod:`~sparseattn.dask.inputs` (argument checks and
layout), :mod:`~sparseattn.dask.plans` (the work list of every query block),
:mod:`~sparseattn.dask.graph` (the task graph),
:mod:`~sparseattn.dask.tasks` (what each task computes),
:mod:`~sparseattn.dask.shards` and :mod:`~sparseattn.dask.placement` (where
the tasks run); :mod:`~sparseattn.dask.demo` (``sparseattn dask-demo``) and
:mod:`~sparseattn.dask.probe` (worker memory) stand beside them.  Importing
the package does not import Dask; calling :func:`sparse_attention` does.

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

from .api import sparse_attention
from .shards import ContiguousShards

__all__ = ["ContiguousShards", "sparse_attention"]
