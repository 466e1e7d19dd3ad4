"""Reach sets as word-packed bitsets: the kernels of ``sparseattn.analysis``.

A reach set of ``n`` tokens is ``ceil(n / 64)`` ``uint64`` words (token ``t`` is
bit ``t % 64`` of word ``t // 64``).  A pattern row is stored as its nonzero
words only (``widx``: the word's position, ``wval``: its bits), so a band row
of 513 keys costs about nine words and a global row ``n / 64``.

One layer of a traced token ``i`` is either

* a frontier step (every token reached so far has its own diagonal, so reach
  only grows): OR the rows of the tokens reached last layer into the reach and
  keep the newly set bits as the next frontier; or
* a full step (some reached token lacks its diagonal): the new reach is the OR
  of the rows of every reached token.

Rows are looked up through ``slot`` (token -> packed row, -1 if not loaded).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["pack_rows", "find_loopless", "layer_step", "to_csr"]

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_ONE = np.uint64(1)


@njit(cache=True, nogil=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit(cache=True, nogil=True, inline="always")
def _low_bit(x):
    """``(lowest set bit as a mask, its position)`` of a nonzero word."""
    low = x & (~x + _ONE)
    return low, _popcount(low - _ONE)


@njit(cache=True, nogil=True)
def pack_rows(indptr, indices, row_ids):
    """Nonzero words of CSR rows (int64 arrays, sorted indices); ``row_ids[r]``: row r's token.

    Returns ``(wptr, widx, wval, loop)``: row ``r``'s words are
    ``widx/wval[wptr[r]:wptr[r + 1]]``; ``loop[r]`` tells whether it holds ``row_ids[r]``.
    """
    m = len(row_ids)
    wptr = np.zeros(m + 1, np.int64)
    for r in range(m):
        last = -1
        c = 0
        for p in range(indptr[r], indptr[r + 1]):
            w = indices[p] >> 6
            if w != last:
                c += 1
                last = w
        wptr[r + 1] = wptr[r] + c
    widx = np.empty(wptr[m], np.int64)
    wval = np.zeros(wptr[m], np.uint64)
    loop = np.zeros(m, np.bool_)
    for r in range(m):
        q = wptr[r] - 1
        last = -1
        rid = row_ids[r]
        for p in range(indptr[r], indptr[r + 1]):
            j = indices[p]
            w = j >> 6
            if w != last:
                q += 1
                last = w
                widx[q] = w
            wval[q] |= _ONE << np.uint64(j & 63)
            if j == rid:
                loop[r] = True
    return wptr, widx, wval, loop


@njit(cache=True, nogil=True)
def find_loopless(frontier, todo, slot, loop):
    """``todo`` rows whose frontier holds a token without its diagonal."""
    k, nw = frontier.shape
    out = np.zeros(k, np.bool_)
    for t in range(k):
        if not todo[t]:
            continue
        for w in range(nw):
            f = frontier[t, w]
            while f != 0:
                low, b = _low_bit(f)
                f ^= low
                if not loop[slot[w * 64 + b]]:
                    out[t] = True
                    break
            if out[t]:
                break
    return out


@njit(cache=True, nogil=True)
def layer_step(reach, frontier, live, mono, counts, slot, wstart, wend, widx, wval):
    """One layer for every ``live`` row, in place; returns which rows changed."""
    k, nw = reach.shape
    changed = np.zeros(k, np.bool_)
    buf = np.zeros(nw, np.uint64)
    for t in range(k):
        if not live[t]:
            continue
        if mono[t]:
            for w in range(nw):
                buf[w] = frontier[t, w]
                frontier[t, w] = 0
            added = 0
            for w in range(nw):
                f = buf[w]
                while f != 0:
                    low, b = _low_bit(f)
                    f ^= low
                    s = slot[w * 64 + b]
                    for q in range(wstart[s], wend[s]):
                        c = widx[q]
                        nv = wval[q] & ~reach[t, c]
                        if nv != 0:
                            reach[t, c] |= nv
                            frontier[t, c] |= nv
                            added += _popcount(nv)
            counts[t] += added
            changed[t] = added > 0
        else:
            buf[:] = 0
            for w in range(nw):
                f = reach[t, w]
                while f != 0:
                    low, b = _low_bit(f)
                    f ^= low
                    s = slot[w * 64 + b]
                    for q in range(wstart[s], wend[s]):
                        buf[widx[q]] |= wval[q]
            total = 0
            diff = False
            for w in range(nw):
                total += _popcount(buf[w])
                if buf[w] != reach[t, w]:
                    diff = True
                    reach[t, w] = buf[w]
            counts[t] = total
            changed[t] = diff
    return changed


@njit(cache=True, nogil=True)
def to_csr(bits, counts):
    """Bitset rows (with their popcounts) as CSR ``(indptr, indices)``, indices sorted."""
    k, nw = bits.shape
    indptr = np.zeros(k + 1, np.int64)
    for t in range(k):
        indptr[t + 1] = indptr[t] + counts[t]
    indices = np.empty(indptr[k], np.int64)
    for t in range(k):
        o = indptr[t]
        for w in range(nw):
            f = bits[t, w]
            while f != 0:
                low, b = _low_bit(f)
                f ^= low
                indices[o] = w * 64 + b
                o += 1
    return indptr, indices
