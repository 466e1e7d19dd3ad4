"""The ``sparseattn`` command line: ``demo``, ``show``, ``receptive``, ``warmup`` and ``report``.

Run ``sparseattn --help`` (or ``python -m sparseattn --help``) for the list of
subcommands and ``sparseattn SUBCOMMAND --help`` for each one's options.

``show`` and ``receptive`` work with every registered pattern builder, including
third-party ones: the builder's parameters become command-line options, read
from its signature (``--n 5 --radius 1``; lists as ``--indices 0 7`` or
``--indices 0,7``; nested lists as ``--layout "[[1, 0], [1, 1]]"`` or a ``.npy`` file).

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

import argparse
import inspect
import re
import sys
import time

__all__ = ["main", "build_pattern", "CLIError"]

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


# --------------------------------------------------------------------------------------------
# builder parameters from signatures
# --------------------------------------------------------------------------------------------

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


def _split_words(values):
    out = []
    for v in values:
        out.extend(w for w in v.split(",") if w != "")
    return out


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


def _kind_of(param, doc_type=""):
    """Classify a builder parameter as 'bool', 'list', 'int', 'float', 'str' or 'auto'.

    The default's type decides first, then the annotation, then the numpydoc type.
    """
    default = param.default
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
        metavar = "BOOL" if kind == "bool" else p.name.upper()
        opt = f"--{p.name.replace('_', '-')} {metavar}{' ...' if kind in ('list', 'auto') else ''}"
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
            if kind == "bool":
                group.add_argument(flag, nargs="?", const=True, metavar="BOOL", **extra)
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


def _heads(pattern):
    return list(pattern) if isinstance(pattern, tuple) else [pattern]


def _png_paths(path, count):
    """``FILE`` for one pattern; ``STEM_head0.EXT``, ``STEM_head1.EXT``, ... for per-head patterns."""
    if count == 1:
        return [path]
    import os

    stem, ext = os.path.splitext(path)
    return [f"{stem}_head{h}{ext or '.png'}" for h in range(count)]


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


def _summary(pattern):
    return f"shape {pattern.shape}, nnz {pattern.nnz:,}, density {pattern.density:.3g}"


# --------------------------------------------------------------------------------------------
# show / receptive
# --------------------------------------------------------------------------------------------


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


def _available():
    from .. import patterns

    return patterns.available()


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def _fmt_time(seconds):
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _fmt_bytes(nbytes):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def _qa_pattern(n, radius, question):
    from ..patterns import global_tokens, sliding_window

    p = sliding_window(n, radius)
    if question:
        p = p | global_tokens(n, range(question))
    return p


def _synthetic_document(n, heads, d, question, seed, dtype):
    """Queries, keys and values of a synthetic long document.

    Token ids come from a seeded generator over a small vocabulary; the question
    (the first ``question`` tokens) is repeated once inside the document, as the
    "answer" passage.  Embeddings plus sinusoidal positions are projected per head.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab, width = 1000, 128
    ids = rng.integers(0, vocab, size=n)
    if question and n >= 3 * question:
        at = int(rng.integers(2 * question, n - question + 1))
        ids[at : at + question] = ids[:question]
    table = rng.standard_normal((vocab, width))
    pos = np.arange(n)[:, None] / (10000.0 ** (np.arange(0, width, 2) / width))[None, :]
    x = table[ids]
    x[:, 0::2] += np.sin(pos)
    x[:, 1::2] += np.cos(pos)
    x /= np.sqrt(2.0)
    x = x.astype(dtype)
    w = (rng.standard_normal((3, heads, width, d)) / np.sqrt(width)).astype(dtype)
    q, k, v = (np.matmul(x, w[i]) for i in range(3))  # (heads, n, d) each
    return q, k, v


