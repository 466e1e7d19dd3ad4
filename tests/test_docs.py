"""The docs site builds without warnings, the code in the guides runs, the API page's summaries name real
signatures, and the shell sessions the docs show print what they say.

Python examples in ``docs/*.md`` are doctests (``--doctest-glob='*.md'`` in pyproject.toml). Shell
examples that show output are checked here, by this convention:

- A shell session is a fenced code block tagged ``console`` (any fenced block whose first line starts
  with ``$ `` counts as one too, whatever its tag, so that no shown output goes unchecked). It lives in
  ``README.md`` or in ``docs/**/*.md``.
- A line starting with ``$ `` is a command; the lines after it, up to the next ``$ `` line or the end of
  the block, are its expected output (stdout). The command must be ``sparseattn ...`` (or
  ``python3 -m sparseattn ...``); it runs in-process through ``sparseattn.cli.main`` in an empty
  temporary directory, and must exit with status 0.
- The output is compared line by line after stripping trailing whitespace, with doctest's ELLIPSIS:
  ``...`` in the shown output stands for any text, including several lines. Mark timings and other
  machine-dependent numbers that way (e.g. ``first call ... s``).

Sessions whose commands are slow are collected but skipped, with the reason in the skip message:

- ``sparseattn demo`` without ``--n`` (16,384 tokens and a dense baseline: tens of seconds even with a
  warm Numba cache, minutes with an empty one; its timings are machine-dependent anyway);
- ``sparseattn dask-demo`` (a million tokens on a local cluster of worker processes: tens of seconds,
  and it needs the ``dask`` extra);
- ``sparseattn warmup`` (compiles every kernel: minutes with an empty cache, and what it prints depends
  on what the cache already holds).

Commands that write a plot (``--png``) are skipped when matplotlib is missing.
"""

import contextlib
import doctest
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SLOW = {
    "dask-demo": "a million tokens on a local Dask cluster of worker processes (tens of seconds; needs the dask extra)",
    "warmup": "compiles every kernel (minutes with an empty Numba cache; the output depends on the cache)",
}
DEMO_FULL_SIZE = "the full-size demo (16,384 tokens plus a dense baseline: tens of seconds warm, minutes cold)"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")


def doc_pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(text):
    """``(first_line_number, info, lines)`` of each fenced code block of a markdown text."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        yield i + 2, m["info"].strip(), body
        i = j + 1


def sessions(text):
    """``(line_number, command, expected_output)`` of every command in the shell sessions of a markdown text."""
    for first, info, body in fenced_blocks(text):
        is_session = info.split()[:1] == ["console"] or (body and body[0].startswith("$ "))
        if not is_session:
            continue
        command = None
        for offset, line in enumerate(body):
            if line.startswith("$ "):
                if command is not None:
                    yield command
                command = (first + offset, line[2:].strip(), [])
            elif command is None:
                raise ValueError(f"line {first + offset}: a console block must start with a '$ ' command")
            else:
                command[2].append(line)
        if command is not None:
            yield command


def collect():
    found = []
    for page in doc_pages():
        rel = page.relative_to(ROOT).as_posix()
        for line, command, expected in sessions(page.read_text(encoding="utf-8")):
            found.append(pytest.param(rel, line, command, "\n".join(expected), id=f"{rel}:{line}"))
    return found


SESSIONS = collect()


def sparseattn_argv(command):
    """The arguments after the program name, or None when the command is not a sparseattn command."""
    words = shlex.split(command)
    if words[:1] == ["sparseattn"]:
        return words[1:]
    if len(words) >= 3 and re.fullmatch(r"python(3(\.\d+)?)?", words[0]) and words[1:3] == ["-m", "sparseattn"]:
        return words[3:]
    return None


def skip_reason(argv):
    command = argv[0] if argv else ""
    if command in SLOW:
        return SLOW[command]
    if command == "demo" and not any(a == "--n" or a.startswith("--n=") for a in argv):
        return DEMO_FULL_SIZE
    return None


def normalise(text):
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def output_matches(expected, got):
    """Whether ``got`` is what the docs show, with doctest's ELLIPSIS (``...`` matches any text)."""
    return doctest.OutputChecker().check_output(normalise(expected), normalise(got), doctest.ELLIPSIS)


