"""Per-worker peak memory of a Dask computation (managed bytes and resident set), for tests and benchmarks.

:func:`memory_peaks` registers a :class:`MemoryProbe` on every worker, runs a
function (typically one that computes a graph) and returns each worker's
report.  Imports ``distributed``.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["MemoryProbe", "memory_peaks"]


class MemoryProbe(WorkerPlugin):
    """A worker plugin that records the worker's peak memory while it is registered.

    ``managed``: the bytes of the task results the worker holds
    (``WorkerState.nbytes``, the sum of their ``sizeof``), read at every
    transition into memory, so its peak is exact, with the keys held at that
    moment.  ``rss``: the peak resident set of the worker process (``VmHWM``,
    reset through ``/proc/self/clear_refs`` when the plugin is registered)
    minus the resident set at that moment (after ``gc.collect()`` and
    ``malloc_trim(0)``): what the tasks added to the warmed-up runtime.
    Linux only for ``rss`` (None elsewhere).

    Use :func:`memory_peaks`.
    """

    name = "sparseattn-memory-probe"

    def setup(self, worker):
        import gc

        self.worker = worker
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss0 = _status_bytes("VmRSS")
        except OSError:
            self.rss0 = None
        self.peak = self.worker.state.nbytes
        self.held = self._held()

    def _held(self):
        return {str(ts.key): int(ts.nbytes or 0) for ts in self.worker.state.tasks.values() if ts.state == "memory"}

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory" and self.worker.state.nbytes > self.peak:
            self.peak = self.worker.state.nbytes
            self.held = self._held()

    def report(self):
        hwm = _status_bytes("VmHWM") if self.rss0 is not None else None
        return {
            "managed_peak": int(self.peak),
            "held_at_peak": self.held,
            "rss_before": self.rss0,
            "rss_peak": hwm,
            "rss_peak_delta": None if hwm is None else max(0, hwm - self.rss0),
        }


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def memory_peaks(client, fn):
    """Run ``fn()`` with a :class:`MemoryProbe` on every worker: ``(fn(), {worker: report})``.

    Call it on a quiet cluster (nothing else computing) whose workers have run
    the kernels once, so that the resident-set figure is the work's and not
    the runtime's.
    """

    def report(dask_worker):
        return dask_worker.plugins[MemoryProbe.name].report()

    client.register_plugin(MemoryProbe(), name=MemoryProbe.name)
    try:
        result = fn()
        reports = client.run(report)
    finally:
        client.unregister_worker_plugin(MemoryProbe.name)
    return result, reports
