"""sparseattn: sparse (Longformer-style) attention on the CPU, from NumPy.

The public surface::

    sparse_attention(q, k, v, pattern, ...)   the one entry point
    sparse_attention_backward(grad_out, ...)  its gradients (training)
    ScoreMod(f, df)                           a user's score modifier for both
    sliding_window, global_tokens, longformer, causal,
    from_sparse, from_dense, random_pattern,
    bigbird, strided, fixed, block_sparse,
    full, documents, from_cu_seqlens,
    from_position_ids, prefix_lm, neighborhood,
    from_indices, from_predicate              pattern builders and presets
    Pattern, register_pattern                 the pattern type and registry

Everything else lives in submodules (``sparseattn.patterns``,
``sparseattn.reference``, ``sparseattn.analysis``, ...).  Optional
dependencies are imported only by the adapters that need them.
"""

from .patterns import (
    Pattern,
    bigbird,
    block_sparse,
    causal,
    documents,
    fixed,
    from_cu_seqlens,
    from_dense,
    from_indices,
    from_position_ids,
    from_predicate,
    from_sparse,
    full,
    global_tokens,
    longformer,
    neighborhood,
    prefix_lm,
    random_pattern,
    register_pattern,
    sliding_window,
    strided,
)

from ._memory import InsufficientMemoryError

__version__ = "0.1.0"


def __getattr__(name):
    # sparse_attention pulls in numba; keep `import sparseattn` light until it is used.
    if name in ("sparse_attention", "AttentionWeights"):
        from .engine import attention

        return getattr(attention, name)
    if name == "ScoreMod":
        from .engine.modifiers import ScoreMod

        return ScoreMod
    if name == "sparse_attention_backward":
        from .engine.backward import sparse_attention_backward

        return sparse_attention_backward
    raise AttributeError(f"module 'sparseattn' has no attribute {name!r}")


_LAZY = ("AttentionWeights", "ScoreMod", "sparse_attention", "sparse_attention_backward")


def __dir__():
    # the lazy names too, so that tab completion and dir() find the entry point before its first use
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AttentionWeights",
    "InsufficientMemoryError",
    "Pattern",
    "ScoreMod",
    "bigbird",
    "block_sparse",
    "causal",
    "documents",
    "fixed",
    "from_cu_seqlens",
    "from_dense",
    "from_indices",
    "from_position_ids",
    "from_predicate",
    "from_sparse",
    "full",
    "global_tokens",
    "longformer",
    "neighborhood",
    "prefix_lm",
    "random_pattern",
    "register_pattern",
    "sliding_window",
    "sparse_attention",
    "sparse_attention_backward",
    "strided",
]
