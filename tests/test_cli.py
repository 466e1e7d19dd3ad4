"""The ``sparseattn`` command line, checked against brute-force constructions."""

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from helpers import SEED_GLOBAL, SEED_LOCAL

import sparseattn
from sparseattn import patterns
from sparseattn.cli import CLIError, build_pattern, main
from sparseattn.patterns import registry



def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def grid_of(out):
    """The text grid printed by ``show``: from the header line ``    T1 ...`` to the end."""
    lines = out.rstrip("\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("T1 ") and line.startswith(" "))
    return "\n".join(lines[start:])


def brute_grid(mask):
    """Render a dense boolean mask in the seed style, independently of Pattern.to_string."""
    n_q, n_k = mask.shape
    cols = [f"T{j + 1}" for j in range(n_k)]
    rows = [f"T{i + 1}" for i in range(n_q)]
    cw = max(len(c) for c in cols) + 1
    rw = max(len(r) for r in rows) + 2
    lines = [(" " * rw + "".join(c.ljust(cw) for c in cols)).rstrip()]
    for i in range(n_q):
        lines.append((rows[i].ljust(rw) + "".join(("*" if mask[i, j] else "").ljust(cw) for j in range(n_k))).rstrip())
    return "\n".join(lines)


def brute_qa(n, radius, question):
    i, j = np.indices((n, n))
    return (np.abs(i - j) <= radius) | (i < question) | (j < question)


# ------------------------------------------------------------------------------------------
# show: the seed's grids
# ------------------------------------------------------------------------------------------


def test_show_prints_seed_first_grid(capsys):
    code, out, err = run(capsys, "show", "sliding_window", "--n", "5", "--radius", "1")
    assert code == 0 and err == ""
    assert grid_of(out) == SEED_LOCAL
    assert "nnz 13" in out


def test_show_global_prints_seed_second_grid(capsys):
    code, out, err = run(capsys, "show", "sliding_window", "--n", "5", "--radius", "1", "--global", "0")
    assert code == 0 and err == ""
    assert grid_of(out) == SEED_GLOBAL
    assert "nnz 19" in out


def test_show_global_options_accumulate(capsys):
    code, out, err = run(capsys, "show", "sliding_window", "--n", "6", "--radius", "0", "--global", "0", "--global", "2,5")
    assert code == 0, err
    i, j = np.indices((6, 6))
    mask = (i == j) | np.isin(i, [0, 2, 5]) | np.isin(j, [0, 2, 5])
    assert grid_of(out) == brute_grid(mask)


def test_show_longformer_hf_convention_is_the_same_grid(capsys):
    code, out, _ = run(capsys, "show", "longformer", "--n", "5", "--attention-window", "2", "--global-indices", "0")
    assert code == 0
    assert grid_of(out) == SEED_GLOBAL


def test_show_subprocess_python_m():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "sparseattn", "show", "sliding_window", "--n", "5", "--radius", "1", "--global", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert grid_of(proc.stdout) == SEED_GLOBAL
    assert proc.stderr == ""


def test_subprocess_error_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "sparseattn", "show", "no_such_builder", "--n", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    # the builders a fresh process knows (this session may have imported more modules)
    fresh = subprocess.run(
        [sys.executable, "-c", "import sparseattn.patterns as p; print(' '.join(p.available()))"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    assert "sliding_window" in fresh
    for name in fresh:
        assert name in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "sliding_window", "--n", "7", "--left", "2", "--right", "0"],
        ["show", "sliding_window", "--n", "9", "--radius", "3", "--dilation", "2"],
        ["show", "global_tokens", "--n", "6", "--indices", "0", "4"],
        ["show", "global_tokens", "--n", "6", "--indices", "0,4"],
        ["show", "random_pattern", "--n_q", "4", "--n_k", "7", "--per_row", "3", "--seed", "5"],
        ["show", "random_pattern", "--n-q", "4", "--n-k", "7", "--per-row", "3", "--seed", "5"],
    ],
)
def test_show_grid_matches_brute_force(capsys, argv):
    name = argv[1]
    if name == "sliding_window":
        kw = dict(zip(argv[2::2], argv[3::2]))
        n, left, right = int(kw["--n"]), int(kw.get("--left", kw.get("--radius"))), int(kw.get("--right", kw.get("--radius")))
        dil = int(kw.get("--dilation", 1))
        i, j = np.indices((n, n))
        mask = (j - i >= -left) & (j - i <= right) & ((j - i) % dil == 0)
    elif name == "global_tokens":
        i, j = np.indices((6, 6))
        mask = np.isin(i, [0, 4]) | np.isin(j, [0, 4])
    else:
        # the same seeded generator the builder documents; compare with a direct call
        mask = sparseattn.random_pattern(4, 7, 3, seed=5).to_dense()
        assert mask.sum() == 12 and (mask.sum(axis=1) == 3).all()
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert grid_of(out) == brute_grid(mask)
    assert f"nnz {int(mask.sum())}" in out


