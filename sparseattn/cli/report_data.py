"""Reading pytest-benchmark JSON and summarizing it: the rows, series, fitted slopes and speed-ups of a report.

Nothing here formats or draws: :mod:`sparseattn.cli.report_markdown` and :mod:`sparseattn.cli.report_plots`
render what :func:`summarize` and :func:`paired_rows` return.
"""

from __future__ import annotations

import json
import math
import os


OURS_PREFIX = "sparseattn"


_KEY_FIELDS = ("n", "radius", "globals", "dtype")


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


def _series_label(key, vary, keys=None):
    """'method (field=value, ...)', listing only the fields that differ between ``keys`` (all if None)."""
    fields = [k for k in _KEY_FIELDS if k != vary]
    shown = range(len(fields)) if keys is None else [i for i in range(len(fields)) if len({k[i + 1] for k in keys}) > 1]
    extra = ", ".join(f"{fields[i]}={key[i + 1]}" for i in shown if key[i + 1] is not None)
    return key[0] + (f" ({extra})" if extra else "")


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
