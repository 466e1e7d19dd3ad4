"""The online-softmax updates of the fused forward kernels (:mod:`sparseattn.kernels.forward`).

They take scores already modified (:mod:`sparseattn.kernels.mods`), so the score-modifier
specialisations of the forward kernels share them.
"""

from __future__ import annotations

from numba import njit

from .simd import _FM, NO_RC, _exp, _fmax

__all__ = []


@njit(fastmath=True, nogil=True, **NO_RC)
def _row_update(row, j0, j1, vrow, use_valid, r, m, l, acc, neg, zero):
    """Online-softmax update of query row ``r`` with one chunk of scaled scores ``row``.

    Only ``row[j0:j1]`` is allowed; with ``use_valid`` also only where
    ``vrow`` is True (padded keys).  The row is overwritten with ``exp(score - new max)`` (zero where not allowed), and
    the running max ``m[r]``, sum ``l[r]`` and output ``acc[r]`` are rescaled.
    Loops start at 0 over 1-D views so that LLVM can vectorise them (fast-math
    is safe: masked scores are the finite sentinel ``neg``, never inf/NaN).
    """
    half = neg * 0.5
    x = row[j0:j1]
    n = x.shape[0]
    mx = neg
    if use_valid:
        vv = vrow[j0:j1]
        for j in range(n):
            y = x[j] if vv[j] else neg
            x[j] = y
            mx = _fmax(mx, y)
    else:
        for j in range(n):
            mx = _fmax(mx, x[j])
    for j in range(j0):
        row[j] = zero
    for j in range(j1, row.shape[0]):
        row[j] = zero
    if mx <= half:  # nothing allowed in this chunk for this row
        for j in range(n):
            x[j] = zero
        return
    mo = m[r]
    mn = _fmax(mx, mo)
    ssum = zero
    for j in range(n):
        p = _exp(x[j] - mn)
        x[j] = p
        ssum += p
    m[r] = mn
    if mo <= half:  # first allowed keys of this row: its sum and output are still zero
        l[r] = ssum
        return
    alpha = _exp(mo - mn)
    l[r] = l[r] * alpha + ssum
    if alpha != 1:
        a = acc[r]
        for c in range(a.shape[0]):
            a[c] *= alpha


@njit(fastmath=True, nogil=True, **NO_RC)
def _one_key_update(x, vj, r, m, l, acc, half, zero):
    """Online-softmax update of row ``r`` with one key: scaled score ``x``, value row ``vj``."""
    mo = m[r]
    a = acc[r]
    if x > mo:
        alpha = _exp(mo - x) if mo > half else zero
        for c in range(a.shape[0]):
            a[c] = a[c] * alpha + vj[c]
        l[r] = l[r] * alpha + 1
        m[r] = x
    else:
        p = _exp(x - mo)
        for c in range(a.shape[0]):
            a[c] += p * vj[c]
        l[r] += p



@njit(fastmath=_FM, nogil=True, **NO_RC)
def _add_into(acc, tmp, rows):
    for r in range(rows):
        for c in range(acc.shape[1]):
            acc[r, c] += tmp[r, c]
