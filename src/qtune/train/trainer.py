"""One fine-tuning run, top to bottom: set up the run directory -> data -> model -> LoRA -> fit -> validate -> save.

Built on ``transformers.Trainer`` (AdamW, warmup + cosine schedule, gradient accumulation and clipping); qtune
adds the data stage, the quantized model, the per-step record and the run directory layout (:class:`RunDir`).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from qtune.config import RunConfig, save_config
from qtune.data.prepare import prepare_dataset
from qtune.data.tokenize import padding_collator
from qtune.errors import QtuneError
from qtune.model.adapters import attach_lora, loraplus_optimizer
from qtune.model.load import check_max_length, device, load_model, load_tokenizer, resolve_model
from qtune.model.quantize import compute_dtype, is_quantized
from qtune.rundir import RunDir
from qtune.train.callbacks import MetricsRecorder, ProgressBar, peak_memory

PACKAGES = ("qtune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gguf")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on, plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def make_run_dir(path: str | Path, overwrite: bool) -> RunDir:
    """Create an empty run directory.

    Raises:
        QtuneError: the directory exists and is not empty, and ``overwrite`` is False.
    """
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise QtuneError(f"{root}: run directory exists and is not empty; pass --overwrite or choose another train.output_dir")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    return RunDir(root)


def training_arguments(cfg: RunConfig, rd: RunDir) -> TrainingArguments:
    """TrainingArguments for the run: CPU or CUDA, mixed precision matching the compute dtype on CUDA."""
    t = cfg.train
    cuda = device() == "cuda"
    dtype = compute_dtype(cfg.quant)
    return TrainingArguments(
        output_dir=str(rd.checkpoints),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="no",
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=not cuda,
        bf16=cuda and dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def train(cfg: RunConfig, overwrite: bool = False, callbacks: tuple = ()) -> dict:
    """Run one fine-tuning job and return its summary (also written to ``train_summary.json``).

    Args:
        cfg: the validated run config.
        overwrite: replace an existing, non-empty run directory.
        callbacks: extra ``transformers.TrainerCallback`` objects (probes in tests, custom logging).

    Raises:
        QtuneError: existing run directory without ``overwrite``, unreadable data, no usable rows, a model that
        cannot be resolved, or ``data.max_length`` beyond the model's context. All before the weights load.
    """
    model_path = resolve_model(cfg.model)
    check_max_length(model_path, cfg.model, cfg.data.max_length)
    rd = make_run_dir(cfg.train.output_dir, overwrite)
    save_config(cfg, rd.config)
    rd.versions.write_text(json.dumps(library_versions(), indent=2), encoding="utf-8")

    tokenizer = load_tokenizer(model_path, cfg.model)
    splits, card = prepare_dataset(cfg.data, tokenizer, rd.data)
    print(card.table())
    splits = splits.remove_columns("row")

    set_seed(cfg.train.seed)
    model = load_model(model_path, cfg.model, cfg.quant)
    model = attach_lora(model, cfg.lora, is_quantized(cfg.quant), cfg.train.gradient_checkpointing)
    trainable, total = model.get_nb_trainable_parameters()

    recorder = MetricsRecorder(rd.metrics)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, rd),
        train_dataset=splits["train"],
        eval_dataset=splits.get("val"),
        data_collator=padding_collator(tokenizer),
        callbacks=[recorder, ProgressBar(recorder), *callbacks],
        optimizers=(loraplus_optimizer(model, cfg.lora, cfg.train.learning_rate, cfg.train.weight_decay), None),
    )
    trainer.remove_callback(PrinterCallback)  # ProgressBar shows the figures; metrics.jsonl keeps them
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    val = trainer.evaluate() if "val" in splits and cfg.train.eval_at_end else {}

    model.save_pretrained(str(rd.adapter))
    tokenizer.save_pretrained(str(rd.adapter))
    shutil.rmtree(rd.checkpoints, ignore_errors=True)

    train_recs = [r for r in recorder.records if "loss" in r]
    summary = {
        "run_dir": str(rd.root),
        "steps": result.global_step,
        "wall_time_s": round(wall, 2),
        "train_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / wall, 2),
        "first_train_loss": train_recs[0]["loss"] if train_recs else None,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "val_loss": val.get("eval_loss"),
        "val_perplexity": math.exp(val["eval_loss"]) if "eval_loss" in val else None,
        "trainable_params": trainable,
        "total_params": total,
        **peak_memory(),
    }
    rd.summary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary

