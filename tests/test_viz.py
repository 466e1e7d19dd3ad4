"""density_grid against brute-force block sums; the plots write readable images."""

import numpy as np
import pytest

import sparseattn as sa
from sparseattn.patterns.presets import bigbird, block_sparse, fixed, strided
from sparseattn.viz import density_grid, plot_pattern, plot_receptive_field

pytest.importorskip("matplotlib")


def brute_counts(dense, bq, bk):
    """Pixel p holds tokens t with t * bins // n == p: sum the dense mask over those blocks."""
    n_q, n_k = dense.shape
    out = np.zeros((bq, bk), dtype=np.int64)
    for i in range(n_q):
        for j in np.flatnonzero(dense[i]):
            out[i * bq // n_q, j * bk // n_k] += 1
    rows = np.bincount(np.arange(n_q) * bq // n_q, minlength=bq)
    cols = np.bincount(np.arange(n_k) * bk // n_k, minlength=bk)
    return out, out / np.outer(rows, cols)


def cases():
    rng = np.random.default_rng(7)
    return [
        ("band+globals", sa.sliding_window(37, 3) | sa.global_tokens(37, [0, 1, 2, 20, 36])),
        ("rect band", sa.sliding_window(50, 4, n_k=70)),
        ("dilated", sa.sliding_window(40, 9, dilation=3)),
        ("bigbird", bigbird(64, 4, 2, seed=1)),
        ("fixed", fixed(45, 6, 2, causal=False)),
        ("fixed causal", fixed(45, 6, 2)),
        ("strided", strided(30, 4)),
        ("block", block_sparse(rng.random((5, 7)) < 0.5, (3, 2))),
        ("no globals", sa.global_tokens(20, [])),
        ("random", sa.random_pattern(30, 40, 5, seed=3)),
        ("intersection", sa.sliding_window(40, 6) & sa.random_pattern(40, 40, 12, seed=1)),
    ]


@pytest.mark.parametrize("name,p", cases(), ids=[c[0] for c in cases()])
@pytest.mark.parametrize("bins", [1, 7, (9, 4), (64, 3), 200])
def test_density_grid_matches_brute_force(name, p, bins):
    dense = p.to_dense()
    n_q, n_k = dense.shape
    bq, bk = bins if isinstance(bins, tuple) else (bins, bins)
    bq, bk = min(bq, n_q), min(bk, n_k)
    expect_counts, expect_density = brute_counts(dense, bq, bk)
    density, counts, re, ce = density_grid(p, bins, return_counts=True)
    np.testing.assert_array_equal(counts, expect_counts)
    np.testing.assert_allclose(density, expect_density, rtol=1e-12)
    assert counts.sum() == p.nnz
    assert re[0] == 0 and re[-1] == n_q and ce[-1] == n_k
    # the streamed-CSR path (a scipy copy has no interval form) gives the same numbers
    np.testing.assert_array_equal(density_grid(p.csr, bins, return_counts=True)[1], expect_counts)


def test_density_grid_chunked_streaming(monkeypatch):
    import sparseattn.viz as viz

    p = sa.from_dense(np.random.default_rng(0).random((300, 300)) < 0.05)
    expect = density_grid(p, 16, return_counts=True)[1]
    monkeypatch.setattr(viz, "_CHUNK_NNZ", 40)  # many small row chunks
    np.testing.assert_array_equal(density_grid(p, 16, return_counts=True)[1], expect)


def test_density_grid_million_token_band_is_exact():
    n, r = 1 << 20, 8
    p = sa.sliding_window(n, r) | sa.global_tokens(n, [0])
    density, counts, re, ce = density_grid(p, 1024, return_counts=True)
    # global row 0 and column 0 add everything outside the band's first r + 1 entries
    assert counts.sum() == p.nnz == sa.sliding_window(n, r).nnz + 2 * (n - r - 1)
    # a middle diagonal pixel (1024 x 1024 tokens) holds the band's full width on most rows
    i = 500
    band_in_pixel = sum(min(t + r, ce[i + 1] - 1) - max(t - r, ce[i]) + 1 for t in range(re[i], re[i + 1]))
    assert counts[i, i] == band_in_pixel
    assert counts[0, 5] == 1024  # global row 0 crosses every pixel column
    assert counts[5, 0] == 1024  # global column 0 crosses every pixel row
    assert counts[5, 9] == 0


def test_plot_pattern_writes_image(tmp_path):
    import matplotlib.image as mpimg

    path = tmp_path / "p.png"
    p = sa.sliding_window(2000, 30) | sa.global_tokens(2000, [0, 1999])
    d = plot_pattern(p, path, max_pixels=100)
    assert d.shape == (100, 100) and np.allclose(d, density_grid(p, 100))
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not a blank canvas
    plot_pattern(sa.sliding_window(5, 1), str(tmp_path / "tiny.svg"), title="tiny")
    assert (tmp_path / "tiny.svg").read_text().lstrip().startswith("<?xml")


def test_plot_receptive_field(tmp_path):
    p = sa.sliding_window(200, 10) | sa.global_tokens(200, [100])
    sizes = plot_receptive_field(p, 3, tmp_path / "rf.png")
    from sparseattn.analysis import coverage_by_layer

    np.testing.assert_array_equal(sizes, coverage_by_layer(p, 3))
    assert np.all(sizes[1] == 200)
    sub = plot_receptive_field(sa.sliding_window(5000, 50), 4, tmp_path / "rf2.png", max_pixels=64, max_tokens=9)
    assert sub.shape == (4, 9)
    ends = np.linspace(0, 4999, 9).round().astype(int)
    np.testing.assert_array_equal(sub[-1], np.minimum(ends + 200, 4999) - np.maximum(ends - 200, 0) + 1)
    assert (tmp_path / "rf2.png").stat().st_size > 0


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda t: density_grid(sa.causal(4), 0), ValueError, r"bins must be >= 1"),
        (lambda t: density_grid(sa.causal(4), (2, 2, 2)), ValueError, r"bins must be an int or a pair"),
        (lambda t: density_grid(sa.causal(4), 2.5), TypeError, r"bins must hold integers"),
        (lambda t: density_grid(sa.causal(0), 2), ValueError, r"non-empty pattern, got shape \(0, 0\)"),
        (lambda t: plot_pattern(sa.causal(4), 3), TypeError, r"path must be a file path"),
        (lambda t: plot_pattern(sa.causal(4), t / "x.png", max_pixels=0), ValueError, r"max_pixels must be a positive"),
        (lambda t: plot_receptive_field(sa.causal(4), 0, t / "x.png"), ValueError, r"layers >= 1, got 0"),
        (lambda t: plot_receptive_field(sa.random_pattern(3, 4, 1), 1, t / "x.png"), ValueError, r"must be square"),
    ],
)
def test_bad_input(tmp_path, call, exc, match):
    with pytest.raises(exc, match=match):
        call(tmp_path)


def test_viz_import_is_light():
    import subprocess
    import sys

    code = "import sys, sparseattn.viz, sparseattn.analysis; print('matplotlib' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
