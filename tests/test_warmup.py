"""`sparseattn warmup`: kernels compiled into an empty Numba cache, then loaded from it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ONLY_REACH = (
    "from sparseattn.cli import _warm_analysis\n"
    "from sparseattn.engine import warmup as w\n"
    "w.steps = lambda: []\n"
    "w.warmup(extra=[('receptive-field bitsets', _warm_analysis)])\n"
)


def _run(code, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_warmup_compiles_into_the_cache_then_loads(tmp_path):
    first = _run(_ONLY_REACH, tmp_path)
    assert first.startswith("[1/1] receptive-field bitsets\n")
    for kernel in ("pack_rows", "find_loopless", "layer_step", "to_csr"):
        assert f"compiled sparseattn.kernels.reach.{kernel}(" in first
    assert any(f.endswith(".nbi") for _, _, files in os.walk(tmp_path) for f in files)
    second = _run(_ONLY_REACH, tmp_path)  # a new process: everything comes from the cache
    assert "compiled sparseattn" not in second and second.splitlines()[-1].startswith("0 kernels compiled")
    assert "nothing to compile: loaded from the cache" in second


@pytest.mark.slow
def test_full_warmup_leaves_nothing_to_compile(tmp_path):
    code = "import sparseattn.engine.warmup as w\nw.warmup()\n"
    first = _run(code, tmp_path)
    assert "compiled sparseattn.kernels.forward.tiles_forward(" in first
    assert "compiled sparseattn.kernels.grid.grid_forward(" in first  # the neighbourhoods' line kernel
    second = _run(code, tmp_path)
    assert "compiled sparseattn" not in second
    assert second.splitlines()[-1].startswith("0 kernels compiled")


def test_warmup_command_is_listed(capsys):
    from sparseattn.cli import main

    assert main(["--help"]) == 0
    assert "warmup" in capsys.readouterr().out
    assert main(["warmup", "--help"]) == 0
    assert "Numba" in capsys.readouterr().out
