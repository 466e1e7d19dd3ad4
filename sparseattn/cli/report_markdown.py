"""The markdown of a benchmark report: provenance, machine, paired comparisons, targets, one section per group."""

from __future__ import annotations

import math

from .report_data import _series_label, paired_rows
from .report_provenance import _fmt_target, provenance, target_rows


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


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def render_markdown(data, summary, plots=None, title=None, repo_dir=None):
    """The markdown report for ``summary`` (from :func:`summarize`); ``plots``: {group: [png names]}.

    ``repo_dir``: see :func:`provenance`.
    """
    plots = plots or {}
    sa = (data.get("machine_info") or {}).get("sparseattn") or {}
    out = _head_lines(data, title, repo_dir) + _gemm_lines(sa)
    out += _paired_lines(data, sa) + _target_lines(data)
    for group, g in summary.items():
        out += _group_lines(group, g, plots.get(group, []))
    return "\n".join(out).rstrip() + "\n"


def _head_lines(data, title, repo_dir):
    """The title, the provenance warning (if any) and the facts of the run: commit, CPU, load, mode."""
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
    return out


def _gemm_lines(sa):
    """The machine's float32 GEMM rates, the versions, and what the columns of the tables mean."""
    out = []
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
    return out


def _paired_lines(data, sa):
    """The table of alternating-pair comparisons (``benchmarks/test_paired.py``), or nothing."""
    out = []
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
    return out


def _target_lines(data):
    """The table of the absolute targets in ``extra_info["targets"]``, or nothing."""
    out = []
    targets = target_rows(data)
    if targets:
        out += ["## Targets", ""]
        rows = [[t["label"], f"{_fmt(t['value'])} {t['unit'] or ''}".strip(), _fmt_target(t["target"], t["value"]), _fmt(t["load"], 2)]
                for t in targets]  # fmt: skip
        out += [_table(["measure", "value", "target", "load"], rows), ""]
    return out


def _group_lines(group, g, pngs):
    """One benchmark group: its table, fitted slopes, speed-ups over the peers and its plots ``pngs``."""
    out = [f"## {group}", ""]
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
    for png in pngs:
        out += [f"![{group}: {png}]({png})", ""]
    return out
