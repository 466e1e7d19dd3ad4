"""The mask half of ``attn_implementation="sparseattn"``: transformers' mask arguments become patterns, never n x n.

transformers builds each layer kind's mask through the function registered in
``AttentionMaskInterface``: it passes the lengths and cache offsets, the 2-D
padding mask and ``mask_function``, an opaque ``(batch, head, q_idx, kv_idx)``
predicate composed by ``masking_utils`` (``and_masks`` of a causal or
bidirectional base, a sliding-window overlay, and for packed sequences a
position remap and a same-document test).  :func:`sparse_mask` reads that
composition instead of evaluating it:

* it walks ``and_masks`` closures down to their leaves and recognises each leaf
  by its code object: ``causal_mask_function`` (key <= query),
  ``bidirectional_mask_function`` (no limit), ``sliding_window_overlay(W)``
  (key > query - W), ``sliding_window_bidirectional_overlay(W)``
  (|query - key| <= W), ``packed_sequence_mask_function(ids)`` (same document)
  and ``remap_positions_for_packed_sequence`` (positions that restart; within a
  document they are the indices shifted, so the window leaves keep their
  meaning);
* the leaves intersect into one window ``[i + offset - left, i + offset + right]``
  with ``offset = q_offset - kv_offset`` (absolute positions: query ``i`` is at
  ``i + q_offset``, key ``j`` at ``j + kv_offset``), which becomes
  :func:`~sparseattn.causal` or :func:`~sparseattn.sliding_window` (planned from
  their parameters by the engine, O(n)), or, with documents, one run of keys per
  row (:class:`RowRuns`, O(n) parameters);
* anything else (``or_masks``, chunked or blockwise overlays, a user's own
  function) is evaluated in row blocks of bounded size with
  :func:`~sparseattn.patterns.from_predicate` (O(n_q n_k) time, never an
  n x n array), once per batch row, with a warning naming the function.

The padding mask becomes the engine's ``key_padding_mask`` (True = padded key),
cut to the layer's keys as transformers cuts it (``prepare_padding_mask``).  A
query row whose keys are all padded (left padding under a causal mask) has no
key: the engine returns zeros there, where ``eager`` returns an average of
masked values; neither reaches a non-padded position.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from ..patterns.base import Pattern
from ..patterns.csr import counts_to_indptr, ranges_to_indices
from ..patterns.explicit import from_predicate
from ..patterns.windows import causal, sliding_window

__all__ = ["RowRuns", "SparseMask", "sparse_mask"]


class RowRuns(Pattern):
    """Query ``i`` sees the keys ``lo[i] .. hi[i] - 1``: one run per row (windows cut at document borders)."""

    name = "row_runs"

    def __init__(self, lo, hi, n_k):
        lo = np.ascontiguousarray(lo, dtype=np.int64)
        hi = np.maximum(np.ascontiguousarray(hi, dtype=np.int64), lo)
        super().__init__((len(lo), int(n_k)))
        self.lo, self.hi = lo, hi
        h = hashlib.blake2b(digest_size=16)
        h.update(lo.tobytes())
        h.update(hi.tobytes())
        self._digest = h.hexdigest()

    @property
    def identity(self):
        return ("row_runs", self.shape, self._digest)

    def _row_counts(self, start, stop):
        return self.hi[start:stop] - self.lo[start:stop]

    def _rows(self, start, stop):
        counts = self._row_counts(start, stop)
        return counts_to_indptr(counts), ranges_to_indices(self.lo[start:stop], counts)

    def describe(self):
        return f"row_runs({self.shape[0]} rows)"


class SparseMask:
    """What :func:`sparse_mask` hands the attention function instead of a mask tensor.

    Attributes
    ----------
    patterns : Pattern or list of Pattern
        One pattern of shape ``(q_length, kv_length)`` shared by every batch
        row, or a list with one per batch row (packed rows with different
        documents, a per-row predicate).
    key_padding_mask : ndarray of bool, shape (batch, kv_length), or None
        True where a key is padding (removed from every row).
    kind : str
        How the layer was recognised: ``"causal"``, ``"sliding causal"``,
        ``"bidirectional"``, ``"sliding bidirectional"``, with ``" packed"``
        for documents, or ``"predicate"`` (evaluated in row blocks).
    """

    __slots__ = ("batch_size", "key_padding_mask", "kind", "kv_length", "patterns", "q_length")

    def __init__(self, patterns, key_padding_mask, kind, batch_size, q_length, kv_length):
        self.patterns, self.key_padding_mask, self.kind = patterns, key_padding_mask, kind
        self.batch_size, self.q_length, self.kv_length = batch_size, q_length, kv_length

    @property
    def shape(self):
        """``(batch, 1, q_length, kv_length)``, the shape of the mask tensor it stands for."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def pattern_of(self, b):
        """The pattern of batch row ``b``."""
        return self.patterns[b] if isinstance(self.patterns, list) else self.patterns

    def __repr__(self):
        pads = 0 if self.key_padding_mask is None else int(self.key_padding_mask.sum())
        shared = "shared" if not isinstance(self.patterns, list) else "per batch row"
        return f"SparseMask({self.kind}, shape={self.shape}, {shared}, {pads} padded keys)"


