"""``sparseattn report`` and ``sparseattn dask-demo``: commands that parse their own options.

:func:`sparseattn.cli.main` hands their arguments unchanged to :func:`sparseattn.cli.report.main` and
:func:`sparseattn.dask.demo.main`; :func:`add_parsers` only lists them in ``sparseattn --help``.
"""

from __future__ import annotations

import sys

from ._common import PROG, CLIError


def add_parsers(sub):
    sub.add_parser(
        "dask-demo",
        help="a million-token band + global attention on Dask worker processes (sparseattn.dask.demo)",
        add_help=False,
    )
    sub.add_parser(
        "report",
        help="turn a pytest-benchmark JSON file into tables and plots (sparseattn.cli.report)",
        description="Delegates to sparseattn.cli.report: run 'sparseattn report --help' for its options.",
        add_help=False,
    )


def _cmd_dask_demo(argv):
    from ..dask.demo import main as dask_demo

    return dask_demo(argv)


def _cmd_report(argv):
    import importlib

    try:
        # through sys.modules, not the package attribute: a module put there (tests) takes the place of the real one
        report = importlib.import_module(f"{__package__}.report")
    except ImportError as exc:
        raise CLIError(f"{PROG} report: the report module is not available ({exc})") from None
    import contextlib
    import io

    # argparse in report.main prints a usage block before its error; keep the error line only
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = report.main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if code and lines and lines[0].startswith("usage:"):
            print(lines[-1], file=sys.stderr)
        else:
            sys.stderr.write(err.getvalue())
        return code
    sys.stderr.write(err.getvalue())
    return 0 if code is None else int(code)