def _words(kwargs, tmp_path):
    words = []
    for key, value in kwargs.items():
        words.append(f"--{key}")
        if isinstance(value, np.ndarray):
            path = tmp_path / f"{key}.npy"
            np.save(path, value)
            words.append(str(path))
        elif isinstance(value, (list, tuple, range)):
            if len(value) == 0:
                words.append("")  # an empty list
                continue
            if any(isinstance(v, (list, tuple, np.ndarray)) for v in value):
                words.append(repr([np.asarray(v).tolist() for v in value]))  # nested: one literal
            else:
                words.extend(str(v) for v in value)
        else:
            words.append(str(value))
    return words


@pytest.mark.parametrize("name", patterns.available())
def test_every_registered_builder_is_reachable_from_the_cli(name, tmp_path):
    """Parameters parsed from the signature rebuild the same pattern as a direct call."""
    fn = patterns.get(name)
    cases = registry.examples(name)
    assert cases, f"{name} registers no examples"
    # a Python callable (from_predicate's fn) has no command-line spelling: such examples are checked by
    # test_a_callable_parameter_is_a_clear_error instead
    cases = [kw for kw in cases if not any(callable(v) for v in kw.values())] or pytest.skip(f"{name} takes a callable")
    for kwargs in cases:
        words = _words(kwargs, tmp_path)
        expected = fn(**kwargs)
        try:
            got, text = build_pattern(name, words)
        except Exception as exc:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"{name} {' '.join(words)} failed: {exc}")
        if isinstance(expected, (list, tuple)):
            assert isinstance(got, tuple) and len(got) == len(expected)
            assert all(g == sparseattn.patterns.as_pattern(e) for g, e in zip(got, expected)), " ".join(words)
        else:
            assert got == sparseattn.patterns.as_pattern(expected), f"{name} {' '.join(words)}"
        assert text.startswith(f"{name}(")


def test_a_callable_parameter_is_a_clear_error(capsys):
    code, out, err = run(capsys, "show", "from_predicate", "--fn", "j <= i", "--n-q", "3", "--n-k", "3")
    assert code != 0 and out == ""
    assert "fn must be a callable" in err and "'j <= i'" in err


# ------------------------------------------------------------------------------------------
# third-party builders: annotations and defaults drive the conversion
# ------------------------------------------------------------------------------------------


def _diagonal_blocks(n: int, sizes: list[int] = (2,), causal: bool = False, jitter: float = 0.0):
    """Diagonal blocks of the given sizes, repeated; optional causal masking within blocks."""
    assert isinstance(n, int) and all(isinstance(s, int) for s in sizes)
    assert isinstance(causal, bool) and isinstance(jitter, float)
    mask = np.zeros((n, n), dtype=bool)
    pos, k = 0, 0
    while pos < n:
        s = sizes[k % len(sizes)]
        mask[pos : pos + s, pos : pos + s] = True
        pos, k = pos + s, k + 1
    if causal:
        mask &= np.tril(np.ones((n, n), dtype=bool))
    return sparseattn.from_dense(mask)