class _Unrecognised(Exception):
    pass


def _cells(fn):
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in closure))) if code is not None else {}


def _known_codes(mu):
    """The code objects of masking_utils' closures, made once from its own factories.

    transformers 4.x has no bidirectional overlay and no position remap (packed documents are index-based
    there), 4.53.0 no packed-sequence mask: a factory it lacks has no code to match.
    """
    codes = {
        "and": mu.and_masks(mu.causal_mask_function).__code__,
        "sliding": mu.sliding_window_overlay(1).__code__,
    }
    if hasattr(mu, "packed_sequence_mask_function"):  # 4.53.0 has no packed-sequence masks
        codes["docs"] = mu.packed_sequence_mask_function(None).__code__
    if hasattr(mu, "sliding_window_bidirectional_overlay"):
        codes["band"] = mu.sliding_window_bidirectional_overlay(1).__code__
    if hasattr(mu, "remap_positions_for_packed_sequence"):
        codes["remap"] = mu.remap_positions_for_packed_sequence(mu.causal_mask_function, None).__code__
    return codes


def _leaves(fn, mu, codes):
    """The constraints of an ``and_masks`` tree: ("right", 0), ("left", L), ("docs", ids), ("remap", pos)."""
    if fn is mu.causal_mask_function:
        return [("right", 0)]
    if fn is getattr(mu, "bidirectional_mask_function", None):
        return []
    code, cells = getattr(fn, "__code__", None), _cells(fn)
    if code is None:
        raise _Unrecognised
    if code is codes["and"]:
        return [leaf for f in cells["mask_functions"] for leaf in _leaves(f, mu, codes)]
    if code is codes["sliding"]:  # kv > q - W: W keys up to the query
        return [("left", int(cells["sliding_window"]) - 1)]
    if code is codes.get("band"):  # |q - kv| <= W
        w = int(cells["sliding_window"])
        return [("left", w), ("right", w)]
    if code is codes.get("docs"):
        return [("docs", cells["packed_sequence_mask"])]
    if code is codes.get("remap"):
        return [("remap", cells["position_ids"]), *_leaves(cells["mask_function"], mu, codes)]
    raise _Unrecognised


def _structure(mask_function):
    """(left, right, docs, positions) of a recognised mask function; None bounds mean unlimited."""
    from transformers import masking_utils as mu

    leaves = _leaves(mask_function, mu, _known_codes(mu))
    left = right = docs = positions = None
    for kind, value in leaves:
        if kind == "left":
            left = value if left is None else min(left, value)
        elif kind == "right":
            right = value if right is None else min(right, value)
        elif kind == "docs":
            if docs is not None:
                raise _Unrecognised
            docs = value
        else:
            positions = value
    if positions is not None and docs is None:  # a remap without documents is not index-based
        raise _Unrecognised
    if docs is not None and positions is None:
        if hasattr(mu, "remap_positions_for_packed_sequence"):  # 5.x remaps packed positions; without it, not ours
            raise _Unrecognised
        positions = "indices"  # 4.x: the window leaves see the indices themselves
    return left, right, docs, positions


def _kind(left, right, docs):
    base = "causal" if right == 0 else "bidirectional"
    sliding = "sliding " if left is not None or (right not in (None, 0)) else ""
    return sliding + base + (" packed" if docs is not None else "")


def _window(n_q, n_k, left, right, offset):
    """The window ``[i + offset - left, i + offset + right]`` (None = unlimited) over n_k keys, O(1) parameters."""
    if n_q == 0 or n_k == 0:
        return RowRuns(np.zeros(n_q, np.int64), np.zeros(n_q, np.int64), n_k)
    if left is None and right is None:  # full: a band wider than the keys, planned like any band
        return sliding_window(n_q, left=n_q + n_k, right=n_q + n_k, n_k=n_k, offset=0)
    if -n_q < offset < n_k:
        if right == 0:
            return causal(n_q, left, n_k=n_k, offset=offset)
        big = n_q + n_k + abs(offset)
        return sliding_window(
            n_q, left=big if left is None else left, right=big if right is None else right, n_k=n_k, offset=offset
        )
    return _runs(n_q, n_k, left, right, offset, np.zeros(n_q, np.int64), np.full(n_q, n_k, np.int64))


def _runs(n_q, n_k, left, right, offset, start, stop):
    """Rows as runs: the window cut to ``[start[i], stop[i])`` (a row's document)."""
    c = np.arange(n_q, dtype=np.int64) + offset
    lo = start if left is None else np.maximum(start, c - left)
    hi = stop if right is None else np.minimum(stop, c + right + 1)
    return RowRuns(np.clip(lo, 0, n_k), np.clip(hi, 0, n_k), n_k)


