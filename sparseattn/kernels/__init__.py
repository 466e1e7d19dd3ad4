"""Numba kernels: raw arrays in, raw arrays out, no validation and no allocation policy.

``simd``: the vector type, ``exp`` and the register-block micro-kernels.
``forward``: the tile-planned online-softmax forward (see ``sparseattn.engine.plan``).
``staged``: SDDMM -> row softmax -> SpMM (materialises one score per nonzero).
``planning``: the generic planner's O(nnz) passes.
``finite``: which slices of an input hold a NaN or an infinity (the non-finite routing).
``backward``, ``staged_backward``: the fused and the staged backward.
``csr_ops``: the parallel merge of CSR rows (pattern unions and intersections).
``reach``: word-packed bitsets of the receptive-field analysis.
``cache``: whether a kernel is compiled or in Numba's on-disk cache (no compiling, no loading).

Numba's on-disk cache (``cache=True``) keys a compiled function on the
modification time and size of the file that defines it, not of the files it
calls into: a kernel in ``forward.py`` would keep using stale inlined
micro-kernels after ``simd.py`` changed.  Importing this package therefore
registers a cache locator for the files of this package whose stamp is a
digest of all of them, so editing any kernel file recompiles every kernel.

The micro-kernels' vector width is chosen here, once per process
(:data:`VECTOR_BYTES`): 64 bytes (16 float32 lanes) on a CPU with AVX-512
that runs it at full rate, else 32 (8 lanes, AVX2).  Zen 4 executes 512-bit
instructions on 256-bit units; measured there, 512-bit blocks gave the same
forward time and a 10% slower backward, so it keeps 32.  The environment
variable ``SPARSEATTN_SIMD_BITS`` (256 or 512) overrides the choice (tests use
it to run both widths on any host; LLVM splits a 512-bit vector on an AVX2
CPU).  The width is part of the cache file names, so both widths' compiled
kernels can sit in one cache.
"""

from __future__ import annotations

import hashlib
import os

from numba.core import caching

_HERE = os.path.dirname(os.path.abspath(__file__))
#: CPUs with AVX-512 on 256-bit execution units (double-pumped), where 256-bit blocks are as fast or faster
_HALF_RATE_AVX512 = frozenset({"znver4"})


def _vector_bytes():
    env = os.environ.get("SPARSEATTN_SIMD_BITS", "").strip()
    if env:
        if env not in ("256", "512"):
            raise ValueError(f"SPARSEATTN_SIMD_BITS must be 256 or 512, got {env!r}")
        return int(env) // 8
    import llvmlite.binding as ll

    if ll.get_host_cpu_features().get("avx512f") and ll.get_host_cpu_name() not in _HALF_RATE_AVX512:
        return 64
    return 32


#: bytes per vector register of the micro-kernels: 32 (AVX2) or 64 (AVX-512)
VECTOR_BYTES = _vector_bytes()


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

    def get_disambiguator(self):
        return f"{super().get_disambiguator()}-v{VECTOR_BYTES * 8}"

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
