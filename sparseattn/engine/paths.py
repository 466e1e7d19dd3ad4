"""The execution paths behind one interface, and the one dispatcher for both directions.

Every path answers the same two questions about a validated call (a
:class:`~sparseattn.engine.validate.Prepared`, which carries every attention
option: scale, key padding, per-head patterns, the broadcast maps):

``forward(prep, skip, parallel)``
    ``(out (S, n_q, d_v), lse (S, n_q))`` for every slice not flagged in
    ``skip`` (a bool array over slices, or None).
``backward(prep, go, o, ls, skip)``
    ``(dq, dk, dv)`` from every slice not in ``skip``: ``dq`` one row block
    per slice, ``dk`` and ``dv`` one per *stored* slice of ``k`` and ``v``
    (the shapes of ``prep.kc`` and ``prep.vc``): the slices that read one
    stored slice (through ``prep.kmap``, ``prep.vmap``: heads sharing a
    broadcast or grouped-query key/value head, batch rows sharing ``k``) add
    into its gradient.  No path copies ``k`` or ``v`` per slice.

and says what it cannot do (:meth:`ExecutionPath.not_supported_reason`).
The dispatcher (:func:`forward`, :func:`backward`) resolves ``path="auto"``
(the cold-start policy of :mod:`~sparseattn.engine.coldstart`), scans for
non-finite inputs with the scan the path allows (NumPy for a path that
compiles nothing) and hands the flagged slices to the staged path, the one
that follows the non-finite policy exactly.  The fused forward scans nothing
up front: its kernels check their raw scores and outputs and flag a slice
that met a NaN or an infinity (``checks_finite``); only then does the scan
run, and the slices it finds go to the staged path as above.  ``sparse_attention``,
``sparse_attention_backward`` and the Dask tasks all come through here, so a
path, or an option a path must honour, is added in one place: see "Where to
add" in ``docs/architecture.md``.

======== ====================================== ================================
path     how                                    extra memory
======== ====================================== ================================
fused    tile-planned Numba kernels             O(n d) per thread
staged   SDDMM -> softmax -> SpMM (exact IEEE)  one value per nonzero and slice
blocked  NumPy/BLAS over row blocks, no compile a row block's dense grid
======== ====================================== ================================
"""

from __future__ import annotations

import numpy as np

from . import coldstart
from .scan import scan_nonfinite
from .staged import staged_backward, staged_forward

__all__ = ["ExecutionPath", "PATHS", "NAMES", "forward", "backward", "compile_job"]


class ExecutionPath:
    """One way to evaluate attention; subclasses implement both directions."""

    name = "?"
    #: whether the path runs compiled (Numba) code; if not, the non-finite scan runs in NumPy too
    compiled = True
    #: whether the path can return the per-nonzero probabilities
    gives_weights = False
    #: whether ``forward`` takes ``flags=`` and checks for non-finite values itself (no scan beforehand)
    checks_finite = False

    def not_supported_reason(self, *, return_weights=False):
        """Why this path cannot run the call, or None."""
        if return_weights and not self.gives_weights:
            return f"return_weights=True needs the staged path: use path='staged' or 'auto', not {self.name!r}"
        return None

    def forward(self, prep, skip, parallel=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, prep, go, o, ls, skip):  # pragma: no cover - abstract
        raise NotImplementedError


class Fused(ExecutionPath):
    """The tile-planned fused kernels (:mod:`~sparseattn.engine.fused_forward`, :mod:`~sparseattn.engine.fused_backward`)."""

    name = "fused"
    checks_finite = True

    def forward(self, prep, skip, parallel=None, flags=None):
        from .fused_forward import fused_attention

        return fused_attention(
            prep.qc, prep.kc, prep.vc, prep.patterns, prep.slice_pattern, prep.scale, prep.key_valid,
            prep.slice_batch, skip=skip, maps=(prep.qmap, prep.kmap, prep.vmap), parallel=parallel, mods=prep.mods,
            flags=flags,
        )  # fmt: skip

    def backward(self, prep, go, o, ls, skip):
        from .fused_backward import fused_backward

        return fused_backward(prep.qc, prep.kc, prep.vc, go, o, ls, prep.patterns, prep.slice_pattern, prep.scale,
                              prep.key_valid, prep.slice_batch, skip=skip,
                              maps=(prep.qmap, prep.kmap, prep.vmap), mods=prep.mods)  # fmt: skip


