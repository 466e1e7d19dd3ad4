"""Whole transformers models on ``attn_implementation="sparseattn"`` against ``sdpa``/``eager`` (issue 19's targets).

Random weights from configs (no download), batch 1, float32, each pair timed alternately in one process
(``benchlib.bench_paired``: the shared machine's load drifts); ``ratio = dense / sparseattn``.

* ModernBERT-base geometry (hidden 768, 12 heads, 22 layers, local window 128, a global layer every third),
  ``n`` tokens: forward and forward + backward against ``sdpa``; peak resident memory of each
  (``extra_info[...]["rss_peak_delta_bytes"]``; the forward also the encoder without the masked-LM head, whose
  logits dominate both peaks: ``rss_peak_delta_bytes_encoder``). Targets: >= 2x, >= 2x, memory <= 0.5x.
* Gemma-2-like (window 4096 alternating with global, 8 query / 4 kv heads, d 256, hidden 512, 4 layers, attention
  softcap 50): one training step (forward + backward) against ``eager``. Target >= 5x.
* Mistral-like (window 4096, 16 query / 4 kv heads, d 128, hidden 512, 4 layers): prefill of ``n`` tokens against
  ``sdpa`` (target >= 3x), then 64 greedy decode steps from the prefilled cache (target >= 1.5x tokens/s).

Each test also records, in ``extra_info["attention_share"]``, what share of one step is attention for each backend
(one extra untimed-pair call each): the attention function is wrapped with a clock (``sdpa`` and ``sparseattn``
through transformers' ``AttentionInterface``, ``eager`` through the model module's ``eager_attention_forward``);
in training steps the attention's backward is the time from the gradient of its output to that of its query
(tensor hooks). The share is attention time over the step's time in that same call.

Sizes: the issue's n (8192, 8192, 16384) by default; ``SPARSEATTN_BENCH_HF_SCALE=k`` divides every n by k, and
the 4096-token windows of the Gemma-2-like and Mistral-like models with it (so that the window stays the same
share of the sequence; ModernBERT's 128 stays), for the 2-core shared machine: say which scale a figure used.
Quick mode divides by 16.

    pytest benchmarks/test_hf_models.py --benchmark-json=HF_MODELS.json
"""

import copy
import os

import pytest

import benchlib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import sparseattn.hf as sh  # noqa: E402
from sparseattn.hf.attention import _softcap_applied  # noqa: E402

NAME = sh.register()
SCALE = 16 if benchlib.quick() else int(os.environ.get("SPARSEATTN_BENCH_HF_SCALE", "1"))
transformers.logging.set_verbosity_error()


def _n(full):
    return max(256, full // SCALE)


def _pair(cfg, dense_impl, auto=transformers.AutoModelForCausalLM):
    torch.manual_seed(0)
    dense = auto.from_config(cfg, attn_implementation=dense_impl).eval()
    sparse = copy.deepcopy(dense)
    sparse.set_attn_implementation(NAME)
    return dense, sparse


def _ids(n, vocab):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(1))


def _step(model, ids, backward):
    def fn():
        if backward:
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids).logits
            out.float().pow(2).mean().backward()
            return out.detach()
        with torch.no_grad():
            return model(input_ids=ids).logits

    return fn


class _AttentionClock:
    """Wrap a model's attention function with a clock: forward seconds, and backward seconds through tensor hooks."""

    def __init__(self, model, impl):
        self.model, self.impl = model, impl
        self.fwd = self.bwd = 0.0

    def _wrap(self, fn):
        import time

        def timed(module, query, key, value, *args, **kwargs):
            t0 = time.perf_counter()
            out, weights = fn(module, query, key, value, *args, **kwargs)
            self.fwd += time.perf_counter() - t0
            if out.requires_grad and query.requires_grad:
                start = []
                out.register_hook(lambda g: start.append(time.perf_counter()))
                query.register_hook(lambda g: setattr(self, "bwd", self.bwd + time.perf_counter() - start[-1]))
            return out, weights

        return timed

    def __enter__(self):
        import sys

        from transformers import AttentionInterface

        if self.impl == "eager":
            self._mod = sys.modules[type(self.model).__module__]
            self._saved = self._mod.eager_attention_forward
            self._mod.eager_attention_forward = self._wrap(self._saved)
        else:
            self._saved = AttentionInterface._global_mapping[self.impl]
            AttentionInterface._global_mapping[self.impl] = self._wrap(self._saved)
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        if self.impl == "eager":
            self._mod.eager_attention_forward = self._saved
        else:
            AttentionInterface._global_mapping[self.impl] = self._saved


def _attention_share(benchmark, *runs):
    """``extra_info["attention_share"][name]``: attention's seconds and share of one call of ``fn`` (runs: (name, model, impl, fn))."""
    import time

    shares = {}
    for name, model, impl, fn in runs:
        with _AttentionClock(model, impl) as clock:
            t0 = time.perf_counter()
            fn()
            step = time.perf_counter() - t0
        att = clock.fwd + clock.bwd
        shares[name] = dict(step_s=step, attention_forward_s=clock.fwd, attention_backward_s=clock.bwd,
                            attention_share=att / step)  # fmt: skip
        print(f"  {name}: step {step:.3f} s, attention {att:.3f} s ({100 * att / step:.0f}%; forward {clock.fwd:.3f} s, "
              f"backward {clock.bwd:.3f} s)")  # fmt: skip
    benchmark.extra_info["attention_share"] = shares


def _checked(name, fn, ref_fn, info):
    """(name, fn, info, check): check = the logits' largest difference relative to the dense backend's."""
    ref = {}

    def check(out):
        if "logits" not in ref:
            ref["logits"] = ref_fn()
        r = ref["logits"]
        return float((out - r).abs().max() / r.abs().max())

    return (name, fn, info, check)


