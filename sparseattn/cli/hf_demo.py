"""``sparseattn hf-demo``: small random transformers models on ``sdpa``/``eager`` and on ``attn_implementation="sparseattn"``.

Three families, each built from a config in code (no download) with random weights: Mistral (causal sliding
window, grouped-query heads), ModernBERT (bidirectional window of +-64 tokens, a global layer every third) and
GPT-OSS (a window alternating with full layers, learned sinks, experts). Each runs one forward pass of ``--n``
tokens per backend -- ``sdpa`` where the model supports it, else ``eager`` -- and the same weights on
``sparseattn``; the table gives the best time of ``--repeat`` runs, the peak resident memory above the start
of the call (sampled every 2 ms from ``/proc/self/statm``) and the largest logit difference relative to the
largest logit.
"""

from __future__ import annotations

import copy
import os
import threading
import time

from ._common import CLIError

FAMILIES = ("mistral", "modernbert", "gpt_oss")


def add_parser(sub):
    demo = sub.add_parser(
        "hf-demo",
        help="small random transformers models on sdpa/eager and on attn_implementation='sparseattn'",
        description=(
            "Builds small random models of three families (Mistral, ModernBERT, GPT-OSS) from configs, runs one "
            "forward pass of --n tokens with the model's dense backend (sdpa, or eager where sdpa is refused) and "
            "with attn_implementation='sparseattn', and prints time, peak memory and agreement per backend. Needs "
            "torch and transformers."
        ),
        allow_abbrev=False,
    )
    demo.add_argument("--n", type=int, default=4096, help="tokens per sequence (default: 4096)")
    demo.add_argument("--window", type=int, default=256, help="the sliding window in tokens (default: 256)")
    demo.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    demo.add_argument("--repeat", type=int, default=2, help="timed runs per backend, best is reported (default: 2)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")
    demo.set_defaults(func=_cmd_hf_demo)


def _configs(transformers, window):
    common = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                  max_position_embeddings=131072, attention_dropout=0.0)  # fmt: skip
    return {
        "mistral": ("sdpa", transformers.MistralConfig(
            **common, num_attention_heads=8, num_key_value_heads=2, sliding_window=window)),
        "modernbert": ("sdpa", transformers.ModernBertConfig(
            **common, num_attention_heads=8, local_attention=window, global_attn_every_n_layers=3,
            mlp_dropout=0.0, embedding_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)),
        "gpt_oss": ("eager", transformers.GptOssConfig(
            **common, num_attention_heads=8, num_key_value_heads=2, head_dim=32, sliding_window=window,
            num_local_experts=4, num_experts_per_tok=2)),
    }  # fmt: skip


class _PeakRSS:
    """Peak resident memory above the start of a ``with`` block, sampled every 2 ms (Linux; None elsewhere)."""

    def __init__(self):
        self.peak = None

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if not os.path.exists("/proc/self/statm"):
            return self
        self._start = self.peak = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.peak is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss()) - self._start


def _run(torch, model, ids, repeat):
    best, peak, logits = float("inf"), 0, None
    for _ in range(repeat):
        logits = None
        with torch.no_grad(), _PeakRSS() as mem:
            t = time.perf_counter()
            logits = model(input_ids=ids).logits
            best = min(best, time.perf_counter() - t)
        peak = mem.peak if mem.peak is None else max(peak, mem.peak)
    return best, peak, logits


def _fmt_mem(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.0f} MiB"


def _cmd_hf_demo(args, words, out):
    if args.n > 131072:
        raise CLIError(f"--n must be at most 131072 (the configs' max_position_embeddings), got {args.n}")
    if args.n < 2 or args.window < 2 or args.repeat < 1:
        raise CLIError(f"--n and --window must be >= 2 and --repeat >= 1, got {args.n}, {args.window}, {args.repeat}")
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise CLIError(f"--families: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(FAMILIES)}")
    import torch
    import transformers

    from ..hf import register

    transformers.logging.set_verbosity_error()  # the small configs' warnings are not the demo's subject
    name = register()
    configs = _configs(transformers, args.window)
    print(f"hf-demo: n = {args.n} tokens, window {args.window}, batch 1, float32, forward only, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads",
          file=out)  # fmt: skip
    print(f"{'family':<11} {'backend':<11} {'time':>9} {'peak mem':>10} {'max rel diff':>13}", file=out)
    for fam in families:
        dense_impl, cfg = configs[fam]
        torch.manual_seed(args.seed)
        auto = transformers.AutoModelForMaskedLM if fam == "modernbert" else transformers.AutoModelForCausalLM
        dense = auto.from_config(cfg, attn_implementation=dense_impl).eval()
        sparse = copy.deepcopy(dense)
        sparse.set_attn_implementation(name)
        ids = torch.randint(1, cfg.vocab_size, (1, args.n), generator=torch.Generator().manual_seed(args.seed))
        _run(torch, sparse, ids[:, : min(args.n, 256)], 1)  # compile or load the kernels outside the timing
        rows = []
        for impl, model in ((dense_impl, dense), (name, sparse)):
            rows.append((impl, *_run(torch, model, ids, args.repeat)))
        ref = rows[0][3]
        for impl, t, peak, logits in rows:
            diff = ((logits - ref).abs().max() / ref.abs().max()).item()
            print(f"{fam:<11} {impl:<11} {t * 1e3:>7.0f} ms {_fmt_mem(peak):>10} {diff:>13.2e}", file=out)
        del dense, sparse, rows, ref
    return 0
