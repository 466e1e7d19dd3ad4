"""sparseattn.report on a synthetic pytest-benchmark JSON built here.

Every number in the generated tables is checked against the same quantity
computed independently in the test (NumPy polyfit for the slopes, plain
divisions for GFLOP/s, growth and speed-ups).
"""

import json
import math

import numpy as np
import pytest

from sparseattn.cli import report as rp

NS = [1024, 2048, 4096, 8192]
HEADS, D, RADIUS = 12, 64, 256
GEMM_IN, GEMM_HW = 244.0, 465.0


def _nnz(n, radius):
    i = np.arange(n)
    return int((np.minimum(i + radius, n - 1) - np.maximum(i - radius, 0) + 1).sum())


def _flop(n, radius):
    return 4 * _nnz(n, radius) * D * HEADS


def _bench(group, method, median, rounds=5, **extra):
    name = f"test_x[{method}-" + "-".join(f"{k}{v}" for k, v in extra.items() if k in ("n", "radius")) + "]"
    return {
        "group": group,
        "name": name,
        "fullname": "benchmarks/test_x.py::" + name,
        "params": None,
        "stats": {"median": median, "min": median * 0.9, "max": median * 1.2, "mean": median, "rounds": rounds},
        "extra_info": dict(extra, method=method),
    }


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(7)
    times = {}
    benches = []
    g_n = "n-scaling r256"
    laws = {"sparseattn": (2e-3, 1.0), "sparseattn-staged": (5e-3, 1.05), "torch-flex": (6e-3, 1.1), "dense-numpy": (9e-3, 2.0)}
    for method, (c, p) in laws.items():
        for n in NS:
            if method == "dense-numpy" and n == 8192:
                continue  # a peer missing at one size: its speed-up cell must be blank
            t = c * (n / 1024) ** p * float(rng.uniform(0.95, 1.05))
            times[(method, n)] = t
            benches.append(
                _bench(g_n, method, t, n=n, radius=RADIUS, globals=1, dtype="float32", useful_flop=_flop(n, RADIUS), rss_peak_delta_bytes=n * 1024, tracemalloc_peak_bytes=n * 512, qkvo_bytes=n * 3000, out_bytes=n * 750)
            )
    g_r = "radius-scaling n8192"
    rtimes = {}
    for r in [32, 64, 128, 256]:
        t = 1e-3 * (r / 32) ** 0.9
        rtimes[r] = t
        benches.append(_bench(g_r, "sparseattn", t, n=8192, radius=r, globals=1, dtype="float32", useful_flop=_flop(8192, r)))
    benches.append({"group": "gemm", "name": "test_gemm_float32", "stats": {"median": 0.04, "rounds": 10}, "extra_info": {}})
    machine = {
        "sparseattn": {
            "cpu_model": "Test CPU",
            "cpu_count": 2,
            "fused_available": True,
            "gemm_float32_in_process": {"gemm_n": 2048, "gemm_gflops": GEMM_IN, "blas_architecture": "Haswell", "blas_internal_api": "openblas"},
            "gemm_float32_hardware_default": {"gemm_n": 2048, "gemm_gflops": GEMM_HW, "blas_architecture": "SkylakeX", "blas_internal_api": "openblas"},
        }
    }
    data = {"machine_info": machine, "commit_info": {"id": "abc123def456", "dirty": False}, "benchmarks": benches, "datetime": "2025-01-01T00:00:00", "version": "5.2.3"}
    return data, times, rtimes