_PER_AXIS_CALLS = []


def _per_axis(shape, size=1, *, flags=False):
    """A builder whose options take one value or one per axis.

    Parameters
    ----------
    shape : int or tuple of int
        The grid.
    size : int or tuple of int
        One size, or one per axis.
    flags : bool or tuple of bool
        One flag, or one per axis.
    """
    _PER_AXIS_CALLS.append((shape, size, flags))
    return sparseattn.sliding_window(4, 1)


@pytest.mark.parametrize(
    "words,expected",
    [
        (["--shape", "4", "5", "--size", "2", "--flags", "true", "false"], ([4, 5], 2, (True, False))),
        (["--shape", "4", "--size", "1,2", "--flags"], (4, [1, 2], True)),
        (["--shape", "(4, 5)", "--flags", "false"], ((4, 5), 1, False)),
        (["--shape", "4"], (4, 1, False)),
    ],
)
def test_per_axis_options_take_one_value_or_one_per_axis(monkeypatch, words, expected):
    # numpydoc "int or tuple of int" / "bool or tuple of bool": the default's type does not restrict the option
    monkeypatch.setitem(registry._BUILDERS, "per_axis", _per_axis)
    monkeypatch.setitem(registry._EXAMPLES, "per_axis", [])
    _PER_AXIS_CALLS.clear()
    build_pattern("per_axis", words)
    assert _PER_AXIS_CALLS == [expected]
    with pytest.raises(CLIError, match="--flags expects true or false, got 'maybe'"):
        build_pattern("per_axis", ["--shape", "4", "--flags", "maybe"])


@pytest.fixture
def third_party(monkeypatch):
    monkeypatch.setitem(registry._BUILDERS, "diagonal_blocks", _diagonal_blocks)
    monkeypatch.setitem(registry._EXAMPLES, "diagonal_blocks", [])
    return "diagonal_blocks"


def test_third_party_builder_types(capsys, third_party):
    code, out, err = run(capsys, "show", third_party, "--n", "5", "--sizes", "1", "3", "--causal", "--jitter", "1")
    assert code == 0, err
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = True
    mask[1:4, 1:4] = True
    mask[4, 4] = True
    mask &= np.tril(np.ones((5, 5), dtype=bool))
    assert grid_of(out) == brute_grid(mask)
    assert "causal=True" in out and "jitter=1.0" in out and "sizes=[1, 3]" in out

    code, out, err = run(capsys, "show", third_party, "--n", "4", "--causal", "false")
    assert code == 0, err
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = mask[2:4, 2:4] = True
    assert grid_of(out) == brute_grid(mask)


def _two_heads(n: int, radius: int = 1):
    """Head 0: a band; head 1: the same band plus token 0 global."""
    band = sparseattn.sliding_window(n, radius)
    return [band, band | sparseattn.global_tokens(n, [0])]


def test_per_head_builder_prints_every_head(capsys, monkeypatch):
    monkeypatch.setitem(registry._BUILDERS, "two_heads", _two_heads)
    code, out, err = run(capsys, "show", "two_heads", "--n", "5")
    assert code == 0, err
    head0, head1 = out.split("head 1:")
    assert "head 0:" in head0
    assert grid_of(head0) == SEED_LOCAL
    assert grid_of(head1) == SEED_GLOBAL


def test_receptive_per_head_uses_the_union_of_heads(capsys, monkeypatch):
    pytest.importorskip("sparseattn.analysis")
    monkeypatch.setitem(registry._BUILDERS, "two_heads", _two_heads)
    code, out, err = run(capsys, "receptive", "two_heads", "--n", "30")
    assert code == 0, err
    assert "union of its 2 per-head patterns" in out
    assert "layers until every token is influenced by all 30 tokens: 2" in out  # head 1's global token reaches everyone in 2 layers


def test_third_party_builder_help_lists_parameters(capsys, third_party):
    code, out, _ = run(capsys, "show", third_party, "--help")
    assert code == 0
    for flag in ("--n", "--sizes", "--causal", "--jitter"):
        assert flag in out
    assert "Diagonal blocks" in out


