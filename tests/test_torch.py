"""The torch adapter against torch's own dense float64 attention (autograd), gradcheck, and torch.compile."""

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")

import sparseattn as sa  # noqa: E402
import sparseattn.torch as sat  # noqa: E402
from sparseattn.torch import sparse_attention  # noqa: E402


def dense_reference(q, k, v, allowed, key_padding_mask=None, scale=None):
    """Masked softmax attention written with torch ops in float64; its gradient is torch's autograd.

    ``allowed`` is a bool tensor broadcastable to (..., n_q, n_k).  Rows without an allowed key give 0.
    """
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = torch.as_tensor(allowed)
    if key_padding_mask is not None:
        kpm = torch.as_tensor(key_padding_mask)
        allowed = allowed & ~kpm.reshape(kpm.shape[:-1] + (1,) * (q.ndim - 1 - kpm.ndim) + (1, kpm.shape[-1]))
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -1e300)  # finite: an empty row stays NaN-free, its probabilities are zeroed
    p = torch.softmax(s, dim=-1) * allowed.any(dim=-1, keepdim=True)
    return p @ v


def make(shape, dtype, seed, requires_grad=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)


def dense_mask(pattern):
    if isinstance(pattern, (list, tuple)):
        return torch.stack([dense_mask(p) for p in pattern])  # (heads, n_q, n_k)
    if isinstance(pattern, torch.Tensor):
        return pattern
    p = sa.patterns.base.as_pattern(pattern)
    return torch.from_numpy(p.to_dense())


# Each case: q, k, v shapes, pattern, key padding (bool array broadcast to (b, n_k)) or None, scale.
def _cases():
    rng = np.random.default_rng(3)
    n = 19
    pad = np.zeros((2, n), dtype=bool)
    pad[1, 14:] = True
    pad[1, 3] = True  # a padded global key
    rect = rng.random((11, 17)) < 0.25
    rect[[2, 7]] = False  # empty rows
    rect = sp.csr_array(rect)
    return {
        "band_globals": ((2, 3, n, 8), (2, 3, n, 8), (2, 3, n, 8), sa.longformer(n, 6, [0, 9]), None, None),
        "dilated_asymmetric": ((3, n, 8), (3, n, 8), (3, n, 8), sa.sliding_window(n, left=4, right=2, dilation=2), None, 0.3),
        "per_head_padding": (
            (2, 3, n, 8), (2, 3, n, 8), (2, 3, n, 8),
            [sa.longformer(n, 4, [3]), sa.sliding_window(n, 1), sa.random_pattern(n, n, 5, seed=1)], pad, None,
        ),
        "kv_broadcast_dv": ((2, 3, n, 8), (2, 1, n, 8), (2, 1, n, 5), sa.longformer(n, 4, [0]), pad, None),
        "rect_empty_rows": ((2, 11, 6), (2, 17, 6), (2, 17, 4), rect, None, None),
        "large_logits": ((1, 2, n, 8), (1, 2, n, 8), (1, 2, n, 8), sa.longformer(n, 6, [0]), None, 30.0),
        "bool_tensor_pattern": ((2, n, 8), (2, n, 8), (2, n, 8), torch.from_numpy(rng.random((n, n)) < 0.3), None, None),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dense_torch_reference(name, dtype):
    qs, ks, vs, pattern, pad, scale = CASES[name]
    q, k, v = make(qs, dtype, 1), make(ks, dtype, 2), make(vs, dtype, 3)
    kpm = None if pad is None else torch.from_numpy(pad)
    before = [x.detach().clone() for x in (q, k, v)]
    out = sparse_attention(q, k, v, pattern, scale=scale, key_padding_mask=kpm)
    qr, kr, vr = (x.detach().to(torch.float64).requires_grad_() for x in (q, k, v))
    ref = dense_reference(qr, kr, vr, dense_mask(pattern), kpm, scale)
    assert out.dtype == dtype and out.shape == ref.shape
    go = make(out.shape, torch.float64, 4, requires_grad=False)
    out.backward(go.to(dtype))
    ref.backward(go)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    scale_all = max(float(x.grad.abs().max()) for x in (qr, kr, vr))
    assert float((out.detach().double() - ref.detach()).abs().max()) <= tol * max(1.0, float(ref.detach().abs().max()))
    for name_, a, r in (("dq", q, qr), ("dk", k, kr), ("dv", v, vr)):
        assert a.grad.dtype == dtype and a.grad.shape == a.shape, name_
        err = float((a.grad.double() - r.grad).abs().max())
        assert err <= tol * max(float(r.grad.abs().max()), 1e-3 * scale_all), (name_, err)
    for b, x in zip(before, (q, k, v)):
        assert torch.equal(b, x.detach())  # inputs untouched


@pytest.mark.parametrize("name", ["band_globals", "per_head_padding", "kv_broadcast_dv", "rect_empty_rows"])
def test_gradcheck_float64(name):
    qs, ks, vs, pattern, pad, scale = CASES[name]
    q, k, v = make(qs, torch.float64, 5), make(ks, torch.float64, 6), make(vs, torch.float64, 7)
    kpm = None if pad is None else torch.from_numpy(pad)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sparse_attention(q, k, v, pattern, scale=scale, key_padding_mask=kpm), (q, k, v), fast_mode=True
    )


