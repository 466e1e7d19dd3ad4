"""The task graph that follows the pattern: one block task per output block, and what it reads.

Per output block (query rows ``[a, b)``, one block of the leading axes), from
its plan (:mod:`sparseattn.dask.plans`):

* the key pieces it reads: whole key blocks, or **halo slices** and gathers
  taken by small tasks on the key block's side, so only those rows cross;
* the **shared global keys**, gathered once per block of the leading axes;
* its **split rows** (global rows, or rows much longer than the median): one
  partial per key block, computed next to the block task reading that key
  block, merged in a chain by log-sum-exp and written into the output block;
* placed on shards, the **edge rows** that see the previous shard's block,
  computed by a small task so that the block task need not wait for it.

The graph is a plain dict (``dsk``) of tuple tasks calling
:mod:`sparseattn.dask.tasks`, with ``home`` (task key -> the input block it
reads most of) for :mod:`sparseattn.dask.placement`.  Besides the data
dependencies, some tasks wait for small results (the last argument of
:func:`~sparseattn.dask.tasks.block_task`): they steer ``dask.order`` so that
each key block is released soon after the tasks reading it, instead of being
generated early or held for a late reader.
"""

from __future__ import annotations

import itertools

import numpy as np

from .tasks import (
    block_task,
    concat,
    empty_partial,
    long_partial,
    merge_task,
    order_token,
    rows_of,
    slice_rows,
    take_cols,
    write_edge,
    write_rows,
)

#: fan-in of each step of the log-sum-exp merge chain of split rows (2: a chain in key-block order,
#: which dask.order follows block by block; a balanced tree made it generate key blocks early)
MERGE_FAN_IN = 2


def build_graph(name, inputs, plans, qb, kb, shards):
    """The tasks of the output ``name``: ``(dsk, home)``.

    ``inputs``: the laid-out inputs (:class:`~sparseattn.dask.inputs.Inputs`);
    ``plans``: one per distinct pattern; ``qb``, ``kb``: the edges of the query
    and key blocks; ``shards``: a :class:`~sparseattn.dask.shards.ContiguousShards`
    or None (it changes the graph, not only where it runs).
    """
    return _GraphBuilder(name, inputs, plans, qb, kb, shards).build()


def slice_positions(lead, box):
    """``(S, 2)`` int64: the flattened batch index and the head, in the leading shape ``lead``, of each slice of the block ``box``.

    ``box`` holds one ``slice`` per leading axis; the block's slices are its
    index tuples in C order (as the engine flattens a block's leading axes).
    The batch index is the position over ``lead[:-1]`` (C order): with
    several batch axes chunked, a block's batch indices are not one range.
    None without leading axes (one slice: batch 0, head 0).
    """
    if not lead:
        return None
    axes = np.meshgrid(*(np.arange(s.start, s.stop, dtype=np.int64) for s in box), indexing="ij")
    idx = [a.reshape(-1) for a in axes]
    heads = idx[-1]
    batch = np.ravel_multi_index(idx[:-1], lead[:-1]) if len(lead) > 1 else np.zeros_like(heads)
    return np.ascontiguousarray(np.stack([batch, heads], axis=1), dtype=np.int64)


class _LeadBlock:
    """The bookkeeping of one block of the leading axes while its tasks are added."""

    def __init__(self, lb, mb, kvb, pi, plan, score):
        self.lb, self.mb, self.pi, self.plan = lb, mb, pi, plan  # block index, its mask index, pattern, plan
        self.kvb = kvb  # the index of its k and v blocks on the leading axes (grouped heads: fewer heads)
        self.score = score  # the tasks.Score of this block: the call's scale and softcap, its heads' slopes, sinks
        self.shared_key = None
        self.readers = {}  # key block j -> (rows read, the block task reading the most of it, its q block)
        self.pending = []  # query blocks with split rows
        self.after = {}  # ordering tokens of _add_long (key -> True)
        self.mains = []  # the block task of each query block
        self.splits = {}  # key block j -> the split-row partials over it
        self.taken = {}  # key block j -> the slices and gathers taken out of it (for any block task)


