"""Write the patterns gallery: docs/gallery/*.png and docs/gallery.md.

One image per registered pattern builder (built-in builders and presets),
plus the seed notes' two 5-token grids, a dilated window, receptive-field
plots, and the text grids of the run builders (checked as doctests).  Run
from the repository root::

    python docs/gallery.py

Images are deterministic for a given matplotlib version (seeded builders).
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np

import sparseattn as sa
import sparseattn.patterns.presets  # noqa: F401  (registers the presets)
from sparseattn.patterns import registry
from sparseattn.viz import plot_pattern, plot_receptive_field

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gallery")

# Parameters shown for each registered builder (large enough to see the structure).
SHOWN = {
    "sliding_window": dict(n=256, radius=16),
    "causal": dict(n=256, radius=32),
    "global_tokens": dict(n=256, indices=[0, 64, 255]),
    "longformer": dict(n=512, attention_window=64, global_indices=[0, 1]),
    "random_pattern": dict(n_q=128, n_k=128, per_row=8, seed=0),
    "bigbird": dict(n=512, block_size=16, num_random_blocks=3, seed=0),
    "strided": dict(n=256, stride=16),
    "fixed": dict(n=256, block=32, num_summary=4),
    "block_sparse": dict(
        layout=(np.add.outer(np.arange(16), -np.arange(16)) % 5 == 0) | np.eye(16, dtype=bool), block_size=16
    ),
    "full": dict(n=64),
    "documents": dict(lengths=[40, 100, 24, 60, 32]),
    "from_cu_seqlens": dict(cu_seqlens=[0, 40, 140, 164, 224, 256]),
    "from_position_ids": dict(position_ids=np.concatenate([np.arange(m) for m in (40, 100, 24, 60, 32)])),
    "prefix_lm": dict(n=256, prefix=64),
    "neighborhood": dict(shape=(16, 16), kernel_size=5),
    "from_indices": dict(  # top-16 keys per query among the earlier ones (a causal indexer's choice)
        indices=(np.random.default_rng(0).random((256, 16)) * np.arange(1, 257)[:, None]).astype(np.int64), n_k=256
    ),
}


def document_causal(i, j):
    """A FlexAttention-style mask_mod in NumPy: documents of 64 tokens, causal inside each."""
    return (i // 64 == j // 64) & (j <= i)


SHOWN["from_predicate"] = dict(fn=document_causal, n_q=256, n_k=256)

# The text section on the run builders: its grids are doctests (pytest --doctest-glob='*.md').
RUNS_SECTION = """\
## Patterns as runs

Builders whose rows are runs of keys, with the spelling of the same mask in FlexAttention (a `mask_mod`),
NATTEN and FlashAttention's varlen interface beside the sparseattn one. The grids are `to_string()` of a tiny
case (rows are queries, columns keys) and are checked as doctests.

Today all of them compile to CSR: a builder produces the canonical CSR of any row range and the engine plans
that, entry by entry, like every other pattern. The run-length planning of the issue "Patterns as runs" (plans
that keep a row as a few runs of keys) is not built yet.

### `full`

Every query sees every key (FlexAttention: no `mask_mod`; FlashAttention: `causal=False`).

```text
>>> import numpy as np, sparseattn as sa
>>> print(sa.full(3).to_string())
    T1 T2 T3
T1  *  *  *
T2  *  *  *
T3  *  *  *

```

### `documents`, `from_cu_seqlens`, `from_position_ids`

Packed documents, each attending within itself. The same pattern from document lengths, from FlashAttention's
varlen boundaries (`flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, ...)`) and from the
`position_ids` of transformers' `DataCollatorWithFlattening`; `causal=True` in FlashAttention is `& causal(n)`
here. In FlexAttention: `mask_mod = lambda b, h, q_idx, kv_idx: doc_id[q_idx] == doc_id[kv_idx]`.