def _memory(fn):
    _, mem = benchlib.measure_peak(fn)
    return mem.get("rss_peak_delta_bytes")


def _encoder(model, ids):
    def fn():
        with torch.no_grad():
            return model.model(input_ids=ids).last_hidden_state

    return fn


def _modernbert(n):
    cfg = transformers.ModernBertConfig(
        vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
        local_attention=128, global_attn_every_n_layers=3, max_position_embeddings=max(8192, n),
        attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
    )  # fmt: skip
    return _pair(cfg, "sdpa", transformers.AutoModelForMaskedLM)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_paired_modernbert_base(benchmark, backward):
    n = _n(8192)
    dense, sparse = _modernbert(n)
    ids = _ids(n, 50368)
    info = dict(model="ModernBERT-base geometry", n=n, scale=SCALE, backward=backward)
    fs, fd = _step(sparse, ids, backward), _step(dense, ids, backward)
    info["rss_peak_delta_bytes"] = {NAME: _memory(fs), "sdpa": _memory(fd)}
    # the masked-LM head's logits (n x 50368 float32: 1.5 GiB at n = 8192) dominate both peaks: the encoder alone too
    if not backward:
        enc = {name: _memory(_encoder(m, ids)) for name, m in ((NAME, sparse), ("sdpa", dense))}
        info["rss_peak_delta_bytes_encoder"] = enc
        benchmark.extra_info["rss_peak_delta_bytes_encoder"] = enc
    what = "forward+backward" if backward else "forward"
    benchlib.bench_paired(
        benchmark, _checked(NAME, fs, _step(dense, ids, False), info), _checked("sdpa", fd, fd, info),
        label=f"ModernBERT-base n={n} {what}, sdpa / sparseattn", target=">= 2",
    )  # fmt: skip
    benchmark.extra_info["rss_peak_delta_bytes"] = info["rss_peak_delta_bytes"]
    _attention_share(benchmark, (NAME, sparse, NAME, fs), ("sdpa", dense, "sdpa", fd))


def test_paired_gemma2_like_training_step(benchmark):
    n = _n(8192)
    softcap = 50.0 if _softcap_applied() else None
    cfg = transformers.Gemma2Config(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=_n(4096), attn_logit_softcapping=softcap,
        final_logit_softcapping=30.0, query_pre_attn_scalar=256, max_position_embeddings=max(8192, n),
        attention_dropout=0.0,
    )  # fmt: skip
    dense, sparse = _pair(cfg, "eager")
    ids = _ids(n, 1024)
    info = dict(model="Gemma-2-like", n=n, scale=SCALE, softcap=softcap)
    fs, fd = _step(sparse, ids, True), _step(dense, ids, True)
    cap = "softcap 50" if softcap else "softcap off (engine's softcap not applied yet)"
    benchlib.bench_paired(
        benchmark, _checked(NAME, fs, fd, info), _checked("eager", fd, fd, info),
        label=f"Gemma-2-like n={n} window {_n(4096)} {cap} training step, eager / sparseattn", target=">= 5",
    )  # fmt: skip
    _attention_share(benchmark, (NAME, sparse, NAME, fs), ("eager", dense, "eager", fd))


def _mistral(n):
    cfg = transformers.MistralConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, sliding_window=_n(4096), max_position_embeddings=max(32768, n + 128),
        attention_dropout=0.0,
    )  # fmt: skip
    return _pair(cfg, "sdpa")


def test_paired_mistral_like_prefill(benchmark):
    n = _n(16384)
    dense, sparse = _mistral(n)
    ids = _ids(n, 1024)
    info = dict(model="Mistral-like", n=n, scale=SCALE)
    fs, fd = _step(sparse, ids, False), _step(dense, ids, False)
    benchlib.bench_paired(
        benchmark, _checked(NAME, fs, fd, info), _checked("sdpa", fd, fd, info),
        label=f"Mistral-like prefill n={n} window {_n(4096)}, sdpa / sparseattn", target=">= 3",
    )  # fmt: skip
    _attention_share(benchmark, (NAME, sparse, NAME, fs), ("sdpa", dense, "sdpa", fd))


def _decoder(model, ids, steps=64):
    """64 greedy steps from a prefilled cache (copied per call, ~W x layers x kv heads: a few tens of MB)."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache, first = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def fn():
        c, tok, toks = copy.deepcopy(cache), first, []
        with torch.no_grad():
            for _ in range(steps):
                tok = model(input_ids=tok, cache=c, use_cache=True).logits[:, -1:].argmax(-1)
                toks.append(tok)
        return torch.cat(toks, dim=1)

    return fn


def test_paired_mistral_like_decode(benchmark):
    n = _n(16384)
    dense, sparse = _mistral(n)
    ids = _ids(n, 1024)
    fs, fd = _decoder(sparse, ids), _decoder(dense, ids)
    info = dict(model="Mistral-like", n=n, scale=SCALE, new_tokens=64)
    same = lambda out: float((out != fd()).sum())  # noqa: E731 - tokens that differ from sdpa's (0 expected)
    benchlib.bench_paired(
        benchmark, ("sparseattn", fs, info, same), ("sdpa", fd, info, same),
        label=f"Mistral-like 64 decode steps after n={n} window {_n(4096)}, sdpa / sparseattn (= tokens/s ratio)", target=">= 1.5",
    )  # fmt: skip
    _attention_share(benchmark, (NAME, sparse, NAME, fs), ("sdpa", dense, "sdpa", fd))
