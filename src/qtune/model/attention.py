"""Attention over packed rows that computes each sample's causal block only (CPU training).

qtune's padding-free packing (:class:`qtune.data.tokenize.PackingCollator`) joins a micro-batch's samples into one
row [1, T = sum T_i] with ``position_ids`` restarting at 0 for each sample. transformers then builds a
block-diagonal causal mask and PyTorch's CPU SDPA kernel computes attention over the whole T x T square, cross-sample
blocks included, only to mask them: (sum T_i)^2 work where sum T_i^2 is needed. For the demo's batches of 4
CodeAlpaca samples that is about 4x the attention work; a profile of one bf16 demo step on 2 cores put attention
(mostly its backward) at a third of the step (``bench/profile_step.py``, bench/RESULTS.md).

:func:`packed_sdpa` splits the row at the restarts and runs ``scaled_dot_product_attention(is_causal=True)`` per
sample, which is exactly the block-diagonal causal attention (the same softmax over the same keys). On CPU it runs
in float32 whatever the compute dtype: PyTorch's CPU flash-attention backward in bf16 took 0.63 s of a bf16 demo
step against 0.18 s in fp32 (``bench/profile_step.py``, step 4), so the bf16 path casts q, k, v up and the
output back (the matmuls around attention stay bf16). Anything else —
a batch of several rows, a KV cache (generation), a single sample — goes to transformers' own SDPA function
unchanged. On CUDA qtune leaves attention to SDPA (or FlashAttention's varlen kernels, which already do this).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "qtune_packed_sdpa"
"""The ``attn_implementation`` name :func:`use_packed_attention` registers and sets."""


def sample_spans(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """[start, end) of each sample in a packed row whose ``position_ids`` [1, T] restart at 0 per sample, or None
    when ``position_ids`` is missing, has more than one row, or is not such a packed row of ``length`` tokens."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != (1, length):
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    return list(zip(starts, [*starts[1:], length], strict=True))


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function with transformers' attention-interface signature.

    Args:
        query: [1, H, T, D]; key, value: [1, H_kv, T, D] (grouped-query attention when H_kv < H).
        attention_mask: the block-diagonal causal mask transformers built; unused on the packed path.
        kwargs: ``position_ids`` [1, T] among them (transformers passes the decoder layer's through).

    Returns:
        (output [1, T, H, D], None), as ``sdpa_attention_forward``.
    """
    length = query.shape[2]
    spans = sample_spans(kwargs.get("position_ids"), length) if key.shape[2] == length else None
    if query.shape[0] != 1 or spans is None or len(spans) < 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = key.shape[1] != query.shape[1]
    # under autocast q and k leave the rotary embedding in fp32 while v is 16-bit: the output takes the 16-bit one
    dtype = next((t.dtype for t in (value, key, query) if t.dtype != torch.float32), torch.float32)
    if query.device.type == "cpu":  # CPU's 16-bit attention backward is the slower: attend in fp32
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast(query.device.type, enabled=False):  # autocast would cast SDPA's inputs back to 16-bit
        out = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, s:e],
                    key[:, :, s:e],
                    value[:, :, s:e],
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=True,
                    enable_gqa=gqa,
                )
                for s, e in spans
            ],
            dim=2,
        )  # [1, H, T, D]
    return out.to(dtype).transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> None:
    """Register :func:`packed_sdpa` (with SDPA's mask builder) under :data:`PACKED_SDPA` and switch ``model`` to it.

    Raises:
        ValueError: transformers refuses the implementation for this model (it then keeps its own).
    """
    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