def test_gradcheck_full_small():
    """The slow (full Jacobian) gradcheck on a tiny case with globals and padding."""
    n = 7
    q, k, v = (make((2, 1, n, 3), torch.float64, s) for s in (8, 9, 10))
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[0, 5:] = True
    p = sa.longformer(n, 2, [1])
    assert torch.autograd.gradcheck(lambda q, k, v: sparse_attention(q, k, v, p, key_padding_mask=pad), (q, k, v))


def test_zero_copy_views_and_strided_inputs(monkeypatch):
    """The NumPy entry points get views of the tensors' memory, whatever the strides; outputs are not copied."""
    seen = {}
    real_fwd, real_bwd = sat._np_sparse_attention, sat._np_sparse_attention_backward

    def fwd(q, k, v, *args, **kw):
        seen["fwd"] = (q, k, v)
        res = real_fwd(q, k, v, *args, **kw)
        seen["out"] = res[0] if isinstance(res, tuple) else res
        return res

    def bwd(go, q, k, v, *args, **kw):
        seen["bwd"] = (q, k, v)
        res = real_bwd(go, q, k, v, *args, **kw)
        seen["grads"] = res
        return res

    monkeypatch.setattr(sat, "_np_sparse_attention", fwd)
    monkeypatch.setattr(sat, "_np_sparse_attention_backward", bwd)
    n = 24
    base = make((2, n, 3, 16), torch.float32, 11, requires_grad=False)
    q = base.transpose(1, 2).requires_grad_()  # (2, 3, n, 16), not contiguous
    k = make((2, 3, n, 16), torch.float32, 12)
    v = make((1, 1, n, 16), torch.float32, 13).detach().expand(2, 3, n, 16).requires_grad_()  # zero strides
    p = sa.longformer(n, 4, [0])
    out = sparse_attention(q, k, v, p)
    for t, a in zip((q, k, v), seen["fwd"]):
        assert np.shares_memory(a, t.detach().numpy())
    assert np.shares_memory(seen["out"], out.detach().numpy())
    grads = torch.autograd.grad(out.sum(), (q, k, v))  # an expanded (stride 0) grad_out
    for t, a in zip((q, k, v), seen["bwd"]):
        assert np.shares_memory(a, t.detach().numpy())
    for g, a in zip(grads, seen["grads"]):
        assert np.shares_memory(g.numpy(), a)
    ref = dense_reference(q.detach(), k.detach(), v.detach(), dense_mask(p))
    assert float((out.detach().double() - ref).abs().max()) <= 2e-5 * float(ref.abs().max())


