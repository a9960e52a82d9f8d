"""qtune.model.attention: per-sample causal attention on packed rows equals the block-diagonal mask's result."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtune.model.attention import PACKED_SDPA, packed_sdpa, sample_spans, use_packed_attention

LENGTHS = [5, 9, 3, 1]


def _model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config)


def _packed():
    torch.manual_seed(1)
    xs = [torch.randint(0, 100, (1, n)) for n in LENGTHS]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return xs, torch.cat(xs, dim=1), position_ids


def test_sample_spans():
    _, ids, pos = _packed()
    assert sample_spans(pos, ids.shape[1]) == [(0, 5), (5, 14), (14, 17), (17, 18)]
    assert sample_spans(torch.arange(7)[None], 7) == [(0, 7)]
    assert sample_spans(None, 7) is None
    assert sample_spans(torch.arange(7)[None].expand(2, -1), 7) is None  # a batch of rows is not packed
    assert sample_spans(torch.arange(1, 8)[None], 7) is None  # a row that does not start a sample (a KV cache)


def test_packed_logits_equal_each_sample_alone_and_the_block_mask():
    model = _model().eval()
    xs, ids, pos = _packed()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=x, use_cache=False).logits for x in xs], dim=1)
        masked = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # transformers' block mask
        use_packed_attention(model)
        assert model.config._attn_implementation == PACKED_SDPA
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert (alone - masked).abs().max() < 1e-5
    assert (packed - alone).abs().max() < 1e-5
    assert (packed - masked).abs().max() < 1e-5


def test_packed_gradients_equal_the_block_mask_gradients():
    _, ids, pos = _packed()
    grads = []
    for packed in (False, True):
        model = _model()
        if packed:
            use_packed_attention(model)
        model.train()
        model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
def test_anything_but_a_packed_row_goes_to_sdpa_unchanged(batch):
    """A batch of rows, or one row holding one sample: exactly transformers' SDPA function's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(2)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(batch, 4, 6, 16), torch.randn(batch, 4, 6, 16), torch.randn(batch, 4, 6, 16)
    pos = torch.arange(6)[None].expand(batch, -1)
    ours, _ = packed_sdpa(module, q, k, v, None, scaling=0.25, position_ids=pos)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, position_ids=pos)
    assert torch.equal(ours, theirs)


def test_bf16_inputs_are_attended_in_float32_and_returned_in_bf16():
    torch.manual_seed(3)
    module = torch.nn.Module()
    q, k, v = (torch.randn(1, 4, 10, 16) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    exact, _ = packed_sdpa(module, q, k, v, None, scaling=0.25, position_ids=pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half, _ = packed_sdpa(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.25, position_ids=pos)
    assert half.dtype == torch.bfloat16
    ref = exact.bfloat16().float()  # fp32 attention of bf16-rounded inputs is within bf16 rounding of it
    assert (half.float() - ref).abs().max() < 0.05
    assert exact.shape == (1, 10, 4, 16)
