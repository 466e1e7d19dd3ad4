"""Whether a Numba kernel can run without compiling: compiled in this process, or in Numba's on-disk cache.

The cold-start policy (``sparseattn.engine.coldstart``) and the pattern
algebra's choice of merge ask this before they call a kernel whose compile
would make the caller wait.  The answer reads Numba's cache index (no
compilation, no loading) through Numba's cache internals; any surprise there
reads as "not cached".
"""

from __future__ import annotations

__all__ = ["cached", "numba_ready"]


def cached(disp, want=None, layout=None):
    """Whether Numba's on-disk cache holds ``disp`` compiled for this CPU and source (for dtype ``want``).

    ``layout``: also require an array argument of dtype ``want`` with that
    layout (``"A"``: the kernels' specialisation for views of a KV cache).
    """
    try:
        cache = disp._cache
        codegen = disp.targetctx.codegen()
        for key in cache._cache_file._load_index():
            sig = key[0]
            if want is not None and not any(getattr(t, "dtype", None) == want for t in sig):
                continue
            if layout is not None and not any(getattr(t, "layout", None) == layout for t in sig):
                continue
            if cache._index_key(sig, codegen) == key:
                return True
    except Exception:  # noqa: BLE001 - any surprise in Numba's internals means "not known to be cached"
        return False
    return False


def numba_ready(disp):
    """True when calling the Numba function ``disp`` needs no compilation: compiled in this process or cached."""
    return bool(disp.signatures) or cached(disp)
