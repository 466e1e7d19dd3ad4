"""attn_implementation='sparseattn', the mask side: every mask equals transformers' own sdpa_mask, cell for cell.

The masks are compared on small shapes where the dense form is cheap: causal, sliding-window causal,
bidirectional, sliding-window bidirectional, with cache offsets (decode, chunked prefill, a full sliding
cache), left and right padding, packed sequences, and an unrecognised mask function (evaluated in row
blocks). The attention function's errors are here too.
"""

import inspect
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import sparseattn.hf as sh  # noqa: E402
from sparseattn.hf.attention import sparse_attention_forward  # noqa: E402
from sparseattn.hf.masks import RowRuns, SparseMask, sparse_mask  # noqa: E402
from sparseattn.patterns.windows import SlidingWindow  # noqa: E402

mu = transformers.masking_utils
pytestmark = pytest.mark.compat


def dense(m):
    out = np.zeros((m.batch_size, m.q_length, m.kv_length), bool)
    for b in range(m.batch_size):
        out[b] = m.pattern_of(b).to_dense()
        if m.key_padding_mask is not None:
            out[b] &= ~m.key_padding_mask[b][None]
    return out


# transformers 4.x: sdpa_mask takes the queries' positions (cache_position), 5.x their length and offset
CACHE_POSITION = "cache_position" in inspect.signature(mu.sdpa_mask).parameters
# transformers 4.x has no bidirectional mask functions (its encoders do not build masks through masking_utils)
HAS_BIDIRECTIONAL = hasattr(mu, "sliding_window_bidirectional_mask_function")
no_bidirectional = pytest.mark.skipif(
    not HAS_BIDIRECTIONAL,
    reason=f"transformers {transformers.__version__} has no bidirectional mask functions in masking_utils (5.0+)",
)


def reference(b, nq, nk, qo, ko, fn, am, vmap=False):
    if CACHE_POSITION:
        ref = mu.sdpa_mask(b, cache_position=torch.arange(qo, qo + nq), kv_length=nk, kv_offset=ko, mask_function=fn,
                           attention_mask=am, allow_is_causal_skip=False)  # fmt: skip
    else:
        ref = mu.sdpa_mask(b, nq, nk, qo, ko, fn, am, allow_is_causal_skip=False, use_vmap=vmap)
    return ref.expand(b, 1, nq, nk)[:, 0].numpy()


FUNCTIONS = {
    "causal": (mu.causal_mask_function, "causal"),
    "sliding causal": (mu.sliding_window_causal_mask_function(4), "sliding causal"),
}
if HAS_BIDIRECTIONAL:
    FUNCTIONS["bidirectional"] = (mu.bidirectional_mask_function, "bidirectional")
    FUNCTIONS["sliding bidirectional"] = (mu.sliding_window_bidirectional_mask_function(2), "sliding bidirectional")
no_packing = pytest.mark.skipif(
    not hasattr(mu, "packed_sequence_mask_function"),
    reason=f"transformers {transformers.__version__} has no packed-sequence masks in masking_utils (4.53.1+)",
)
NAMES = list(FUNCTIONS) + [
    pytest.param(name, marks=no_bidirectional) for name in ("bidirectional", "sliding bidirectional") if name not in FUNCTIONS
]
# (q_length, kv_length, q_offset, kv_offset): prefill, decode, chunked prefill, a full sliding cache, odd offsets
SHAPES = [(12, 12, 0, 0), (1, 12, 11, 0), (3, 12, 9, 0), (1, 4, 11, 8), (4, 7, 8, 5), (2, 5, 0, 0)]


def padding(kind):
    am = torch.ones(2, 12, dtype=torch.bool)
    if kind == "left":
        am[1, :3] = False
    elif kind == "right":
        am[0, 9:] = False
    return None if kind == "none" else am


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pad", ["none", "left", "right"])
def test_masks_equal_sdpa_mask(name, shape, pad):
    fn, kind = FUNCTIONS[name]
    m = sparse_mask(2, *shape, mask_function=fn, attention_mask=padding(pad))
    assert m.kind == kind
    assert not isinstance(m.patterns, list)  # one pattern for the batch, padding as key_padding_mask
    np.testing.assert_array_equal(dense(m), reference(2, *shape, fn, padding(pad)))


def test_windows_are_planned_from_parameters():
    """The causal and sliding layers become SlidingWindow (the engine plans them in O(n), no CSR)."""
    for fn, _ in FUNCTIONS.values():
        m = sparse_mask(1, 16384, 16384, 0, 0, fn)
        assert type(m.patterns) is SlidingWindow
    assert sparse_mask(1, 1, 4, 11, 8, mu.sliding_window_causal_mask_function(4)).patterns.offset == 3