def _dense_all_heads_attention(q, k, v, mask, scale):
    """Dense masked attention in the working precision, every head's full score grid at once.

    The demo's dense baseline: what a straightforward dense implementation costs in
    time and memory (``heads x n x n`` scores).  The benchmarks' ``dense-numpy``
    is a different baseline: head by head in row blocks, so its memory stays bounded.
    """
    import numpy as np

    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s *= s.dtype.type(scale)
    np.copyto(s, s.dtype.type(-np.inf), where=~mask)
    m = s.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0
    s -= m
    np.exp(s, out=s)
    tot = s.sum(axis=-1, keepdims=True)
    tot[tot == 0] = 1
    s /= tot
    return np.matmul(s, v)


def _peak_memory(fn):
    """``(result, seconds, peak bytes)`` of one call of ``fn``.

    The peak is the larger of tracemalloc's peak (NumPy's allocations) and, on
    Linux, the growth of the resident set's high-water mark (reset through
    ``/proc/self/clear_refs``), which also sees Numba's own allocations.
    """
    import gc
    import tracemalloc

    from .._memory import status_kib

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss0 = status_kib("VmRSS")
    except OSError:
        rss0 = None
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    hwm = status_kib("VmHWM")
    if rss0 is not None and hwm is not None:
        peak = max(peak, (hwm - rss0) * 1024)
    return result, seconds, peak


def _best_time(fn, repeat, budget=2.0):
    times = []
    t_start = time.perf_counter()
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget:
            break
    return min(times), len(times)


