"""A named registry of pattern builders, extensible through entry points.

Third-party packages register builders under the entry-point group
``sparseattn.patterns``; each entry point names a callable builder, registered
under the entry point's name the first time the registry is read.
"""

from __future__ import annotations

__all__ = ["register_pattern", "get", "available", "examples"]

ENTRY_POINT_GROUP = "sparseattn.patterns"

_BUILDERS = {}
_EXAMPLES = {}
_entry_points_loaded = False


def register_pattern(name, *, examples=()):
    """Register a builder under ``name``.

    Parameters
    ----------
    name : str
        The registry name (used by :func:`get` and the ``sparseattn show`` CLI).
    examples : sequence of dict
        Small keyword-argument sets the pattern test suite builds this builder
        with; every registered builder runs the whole suite on them.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_pattern: name must be an identifier string, got {name!r}")

    def deco(fn):
        if not callable(fn):
            raise TypeError(f"register_pattern({name!r}) decorates a callable, got {type(fn).__name__}")
        _BUILDERS[name] = fn
        _EXAMPLES[name] = [dict(e) for e in examples]
        return fn

    return deco


def _load_entry_points():
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILDERS:
            continue
        try:
            fn = ep.load()
        except Exception as exc:  # a broken plugin must not break the registry
            import warnings

            warnings.warn(f"sparseattn: could not load pattern builder {ep.name!r} ({ep.value}): {exc}")
            continue
        _BUILDERS[ep.name] = fn
        _EXAMPLES.setdefault(ep.name, list(getattr(fn, "sparseattn_examples", ())))


def available():
    """Sorted names of all registered builders (built-in and entry points)."""
    _load_entry_points()
    return sorted(_BUILDERS)


def get(name):
    """The builder registered as ``name``; ``ValueError`` listing the known names otherwise."""
    _load_entry_points()
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"unknown pattern builder {name!r}; known builders: {', '.join(sorted(_BUILDERS))}"
        ) from None


def examples(name):
    """The example keyword sets registered with ``name`` (used by the test suite)."""
    get(name)
    return [dict(e) for e in _EXAMPLES.get(name, [])]