```text
>>> print(sa.from_cu_seqlens([0, 2, 5, 6]).to_string())
    T1 T2 T3 T4 T5 T6
T1  *  *
T2  *  *
T3        *  *  *
T4        *  *  *
T5        *  *  *
T6                 *
>>> sa.documents([2, 3, 1]) == sa.from_cu_seqlens([0, 2, 5, 6]) == sa.from_position_ids([0, 1, 0, 1, 2, 0])
True
>>> print((sa.from_position_ids([0, 1, 0, 1, 2, 0]) & sa.causal(6)).to_string())
    T1 T2 T3 T4 T5 T6
T1  *
T2  *  *
T3        *
T4        *  *
T5        *  *  *
T6                 *

```

### `prefix_lm`

Bidirectional over the prefix, causal after (FlexAttention: `mask_mod = lambda b, h, q_idx, kv_idx:
(kv_idx <= q_idx) | (kv_idx < prefix)`).

```text
>>> print(sa.prefix_lm(5, 2).to_string())
    T1 T2 T3 T4 T5
T1  *  *
T2  *  *
T3  *  *  *
T4  *  *  *  *
T5  *  *  *  *  *

```

### `neighborhood`

NATTEN's neighborhood attention on a 1-D, 2-D or 3-D grid in row-major order: `na1d(q, k, v, kernel_size=3)`
is `neighborhood(n, 3)`, `na2d(q, k, v, kernel_size=(kh, kw), dilation=(dh, dw), is_causal=(ch, cw))` on an
`(H, W)` grid is `neighborhood((H, W), (kh, kw), dilation=(dh, dw), causal=(ch, cw))`. Windows are shifted,
not cut, at the borders (every query sees `prod(kernel_size)` keys); dilation takes the window among the
positions of the query's residue class; a causal axis ends the window at the query.

```text
>>> print(sa.neighborhood(6, 3).to_string())
    T1 T2 T3 T4 T5 T6
T1  *  *  *
T2  *  *  *
T3     *  *  *
T4        *  *  *
T5           *  *  *
T6           *  *  *
>>> print(sa.neighborhood(6, 2, dilation=2).to_string())
    T1 T2 T3 T4 T5 T6
T1  *     *
T2     *     *
T3  *     *
T4     *     *
T5        *     *
T6           *     *
>>> print(sa.neighborhood((3, 3), 2).to_string(labels=[f"{y}{x}" for y in "abc" for x in "123"]))
    a1 a2 a3 b1 b2 b3 c1 c2 c3
a1  *  *     *  *
a2  *  *     *  *
a3     *  *     *  *
b1  *  *     *  *
b2  *  *     *  *
b3     *  *     *  *
c1           *  *     *  *
c2           *  *     *  *
c3              *  *     *  *

```

### `from_indices`

Per-query key lists, `-1` for an empty slot, duplicates merged: the top-k indices that DeepSeek-V3.2's
lightning indexer selects (`sa.from_indices(topk_indices, n_k)`; a `(heads, n_q, k)` array gives one pattern
per head).

```text
>>> print(sa.from_indices([[0, -1], [1, 0], [1, 1], [0, 3]], 4).to_string())
    T1 T2 T3 T4
T1  *
T2  *  *
T3     *
T4  *        *

```

### `from_predicate`

FlexAttention's `mask_mod` for NumPy: `fn(i, j)` with `i` of shape `(rows, 1)` and `j` of shape `(1, n_k)`,
evaluated in row blocks and compiled to CSR once. `create_block_mask(mask_mod, B, H, n, n)` becomes
`from_predicate(lambda i, j: mask_mod(None, None, i, j), n, n)` when the body is NumPy-compatible.