def _cmd_demo(args, words, out):
    import numpy as np

    n, radius, question, heads, d = args.n, args.radius, args.question, args.heads, args.d
    for name, value, low in (("--n", n, 2), ("--radius", radius, 0), ("--question", question, 0), ("--heads", heads, 1), ("--d", d, 1)):
        if value < low:
            raise CLIError(f"{PROG} demo: {name} must be >= {low}, got {value}")
    if question >= n:
        raise CLIError(f"{PROG} demo: --question ({question}) must be smaller than --n ({n})")
    if args.dense_n < 2:
        raise CLIError(f"{PROG} demo: --dense-n must be >= 2, got {args.dense_n}")
    if args.check_rows < 1:
        raise CLIError(f"{PROG} demo: --check-rows must be >= 1, got {args.check_rows}")
    dtype = np.dtype(args.dtype)

    import sparseattn
    from ..reference import dense_attention

    pattern = _qa_pattern(n, radius, question)
    print("sparseattn demo: question answering on a synthetic long document", file=out)
    print(
        f"  n = {n} tokens; the first {question} are the question (global); local radius {radius} per side "
        f"(Hugging Face attention_window = {2 * radius})",
        file=out,
    )
    print(f"  {heads} heads, d = {d}, {dtype.name}, seed {args.seed}", file=out)
    print(file=out)
    print(f"pattern: sliding_window(n={n}, radius={radius}) | global_tokens(n={n}, indices=range({question}))", file=out)
    print(f"  {_summary(pattern)}", file=out)

    n_small = 12
    r_small, q_small = min(radius, 2), min(question, 2)
    print(file=out)
    print(f"the same pattern at {n_small} tokens (radius {r_small}, {q_small} question tokens):", file=out)
    print(_qa_pattern(n_small, r_small, q_small).to_string(), file=out)

    q, k, v = _synthetic_document(n, heads, d, question, args.seed, dtype)
    scale = 1.0 / np.sqrt(d)

    t0 = time.perf_counter()
    pattern.csr  # built once and cached on the pattern
    t_csr = time.perf_counter() - t0

    def run():
        return sparseattn.sparse_attention(q, k, v, pattern, path=args.path)

    from ..engine import coldstart as _coldstart

    t0 = time.perf_counter()
    result = run()  # the untimed warm-up: compiles (or loads) the kernels and builds the tile plan
    t_first = time.perf_counter() - t0
    background = _coldstart.compiling()
    if background:  # the first call ran on the blocked path: time the fused kernels, not the stopgap
        _coldstart.wait()
        t_compiled = max(s for s, _, _ in _coldstart.status().values())
        run()  # builds the tile plan
    t_sparse, reps = _best_time(run, args.repeat)
    _, _, mem_sparse = _peak_memory(run)
    flops = 4.0 * pattern.nnz * d * heads
    print(file=out)
    print(f"sparse_attention (path={args.path!r}):", file=out)
    print(f"  pattern CSR built in {_fmt_time(t_csr)} (once; cached on the pattern)", file=out)
    if background:
        print(
            f"  first call {_fmt_time(t_first)} on the blocked path (NumPy/BLAS) while the fused kernels compiled in a "
            f"background thread; they were ready {_fmt_time(t_compiled)} after that call started (once per "
            f"environment: they are now in Numba's cache)",
            file=out,
        )
    else:
        print(
            f"  first call {_fmt_time(t_first)}, of which ~{_fmt_time(max(t_first - t_sparse, 0.0))} is one-time "
            f"work: Numba compilation (or loading compiled kernels from its disk cache) and the tile plan",
            file=out,
        )
    print(
        f"  steady state at n = {n}: {_fmt_time(t_sparse)} (best of {reps}), peak memory {_fmt_bytes(mem_sparse)} "
        f"(output {_fmt_bytes(result.nbytes)} included), {flops / t_sparse / 1e9:.1f} GFLOP/s of useful work",
        file=out,
    )

    # dense attention: measure where it fits, extrapolate quadratically
    n_m = min(n, args.dense_n)
    q_m = min(question, n_m - 1)
    mask = _qa_pattern(n_m, radius, q_m).to_dense(max_elements=max(1 << 26, n_m * n_m))
    qm, km, vm = q[:, :n_m].copy(), k[:, :n_m].copy(), v[:, :n_m].copy()
    _, t_dense, mem_dense = _peak_memory(lambda: _dense_all_heads_attention(qm, km, vm, mask, scale))
    if args.repeat > 1:
        t_more, _ = _best_time(lambda: _dense_all_heads_attention(qm, km, vm, mask, scale), args.repeat - 1)
        t_dense = min(t_dense, t_more)
    mem_dense += mask.nbytes
    factor = (n / n_m) ** 2
    print(file=out)
    print(
        f"dense attention (NumPy, {dtype.name}, boolean mask, all {heads} head{'s' if heads > 1 else ''}' n x n scores at once; "
        f"the benchmarks' dense-numpy goes head by head in row blocks instead):",
        file=out,
    )
    print(f"  measured at n = {n_m}: {_fmt_time(t_dense)}, peak memory {_fmt_bytes(mem_dense)} (mask included)", file=out)
    if n_m < n:
        print(
            f"  extrapolated to n = {n} (x{factor:.0f}, quadratic): {_fmt_time(t_dense * factor)}, "
            f"{_fmt_bytes(mem_dense * factor)}  [extrapolated, not measured]",
            file=out,
        )
    t_dense_n = t_dense * factor
    print(file=out)
    note = " (dense extrapolated)" if n_m < n else ""
    print(f"sparse vs dense at n = {n}{note}:", file=out)
    print(f"  time   {_fmt_time(t_sparse):>10} vs {_fmt_time(t_dense_n):>10}   {t_dense_n / t_sparse:.1f}x faster", file=out)
    print(
        f"  memory {_fmt_bytes(mem_sparse):>10} vs {_fmt_bytes(mem_dense * factor):>10}   "
        f"{mem_dense * factor / max(mem_sparse, 1):.1f}x less",
        file=out,
    )

    # correctness on row slices: float64 dense reference restricted to those rows
    rows = min(args.check_rows, n)
    mid = max(0, min(n - rows, n // 2 - rows // 2))
    slices = [(0, rows)] if mid < rows else [(0, rows), (mid, mid + rows)]
    diff, peak = 0.0, 0.0
    for s, e in slices:
        sub = pattern.rows(s, e)
        # keys that no row of the slice may see cannot change its result: leave them out
        cols = np.unique(sub.indices)
        sub = sub[:, cols]
        for h in range(heads):
            ref = dense_attention(q[h, s:e], k[h, cols], v[h, cols], sub)
            diff = max(diff, float(np.max(np.abs(result[h, s:e] - ref))))
            peak = max(peak, float(np.max(np.abs(ref))))
    where = " and ".join(f"[{s}, {e})" for s, e in slices)
    print(file=out)
    print(f"check against sparseattn.reference.dense_attention (float64), rows {where} of every head:", file=out)
    print(f"  max |difference| = {diff:.2e}   (max |output| = {peak:.3g})", file=out)
    return 0


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _warm_analysis():
    from ..analysis import layers_to_cover, receptive_field
    from ..patterns import causal, sliding_window

    receptive_field(sliding_window(200, 4), 3, return_sets=True)
    layers_to_cover(causal(20))  # the full-product branch (tokens without their diagonal are fine too)


def _cmd_warmup(args, words, out):
    from ..engine.warmup import warmup

    warmup(out, extra=[("receptive-field bitsets", _warm_analysis)])
    return 0


def _cmd_report(argv):
    try:
        from . import report
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


# --------------------------------------------------------------------------------------------
# the parser and main
# --------------------------------------------------------------------------------------------


def _version():
    from .. import __version__

    return __version__


def _make_parser():
    parser = _Parser(
        prog=PROG,
        description="Sparse (Longformer-style) attention on the CPU: demo, pattern rendering, receptive fields, reports.",
        allow_abbrev=False,
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors (for debugging)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="the question-answering setting on a synthetic long document: pattern, timings, check",
        description=(
            "Builds the Longformer QA pattern (a band of --radius tokens per side plus the first --question "
            "tokens as global tokens) for a synthetic document of --n tokens, times sparse_attention, "
            "measures dense attention at --dense-n tokens and extrapolates it quadratically, and checks the "
            "result against the float64 dense reference on row slices."
        ),
        allow_abbrev=False,
    )
    demo.add_argument("--n", type=int, default=16384, help="document length in tokens (default: 16384)")
    demo.add_argument("--radius", type=int, default=256, help="local window radius per side (default: 256)")
    demo.add_argument("--question", type=int, default=32, help="leading question tokens made global (default: 32)")
    demo.add_argument("--heads", type=int, default=12, help="attention heads (default: 12)")
    demo.add_argument("--d", type=int, default=64, help="head dimension (default: 64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic document (default: 0)")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="working precision (default: float32)")
    demo.add_argument("--path", choices=("auto", "fused", "staged", "blocked"), default="auto", help="engine path (default: auto)")
    demo.add_argument("--repeat", type=int, default=3, help="timed repetitions, best is reported (default: 3)")
    demo.add_argument("--dense-n", type=int, default=2048, help="size at which dense attention is measured (default: 2048)")
    demo.add_argument("--check-rows", type=int, default=256, help="rows per slice checked against the reference (default: 256)")
    demo.set_defaults(func=_cmd_demo)

    for name, func, text in (
        ("show", _cmd_show, "print (or plot) any registered pattern builder"),
        ("receptive", _cmd_receptive, "receptive-field coverage of a pattern after stacked layers"),
    ):
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
        if name == "show":
            p.add_argument("--max-size", type=int, default=64, help="largest pattern side printed as text (default: 64)")
        else:
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
        p.set_defaults(func=func, parser=p)

    warm = sub.add_parser(
        "warmup",
        help="compile every Numba kernel into Numba's cache (for container images and CI)",
        description=(
            "Runs one small call of every path with its own kernels (fused and staged forward, return_weights, "
            "both backward paths, the pattern planner, receptive-field analysis; float32 and float64) so that "
            "their compiled code lands in Numba's on-disk cache (NUMBA_CACHE_DIR when set). Prints a line per "
            "kernel compiled; a second run finds everything in the cache."
        ),
        allow_abbrev=False,
    )
    warm.set_defaults(func=_cmd_warmup)

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
    return parser


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
            from ..dask.demo import main as dask_demo

            return dask_demo(rest[1:])
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


def _one_line(exc):
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
