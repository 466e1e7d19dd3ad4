"""Training on H1: the fused backward against its forward and against peers' training steps.

H1 (batch 1, 12 heads, d 64, float32, radius 256 = HF attention_window 512, one global token).
``test_train_compare`` sweeps n for the forward with lse, the backward alone, both (a training
step of the attention core), HF Longformer's attention core forward + backward and torch SDPA
with a dense boolean mask forward + backward (peers only where they fit). The backward's
``extra_info`` also holds its extra peak memory over the bytes of q, k, v, out and grad_out
(the three gradients it returns not counted). The ``paired`` tests measure issue 8's ratio
targets with the two calls alternating in one process, including the torch adapter's overhead
(``sparseattn.torch.sparse_attention`` forward + backward against the two NumPy calls it wraps).

    SPARSEATTN_BENCH_NS=1024,4096,8192,16384,32768,65536 pytest benchmarks/test_backward.py \
        benchmarks/test_gemm.py --benchmark-json=TRAIN.json
"""

import pytest

import benchlib
import trainlib

NS = benchlib.sizes([1024, 2048, 4096, 8192, 16384, 32768, 65536], [512])
METHODS = ["sparseattn-fwd", "sparseattn-bwd", "sparseattn-train", "hf-longformer-train", "torch-sdpa-train"]
N = 512 if benchlib.quick() else 8192
N_LARGE = 2048 if benchlib.quick() else 65536


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", NS, ids=lambda n: f"n{n}")
def test_train_compare(benchmark, method, n):
    fn, info, check = trainlib.make_train_method(method, n=n)
    benchlib.run(benchmark, fn, group=f"H1 training: r256, g1, float32, {info['heads']} heads, d64", info=info, check=check)
    if method == "sparseattn-bwd":
        grads = 3 * info["out_bytes"]  # dq, dk, dv: returned, not extra
        for key in ("tracemalloc_peak_bytes", "rss_peak_delta_bytes"):
            if key in benchmark.extra_info:
                extra = max(0, benchmark.extra_info[key] - grads)
                benchmark.extra_info[key.replace("_bytes", "_extra_over_qkv_out_grad")] = extra / info["qkv_out_grad_bytes"]


def _method(name, n):
    return (f"{name} n={n}",) + trainlib.make_train_method(name, n=n)


def test_paired_backward_vs_forward(benchmark):
    benchlib.bench_paired(
        benchmark, _method("sparseattn-fwd", N), _method("sparseattn-bwd", N),
        label="H1 r256 g1 float32, sparseattn backward / forward", target="<= 2.5",
    )  # fmt: skip


def test_paired_train_vs_hf(benchmark):
    peer = _method("hf-longformer-train", N)
    benchlib.bench_paired(
        benchmark, _method("sparseattn-train", N), peer,
        label="H1 r256 g1 float32, hf-longformer fwd+bwd / sparseattn fwd+bwd", target=">= 10",
    )  # fmt: skip


def test_paired_backward_n_scaling(benchmark):
    benchlib.bench_paired(
        benchmark, _method("sparseattn-bwd", N), _method("sparseattn-bwd", N_LARGE),
        label=f"H1 r256 g1 float32, sparseattn backward n={N_LARGE} / n={N}", target="<= 8.8",
    )  # fmt: skip


def test_paired_torch_adapter_overhead(benchmark):
    benchlib.bench_paired(
        benchmark, _method("sparseattn-train", N), _method("sparseattn-torch-train", N),
        label="H1 r256 g1 float32, torch adapter fwd+bwd / NumPy fwd+bwd", target="<= 1.1",
    )  # fmt: skip
