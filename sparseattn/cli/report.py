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
  (matplotlib, extra ``viz``; imported only when plotting, by
  :mod:`sparseattn.cli.report_plots`).

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
import os

# the whole API of sparseattn.cli.report, re-exported from the modules that implement it
from .report_data import OURS_PREFIX, fit_slope, gemm_reference, load, paired_rows, summarize  # noqa: F401
from .report_markdown import _cpu_features, render_markdown  # noqa: F401
from .report_plots import _make_plots, slugify  # noqa: F401
from .report_provenance import provenance, target_rows, target_verdict

__all__ = ["load", "summarize", "paired_rows", "target_rows", "fit_slope", "provenance", "target_verdict", "render_markdown", "new_output_dir", "report", "main"]


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
