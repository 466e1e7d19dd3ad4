"""Root pytest configuration: the cold-start mode for tests and benchmarks, and doctests that need an optional
dependency skip when it is not installed.

The tests use ``pytest.importorskip``; doctests (``--doctest-modules`` and
``--doctest-glob='*.md'``) cannot, so this hook reads each doctest's examples
and marks it skipped when they use an extra that is missing -- e.g. the
``sparseattn.viz`` examples with only ``.[test]`` installed (no matplotlib).
"""

import importlib.util
import os
import re

import pytest

# Tests and benchmarks check and time the path they ask for: in a fresh environment, path="auto" would
# otherwise answer on the blocked path while the fused kernels compile in the background
# (sparseattn._coldstart); the tests of that behaviour set the variable themselves.
os.environ.setdefault("SPARSEATTN_COLD_START", "wait")

collect_ignore = []
if importlib.util.find_spec("torch") is None:  # sparseattn.torch imports torch at module level
    collect_ignore.append("sparseattn/torch.py")
if importlib.util.find_spec("distributed") is None:  # sparseattn.dask.probe imports distributed at module level
    collect_ignore.append("sparseattn/_dask_probe.py")

# optional module -> what in an example's source means it is needed
_NEEDS = {
    "matplotlib": r"\bplot_\w+\(|--png\b",
    "torch": r"\bsparseattn\.torch\b",
    "transformers": r"\bsparseattn\.hf\b",
    "dask": r"\bsparseattn\.dask\b",
    "distributed": r"\bLocalCluster\b",
    "safetensors": r"\bsafetensors\b",
}
_PATTERNS = {
    mod: re.compile(rf"(?:\b(?:import|from)\s+{mod}\b|{extra})") for mod, extra in _NEEDS.items()
}


def _missing(mod):
    try:
        return importlib.util.find_spec(mod) is None
    except (ImportError, ValueError):
        return True


def pytest_collection_modifyitems(config, items):
    for item in items:
        dtest = getattr(item, "dtest", None)
        if dtest is None:
            continue
        source = "\n".join(ex.source for ex in dtest.examples)
        for mod, pattern in _PATTERNS.items():
            if pattern.search(source) and _missing(mod):
                item.add_marker(pytest.mark.skip(reason=f"the example needs the optional dependency {mod}"))
                break