class Blocked(ExecutionPath):
    """NumPy and BLAS over row blocks (:mod:`~sparseattn.engine.blocked`): what a cold start runs."""

    name = "blocked"
    compiled = False

    def forward(self, prep, skip, parallel=None):
        from .blocked import blocked_attention

        return blocked_attention(
            prep.qc, prep.kc, prep.vc, (prep.qmap, prep.kmap, prep.vmap), prep.patterns, prep.slice_pattern,
            prep.scale, prep.key_valid, prep.slice_batch, skip=skip, mods=prep.mods,
        )  # fmt: skip

    def backward(self, prep, go, o, ls, skip):
        from .blocked import blocked_backward

        return blocked_backward(prep.qc, prep.kc, prep.vc, go, o, ls, prep.patterns, prep.slice_pattern, prep.scale,
                                prep.key_valid, prep.slice_batch, skip=skip,
                                maps=(prep.qmap, prep.kmap, prep.vmap), mods=prep.mods)  # fmt: skip


class Staged(ExecutionPath):
    """SDDMM -> softmax -> SpMM (:mod:`~sparseattn.engine.staged`): exact IEEE arithmetic, the weights."""

    name = "staged"
    gives_weights = True

    def forward(self, prep, skip, parallel=None):
        if skip is None:
            out, lse, _ = staged_forward(prep, False)
            return out, lse
        keep = np.flatnonzero(~skip)
        dt = prep.qc.dtype
        out = np.zeros((len(skip), prep.n_q, prep.vc.shape[-1]), dtype=dt)
        lse = np.full((len(skip), prep.n_q), -np.inf, dtype=dt)
        out[keep], lse[keep], _ = staged_forward(prep, False, keep)
        return out, lse

    def backward(self, prep, go, o, ls, skip):
        if skip is None:
            return staged_backward(prep, go, o, ls)
        keep = np.flatnonzero(~skip)
        dq_kept, dk, dv = staged_backward(prep, go, o, ls, keep)  # dk, dv: the kept slices' share
        dq = np.zeros((len(skip),) + prep.qc.shape[1:], dtype=prep.qc.dtype)
        dq[keep] = dq_kept
        return dq, dk, dv


PATHS = {p.name: p for p in (Fused(), Staged(), Blocked())}
NAMES = ("auto",) + tuple(PATHS)


def check_path(path, return_weights=False):
    """The :class:`ExecutionPath` named ``path`` (``"auto"`` gives None), or a ``ValueError``."""
    if path not in NAMES:
        raise ValueError(f"path must be one of {NAMES}, got {path!r}")
    if path == "auto":
        return None
    why = PATHS[path].not_supported_reason(return_weights=return_weights)
    if why is not None:
        raise ValueError(why)
    return PATHS[path]


def _compile_inputs(dtype_name, seed, arrays):
    """Small inputs that reach every fused kernel: 2 slices of 160 tokens, a band with a global token."""
    from ..patterns.builders import global_tokens, sliding_window

    rng = np.random.default_rng(seed)
    n, d = 160, 16
    xs = [rng.standard_normal((2, n, d)).astype(dtype_name) for _ in range(arrays)]
    # a band with a global token: tiles, shared columns and long rows all have work
    return xs, sliding_window(n, 8) | global_tokens(n, [0])


def _compile_forward(dtype_name):
    """A small fused forward call (key padding included), validated and dispatched like a user's."""
    from .validate import prepare

    (q, k, v), pattern = _compile_inputs(dtype_name, 0, 3)
    mask = np.zeros((1, q.shape[1]), dtype=bool)
    mask[0, -3:] = True
    prep = prepare(q[None], k[None], v[None], pattern, None, mask)
    forward(prep, "fused")
    prep.nonfinite  # noqa: B018 - the scan that a call whose kernels flag a NaN or an infinity runs
    # k and v as views of a larger cache (a decode step): the kernels' specialisation for such views
    kv = np.concatenate([k, v], axis=1)
    forward(prepare(q, kv[:, : k.shape[1]], kv[:, : k.shape[1]], pattern), "fused")
    # a narrow neighbourhood's line kernel (sparseattn.kernels.grid), features in whole vectors
    from ..kernels.simd import block_width
    from ..patterns.grids import neighborhood

    g = neighborhood((3, 16), 3)
    x = np.zeros((1, g.shape[0], block_width(dtype_name)), dtype=dtype_name)
    forward(prepare(x, x, x, g), "fused")
    from .decode_step import compile_kernel

    compile_kernel(dtype_name)  # the decode steps' kernel (sparseattn.engine.decode_step)


