"""Options from a pattern builder's signature: ``sparseattn show NAME --n 5 --radius 1``.

:func:`build_pattern` turns the words after ``NAME`` into a call of the registered builder: each
parameter becomes an option (``--per-row``, also ``--per_row``), typed from its default, its annotation or
its numpydoc type. ``show`` and ``receptive`` share the rest of their command line (``NAME``, ``--global``,
``--png``, ``--help``) through ``_add_pattern_command`` and ``_pattern_from_args``.
"""

from __future__ import annotations

import argparse
import inspect
import re

from ._common import PROG, CLIError, _Parser, _split_words


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _auto_scalar(text):
    """Read a command-line word as int, float, bool/None literal, ``.npy`` file or string."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if low.endswith(".npy"):
        import numpy as np

        try:
            return np.load(text, allow_pickle=False)
        except OSError as exc:
            raise CLIError(f"could not read array file {text!r}: {exc}") from None
    return text


def _annotation_text(param):
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return ""
    text = ann.__name__ if isinstance(ann, type) else str(ann)
    return text.replace("typing.", "").lower()


def _doc_types(fn):
    """``{name: type text}`` from the numpydoc ``Parameters`` section (``n : int``, ``left, right : int``)."""
    doc = inspect.getdoc(fn) or ""
    lines = doc.splitlines()
    types, inside = {}, False
    for i, line in enumerate(lines):
        if line.strip() == "Parameters" and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            inside = True
            continue
        if inside:
            if i + 1 < len(lines) and line.strip() and set(lines[i + 1].strip()) == {"-"}:
                break  # the next section
            if line and not line[0].isspace() and " : " in line:
                names, _, kind = line.partition(" : ")
                for name in names.split(","):
                    types[name.strip()] = kind.strip().lower()
    return types


def _kind_from_text(text):
    text = text.lower()
    if not text or " or " in text or "|" in text.replace("| none", ""):
        return None  # a choice of types ("int or (int, int)"): read the words as they come
    if any(h in text for h in ("sequence", "list", "tuple", "iterable", "collection", "array", "range")):
        return "list"
    for kind in ("bool", "int", "float", "str"):
        if re.match(rf"^(optional\[)?{kind}\b", text):
            return kind
    return None


def _per_axis_choice(doc_type):
    """A numpydoc type such as ``int or tuple of int``: a scalar, or a sequence of them."""
    scalar, _, rest = doc_type.lower().partition(" or ")
    return scalar.strip() in ("int", "bool") and any(h in rest for h in ("tuple", "sequence", "list"))


def _kind_of(param, doc_type=""):
    """Classify a builder parameter as 'bool', 'list', 'int', 'float', 'str' or 'auto'.

    The default's type decides first, then the annotation, then the numpydoc type.
    """
    default = param.default
    if _per_axis_choice(doc_type):
        # "int or tuple of int" (one value, or one per axis): read one or several words
        return "bools" if isinstance(default, bool) else "auto"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (list, tuple, range)):
        return "list"
    for typ, kind in ((int, "int"), (float, "float"), (str, "str")):
        if isinstance(default, typ):
            return kind
    return _kind_from_text(_annotation_text(param)) or _kind_from_text(doc_type) or "auto"


def _convert(kind, name, values):
    """Turn the words given for ``--name`` into the value passed to the builder."""
    if kind == "bool":
        if values is True:
            return True
        word = str(values).lower()
        if word not in _BOOL_WORDS:
            raise CLIError(f"--{name} expects true or false, got {values!r}")
        return _BOOL_WORDS[word]
    if kind == "bools":  # alone: true; one word: that bool; several: a tuple (one per axis)
        flags = [_convert("bool", name, w) for w in _split_words(values)] or [True]
        return flags[0] if len(flags) == 1 else tuple(flags)
    values = [values] if isinstance(values, str) else list(values)
    if len(values) == 1 and values[0].strip()[:1] in ("[", "("):
        # a Python literal such as "[[1, 0], [1, 1]]" (nested lists: block layouts)
        import ast

        try:
            return ast.literal_eval(values[0].strip())
        except (ValueError, SyntaxError):
            raise CLIError(f"--{name}: could not read {values[0]!r} as a (nested) list of numbers") from None
    words = _split_words(values)
    if not words:
        if kind in ("list", "auto"):
            return []  # written as --name ''
        raise CLIError(f"--{name} needs a value")
    try:
        if kind == "list":
            return [_auto_scalar(w) for w in words]
        if len(words) > 1 and kind != "auto":
            raise CLIError(f"--{name} takes one value, got {len(words)}: {' '.join(words)}")
        if kind == "int":
            return int(words[0])
        if kind == "float":
            return float(words[0])
        if kind == "str":
            return words[0]
    except ValueError:
        raise CLIError(f"--{name} expects {'an integer' if kind == 'int' else 'a number'}, got {words[0]!r}") from None
    vals = [_auto_scalar(w) for w in words]
    return vals[0] if len(vals) == 1 else vals


def _builder_params(fn):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [
        p
        for p in sig.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
        or p.default is not inspect.Parameter.empty
    ]


_KIND_WORDS = {
    "bool": "true/false (alone: true)",
    "bools": "true/false, or one per axis (alone: true)",
    "list": "one or more values",
    "int": "an integer",
    "float": "a number",
    "str": "a word",
    "auto": "a value, or several for a list",
}


def _builder_parser(name, fn, command="show"):
    """An argparse parser with one ``--param`` option per parameter of the builder.

    Returns the parser, ``{param: kind}`` and the names of the required parameters.
    Each option is spelled ``--per-row``; ``--per_row`` is accepted too.
    """
    doc = inspect.getdoc(fn) or ""
    doc_types = _doc_types(fn)
    params = _builder_params(fn)
    kinds = {p.name: _kind_of(p, doc_types.get(p.name, "")) for p in params}
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    usage = [f"{PROG} {command} {name}"]
    for p in params:
        kind = kinds[p.name]
        metavar = "BOOL" if kind in ("bool", "bools") else p.name.upper()
        opt = f"--{p.name.replace('_', '-')} {metavar}{' ...' if kind in ('list', 'auto', 'bools') else ''}"
        usage.append(opt if p.name in required else f"[{opt}]")
    parser = _Parser(
        prog=f"{PROG} {command} {name}",
        usage=" ".join(usage),
        description=doc.split("\n\n")[0] if doc else None,
        add_help=False,
        allow_abbrev=False,
    )
    group = parser.add_argument_group(f"parameters of {name}")
    for p in params:
        kind = kinds[p.name]
        typed = doc_types.get(p.name) or _annotation_text(p)
        help_txt = f"{_KIND_WORDS[kind]}{' (' + typed + ')' if typed else ''}; " + (
            "required" if p.name in required else f"default: {p.default!r}"
        )
        spellings = [f"--{p.name.replace('_', '-')}"] + ([f"--{p.name}"] if "_" in p.name else [])
        for i, flag in enumerate(spellings):
            extra = {"help": help_txt if i == 0 else argparse.SUPPRESS, "dest": p.name, "default": None}
            if kind in ("bool", "bools"):
                nargs = "?" if kind == "bool" else "*"
                group.add_argument(flag, nargs=nargs, const=True if kind == "bool" else None, metavar="BOOL", **extra)
            else:
                group.add_argument(flag, nargs="+" if kind in ("list", "auto") else None, metavar=p.name.upper(), **extra)
    return parser, kinds, required


def _format_call(name, kwargs):
    def fmt(v):
        shape = getattr(v, "shape", None)
        if shape is not None and getattr(v, "ndim", 0) >= 1:
            return f"<array {tuple(shape)}>"
        return repr(v)

    return f"{name}(" + ", ".join(f"{k}={fmt(v)}" for k, v in kwargs.items()) + ")"


def build_pattern(name, words, global_indices=None, command="show"):
    """Build a registered pattern from command-line words.

    Parameters
    ----------
    name : str
        A name from :func:`sparseattn.patterns.available`.
    words : list of str
        Builder options such as ``["--n", "5", "--radius", "1"]``.
    global_indices : list of int, optional
        Tokens made global on top of the builder's pattern
        (``| global_tokens(n, global_indices)``).

    Returns
    -------
    pattern : Pattern or tuple of Pattern
        A tuple (one pattern per head) when the builder returns per-head patterns.
    description : str
        The call that built it, e.g. ``"sliding_window(n=5, radius=1)"``.

    Examples
    --------
    >>> from sparseattn.cli import build_pattern
    >>> p, text = build_pattern("sliding_window", ["--n", "5", "--left", "1", "--right", "0"])
    >>> text, p.nnz
    ('sliding_window(n=5, left=1, right=0)', 9)
    """
    from .. import patterns

    try:
        fn = patterns.get(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    parser, kinds, required = _builder_parser(name, fn, command)
    ns, extra = parser.parse_known_args(words)
    if extra:
        known = ", ".join(f"--{k.replace('_', '-')}" for k in kinds) or "(none)"
        raise CLIError(f"{name}: unrecognized argument(s) {' '.join(extra)}; its parameters are {known}")
    missing = [f"--{k.replace('_', '-')}" for k in required if getattr(ns, k) is None]
    if missing:
        raise CLIError(f"{PROG} {command} {name}: missing required parameter(s) {', '.join(missing)} (see '{PROG} {command} {name} --help')")
    kwargs = {}
    for pname, kind in kinds.items():
        value = getattr(ns, pname)
        if value is None:
            continue
        kwargs[pname] = _convert(kind, pname, value)
    text = _format_call(name, kwargs)
    try:
        result = fn(**kwargs)
    except (ValueError, TypeError) as exc:
        raise CLIError(f"{text}: {exc}") from None
    from ..patterns import as_pattern

    per_head = isinstance(result, (list, tuple))
    try:
        heads = [as_pattern(p, f"the result of {name}") for p in (result if per_head else [result])]
    except TypeError as exc:
        raise CLIError(str(exc)) from None
    if not heads:
        raise CLIError(f"{text} returned no patterns")
    if global_indices:
        n_q, n_k = heads[0].shape
        if n_q != n_k:
            raise CLIError(f"--global needs a square pattern, but {text} has shape {heads[0].shape}")
        try:
            g = patterns.global_tokens(n_q, global_indices)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--global {' '.join(map(str, global_indices))}: {exc}") from None
        heads = [p | g for p in heads]
        text += f" | global_tokens(n={n_q}, indices={list(global_indices)})"
    return (tuple(heads) if per_head else heads[0]), text


def _parse_globals(values):
    if not values:
        return None
    out = []
    for w in _split_words(values):
        try:
            out.append(int(w))
        except ValueError:
            raise CLIError(f"--global expects token indices (integers), got {w!r}") from None
    return out


def _available():
    from .. import patterns

    return patterns.available()


def _builder_help(name, command, out):
    """Print the parameters of builder ``name`` (used by ``show NAME --help``)."""
    from .. import patterns

    try:
        fn = patterns.get(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    parser = _builder_parser(name, fn, command)[0]
    print(file=out)
    print(parser.format_help().rstrip("\n"), file=out)


def _pattern_from_args(args, words, out):
    """``show``/``receptive``: print help and return None, or build the named pattern."""
    if args.help:
        args.parser.print_help(out)
        if args.name:
            _builder_help(args.name, args.command, out)
        return None
    if not args.name:
        raise CLIError(f"{PROG} {args.command}: missing the builder NAME; known builders: {', '.join(_available())}")
    return build_pattern(args.name, words, _parse_globals(args.global_), args.command)


def _add_pattern_command(sub, name, text):
    """The subparser of ``show`` or ``receptive``: ``NAME``, ``--global``, ``--png`` and ``--help``.

    The command adds its own options, then ``set_defaults(func=..., parser=p)``.
    """
    p = sub.add_parser(
        name,
        help=text,
        description=(
            f"{text[0].upper() + text[1:]}. The builder's parameters become options (--radius 1, "
            f"--per-row 3), read from its signature and docstring; a list is several values or "
            f"comma-separated ones. Run '{PROG} {name} NAME --help' to list them."
        ),
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: the builder's parameters too)")
    p.add_argument("name", nargs="?", metavar="NAME", help="a registered builder, e.g. sliding_window, longformer")
    p.add_argument(
        "--global", dest="global_", nargs="+", action="extend", metavar="IDX", help="also make these tokens global"
    )
    p.add_argument("--png", metavar="FILE", help="write a plot to FILE (needs matplotlib)")
    return p
