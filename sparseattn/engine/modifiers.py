"""Score modifiers and sinks: one definition, checked once, reached by every path.

Applied to the scaled score ``s = scale q_i . k_j`` of each allowed pair, in
this order:

1. ``softcap=c``: ``s <- c tanh(s / c)`` (Gemma 2, Grok; FlashAttention's ``softcap``);
2. ``alibi_slopes``: ``s <- s - slope |i + n_k - n_q - j|`` (FlashAttention's convention,
   the diagonal at the bottom right), one slope per query head, or per batch and head;
3. ``score_mod``: a user's ``f(s, b, h, i, j)`` (:class:`ScoreMod`);

then the pattern and padding masks, then the softmax, whose denominator also
holds ``exp(sink_h)`` when ``sinks`` are given (a learned logit per query head
that carries no value: GPT-OSS's ``s_aux``).  With sinks, ``lse`` includes the
sink term and a row with no allowed key outputs zeros with ``lse = sink_h``.

Where each is computed:

- the compiled kernels call :mod:`sparseattn.kernels.mods` on each row of
  scores they form (forward and backward, fused and staged);
- the NumPy paths (blocked, and the dense oracle's cross-check) call
  :meth:`Modifiers.apply` on their score grids, the same formulas in NumPy;
- sinks need no kernel: a softmax without the sink gives ``(out0, lse0)``, and
  ``lse = logaddexp(lse0, sink)``, ``out = out0 exp(lse0 - lse)`` is exact
  (:meth:`Modifiers.add_sinks`, after any path); the backward's probabilities
  ``exp(s - lse)`` are then the sink-aware ones, and ``dsink_h = -sum_i
  exp(sink_h - lse_i) (dO_i . O_i)`` (:meth:`Modifiers.dsinks`).

Non-finite scores pass through as IEEE arithmetic gives: ``tanh`` maps a
``+-inf`` score to ``+-c`` and keeps NaN; ALiBi adds a finite bias; sinks must
be finite.  (Slices holding a NaN or an infinity run on the staged kernels,
whose ``tanh`` is libm's.)
"""

from __future__ import annotations

import collections
import numbers
import threading
import uuid
import weakref
from dataclasses import dataclass

import numpy as np

__all__ = ["ScoreMod", "Modifiers", "NONE", "check_modifiers", "check_score_mod", "sum_to_shape"]