def test_no_grad_runs_the_plain_forward(monkeypatch):
    n = 16
    q, k, v = (make((2, n, 8), torch.float32, s) for s in (1, 2, 3))
    p = sa.sliding_window(n, 2)
    with_grad = sparse_attention(q, k, v, p)
    calls = []
    real = sat._np_sparse_attention
    monkeypatch.setattr(sat, "_np_sparse_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    with torch.no_grad():
        out = sparse_attention(q, k, v, p)
    assert out.grad_fn is None and not out.requires_grad
    assert not calls[0].get("return_lse", False)
    assert torch.equal(out, with_grad.detach())
    # no input requiring grad: no graph either
    out = sparse_attention(q.detach(), k.detach(), v.detach(), p)
    assert out.grad_fn is None
    # only v requires grad: q, k get no gradient, v's matches the reference
    v2 = v.detach().clone().requires_grad_()
    sparse_attention(q.detach(), k.detach(), v2, p).sum().backward()
    vr = v.detach().double().requires_grad_()
    dense_reference(q.detach(), k.detach(), vr, dense_mask(p)).sum().backward()
    assert float((v2.grad.double() - vr.grad).abs().max()) <= 2e-5 * float(vr.grad.abs().max())


def test_bad_inputs():
    n = 8
    q, k, v = (make((2, n, 4), torch.float32, s) for s in (1, 2, 3))
    p = sa.sliding_window(n, 1)
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match=rf"k must be float32 or float64, got {dt}.*half precision"):
            sparse_attention(q, k.detach().to(dt), v, p)
    with pytest.raises(TypeError, match="q must be float32 or float64, got torch.int64"):
        sparse_attention(torch.zeros(2, n, 4, dtype=torch.int64), k, v, p)
    with pytest.raises(TypeError, match="same dtype.*q torch.float64"):
        sparse_attention(q.double(), k, v, p)
    with pytest.raises(TypeError, match="v must be a torch.Tensor.*ndarray"):
        sparse_attention(q, k, v.detach().numpy(), p)
    meta = torch.empty(2, n, 4, device="meta")  # stands in for CUDA: any non-CPU device
    with pytest.raises(ValueError, match=r"q is on device meta.*CPU only.*q\.cpu\(\)"):
        sparse_attention(meta, k, v, p)
    with pytest.raises(TypeError, match="k must be a dense"):
        sparse_attention(q, k.detach().to_sparse(), v, p)
    grad_mask = torch.zeros(2, n, requires_grad=True)
    with pytest.raises(ValueError, match="key_padding_mask requires grad"):
        sparse_attention(q, k, v, p, key_padding_mask=grad_mask)
    with pytest.raises(ValueError, match="key_padding_mask is on device meta"):
        sparse_attention(q, k, v, p, key_padding_mask=torch.zeros(2, n, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="key_padding_mask must be a boolean"):
        sparse_attention(q, k, v, p, key_padding_mask=torch.zeros(2, n))
    with pytest.raises(ValueError, match="scale requires grad"):
        sparse_attention(q, k, v, p, scale=torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match=r"k has shape \(2, 7, 4\)"):
        sparse_attention(q, make((2, 7, 4), torch.float32, 4), v, p)
    with pytest.raises(ValueError, match="pattern has shape"):
        sparse_attention(q, k, v, sa.sliding_window(n + 1, 1))


def test_double_backward_is_refused_clearly():
    n = 8
    q, k, v = (make((n, 4), torch.float64, s) for s in (1, 2, 3))
    out = sparse_attention(q, k, v, sa.sliding_window(n, 2))
    with pytest.raises(RuntimeError, match="no double backward.*create_graph=True"):
        torch.autograd.grad(out.sum(), q, create_graph=True)
    (gq,) = torch.autograd.grad(out.sum(), q)  # the graph is still usable for a first derivative
    assert gq.shape == q.shape


def test_saved_mask_is_a_copy():
    """Changing the caller's mask between forward and backward does not change the gradient."""
    n = 12
    q, k, v = (make((2, 1, n, 4), torch.float64, s) for s in (1, 2, 3))
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, 8:] = True
    out = sparse_attention(q, k, v, sa.sliding_window(n, 3), key_padding_mask=pad)
    pad[:] = True
    out.sum().backward()
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    pad[:] = False
    pad[1, 8:] = True
    dense_reference(qr, kr, vr, dense_mask(sa.sliding_window(n, 3)), pad).sum().backward()
    for a, r in ((q, qr), (k, kr), (v, vr)):
        assert torch.allclose(a.grad, r.grad, atol=1e-10, rtol=0)


