"""Score modifiers inside the compiled kernels: softcap, ALiBi and a user's ``score_mod``.

Raw values in, raw values out.  Every compiled kernel that forms scores calls
these on the scaled scores ``s = scale q.k`` of one row before its softmax
(:func:`mod_span` for a contiguous run of keys, :func:`mod_cols` for gathered
keys, :func:`mod_one` for one key) and, in the backward, :func:`mod_grad`,
which also gives ``ds / ds_raw``.  The order is the one the engine documents
(:mod:`sparseattn.engine.modifiers`): ``softcap`` first, then ALiBi, then the
user's function.

``mod`` is one tuple ``(flags, cap, offset, heads, ui, uj, bh)``: bit 1 of
``flags`` is softcap ``s <- cap tanh(s / cap)``, bit 2 ALiBi
``s <- s - slope |i + offset - j|`` with ``slope = slopes[slice]``.  The rest
is the user function's frame, read only by the ``_USER`` branches (the plain
kernels never touch the array ``bh``, so it costs them nothing): it
receives row ``i + ui`` and key ``j + uj``, and slice ``s`` is the flattened
batch index ``bh[s, 0]`` and query head ``bh[s, 1]`` (``bh``: int64
``(S, 2)``; empty: ``s // heads`` and ``s % heads``).  The local engine's
frame is ``ui = uj = 0`` and an empty ``bh``; a Dask task's engine call gets
the position of its rows, keys and slices in the whole call
(:class:`~sparseattn.engine.modifiers.Modifiers`).  ``flags == 0`` costs one
branch per row and chunk.

A user's ``score_mod`` is not an argument (Numba cannot cache a kernel that
takes a function): :func:`specialise` copies the kernels with ``_USER`` set and
the user's ``f`` and ``df`` bound in their globals and compiles those copies
(in memory, once per :class:`~sparseattn.engine.modifiers.ScoreMod`).
"""

from __future__ import annotations

import types as _pytypes

import numpy as np
from numba import njit, types
from numba.extending import overload

from .simd import _FM, NO_RC, _exp

#: the modifiers' loops must vectorise: NumPy's error model (no ZeroDivisionError branch in a division)
_OPTS = dict(fastmath=_FM, nogil=True, error_model="numpy", **NO_RC)

__all__ = ["SOFTCAP", "ALIBI", "active", "mod_span", "mod_grad_span", "mod_cols", "mod_one", "mod_grad", "specialise"]

SOFTCAP = 1
ALIBI = 2

#: compile-time constant: True only in the copies made by :func:`specialise`
_USER = False


@njit(nogil=True)
def _no_mod(s, b, h, i, j):  # pragma: no cover - typed for the dead branch, never called
    return s


_user_f = _no_mod
_user_df = _no_mod


def _one(x):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(_one)
def _one_overload(x):
    """1 in ``x``'s float type (an int literal would promote float32 arithmetic to float64)."""
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: np.float32(1)
    return lambda x: 1.0


def _cast(like, v):  # pragma: no cover - replaced by the overload in jitted code
    raise NotImplementedError


@overload(_cast)
def _cast_overload(like, v):
    """The integer ``v`` as ``like``'s float type."""
    if isinstance(like, types.Float) and like.bitwidth == 32:
        return lambda like, v: np.float32(v)
    return lambda like, v: np.float64(v)


@njit(nogil=True)
def active(mod):
    """Whether any score modifier runs (the kernels keep their plain loops otherwise)."""
    return mod[0] != 0 or _USER


@njit(inline="always", **_OPTS)
def tanh(x):
    """``tanh(x)`` from the kernels' vectorisable ``exp``: ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)``.

    Its absolute error is a few ulps of 1, so ``cap tanh(s / cap)`` is off by
    a few ulps of ``cap``: what a softmax sees of a score.
    """
    one = _one(x)
    a = abs(x)
    e = _exp(-(a + a))
    t = (one - e) / (one + e)
    return t if x >= 0 else -t


@njit(inline="always", **_OPTS)
def _user_bh(s, mod):
    """The flattened batch index and query head of slice ``s`` that the user's function receives.

    Reads ``mod``'s map only here, inside the ``_USER`` branches: a plain
    kernel never takes a reference to the array (no refcount traffic).
    """
    heads, bh = mod[3], mod[6]
    if bh.shape[0] != 0:
        return bh[s, 0], bh[s, 1]
    b = s // heads
    return b, s - b * heads


@njit(**_OPTS)
def mod_span(x, lo, hi, i, j0, mod, slope, s):
    """Modify ``x[lo:hi]``, the scores of query ``i`` with keys ``j0 + lo .. j0 + hi - 1``, in place.

    Loops run from 0 over views (``x[lo:hi]``): an index of unknown sign
    would make every access a wraparound select and keep LLVM from vectorising.
    """
    flags, cap, off = mod[0], mod[1], mod[2]
    y = x[lo:hi]
    if flags & SOFTCAP:
        inv = _one(cap) / cap
        for j in range(y.shape[0]):
            y[j] = cap * tanh(y[j] * inv)
    if flags & ALIBI:
        _alibi_span(y, i + off - j0 - lo, slope)
    if _USER:
        b, h = _user_bh(s, mod)
        iu, ju = i + mod[4], j0 + lo + mod[5]
        for j in range(y.shape[0]):
            y[j] = _user_f(y[j], b, h, iu, ju + j)


