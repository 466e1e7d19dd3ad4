"""What every subcommand shares: the program name, :class:`CLIError`, the argparse parser class, small helpers.

This module imports no other module of :mod:`sparseattn.cli`: the subcommand modules import from it, and
:mod:`sparseattn.cli` re-exports :class:`CLIError`.
"""

from __future__ import annotations

import argparse


PROG = "sparseattn"


class CLIError(Exception):
    """A user error on the command line: printed as one line, exit status 2."""


class _Formatter(argparse.HelpFormatter):
    """Shows ``--indices INDICES ...`` instead of ``--indices INDICES [INDICES ...]``."""

    def _format_args(self, action, default_metavar):
        if action.nargs == "+":
            return "%s ..." % self._metavar_formatter(action, default_metavar)(1)
        return super()._format_args(action, default_metavar)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage block) through :class:`CLIError`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        where = "" if self.prog == PROG else f"{self.prog}: "  # main() already starts the line with PROG
        raise CLIError(f"{where}{message} (see '{self.prog} --help')")


def _split_words(values):
    out = []
    for v in values:
        out.extend(w for w in v.split(",") if w != "")
    return out


def _heads(pattern):
    return list(pattern) if isinstance(pattern, tuple) else [pattern]


def _png_paths(path, count):
    """``FILE`` for one pattern; ``STEM_head0.EXT``, ``STEM_head1.EXT``, ... for per-head patterns."""
    if count == 1:
        return [path]
    import os

    stem, ext = os.path.splitext(path)
    return [f"{stem}_head{h}{ext or '.png'}" for h in range(count)]


def _summary(pattern):
    return f"shape {pattern.shape}, nnz {pattern.nnz:,}, density {pattern.density:.3g}"


def _version():
    from .. import __version__

    return __version__


def _one_line(exc):
    return " ".join(str(exc).split())