```text
>>> print(sa.from_predicate(lambda i, j: ((j <= i) & (i - j < 2)) | (j == 0), 5, 5).to_string())
    T1 T2 T3 T4 T5
T1  *
T2  *  *
T3  *  *  *
T4  *     *  *
T5  *        *  *

```
"""

# Extra images: (file stem, caption, pattern).
EXTRAS = [
    ("seed_grid_local", "The seed notes' first grid: `sliding_window(5, 1)`.", lambda: sa.sliding_window(5, 1)),
    (
        "seed_grid_global",
        "The seed notes' second grid: `sliding_window(5, 1) | global_tokens(5, [0])`.",
        lambda: sa.sliding_window(5, 1) | sa.global_tokens(5, [0]),
    ),
    (
        "dilated_window",
        "Dilated window: `sliding_window(256, 24, dilation=3)`, 8 keys on each side over a reach of 24 (allenai Longformer's window of 8 with dilation 3).",
        lambda: sa.sliding_window(256, 24, dilation=3),
    ),
    (
        "strided_bidirectional",
        "Sparse Transformer strided, both directions: `strided(256, 16, causal=False)`.",
        lambda: sparseattn.patterns.presets.strided(256, 16, causal=False),
    ),
    (
        "fixed_head1",
        "Sparse Transformer fixed, head 1 (next summary sub-block): `fixed(256, 32, 4, head=1)`.",
        lambda: sparseattn.patterns.presets.fixed(256, 32, 4, head=1),
    ),
    (
        "longformer_1m",
        "Longformer at one million tokens, 1024 x 1024 pixels: `longformer(2**20, 512, [0, 2**19])`.",
        lambda: sa.longformer(1 << 20, 512, [0, 1 << 19]),
    ),
]

RECEPTIVE = [
    (
        "receptive_band",
        "Receptive field of a band of radius 8 over 6 layers (grows by 8 per layer).",
        lambda: sa.sliding_window(256, 8),
        6,
    ),
    (
        "receptive_longformer",
        "Band + one global token: every token sees everything after 2 layers.",
        lambda: sa.longformer(256, 16, [0]),
        3,
    ),
    (
        "receptive_bigbird",
        "BigBird (block 8, 2 random blocks): global blocks cover in 2 layers.",
        lambda: sparseattn.patterns.presets.bigbird(256, 8, 2, seed=0),
        3,
    ),
]


def _call(name, kw):
    out = registry.get(name)(**kw)
    return out if isinstance(out, sa.Pattern) else out[0]


def _kwargs_text(kw):
    def fmt(k, v):
        if isinstance(v, np.ndarray):
            return f"<{v.shape[0]}x{v.shape[1]} layout>" if k == "layout" else f"<array of shape {v.shape}>"
        if callable(v):
            return v.__name__
        return repr(v)

    return ", ".join(f"{k}={fmt(k, v)}" for k, v in kw.items())


def main():
    os.makedirs(OUT, exist_ok=True)
    lines = [
        "# Patterns gallery",
        "",
        "Generated by `python docs/gallery.py` (do not edit by hand). Each image is a",
        "density plot from `sparseattn.viz.plot_pattern`: rows are queries, columns keys,",
        "colour the fraction of allowed pairs per pixel (white: none).",
        "",
        "## Registered builders",
        "",
    ]
    for name in registry.available():
        kw = SHOWN.get(name)
        if kw is None:  # a builder added later: show its largest registered example
            exs = registry.examples(name)
            if not exs:
                continue
            kw = max(exs, key=lambda e: _call(name, e).shape[0])
        p = _call(name, kw)
        file = f"{name}.png"
        plot_pattern(p, os.path.join(OUT, file), title=f"{name}({_kwargs_text(kw)})")
        lines += [f"### `{name}`", "", f"`{name}({_kwargs_text(kw)})`", "", f"![{name}](gallery/{file})", ""]
        print("wrote", file, file=sys.stderr)
    lines += ["## More examples", ""]
    for stem, caption, make in EXTRAS:
        file = f"{stem}.png"
        plot_pattern(make(), os.path.join(OUT, file), title=re.search(r"`([^`]*)`", caption).group(1))
        lines += [f"### {stem.replace('_', ' ')}", "", caption, "", f"![{stem}](gallery/{file})", ""]
        print("wrote", file, file=sys.stderr)
    lines += [
        "## Receptive fields",
        "",
        "From `sparseattn.viz.plot_receptive_field`: left, which tokens influence each",
        "query after the last layer; right, receptive-field size per layer.",
        "",
    ]
    for stem, caption, make, layers in RECEPTIVE:
        file = f"{stem}.png"
        plot_receptive_field(make(), layers, os.path.join(OUT, file))
        lines += [f"### {stem.replace('_', ' ')}", "", caption, "", f"![{stem}](gallery/{file})", ""]
        print("wrote", file, file=sys.stderr)
    lines += RUNS_SECTION.splitlines()
    with open(os.path.join(HERE, "gallery.md"), "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    main()
