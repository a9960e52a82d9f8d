"""What an estimate depends on besides the model config: :class:`TrainShape`, built from a
:class:`qtune.config.RunConfig` by :meth:`TrainShape.from_config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qtune.config import KBIT, DataConfig, LoraSettings, Quant, QuantConfig, TrainConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
"""Bytes per element of the float dtypes a config can name."""

Device = Literal["cuda", "cpu"]
"""Where the estimate is for: cuda (peak allocated) or cpu (peak resident set size)."""
Strategy = Literal["ddp", "fsdp"]
"""Data parallelism over ``world_size`` GPUs: ddp (replicated model) or fsdp (sharded)."""


def _default(section, name: str):
    """The default of a :class:`qtune.config.RunConfig` field, so TrainShape cannot drift from it."""
    return section.model_fields[name].default


def effective_optim(cfg) -> str:
    """The optimizer a run of ``cfg`` trains with: ``train.optim``, except that LoRA+ (``lora.loraplus_lr_ratio``)
    builds PEFT's ``create_loraplus_optimizer`` over ``torch.optim.AdamW`` (:func:`qtune.model.adapters.
    loraplus_optimizer`), which the Trainer uses instead of ``train.optim``."""
    return "adamw_torch" if cfg.lora.loraplus_lr_ratio is not None else cfg.train.optim


@dataclass(frozen=True)
class TrainShape:
    """What the estimate depends on besides the model config; build it with :meth:`from_config`.

    The fields a :class:`qtune.config.RunConfig` also has take the run config's defaults (read from the config
    classes, not restated here); the others describe where the run goes.

    Attributes:
        quant: none (fp32), fp16, bf16, int8, nf4 or fp4 (``quant.quant``).
        double_quant: 4-bit only; quantize the quantization constants too (``quant.double_quant``).
        compute_dtype: auto (bfloat16 on cuda, float32 on cpu, as :func:`qtune.model.quantize.compute_dtype`),
            float32, float16 or bfloat16 (``quant.compute_dtype``).
        r: LoRA rank (``lora.r``); 0 means full fine-tuning (every parameter trainable; needs a 16/32-bit base),
            which a run config cannot ask for.
        target_modules: PEFT target modules, "all-linear" or a tuple of names (``lora.target_modules``).
        use_dora: DoRA magnitude vectors (PEFT ``use_dora``); counted in the trainable parameters.
        lora_dropout: dropout on the LoRA input; > 0 keeps one dropped copy of each adapted layer's input.
        optim: transformers' optimizer name (``train.optim``, or adamw_torch under LoRA+, :func:`effective_optim`):
            adamw_torch / adamw_torch_fused (two states per trainable parameter in its dtype), adamw_8bit (two
            8-bit states + block-wise fp32 absmax, bitsandbytes) or paged_adamw_8bit (the same in CUDA unified
            memory for large tensors).
        batch_size: sequences per forward pass (micro-batch, ``train.batch_size``).
        seq_len: tokens per sequence (``data.max_length``, or the longest training sample).
        gradient_checkpointing: keep only each decoder layer's input and recompute the rest in backward.
        offload_activations: with checkpointing on cuda, those layer inputs live in pinned CPU memory.
        upcast_frozen: on a quantized base, PEFT's ``prepare_model_for_kbit_training`` casts the 16-bit
            embeddings, norms and LM head to fp32 (``train.upcast_frozen``).
        device: cuda (peak allocated) or cpu (peak resident set size, with the runtime term).
        world_size: data-parallel processes (GPUs); the estimate is per GPU.
        strategy: ddp (every GPU holds the whole model, plus DDP's gradient buckets) or fsdp (weights, gradients
            and optimizer states sharded over ``world_size``, one decoder layer gathered at a time).
        logit_fraction: share of the b x s positions whose LM-head logits are computed (1.0: all). qtune's
            ``train.response_logits_only`` computes them only where a label is supervised.
    """

    quant: Quant = _default(QuantConfig, "quant")
    double_quant: bool = _default(QuantConfig, "double_quant")
    compute_dtype: str = _default(QuantConfig, "compute_dtype")
    r: int = _default(LoraSettings, "r")
    target_modules: str | tuple[str, ...] = _default(LoraSettings, "target_modules")
    use_dora: bool = _default(LoraSettings, "use_dora")
    lora_dropout: float = _default(LoraSettings, "lora_dropout")
    optim: str = _default(TrainConfig, "optim")
    batch_size: int = _default(TrainConfig, "batch_size")
    seq_len: int = _default(DataConfig, "max_length")
    gradient_checkpointing: bool = _default(TrainConfig, "gradient_checkpointing")
    offload_activations: bool = _default(TrainConfig, "offload_activations")
    upcast_frozen: bool = _default(TrainConfig, "upcast_frozen")
    device: Device = "cuda"
    world_size: int = 1
    strategy: Strategy = "ddp"
    logit_fraction: float = 1.0

    @classmethod
    def from_config(
        cls,
        cfg,
        seq_len: int | None = None,
        device: Device | None = None,
        supervised_share: float | None = None,
        world_size: int = 1,
        strategy: Strategy = "ddp",
    ) -> TrainShape:
        """The shape of a run of :class:`qtune.config.RunConfig` ``cfg``.

        Args:
            seq_len: tokens per sequence; default ``data.max_length`` (a bound: the longest sample may be shorter).
            device: default cuda when a GPU is visible, else cpu (where ``qtune train`` would run here).
            supervised_share: supervised (response) tokens / all tokens of the training split; with
                ``train.response_logits_only`` the logits term counts that share of the positions. None: every
                position (a bound).
            world_size, strategy: the launcher's process count and data parallelism (a config has neither).
        """
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        tm = cfg.lora.target_modules
        share = 1.0
        if cfg.train.response_logits_only and supervised_share:
            share = min(1.0, supervised_share)
        return cls(
            quant=cfg.quant.quant,
            double_quant=cfg.quant.double_quant,
            compute_dtype=cfg.quant.compute_dtype,
            r=cfg.lora.r,
            target_modules=tm if isinstance(tm, str) else tuple(tm),
            use_dora=cfg.lora.use_dora,
            lora_dropout=cfg.lora.lora_dropout,
            optim=effective_optim(cfg),
            batch_size=cfg.train.batch_size,
            seq_len=seq_len or cfg.data.max_length,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
            offload_activations=cfg.train.offload_activations,
            upcast_frozen=cfg.train.upcast_frozen,
            device=device,
            world_size=world_size,
            strategy=strategy,
            logit_fraction=share,
        )

    def compute_bytes(self) -> int:
        """Bytes per element of activations and of the non-quantized weights as loaded."""
        if self.quant == "fp16":
            return 2
        if self.quant == "bf16":
            return 2
        if self.compute_dtype != "auto":
            return DTYPE_BYTES[self.compute_dtype]
        return 2 if self.device == "cuda" else 4

    def load_bytes(self) -> int:
        """Bytes per element of the non-quantized weights as loaded (fp32 for quant none)."""
        return 4 if self.quant == "none" else self.compute_bytes()

    @property
    def quantized(self) -> bool:
        return self.quant in KBIT

    @property
    def upcast(self) -> bool:
        """PEFT's fp32 upcast of the 16-bit non-quantized parameters applies."""
        return self.quantized and self.load_bytes() < 4 and self.upcast_frozen
