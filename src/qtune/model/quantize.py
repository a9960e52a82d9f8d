"""QuantConfig -> the arguments ``AutoModelForCausalLM.from_pretrained`` needs (bitsandbytes for 8/4-bit).

Formats: LLM.int8() (Dettmers et al. 2022) and 4-bit NF4/FP4 with optional double quantization (QLoRA,
Dettmers et al. 2023), as exposed by ``transformers.BitsAndBytesConfig``.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig

from qtune.config import FOUR_BIT, KBIT, QuantConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_quantized(q: QuantConfig) -> bool:
    """True for formats whose frozen weights bitsandbytes stores quantized (int8, nf4, fp4)."""
    return q.quant in KBIT


@functools.cache
def cpu_bf16_fast(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (a bf16 matmul faster than an fp32 one).

    True when torch's oneDNN backend is available and the CPU lists a native bf16 instruction: x86 ``amx_bf16``
    (Intel AMX tiles, Sapphire Rapids and later) or ``avx512_bf16`` (Cooper Lake, Zen 4 and later), ARM ``bf16``
    (Armv8.6-A BFloat16, e.g. Graviton 3, Neoverse V1, Apple M2 and later running Linux). CPUs without one of
    them emulate bf16 with fp32 arithmetic plus conversions, which is slower than fp32. Read from
    ``cpuinfo`` (``/proc/cpuinfo``) once per process; False where that file is absent (macOS, Windows).
    On the 2-core Xeon qtune is built on (amx_bf16, avx512_bf16), a [2048x576]x[576x1536] matmul runs at 433
    GFLOP/s in bf16 against 112 GFLOP/s in fp32 (issue 16's measurement).
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def compute_dtype(q: QuantConfig, cuda: bool | None = None) -> torch.dtype:
    """dtype of the matmuls (activations) and of the non-quantized parameters of a quantized base.

    ``auto`` picks bfloat16 on a CUDA device that supports it and float32 elsewhere, CPUs included: on this
    project's 2-core Xeon (AMX-BF16, AVX512-BF16) the demo recipe trained no faster in bf16 than in fp32 (5.59 vs
    5.46 s a step, 58 steps side by side) with a 5% higher peak RSS and validation loss 0.9617 against 0.9585
    (bench/RESULTS.md, 2026-12-01), so bf16 on a CPU is a switch (``compute_dtype: bfloat16``), not the default.
    fp16/bf16 quant formats force their own dtype. With 16-bit compute, training runs under ``torch.autocast``
    (the Trainer's ``bf16``, on CPU too) while LoRA weights, their gradients and the optimizer states stay float32
    (PEFT keeps adapter weights fp32), the mixed-precision contract of Micikevicius et al. 2018.
    """
    if q.quant == "fp16":
        return torch.float16
    if q.quant == "bf16":
        return torch.bfloat16
    if q.compute_dtype != "auto":
        return _DTYPES[q.compute_dtype]
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def compute_autocast(q: QuantConfig, device: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the 16-bit compute dtype of ``q`` on ``device`` ("cpu", "cuda:0"), or a no-op for
    float32 compute: evaluation outside the Trainer runs the matmuls as training's autocast ran them."""
    dtype = compute_dtype(q, device.startswith("cuda"))
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=dtype)


def load_kwargs(q: QuantConfig) -> dict:
    """Keyword arguments for ``from_pretrained``: ``dtype`` and, for bitsandbytes formats, ``quantization_config``."""
    dtype = compute_dtype(q)
    # an explicit skip list replaces transformers' default (the LM head), so the LM head is named again
    skip = {"llm_int8_skip_modules": ["lm_head", *q.skip_modules]} if q.skip_modules else {}
    if q.quant == "int8":
        return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(load_in_8bit=True, **skip)}
    if q.quant in FOUR_BIT:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8 if q.quant_storage == "uint8" else _DTYPES[q.quant_storage],
            **skip,
        )
        return {"dtype": dtype, "quantization_config": bnb}
    if q.quant == "none":  # 32-bit weights, as the format says and the memory estimate counts them
        return {"dtype": torch.float32}
    return {"dtype": dtype}


def precision_warnings(q: QuantConfig, cuda: bool | None = None) -> list[str]:
    """Warnings for the precision settings of ``q`` on this hardware (``cuda``: None = detect).

    fp16 compute with 4-bit weights: fp16's range (max 65504) lets activations overflow to inf, a NaN loss
    follows; bfloat16 has float32's range. ``compute_dtype: auto`` picks bfloat16 wherever the GPU supports it.
    """
    out = []
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda and compute_dtype(q, cuda) == torch.bfloat16 and not cpu_bf16_fast():
        out.append(
            "bfloat16 compute on a CPU without native bf16 matmuls (no amx_bf16, avx512_bf16 or bf16 flag): "
            "it is emulated and slower than quant.compute_dtype float32"
        )
    if q.quant in FOUR_BIT and compute_dtype(q, cuda) == torch.float16:
        cuda = torch.cuda.is_available() if cuda is None else cuda
        better = "bfloat16 (this GPU has it)" if cuda and torch.cuda.is_bf16_supported() else "float32"
        out.append(
            f"quant.compute_dtype float16 with {q.quant} weights: fp16 activations can overflow to inf "
            f"and the loss to NaN; use {better}"
        )
    return out


def unmatched_skip_modules(model, patterns) -> list[str]:
    """The names in ``patterns`` (``quant.skip_modules``) that match no ``nn.Linear`` of ``model``, by full name
    or name suffix (``down_proj`` matches ``model.layers.0.mlp.down_proj``)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [k for k in patterns if not any(n == k or n.endswith("." + k) for n in linear)]


def dequantized_weight(layer) -> torch.Tensor:
    """The float32 weight [out_features, in_features] a bitsandbytes ``Linear4bit`` computes with.

    On a CPU with AVX512-BF16, bitsandbytes' first forward pass repacks the weight for its bf16 kernel; that
    packing is undone first (not exact: the repacked scales are bf16)."""
    import bitsandbytes.functional as F

    data, state = layer.weight.data, layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
    return F.dequantize_4bit(data, state).float()


def dequantize_for_inference(model) -> int:
    """Replace every bitsandbytes 4-bit weight by its dequantized copy in a plain ``torch.nn.Linear``, in place.

    The 4-bit layers compute ``x @ dequantize(W)`` in the compute dtype on every call; the replacement holds
    ``dequantize(W)`` once, in that dtype, so outputs are the same up to float rounding order while CPU generation
    skips the per-token dequantization. LoRA layers keep their adapters (only their base layer is replaced).
    Call it before any forward pass: on a CPU with AVX512-BF16, bitsandbytes' first forward repacks the weights
    for its bf16 kernel with bf16 scales, and undoing that (done here) is not exact. Returns the number of layers
    replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = dequantized_weight(child)
                dtype = child.compute_dtype or torch.float32
                linear = torch.nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, device=w.device, dtype=dtype
                )
                with torch.no_grad():
                    linear.weight.copy_(w.to(dtype))
                    if child.bias is not None:
                        linear.bias.copy_(child.bias.to(dtype))
                linear.requires_grad_(False)
                setattr(parent, name, linear)
                replaced += 1
    return replaced