def _document_patterns(docs, positions, n, left, right):
    """One RowRuns per batch row of packed documents (ids that change where a document starts)."""
    ids = np.asarray(docs.detach().cpu().numpy(), dtype=np.int64)
    if isinstance(positions, str):  # "indices": transformers 4.x, no remap
        positions = np.arange(ids.shape[-1], dtype=np.int64)
    else:
        positions = positions.detach().cpu().numpy()
    pos = np.asarray(positions, dtype=np.int64)
    if ids.shape[-1] != n or pos.shape[-1] != n:
        raise _Unrecognised
    pos = np.broadcast_to(pos, ids.shape)
    out, seen = [], {}
    for b in range(ids.shape[0]):
        key = ids[b].tobytes()
        if key not in seen:
            new = np.flatnonzero(np.diff(ids[b]) != 0) + 1
            same_doc_steps = np.ones(n - 1, dtype=bool) if n > 1 else np.zeros(0, bool)
            same_doc_steps[new - 1] = False
            if np.any(np.diff(pos[b])[same_doc_steps] != 1):  # positions inside a document must count up by 1
                raise _Unrecognised
            starts = np.concatenate([[0], new])
            ends = np.concatenate([new, [n]])
            doc = np.repeat(np.arange(len(starts)), ends - starts)
            seen[key] = _runs(n, n, left, right, 0, starts[doc], ends[doc])
        out.append(seen[key])
    return out


_warned = set()


def _predicate_patterns(mask_function, batch_size, n_q, n_k, q_offset, kv_offset):
    """An unrecognised mask function, evaluated in row blocks per batch row (bounded memory)."""
    import torch

    name = getattr(mask_function, "__qualname__", repr(mask_function))
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"sparseattn: mask function {name} is not one of transformers' causal, bidirectional, sliding-window or "
            f"packed-sequence masks; it is evaluated in row blocks (O(q_length * kv_length) time per batch row, "
            f"bounded memory), which is exact but slow for long sequences",
            stacklevel=3,
        )
    head = torch.zeros((), dtype=torch.long)
    out, seen = [], {}
    for b in range(batch_size):
        bt = torch.tensor(b)

        def fn(i, j, bt=bt):
            qi, kj = torch.from_numpy(i + q_offset), torch.from_numpy(j + kv_offset)
            with torch.no_grad():
                m = mask_function(bt, head, qi, kj)
            return np.broadcast_to(np.asarray(torch.as_tensor(m).cpu().numpy(), dtype=bool), (len(i), n_k))

        p = from_predicate(fn, n_q, n_k)
        out.append(seen.setdefault(p.identity, p))
    return out[0] if len(seen) == 1 else out


def _key_padding(attention_mask, kv_length, kv_offset):
    """transformers' 2-D mask (True/1 = a real token) as the engine's key_padding_mask (True = padded), or None."""
    if attention_mask is None:
        return None
    am = attention_mask.detach().cpu().numpy().astype(bool, copy=False)
    if am.ndim != 2:
        raise ValueError(
            f"attention_mask must be the 2-D padding mask (batch, length) here, got shape {tuple(attention_mask.shape)}"
        )
    need = kv_offset + kv_length
    if am.shape[1] < need:  # as prepare_padding_mask: positions beyond the mask are not attended
        am = np.concatenate([am, np.zeros((am.shape[0], need - am.shape[1]), bool)], axis=1)
    kpm = ~am[:, kv_offset:need]
    return np.ascontiguousarray(kpm) if kpm.any() else None


def sparse_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, local_size=None, cache_position=None, **kwargs):  # fmt: skip
    """The ``AttentionMaskInterface`` function of ``"sparseattn"``: a :class:`SparseMask`, never an n x n tensor.

    Takes the arguments of ``transformers.masking_utils.sdpa_mask`` (the others,
    e.g. ``allow_is_causal_skip``, ``dtype``, ``config``, are accepted and not
    needed).  transformers 4.x passes the queries' positions as
    ``cache_position`` (consecutive) instead of ``q_length`` and ``q_offset``;
    both forms are accepted.  See the module docstring for how the layer kind
    is recognised.
    """
    if cache_position is not None:
        pos = np.asarray(cache_position.detach().cpu().numpy() if hasattr(cache_position, "detach") else cache_position,
                         dtype=np.int64).reshape(-1)  # fmt: skip
        if len(pos) and np.any(np.diff(pos) != 1):
            raise ValueError(f"cache_position must be consecutive positions, got {pos.tolist()[:16]}")
        q_length, q_offset = len(pos), (int(pos[0]) if len(pos) else 0)
    if q_length is None or kv_length is None:
        raise TypeError("sparse_mask needs q_length (or cache_position) and kv_length")
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    kpm = _key_padding(attention_mask, kv_length, kv_offset)
    try:
        left, right, docs, positions = _structure(mask_function)
        if docs is not None:
            if q_offset or kv_offset or q_length != kv_length:
                raise _Unrecognised
            pats = _document_patterns(docs, positions, q_length, left, right)
            patterns = pats[0] if all(p is pats[0] for p in pats) else pats
        else:
            patterns = _window(q_length, kv_length, left, right, q_offset - kv_offset)
        kind = _kind(left, right, docs)
    except _Unrecognised:
        patterns = _predicate_patterns(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset)
        kind = "predicate"
    return SparseMask(patterns, kpm, kind, batch_size, q_length, kv_length)
