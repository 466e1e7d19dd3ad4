"""The docs site builds without warnings, and the code in the guides runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "gallery" / "index.html").exists() or (tmp_path / "site" / "gallery.html").exists()


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md"])
def test_python_blocks_in_guides_run(page):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    assert blocks, f"docs/{page} has no python blocks"
    ns = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), ns)
