"""``sparseattn show NAME ...``: print (or plot) any registered pattern builder."""

from __future__ import annotations

from ._common import _heads, _png_paths, _summary
from .pattern_options import _add_pattern_command, _pattern_from_args


def add_parser(sub):
    p = _add_pattern_command(sub, "show", "print (or plot) any registered pattern builder")
    p.add_argument("--max-size", type=int, default=64, help="largest pattern side printed as text (default: 64)")
    p.set_defaults(func=_cmd_show, parser=p)


def _cmd_show(args, words, out):
    built = _pattern_from_args(args, words, out)
    if built is None:
        return 0
    pattern, text = built
    heads = _heads(pattern)
    print(text, file=out)
    for h, p in enumerate(heads):
        if len(heads) > 1:
            print(f"{'' if h == 0 else chr(10)}head {h}:", file=out)
        print(_summary(p), file=out)
        if max(p.shape) <= args.max_size:
            print(file=out)
            print(p.to_string(max_size=args.max_size), file=out)
        elif not args.png:
            print(
                f"(too large to print as text: more than --max-size {args.max_size} tokens per side; use --png FILE)",
                file=out,
            )
    if args.png:
        from .. import viz

        for p, path in zip(heads, _png_paths(args.png, len(heads))):
            viz.plot_pattern(p, path)
            print(f"wrote {path}", file=out)
    return 0
