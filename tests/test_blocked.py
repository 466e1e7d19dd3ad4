"""The blocked path (NumPy/BLAS) and the cold start that uses it.

The blocked path runs in every parametrised case of test_attention.py,
test_nonfinite.py and test_fuzz.py; here are the parts those small cases do
not reach (long rows merged over key chunks, block splitting, the BLAS
thread cap, the NumPy merge of large patterns) and the cold start itself, in
fresh processes with an empty Numba cache.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import assert_attention_close

import sparseattn as sa
from sparseattn.engine import blocked
from sparseattn.engine import coldstart as _coldstart
from sparseattn.reference import dense_attention


def _long_rows_case(rng, dtype, monkeypatch):
    """Three global rows of 2600 keys, walked over chunks of 1024 keys in batches of two, with padding."""
    monkeypatch.setattr(blocked, "_GRID", 1 << 10)
    monkeypatch.setattr(blocked, "_LONG_BATCH", 2)  # three long rows: a batch of two and one of one
    n = 2600
    p = sa.longformer(n, 6, [0, 1300, n - 1])
    counts = np.diff(p.csr.indptr)
    assert (counts == n).sum() == 3 and counts.max() > 8 * counts.mean()  # three long rows
    q, k, v = (rng.standard_normal((2, 2, n, 8)).astype(dtype) for _ in range(3))
    kpm = np.zeros((2, n), bool)
    kpm[1, 1000:2200] = True  # the long rows lose keys in the middle chunks
    kpm[1, 1300] = True  # a padded global key
    return q, k, v, p, kpm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_rows_merge_over_key_chunks(rng, dtype, monkeypatch):
    """Global rows run over chunks of keys, in batches of rows, merged with the log-sum-exp formula."""
    q, k, v, p, kpm = _long_rows_case(rng, dtype, monkeypatch)
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, path="blocked", return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True)
    assert_attention_close(out, ref, dtype)
    tol = 2e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_rows_backward_over_key_chunks(rng, dtype, monkeypatch):
    """The blocked backward of the same long rows against the float64 analytic gradient."""
    from test_backward import assert_grads_close

    from sparseattn.reference import dense_attention_backward

    q, k, v, p, kpm = _long_rows_case(rng, dtype, monkeypatch)
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, return_lse=True)
    go = rng.standard_normal(out.shape).astype(dtype)
    grads = sa.sparse_attention_backward(go, q, k, v, p, out, lse, key_padding_mask=kpm, path="blocked")
    ref = dense_attention_backward(go, q, k, v, p, key_padding_mask=kpm)
    assert_grads_close(grads, ref, (q, k, v))


def test_row_whose_keys_are_all_padded_is_zero_with_lse_minus_inf(rng):
    n = 1200
    p = sa.sliding_window(n, 3) | sa.global_tokens(n, [5])
    q, k, v = (rng.standard_normal((1, 1, n, 4)) for _ in range(3))
    kpm = np.ones((1, n), bool)
    out, lse = sa.sparse_attention(q, k, v, p, key_padding_mask=kpm, path="blocked", return_lse=True)
    assert (out == 0).all() and (lse == -np.inf).all()


def test_blocks_cover_every_row_once_and_bound_the_dense_grid():
    """Scattered columns split a block until its (rows x union) grid is within _WASTE x its nonzeros."""
    n = 3000
    p = sa.random_pattern(n, n, 7, seed=3) | sa.sliding_window(n, 2)
    csr = p.csr
    indptr, indices = csr.indptr.astype(np.int64), csr.indices.astype(np.int64)
    rows = np.arange(n)
    seen = []
    for blk, union, mask in blocked._blocks(indptr, indices, rows):
        nnz = int(indptr[blk + 1].sum() - indptr[blk].sum())
        assert len(blk) <= 8 or len(blk) * len(union) <= blocked._WASTE * nnz
        # the mask is exactly the block's CSR entries
        np.testing.assert_array_equal(mask, csr[blk][:, union].toarray())
        assert np.array_equal(union, np.unique(csr[blk].indices))
        seen.append(blk)
    seen = np.sort(np.concatenate(seen))
    np.testing.assert_array_equal(seen, rows)


def test_numpy_blas_threads_are_restored(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from sparseattn.engine.threads import numpy_blas_single_thread

    libs = numpy_blas_single_thread.controllers()
    before = [c.get_num_threads() for c in libs]
    q, k, v = (rng.standard_normal((2, 300, 16)) for _ in range(3))
    with numpy_blas_single_thread():
        assert all(c.get_num_threads() == 1 for c in libs)
        sa.sparse_attention(q, k, v, sa.sliding_window(300, 9), path="blocked")  # re-enters the cap
        assert all(c.get_num_threads() == 1 for c in libs)
    assert [c.get_num_threads() for c in libs] == before
    assert threadpoolctl.threadpool_info()


@pytest.mark.parametrize("union", [True, False])
def test_numpy_merge_matches_numba_merge(union):
    """Patterns merge in NumPy while Numba's merge is not compiled yet: the same CSR as the Numba merge."""
    from sparseattn.kernels.csr_ops import merge_rows
    from sparseattn.patterns.base import _merge_small

    n = 4000
    a = (sa.random_pattern(n, n, 40, seed=1) | sa.sliding_window(n, 30)).csr
    b = (sa.random_pattern(n, n, 40, seed=2) | sa.sliding_window(n, 20)).csr
    a, b = ((m.indptr.astype(np.int64), m.indices.astype(np.int64)) for m in (a, b))
    assert len(a[1]) + len(b[1]) > 1 << 16  # the size where the Numba merge would run when compiled
    ptr, ind = _merge_small(a, b, n, union)
    ptr_nb, ind_nb = merge_rows(a, b, union)
    np.testing.assert_array_equal(ptr, ptr_nb)
    np.testing.assert_array_equal(ind, ind_nb)


