"""One Hugging Face ``LongformerSelfAttention`` layer, forward + backward: stock vs patched.

Base geometry (E = 768, 12 heads, head dim 64, attention_window 512 = radius 256), batch 1,
float32, token 0 global, n = 4096; the step is the layer's forward (projections included) and
the gradients of its input and of all twelve parameters. ``patched`` is the same layer after
:func:`sparseattn.hf.patch_longformer`. Both outputs are checked against the float64 NumPy layer
(:class:`sparseattn.hf.LongformerSelfAttention`) before timing. Issue 8's target: patched at
least 4x faster, measured with the two alternating in one process (``test_paired_*``).

    pytest benchmarks/test_hf_layer.py --benchmark-json=HF_LAYER.json
"""

import pytest

import benchlib
import trainlib

N = 512 if benchlib.quick() else 4096


@pytest.mark.parametrize("which", ["stock", "patched"])
def test_hf_layer_train(benchmark, which):
    fn, info, check = trainlib.make_hf_layer_train(which, n=N)
    group = f"HF LongformerSelfAttention layer forward+backward: E{info['hidden']}, {info['heads']} heads, W512, g1, float32"
    benchlib.run(benchmark, fn, group=group, info=info, check=check)


def _layer(which):
    return (f"hf-layer-{which} n={N}",) + trainlib.make_hf_layer_train(which, n=N)


def test_paired_hf_layer_patched_vs_stock(benchmark):
    patched, stock = _layer("patched"), _layer("stock")
    info = patched[2]
    benchlib.bench_paired(
        benchmark, patched, stock,
        label=f"HF layer E{info['hidden']} W512 g1 float32 forward+backward, stock / patched", target=">= 4",
    )  # fmt: skip
