"""The memory guard refuses calls that cannot fit, before allocating anything."""

import os
import tracemalloc

import numpy as np
import pytest

import sparseattn as sa
from sparseattn import _memory
from sparseattn._memory import InsufficientMemoryError
from sparseattn.reference import dense_attention


def test_available_bytes_is_plausible():
    avail = _memory.available_bytes()
    assert avail is not None and avail > 0
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert avail <= total


def _refused_without_allocating(call):
    tracemalloc.start()
    try:
        with pytest.raises(InsufficientMemoryError) as info:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"allocated {peak} bytes before refusing"
    assert isinstance(info.value, MemoryError)
    return str(info.value)


def test_broadcast_q_of_50m_rows_is_refused_before_the_copy(monkeypatch):
    # the case: q of shape (1, 1, 50M, 64) from np.broadcast_to, on a machine with 8 GiB available
    monkeypatch.setattr(_memory, "available_bytes", lambda: 8 << 30)
    n = 50_000_000
    row = np.ones((1, 64), np.float32)
    q = np.broadcast_to(row, (1, 1, n, 64))
    k = v = np.broadcast_to(row, (1, 1, n, 64))
    msg = _refused_without_allocating(lambda: sa.sparse_attention(q, k, v, sa.sliding_window(n, 2)))
    assert msg.startswith("sparse_attention would need about 47.9 GiB")
    assert "q made contiguous (it has zero strides: broadcast): 11.9 GiB" in msg
    assert "only 8.0 GiB is available" in msg
    assert "fewer batch entries or heads" in msg and "Dask" in msg


def test_a_call_larger_than_any_machine_is_refused_with_the_real_reading():
    n = 1 << 36  # 16 TiB per input
    q = np.broadcast_to(np.ones((1, 64), np.float32), (n, 64))
    msg = _refused_without_allocating(lambda: sa.sparse_attention(q, q, q, sa.sliding_window(n, 1)))
    assert "TiB" not in msg and "GiB" in msg  # sizes in GiB: 16384.0 GiB per copy
    assert "k made contiguous (it has zero strides: broadcast): 16384.0 GiB" in msg


def test_broadcast_inputs_are_stored_once_and_casts_are_counted(monkeypatch):
    monkeypatch.setattr(_memory, "available_bytes", lambda: 1 << 20)
    q = np.zeros((64, 1, 2048, 64), np.float64)  # shared by the heads: used in place, not repeated
    k = np.zeros((1, 16, 2048, 64), np.float32)  # shared by the batch: cast once (16 MiB), not repeated
    v = np.zeros((64, 16, 2048, 64), np.float64)  # used in place
    msg = _refused_without_allocating(lambda: sa.sparse_attention(q, k, v, sa.sliding_window(2048, 4)))
    assert "k cast to float64: 16.0 MiB" in msg
    assert "about 1.0 GiB (output: 1.0 GiB" in msg and "repeated" not in msg


def test_fused_path_does_not_repeat_a_broadcast_input(rng):
    # k and v shared by 16 heads (multi-query attention): the fused path reads the one stored copy
    n, d, h = 2048, 64, 16
    q = rng.standard_normal((h, n, d), dtype=np.float32)
    k, v = rng.standard_normal((2, 1, n, d), dtype=np.float32)
    p = sa.longformer(n, 64, [0, 1000])
    sa.sparse_attention(q, k, v, p, path="fused")  # load the kernels and plan outside the measurement
    tracemalloc.start()
    try:
        out = sa.sparse_attention(q, k, v, p, path="fused")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    repeated = 2 * h * n * d * 4  # what repeating k and v per head would cost: 16 MiB
    assert peak < out.nbytes + repeated // 2, (peak, out.nbytes)
    ref = dense_attention(q, k, v, p, rows=(990, 1030))
    np.testing.assert_allclose(out[:, 990:1030], ref, rtol=2e-5, atol=2e-5)
    staged = sa.sparse_attention(q, k, v, p, path="staged")  # repeats them (one score per nonzero anyway)
    np.testing.assert_allclose(out, staged, rtol=2e-5, atol=2e-5)


def test_staged_scores_are_refused_and_fused_runs(monkeypatch, rng):
    n, S = 4096, 32
    p = sa.sliding_window(n, 256)  # nnz ~ 2.1 M, x 32 slices x 4 bytes ~ 266 MB of scores
    q, k, v = rng.standard_normal((3, S, n, 8), dtype=np.float32)
    monkeypatch.setattr(_memory, "available_bytes", lambda: 128 << 20)
    msg = _refused_without_allocating(lambda: sa.sparse_attention(q, k, v, p, path="staged"))
    assert f"per-nonzero scores of the staged path (path='staged' or non-finite inputs): {p.nnz * S} values" in msg
    msg = _refused_without_allocating(lambda: sa.sparse_attention(q, k, v, p, return_weights=True))
    assert "(return_weights=True)" in msg
    out = sa.sparse_attention(q, k, v, p, path="fused")  # O(n d) extra: fits
    ref = dense_attention(q[:1], k[:1], v[:1], p, rows=(0, 64))
    np.testing.assert_allclose(out[0, :64], ref[0], rtol=2e-5, atol=2e-5)


def test_dense_reference_is_refused_and_points_to_rows():
    n = 1 << 21  # a dense (n, n) mask: 4 TiB
    q = np.zeros((n, 4), np.float32)
    msg = _refused_without_allocating(lambda: dense_attention(q, q, q, sa.sliding_window(n, 1)))
    assert msg.startswith("dense_attention would need") and "rows=(start, stop)" in msg
    out = dense_attention(q, q, q, sa.sliding_window(n, 1), rows=(5, 9))  # a row slice fits
    assert out.shape == (4, 4)
