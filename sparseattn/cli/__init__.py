"""The ``sparseattn`` command line: ``demo``, ``show``, ``receptive``, ``warmup`` and ``report``.

Run ``sparseattn --help`` (or ``python -m sparseattn --help``) for the list of
subcommands and ``sparseattn SUBCOMMAND --help`` for each one's options.

``show`` and ``receptive`` work with every registered pattern builder, including
third-party ones: the builder's parameters become command-line options, read
from its signature (``--n 5 --radius 1``; lists as ``--indices 0 7`` or
``--indices 0,7``; nested lists as ``--layout "[[1, 0], [1, 1]]"`` or a ``.npy`` file).

One module per subcommand (``demo``, ``show``, ``receptive``, ``warmup``; ``delegated`` for ``report`` and
``dask-demo``), over ``_common`` (:class:`CLIError`, the parser class) and ``pattern_options`` (options from
a builder's signature, :func:`build_pattern`); ``parser`` assembles the subparsers. ``report`` and its
``report_*`` siblings render benchmark JSON.

Examples
--------
>>> from sparseattn.cli import main
>>> code = main(["show", "sliding_window", "--n", "5", "--radius", "1", "--global", "0"])
sliding_window(n=5, radius=1) | global_tokens(n=5, indices=[0])
shape (5, 5), nnz 19, density 0.76
<BLANKLINE>
    T1 T2 T3 T4 T5
T1  *  *  *  *  *
T2  *  *  *
T3  *  *  *  *
T4  *     *  *  *
T5  *        *  *
>>> code
0
"""

from __future__ import annotations

import sys

from ._common import PROG, CLIError, _one_line
from .delegated import _cmd_dask_demo, _cmd_report
from .parser import _make_parser
from .pattern_options import build_pattern
from .warmup import _warm_analysis  # noqa: F401  (re-exported: tests/test_warmup.py)

__all__ = ["main", "build_pattern", "CLIError"]


def main(argv=None):
    """Run the command line; returns the exit status (0 on success).

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; ``sys.argv[1:]`` by default.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    traceback = "--traceback" in argv[:1]
    try:
        rest = argv[1:] if traceback else argv
        if rest[:1] == ["report"]:
            return _cmd_report(rest[1:])
        if rest[:1] == ["dask-demo"]:  # sparseattn.dask.demo parses its own options
            return _cmd_dask_demo(rest[1:])
        parser = _make_parser()
        args, words = parser.parse_known_args(argv)
        if args.command is None:
            if words:
                raise CLIError(f"unrecognized arguments: {' '.join(words)} (see '{PROG} --help')")
            # no command is a usage error (exit 2); 'sparseattn --help' asks for the help and exits 0
            parser.print_help(sys.stderr)
            commands = ", ".join(parser._subparsers._group_actions[0].choices)
            raise CLIError(f"missing COMMAND (one of {commands})")
        if words and args.command not in ("show", "receptive"):
            raise CLIError(f"{PROG} {args.command}: unrecognized argument(s): {' '.join(words)} (see '{PROG} {args.command} --help')")
        return int(args.func(args, words, out) or 0)
    except SystemExit as exc:  # --help, or a delegated main that exits
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except CLIError as exc:
        if traceback:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ImportError, MemoryError) as exc:
        if traceback:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
