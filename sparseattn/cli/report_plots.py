"""The PNG plots of a benchmark report: time vs n, time vs radius (log-log) and speed-up over each peer.

matplotlib (extra ``viz``) is imported only inside the functions that draw, and only its object API
(:class:`matplotlib.figure.Figure`): no pyplot, no global backend state.
"""

from __future__ import annotations

import os
import re

from .report_data import _KEY_FIELDS, OURS_PREFIX, _method_order, _series, _series_label


def slugify(text):
    """A file-name-safe version of a group name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "group"


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
