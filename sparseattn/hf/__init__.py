"""Hugging Face: any transformers model through ``attn_implementation="sparseattn"``, and the Longformer patch.

* :func:`register` -- registers ``"sparseattn"`` with transformers'
  ``AttentionInterface`` and ``AttentionMaskInterface`` (:mod:`.attention`,
  :mod:`.masks`), so ``from_pretrained(..., attn_implementation="sparseattn")``,
  ``from_config(...)`` and ``model.set_attn_implementation("sparseattn")`` run
  the model's attention on the sparse engine, masks as patterns (never n x n).
* :class:`LongformerSelfAttention` -- the Longformer layer's forward pass in
  NumPy, loaded from a state dict or a ``.safetensors`` file; needs neither
  torch nor transformers.
* :func:`patch_longformer` -- makes every ``LongformerSelfAttention`` of a
  loaded ``transformers`` model compute its attention with the sparse engine
  (Longformer, LED and BigBird do not use the attention interface).

torch and transformers are imported only when :func:`register` or
:func:`patch_longformer` is called.
"""

from __future__ import annotations

from .layer import LongformerSelfAttention

__all__ = ["NAME", "LongformerSelfAttention", "patch_longformer", "register"]

NAME = "sparseattn"
# The lowest transformers with AttentionMaskInterface; the versions the HF tests were run with
MIN_TRANSFORMERS = "4.53.0"
TESTED_TRANSFORMERS = ("4.53.0", "4.53.3", "4.54.1", "4.55.4", "4.56.2", "4.57.6", "5.25.0")


def register():
    """Register ``"sparseattn"`` with transformers (idempotent); returns the name.

    Returns
    -------
    str
        ``"sparseattn"``, to pass as ``attn_implementation=``.

    Examples
    --------
    >>> import sparseattn.hf, transformers
    >>> sparseattn.hf.register()
    'sparseattn'
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sparseattn")
    >>> model.config._attn_implementation
    'sparseattn'
    """
    import transformers
    from packaging.version import Version

    too_old = Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as exc:  # older transformers: no mask plug-in, and masks would silently be None
        too_old = exc
    if too_old:
        raise ImportError(
            f"sparseattn.hf.register() needs transformers >= {MIN_TRANSFORMERS} (its AttentionInterface and "
            f"AttentionMaskInterface; tested with {MIN_TRANSFORMERS} and {TESTED_TRANSFORMERS[-1]}), but transformers "
            f"{transformers.__version__} is installed: upgrade it (pip install 'transformers>={MIN_TRANSFORMERS}')"
        ) from (too_old if isinstance(too_old, Exception) else None)

    from .attention import sparse_attention_forward
    from .masks import sparse_mask

    AttentionInterface.register(NAME, sparse_attention_forward)
    AttentionMaskInterface.register(NAME, sparse_mask)
    return NAME


def __getattr__(name):
    # patch_longformer imports torch; keep `import sparseattn.hf` free of it until it is used.
    if name == "patch_longformer":
        from .patch import patch_longformer

        return patch_longformer
    raise AttributeError(f"module 'sparseattn.hf' has no attribute {name!r}")