def test_cold_start_mode_is_checked(monkeypatch):
    monkeypatch.setenv("SPARSEATTN_COLD_START", "later")
    with pytest.raises(ValueError, match="SPARSEATTN_COLD_START must be one of .*'later'"):
        _coldstart.mode()
    monkeypatch.setenv("SPARSEATTN_COLD_START", "wait")
    assert _coldstart.mode() == "wait" and _coldstart.fused_ready(np.float32)


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import sparseattn as sa
    from sparseattn.engine import coldstart as _coldstart
    from sparseattn.reference import dense_attention, dense_attention_backward

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    import threading
    from numba.core import event

    foreground = []  # kernels compiled in the calling thread (not the background compile)

    class Listener(event.Listener):
        def on_start(self, ev):
            pass

        def on_end(self, ev):
            if threading.current_thread() is threading.main_thread():
                foreground.append(getattr(ev.data["dispatcher"], "py_func", ev.data["dispatcher"]).__qualname__)

    event.register("numba:compile", Listener())

    rng = np.random.default_rng(0)
    n = 1500
    q, k, v, go = (rng.standard_normal((3, n, 32), dtype=np.float32) for _ in range(4))
    p = sa.longformer(n, 128, [0, 700])
    first, lse = sa.sparse_attention(q, k, v, p, return_lse=True)
    report = {"forward_compiling": sorted(key for key, (_, done, _) in _coldstart.status().items() if not done)}
    if sys.argv[1] == "forward-only":
        report["foreground_compiles"] = sorted(set(foreground))
        print(json.dumps(report))
        sys.exit(0)
    grads = sa.sparse_attention_backward(go, q, k, v, p, first, lse)
    report["compiling"] = sorted(key for key, (_, done, _) in _coldstart.status().items() if not done)
    ref = dense_attention(q, k, v, p)
    report["first_err"] = rel(first, ref)
    report["grad_err"] = max(rel(g, r) for g, r in zip(grads, dense_attention_backward(go, q, k, v, p)))
    if sys.argv[1] == "wait":
        _coldstart.wait()
        later = sa.sparse_attention(q, k, v, p)
        report["later_err"] = rel(later, ref)
        report["status"] = {k: [v[1], repr(v[2])] for k, v in _coldstart.status().items()}
    report["foreground_compiles"] = sorted(set(foreground))
    print(json.dumps(report))
    """
)


def _run(tmp_path, cache, how):
    env = {k: v for k, v in os.environ.items() if k != "SPARSEATTN_COLD_START"}  # the default: background
    env["NUMBA_CACHE_DIR"] = str(cache)
    script = tmp_path / "first_call.py"
    script.write_text(_SCRIPT)
    done = subprocess.run([sys.executable, str(script), how], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_cold_start_answers_on_the_blocked_path_and_fills_the_cache(tmp_path):
    """Fresh processes, empty Numba cache, default mode.

    1. The first forward and backward calls return (correct) while the fused
       kernels still compile in the background; the process exits without
       waiting itself, so the exit hook finishes the compiles (saying so on
       stderr).
    2. A second process with that cache finds the kernels there: its first
       calls run fused, with no background compile and nothing compiled in
       the caller's thread (the background compile ran the same signatures a
       user's call needs).
    """
    cache = tmp_path / "numba-cache"
    report, err = _run(tmp_path, cache, "exit")
    assert report["forward_compiling"] == ["forward float32"]  # the forward answered while it compiled
    assert "backward float32" in report["compiling"]  # and so did the backward
    assert report["first_err"] < 2e-5 and report["grad_err"] < 2e-4
    assert "finishing the background compilation" in err
    report, err = _run(tmp_path, cache, "wait")
    assert report["forward_compiling"] == report["compiling"] == []  # loaded from the cache, no thread started
    assert report["status"] == {}
    assert report["foreground_compiles"] == []
    assert report["first_err"] < 2e-5 and report["later_err"] < 2e-5 and report["grad_err"] < 2e-4
    assert "finishing" not in err


@pytest.mark.slow  # two more cold processes (40 s); the test above covers forward and backward together
def test_the_background_compile_leaves_nothing_for_the_next_process(tmp_path):
    """The forward's background compile runs a call like the user's: the next process compiles nothing itself."""
    cache = tmp_path / "numba-cache"
    report, err = _run(tmp_path, cache, "forward-only")
    assert report["forward_compiling"] == ["forward float32"] and "finishing" in err
    report, err = _run(tmp_path, cache, "forward-only")
    assert report["forward_compiling"] == [] and report["foreground_compiles"] == []