def sum_to_shape(g, shape):
    """``g`` summed over the axes that an array of ``shape`` was broadcast along (NumPy's rules), as ``shape``.

    The adjoint of broadcasting: the gradient of a broadcast input (``q`` of a
    call, ``sinks`` given per head and summed over the batch).
    """
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(a for a, (x, y) in enumerate(zip(shape, g.shape)) if x == 1 and y != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def _jit(fn, name):
    from numba.core.registry import CPUDispatcher

    if isinstance(fn, CPUDispatcher):
        return fn
    if not callable(fn):
        raise TypeError(f"ScoreMod's {name} must be a function f(s, b, h, i, j), got {type(fn).__name__}")
    from numba import njit

    return njit(nogil=True)(fn)


class ScoreMod:
    """A user's score modifier for the compiled kernels: ``f(s, b, h, i, j) -> s'`` and ``df = ds'/ds``.

    ``s`` is the score after the built-in modifiers, ``b`` the flattened batch
    index, ``h`` the query head, ``i`` the query row and ``j`` the key (all
    int64).  ``f`` and ``df`` are plain Python functions written for Numba's
    ``nopython`` mode (or already ``numba.njit``-ed); ``df`` is what the
    backward multiplies the score gradient by.

    The kernels are compiled for each ``ScoreMod`` object on its first use
    with a dtype (a few seconds per direction; in memory only: Numba cannot
    key its disk cache on a user's function), then reused by every call that
    passes the same object.  Keep one object per modifier: a new ``ScoreMod``
    compiles again.

    A ``ScoreMod`` pickles as its two functions and an identity: unpickled in
    a process that already holds it (the same object, or an earlier copy, as
    a Dask worker receives one per task), it is that object, so a process
    compiles each ``ScoreMod`` once.  ``f`` and ``df`` pickle as Numba
    pickles functions: by reference to an importable module, else by value.

    Examples
    --------
    ALiBi written by hand (equal to ``alibi_slopes=slopes``):

    >>> import numpy as np, sparseattn as sa
    >>> slopes = np.array([0.5, 0.25])
    >>> def alibi(s, b, h, i, j):
    ...     return s - slopes[h] * abs(i - j)
    >>> def d_alibi(s, b, h, i, j):
    ...     return 1.0
    >>> mod = sa.ScoreMod(alibi, d_alibi)
    """

    def __init__(self, f, df):
        self._setup(_jit(f, "f"), _jit(df, "df"), uuid.uuid4().hex)

    def _setup(self, f, df, token):
        self.f, self.df = f, df
        self._checked = set()
        self._kernels = {}
        self._lock = threading.Lock()  # one specialisation per direction when worker threads ask together
        self._token = token
        with _REGISTRY_LOCK:
            _REGISTRY.setdefault(token, self)

    def __reduce__(self):
        return _rebuild_score_mod, (self._token, self.f, self.df)

    def __dask_tokenize__(self):
        return ("sparseattn.ScoreMod", self._token)

    def __repr__(self):
        return f"ScoreMod({getattr(self.f, '__name__', '?')}, {getattr(self.df, '__name__', '?')})"

    def check(self, dtype):
        """Compile ``f`` and ``df`` for ``dtype`` scores, or raise a ``TypeError`` naming ``score_mod``."""
        key = np.dtype(dtype).name
        if key in self._checked:
            return
        from numba import from_dtype, int64

        sig = (from_dtype(np.dtype(dtype)), int64, int64, int64, int64)
        for name, fn in (("f", self.f), ("df", self.df)):
            try:
                fn.compile(sig)
                ret = fn.overloads[sig].signature.return_type
            except Exception as e:  # noqa: BLE001 - any failure to compile is the user's function
                raise TypeError(
                    f"score_mod's {name} ({getattr(fn, '__name__', fn)}) cannot be compiled by Numba for "
                    f"(s: {key}, b, h, i, j: int64): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                ) from None
            if not str(ret).startswith(("float", "int")):
                raise TypeError(f"score_mod's {name} must return a number, its Numba return type is {ret}")
        self._checked.add(key)

    def kernels(self, direction):
        """The compiled kernels specialised to this modifier (``"forward"``, ``"staged"`` or ``"backward"``)."""
        if direction not in self._kernels:
            from ..kernels import backward, forward, mods, pair_grads, staged, staged_backward

            table = {
                "forward": ({forward.__name__: ("tiles_forward", "long_rows_partial")}, (forward,)),
                # pair_grads first: backward's residual runs and shared columns call its copies
                "backward": ({backward.__name__: ("tiles_backward", "long_rows_backward")}, (pair_grads, backward)),
                "staged": ({staged.__name__: ("modify_values",),
                            staged_backward.__name__: ("rows_backward",)}, (staged, staged_backward)),
            }  # fmt: skip
            names, modules = table[direction]
            with self._lock:
                if direction not in self._kernels:
                    self._kernels[direction] = mods.specialise(self.f, self.df, modules, names)
        return self._kernels[direction]

    def grid(self, s, b, h, i, j):
        """``(f, df)`` evaluated elementwise on broadcast arrays (the NumPy paths and tests)."""
        s, b, h, i, j = np.broadcast_arrays(s, b, h, i, j)
        val = np.empty(s.shape, dtype=s.dtype)
        der = np.empty(s.shape, dtype=s.dtype)
        _grid(self.f, self.df, s.ravel(), b.ravel().astype(np.int64), h.ravel().astype(np.int64),
              i.ravel().astype(np.int64), j.ravel().astype(np.int64), val.reshape(-1), der.reshape(-1))  # fmt: skip
        return val, der


#: token -> the ScoreMod of this process with that identity (an unpickled copy resolves to it)
_REGISTRY = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()
#: the ScoreMods made by unpickling, most recent last: held here, since between two tasks of a Dask worker
#: nothing else holds them (and a new object would compile again); the oldest is dropped past this many
KEEP_UNPICKLED = 8
_kept = collections.OrderedDict()


def _rebuild_score_mod(token, f, df):
    """The process's :class:`ScoreMod` with identity ``token``, made from ``f`` and ``df`` if it has none."""
    with _REGISTRY_LOCK:
        mod = _REGISTRY.get(token)
    if mod is None:
        mod = ScoreMod.__new__(ScoreMod)
        mod._setup(f, df, token)  # two threads unpickling at once: the first one registered wins
    with _REGISTRY_LOCK:
        mod = _REGISTRY[token]
        _kept[token] = mod
        _kept.move_to_end(token)
        while len(_kept) > KEEP_UNPICKLED:
            _kept.popitem(last=False)
        return mod


def _grid(f, df, s, b, h, i, j, val, der):
    global _grid_kernel
    if _grid_kernel is None:
        from numba import njit

        @njit(nogil=True)
        def kernel(f, df, s, b, h, i, j, val, der):
            for e in range(s.shape[0]):
                val[e] = f(s[e], b[e], h[e], i[e], j[e])
                der[e] = df(s[e], b[e], h[e], i[e], j[e])

        _grid_kernel = kernel
    _grid_kernel(f, df, np.ascontiguousarray(s), b, h, i, j, val, der)


_grid_kernel = None


@dataclass(frozen=True)
class Modifiers:
    """The validated modifiers of one call; slices ``s`` are batch ``s // heads`` and query head ``s % heads``."""

    softcap: float | None = None
    slopes: np.ndarray | None = None  # (S,) compute dtype: the ALiBi slope of each slice
    offset: int = 0  # n_k - n_q: ALiBi's diagonal
    sinks: np.ndarray | None = None  # (S,) compute dtype: the sink logit of each slice
    score_mod: ScoreMod | None = None
    heads: int = 1
    sinks_shape: tuple = ()  # the shape the user gave sinks in (dsinks comes back in it)
    sinks_lead: tuple = ()  # the broadcast leading shape of the call
    # the user function's frame: it sees row i + i0 and key j + j0, and slice s as the flattened batch index
    # slice_bh[s, 0] and query head slice_bh[s, 1] (None: s // heads, s % heads).  The local engine's call is
    # its own frame; a Dask task's engine call on a segment of rows, keys and slices passes theirs.
    i0: int = 0
    j0: int = 0
    slice_bh: np.ndarray | None = None  # (S, 2) int64

    @property
    def on_scores(self):
        """Whether any modifier changes the scores (sinks do not)."""
        return self.softcap is not None or self.slopes is not None or self.score_mod is not None

    def flags(self):
        from ..kernels.mods import ALIBI, SOFTCAP

        return (SOFTCAP if self.softcap is not None else 0) | (ALIBI if self.slopes is not None else 0)

    def kernel_args(self, dtype):
        """``(mod, slopes)`` for the compiled kernels (see :mod:`sparseattn.kernels.mods`).

        A call without modifiers (:data:`NONE`) gets the same pair every time,
        made once per dtype: the kernels only read them, and a decode loop asks
        once per layer and step.
        """
        if self is NONE:
            key = np.dtype(dtype)
            if key not in _PLAIN_ARGS:
                _PLAIN_ARGS[key] = self._make_kernel_args(dtype)
            return _PLAIN_ARGS[key]
        return self._make_kernel_args(dtype)

    def _make_kernel_args(self, dtype):
        dt = np.dtype(dtype).type
        bh = _NO_BH if self.slice_bh is None else self.slice_bh
        if bh.dtype != np.int64 or bh.ndim != 2 or not bh.flags.c_contiguous or not bh.flags.writeable:
            bh = np.array(bh, dtype=np.int64, order="C").reshape(-1, 2)  # one kernel signature: int64[:, ::1]
        mod = (np.int64(self.flags()), dt(self.softcap or 1.0), np.int64(self.offset), np.int64(max(self.heads, 1)),
               np.int64(self.i0), np.int64(self.j0), bh)  # fmt: skip
        slopes = self.slopes if self.slopes is not None else np.zeros(1, dtype=dtype)
        return mod, np.ascontiguousarray(slopes, dtype=dtype)

    def apply(self, s, sl, i, j, grad=False):
        """The modified scores of slices ``sl``, rows ``i``, keys ``j`` (broadcast arrays) in NumPy; with ``grad`` also ds'/ds."""
        dt = s.dtype
        fac = None
        with np.errstate(invalid="ignore", over="ignore"):
            if self.softcap is not None:
                c = dt.type(self.softcap)
                t = np.tanh(s / c)
                s = c * t
                fac = 1 - t * t
            if self.slopes is not None:
                dist = np.abs(np.asarray(i) + self.offset - np.asarray(j)).astype(dt)
                s = s - self.slopes[sl].astype(dt) * dist
            if self.score_mod is not None:
                b, h = self.user_bh(sl)
                s, d = self.score_mod.grid(s, b, h, np.asarray(i) + self.i0, np.asarray(j) + self.j0)
                fac = d if fac is None else fac * d
        if not grad:
            return s
        return s, (np.ones_like(s) if fac is None else fac)

    def user_bh(self, sl):
        """The flattened batch index and query head that the user's function receives for slices ``sl``."""
        sl = np.asarray(sl)
        if self.slice_bh is None:
            return sl // self.heads, sl % self.heads
        return self.slice_bh[sl, 0], self.slice_bh[sl, 1]

    def add_sinks(self, out, lse, slices=None):
        """``out`` and ``lse`` (S, n_q, ...) without the sinks -> with them, in place; returns the row factors."""
        sk = self.sinks if slices is None else self.sinks[slices]
        with np.errstate(invalid="ignore", over="ignore"):
            new = np.logaddexp(lse, sk[:, None].astype(lse.dtype))
            f = np.exp(lse - new)
        out *= f[..., None]
        lse[...] = new
        return f

    def dsinks(self, go, o, ls):
        """The gradient of the sink logits in the shape the user gave them: ``-sum_i exp(sink - lse_i) dO_i . O_i``."""
        D = np.einsum("snd,snd->sn", go, o)
        with np.errstate(invalid="ignore", over="ignore"):
            per = -(np.exp(self.sinks[:, None] - ls) * D).sum(axis=1)
        return sum_to_shape(per.reshape(self.sinks_lead), self.sinks_shape)


NONE = Modifiers()
_PLAIN_ARGS = {}  # dtype -> NONE's (mod, slopes)
_NO_BH = np.zeros((0, 2), dtype=np.int64)  # the default frame's slice map: s // heads, s % heads


def _real(name, x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not isinstance(x, np.bool_)


def _per_head(name, x, lead, compute, what):
    """``x`` (float, last axis = the query heads, broadcast to ``lead``) as one value per slice."""
    arr = np.asarray(x)
    H = lead[-1] if lead else 1
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise TypeError(f"{name} must be a real floating-point array ({what}), got dtype {arr.dtype}")
    ok = 1 <= arr.ndim <= max(len(lead), 1) and arr.shape[-1] == H
    if ok:
        try:
            full = np.broadcast_to(arr, lead if lead else (1,))
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"{name} has shape {arr.shape} but must have shape ({H},) (one per query head) or broadcast to the "
            f"leading shape {lead} with the query heads last ({what})"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr[~np.isfinite(arr)].ravel()[:3]} ({what})")
    return np.ascontiguousarray(full.reshape(-1), dtype=compute), arr.shape


def check_score_mod(score_mod, compute):
    """A :class:`ScoreMod`, compiled for ``compute`` scores, or the ``TypeError`` that names ``score_mod``."""
    if not isinstance(score_mod, ScoreMod):
        raise TypeError(
            f"score_mod must be a sparseattn.ScoreMod(f, df) (the function and its derivative in s), "
            f"got {type(score_mod).__name__}"
        )
    score_mod.check(compute)
    return score_mod


def check_modifiers(softcap=None, alibi_slopes=None, sinks=None, score_mod=None, *, lead, n_q, n_k, compute):
    """Validate the modifier arguments of a call (``lead``: its broadcast leading shape) into a :class:`Modifiers`."""
    if softcap is None and alibi_slopes is None and sinks is None and score_mod is None:
        return NONE
    if softcap is not None:
        if not _real("softcap", softcap) or not np.isfinite(softcap) or softcap <= 0:
            raise ValueError(
                f"softcap must be a finite positive number (scores become softcap * tanh(score / softcap)), "
                f"got {softcap!r}"
            )
        softcap = float(softcap)
    slopes = None
    if alibi_slopes is not None:
        slopes, _ = _per_head("alibi_slopes", alibi_slopes, lead, compute, "ALiBi's slope per query head")
    sk, sk_shape = None, ()
    if sinks is not None:
        sk, sk_shape = _per_head("sinks", sinks, lead, compute, "a sink logit per query head")
    if score_mod is not None:
        check_score_mod(score_mod, compute)
    return Modifiers(softcap=softcap, slopes=slopes, offset=int(n_k) - int(n_q), sinks=sk, score_mod=score_mod,
                     heads=lead[-1] if lead else 1, sinks_shape=tuple(sk_shape), sinks_lead=tuple(lead))  # fmt: skip
