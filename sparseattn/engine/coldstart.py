"""A first call in seconds: compile the fused kernels in the background, answer on the blocked path meanwhile.

In a fresh environment (an empty Numba cache) the fused kernels take seconds
to compile (the forward's about 10 s, the backward's more).  With
``path="auto"``, the first forward (or backward) call of a dtype whose fused
forward (or backward) kernels are neither loaded in this process nor in
Numba's on-disk cache starts a background thread that compiles them (by
running a small fused call, which also stores them in the cache), and this
call and the next ones run on the blocked path (:mod:`sparseattn.engine.blocked`:
NumPy and BLAS, nothing to compile) until the thread is done.  When the
kernels are in the cache, nothing changes: the first call loads them (about
a second) and runs fused.

The environment variable ``SPARSEATTN_COLD_START`` chooses:

``background`` (default)
    as above.
``wait``
    compile in the caller's thread, as a plain Numba program does: every
    ``auto`` call runs the fused kernels (the test suite and the benchmarks
    use this, so that what they measure does not depend on compile timing).

The two paths agree to rounding (float32: about 1e-6 relative), not bit for
bit; ``path="fused"`` always waits for the fused kernels.  A process that
exits while the thread still compiles waits for it (with a line on stderr),
so the compiled kernels reach the cache and the next process starts warm; a
``fork`` waits for it too (a child must not inherit Numba's compiler lock
held).  ``sparseattn warmup`` compiles everything ahead of time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

from ..kernels.cache import cached

__all__ = [
    "mode", "choose", "fused_ready", "kernel_ready", "known_ready", "start", "compiling", "in_compile_thread",
    "compile_here", "wait", "status",
]  # fmt: skip

_MODES = ("background", "wait")
_KINDS = ("forward", "backward")
_lock = threading.Lock()
# keys: "forward float32", "backward float64", ...
_threads = {}  # key -> Thread compiling those fused kernels
_ready = set()  # keys whose fused kernels can run without compiling in the caller's thread
_times = {}  # key -> (start, end or None)
_errors = {}  # key -> exception raised by the background compile
_hooks = []
_kernels_ready = set()  # the keys of kernel_ready's calls that can run now
_here = threading.local()  # .on: this thread compiles what its calls need (compile_here)


def mode():
    """``SPARSEATTN_COLD_START``: ``"background"`` (default) or ``"wait"``."""
    value = os.environ.get("SPARSEATTN_COLD_START", "").strip().lower() or "background"
    if value not in _MODES:
        raise ValueError(f"SPARSEATTN_COLD_START must be one of {_MODES}, got {os.environ['SPARSEATTN_COLD_START']!r}")
    return value


def _kernels(kind):
    if kind == "forward":
        from ..kernels.forward import long_rows_merge, long_rows_partial, tiles_forward

        return tiles_forward, long_rows_partial, long_rows_merge
    from ..kernels.backward import flush_keys, long_rows_backward, tiles_backward

    return tiles_backward, long_rows_backward, flush_keys


def _in_disk_cache(key, views=False):
    """Whether Numba's cache holds the fused kernels of ``key`` (``"forward float32"``...; see :func:`sparseattn.kernels.cache.cached`).

    ``views``: also their specialisation for k and v that are views of a KV
    cache (the forward only), which the compile job builds too.
    """
    import numba
    import numpy as np

    kind, dtype_name = key.split()
    want = numba.from_dtype(np.dtype(dtype_name))
    kernels = _kernels(kind)
    if views and kind == "forward" and not cached(kernels[0], want, layout="A"):
        return False
    return all(cached(disp, want) for disp in kernels)


def _key(dtype, kind):
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return f"{kind} {__import__('numpy').dtype(dtype).name}"


def fused_ready(dtype, kind="forward", views=False):
    """True when an ``auto`` call of this dtype (``kind``: forward or backward) should run the fused kernels now.

    ``views``: the call's k or v are views of a KV cache (their own kernel specialisation).
    """
    key = _key(dtype, kind)
    rkey = f"{key} views" if views else key
    if rkey in _ready or mode() == "wait" or in_compile_thread():
        return True
    with _lock:
        t = _threads.get(key)
        if t is not None:
            if t.is_alive():
                return False
            _ready.update((key, f"{key} views"))  # the compile job builds both
            return True
    if _in_disk_cache(key, views):
        _ready.add(rkey)
        return True
    return False


def known_ready(key):
    """Whether :func:`kernel_ready` has already said yes for ``key`` (cheap: a decode loop asks per layer and step)."""
    return key in _kernels_ready


def kernel_ready(dispatcher, key, serves, dtype, layout=None):
    """Whether a call may run ``dispatcher`` (a kernel outside the fused sets above) without compiling it.

    True when a signature compiled in this process ``serves`` the call (``serves(sig)``), when Numba's disk
    cache holds it for ``dtype`` (``layout="A"``: its specialisation for views) while no compile job runs (a
    job writing the cache meanwhile could race the load), and when compiling in the caller's thread is what
    was asked (``wait`` mode, or the compile job's own thread).  The first two are remembered under ``key``
    (hashable, naming the kernel: a decode loop asks once per layer and step).  The line kernel and the
    decode kernel ask this before they take a call; otherwise the route that is ready answers it.
    """
    if key in _kernels_ready:
        return True
    if mode() == "wait" or in_compile_thread() or getattr(_here, "on", False):
        return True
    if any(serves(sig) for sig in dispatcher.signatures) or (
        not compiling() and cached(dispatcher, dtype, layout=layout)
    ):
        _kernels_ready.add(key)
        return True
    return False


def choose(prep, kind, job):
    """The path of an ``auto`` call on ``prep`` (a ``Prepared``): ``"fused"``, or ``"blocked"`` while they compile.

    When the fused kernels are not ready, builds the patterns' CSR first (the
    blocked path needs it, and building it may compile Numba's merge, which
    must happen before the background thread holds the compiler lock), then
    starts the thread, which runs ``job(dtype_name)`` (a small fused call that
    compiles the kernels and stores them in the cache).
    """
    dtype = prep.qc.dtype
    views = not (prep.kc.flags.c_contiguous and prep.vc.flags.c_contiguous)
    if fused_ready(dtype, kind, views):
        return "fused"
    for p in prep.patterns:
        p.csr
    start(dtype, kind, job)
    return "blocked"


def _compile(key, job):
    try:
        job(key.split()[1])
    except BaseException as e:  # noqa: BLE001 - kept for status(); the foreground compiles (and raises) itself
        _errors[key] = e
    finally:
        _times[key] = (_times[key][0], time.perf_counter())


def start(dtype, kind, job):
    """Start compiling the fused kernels of ``dtype`` and ``kind`` in a background thread (once per process).

    The thread runs ``job(dtype_name)``: the path's small compile call (see
    :func:`sparseattn.engine.paths.compile_job`).
    """
    key = _key(dtype, kind)
    with _lock:
        if key in _threads:
            return
        if not _hooks:
            import atexit

            atexit.register(_at_exit)
            os.register_at_fork(before=wait)
            _hooks.append(True)
        _times[key] = (time.perf_counter(), None)
        name = "sparseattn-compile-" + key.replace(" ", "-")
        t = threading.Thread(target=_compile, args=(key, job), name=name, daemon=True)
        _threads[key] = t
        t.start()


def compiling():
    """True while a background compile runs (the caller must then not ask Numba to compile anything)."""
    return any(t.is_alive() for t in list(_threads.values()))


@contextlib.contextmanager
def compile_here():
    """Within it, the calling thread's calls compile the kernels they need, as in ``wait`` mode.

    For ``sparseattn warmup``: a kernel that a call takes only when it is ready
    (:func:`kernel_ready`: the line kernel, the decode kernel) would otherwise
    be left to the cold start's compile job, which never starts once the fused
    kernels are in the cache.
    """
    before = getattr(_here, "on", False)
    _here.on = True
    try:
        yield
    finally:
        _here.on = before


def in_compile_thread():
    """True in one of the background compile threads."""
    return threading.current_thread().name.startswith("sparseattn-compile-")


def wait(timeout=None):
    """Wait for the background compiles to finish; returns True when none is left running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in list(_threads.values()):
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not compiling()


def status():
    """``{"forward float32": (seconds so far or in all, finished, error), ...}`` of the background compiles."""
    now = time.perf_counter()
    return {
        key: ((end if end is not None else now) - t0, end is not None, _errors.get(key))
        for key, (t0, end) in _times.items()
    }


def _at_exit():
    if compiling():
        print(
            "sparseattn: finishing the background compilation of the fused kernels into Numba's cache "
            "(once per environment; `sparseattn warmup` does it ahead of time)",
            file=sys.stderr,
            flush=True,
        )
        try:
            wait()
        except KeyboardInterrupt:
            pass
