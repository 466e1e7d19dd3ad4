"""The backward's per-entry gradients: one (query, key) pair, or a run of a row's consecutive keys.

Raw arrays in, raw arrays out; no validation (:mod:`sparseattn.kernels.backward` calls these for the
shared gathered columns and the per-row residual runs, the entries that its span micro-kernels do not
cover: most of a narrow neighbourhood's keys).
"""

from __future__ import annotations

from numba import njit

from .mods import mod_grad
from .simd import _FM, NO_RC, _exp

__all__ = ["_pair_grad", "_run_grad"]


@njit(fastmath=_FM, nogil=True, **NO_RC)
def _pair_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, li, di, zero, i, mod, slope, sl):
    """Gradient contributions of one allowed pair: row ``r`` of the tile (query ``i``, scaled ``qt[r]``), key ``j``.

    Indexes the 2-D arrays element by element: a row view per key (``ks[j]``, ``dkb[j]``) would be a new
    reference-counted array on every pair, which cost more than the arithmetic.
    """
    d = qt.shape[1]
    dv = dot.shape[1]
    x = zero
    for c in range(d):
        x += qt[r, c] * ks[j, c]
    dp = zero
    for c in range(dv):
        dp += dot[r, c] * vs[j, c]
    x, fac = mod_grad(x, i, j, mod, slope, sl)
    p = _exp(x - li)
    ds = p * (dp - di) * fac
    for c in range(d):  # one array written per loop (see _group_grad)
        dqt[r, c] += ds * ks[j, c]
    _axpy_row(dkb, j, ds, qt, r, d)
    _axpy_row(dvb, j, p, dot, r, dv)


@njit(fastmath=_FM, nogil=True, **NO_RC)
def _run_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j0, j1, li, di, zero, i, mod, slope, sl):
    """:func:`_pair_grad` for the keys ``j0 .. j1 - 1`` of one row's run: four keys at a time, then the last three
    or two in one group, or the last one alone.

    One pair at a time, each pair's two dot products ended in horizontal sums that the next steps waited
    on (a neighbourhood's backward ran at a twentieth of the forward's rate); the sums of a group's keys
    are independent, and row ``r``'s query, output gradient and ``dq`` are read once per group.  The
    group's keys are ``j, j + 1, ...``: written so, LLVM knows their rows apart and vectorises the
    feature loops (with clamped indices for a short last group it did not, and the run ran slower).
    """
    j = j0
    while j + 4 <= j1:
        _group_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, 4, li, di, zero, i, mod, slope, sl)
        j += 4
    # a run of 7 (a 7 x 7 neighbourhood's) as 4 + 3: 4 + 2 + 1 read the row's vectors and updated its dq once more
    if j + 3 == j1:
        _group_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, 3, li, di, zero, i, mod, slope, sl)
    elif j + 2 == j1:
        _group_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, 2, li, di, zero, i, mod, slope, sl)
    elif j < j1:
        _pair_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, li, di, zero, i, mod, slope, sl)


@njit(fastmath=_FM, nogil=True, inline="always")
def _group_grad(qt, dot, dqt, r, ks, vs, dkb, dvb, j, m, li, di, zero, i, mod, slope, sl):
    """The keys ``j .. j + m - 1`` (``m``: 4, 3 or 2, a constant at each call) of :func:`_run_grad`."""
    d = qt.shape[1]
    dv = dot.shape[1]
    three = m >= 3
    four = m == 4
    x0, x1, x2, x3 = _dots_row(qt, r, ks, j, d, m, zero)
    g0, g1, g2, g3 = _dots_row(dot, r, vs, j, dv, m, zero)
    x0, f0 = mod_grad(x0, i, j, mod, slope, sl)
    x1, f1 = mod_grad(x1, i, j + 1, mod, slope, sl)
    p0 = _exp(x0 - li)
    p1 = _exp(x1 - li)
    s0 = p0 * (g0 - di) * f0
    s1 = p1 * (g1 - di) * f1
    p2 = zero
    p3 = zero
    s2 = zero
    s3 = zero
    if three:
        x2, f2 = mod_grad(x2, i, j + 2, mod, slope, sl)
        p2 = _exp(x2 - li)
        s2 = p2 * (g2 - di) * f2
    if four:
        x3, f3 = mod_grad(x3, i, j + 3, mod, slope, sl)
        p3 = _exp(x3 - li)
        s3 = p3 * (g3 - di) * f3
    # one array written per loop: a loop writing dq and dk rows together compiled to scalar code (LLVM could
    # not rule out their overlap), a loop per written row to vector code; the terms past m fold away (m is a
    # constant at each call), as in _dots_row
    for c in range(d):
        t = s0 * ks[j, c] + s1 * ks[j + 1, c]
        if three:
            t += s2 * ks[j + 2, c]
        if four:
            t += s3 * ks[j + 3, c]
        dqt[r, c] += t
    _axpy_row(dkb, j, s0, qt, r, d)
    _axpy_row(dkb, j + 1, s1, qt, r, d)
    _axpy_row(dvb, j, p0, dot, r, dv)
    _axpy_row(dvb, j + 1, p1, dot, r, dv)
    if three:
        _axpy_row(dkb, j + 2, s2, qt, r, d)
        _axpy_row(dvb, j + 2, p2, dot, r, dv)
    if four:
        _axpy_row(dkb, j + 3, s3, qt, r, d)
        _axpy_row(dvb, j + 3, p3, dot, r, dv)


@njit(fastmath=_FM, nogil=True, inline="always")
def _dots_row(a, r, b, j, n, m, zero):
    """The dot products of ``a[r, :n]`` with ``b[j, :n] .. b[j + m - 1, :n]`` (``m``: 2, 3 or 4; the sums past
    ``m`` are ``zero``): independent sums, row ``r`` read once."""
    three = m >= 3
    four = m == 4
    y0 = zero
    y1 = zero
    y2 = zero
    y3 = zero
    for c in range(n):
        ac = a[r, c]
        y0 += ac * b[j, c]
        y1 += ac * b[j + 1, c]
        if three:
            y2 += ac * b[j + 2, c]
        if four:
            y3 += ac * b[j + 3, c]
    return y0, y1, y2, y3


@njit(fastmath=_FM, nogil=True, inline="always")
def _axpy_row(y, j, a, x, r, n):
    """``y[j, :n] += a * x[r, :n]``."""
    for c in range(n):
        y[j, c] += a * x[r, c]