# ------------------------------------------------------------------------------------------
# errors: non-zero exit, one line on stderr, nothing on stdout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["show", "no_such_builder"], "known builders"),
        (["show"], "known builders"),
        (["show", "sliding_window", "--radius", "1"], "--n"),
        (["show", "sliding_window", "--n", "5", "--radius", "1", "--bogus", "3"], "--bogus"),
        (["show", "sliding_window", "--n", "5", "--radius", "-1"], "radius must be >= 0, got -1"),
        (["show", "sliding_window", "--n", "5", "--radius", "1", "--dilation", "x"], "'x'"),
        (["show", "sliding_window", "--n", "5", "--radius", "1", "--global", "7"], "[0, 5)"),
        (["show", "sliding_window", "--n", "5", "--radius", "1", "--global", "a"], "'a'"),
        (["show", "longformer", "--n", "8", "--attention-window", "3"], "attention_window"),
        (["show", "random_pattern", "--n_q", "2", "--n_k", "3", "--per_row", "1", "--global", "0"], "square"),
        (["demo", "--n", "10", "--question", "10"], "--question"),
        (["demo", "--n", "-4"], "--n"),
        (["demo", "--unknown"], "--unknown"),
        (["demo", "--heads", "two"], "two"),
        (["frobnicate"], "frobnicate"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["receptive", "no_such_builder", "--layers", "2"], "known builders"),
    ],
)
def test_errors_exit_nonzero_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparseattn: error:")
    assert needle in lines[0]


def test_unknown_builder_lists_every_known_builder(capsys):
    code, _, err = run(capsys, "show", "no_such_builder")
    assert code != 0
    for name in patterns.available():
        assert name in err


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["frobnicate"], ["demo", "--unknown"], ["show", "sliding_window", "--n", "5", "--radius", "1", "--x", "1"]],
)
def test_usage_errors_exit_2(capsys, argv):
    # argparse's convention: a bad option or command is a usage error, status 2
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("sparseattn: error:") and "usage:" not in err


def test_version(capsys):
    import sparseattn

    code, out, err = run(capsys, "--version")
    assert code == 0 and err == ""
    assert out.strip() == f"sparseattn {sparseattn.__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, err = run(capsys)
    assert code == 2 and out == ""  # the help goes to stderr: stdout stays clean for scripts
    assert err.startswith("usage: sparseattn")
    last = err.strip().splitlines()[-1]
    assert last.startswith("sparseattn: error: missing COMMAND") and "receptive" in last


def test_dir_lists_the_lazy_names():
    import sparseattn

    names = dir(sparseattn)
    for name in sparseattn.__all__:
        assert name in names, name


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["show", "--help"], ["receptive", "--help"], ["show", "sliding_window", "-h"]])
def test_help(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""
    assert out.startswith("usage: sparseattn")


def test_large_pattern_is_summarised_not_printed(capsys):
    code, out, _ = run(capsys, "show", "sliding_window", "--n", "100", "--radius", "3")
    assert code == 0
    assert "too large" in out and "T100" not in out
    code, out, _ = run(capsys, "show", "sliding_window", "--n", "100", "--radius", "3", "--max-size", "100")
    assert code == 0 and "T100" in out


# ------------------------------------------------------------------------------------------
# receptive
# ------------------------------------------------------------------------------------------


def _table(out):
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)%$", line)
        if m:
            rows[int(m.group(1))] = (float(m.group(2)), int(m.group(3)), float(m.group(4)))
    return rows


