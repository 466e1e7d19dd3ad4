"""The engine: validation, the execution paths and what they need, behind two entry points.

``attention.sparse_attention`` and ``backward.sparse_attention_backward``
validate a call once (``validate.prepare``) and dispatch it through
``paths`` to the fused (``fused_forward``, ``fused_backward``, ``plan``),
staged (``staged``) or blocked (``blocked``) path; ``coldstart`` decides what
a call in a fresh environment runs while the fused kernels compile,
``scan`` routes non-finite inputs, ``threads`` runs work ranges with BLAS
capped, ``warmup`` compiles everything ahead of time.  Nothing here imports
an adapter or a tool, and this package imports none of its modules eagerly:
``import sparseattn`` stays light until the first call.
"""
