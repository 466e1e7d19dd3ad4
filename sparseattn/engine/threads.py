"""Running serial ``nogil`` kernels on a few Python threads, with BLAS capped at one thread.

Shared by the fused forward (:mod:`sparseattn.engine.fused_forward`) and backward: both cut
their work into cost-balanced ranges and hand them to :func:`run_ranges`,
inside :func:`blas_single_thread`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_ranges", "blas_single_thread", "PARALLEL_MIN_FLOP", "WORK_SPLIT"]

#: below this many (approximate) flops per kernel call, the fused paths run serially
PARALLEL_MIN_FLOP = 1 << 22
#: ranges of work per thread (more ranges absorb threads that get delayed)
WORK_SPLIT = 8

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def run_ranges(fn, args_before, args_after, bounds, n_threads, per_thread=None, flush_denormals=False):
    """``fn(*args_before, bounds[i], bounds[i + 1], *args_after, *extra)`` for every range, on ``n_threads`` threads.

    Ranges are handed out dynamically; the calling thread works too.
    ``extra = per_thread()`` is made once by each thread that takes a range
    (scratch buffers a thread reuses across its ranges); ``()`` when omitted.
    ``flush_denormals``: each thread runs its ranges with denormals flushed to zero and restores its
    floating-point mode after them (:mod:`sparseattn.kernels.fpmode`; the fused paths' softmax terms).
    """
    global _pool, _pool_size
    n_ranges = len(bounds) - 1
    n_threads = max(1, min(n_threads, n_ranges))
    counter = itertools.count()
    if flush_denormals:
        from ..kernels.fpmode import ftz_enter, ftz_exit

    def ranges():
        extra = None
        while True:
            i = next(counter)  # atomic under the GIL
            if i >= n_ranges:
                return
            if extra is None:
                extra = tuple(per_thread()) if per_thread is not None else ()
            fn(*args_before, bounds[i], bounds[i + 1], *args_after, *extra)

    def worker():
        if not flush_denormals:
            return ranges()
        old = ftz_enter()
        try:
            ranges()
        finally:
            ftz_exit(old)

    if n_threads == 1:
        worker()
        return
    with _pool_lock:
        if _pool is None or _pool_size < n_threads - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n_threads - 1, thread_name_prefix="sparseattn")
            _pool_size = n_threads - 1
        pool = _pool
    futures = [pool.submit(worker) for _ in range(n_threads - 1)]
    try:
        worker()
    finally:
        for f in futures:
            f.result()


class _BlasCap:
    """A re-entrant, shared cap of one BLAS library (chosen by ``pick``) at one thread.

    The first caller in saves and sets the thread count, the last one out
    restores it.  Without threadpoolctl it does nothing.
    """

    def __init__(self, pick):
        self._pick = pick
        self._libs = None  # the threadpoolctl controllers (False: unavailable)
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = []

    def controllers(self):
        if self._libs is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # pragma: no cover - threadpoolctl is optional
                self._libs = False
            else:
                ctl = ThreadpoolController().select(user_api="blas")
                self._libs = self._pick(list(ctl.lib_controllers))
        return self._libs

    @contextlib.contextmanager
    def __call__(self):
        libs = self.controllers()
        if not libs:  # pragma: no cover
            yield
            return
        with self._lock:
            if self._depth == 0:
                self._saved[:] = [c.get_num_threads() for c in libs]
                for c, nt in zip(libs, self._saved):
                    if nt != 1:
                        c.set_num_threads(1)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for c, nt in zip(libs, self._saved):
                        if nt != 1:
                            c.set_num_threads(nt)


def _scipy_blas(libs):
    import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS numba's np.dot calls)

    # numba's np.dot goes through scipy.linalg.cython_blas: cap that library only
    return [c for c in libs if "scipy.libs" in c.filepath or "/scipy/" in c.filepath] or libs


def _numpy_blas(libs):
    import numpy  # noqa: F401  (its BLAS is loaded with it)

    return [c for c in libs if "numpy.libs" in c.filepath or "/numpy/" in c.filepath] or libs


#: Cap the BLAS that the kernels call (numba's ``np.dot``) at one thread while they run (they are parallel already).
blas_single_thread = _BlasCap(_scipy_blas)
#: Cap NumPy's BLAS at one thread: the blocked path's small products gain nothing from BLAS threads, and
#: lose a lot to them when another thread (a background compile) holds a core.
numpy_blas_single_thread = _BlasCap(_numpy_blas)


def _numba_blas_controllers():
    return blas_single_thread.controllers()
