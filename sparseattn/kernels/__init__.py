"""Numba kernels: raw arrays in, raw arrays out, no validation and no allocation policy.

``simd``: the vector type, ``exp`` and the register-block micro-kernels.
``forward``: the tile-planned online-softmax forward (see ``sparseattn.plan``).
``staged``: SDDMM -> row softmax -> SpMM (materialises one score per nonzero).
``planning``: the generic planner's O(nnz) passes.

Numba's on-disk cache (``cache=True``) keys a compiled function on the
modification time and size of the file that defines it, not of the files it
calls into: a kernel in ``forward.py`` would keep using stale inlined
micro-kernels after ``simd.py`` changed.  Importing this package therefore
registers a cache locator for the files of this package whose stamp is a
digest of all of them, so editing any kernel file recompiles every kernel.
"""

from __future__ import annotations

import hashlib
import os

from numba.core import caching

_HERE = os.path.dirname(os.path.abspath(__file__))


def _sources_digest():
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(os.listdir(_HERE)):
        if name.endswith(".py"):
            h.update(name.encode())
            with open(os.path.join(_HERE, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


_DIGEST = _sources_digest()


def _ours(py_file):
    return os.path.dirname(os.path.abspath(py_file)) == _HERE


class _KernelsMixin:
    def get_source_stamp(self):
        return ("sparseattn.kernels", _DIGEST)

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _ours(py_file):
            return None
        return super().from_function(py_func, py_file)


class _InTreeLocator(_KernelsMixin, caching.InTreeCacheLocator):
    pass


class _UserWideLocator(_KernelsMixin, caching.UserWideCacheLocator):
    pass


class _UserProvidedLocator(_KernelsMixin, caching.UserProvidedCacheLocator):
    pass


def _install():
    classes = caching.CacheImpl._locator_classes
    if any(c.__module__ == __name__ for c in classes):
        return
    # NUMBA_CACHE_DIR first (as numba does), then next to the sources, then the user-wide directory
    classes[0:0] = [_UserProvidedLocator, _InTreeLocator, _UserWideLocator]


_install()