def test_receptive_band_closed_form(capsys):
    pytest.importorskip("sparseattn.analysis")
    n, r, layers = 20, 2, 5
    code, out, err = run(capsys, "receptive", "sliding_window", "--n", str(n), "--radius", str(r), "--layers", str(layers))
    assert code == 0, err
    table = _table(out)
    assert sorted(table) == list(range(1, layers + 1))
    i = np.arange(n)
    for L in range(1, layers + 1):
        counts = np.minimum(i + L * r, n - 1) - np.maximum(i - L * r, 0) + 1
        mean, low, full = table[L]
        assert mean == pytest.approx(round(counts.mean(), 1), abs=0.051)
        assert low == counts.min()
        assert full == pytest.approx(100 * np.mean(counts == n), abs=0.051)
    # --layers bounds the work: coverage is looked for within those layers only
    assert "layers until every token is influenced by all 20 tokens: not within 5 (--layers 5;" in out
    # band of radius 2 over 20 tokens: the ends meet after ceil(19 / 2) = 10 layers
    code, out, err = run(capsys, "receptive", "sliding_window", "--n", str(n), "--radius", str(r))
    assert code == 0, err
    assert "layers until every token is influenced by all 20 tokens: 10" in out
    assert sorted(_table(out)) == list(range(1, 11))


def test_receptive_band_plus_global_covers_in_two_layers(capsys):
    pytest.importorskip("sparseattn.analysis")
    code, out, err = run(capsys, "receptive", "sliding_window", "--n", "30", "--radius", "1", "--global", "0")
    assert code == 0, err
    table = _table(out)
    assert sorted(table) == [1, 2]  # default: until covered
    assert table[2] == (30.0, 30, 100.0)
    assert table[1][2] < 100.0
    assert "layers until every token is influenced by all 30 tokens: 2" in out


def test_receptive_sampled_tokens_and_cover_limit(capsys):
    pytest.importorskip("sparseattn.analysis")
    n, r = 101, 5
    code, out, err = run(capsys, "receptive", "sliding_window", "--n", str(n), "--radius", str(r), "--tokens", "5", "--layers", "2", "--cover-limit", "3")
    assert code == 0, err
    traced = np.array([0, 25, 50, 75, 100])
    for L, (mean, low, full) in _table(out).items():
        counts = np.minimum(traced + L * r, n - 1) - np.maximum(traced - L * r, 0) + 1
        assert (mean, low, full) == (pytest.approx(counts.mean(), abs=0.051), counts.min(), 0.0)
    assert "each of 5 evenly spaced traced tokens" in out
    assert "not within 2 (--layers 2;" in out  # 20 layers are needed
    code, out, err = run(capsys, "receptive", "sliding_window", "--n", str(n), "--radius", str(r), "--tokens", "5", "--cover-limit", "3")
    assert code == 0, err
    assert "not within 3 (--cover-limit 3;" in out


def test_receptive_causal_never_covers(capsys):
    pytest.importorskip("sparseattn.analysis")
    code, out, err = run(capsys, "receptive", "causal", "--n", "6", "--layers", "3")
    assert code == 0, err
    # token 0 only ever sees itself: a fixed point short of n, so never (not just "not within")
    assert "layers until every token is influenced by all 6 tokens: never" in out
    # causal over 6 tokens: token i is influenced by tokens 0..i (i + 1 of them) from layer 1 on
    assert _table(out)[3] == (3.5, 1, pytest.approx(100 / 6, abs=0.051))


# ------------------------------------------------------------------------------------------
# --png (matplotlib) and report delegation
# ------------------------------------------------------------------------------------------


def test_show_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    viz = pytest.importorskip("sparseattn.viz")
    assert hasattr(viz, "plot_pattern")
    path = tmp_path / "mask.png"
    code, out, err = run(capsys, "show", "sliding_window", "--n", "300", "--radius", "4", "--global", "0", "--png", str(path))
    assert code == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in out


def test_receptive_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sparseattn.analysis")
    viz = pytest.importorskip("sparseattn.viz")
    assert hasattr(viz, "plot_receptive_field")
    path = tmp_path / "rf.png"
    code, out, err = run(capsys, "receptive", "sliding_window", "--n", "64", "--radius", "2", "--layers", "3", "--png", str(path))
    assert code == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_delegates_argv(capsys, monkeypatch):
    seen = []

    def fake_main(argv):
        seen.append(list(argv))
        print("report ran")
        return 0

    fake = types.ModuleType("sparseattn.cli.report")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "sparseattn.cli.report", fake)
    monkeypatch.setattr(sparseattn, "report", fake, raising=False)
    code, out, _ = run(capsys, "report", "bench.json", "--out", "somewhere")
    assert code == 0
    assert seen == [["bench.json", "--out", "somewhere"]]
    assert out == "report ran\n"

    fake.main = lambda argv: 3
    assert main(["report", "x.json"]) == 3