class _Block(torch.nn.Module):
    def __init__(self, n, e=16, h=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.nn.Linear(e, 3 * e)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.randn(3 * e, e, generator=g) / e**0.5)
        self.h, self.e = h, e
        self.pattern = sa.longformer(n, 4, [0])

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.e // self.h).permute(2, 0, 3, 1, 4)
        out = sparse_attention(q, k, v, self.pattern)
        return torch.tanh(out.transpose(1, 2).reshape(b, n, self.e)).square().sum()


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_graph_break(backend):
    """Under torch.compile the call is a graph break: same loss and gradients as eager, no crash."""
    if backend == "inductor":
        import shutil

        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
            pytest.skip("inductor on the CPU needs a C/C++ compiler")
    torch._dynamo.reset()
    model = _Block(20)
    x = make((2, 20, 16), torch.float32, 1, requires_grad=False)
    loss = model(x)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):  # the second call reuses the compiled graphs
        model.zero_grad()
        closs = compiled(x)
        closs.backward()
        assert torch.allclose(closs, loss, rtol=1e-5)
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-6), n
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compiler.disable.*graph break"):
        torch.compile(model, backend="eager", fullgraph=True)(x)


def test_numpy_entry_point_refuses_a_tensor_that_requires_grad():
    """torch's own advice (.detach().numpy()) would drop the gradient: point to the torch adapter instead."""
    q = make((2, 8, 4), torch.float32, 0)
    x = q.detach().numpy()
    for fn, args in ((sa.sparse_attention, (q, x, x, sa.sliding_window(8, 1))),
                     (sa.sparse_attention, (x, x, q, sa.sliding_window(8, 1)))):  # fmt: skip
        name = "q" if args[0] is q else "v"
        with pytest.raises(TypeError, match=rf"^{name} is a torch tensor that requires grad \(shape \(2, 8, 4\)\).*"
                                            r"sparseattn\.torch\.sparse_attention"):  # fmt: skip
            fn(*args)
    out = sa.sparse_attention(q.detach(), x, x, sa.sliding_window(8, 1))  # detached: fine
    assert out.shape == (2, 8, 4)


def test_gradcheck_with_softcap_alibi_and_learned_sinks():
    """dq, dk, dv and dsinks through the adapter against torch's finite differences (grouped-query heads)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    p = sa.causal(20, 6) | sa.global_tokens(20, [0])
    slopes = torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=torch.float64)

    def f(q, k, v, sinks):
        return sparse_attention(q, k, v, p, softcap=2.5, alibi_slopes=slopes, sinks=sinks)

    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_sinks_alone_get_a_gradient_and_a_slope_that_requires_grad_is_refused():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    sinks = torch.zeros(2, requires_grad=True)
    sparse_attention(q, k, v, sa.causal(6), sinks=sinks).sum().backward()
    assert sinks.grad is not None and sinks.grad.shape == (2,) and torch.all(sinks.grad != 0)
    with pytest.raises(ValueError, match="alibi_slopes requires grad"):
        sparse_attention(q, k, v, sa.causal(6), alibi_slopes=torch.ones(2, requires_grad=True))


def test_sinks_are_differentiable_and_match_the_concatenated_softmax():
    """GPT-OSS's s_aux: a per-head logit in each row's denominator, no value; its gradient flows (gradcheck)."""
    q, k, v = (make((1, 2, 12, 8), torch.float64, s) for s in (0, 1, 2))
    sinks = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    p = sa.causal(12, 4)
    assert torch.autograd.gradcheck(lambda q, k, v, s: sparse_attention(q, k, v, p, sinks=s), (q, k, v, sinks))
    allowed = torch.from_numpy(p.to_dense())
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~allowed, float("-inf"))
    logits = torch.cat([scores, sinks.view(1, 2, 1, 1).expand(1, 2, 12, 1)], dim=-1)
    ref = logits.softmax(-1)[..., :-1] @ v
    torch.testing.assert_close(sparse_attention(q, k, v, p, sinks=sinks), ref)
    with torch.no_grad():  # the plain forward takes them too
        torch.testing.assert_close(sparse_attention(q, k, v, p, sinks=sinks), ref.detach())
