"""``sparseattn receptive NAME ...``: receptive-field coverage of a pattern after stacked layers."""

from __future__ import annotations

from ._common import CLIError, _summary
from .pattern_options import _add_pattern_command, _pattern_from_args


def add_parser(sub):
    p = _add_pattern_command(sub, "receptive", "receptive-field coverage of a pattern after stacked layers")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="stacked layers to trace and report; bounds the work (default: until covered, at most 16)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="trace this many evenly spaced tokens instead of all (default: all up to n = 4096, else 33)",
    )
    p.add_argument(
        "--cover-limit",
        type=int,
        default=24,
        help="without --layers: search at most this many layers for full coverage (default: 24)",
    )
    p.set_defaults(func=_cmd_receptive, parser=p)


def _cmd_receptive(args, words, out):
    built = _pattern_from_args(args, words, out)
    if built is None:
        return 0
    import numpy as np

    pattern, text = built
    if isinstance(pattern, tuple):
        # a layer with per-head patterns mixes information along the union of its heads
        count, merged = len(pattern), pattern[0]
        for p in pattern[1:]:
            merged = merged | p
        pattern = merged
        text += f"  (union of its {count} per-head patterns)"
    from .. import analysis

    n_q, n_k = pattern.shape
    if n_q != n_k:
        raise CLIError(f"receptive fields need a square (self-attention) pattern, but {text} has shape {pattern.shape}")
    if args.layers is not None and args.layers < 1:
        raise CLIError(f"--layers must be >= 1, got {args.layers}")
    traced = args.tokens
    if traced is None:
        traced = n_q if n_q <= 4096 else 33
    if traced < 1:
        raise CLIError(f"--tokens must be >= 1, got {traced}")
    tokens = None
    if traced < n_q:
        # evenly spaced, both ends included (the ends of a band are covered last)
        tokens = np.unique(np.linspace(0, n_q - 1, traced).round().astype(np.int64))
    if args.cover_limit < 1:
        raise CLIError(f"--cover-limit must be >= 1, got {args.cover_limit}")
    # one pass: --layers L traces L layers (and looks for full coverage within them), else up to --cover-limit
    depth = args.layers if args.layers is not None else args.cover_limit
    table, cover, never = analysis.survey(pattern, depth, tokens=tokens)
    layers = args.layers
    if layers is None:
        layers = min(cover, 16) if cover is not None else min(4, depth)
    table = table[:layers]
    print(text, file=out)
    print(_summary(pattern), file=out)
    print(file=out)
    who = "each token" if tokens is None else f"each of {len(tokens)} evenly spaced traced tokens (--tokens)"
    print(f"receptive field after L stacked layers (tokens that can influence {who}):", file=out)
    print(f"{'layers':>6}  {'mean tokens':>12}  {'min tokens':>10}  {'fully covered':>13}", file=out)
    for layer, counts in enumerate(table, start=1):
        full = float(np.mean(counts >= n_k)) if counts.size else 0.0
        mean = float(counts.mean()) if counts.size else 0.0
        low = int(counts.min()) if counts.size else 0
        print(f"{layer:>6}  {mean:>12.1f}  {low:>10d}  {full:>12.1%}", file=out)
    scope = "every token" if tokens is None else "every traced token"
    if cover is not None:
        print(f"layers until {scope} is influenced by all {n_q} tokens: {cover}", file=out)
    elif never:
        print(f"layers until {scope} is influenced by all {n_q} tokens: never (the reach stops growing short of n)", file=out)
    else:
        bound = f"--layers {depth}" if args.layers is not None else f"--cover-limit {depth}"
        print(
            f"layers until {scope} is influenced by all {n_q} tokens: not within {depth} ({bound}; never, or more layers)",
            file=out,
        )
    if args.png:
        from .. import viz

        # the same tokens as the table (all of them when the table traced all)
        viz.plot_receptive_field(pattern, layers, args.png, tokens=np.arange(n_q) if tokens is None else tokens)
        print(f"wrote {args.png}", file=out)
    return 0
