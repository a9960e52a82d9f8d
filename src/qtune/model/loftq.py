"""LoftQ initialisation of LoRA adapters on a 4-bit base, on any device.

LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", Algorithm 1 with
one iteration): the adapter starts from the best rank-r approximation of the quantization error, so that
``dequantize(Q) + scaling * B @ A`` is closer to the original weight ``W`` than ``dequantize(Q)`` alone.

With ``E = W - dequantize(Q)`` and its SVD ``E = U S V^T`` (Eckart-Young: the top r singular triplets give the
best rank-r approximation in Frobenius norm)::

    B = U[:, :r] sqrt(S[:r]) / sqrt(scaling)        # [out_features, r]
    A = sqrt(S[:r]) V[:, :r]^T / sqrt(scaling)      # [r, in_features]

PEFT's ``replace_lora_weights_loftq`` computes the same decomposition but only on CUDA and without dividing by
``scaling`` (``lora_alpha / r``), so with ``lora_alpha = 2r`` it would add twice the error back; this module
divides, and runs wherever the model is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtune.errors import QtuneError
from qtune.model.quantize import dequantized_weight


@dataclass
class LoftQReport:
    """What :func:`loftq_init` did: layers initialised and the quantization error before/after (Frobenius norm,
    summed over layers, relative to ``||W||``)."""

    layers: int
    relative_error_before: float
    relative_error_after: float

    def line(self) -> str:
        return (
            f"LoftQ: {self.layers} adapters initialised from the quantization error; relative error "
            f"{self.relative_error_before:.4f} -> {self.relative_error_after:.4f}"
        )


def _weight_files(model_path: str) -> dict[str, Path]:
    """Tensor name -> safetensors file for a local model directory or a hub id already in the local cache."""
    root = Path(model_path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as e:  # noqa: BLE001 - any hub failure means the original weights are unavailable
            raise QtuneError(f"lora.init=loftq: cannot read the original weights of {model_path}: {e}") from None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise QtuneError(f"lora.init=loftq: {root} holds no .safetensors weights (LoftQ reads the original weights)")
    from safetensors import safe_open

    names = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names.update(dict.fromkeys(h.keys(), f))
    return names


@torch.no_grad()
def loftq_init(peft_model, model_path: str, adapter_name: str = "default") -> LoftQReport:
    """Set A and B of every LoRA layer on a 4-bit base layer from the SVD of that layer's quantization error.

    Args:
        peft_model: a ``PeftModel`` whose base holds bitsandbytes ``Linear4bit`` layers under LoRA.
        model_path: directory (or cached hub id) of the original, unquantized safetensors weights.

    Returns:
        a :class:`LoftQReport` (the error after is never above the error before: rank-r SVD truncation).

    Raises:
        QtuneError: no 4-bit LoRA layer, or the original weights are missing.
    """
    import bitsandbytes as bnb
    from safetensors import safe_open

    files = _weight_files(model_path)
    handles: dict[Path, Any] = {}  # safetensors handles (safe_open)
    prefix = "base_model.model."
    layers, err_before, err_after, norm = 0, 0.0, 0.0, 0.0
    for name, module in peft_model.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit) or adapter_name not in getattr(module, "lora_A", {}):
            continue
        key = name.removeprefix(prefix) + ".weight"
        if key not in files:
            raise QtuneError(f"lora.init=loftq: {key} not found in the weights of {model_path}")
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        w = handles[f].get_tensor(key).to(base.weight.device, torch.float32)
        error = w - dequantized_weight(base)
        r, scaling = module.r[adapter_name], module.scaling[adapter_name]
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root_s = s[:r].sqrt()
        b = u[:, :r] * root_s / scaling**0.5
        a = root_s[:, None] * vh[:r] / scaling**0.5
        lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        lora_a.copy_(a.to(lora_a.dtype))
        lora_b.copy_(b.to(lora_b.dtype))
        after = error - scaling * (lora_b.float() @ lora_a.float())
        err_before += float(error.square().sum())
        err_after += float(after.square().sum())
        norm += float(w.square().sum())
        layers += 1
    if not layers:
        raise QtuneError("lora.init=loftq: no LoRA layer sits on a 4-bit (nf4/fp4) base layer")
    return LoftQReport(layers, (err_before / norm) ** 0.5, (err_after / norm) ** 0.5)
