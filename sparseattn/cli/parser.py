"""The ``sparseattn`` parser: the top-level options and one subparser per subcommand module.

Each subcommand module registers its own subparser (``add_parser``) with the function that runs it; this
module only fixes their order in ``sparseattn --help``. Only :mod:`sparseattn.cli` imports it.
"""

from __future__ import annotations

from . import delegated, demo, hf_demo, receptive, show, warmup
from ._common import PROG, _Parser, _version


def _make_parser():
    parser = _Parser(
        prog=PROG,
        description="Sparse (Longformer-style) attention on the CPU: demo, pattern rendering, receptive fields, reports.",
        allow_abbrev=False,
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors (for debugging)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    demo.add_parser(sub)
    show.add_parser(sub)
    receptive.add_parser(sub)
    warmup.add_parser(sub)
    hf_demo.add_parser(sub)
    delegated.add_parsers(sub)
    return parser
