"""Running serial ``nogil`` kernels on a few Python threads, with BLAS capped at one thread.

Shared by the fused forward (:mod:`sparseattn.forward`) and backward: both cut
their work into cost-balanced ranges and hand them to :func:`run_ranges`,
inside :func:`blas_single_thread`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_ranges", "blas_single_thread"]

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def run_ranges(fn, args_before, args_after, bounds, n_threads, per_thread=None):
    """``fn(*args_before, bounds[i], bounds[i + 1], *args_after, *extra)`` for every range, on ``n_threads`` threads.

    Ranges are handed out dynamically; the calling thread works too.
    ``extra = per_thread()`` is made once by each thread that takes a range
    (scratch buffers a thread reuses across its ranges); ``()`` when omitted.
    """
    global _pool, _pool_size
    n_ranges = len(bounds) - 1
    n_threads = max(1, min(n_threads, n_ranges))
    counter = itertools.count()

    def worker():
        extra = None
        while True:
            i = next(counter)  # atomic under the GIL
            if i >= n_ranges:
                return
            if extra is None:
                extra = tuple(per_thread()) if per_thread is not None else ()
            fn(*args_before, bounds[i], bounds[i + 1], *args_after, *extra)

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


_blas = None  # the threadpoolctl controllers of the BLAS numba's np.dot calls (False: unavailable)
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved = []


def _numba_blas_controllers():
    global _blas
    if _blas is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS numba's np.dot calls)

        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is optional
            _blas = False
        else:
            ctl = ThreadpoolController().select(user_api="blas")
            # numba's np.dot goes through scipy.linalg.cython_blas: cap that library only
            ours = [c for c in ctl.lib_controllers if "scipy.libs" in c.filepath or "/scipy/" in c.filepath]
            _blas = ours or list(ctl.lib_controllers)
    return _blas


@contextlib.contextmanager
def blas_single_thread():
    """Cap the BLAS that the kernels call at one thread while they run (they are parallel already).

    Re-entrant and shared between concurrent callers: the first one in saves
    and sets the thread count, the last one out restores it.  Without
    threadpoolctl this is a no-op (BLAS may then oversubscribe the cores).
    """
    global _blas_depth
    libs = _numba_blas_controllers()
    if not libs:  # pragma: no cover
        yield
        return
    with _blas_lock:
        if _blas_depth == 0:
            _blas_saved[:] = [c.get_num_threads() for c in libs]
            for c, nt in zip(libs, _blas_saved):
                if nt != 1:
                    c.set_num_threads(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for c, nt in zip(libs, _blas_saved):
                    if nt != 1:
                        c.set_num_threads(nt)
