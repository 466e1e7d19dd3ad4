"""pytest configuration for the benchmarks (``pytest benchmarks/``).

Options
-------
--quick
    Few small sizes and one round per benchmark (same as ``SPARSEATTN_BENCH_QUICK=1``); CI runs
    ``pytest benchmarks/ --quick --benchmark-disable`` so the benchmarks never rot. Quick mode is
    also on with ``--benchmark-disable`` and when the benchmarks are collected without being named
    on the command line (a bare ``pytest`` whose testpaths include ``benchmarks``).

Environment
-----------
SPARSEATTN_BENCH_NS=1024,4096,8192
    Overrides the list of sequence lengths of every n sweep.

The float32 GEMM rate of NumPy's BLAS is measured at the start of the run, in this process (with
whatever ``OPENBLAS_CORETYPE`` the machine sets) and in a subprocess with ``OPENBLAS_CORETYPE`` and
``OPENBLAS_L2_SIZE`` unset; both go into the JSON's ``machine_info["sparseattn"]`` and every
benchmark's ``extra_info``, and both are measured again at the end (``*_end``).
"""

import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", default=False, help="benchmarks: few small sizes, one round (also SPARSEATTN_BENCH_QUICK=1)")


def _named_on_command_line(config):
    here = os.path.dirname(os.path.abspath(__file__))
    for arg in config.invocation_params.args:
        if arg.startswith("-"):
            continue
        path = os.path.abspath(os.path.join(str(config.invocation_params.dir), arg.split("::")[0]))
        if path == here or path.startswith(here + os.sep):
            return True
    return False


def pytest_configure(config):
    # Quick mode when asked (--quick), when timing is off (--benchmark-disable: a smoke test), and
    # when the benchmarks were collected without being named (e.g. a bare `pytest` through testpaths).
    disabled = bool(getattr(config.option, "benchmark_disable", False))
    if config.getoption("--quick", default=False) or disabled or not _named_on_command_line(config):
        os.environ[benchlib.QUICK_ENV] = "1"


_LOAD = {}


def pytest_sessionstart(session):
    _LOAD["start"] = os.getloadavg()
    benchlib.session_gemm()  # measured before any benchmark, in the same run


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_features():
    """The vector extensions LLVM sees on this CPU (what the Numba kernels are compiled for)."""
    import llvmlite.binding as ll

    feats = ll.get_host_cpu_features()
    return {"cpu_name": ll.get_host_cpu_name(), **{f: bool(feats.get(f)) for f in ("avx2", "fma", "avx512f", "avx512vl")}}


def _vector_bits():
    from sparseattn.kernels import VECTOR_BYTES

    return VECTOR_BYTES * 8


def pytest_benchmark_update_machine_info(config, machine_info):
    import numba

    g = benchlib.session_gemm()
    # measured again at the end: the machine is shared, the report takes the best of the two
    end = {"in_process": benchlib.gemm_rate(), "hardware_default": benchlib.gemm_rate_hardware()}
    machine_info["sparseattn"] = {
        "quick": benchlib.quick(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numba_num_threads": numba.config.NUMBA_NUM_THREADS,
        "cpu_features": _cpu_features(),
        "kernel_vector_bits": _vector_bits(),
        "fused_available": benchlib.fused_available(),
        "gemm_float32_in_process": g["in_process"],
        "gemm_float32_hardware_default": g["hardware_default"],
        "gemm_float32_in_process_end": end["in_process"],
        "gemm_float32_hardware_default_end": end["hardware_default"],
        "loadavg_at_start": _LOAD.get("start"),
        "loadavg_at_end": os.getloadavg(),
        "versions": {m: _version(m) for m in ("numpy", "scipy", "numba", "torch", "transformers", "sparseattn")},
    }