def test_report_argparse_error_is_one_line(capsys, tmp_path):
    pytest.importorskip("sparseattn.cli.report")
    missing = tmp_path / "missing.json"
    code, out, err = run(capsys, "report", str(missing))
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "missing.json" in lines[0], err
    code, out, err = run(capsys, "report", "--help")
    assert code == 0 and out.startswith("usage: sparseattn report")


# ------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------


def test_demo_small(capsys):
    n, r, qn = 640, 24, 8
    code, out, err = run(
        capsys,
        "demo",
        *("--n", str(n), "--radius", str(r), "--question", str(qn), "--heads", "2", "--d", "16"),
        *("--dense-n", "256", "--repeat", "1", "--check-rows", "64"),
    )
    assert code == 0, err
    mask = brute_qa(n, r, qn)
    assert f"shape ({n}, {n}), nnz {int(mask.sum()):,}" in out
    # the 12-token rendering is the same construction at radius 2 with 2 question tokens
    small = out.split("question tokens):\n", 1)[1]
    small = "\n".join(small.splitlines()[:13])
    assert small == brute_grid(brute_qa(12, 2, 2))
    assert "extrapolated" in out and f"n = {n}" in out
    assert "rows [0, 64) and [288, 352)" in out
    diff = float(re.search(r"max \|difference\| = ([0-9.eE+-]+)", out).group(1))
    assert diff < 1e-4
    for label in ("pattern CSR built in", "one-time work", f"steady state at n = {n}:", "measured at n = 256"):
        assert label in out
    # sparse peak memory next to dense: the output is allocated by the call, so it is part of the peak
    sparse_peak, output = re.search(r"peak memory ([0-9.]+ \w+) \(output ([0-9.]+ \w+) included\)", out).groups()
    assert _bytes(sparse_peak) >= _bytes(output) * 0.99
    assert _bytes(output) == pytest.approx(2 * n * 16 * 4, rel=0.01)
    # the dense baseline holds every head's 256 x 256 float32 scores at once
    dense_peak = _bytes(re.search(r"measured at n = 256: .*?, peak memory ([0-9.]+ \w+)", out).group(1))
    assert dense_peak >= 2 * 256 * 256 * 4
    assert re.search(r"time .* vs .*x faster", out) and re.search(r"memory .* vs .*x less", out)


def _bytes(text):
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_demo_float64_matches_reference_tightly(capsys):
    code, out, err = run(
        capsys,
        "demo",
        *("--n", "300", "--radius", "5", "--question", "3", "--heads", "1", "--d", "8", "--dtype", "float64"),
        *("--dense-n", "300", "--repeat", "1", "--check-rows", "40", "--path", "staged"),
    )
    assert code == 0, err
    assert "[extrapolated" not in out  # measured at the full size
    diff = float(re.search(r"max \|difference\| = ([0-9.eE+-]+)", out).group(1))
    assert diff < 1e-11


def test_hf_demo_runs_three_families_and_refuses_bad_options(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    code, out, err = run(capsys, "hf-demo", "--n", "96", "--window", "16", "--repeat", "1")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("mistral", "sdpa"), ("mistral", "sparseattn"), ("modernbert", "sdpa"),
                                            ("modernbert", "sparseattn"), ("gpt_oss", "eager"), ("gpt_oss", "sparseattn")]  # fmt: skip
    assert all(float(r[-1]) < 1e-4 for r in rows)  # the logits agree with the dense backend
    code, out, err = run(capsys, "hf-demo", "--families", "mistral,bert")
    assert code == 2 and "--families: unknown bert" in err