def packed(base, pos):
    """The mask function transformers builds for packed rows (4.x: no position remap; the window sees indices)."""
    pos = torch.as_tensor(pos)
    ids = mu.find_packed_sequence_indices(pos)
    if not hasattr(mu, "remap_positions_for_packed_sequence"):
        return mu.and_masks(base, mu.packed_sequence_mask_function(ids))
    return mu.and_masks(mu.remap_positions_for_packed_sequence(base, pos), mu.packed_sequence_mask_function(ids))


@no_packing
@pytest.mark.parametrize("name", NAMES)
def test_packed_sequences(name):
    fn = FUNCTIONS[name][0]
    pos = [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6]]
    f = packed(fn, pos)
    m = sparse_mask(2, 12, 12, 0, 0, f)
    assert m.kind.endswith("packed") and isinstance(m.patterns, list)
    assert all(isinstance(p, RowRuns) for p in m.patterns)
    np.testing.assert_array_equal(dense(m), reference(2, 12, 12, 0, 0, f, None))


def test_unrecognised_mask_function_is_evaluated_in_row_blocks():
    fn = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < 2)  # e.g. a prefix of image tokens
    with pytest.warns(UserWarning, match="evaluated in row blocks"):
        m = sparse_mask(2, 12, 12, 0, 0, fn, padding("left"))
    assert m.kind == "predicate"
    np.testing.assert_array_equal(dense(m), reference(2, 12, 12, 0, 0, fn, padding("left"), vmap=True))
    per_row = torch.tensor([1, 3])  # a predicate that depends on the batch row
    f2 = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv >= per_row[b])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2 = sparse_mask(2, 6, 6, 0, 0, f2)
    assert isinstance(m2.patterns, list)
    np.testing.assert_array_equal(dense(m2), reference(2, 6, 6, 0, 0, f2, None, vmap=True))


def test_register_is_idempotent():
    assert sh.register() == sh.register() == "sparseattn"
    assert transformers.AttentionInterface._global_mapping["sparseattn"] is sparse_attention_forward
    assert transformers.masking_utils.AttentionMaskInterface._global_mapping["sparseattn"] is sparse_mask


def test_register_names_the_installed_and_the_minimum_transformers(monkeypatch):
    """A transformers below the minimum is refused by name (the minimum is raised here: the installed one is real)."""
    assert sh.MIN_TRANSFORMERS == "4.53.0"
    monkeypatch.setattr(sh, "MIN_TRANSFORMERS", "99.0")
    installed = transformers.__version__.replace(".", r"\.")
    with pytest.raises(ImportError, match=rf"transformers >= 99\.0 .*transformers {installed} is installed"):
        sh.register()


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def qkv(n=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, n, 16, generator=g, dtype=dtype), *(torch.randn(1, 2, n, 16, generator=g, dtype=dtype) for _ in range(2))


def test_attention_function_against_sdpa_without_and_with_mask():
    q, k, v = qkv()
    out, w = sparse_attention_forward(_Module(), q, k, v, None, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    assert w is None and out.shape == (1, 8, 4, 16)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    m = sparse_mask(1, 8, 8, 0, 0, mu.sliding_window_causal_mask_function(3))
    out, _ = sparse_attention_forward(_Module(), q, k, v, m, scaling=0.25, sliding_window=3)
    allowed = torch.from_numpy(m.patterns.to_dense())
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    out4, _ = sparse_attention_forward(_Module(), q, k, v, allowed[None, None], scaling=0.25)  # a user's 4-D mask
    torch.testing.assert_close(out4, out)


def test_errors_name_the_option():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="attention_dropout"):
        sparse_attention_forward(_Module(), q, k, v, None, dropout=0.1)
    with pytest.raises(TypeError, match="float32 or float64.*bfloat16|bfloat16.*float32"):
        sparse_attention_forward(_Module(), *(t.bfloat16() for t in (q, k, v)), None)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 1, 6, 6\).*\(1, 1, 8, 8\)"):
        sparse_attention_forward(_Module(), q, k, v, sparse_mask(1, 6, 6, 0, 0, mu.causal_mask_function))
    with pytest.raises(NotImplementedError, match="position_bias"):
        sparse_attention_forward(_Module(), q, k, v, None, position_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="query and key give"):
        sparse_attention_forward(_Module(), q, k, v, sparse_mask(3, 8, 8, 0, 0, mu.causal_mask_function))
    with pytest.raises(TypeError, match="sparseattn mask, a 4-D tensor or None"):
        sparse_attention_forward(_Module(), q, k, v, "causal")
    bidir = _Module()
    bidir.is_causal = False
    with pytest.raises(ValueError, match="sliding_window=3"):
        sparse_attention_forward(bidir, q, k, v, None, sliding_window=3)
    assert isinstance(sparse_mask(1, 8, 8), SparseMask)  # the default mask function is causal
