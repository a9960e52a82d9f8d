"""Bytes of one tensor's storage as bitsandbytes and PyTorch's optimizers hold it: packed quantized weights, their
quantization constants, and Adam's states (32-bit or bitsandbytes' block-wise 8-bit)."""

from __future__ import annotations

from qtune.config import FOUR_BIT, Quant

NF4_BLOCKSIZE = 64
"""bitsandbytes' default 4-bit block size: one absmax constant per 64 weights (QLoRA paper, section 3)."""
NESTED_BLOCKSIZE = 256
"""Double quantization: the 8-bit absmax constants are themselves quantized in blocks of 256 with one fp32 scale
each (QLoRA paper, section 3 "Double Quantization"; bitsandbytes ``quantize_4bit(compress_statistics=True)``)."""

BNB_OPTIM_BLOCKSIZE = 256
"""bitsandbytes 8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each of the
two Adam states is stored as uint8 with one fp32 absmax per block of values. The paper used blocks of 2048; the
bitsandbytes release qtune pins (0.50) uses 256 (``Optimizer2State.init_state``: ``blocksize = 256``)."""
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes 8-bit optimizers keep fp32 states for tensors of fewer elements (``min_8bit_size``, default 4096)."""
BNB_QMAP_BYTES = 2 * 256 * 4
"""The two 256-entry fp32 quantization maps (signed and unsigned dynamic maps) an 8-bit optimizer holds once."""
BNB_PAGED_MIN_SIZE = 100_000
"""bitsandbytes paged optimizers put the states of tensors of at least this many elements in CUDA unified memory
(``Optimizer8bit.get_state_buffer``: ``p.numel() < 1e5`` stays an ordinary tensor)."""


def quantized_weight_bytes(numel: int, quant: Quant) -> int:
    """Storage of one quantized weight matrix: 4-bit packs two values per byte (``Params4bit`` is uint8 of
    ceil(n/2) elements), LLM.int8() keeps one int8 per value (Dettmers et al. 2022)."""
    return (numel + 1) // 2 if quant in FOUR_BIT else numel


def quant_constant_bytes(numel: int, out_features: int, quant: Quant, double_quant: bool) -> int:
    """Quantization constants of one weight matrix, as bitsandbytes stores them in its ``QuantState``.

    4-bit (QLoRA, section 3; bitsandbytes ``quantize_4bit``): one absmax per block of 64, fp32, or with double
    quantization uint8 plus one fp32 scale per 256 absmax values, an fp32 offset and the 256-entry fp32 code of
    the second level; every layer also holds the 16-entry fp32 NF4/FP4 code. That is 0.5 bit per weight without
    and 0.127 bit with double quantization. LLM.int8(): one fp32 scale per output row (``SCB``).
    """
    if quant == "int8":
        return 4 * out_features
    blocks = -(-numel // NF4_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return 4 * blocks + code
    return blocks + 4 * (-(-blocks // NESTED_BLOCKSIZE)) + 4 + 256 * 4 + code


def optimizer_state_bytes(tensors, optim: str, param_bytes: int, device: str = "cuda") -> tuple[int, int]:
    """Adam states of the trainable ``tensors`` ((elements, is an embedding) pairs) under transformers' ``optim``:
    (bytes PyTorch's allocator holds, bytes in CUDA unified memory).

    adamw_torch / adamw_torch_fused: exp_avg and exp_avg_sq per parameter in its dtype (``param_bytes``;
    Loshchilov & Hutter 2019). adamw_8bit (bitsandbytes, Dettmers et al. 2022): both states uint8 with one fp32
    absmax per :data:`BNB_OPTIM_BLOCKSIZE` values each, plus the two quantization maps once; tensors below
    :data:`BNB_MIN_8BIT_SIZE` elements and embeddings (transformers' Trainer registers nn.Embedding weights for
    32-bit states) keep two fp32 states. paged_adamw_8bit: the same, but on cuda the states of tensors of at least
    :data:`BNB_PAGED_MIN_SIZE` elements are paged (``cudaMallocManaged``): outside PyTorch's allocator, moved to CPU
    memory when the GPU runs short. Raises ValueError for an optimizer qtune does not offer.
    """
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * param_bytes * sum(n for n, _ in tensors), 0
    if optim not in ("adamw_8bit", "paged_adamw_8bit"):
        raise ValueError(f"optimizer {optim!r} is not modelled")
    paged = optim == "paged_adamw_8bit" and device == "cuda"
    allocated = managed = 0
    eight_bit = False
    for n, is_embedding in tensors:
        if n < BNB_MIN_8BIT_SIZE or is_embedding:
            states = 2 * 4 * n
        else:
            states = 2 * n
            allocated += 2 * 4 * -(-n // BNB_OPTIM_BLOCKSIZE)  # absmax1, absmax2: ordinary tensors
            eight_bit = True
        if paged and n >= BNB_PAGED_MIN_SIZE:
            managed += states
        else:
            allocated += states
    return allocated + (BNB_QMAP_BYTES if eight_bit else 0), managed