def _write(tmp_path, data, name="BENCH.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _tables(md, group):
    """Parse the markdown tables of one group section into lists of {header: cell} dicts."""
    section = md.split(f"## {group}\n", 1)[1].split("\n## ", 1)[0]
    tables, current = [], None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                current = {"header": cells, "rows": []}
            elif not all(set(c) <= {"-"} for c in cells):
                current["rows"].append(dict(zip(current["header"], cells)))
        elif current is not None:
            tables.append(current)
            current = None
    if current is not None:
        tables.append(current)
    return tables


def _num(cell):
    return float(cell.rstrip("×").split(" ")[0])


def test_summary_numbers_match_independent_computation(synthetic):
    data, times, rtimes = synthetic
    s = rp.summarize(data)
    g = s["n-scaling r256"]
    assert g["vary"] == "n"
    assert g["ours"] == ["sparseattn", "sparseattn-staged"]
    assert sorted(g["peers"]) == ["dense-numpy", "torch-flex"]
    for r in g["rows"]:
        t = times[(r["method"], r["n"])]
        assert r["median"] == t
        assert math.isclose(r["gflops"], _flop(r["n"], RADIUS) / t / 1e9, rel_tol=1e-12)
        assert math.isclose(r["gemm_pct"], 100 * r["gflops"] / GEMM_HW, rel_tol=1e-12)  # the subprocess rate wins
        assert r["peak_bytes"] == r["n"] * 1024
        assert math.isclose(r["extra_ratio"], (1024 - 750) / 3000, rel_tol=1e-12)
        if r["n"] == 1024:
            assert r["growth"] is None
        else:
            assert math.isclose(r["growth"], t / times[(r["method"], r["n"] // 2)], rel_tol=1e-12)
            assert r["growth_x"] == 2
    for method in ("sparseattn", "torch-flex", "dense-numpy"):
        ns = [n for n in NS if (method, n) in times]
        want = np.polyfit(np.log(ns), np.log([times[(method, n)] for n in ns]), 1)[0]
        assert math.isclose(g["slopes_n"][(method, RADIUS, 1, "float32")], want, rel_tol=1e-9)
    for n in NS:
        sp = g["speedups"][("sparseattn", n, RADIUS, 1, "float32")]
        assert math.isclose(sp["torch-flex"], times[("torch-flex", n)] / times[("sparseattn", n)], rel_tol=1e-12)
        assert ("dense-numpy" in sp) == (n != 8192)
        assert math.isclose(sp["sparseattn-staged"], times[("sparseattn-staged", n)] / times[("sparseattn", n)], rel_tol=1e-12)
        assert "sparseattn" not in g["speedups"][("sparseattn-staged", n, RADIUS, 1, "float32")]
    r = s["radius-scaling n8192"]
    assert r["vary"] == "radius"
    want = np.polyfit(np.log(list(rtimes)), np.log(list(rtimes.values())), 1)[0]
    assert math.isclose(r["slopes_radius"][("sparseattn", 8192, 1, "float32")], want, rel_tol=1e-9)
    assert math.isclose(want, 0.9, rel_tol=1e-9)


def test_markdown_tables(synthetic, tmp_path):
    data, times, _ = synthetic
    path = _write(tmp_path, data)
    before = path.read_bytes()
    res = rp.report(path, out_dir=tmp_path / "out", plots=False)
    assert path.read_bytes() == before
    md = (tmp_path / "out" / "BENCH.md").read_text()
    assert res["markdown"] == str(tmp_path / "out" / "BENCH.md")
    assert "465.0 GFLOP/s" in md and "SkylakeX" in md and "244.0 GFLOP/s" in md and "Haswell" in md
    main, speed = _tables(md, "n-scaling r256")
    seen = set()
    for row in main["rows"]:
        method, n = row["method"], int(row["n"])
        t = times[(method, n)]
        seen.add((method, n))
        assert math.isclose(_num(row["median ms"]), t * 1e3, rel_tol=6e-3)
        assert math.isclose(_num(row["GFLOP/s"]), _flop(n, RADIUS) / t / 1e9, rel_tol=6e-3)
        assert math.isclose(_num(row["% GEMM"]), 100 * _flop(n, RADIUS) / t / 1e9 / GEMM_HW, rel_tol=6e-2)
        assert math.isclose(_num(row["peak MiB"]), n * 1024 / 2**20, rel_tol=6e-2)
        assert math.isclose(_num(row["extra / qkvo"]), (1024 - 750) / 3000, rel_tol=1e-2)
        if n > 1024:
            assert math.isclose(_num(row["growth"]), t / times[(method, n // 2)], rel_tol=6e-3)
            assert "n ×2" in row["growth"]
    assert seen == set(times)
    # ours first, the primary method on top
    assert main["rows"][0]["method"] == "sparseattn"
    assert speed["header"][:5] == ["method", "n", "radius", "globals", "dtype"]
    for row in speed["rows"]:
        ours, n = row["method"], int(row["n"])
        for peer in ("torch-flex", "dense-numpy"):
            cell = row[f"× vs {peer}"]
            if (peer, n) in times:
                assert math.isclose(_num(cell), times[(peer, n)] / times[(ours, n)], rel_tol=6e-3)
            else:
                assert cell == "—"
        staged = row["× vs sparseattn-staged"]
        if ours == "sparseattn":
            assert math.isclose(_num(staged), times[("sparseattn-staged", n)] / times[("sparseattn", n)], rel_tol=6e-3)
        else:
            assert staged == "—"
    # the fitted slope of each method is printed
    want = np.polyfit(np.log(NS), np.log([times[("sparseattn", n)] for n in NS]), 1)[0]
    assert f"- sparseattn (radius=256, globals=1, dtype=float32): **{want:.2f}**" in md
    # a benchmark without extra_info is still listed
    (gemm,) = _tables(md, "gemm")
    assert gemm["rows"][0]["method"] == "test_gemm_float32" and gemm["rows"][0]["median ms"] == "40.0"


def test_plots_written(synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    data, _, _ = synthetic
    path = _write(tmp_path, data, "run1.json")
    res = rp.report(path, out_dir=tmp_path, plots=True)
    names = sorted(p.split("/")[-1] for p in res["plots"])
    assert names == [
        "run1-n-scaling-r256-speedup.png",
        "run1-n-scaling-r256-time_vs_n.png",
        "run1-radius-scaling-n8192-time_vs_radius.png",
    ]
    for p in res["plots"]:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "run1.md").read_text()
    for name in names:
        assert f"]({name})" in md


def test_main_cli(synthetic, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data, _, _ = synthetic
    path = _write(tmp_path, data)
    out = tmp_path / "docs"
    assert rp.main([str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'BENCH.md'}" in printed
    assert (out / "BENCH.md").exists() and len(list(out.glob("BENCH-*.png"))) == 3
    with pytest.raises(SystemExit) as exc:
        rp.main(["--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        rp.main([str(tmp_path / "missing.json")])
    assert exc.value.code == 2
    assert "missing.json" in capsys.readouterr().err


def test_fit_slope():
    assert math.isclose(rp.fit_slope([1, 2, 4, 8], [3.0, 6.0, 12.0, 24.0]), 1.0)
    assert math.isclose(rp.fit_slope([10, 100], [1.0, 100.0]), 2.0)
    assert rp.fit_slope([5], [1.0]) is None
    assert rp.fit_slope([5, 5], [1.0, 2.0]) is None


def test_bad_input(tmp_path):
    with pytest.raises(TypeError, match="json_path"):
        rp.report(123)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        rp.report(bad, out_dir=tmp_path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="'benchmarks' list.*results"):
        rp.report(other, out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        rp.load(tmp_path / "nope.json")


def test_extra_memory_ratio_blank_when_probe_missed_the_output():
    data = {
        "benchmarks": [
            _bench("g", "torch-x", 0.1, n=1024, rss_peak_delta_bytes=0, tracemalloc_peak_bytes=10, qkvo_bytes=4000, out_bytes=1000),
            _bench("g", "sparseattn", 0.1, n=2048, rss_peak_delta_bytes=1600, qkvo_bytes=4000, out_bytes=1000),
        ]
    }
    rows = {r["method"]: r for r in rp.summarize(data)["g"]["rows"]}
    assert rows["torch-x"]["extra_ratio"] is None
    assert math.isclose(rows["sparseattn"]["extra_ratio"], 600 / 4000)


def test_gemm_reference_prefers_subprocess_and_best_of_start_end():
    def g(x, arch):
        return {"gemm_gflops": x, "blas_architecture": arch}

    mi = {"sparseattn": {"gemm_float32_in_process": g(300.0, "A"), "gemm_float32_hardware_default": g(100.0, "B"), "gemm_float32_hardware_default_end": g(150.0, "C")}}
    rate, label = rp.gemm_reference({"machine_info": mi})
    assert rate == 150.0 and "C" in label and "subprocess" in label
    mi = {"sparseattn": {"gemm_float32_in_process": g(300.0, "A"), "gemm_float32_in_process_end": g(200.0, "D")}}
    assert rp.gemm_reference({"machine_info": mi})[0] == 300.0
    assert rp.gemm_reference({"machine_info": {}}) == (None, None)


def test_paired_comparisons_table(synthetic, tmp_path):
    """Alternating-pair benchmarks get their own table (ratio of medians, per-pair range) and stay out of the groups."""
    data, _, _ = synthetic
    ta = [0.10, 0.12, 0.11, 0.30, 0.105]
    tb = [1.30, 1.25, 1.40, 1.20, 1.33]
    paired = {
        "label": "H1, peer / sparseattn", "a": "sparseattn n=8192", "b": "hf-longformer n=8192", "target": ">= 10",
        "times_a": ta, "times_b": tb, "median_a": float(np.median(ta)), "median_b": float(np.median(tb)),
        "ratio": float(np.median(tb) / np.median(ta)), "pair_ratio_min": min(b / a for a, b in zip(ta, tb)),
        "pair_ratio_max": max(b / a for a, b in zip(ta, tb)), "rounds": 5,
    }  # fmt: skip
    data["benchmarks"].append(
        {"group": "paired: H1", "name": "test_paired_speedup[hf]", "stats": {"median": 1.4, "rounds": 5},
         "extra_info": {"paired": paired, "loadavg_1min": 1.25}}
    )  # fmt: skip
    rows = rp.paired_rows(data)
    assert len(rows) == 1 and rows[0]["ratio"] == pytest.approx(1.30 / 0.11)
    assert "paired: H1" not in rp.summarize(data)
    res = rp.report(_write(tmp_path, data), out_dir=tmp_path / "out", plots=False)
    md = open(res["markdown"]).read()
    (table,) = _tables(md, "Paired comparisons (alternating calls)")
    (row,) = table["rows"]
    assert row["A"] == "sparseattn n=8192" and row["B"] == "hf-longformer n=8192"
    assert row["target"] == ">= 10: met"  # 1.30 / 0.11 = 11.8
    assert _num(row["median A ms"]) == pytest.approx(110.0, rel=1e-3)
    assert _num(row["median B ms"]) == pytest.approx(1300.0, rel=1e-3)
    assert _num(row["ratio B / A"]) == pytest.approx(1.30 / 0.11, rel=6e-3)
    lo, hi = (float(x) for x in row["per-pair range"].split("–"))
    assert lo == pytest.approx(1.20 / 0.30, rel=6e-3) and hi == pytest.approx(1.30 / 0.10, rel=6e-3)
    assert row["pairs"] == "5" and _num(row["load"]) == pytest.approx(1.25, abs=0.051)  # 2 significant digits


@pytest.mark.parametrize(
    "target, value, verdict",
    [(">= 10", 4.06, "missed"), (">= 10", 10.0, "met"), ("<= 8.8", 3.33, "met"), ("<= 2.5", 2.51, "missed"),
     ("> 1", 1.0, "missed"), ("< 1", 0.5, "met"), ("≥ 1.5", 1.74, "met"), ("fast", 3.0, None), (None, 3.0, None), (">= 2", None, None)],
)  # fmt: skip
def test_target_verdict(target, value, verdict):
    assert rp.target_verdict(target, value) == verdict


def test_missed_target_is_flagged_in_table_and_output(synthetic, tmp_path, capsys):
    data, _, _ = synthetic
    paired = {"label": "peer / ours", "a": "A", "b": "B", "target": ">= 10", "median_a": 1.0, "median_b": 4.0,
              "ratio": 4.0, "pair_ratio_min": 3.9, "pair_ratio_max": 4.1, "rounds": 3}  # fmt: skip
    data["benchmarks"].append({"group": "p", "name": "t", "stats": {"median": 4.0}, "extra_info": {"paired": paired}})
    path = _write(tmp_path, data)
    assert rp.main([str(path), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert "target missed: peer / ours" in capsys.readouterr().out
    (table,) = _tables((tmp_path / "o" / "BENCH.md").read_text(), "Paired comparisons (alternating calls)")
    assert table["rows"][0]["target"] == ">= 10: **missed**"


def test_absolute_targets_table_and_output(synthetic, tmp_path, capsys):
    """``extra_info["targets"]`` entries get a Targets table with their verdicts; a missed one is printed."""
    data, _, _ = synthetic
    targets = [{"label": "first call", "value": 0.61, "unit": "s", "target": "<= 6"},
               {"label": "peak per worker", "value": 9.5, "unit": "chunks", "target": "<= 8"}]  # fmt: skip
    data["benchmarks"].append({"group": "cold", "name": "t", "stats": {"median": 30.0},
                               "extra_info": {"targets": targets, "loadavg_1min": 0.5}})  # fmt: skip
    rows = rp.target_rows(data)
    assert [r["verdict"] for r in rows] == ["met", "missed"]
    path = _write(tmp_path, data)
    assert rp.main([str(path), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "target missed: peak per worker" in out and "target missed: first call" not in out
    (table,) = _tables((tmp_path / "o" / "BENCH.md").read_text(), "Targets")
    assert [r["target"] for r in table["rows"]] == ["<= 6: met", "<= 8: **missed**"]
    assert table["rows"][0]["value"] == "0.61 s" and table["rows"][1]["measure"] == "peak per worker"


@pytest.mark.parametrize(
    "info, ok, words",
    [
        (None, False, "commit unknown"),
        ({"id": "ab" * 20, "dirty": True}, False, "dirty tree"),
        ({"id": "ab" * 20, "dirty": False}, True, "clean tree"),
    ],
)
def test_provenance_marked_in_report(synthetic, tmp_path, info, ok, words):
    data, _, _ = synthetic
    data.pop("commit_info", None)
    if info is not None:
        data["commit_info"] = info
    res = rp.report(_write(tmp_path, data), out_dir=tmp_path / "o", plots=False)
    md = open(res["markdown"]).read()
    head = md.split("## ")[0]
    assert res["reproducible"] is ok and words in res["provenance"]
    assert words in head
    assert ("Provenance warning" in head) is (not ok)


def _git(cwd, *args):
    import subprocess

    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout


def test_default_output_is_a_new_folder_and_changes_no_tracked_file(synthetic, tmp_path, monkeypatch):
    import shutil

    if shutil.which("git") is None:
        pytest.skip("needs git")
    data, _, _ = synthetic
    repo = tmp_path / "repo"
    (repo / "docs" / "benchmarks").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    bench = repo / "docs" / "benchmarks" / "BENCH.json"
    committed_md = repo / "docs" / "benchmarks" / "BENCH.md"
    committed_md.write_text("committed report\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "docs")
    head = _git(repo, "rev-parse", "HEAD").strip()
    data["commit_info"] = {"id": head, "dirty": False}
    bench.write_text(json.dumps(data))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "json")
    monkeypatch.chdir(repo)
    assert rp.main([str(bench), "--no-plots"]) == 0
    assert rp.main([str(bench), "--no-plots"]) == 0  # a second run: another new folder, nothing overwritten
    assert _git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert committed_md.read_text() == "committed report\n"
    made = sorted(p for p in repo.iterdir() if p.name.startswith("sparseattn-report-"))
    assert len(made) == 2 and all((p / "BENCH.md").exists() for p in made)
    # a commit in the history and a clean tree: no warning
    assert "Provenance warning" not in (made[0] / "BENCH.md").read_text()
    # a commit that is not in this repository's history is marked
    data["commit_info"] = {"id": "0" * 40, "dirty": False}
    bench.write_text(json.dumps(data))
    res = rp.report(bench, out_dir=tmp_path / "o", plots=False)
    assert not res["reproducible"] and "not in this repository's history" in res["provenance"]


@pytest.mark.parametrize(
    "mi, text",
    [
        ({"cpu": {"flags": ["avx", "avx2", "avx512f"]}}, "CPU features: AVX-512"),
        ({"cpu": {"flags": ["avx", "avx2", "fma"]}}, "CPU features: AVX2"),
        ({"sparseattn": {"cpu_features": {"cpu_name": "znver4", "avx2": True, "avx512f": True}, "kernel_vector_bits": 256}},
         "CPU features: AVX-512 (znver4), micro-kernels 256-bit vectors"),
        ({}, None),
    ],
)  # fmt: skip
def test_cpu_features_line(mi, text, synthetic, tmp_path):
    """The report says which vector extensions the machine had (and the kernels' vector width when recorded)."""
    assert rp._cpu_features(mi) == text
    data, _, _ = synthetic
    data["machine_info"] = {**data.get("machine_info", {}), **mi}
    md = open(rp.report(_write(tmp_path, data), out_dir=tmp_path / "o", plots=False)["markdown"]).read()
    assert (text in md) if text else ("CPU features" not in md)
