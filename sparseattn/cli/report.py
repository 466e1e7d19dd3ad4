"""Benchmark reports: pytest-benchmark JSON to markdown tables and PNG plots.

``sparseattn report BENCH.json [--out DIR]`` (or :func:`main`) reads the file
written by ``pytest benchmarks/ --benchmark-json=BENCH.json`` and writes, under
``DIR`` (default: a new folder ``sparseattn-report-<date>-<time>`` in the
current directory; it never writes into ``docs/`` unless told to with
``--out docs/benchmarks``):

- ``BENCH.md``: per benchmark group, a table of method, n, radius, global
  tokens, dtype, median time, useful GFLOP/s (4·nnz·d per head), its share of
  the machine's float32 GEMM rate, the growth ratio time(n) / time(previous n),
  peak extra memory; the fitted log-log slope of time against n per method;
  and the speed-up of each ``sparseattn*`` method over each peer of the group
  at the same workload (and of ``sparseattn`` over ``sparseattn-staged``);
- ``BENCH-<group>-time_vs_n.png`` (log-log, fitted slope in the legend),
  ``BENCH-<group>-time_vs_radius.png`` and ``BENCH-<group>-speedup.png``
  (matplotlib, extra ``viz``; imported only here and only when plotting).

The report's first lines say where the numbers come from: pytest-benchmark's
``commit_info``.  A run from a dirty tree, without a commit, or (checked with
``git`` when the report runs inside a repository) at a commit that is not in
the repository's history is marked **not reproducible from a commit**.  Every
target shown (the paired comparisons' ``target``, e.g. ``>= 10``) is flagged
**met** or **missed** for the measured median ratio; so is every absolute target
a benchmark lists in ``extra_info["targets"]`` (``label``, ``value``, ``unit``,
``target``), shown in a *Targets* table.

The benchmarks store what the report needs in each benchmark's ``extra_info``:
``method``, ``n``, ``radius``, ``globals``, ``dtype``, ``useful_flop``, and
optionally ``rss_peak_delta_bytes`` / ``tracemalloc_peak_bytes``, ``qkvo_bytes``
and ``out_bytes``.  Entries
without them are still listed, with blanks.

Examples
--------
>>> import json, os, tempfile
>>> from sparseattn.cli.report import report
>>> bench = {"machine_info": {}, "benchmarks": [
...     {"group": "demo", "name": f"t[{m}-n{n}]", "stats": {"median": t},
...      "extra_info": {"method": m, "n": n, "radius": 8, "useful_flop": 4e9 * n / 1024}}
...     for m, n, t in [("sparseattn", 1024, 0.01), ("sparseattn", 2048, 0.02),
...                     ("dense", 1024, 0.05), ("dense", 2048, 0.2)]]}
>>> d = tempfile.mkdtemp()
>>> with open(os.path.join(d, "B.json"), "w") as f:
...     json.dump(bench, f)
>>> out = report(os.path.join(d, "B.json"), out_dir=d, plots=False)
>>> print(open(out["markdown"]).read().split("### Speed-up")[1].split("\\n\\n")[2].strip())
| method | n | radius | globals | dtype | × vs dense |
|---|---|---|---|---|---|
| sparseattn | 1024 | 8 | — | — | 5.00× |
| sparseattn | 2048 | 8 | — | — | 10.0× |
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

__all__ = ["load", "summarize", "paired_rows", "target_rows", "fit_slope", "provenance", "target_verdict", "render_markdown", "new_output_dir", "report", "main"]

OURS_PREFIX = "sparseattn"
_KEY_FIELDS = ("n", "radius", "globals", "dtype")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def load(json_path):
    """Read a pytest-benchmark JSON file; ValueError if it is not one."""
    if not isinstance(json_path, (str, os.PathLike)):
        raise TypeError(f"json_path must be a path to a pytest-benchmark JSON file, got {type(json_path).__name__}")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"json_path {os.fspath(json_path)!r} does not exist (write it with pytest --benchmark-json=PATH)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_path {os.fspath(json_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        got = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"json_path {os.fspath(json_path)!r} is not pytest-benchmark output: expected a 'benchmarks' list, got keys {got}")
    return data


def _record(bench):
    extra = bench.get("extra_info") or {}
    stats = bench.get("stats") or {}
    median = stats.get("median")
    rec = {
        "group": bench.get("group") or "(no group)",
        "name": bench.get("name", "?"),
        "method": extra.get("method") or bench.get("name", "?"),
        "median": float(median) if median is not None else None,
        "rounds": stats.get("rounds"),
    }
    for key in _KEY_FIELDS:
        rec[key] = extra.get(key)
    flop = extra.get("useful_flop")
    rec["gflops"] = flop / rec["median"] / 1e9 if flop and rec["median"] else None
    peaks = [extra.get(k) for k in ("rss_peak_delta_bytes", "tracemalloc_peak_bytes") if extra.get(k) is not None]
    rec["peak_bytes"] = max(peaks) if peaks else None
    rec["load"] = extra.get("loadavg_1min")
    qkvo, out_bytes = extra.get("qkvo_bytes"), extra.get("out_bytes")
    rec["extra_ratio"] = None
    if rec["peak_bytes"] is not None and qkvo and out_bytes is not None and rec["peak_bytes"] >= out_bytes:
        rec["extra_ratio"] = (rec["peak_bytes"] - out_bytes) / qkvo  # blank when the probe missed the output itself
    return rec


def _method_order(method):
    return (0 if method == OURS_PREFIX else 1 if method.startswith(OURS_PREFIX) else 2, method)


def _sort_key(value):
    return (value is None, value if isinstance(value, (int, float)) else str(value))


def gemm_reference(data):
    """(GFLOP/s, label) of the float32 GEMM rate to compare against, or (None, None).

    The rate measured in the subprocess with OPENBLAS_CORETYPE unset (what the
    hardware does) when present, else the in-process rate; of each, the best of
    the measurements at the start and at the end of the run (``*_end``).
    """
    info = (data.get("machine_info") or {}).get("sparseattn") or {}
    for key, label in (("gemm_float32_hardware_default", "subprocess, OPENBLAS_CORETYPE unset"), ("gemm_float32_in_process", "in process")):
        found = [info.get(k) for k in (key, key + "_end") if (info.get(k) or {}).get("gemm_gflops")]
        if found:
            g = max(found, key=lambda x: x["gemm_gflops"])
            return float(g["gemm_gflops"]), f"{label}, kernel {g.get('blas_architecture', '?')}"
    return None, None


def _commit_in_history(commit, repo_dir):
    """True / False when ``git`` can tell whether ``commit`` is in the history of HEAD; None if it cannot."""
    import subprocess

    try:
        top = subprocess.run(
            ["git", "-C", repo_dir, "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10
        )
        if top.returncode != 0:
            return None
        res = subprocess.run(
            ["git", "-C", repo_dir, "merge-base", "--is-ancestor", commit, "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.returncode == 0


def provenance(data, repo_dir=None):
    """``(reproducible, text)``: whether the run is tied to a clean commit, and a line saying so.

    Parameters
    ----------
    data : dict
        pytest-benchmark output (its ``commit_info``).
    repo_dir : str, optional
        A directory inside the project's git repository: the commit is then also
        checked to be in the history of its HEAD (skipped when git cannot tell).

    Examples
    --------
    >>> from sparseattn.cli.report import provenance
    >>> provenance({"commit_info": {"id": "0123456789abcdef", "dirty": True}})
    (False, 'commit 0123456789 with uncommitted changes (dirty tree): not reproducible from a commit')
    >>> provenance({"commit_info": {"id": "0123456789abcdef", "dirty": False}})
    (True, 'commit 0123456789, clean tree')
    >>> provenance({})[1]
    'commit unknown (no commit_info in the JSON): not reproducible from a commit'
    """
    info = data.get("commit_info") or {}
    commit = info.get("id")
    if not commit or info.get("error"):
        return False, "commit unknown (no commit_info in the JSON): not reproducible from a commit"
    if info.get("dirty"):
        return False, f"commit {commit[:10]} with uncommitted changes (dirty tree): not reproducible from a commit"
    if repo_dir is not None and _commit_in_history(commit, repo_dir) is False:
        return False, f"commit {commit[:10]} is not in this repository's history: not reproducible from a commit here"
    return True, f"commit {commit[:10]}, clean tree"


_TARGET = re.compile(r"^\s*(>=|<=|≥|≤|>|<)\s*([0-9.eE+-]+)\s*[x×]?\s*$")


def target_verdict(target, value):
    """``"met"``, ``"missed"``, or None when there is no target or value (or the target is not ``OP NUMBER``).

    Examples
    --------
    >>> from sparseattn.cli.report import target_verdict
    >>> target_verdict(">= 10", 4.06), target_verdict("<= 8.8", 3.3), target_verdict(None, 1.0)
    ('missed', 'met', None)
    """
    if not target or value is None:
        return None
    m = _TARGET.match(str(target))
    if not m:
        return None
    op, bound = m.group(1), float(m.group(2))
    ok = {">=": value >= bound, "≥": value >= bound, ">": value > bound, "<=": value <= bound, "≤": value <= bound, "<": value < bound}[op]
    return "met" if ok else "missed"


def _fmt_target(target, value):
    verdict = target_verdict(target, value)
    if not target:
        return "—"
    return f"{target}: {'met' if verdict == 'met' else '**missed**' if verdict == 'missed' else '?'}"


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------


def fit_slope(xs, ts):
    """Least-squares slope of log(t) against log(x); None with fewer than two distinct x."""
    pts = [(math.log(x), math.log(t)) for x, t in zip(xs, ts) if x and t and x > 0 and t > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    return sxy / sxx


def _series(recs, vary):
    """{(method, other key fields...): [records sorted by `vary`]} for records that have `vary`."""
    out = {}
    for r in recs:
        if r[vary] is None or r["median"] is None:
            continue
        key = (r["method"],) + tuple(r[k] for k in _KEY_FIELDS if k != vary)
        out.setdefault(key, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r[vary])
    return out


def summarize(data):
    """Group the benchmarks: ``{group: {"rows", "slopes_n", "slopes_radius", "speedups", "peers", "ours"}}``.

    ``rows``: one dict per benchmark (method, n, radius, globals, dtype, median s,
    gflops, gemm_pct, growth = time / time of the previous n (or radius) of the
    same series, growth_x = that n ratio, peak_bytes).  ``slopes_n`` /
    ``slopes_radius``: ``{series key: fitted log-log slope}``.  ``speedups``:
    ``{(our method, n, radius, globals, dtype): {peer: t_peer / t_ours}}``.
    """
    gemm, _ = gemm_reference(data)
    groups = {}
    for bench in data["benchmarks"]:
        if "paired" in (bench.get("extra_info") or {}):
            continue  # alternating pairs: see paired_rows()
        rec = _record(bench)
        groups.setdefault(rec["group"], []).append(rec)
    result = {}
    for group, recs in groups.items():
        for r in recs:
            r["gemm_pct"] = 100.0 * r["gflops"] / gemm if gemm and r["gflops"] else None
            r["growth"] = r["growth_x"] = None
        vary = "n" if len({r["n"] for r in recs}) > 1 else "radius" if len({r["radius"] for r in recs}) > 1 else None
        slopes = {"n": {}, "radius": {}}
        for v in ("n", "radius"):
            for key, rs in _series(recs, v).items():
                s = fit_slope([r[v] for r in rs], [r["median"] for r in rs])
                if s is not None:
                    slopes[v][key] = s
                if v == vary:
                    for prev, cur in zip(rs, rs[1:]):
                        cur["growth"] = cur["median"] / prev["median"]
                        cur["growth_x"] = cur[v] / prev[v]
        recs.sort(key=lambda r: (_method_order(r["method"]),) + tuple(_sort_key(r[k]) for k in _KEY_FIELDS))
        methods = sorted({r["method"] for r in recs}, key=_method_order)
        ours = [m for m in methods if m.startswith(OURS_PREFIX)]
        peers = [m for m in methods if not m.startswith(OURS_PREFIX)]
        by_key = {}
        for r in recs:
            if r["median"]:
                by_key.setdefault(tuple(r[k] for k in _KEY_FIELDS), {})[r["method"]] = r["median"]
        speedups = {}
        for key, times in sorted(by_key.items(), key=lambda kv: tuple(_sort_key(x) for x in kv[0])):
            for m in ours:
                # the primary method is also compared with its own alternative paths (fused vs staged)
                against = peers + [o for o in ours if o != m] if m == OURS_PREFIX else peers
                if m in times and any(p in times for p in against):
                    speedups[(m,) + key] = {p: times[p] / times[m] for p in against if p in times}
        result[group] = {
            "rows": recs,
            "vary": vary,
            "slopes_n": slopes["n"],
            "slopes_radius": slopes["radius"],
            "speedups": dict(sorted(speedups.items(), key=lambda kv: (_method_order(kv[0][0]),) + tuple(_sort_key(x) for x in kv[0][1:]))),
            "ours": ours,
            "peers": peers,
            "columns": peers + [o for o in ours if o != OURS_PREFIX],
        }
    return result


def paired_rows(data):
    """The alternating-pair benchmarks (``benchmarks/test_paired.py``), one dict each.

    Keys: ``label``, ``a``, ``b`` (the two calls), ``median_a``, ``median_b``
    (seconds), ``ratio`` (median B / median A), ``pair_ratio_min`` /
    ``pair_ratio_max`` (range of B / A over the pairs), ``rounds``, ``target``
    and ``load``.
    """
    rows = []
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info") or {}
        p = extra.get("paired")
        if not isinstance(p, dict) or p.get("ratio") is None:
            continue
        row = {k: p.get(k) for k in ("label", "a", "b", "median_a", "median_b", "ratio", "pair_ratio_min", "pair_ratio_max", "rounds", "target")}
        row["load"] = extra.get("loadavg_1min")
        rows.append(row)
    return rows


def target_rows(data):
    """The absolute targets the benchmarks list in ``extra_info["targets"]``, one dict each.

    Keys: ``label``, ``value``, ``unit``, ``target`` (e.g. ``"<= 6"``),
    ``verdict`` (:func:`target_verdict`) and ``load``.
    """
    rows = []
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info") or {}
        for t in extra.get("targets") or []:
            if not isinstance(t, dict):
                continue
            row = {k: t.get(k) for k in ("label", "value", "unit", "target")}
            row["verdict"] = target_verdict(row["target"], row["value"])
            row["load"] = extra.get("loadavg_1min")
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------


def _cpu_features(mi):
    """``"AVX-512 (znver5), micro-kernels 256-bit"``-style text from the machine info, or None."""
    sa = mi.get("sparseattn") or {}
    feats = sa.get("cpu_features") or {}
    flags = set((mi.get("cpu") or {}).get("flags") or ())
    if feats:
        isa = "AVX-512" if feats.get("avx512f") else "AVX2" if feats.get("avx2") else "no AVX2"
        isa += f" ({feats['cpu_name']})" if feats.get("cpu_name") else ""
    elif flags:
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    else:
        return None
    bits = sa.get("kernel_vector_bits")
    return "CPU features: " + isa + (f", micro-kernels {bits}-bit vectors" if bits else "")


def _fmt_ms(seconds):
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3g}"


def _fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"
    return str(x)


def _fmt_ratio(x):
    return "—" if x is None else (f"{x:.2f}×" if x < 10 else f"{x:.1f}×" if x < 100 else f"{x:.0f}×")


def _fmt_mib(b):
    return "—" if b is None else f"{b / 2**20:.1f}"


def slugify(text):
    """A file-name-safe version of a group name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "group"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _series_label(key, vary, keys=None):
    """'method (field=value, ...)', listing only the fields that differ between ``keys`` (all if None)."""
    fields = [k for k in _KEY_FIELDS if k != vary]
    shown = range(len(fields)) if keys is None else [i for i in range(len(fields)) if len({k[i + 1] for k in keys}) > 1]
    extra = ", ".join(f"{fields[i]}={key[i + 1]}" for i in shown if key[i + 1] is not None)
    return key[0] + (f" ({extra})" if extra else "")


