"""Dilated sliding windows as plain bands over tokens regrouped by residue class (NATTEN's trick).

A dilated window ``sliding_window(n, left=L, right=R, dilation=D, offset=o)`` lets query ``i`` see key
``j`` iff ``-L <= j - (i + o) <= R`` and ``D`` divides ``j - (i + o)``.  Write ``i = c + D u`` (query class
``c = i % D``) and ``j = c' + D w``: query class ``c`` sees only key class ``c' = (c + o) % D``, and there
``-(L // D) <= w - (u + o_c) <= R // D`` with ``o_c = (c + o) // D``, a plain band (dilation 1) of the
class's rows over the class's keys.  The map ``c -> c'`` is a bijection, so every key class is read by
exactly one query class.

:func:`forward` and :func:`backward` rewrite a call on such a window before validation into ``D`` calls of
the entry point itself, one per class, on strided views ``q[..., c::D, :]``, ``k[..., c'::D, :]``,
``v[..., c'::D, :]`` (and the padding mask's ``[..., c'::D]``; validation copies each view once into the
contiguous compute layout, the regrouping gather), each planned from the band's parameters; the results
(``out``, ``lse``; ``dq``, ``dk``, ``dv``, ``dsinks``) are scattered back (``dsinks`` summed).  Leading
axes, broadcasting and grouped-query heads pass through untouched, since only the sequence axis is cut.

Left alone (``None``: the caller goes on as before): ALiBi and ``score_mod`` (they see positions),
weights, the staged path and ``check_finite`` (their results or messages are in the original order),
per-head patterns unless every head has the same window, anything but plain NumPy floating arrays
whose shapes agree with the pattern (the full validation names the problem), and fewer than ``D``
queries or keys.
"""

from __future__ import annotations

import numpy as np

from ..patterns.windows import SlidingWindow

__all__ = ["backward", "class_windows", "forward"]


def _window(pattern):
    """The dilated window of ``pattern`` (or of every head, all equal), else None."""
    if isinstance(pattern, (list, tuple)):
        if not pattern or any(not isinstance(p, SlidingWindow) for p in pattern):
            return None
        if any(p.identity != pattern[0].identity for p in pattern):
            return None
        pattern = pattern[0]
    if type(pattern) is not SlidingWindow or pattern.dilation <= 1:
        return None
    n_q, n_k = pattern.shape
    if n_q < pattern.dilation or n_k < pattern.dilation:
        return None
    return pattern


def class_windows(pattern):
    """``[(c, c', band)]``: query class ``c`` sees key class ``c'`` through the plain ``band`` (see the module)."""
    n_q, n_k = pattern.shape
    D, o = pattern.dilation, pattern.offset
    out = []
    for c in range(D):
        cp = (c + o) % D
        nq = len(range(c, n_q, D))
        nk = len(range(cp, n_k, D))
        out.append((c, cp, SlidingWindow(nq, nk, pattern.left // D, pattern.right // D, 1, (c + o) // D)))
    return out


def _arrays_ok(pattern, q, k, v, kpm, extra=()):
    n_q, n_k = pattern.shape
    arrs = (q, k, v) + tuple(extra)
    if not all(isinstance(x, np.ndarray) and x.dtype.kind == "f" and x.ndim >= 2 for x in arrs):
        return False
    if q.shape[-2] != n_q or k.shape[-2] != n_k or v.shape[-2] != n_k:
        return False
    if kpm is not None:
        kpm = np.asarray(kpm)
        if kpm.ndim == 0 or kpm.shape[-1] != n_k:
            return False
    return True


def _plain(mods, path):
    """Whether the call's options allow the rewrite (see the module docstring)."""
    return mods.get("alibi_slopes") is None and mods.get("score_mod") is None and path != "staged"


def forward(entry, q, k, v, pattern, scale, key_padding_mask, mods, path, return_lse):
    """``entry(...)`` (:func:`sparseattn.sparse_attention`) class by class, or None when not rewritten.

    ``mods``: the score modifiers (a dict of their keywords), passed on unchanged with ``scale``.
    """
    p = _window(pattern)
    options = dict(mods, scale=scale)
    if p is None or not _plain(mods, path) or not _arrays_ok(p, q, k, v, key_padding_mask):
        return None
    D = p.dilation
    kpm = None if key_padding_mask is None else np.asarray(key_padding_mask)
    out = lse = None
    for c, cp, band in class_windows(p):
        res = entry(q[..., c::D, :], k[..., cp::D, :], v[..., cp::D, :], band, return_lse=True, path=path,
                    key_padding_mask=None if kpm is None else kpm[..., cp::D], **options)  # fmt: skip
        o_c, l_c = res
        if out is None:
            out = np.empty(o_c.shape[:-2] + (p.shape[0], o_c.shape[-1]), dtype=o_c.dtype)
            lse = np.empty(l_c.shape[:-1] + (p.shape[0],), dtype=l_c.dtype)
        out[..., c::D, :] = o_c
        lse[..., c::D] = l_c
    return (out, lse) if return_lse else out


def backward(entry, grad_out, q, k, v, pattern, out, lse, scale, key_padding_mask, mods, path):
    """``entry(...)`` (:func:`sparseattn.sparse_attention_backward`) class by class, or None when not rewritten."""
    p = _window(pattern)
    options = dict(mods, scale=scale)
    if p is None or not _plain(mods, path):
        return None
    if not _arrays_ok(p, q, k, v, key_padding_mask, (grad_out, out)) or not isinstance(lse, np.ndarray):
        return None
    n_q = p.shape[0]
    if grad_out.shape[-2] != n_q or out.shape[-2] != n_q or lse.ndim < 1 or lse.shape[-1] != n_q:
        return None
    D = p.dilation
    kpm = None if key_padding_mask is None else np.asarray(key_padding_mask)
    grads = None
    for c, cp, band in class_windows(p):
        res = entry(grad_out[..., c::D, :], q[..., c::D, :], k[..., cp::D, :], v[..., cp::D, :], band,
                    out[..., c::D, :], lse[..., c::D], path=path,
                    key_padding_mask=None if kpm is None else kpm[..., cp::D], **options)  # fmt: skip
        if grads is None:
            grads = [np.zeros(x.shape, x.dtype) for x in (q, k, v)] + [np.zeros_like(g) for g in res[3:]]
        grads[0][..., c::D, :] = res[0]
        grads[1][..., cp::D, :] = res[1]
        grads[2][..., cp::D, :] = res[2]
        for g, r in zip(grads[3:], res[3:]):
            g += r
    return tuple(grads)