@njit(**_OPTS)
def _alibi_span(y, c, slope):
    """``y[j] -= slope |c - j|`` over all of ``y``, in ``y``'s float type."""
    for j in range(y.shape[0]):
        y[j] -= slope * _cast(slope, abs(c - j))


@njit(**_OPTS)
def mod_grad_span(x, dp, lo, hi, i, j0, di, mod, slope, s):
    """Backward over ``x[lo:hi]`` (raw scores) and ``dp[lo:hi]`` (``dO . v``): ``x <- s'``, ``dp <- (dp - di) ds'/ds``."""
    flags, cap, off = mod[0], mod[1], mod[2]
    y = x[lo:hi]
    g = dp[lo:hi]
    if flags & SOFTCAP:
        inv = _one(cap) / cap
        for j in range(y.shape[0]):
            t = tanh(y[j] * inv)
            y[j] = cap * t
            g[j] = (g[j] - di) * (_one(cap) - t * t)
    else:
        for j in range(y.shape[0]):
            g[j] -= di
    if flags & ALIBI:
        _alibi_span(y, i + off - j0 - lo, slope)
    if _USER:
        b, h = _user_bh(s, mod)
        iu, ju = i + mod[4], j0 + lo + mod[5]
        for j in range(y.shape[0]):
            g[j] *= _user_df(y[j], b, h, iu, ju + j)
            y[j] = _user_f(y[j], b, h, iu, ju + j)


@njit(**_OPTS)
def mod_cols(x, n, cols, c0, i, mod, slope, s):
    """Modify ``x[:n]``, the scores of query ``i`` with keys ``cols[c0 : c0 + n]``, in place."""
    flags, cap, off = mod[0], mod[1], mod[2]
    if flags & SOFTCAP:
        inv = _one(cap) / cap
        for c in range(n):
            x[c] = cap * tanh(x[c] * inv)
    if flags & ALIBI:
        for c in range(n):
            x[c] -= slope * _cast(slope, abs(i + off - cols[c0 + c]))
    if _USER:
        b, h = _user_bh(s, mod)
        iu, uj = i + mod[4], mod[5]
        for c in range(n):
            x[c] = _user_f(x[c], b, h, iu, cols[c0 + c] + uj)


@njit(**_OPTS)
def mod_one(x, i, j, mod, slope, s):
    """The modified score of query ``i`` and key ``j``."""
    flags, cap, off = mod[0], mod[1], mod[2]
    if flags & SOFTCAP:
        x = cap * tanh(x / cap)
    if flags & ALIBI:
        x -= slope * _cast(slope, abs(i + off - j))
    if _USER:
        b, h = _user_bh(s, mod)
        x = _user_f(x, b, h, i + mod[4], j + mod[5])
    return x


@njit(**_OPTS)
def mod_grad(x, i, j, mod, slope, s):
    """``(s', ds'/ds)``: the modified score of query ``i`` and key ``j`` and its derivative in the raw score."""
    flags, cap, off = mod[0], mod[1], mod[2]
    fac = _one(x)
    if flags & SOFTCAP:
        t = tanh(x / cap)
        x = cap * t
        fac = _one(x) - t * t
    if flags & ALIBI:
        x -= slope * _cast(slope, abs(i + off - j))
    if _USER:
        b, h = _user_bh(s, mod)
        iu, ju = i + mod[4], j + mod[5]
        fac *= _user_df(x, b, h, iu, ju)
        x = _user_f(x, b, h, iu, ju)
    return x, fac


_FUNCS = ("active", "tanh", "_alibi_span", "mod_span", "mod_grad_span", "mod_cols", "mod_one", "mod_grad")


def _copy(disp, glb):
    """A new, uncached dispatcher of ``disp``'s Python function whose globals are ``glb``."""
    f = disp.py_func
    g = _pytypes.FunctionType(f.__code__, glb, f.__name__, f.__defaults__, f.__closure__)
    opts = {k: v for k, v in disp.targetoptions.items() if k not in ("cache", "nopython")}
    return njit(**opts)(g)


def specialise(f, df, modules, names):
    """Copies of the kernels ``names`` (a dict module -> kernel names) that call ``f`` / ``df`` as the user's modifier.

    Returns ``{name: dispatcher}``.  Each module's helpers are copied too, so
    that every call inside a copied kernel reaches copies, and a module's
    calls into a module listed before it reach that module's copies (list a
    helper module first); nothing is cached on disk (Numba cannot key a cache
    on a user's function).
    """
    import sys

    mine = dict(vars(sys.modules[__name__]), _USER=True, _user_f=f, _user_df=df)
    for name in _FUNCS:
        mine[name] = _copy(mine[name], mine)
    out = {}
    copies = {}  # id of an original kernel -> its copy: a helper module listed first reaches the later ones
    for module in modules:
        glb = dict(vars(module))
        glb.update({k: mine[k] for k in _FUNCS if k in glb})
        for name, obj in list(glb.items()):
            if id(obj) in copies:
                glb[name] = copies[id(obj)]
            elif hasattr(obj, "py_func") and getattr(obj.py_func, "__module__", None) == module.__name__:
                glb[name] = copies[id(obj)] = _copy(obj, glb)
        for name in names.get(module.__name__, ()):
            out[name] = glb[name]
    return out
