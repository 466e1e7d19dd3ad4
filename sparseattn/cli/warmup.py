"""``sparseattn warmup``: compile every Numba kernel into Numba's cache (for container images and CI)."""

from __future__ import annotations


def add_parser(sub):
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


def _warm_analysis():
    from ..analysis import layers_to_cover, receptive_field
    from ..patterns import causal, sliding_window

    receptive_field(sliding_window(200, 4), 3, return_sets=True)
    layers_to_cover(causal(20))  # the full-product branch (tokens without their diagonal are fine too)


def _cmd_warmup(args, words, out):
    from ..engine.warmup import warmup

    warmup(out, extra=[("receptive-field bitsets", _warm_analysis)])
    return 0
