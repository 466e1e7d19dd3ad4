"""Whether a benchmark run can be trusted: its provenance (a clean commit in the history) and its targets.

:func:`provenance` reads pytest-benchmark's ``commit_info`` (and asks ``git`` whether the commit is in the
repository's history); :func:`target_verdict` says whether a measured value meets a target such as
``">= 10"``; :func:`target_rows` collects the absolute targets the benchmarks list.
"""

from __future__ import annotations

import re


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