def render_markdown(data, summary, plots=None, title=None, repo_dir=None):
    """The markdown report for ``summary`` (from :func:`summarize`); ``plots``: {group: [png names]}.

    ``repo_dir``: see :func:`provenance`.
    """
    plots = plots or {}
    mi = data.get("machine_info") or {}
    sa = mi.get("sparseattn") or {}
    out = [f"# {title or 'Benchmarks'}", ""]
    reproducible, origin = provenance(data, repo_dir)
    if not reproducible:
        out += [f"> **Provenance warning:** {origin}. These figures cannot be re-run from the code in the history.", ""]
    when = data.get("datetime")
    facts = []
    if when:
        facts.append(f"run {when}")
    facts.append(origin)
    if sa.get("cpu_model") or mi.get("cpu"):
        facts.append(f"CPU {sa.get('cpu_model') or (mi.get('cpu') or {}).get('brand_raw', '?')}, {sa.get('cpu_count', mi.get('cpu', {}).get('count', '?'))} cores")
    features = _cpu_features(mi)
    if features:
        facts.append(features)
    if "fused_available" in sa:
        facts.append("fused path " + ("available" if sa["fused_available"] else "NOT available (auto = staged)"))
    if sa.get("loadavg_at_start") or sa.get("loadavg_at_end"):
        loads = [x[0] if x else None for x in (sa.get("loadavg_at_start"), sa.get("loadavg_at_end"))]
        busy = any(x is not None and x > (sa.get("cpu_count") or math.inf) for x in loads)
        facts.append(
            "1-min load average " + " at start, ".join("?" if x is None else f"{x:.2f}" for x in loads) + " at end"
            + (" (above the core count: other work shared the CPUs, times are inflated)" if busy else "")
        )
    if sa.get("quick"):
        facts.append("quick mode (small sizes, one round: smoke test, not a measurement)")
    if facts:
        out += ["- " + "\n- ".join(facts), ""]
    for key, label in (
        ("gemm_float32_in_process", "in this process, run start"),
        ("gemm_float32_hardware_default", "subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset, run start"),
        ("gemm_float32_in_process_end", "in this process, run end"),
        ("gemm_float32_hardware_default_end", "subprocess with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset, run end"),
    ):
        g = sa.get(key) or {}
        if g.get("gemm_gflops"):
            env = g.get("env_OPENBLAS_CORETYPE")
            out.append(
                f"- NumPy float32 GEMM ({g.get('gemm_n')}²), {label}: **{g['gemm_gflops']:.1f} GFLOP/s**, "
                f"BLAS {g.get('blas_internal_api', '?')} {g.get('blas_version', '')} kernel **{g.get('blas_architecture', '?')}**, "
                f"{g.get('blas_num_threads', '?')} threads" + (f", OPENBLAS_CORETYPE={env}" if env else "")
            )
        elif g.get("error"):
            out.append(f"- NumPy float32 GEMM, {label}: not measured ({g['error']})")
    versions = sa.get("versions") or {}
    if versions:
        out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    out += [
        "",
        "Time is the median over rounds. GFLOP/s counts useful work only: 4·nnz·d per head "
        "(scores and P·V at the allowed pairs), whatever the method computes. % GEMM is that rate over "
        "the float32 GEMM rate above (the subprocess figure when present, best of run start and end). Growth is time over the time "
        "at the previous size of the same series. Peak MiB is the peak memory one call adds "
        "(max of the RSS high-water-mark delta and tracemalloc's peak), output included; extra / qkvo is "
        "that peak minus the output's bytes, over the bytes of q, k, v and the output together. Load is "
        "the 1-minute load average when the benchmark started (the machine has the core count above).",
        "",
    ]
    paired = paired_rows(data)
    if paired:
        out += [
            "## Paired comparisons (alternating calls)",
            "",
            "A and B called alternately (A, B, A, B, ...) in one process, so both see the same machine load; "
            "ratio is median(B) / median(A), with the range of B / A over the individual pairs. A target is "
            "met or **missed** by the median ratio"
            + (" (quick mode: sizes too small for the targets, so the verdicts are not meaningful)." if sa.get("quick") else "."),
            "",
        ]
        header = ["comparison", "A", "B", "median A ms", "median B ms", "ratio B / A", "per-pair range", "target", "pairs", "load"]
        rows = [
            [p["label"], p["a"], p["b"], _fmt_ms(p["median_a"]), _fmt_ms(p["median_b"]), _fmt(p["ratio"]),
             f"{_fmt(p['pair_ratio_min'])}–{_fmt(p['pair_ratio_max'])}", _fmt_target(p["target"], p["ratio"]), _fmt(p["rounds"]), _fmt(p["load"], 2)]
            for p in paired
        ]  # fmt: skip
        out += [_table(header, rows), ""]
    targets = target_rows(data)
    if targets:
        out += ["## Targets", ""]
        rows = [[t["label"], f"{_fmt(t['value'])} {t['unit'] or ''}".strip(), _fmt_target(t["target"], t["value"]), _fmt(t["load"], 2)]
                for t in targets]  # fmt: skip
        out += [_table(["measure", "value", "target", "load"], rows), ""]
    for group, g in summary.items():
        out += [f"## {group}", ""]
        header = ["method", "n", "radius", "globals", "dtype", "median ms", "GFLOP/s", "% GEMM", "growth", "peak MiB", "extra / qkvo", "rounds", "load"]
        rows = []
        for r in g["rows"]:
            growth = "—" if r["growth"] is None else f"{r['growth']:.2f} ({g['vary']} ×{r['growth_x']:g})"
            rows.append(
                [r["method"], _fmt(r["n"]), _fmt(r["radius"]), _fmt(r["globals"]), _fmt(r["dtype"]), _fmt_ms(r["median"]),
                 _fmt(r["gflops"]), _fmt(r["gemm_pct"], 2), growth, _fmt_mib(r["peak_bytes"]), _fmt(r["extra_ratio"], 2), _fmt(r["rounds"]), _fmt(r["load"], 2)]
            )
        out += [_table(header, rows), ""]
        for v, label in (("n", "n"), ("radius", "radius")):
            slopes = g[f"slopes_{v}"]
            if slopes:
                out.append(f"Fitted log-log slope of time against {label} (1 = linear, 2 = quadratic):")
                out.append("")
                out += [f"- {_series_label(k, v)}: **{s:.2f}**" for k, s in slopes.items()]
                out.append("")
        if g["speedups"]:
            out += ["### Speed-up", "", f"t(peer) / t(ours) at the same workload, in group {group!r}:", ""]
            header = ["method", "n", "radius", "globals", "dtype"] + [f"× vs {p}" for p in g["columns"]]
            rows = [[key[0]] + [_fmt(x) for x in key[1:]] + [_fmt_ratio(sp.get(p)) for p in g["columns"]] for key, sp in g["speedups"].items()]
            out += [_table(header, rows), ""]
        for png in plots.get(group, []):
            out += [f"![{group}: {png}]({png})", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def _figure(width=7.0):
    from matplotlib.figure import Figure  # lazy: extra 'viz'; no pyplot, no global backend state

    fig = Figure(figsize=(width, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def _log_axes(ax, xs):
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())


def _plot_vs(group, g, vary, path):
    series = _series(g["rows"], vary)
    series = {k: rs for k, rs in series.items() if len(rs) > 1}
    if not series:
        return False
    slopes = g[f"slopes_{vary}"]
    fig, ax = _figure()
    for key, rs in sorted(series.items(), key=lambda kv: _method_order(kv[0][0])):
        label = _series_label(key, vary, list(series))
        if key in slopes:
            label += f"  slope {slopes[key]:.2f}"
        ax.plot([r[vary] for r in rs], [r["median"] * 1e3 for r in rs], marker="o", label=label, linewidth=2.2 if key[0] == OURS_PREFIX else 1.4)
    _log_axes(ax, sorted({r[vary] for rs in series.values() for r in rs}))
    ax.set_xlabel(vary)
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"{group}\ntime vs {vary} (log-log)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return True


def _plot_speedup(group, g, path):
    if not g["speedups"] or not g["vary"]:
        return False
    vary = g["vary"]
    idx = 1 + list(_KEY_FIELDS).index(vary)
    lines = {}
    for key, sp in g["speedups"].items():
        for peer, x in sp.items():
            rest = tuple(v for i, v in enumerate(key) if i not in (0, idx))
            lines.setdefault((key[0], peer) + rest, []).append((key[idx], x))
    fig, ax = _figure(9.5)  # room for the legend beside the axes
    for (ours, peer, *_), pts in sorted(lines.items(), key=lambda kv: (_method_order(kv[0][0]), kv[0][1:])):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ours} vs {peer}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    _log_axes(ax, sorted({p[0] for pts in lines.values() for p in pts}))
    ax.set_xlabel(vary)
    ax.set_ylabel("speed-up  t(peer) / t(ours)")
    ax.set_title(f"{group}\nspeed-up over each peer", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    # outside the axes: inside, it covered the points at the smallest n
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=110)
    return True


def _make_plots(summary, out_dir, stem):
    written = {}
    for group, g in summary.items():
        base = f"{stem}-{slugify(group)}"
        for suffix, make in (
            ("time_vs_n", lambda p, g=g, grp=group: _plot_vs(grp, g, "n", p)),
            ("time_vs_radius", lambda p, g=g, grp=group: _plot_vs(grp, g, "radius", p)),
            ("speedup", lambda p, g=g, grp=group: _plot_speedup(grp, g, p)),
        ):
            name = f"{base}-{suffix}.png"
            if make(os.path.join(out_dir, name)):
                written.setdefault(group, []).append(name)
    return written


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def new_output_dir(parent=None):
    """A new, empty folder ``sparseattn-report-<date>-<time>[-k]`` in ``parent`` (default: the current directory)."""
    import time

    parent = os.getcwd() if parent is None else os.fspath(parent)
    base = os.path.join(parent, time.strftime("sparseattn-report-%Y%m%d-%H%M%S"))
    path, k = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            k += 1
            path = f"{base}-{k}"


def report(json_path, out_dir=None, *, plots=True, title=None):
    """Write ``<stem>.md`` and the PNG plots for a pytest-benchmark JSON file.

    Parameters
    ----------
    json_path : str or os.PathLike
        Output of ``pytest benchmarks/ --benchmark-json=PATH``.
    out_dir : str or os.PathLike, optional
        Directory for the markdown and PNGs (created if missing).  Default: a new
        folder from :func:`new_output_dir` in the current directory, so that a
        report never overwrites committed files by accident.
    plots : bool
        Draw the PNGs (needs matplotlib, extra ``viz``).  Without matplotlib the
        markdown is still written and ``"plots_skipped"`` says why.
    title : str, optional
        Heading of the markdown (default: ``Benchmarks: <file name>``).

    Returns
    -------
    dict
        ``{"markdown": path, "plots": [paths], "summary": summarize(...)}``
        (plus ``"plots_skipped"`` when matplotlib is missing).
    """
    data = load(json_path)
    if out_dir is None:
        out_dir = new_output_dir()
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a directory path, got {type(out_dir).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(os.fspath(json_path)))[0]
    summary = summarize(data)
    result = {"plots": []}
    written = {}
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            result["plots_skipped"] = "matplotlib is not installed (pip install 'sparseattn[viz]')"
        else:
            written = _make_plots(summary, out_dir, stem)
    repo_dir = os.path.dirname(os.path.abspath(os.fspath(json_path)))
    md = render_markdown(
        data, summary, written, title=title or f"Benchmarks: {os.path.basename(os.fspath(json_path))}", repo_dir=repo_dir
    )
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    result["markdown"] = md_path
    result["plots"] = [os.path.join(out_dir, n) for names in written.values() for n in names]
    result["summary"] = summary
    result["reproducible"], result["provenance"] = provenance(data, repo_dir)
    return result


def main(argv=None):
    """``sparseattn report BENCH.json [BENCH2.json ...] [--out DIR] [--no-plots]``; returns 0."""
    parser = argparse.ArgumentParser(
        prog="sparseattn report",
        description="Turn pytest-benchmark JSON (pytest benchmarks/ --benchmark-json=BENCH.json) into a markdown "
        "table and PNG plots: time vs n (log-log, fitted slope), time vs radius, speed-up over each peer.",
    )
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default: a new folder sparseattn-report-DATE-TIME in the current directory; "
        "pass --out docs/benchmarks to update the docs)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write the markdown only")
    args = parser.parse_args(argv)
    for path in args.json:
        if not os.path.isfile(path):
            parser.error(f"{path}: no such file (write it with pytest benchmarks/ --benchmark-json={path})")
    out = args.out
    for path in args.json:
        if out is None:
            out = new_output_dir()  # one new folder for all the files of this run
        try:
            res = report(path, out, plots=not args.no_plots)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"wrote {res['markdown']}")
        for p in res["plots"]:
            print(f"wrote {p}")
        if "plots_skipped" in res:
            print(f"plots skipped: {res['plots_skipped']}")
        if not res["reproducible"]:
            print(f"warning: {path}: {res['provenance']}")
        data = load(path)
        missed = [p["label"] for p in paired_rows(data) if target_verdict(p["target"], p["ratio"]) == "missed"]
        missed += [t["label"] for t in target_rows(data) if t["verdict"] == "missed"]
        for label in missed:
            print(f"target missed: {label}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