def _compile_backward(dtype_name):
    """A small fused forward and backward, validated and dispatched like a user's."""
    from .validate import prepare

    (q, k, v, go), pattern = _compile_inputs(dtype_name, 1, 4)
    prep = prepare(q, k, v, pattern)
    out, lse, _ = forward(prep, "fused")
    backward(prep, go, out, lse, "fused")


def compile_job(kind):
    """What the cold start's background thread runs to compile the fused kernels of ``kind`` for a dtype.

    A small call through :func:`sparseattn.engine.validate.prepare` and this
    dispatcher, so it compiles exactly the signatures a user's call needs
    (the non-finite scan and the planner included) and stores them in the
    cache.
    """
    return _compile_forward if kind == "forward" else _compile_backward


def _resolve(prep, path, kind):
    """``path`` (a name) as an :class:`ExecutionPath`; ``"auto"`` runs fused, or blocked while fused compiles."""
    if path != "auto":
        return PATHS[path]
    if prep.n_q and len(prep.qmap):
        return PATHS[coldstart.choose(prep, kind, compile_job(kind))]
    return PATHS["fused"]


def forward(prep, path="auto", return_weights=False, parallel=None):
    """``(out, lse, weights)`` of a prepared call (``weights`` is None unless ``return_weights``).

    Slices whose ``q``, ``k`` or ``v`` hold a NaN or an infinity run on the
    staged path whatever ``path`` is.  ``parallel=False`` keeps the fused
    path in the calling thread (the Dask tasks).
    """
    out, lse, weights = _forward(prep, path, return_weights, parallel)
    if prep.mods.sinks is not None:
        f = prep.mods.add_sinks(out, lse)
        if weights is not None:
            weights.scale_rows(f)
    return out, lse, weights


def _forward(prep, path, return_weights, parallel):
    if return_weights or path == "staged":
        return staged_forward(prep, return_weights)
    run = _resolve(prep, path, "forward")
    if run.checks_finite:
        flags = np.zeros(len(prep.qmap), dtype=np.uint8)
        out, lse = run.forward(prep, None, parallel, flags=flags)
        if not flags.any():
            return out, lse, None
        # a kernel met a NaN or an infinity (or a finite overflow): the slices that hold one follow the policy
        bad = prep.nonfinite
    else:
        bad = prep.nonfinite if run.compiled else prep.nonfinite_slices(compiled=False)
        out, lse = run.forward(prep, bad if bad.any() else None, parallel)
    if bad.any():
        slices = np.flatnonzero(bad)
        out[slices], lse[slices], _ = staged_forward(prep, False, slices)
    return out, lse, None


def _bad_lse(ls):
    """(S,) bool: a slice's log-sum-exp holds a NaN or ``+inf`` (``-inf`` marks a row without keys: fine)."""
    with np.errstate(invalid="ignore"):
        return (np.isnan(ls) | (ls == np.inf)).any(axis=1)


def backward(prep, go, o, ls, path="auto"):
    """``(dq, dk, dv)`` of a prepared call: ``dq`` per slice (not yet summed over broadcast axes), ``dk``, ``dv`` per stored slice.

    ``go``, ``o``, ``ls`` are the flattened ``grad_out``, ``out`` and ``lse``.
    Slices with a NaN or an infinity in any input (``lse``: NaN or ``+inf``)
    run on the staged path whatever ``path`` is.
    """
    if path == "staged":
        return staged_backward(prep, go, o, ls)
    run = _resolve(prep, path, "backward")
    bad = prep.nonfinite_slices(run.compiled)
    scan_nonfinite(go, bad, run.compiled)
    scan_nonfinite(o, bad, run.compiled)
    bad |= _bad_lse(ls)
    skip = bad if bad.any() else None
    dq, dk, dv = run.backward(prep, go, o, ls, skip)
    if skip is not None:
        slices = np.flatnonzero(bad)
        dq[slices], dk_bad, dv_bad = staged_backward(prep, go, o, ls, slices)
        dk += dk_bad  # the flagged slices' share of the stored slices they read
        dv += dv_bad
    return dq, dk, dv