def run_cli(argv):
    """``(exit status, stdout, stderr)`` of ``sparseattn.cli.main(argv)`` run in this process."""
    from sparseattn.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "gallery" / "index.html").exists() or (tmp_path / "site" / "gallery.html").exists()


@pytest.mark.parametrize("page", ["quickstart.md", "concepts.md"])
def test_python_blocks_in_guides_run(page):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.DOTALL)
    assert blocks, f"docs/{page} has no python blocks"
    ns = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), ns)


OPTIONAL = {"torch", "transformers", "dask", "distributed", "matplotlib", "safetensors"}


def test_api_page_summaries_match_the_code():
    """docs/api.md lists each name as ``- `sparseattn.X(signature)`: ...``; the name must exist with that signature."""
    import importlib
    import inspect

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    entries = re.findall(r"^- `(sparseattn[\w.]*)(\([^`]*\))?`", text, re.MULTILINE)
    assert len(entries) > 40, "docs/api.md lost its summaries"
    wrong = []
    for path, shown in entries:
        module, _, name = path.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in OPTIONAL:
                continue  # an extra that is not installed
            raise
        except AttributeError:
            wrong.append(f"{path}: no such name")
            continue
        if shown:
            params = [p for p in inspect.signature(obj).parameters.values() if not p.name.startswith("_")]
            real = str(inspect.Signature(params))
            if real != shown:
                wrong.append(f"{path}{shown}: the code says {path}{real}")
    assert not wrong, "\n".join(wrong)


def test_the_guides_have_console_sessions():
    pages = {p.values[0] for p in SESSIONS}
    assert {"README.md", "docs/concepts.md", "docs/quickstart.md"} <= pages, pages


@pytest.mark.parametrize("page, line, command, expected", SESSIONS)
def test_console_session_output(page, line, command, expected, tmp_path, monkeypatch):
    argv = sparseattn_argv(command)
    where = f"{page}:{line}: $ {command}"
    if argv is None:
        pytest.fail(f"{where}: console blocks are checked sessions of the sparseattn command; "
                    "show other shell commands in a ```sh or ```text block")
    reason = skip_reason(argv)
    if reason:
        pytest.skip(f"{where}: {reason}")
    if any(a == "--png" or a.startswith("--png=") for a in argv):
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    status, got, err = run_cli(argv)
    assert status == 0, f"{where}: exit status {status}\n{err}"
    assert output_matches(expected, got), (
        f"{where}: the output differs from the docs\n--- shown in the docs\n{normalise(expected)}"
        f"--- printed now\n{normalise(got)}"
    )


# -- the checker itself -------------------------------------------------------------------------------

SAMPLE = """\
Some text.

```console
$ sparseattn show sliding_window --n 3 --radius 1
sliding_window(n=3, radius=1)
shape (3, 3), nnz 7, density 0.778
$ sparseattn --version
sparseattn ...
```

```text
$ sparseattn warmup
...
```

```sh
sparseattn show causal --n 4
```
"""


def test_sessions_are_parsed_by_the_convention():
    found = list(sessions(SAMPLE))
    assert [(c, e) for _, c, e in found] == [
        ("sparseattn show sliding_window --n 3 --radius 1",
         ["sliding_window(n=3, radius=1)", "shape (3, 3), nnz 7, density 0.778"]),
        ("sparseattn --version", ["sparseattn ..."]),
        ("sparseattn warmup", ["..."]),
    ]
    assert found[0][0] == 4
    assert sparseattn_argv("python3 -m sparseattn demo --n 2048") == ["demo", "--n", "2048"]
    assert sparseattn_argv("pip install .") is None
    assert skip_reason(["demo"]) and not skip_reason(["demo", "--n", "2048"])
    assert skip_reason(["warmup"]) and skip_reason(["dask-demo"]) and not skip_reason(["show", "causal"])


def test_a_wrong_output_fails():
    """The comparison can fail: a changed number, a missing line, or output where the docs show none."""
    status, got, _ = run_cli(["show", "sliding_window", "--n", "3", "--radius", "1"])
    assert status == 0
    assert output_matches(got, got)
    assert output_matches(got.replace("nnz 7", "nnz ..."), got)
    assert not output_matches(got.replace("nnz 7", "nnz 8"), got)
    assert not output_matches("\n".join(got.splitlines()[:-1]), got)
    assert not output_matches("", got)
    assert not output_matches(got + "an extra line\n", got)