class _GraphBuilder:
    """Adds the tasks of every block of the leading axes to one dict, block by block."""

    def __init__(self, name, inputs, plans, qb, kb, shards):
        self.name, self.plans, self.qb, self.kb = name, plans, qb, kb
        self.q, self.k, self.v, self.mask = inputs.q, inputs.k, inputs.v, inputs.mask
        self.lead, self.lead_chunks, self.per_head = inputs.lead, inputs.lead_chunks, inputs.per_head
        self.scale, self.serial, self.dv, self.out_dtype = inputs.scale, inputs.serial, inputs.dv, inputs.out_dtype
        self.kv_heads = inputs.kv_heads  # q's head block -> k's and v's (grouped heads), or None
        self.slopes, self.sinks = inputs.slopes, inputs.sinks  # (lead) arrays, or None
        self.lead_bounds = [np.concatenate(([0], np.cumsum(c))).astype(np.int64) for c in self.lead_chunks]
        self.dsk = {}
        self.home = {}  # task key -> the input block it reads most of (for pin=True)
        self.blocks = [[None] * (len(qb) - 1) for _ in plans]  # work lists, per pattern and query block
        self.pattern_keys = {}
        self.q_owner = self.k_owner = None
        if shards is not None:
            self.q_owner, self.k_owner = shards._owners(qb), shards._owners(kb)

    def build(self):
        """``(dsk, home)``: the patterns of the generic path first (one node each, shipped once), then the blocks."""
        name, dsk = self.name, self.dsk
        for pi, plan in enumerate(self.plans):
            if plan.kind == "csr":
                key = (f"{name}-pattern", pi)
                dsk[key] = plan.pattern
                self.pattern_keys[pi] = key
        for lb in itertools.product(*(range(len(c)) for c in self.lead_chunks)):
            self._add_lead_block(lb)
        return dsk, self.home

    def _add_lead_block(self, lb):
        """Every task of block ``lb`` of the leading axes: block tasks, then split rows, then the ordering."""
        pi = lb[-1] if self.per_head else 0
        kvb = lb if self.kv_heads is None else lb[:-1] + (self.kv_heads[lb[-1]],)
        blk = _LeadBlock(lb, lb[:-1] if self.lead else (), kvb, pi, self.plans[pi], self._score(lb))
        for i in range(len(self.qb) - 1):
            self._add_block(blk, i)
        # split rows last, once every block task of this block of the leading axes is known
        for i, q_key, block_key, done_key, out_key, long_local, long_blocks in blk.pending:
            long_key = self._add_long(blk, i, q_key, long_local, long_blocks)
            # the split rows' q rows are cut out before the block task, which then releases q's block, and
            # the split partial over the block's own keys can run right after it
            qrows = (f"{self.name}-qrows",) + lb + (i,)
            self._wait(block_key, [qrows])
            self.dsk[out_key] = (write_rows, done_key, long_local, long_key, blk.score)
            self.home[out_key] = q_key
        self._order_split_partials(blk)
        self._order_cuts(blk)

    def _score(self, lb):
        """The :class:`~sparseattn.dask.tasks.Score` of block ``lb``: the slopes and sinks of its query heads.

        With a ``score_mod``, also the batch index and query head in the whole
        call of each slice of the block (``bh``, what the user's function receives).
        """
        if self.slopes is None and self.sinks is None and self.scale.score_mod is None:
            return self.scale
        box = tuple(slice(int(b[i]), int(b[i + 1])) for b, i in zip(self.lead_bounds, lb))

        def cut(x):
            if x is None:
                return None
            y = np.ascontiguousarray(x[box])
            return y if y.ndim else y.reshape(1)

        bh = None if self.scale.score_mod is None else slice_positions(self.lead, box)
        return self.scale._replace(slopes=cut(self.slopes), sinks=cut(self.sinks), bh=bh)

    def _wait(self, key, extra):
        """Task ``key`` (a block task) also waits for ``extra``: appended to its last argument."""
        task = self.dsk[key]
        self.dsk[key] = task[:-1] + (task[-1] + extra,)

    def _block_node(self, blk, kind, spec, a, q_key, parts, shared_key):
        """A :func:`~sparseattn.dask.tasks.block_task` node; it waits for nothing yet (its last argument)."""
        kparts, vparts, mparts = parts
        return (
            block_task, kind, (tuple, list(spec)), q_key, kparts, vparts,
            mparts if self.mask is not None else None, shared_key, blk.score, self.serial, self.dv,
            self.out_dtype, a, [],
        )  # fmt: skip

    def _add_block(self, blk, i):
        """The block task of query block ``i`` (and its edge task), its reads noted for the ordering."""
        name, plan, lb = self.name, blk.plan, blk.lb
        a, b = int(self.qb[i]), int(self.qb[i + 1])
        if self.blocks[blk.pi][i] is None:
            self.blocks[blk.pi][i] = plan.block(a, b)
        pieces, uses_shared, spec, long_rows, long_blocks = self.blocks[blk.pi][i]
        if uses_shared and blk.shared_key is None:
            blk.shared_key = self._add_shared(blk)
        q_key = (self.q.name,) + lb + (i, 0)
        # a band block whose left halo comes from another shard's block (the first block of a
        # shard): that block is computed at the end of the other worker's sweep, so the rows
        # that see it, [a, a + left), are computed by a small edge task, and the block task
        # takes keys from a on (it need not wait, holding q, k and v of its block)
        edge = None
        k_owner, q_owner = self.k_owner, self.q_owner
        if (
            k_owner is not None
            and plan.kind == "window"
            and plan.left
            and plan.left < b - a
            and any(self.kb[piece[0]] < a and k_owner[piece[0]] != q_owner[i] for piece in pieces)
        ):
            e = int(plan.left)
            pieces, uses_shared, spec, long_rows, long_blocks = plan.block(a, b, from_a=True)
            edge_pieces, _, edge_spec, _, _ = plan.block(a, a + e)
            edge = (e, edge_pieces, edge_spec)
        parts = self._add_parts(blk, pieces, i)
        if plan.kind == "csr":
            spec = (self.pattern_keys[blk.pi],) + spec[1:]
        out_key = (name,) + lb + (i, 0)
        main_key = (f"{name}-main",) + lb + (i, 0) if len(long_rows) or edge else out_key
        self.dsk[main_key] = self._block_node(blk, plan.kind, spec, a, q_key, parts, blk.shared_key)
        self.home[main_key] = q_key
        done_key = main_key  # the block task, or the task writing its edge rows into it
        if edge is not None:
            done_key = (f"{name}-edged",) + lb + (i, 0) if len(long_rows) else out_key
            self._add_edge(blk, i, a, q_key, main_key, edge, done_key)
        for piece in pieces:  # the block task reading most of key block j
            j, lo, hi = piece[:3]
            cols = piece[3] if len(piece) > 3 else None
            size = hi - lo if cols is None else len(cols)
            if size > blk.readers.get(j, (0, None))[0]:
                blk.readers[j] = (size, main_key, q_key)
        if len(long_rows):
            blk.pending.append((i, q_key, main_key, done_key, out_key, spec[-1], long_blocks))
        blk.mains.append(main_key)

    def _add_edge(self, blk, i, a, q_key, main_key, edge, done_key):
        """The edge task of query block ``i`` (rows ``[a, a + e)``), written into its block task's result by ``done_key``."""
        name, lb, dsk, home = self.name, blk.lb, self.dsk, self.home
        e, edge_pieces, edge_spec = edge
        q_edge = (f"{name}-slice-{self.q.name}",) + lb + (i, 0, 0, e)
        dsk[q_edge] = (slice_rows, q_key, 0, e)
        home[q_edge] = q_key
        dsk[main_key] = dsk[main_key][:-1] + ([q_edge],)  # q's block is released with the block task
        edge_parts = self._add_parts(blk, edge_pieces, i)
        edge_key = (f"{name}-edge",) + lb + (i, 0)
        dsk[edge_key] = self._block_node(blk, "window", edge_spec, a, q_edge, edge_parts, blk.shared_key)
        home[edge_key] = q_key
        dsk[done_key] = (write_edge, main_key, e, edge_key)
        home[done_key] = q_key

    def _add_parts(self, blk, pieces, i):
        """The keys, values and mask pieces of a work list: whole blocks, or slice / gather tasks."""
        name, dsk, home, taken = self.name, self.dsk, self.home, blk.taken
        kvb, mb, kb = blk.kvb, blk.mb, self.kb
        kparts, vparts, mparts = [], [], []
        for piece in pieces:
            j, lo, hi = piece[:3]
            cols = piece[3] if len(piece) > 3 else None
            for arr, parts, bidx in ((self.k, kparts, kvb + (j, 0)), (self.v, vparts, kvb + (j, 0)),
                                     (self.mask, mparts, mb + (j,))):  # fmt: skip
                if arr is None:
                    continue
                src = (arr.name,) + bidx
                full = cols is None and lo == 0 and hi == kb[j + 1] - kb[j]
                if full:
                    parts.append(src)
                elif cols is None:
                    key = (f"{name}-slice-{arr.name}",) + bidx + (lo, hi)
                    dsk.setdefault(key, (slice_rows, src, lo, hi))
                    parts.append(key)
                    home[key] = src
                    taken.setdefault(j, set()).add(key)
                else:
                    # the columns are those of pattern pi's query block i (several head blocks may share it)
                    key = (f"{name}-gather-{arr.name}",) + bidx + (blk.pi, i)
                    dsk.setdefault(key, (take_cols, src, cols))
                    parts.append(key)
                    home[key] = src
                    taken.setdefault(j, set()).add(key)
        return kparts, vparts, mparts

    def _add_shared(self, blk):
        """The small shared block of global keys for one block of the leading axes: ``(k, v, mask)``."""
        name, lb, mb, kvb, pi = self.name, blk.lb, blk.mb, blk.kvb, blk.pi
        srcs = blk.plan.shared_sources()
        out = []
        # keyed by the input block and the pattern: head blocks sharing both (grouped heads) share them
        for arr, bidx in ((self.k, kvb), (self.v, kvb), (self.mask, mb)):
            if arr is None:
                out.append(None)
                continue
            parts = []
            for j, cols in srcs:
                key = (f"{name}-global-{arr.name}",) + bidx + (pi, j)
                self.dsk.setdefault(key, (take_cols, (arr.name,) + bidx + ((j, 0) if arr is not self.mask else (j,)), cols))
                parts.append(key)
            ckey = (f"{name}-globals-{arr.name}",) + bidx + (pi,)
            self.dsk.setdefault(ckey, (concat, parts, -2 if arr is not self.mask else -1))
            out.append(ckey)
        key = (f"{name}-shared",) + lb
        self.dsk[key] = (tuple, out + [blk.plan.glob])  # (k, v, mask, the keys' positions)
        for j, _ in blk.plan.shared_sources():
            blk.taken.setdefault(j, set()).update(
                (f"{name}-global-{arr.name}",) + bidx + (pi, j)
                for arr, bidx in ((self.k, kvb), (self.v, kvb), (self.mask, mb)) if arr is not None
            )  # fmt: skip
        return key

    def _add_long(self, blk, i, q_key, long_local, long_blocks):
        """Split rows of query block ``i``: one partial per key block, a merge chain; returns its last key.

        The partial over key block ``j`` waits for a token of the block task that
        reads the most of that key block (``readers``; tokens cached in
        ``after``), so that the scheduler runs it next to that block task instead
        of generating or keeping every key block early for the split rows.
        """
        name, lb, mb, kvb, dsk, home = self.name, blk.lb, blk.mb, blk.kvb, self.dsk, self.home
        k, v, mask = self.k, self.v, self.mask
        qrows = (f"{name}-qrows",) + lb + (i,)
        dsk[qrows] = (rows_of, q_key, long_local)
        home[qrows] = q_key
        level = []
        for j, csr in long_blocks:
            key = (f"{name}-split",) + lb + (i, j)
            m_key = None if mask is None else (mask.name,) + mb + (j,)
            token = None
            if j in blk.readers:
                _, reader, reader_q = blk.readers[j]
                token = (f"{name}-after",) + reader[1:]
                if self.q_owner is not None and self.q_owner[reader_q[-2]] == self.k_owner[j]:
                    token = reader  # placed on the same worker: wait for the block task itself (one step less)
                elif token not in blk.after:
                    dsk[token] = (order_token, reader)
                    home[token] = reader_q
                    blk.after[token] = True
            dsk[key] = (long_partial, qrows, (k.name,) + kvb + (j, 0), (v.name,) + kvb + (j, 0), m_key,
                        None if csr is None else (tuple, list(csr)), blk.score, self.serial, token,
                        long_local + int(self.qb[i]), int(self.kb[j]))  # fmt: skip
            home[key] = (k.name,) + kvb + (j, 0)
            level.append(key)
            blk.splits.setdefault(j, []).append(key)
        if not level:
            key = (f"{name}-split",) + lb + (i, -1)
            dsk[key] = (empty_partial, qrows, self.dv, self.out_dtype)
            return key
        acc = level[0]
        for step, g in enumerate(range(1, len(level), MERGE_FAN_IN - 1)):
            key = (f"{name}-merge",) + lb + (i, step)
            dsk[key] = (merge_task, acc) + tuple(level[g : g + MERGE_FAN_IN - 1])
            home[key] = q_key
            acc = key
        return acc

    def _order_split_partials(self, blk):
        """Placed on shards, a band block task also waits for the split-row partials over the previous key block.

        They are small results: else dask.order runs them later, and that key
        block is held meanwhile.
        """
        q_owner, k_owner, mains = self.q_owner, self.k_owner, blk.mains
        if q_owner is None or blk.plan.kind != "window":
            return
        for i in range(1, len(mains)):
            if q_owner[i - 1] == q_owner[i] and k_owner[i - 1] == q_owner[i] and blk.splits.get(i - 1):
                self._wait(mains[i], blk.splits[i - 1])

    def _order_cuts(self, blk):
        """The block task reading most of key block j also waits for everything else cut out of that block.

        Halo slices and gathers for other block tasks, global keys: then
        nothing is left to hold key block j once it and its split partial
        have run.
        """
        for j, (_, main_key, _) in blk.readers.items():
            task = self.dsk[main_key]
            own = set(task[4]) | set(task[5]) | set(task[6] or ())
            extra = sorted(blk.taken.get(j, set()) - own, key=str)
            if extra:
                self._wait(main_key, extra)
