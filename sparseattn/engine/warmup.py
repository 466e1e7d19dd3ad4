"""Compile every Numba kernel into Numba's on-disk cache ahead of time.

The kernels are compiled on first use (``cache=True``) and loaded from the
cache in later processes, so only the first call in a fresh environment pays
for compilation.  :func:`warmup` (``sparseattn warmup``) pays it up front --
for container images and CI -- by running one small call of every path that
has its own kernels: the fused forward (with the long-row kernels of global
rows), the staged path (and ``return_weights``), both backward paths, the
pattern planner and merges, and the receptive-field bitsets, in float32 and
float64.  A progress line names each kernel as it is compiled.

The cache goes where Numba puts it: ``NUMBA_CACHE_DIR`` when set, else next to
the package's sources (or a user-wide directory when those are read-only).
The compiled code is specific to the CPU (and the micro-kernels' vector width,
see ``sparseattn.kernels``), so warm up on the machine type that will run it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["warmup", "steps"]


def _forward(dtype, **kw):
    def run():
        from ..patterns.builders import global_tokens, sliding_window
        from .attention import sparse_attention

        rng = np.random.default_rng(0)
        n, d = 160, 16
        q, k, v = (rng.standard_normal((2, n, d)).astype(dtype) for _ in range(3))
        # a band with a global token: tiles, shared columns and long rows all have work
        p = sliding_window(n, 8) | global_tokens(n, [0])
        mask = np.zeros((1, n), dtype=bool)
        mask[0, -3:] = True
        sparse_attention(q[None], k[None], v[None], p, key_padding_mask=mask, **kw)
        if kw.get("path") == "fused":  # a narrow neighbourhood's line kernel (features in whole vectors)
            from ..kernels.simd import block_width
            from ..patterns.grids import neighborhood

            g = neighborhood((3, 16), 3)
            x = rng.standard_normal((1, g.shape[0], block_width(dtype))).astype(dtype)
            sparse_attention(x, x, x, g, **kw)

    return run


def _decode(dtype):
    def run():
        from .decode_step import compile_kernel

        compile_kernel(dtype)

    return run


def _backward(dtype, path):
    def run():
        from ..patterns.builders import global_tokens, sliding_window
        from .attention import sparse_attention
        from .backward import sparse_attention_backward

        rng = np.random.default_rng(1)
        n, d = 160, 16
        q, k, v, go = (rng.standard_normal((2, n, d)).astype(dtype) for _ in range(4))
        p = sliding_window(n, 8) | global_tokens(n, [0])
        out, lse = sparse_attention(q, k, v, p, return_lse=True)
        sparse_attention_backward(go, q, k, v, p, out, lse, path=path)

    return run


def _patterns():
    from ..kernels.grid_runs import grid_runs
    from ..patterns.builders import from_dense, random_pattern, sliding_window
    from ..patterns.grids import neighborhood
    from .plan import get_plan

    n = 3000  # large enough for the Numba merge of union / intersection rows
    a = sliding_window(n, 40) | random_pattern(n, n, 5, seed=0)
    (a & sliding_window(n, 20)).csr
    get_plan(a)
    get_plan(from_dense(np.eye(64, dtype=bool) | np.eye(64, k=3, dtype=bool)))
    grid = neighborhood((24, 40), 7)  # the grid's runs kernel (small grids use NumPy until it is compiled)
    grid_runs(0, 8, *grid._kernel_args())
    get_plan(grid)


def steps():
    """``[(label, callable)]``: the engine's calls, in order (``sparseattn warmup`` adds the tools' kernels)."""
    out = []
    for dt in ("float32", "float64"):
        out += [
            (f"forward {dt} (fused)", _forward(dt, path="fused")),
            (f"forward {dt} (staged)", _forward(dt, path="staged")),
            (f"forward {dt} (return_weights)", _forward(dt, return_weights=True)),
            (f"decode {dt}", _decode(dt)),
            (f"backward {dt} (fused)", _backward(dt, "fused")),
            (f"backward {dt} (staged)", _backward(dt, "staged")),
        ]
    out += [("pattern planner and merges", _patterns)]
    return out


class _Compiles:
    """Collects the top-level Numba compilations (not the callees compiled inside them)."""

    def __init__(self, out):
        from numba.core import event

        class Listener(event.Listener):
            def on_start(inner, ev):  # noqa: N805
                self.depth += 1
                if self.depth == 1:
                    self.t0 = time.perf_counter()

            def on_end(inner, ev):  # noqa: N805
                self.depth -= 1
                if self.depth == 0:
                    disp = ev.data["dispatcher"]
                    name = getattr(disp, "py_func", disp).__qualname__
                    module = getattr(getattr(disp, "py_func", None), "__module__", "")
                    types = ", ".join(str(a) for a in ev.data["args"])
                    if len(types) > 60:
                        types = types[:57] + "..."
                    dt = time.perf_counter() - self.t0
                    self.done.append((module, name, dt))
                    print(f"    compiled {module}.{name}({types}) in {dt:.1f} s", file=out, flush=True)

        self.depth = 0
        self.t0 = 0.0
        self.done = []
        self.listener = Listener()
        self.event = event

    def __enter__(self):
        self.event.register("numba:compile", self.listener)
        return self

    def __exit__(self, *exc):
        self.event.unregister("numba:compile", self.listener)


def warmup(out=None, extra=()):
    """Compile every kernel (or load it from Numba's cache), printing a line per kernel to ``out``.

    ``extra``: more ``(label, callable)`` steps after the engine's (the tools' kernels).

    Returns
    -------
    list of (str, str, float)
        ``(module, kernel, seconds)`` for every kernel compiled in this call;
        empty when every kernel was already in the cache.
    """
    out = sys.stdout if out is None else out
    compiled = []
    all_steps = steps() + list(extra)
    t_all = time.perf_counter()
    from . import coldstart

    # compile_here: the kernels that a call takes only once they are ready (the line kernel) compile too
    with _Compiles(out) as rec, coldstart.compile_here():
        for i, (label, fn) in enumerate(all_steps, start=1):
            print(f"[{i}/{len(all_steps)}] {label}", file=out, flush=True)
            before = len(rec.done)
            t0 = time.perf_counter()
            fn()
            if len(rec.done) == before:
                print(f"    nothing to compile: loaded from the cache ({time.perf_counter() - t0:.1f} s)", file=out, flush=True)
        compiled = list(rec.done)
    print(f"{len(compiled)} kernels compiled in {time.perf_counter() - t_all:.1f} s", file=out, flush=True)
    return compiled
