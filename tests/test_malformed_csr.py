"""Hand-made malformed scipy matrices through every public entry point, each case in a subprocess.

scipy does not check the index arrays of a matrix built from raw arrays (or
edited afterwards); unchecked, an out-of-range column index was a segfault or
a read outside the array.  Each malformed matrix runs in its own Python
process through every public function that accepts a pattern, so a crash
shows as a failed test instead of killing the run; every call must raise a
``ValueError`` that names the argument and says what is wrong.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

# (case id, code building `m` from an 8x8 identity `base` in the given format, expected message fragment)
CASES = [
    ("csr-col-huge", "m = base.tocsr(); m.indices[-1] = 100_000_000", r"column index 100000000 in row 7"),
    ("csr-col-just-out", "m = base.tocsr(); m.indices[3] = 50", r"column index 50 in row 3"),
    ("csr-col-negative", "m = base.tocsr(); m.indices[-1] = -1", r"column index -1 in row 7"),
    ("csr-indptr-decreasing", "m = base.tocsr(); m.indptr[3] = 6", r"decreasing indptr at row 3"),
    ("csr-indptr-short", "m = base.tocsr(); m.indptr = m.indptr[:5]", r"indptr of length 5"),
    ("csr-indptr-past-end", "m = base.tocsr(); m.indptr[-1] = 12", r"indptr\[-1\] = 12 but only 8 stored"),
    ("csr-float-indices", "m = base.tocsr(); m.indices = m.indices.astype(float)", r"indices of dtype float64"),
    ("csc-row-out", "m = base.tocsc(); m.indices[2] = 9", r"row index 9 in column 2"),
    ("coo-col-out", "m = base.tocoo(); m.coords = (m.coords[0], m.coords[1] + 3)", r"column index 8 at entry 5"),
    ("coo-row-negative", "m = base.tocoo(); m.coords = (m.coords[0] - 1, m.coords[1])", r"row index -1 at entry 0"),
    ("bsr-block-col-out", "m = base.tobsr(blocksize=(2, 2)); m.indices[1] = 7", r"block column index 7 in block row 1"),
]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, scipy.sparse as sp
    import sparseattn as sa
    from sparseattn import analysis, reference, viz
    from sparseattn.patterns.base import as_pattern
    base = sp.csr_array(np.eye(8, dtype=bool))
    exec(sys.argv[1])
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 8, 4))
    out, lse = np.zeros((2, 8, 4)), np.zeros((2, 8))  # validation refuses the pattern before they are read
    calls = {
        "sparse_attention fused": lambda: sa.sparse_attention(q, k, v, m, path="fused"),
        "sparse_attention staged": lambda: sa.sparse_attention(q, k, v, m, path="staged"),
        "sparse_attention per-head": lambda: sa.sparse_attention(q, k, v, [sa.sliding_window(8, 1), m]),
        "sparse_attention_backward": lambda: sa.sparse_attention_backward(out, q, k, v, m, out, lse),
        "dense_attention": lambda: reference.dense_attention(q, k, v, m),
        "dense_attention_backward": lambda: reference.dense_attention_backward(out, q, k, v, m),
        "from_sparse": lambda: sa.from_sparse(m),
        "as_pattern": lambda: as_pattern(m),
        "union": lambda: sa.sliding_window(8, 1) | m,
        "intersection": lambda: m & sa.sliding_window(8, 1),
        "block_sparse": lambda: sa.block_sparse(m, 2),
        "receptive_field": lambda: analysis.receptive_field(m, 2),
        "density_grid": lambda: viz.density_grid(m, 4),
    }
    result = {}
    for name, call in calls.items():
        try:
            call()
            result[name] = ["no error", ""]
        except Exception as e:
            result[name] = [type(e).__name__, str(e)]
        print(name, flush=True, file=sys.stderr)  # the last line before a crash names the call
    result["numba kernels loaded"] = [str("sparseattn.kernels.forward" in sys.modules), ""]
    print(json.dumps(result))
    """
)

ARG_NAME = {
    "sparse_attention per-head": "pattern[1]",
    "from_sparse": "m",
    "union": "the right operand of |",
    "intersection": "the left operand of &",
    "block_sparse": "layout",
}


@pytest.mark.parametrize("case,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_malformed_csr_is_refused_everywhere(case, code, fragment):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"crashed (rc {proc.returncode}) after: {proc.stderr.strip().splitlines()[-3:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("numba kernels loaded")[0] == "False"  # refused before any kernel was imported
    for call, (kind, msg) in result.items():
        assert kind == "ValueError", (call, kind, msg)
        expect = ARG_NAME.get(call, "pattern")
        assert msg.startswith(expect + " "), (call, msg)
        assert "(8, 8)" in msg, (call, msg)  # the shape


        if call != "block_sparse" or not case.startswith("bsr"):
            assert re.search(fragment, msg), (call, msg, fragment)
