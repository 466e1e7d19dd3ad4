"""Attention patterns: composable builders compiled to canonical CSR.

Every builder is registered by name (:func:`get`, :func:`available`);
third-party builders join through the ``sparseattn.patterns`` entry-point group.
"""

from .base import intersection, transpose, union
from .base import Pattern, as_pattern
from .builders import (
    causal,
    from_dense,
    from_sparse,
    global_tokens,
    longformer,
    random_pattern,
    sliding_window,
)
from .explicit import from_indices, from_predicate
from .grids import neighborhood
from .presets import bigbird, block_sparse, fixed, strided
from .runs import documents, from_cu_seqlens, from_position_ids, full, prefix_lm
from .registry import available, examples, get, register_pattern

__all__ = [
    "Pattern",
    "as_pattern",
    "available",
    "bigbird",
    "block_sparse",
    "causal",
    "documents",
    "examples",
    "fixed",
    "from_cu_seqlens",
    "from_dense",
    "from_indices",
    "from_position_ids",
    "from_predicate",
    "from_sparse",
    "full",
    "get",
    "global_tokens",
    "intersection",
    "longformer",
    "neighborhood",
    "prefix_lm",
    "random_pattern",
    "register_pattern",
    "sliding_window",
    "strided",
    "transpose",
    "union",
]
