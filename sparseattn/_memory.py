"""The memory guard: refuse a call whose arrays cannot fit, before allocating them.

A call that does not fit used to copy its inputs first and then fail (or, on a
small machine, meet the OOM killer): a ``q`` of shape (1, 1, 50_000_000, 64)
made with ``np.broadcast_to`` from one row was first copied to a contiguous
11.9 GiB array.  :func:`check` compares an estimate of the bytes a call will
allocate with the memory available to this process, read in O(1) from
``/proc/meminfo`` (``MemAvailable``) and the cgroup limit (v2
``memory.max - memory.current``, v1 ``memory.limit_in_bytes -
memory.usage_in_bytes``), or ``os.sysconf`` elsewhere, and raises
:class:`InsufficientMemoryError` (a ``MemoryError``) naming the items of the
estimate, what is available and what to do.
"""

from __future__ import annotations

import os

__all__ = ["InsufficientMemoryError", "available_bytes", "check", "format_bytes", "malloc_trim", "status_kib"]


class InsufficientMemoryError(MemoryError):
    """A call would allocate more memory than is available; raised before any allocation."""


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _field_kib(path, field):
    """The number after ``field:`` in a ``/proc`` file of ``key: value kB`` lines (None when unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def status_kib(field):
    """This process's ``/proc/self/status`` field in KiB (e.g. ``VmRSS``, ``VmHWM``), or None off Linux."""
    return _field_kib("/proc/self/status", field)


def malloc_trim():
    """Hand glibc's free pages back to the OS (so that reusing them shows in a resident-set peak); no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _meminfo_available():
    kib = _field_kib("/proc/meminfo", "MemAvailable")
    if kib is not None:
        return kib * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available():
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        lim = _read_int(limit)
        if lim is not None and lim < 1 << 60:  # v1 reports "no limit" as a huge number
            used = _read_int(usage) or 0
            return max(lim - used, 0)
    return None


def available_bytes():
    """Bytes this process can still allocate: the smaller of MemAvailable and the cgroup's headroom (None: unknown)."""
    values = [x for x in (_meminfo_available(), _cgroup_available()) if x is not None]
    return min(values) if values else None


def format_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check(items, caller, advice):
    """Raise :class:`InsufficientMemoryError` if the ``items`` ({what: bytes}) exceed what is available."""
    items = {k: int(v) for k, v in items.items() if v}
    need = sum(items.values())
    if need < 1 << 26:  # under 64 MiB: not worth reading /proc
        return
    avail = available_bytes()
    if avail is None or need <= avail:
        return
    parts = ", ".join(f"{k}: {format_bytes(v)}" for k, v in sorted(items.items(), key=lambda kv: -kv[1]))
    raise InsufficientMemoryError(
        f"{caller} would need about {format_bytes(need)} ({parts}) but only {format_bytes(avail)} is available "
        f"(MemAvailable and the cgroup limit); nothing was allocated. {advice}"
    )
