"""patch_longformer: a patched transformers Longformer against the stock one (outputs and every gradient)."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import sparseattn.torch as sat  # noqa: E402
from sparseattn.hf import patch_longformer  # noqa: E402

pytestmark = pytest.mark.compat

E, H, W, N, VOCAB = 32, 4, 8, 21, 100  # n = 21 is not a multiple of the window 8


def config(layers=2, **kw):
    args = dict(
        hidden_size=E, num_attention_heads=H, num_hidden_layers=layers, intermediate_size=64,
        attention_window=[W] * layers, vocab_size=VOCAB, max_position_embeddings=64,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )  # fmt: skip
    args.update(kw)
    return transformers.LongformerConfig(**args)


def inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, N), generator=g)
    am = torch.ones(b, N, dtype=torch.long)
    am[1, 15:] = 0  # padding in one row
    am[2, 19:] = 0
    gm = torch.zeros(b, N, dtype=torch.long)
    gm[:, [0, 7]] = 1  # several global tokens ...
    gm[2, 12] = 1  # ... and a different global set in row 2
    gm[1, 17] = 1  # a padded token marked global stays padded
    return ids, am, gm


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_grads_close(patched, stock, rtol=2e-3):
    """Every parameter's gradient within ``rtol`` relative norm of the stock one.

    A key bias has an analytically zero gradient (softmax ignores a per-row constant); such a gradient
    (below 1e-6 of the whole gradient's norm) is rounding noise in both and only has to stay that small.
    """
    stock_grads = {n: p.grad for n, p in stock.named_parameters()}
    total = float(torch.sqrt(sum(g.double().square().sum() for g in stock_grads.values() if g is not None)))
    checked = 0
    for name, p in patched.named_parameters():
        gs = stock_grads[name]
        if gs is None:
            assert p.grad is None or float(p.grad.norm()) == 0, name
        elif float(gs.norm()) <= 1e-6 * total:
            assert p.grad is not None and float(p.grad.norm()) <= 1e-5 * total, name
        else:
            assert rel(p.grad, gs) <= rtol, (name, rel(p.grad, gs))
            checked += 1
    return checked


def stock_and_patched(model_cls=transformers.LongformerModel, seed=0, **kw):
    torch.manual_seed(seed)
    stock = model_cls(config(**kw)).eval()
    patched = patch_longformer(copy.deepcopy(stock))
    return stock, patched


def test_patched_model_matches_stock_outputs_and_every_gradient(monkeypatch):
    stock, patched = stock_and_patched()
    calls = []
    real = sat.sparse_attention
    monkeypatch.setattr(sat, "sparse_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, am, gm = inputs()
    out_s = stock(input_ids=ids, attention_mask=am, global_attention_mask=gm)
    out_p = patched(input_ids=ids, attention_mask=am, global_attention_mask=gm)
    # two layers, three batch rows with three different (global set, padding) combinations
    assert len(calls) == 2 * 3
    for name in ("last_hidden_state", "pooler_output"):
        a, b = getattr(out_p, name), getattr(out_s, name)
        assert a.shape == b.shape
        assert float((a - b).detach().abs().max()) <= 1e-4, name
    weights = torch.randn(out_s.last_hidden_state.shape, generator=torch.Generator().manual_seed(3))
    for out in (out_s, out_p):
        ((out.last_hidden_state * weights).sum() + out.pooler_output.square().sum()).backward()
    checked = assert_grads_close(patched, stock)
    assert any("query_global" in n for n, p in patched.named_parameters() if p.grad is not None)
    assert checked > 30


def test_patch_keeps_weights_and_state_dict_and_is_idempotent():
    stock, patched = stock_and_patched()
    assert list(stock.state_dict()) == list(patched.state_dict())
    for (n1, a), (n2, b) in zip(stock.state_dict().items(), patched.state_dict().items()):
        assert torch.equal(a, b), n1
    layer = patched.encoder.layer[0].attention.self
    hf_cls = transformers.models.longformer.modeling_longformer.LongformerSelfAttention
    assert isinstance(layer, hf_cls) and type(layer) is not hf_cls
    assert patch_longformer(patched) is patched
    assert type(patched.encoder.layer[0].attention.self) is type(layer)  # not wrapped twice


def test_masked_lm_trains_patched_like_stock():
    stock, patched = stock_and_patched(transformers.LongformerForMaskedLM, seed=4)
    ids, am, gm = inputs(seed=5)
    labels = ids.masked_fill(am == 0, -100)
    for model in (stock, patched):
        model.train()  # attention dropout is 0, hidden dropout 0: deterministic
    loss_s = stock(input_ids=ids, attention_mask=am, global_attention_mask=gm, labels=labels).loss
    loss_p = patched(input_ids=ids, attention_mask=am, global_attention_mask=gm, labels=labels).loss
    assert abs(loss_s.item() - loss_p.item()) <= 1e-4
    loss_s.backward()
    loss_p.backward()
    assert assert_grads_close(patched, stock) > 30


def test_output_attentions_falls_back_to_hf(monkeypatch):
    stock, patched = stock_and_patched()
    calls = []
    monkeypatch.setattr(sat, "sparse_attention", lambda *a, **k: calls.append(1))
    ids, am, gm = inputs()
    with torch.no_grad():
        out_s = stock(input_ids=ids, attention_mask=am, global_attention_mask=gm, output_attentions=True)
        out_p = patched(input_ids=ids, attention_mask=am, global_attention_mask=gm, output_attentions=True)
    assert not calls  # HF's own code ran
    assert torch.equal(out_s.last_hidden_state, out_p.last_hidden_state)
    for a, b in zip(out_s.attentions + out_s.global_attentions, out_p.attentions + out_p.global_attentions):
        assert torch.equal(a, b)


def test_no_global_token_and_no_padding():
    stock, patched = stock_and_patched(seed=2)
    ids = inputs(seed=7)[0][:2]
    with torch.no_grad():
        a = stock(input_ids=ids).last_hidden_state
        b = patched(input_ids=ids).last_hidden_state
    assert float((a - b).abs().max()) <= 1e-4


def test_attention_dropout_in_training_is_refused():
    torch.manual_seed(0)
    model = patch_longformer(transformers.LongformerModel(config(attention_probs_dropout_prob=0.1)))
    ids, am, gm = inputs()
    model.train()
    with pytest.raises(RuntimeError, match="attention_probs_dropout_prob=0.0"):
        model(input_ids=ids, attention_mask=am, global_attention_mask=gm)
    model.eval()  # inference ignores dropout: fine
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=am).last_hidden_state.shape == (3, N, E)


def test_bad_models():
    with pytest.raises(TypeError, match="torch.nn.Module.*dict"):
        patch_longformer({})
    with pytest.raises(ValueError, match="holds no transformers LongformerSelfAttention"):
        patch_longformer(torch.nn.Linear(2, 2))
    _, patched = stock_and_patched()
    ids, am, gm = inputs()
    with pytest.raises(TypeError, match="bfloat16"):
        patched.to(torch.bfloat16)(input_ids=ids, attention_mask=am)
