"""Hugging Face Longformer: a NumPy port of its self-attention layer, and a drop-in for loaded torch models.

* :class:`LongformerSelfAttention` -- the layer's forward pass in NumPy, loaded
  from a state dict or a ``.safetensors`` file; needs neither torch nor
  transformers.
* :func:`patch_longformer` -- makes every ``LongformerSelfAttention`` of a
  loaded ``transformers`` model compute its attention with the sparse engine
  (forward and backward, through :mod:`sparseattn.torch`).  torch and
  transformers are imported only when it is called.
"""

from __future__ import annotations

from .layer import LongformerSelfAttention

__all__ = ["LongformerSelfAttention", "patch_longformer"]


def __getattr__(name):
    # patch_longformer imports torch; keep `import sparseattn.hf` free of it until it is used.
    if name == "patch_longformer":
        from .patch import patch_longformer

        return patch_longformer
    raise AttributeError(f"module 'sparseattn.hf' has no attribute {name!r}")
