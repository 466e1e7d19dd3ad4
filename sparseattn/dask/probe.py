"""Per-worker peak memory of a Dask computation (managed bytes and resident set), for tests and benchmarks.

:func:`memory_peaks` registers a :class:`MemoryProbe` on every worker, runs a
function (typically one that computes a graph) and returns each worker's
report.  Imports ``distributed``.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from .._memory import malloc_trim, status_kib

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

    ``groups`` (optional, ``{label: [names]}``): the peak, per label, of the
    bytes held in results whose key name (a tuple key's first item, or the
    key) is one of ``names``, also exact (e.g. the blocks of the inputs q, k
    and v, apart from slices and outputs), with the keys held then.

    Use :func:`memory_peaks`.
    """

    name = "sparseattn-memory-probe"

    def __init__(self, groups=None):
        self.groups = {label: frozenset(names) for label, names in (groups or {}).items()}

    def setup(self, worker):
        import gc

        self.worker = worker
        gc.collect()
        malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss0 = _status_bytes("VmRSS")
        except OSError:
            self.rss0 = None
        self.peak = self.worker.state.nbytes
        self.held = self._held()
        self.group_peak = {label: 0 for label in self.groups}
        self.group_held = {label: {} for label in self.groups}
        self._update_groups()

    def _held(self, names=None):
        return {
            str(ts.key): int(ts.nbytes or 0)
            for ts in self.worker.state.tasks.values()
            if ts.state == "memory" and (names is None or _name(ts.key) in names)
        }

    def _update_groups(self):
        for label, names in self.groups.items():
            held = self._held(names)
            total = sum(held.values())
            if total > self.group_peak[label]:
                self.group_peak[label] = total
                self.group_held[label] = held

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory":
            if self.worker.state.nbytes > self.peak:
                self.peak = self.worker.state.nbytes
                self.held = self._held()
            if self.groups and _name(key) in set().union(*self.groups.values()):
                self._update_groups()

    def report(self):
        hwm = _status_bytes("VmHWM") if self.rss0 is not None else None
        return {
            "managed_peak": int(self.peak),
            "held_at_peak": self.held,
            "rss_before": self.rss0,
            "rss_peak": hwm,
            "rss_peak_delta": None if hwm is None else max(0, hwm - self.rss0),
            "group_peak": dict(self.group_peak),
            "group_held_at_peak": {label: dict(held) for label, held in self.group_held.items()},
        }


def _name(key):
    return key[0] if isinstance(key, tuple) else key


def _status_bytes(field):
    kib = status_kib(field)
    if kib is None:
        raise OSError(f"no {field} in /proc/self/status")
    return kib * 1024


def memory_peaks(client, fn, groups=None):
    """Run ``fn()`` with a :class:`MemoryProbe` on every worker: ``(fn(), {worker: report})``.

    ``groups``: see :class:`MemoryProbe` (e.g. ``{"inputs": [q.name, k.name, v.name]}``).

    Call it on a quiet cluster (nothing else computing) whose workers have run
    the kernels once, so that the resident-set figure is the work's and not
    the runtime's.
    """

    def report(dask_worker):
        return dask_worker.plugins[MemoryProbe.name].report()

    client.register_plugin(MemoryProbe(groups), name=MemoryProbe.name)
    try:
        result = fn()
        reports = client.run(report)
    finally:
        client.unregister_worker_plugin(MemoryProbe.name)
    return result, reports
