"""One fine-tuning run, top to bottom: set up the run directory -> data -> model -> LoRA -> fit -> validate -> save.

Built on ``transformers.Trainer`` (AdamW, warmup + cosine schedule, gradient accumulation and clipping); qtune
adds the data stage, the quantized model, the per-step record and the run directory layout (:class:`RunDir`).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from qtune.config import RunConfig, check_require_cuda, save_config
from qtune.data.prepare import CARD_FILE, load_splits, prepare_dataset
from qtune.data.tokenize import padding_collator, training_collator
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.model.adapters import attach_lora, loraplus_optimizer
from qtune.model.attention import use_packed_attention
from qtune.model.load import check_max_length, device, load_model, load_tokenizer, resolve_model
from qtune.model.quantize import compute_dtype, is_quantized
from qtune.rundir import RunDir, RunLock
from qtune.train.callbacks import MetricsRecorder, ProgressBar, peak_memory
from qtune.train.checkpoints import (
    checkpoint_arguments,
    checkpoint_state,
    keep_configured_learning_rate,
    make_checkpoints_atomic,
    record_resume,
    resume_point,
    resumed_summary,
    save_final,
    train_from,
    truncate_metrics,
)
from qtune.train.guards import NonFiniteLossGuard, explain_out_of_memory
from qtune.train.tensorboard import tensorboard_callback
from qtune.train.validation import ValidationTrainer

if TYPE_CHECKING:
    from peft import PeftModel

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


def make_run_dir(path: str | Path, overwrite: bool, lock: RunLock, inputs: tuple = ()) -> tuple[RunDir, bool]:
    """Create an empty, marked run directory (:meth:`RunDir.write_marker`) holding ``lock`` (a :class:`RunLock`
    on ``path``).

    An existing directory with entries is replaced only with ``overwrite`` and when
    :meth:`RunDir.check_replaceable` allows it (``inputs``: paths the run reads); its entries are deleted while
    the lock is held. Returns the run directory and whether qtune created the folder itself (False: it existed).

    Raises:
        QtuneError: another process writes the run (the lock is held); the path is a file; the directory is not
            empty and ``overwrite`` is False, or it may not be replaced.
    """
    rd = RunDir(Path(path))
    if rd.root.exists() and not rd.root.is_dir():
        raise QtuneError(f"{rd.root}: exists and is not a directory; choose another train.output_dir")
    if rd.lock.exists():
        lock.acquire()  # a live writer is named before anything else is said or done
    existed = rd.root.is_dir()
    if existed and any(e != rd.lock for e in rd.root.iterdir()):
        if not overwrite:
            raise QtuneError(
                f"{rd.root}: run directory exists and is not empty; pass --overwrite or choose another train.output_dir"
            )
        rd.check_replaceable(inputs)
        lock.acquire()
        rd.clear()
        existed = False  # a run qtune wrote: it goes as a whole if this one fails early
    else:
        rd.root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    rd.write_marker()
    return rd, not existed


def discard_run(rd: RunDir, created: bool) -> None:
    """Remove what a run that failed before training wrote: the whole folder if qtune created it, else (a folder
    that was empty) its entries."""
    if created:
        shutil.rmtree(rd.root, ignore_errors=True)
    else:
        rd.clear()
        rd.lock.unlink(missing_ok=True)


def use_liger(cfg: RunConfig) -> bool:
    """Whether Liger-Kernel is applied: ``train.liger`` on, or auto with CUDA and the package installed.

    Raises:
        QtuneError: ``train.liger=on`` without CUDA or without the liger-kernel package.
    """
    import importlib.util

    have = importlib.util.find_spec("liger_kernel") is not None
    cuda = device().startswith("cuda")
    if cfg.train.liger == "on" and not (have and cuda):
        raise QtuneError("train.liger: on needs a CUDA GPU and the liger-kernel package (pip install liger-kernel)")
    return cfg.train.liger == "on" or (cfg.train.liger == "auto" and have and cuda)


def check_device_switches(cfg: RunConfig) -> None:
    """Raises QtuneError for switches that need CUDA when none is visible (they would do nothing on CPU)."""
    check_require_cuda(cfg)
    if not device().startswith("cuda"):
        if cfg.train.offload_activations:
            raise QtuneError("train.offload_activations: needs a CUDA GPU (it moves saved activations to CPU memory)")
        if cfg.train.optim in ("adamw_8bit", "paged_adamw_8bit"):
            raise QtuneError(f"train.optim: {cfg.train.optim} needs a CUDA GPU; use adamw_torch on CPU")


def training_arguments(cfg: RunConfig, output_dir: Path) -> TrainingArguments:
    """TrainingArguments for the run: CPU or CUDA, mixed precision matching the compute dtype on CUDA."""
    t = cfg.train
    cuda = device().startswith("cuda")
    dtype = compute_dtype(cfg.quant)
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        use_liger_kernel=use_liger(cfg),
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        **checkpoint_arguments(t),
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=not cuda,
        bf16=dtype == torch.bfloat16,  # CPU too: torch.autocast("cpu", bfloat16) where compute_dtype says so
        fp16=cuda and dtype == torch.float16,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def build_trainer(
    cfg: RunConfig,
    model_path: str,
    tokenizer,
    train_dataset,
    eval_dataset,
    output_dir: Path,
    callbacks: tuple = (),
    args: TrainingArguments | None = None,
) -> Trainer:
    """Load the (quantized) base, attach LoRA and build the Trainer with qtune's collator and arguments.

    Args:
        model_path: a directory or hub id from :func:`qtune.model.load.resolve_model`.
        train_dataset, eval_dataset: sequences of dicts with input_ids, attention_mask, labels (lists of int).
        output_dir: where the Trainer may write checkpoints.
        args: prebuilt :func:`training_arguments` (train() builds them first to join the process group).
    """
    check_device_switches(cfg)
    set_seed(cfg.train.seed)
    base = load_model(model_path, cfg.model, cfg.quant)
    if cfg.train.packing and not device().startswith("cuda"):
        use_packed_attention(base)  # each packed sample's causal block only (qtune.model.attention)
    loaded_dtypes = [(p, p.dtype) for p in base.parameters()]  # evaluation uses them as `qtune eval` loads them
    model = attach_lora(
        base,
        cfg.lora,
        is_quantized(cfg.quant),
        cfg.train.gradient_checkpointing,
        upcast_frozen=cfg.train.upcast_frozen,
        offload_activations=cfg.train.offload_activations,
        model_path=model_path,
    )
    trainer = ValidationTrainer(
        model=model,
        args=args or training_arguments(cfg, output_dir),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=training_collator(tokenizer, cfg.train.packing, cfg.train.response_logits_only),
        callbacks=list(callbacks),
        optimizers=(loraplus_optimizer(model, cfg.lora, cfg.train.learning_rate, cfg.train.weight_decay), None),
        eval_collate=padding_collator(tokenizer),
        loaded_dtypes=loaded_dtypes,
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar shows the figures; metrics.jsonl keeps them
    return trainer


def train(
    cfg: RunConfig, overwrite: bool = False, callbacks: tuple = (), resume: bool = False, protect: tuple = ()
) -> dict:
    """Run one fine-tuning job and return its summary (also written to ``train_summary.json``).

    Args:
        cfg: the validated run config.
        overwrite: replace an existing, non-empty run directory that qtune wrote.
        callbacks: extra ``transformers.TrainerCallback`` objects (probes in tests, custom logging).
        resume: continue the interrupted run in ``cfg.train.output_dir`` from its last good checkpoint
            (:func:`qtune.train.checkpoints.resume_point`; from step 0 when it has none), with its prepared data;
            ``cfg`` is its ``config.yaml``, changed at most in ``RESUME_SETTABLE`` fields (the learning rate: the
            change is recorded by :func:`qtune.train.checkpoints.record_resume` and the rest of the schedule runs
            at the new rate).
        protect: more paths ``overwrite`` must never delete (the CLI passes the config file); the data file and
            the model are always protected.

    The main process holds the run directory's :class:`qtune.rundir.RunLock` from before it writes anything
    until it returns: one writer per run directory.

    Raises:
        QtuneError: the run directory in use by another process, an existing run directory without ``overwrite``
        or one that ``overwrite`` may not replace (:meth:`qtune.rundir.RunDir.check_replaceable`), unreadable
        data, no usable rows, a model that cannot be resolved, or ``data.max_length`` beyond the model's context
        (all before the weights load); with ``resume``, a run directory that cannot be resumed or a changed field
        outside ``RESUME_SETTABLE``; during training, a NaN/inf loss or running out of GPU memory.
    """
    lock = RunLock(cfg.train.output_dir)
    try:
        return _train(cfg, overwrite, callbacks, resume, protect, lock)
    finally:
        lock.release()


def _train(cfg: RunConfig, overwrite: bool, callbacks: tuple, resume: bool, protect: tuple, lock: RunLock) -> dict:
    check_device_switches(cfg)
    use_liger(cfg)
    rd = RunDir(Path(cfg.train.output_dir))
    args = training_arguments(cfg, rd.checkpoints)  # under torchrun/accelerate this joins the process group
    main = args.process_index == 0
    checkpoint, resumed_state, done = None, {}, []
    # The main process resolves the model, writes the run directory and prepares the data; the other ranks wait,
    # then read what it wrote (a launcher stops them all if the main process fails here).
    with args.main_process_first(local=False, desc="data preparation"):
        model_path = resolve_model(cfg.model)
        check_max_length(model_path, cfg.model, cfg.data.max_length)
        tokenizer = load_tokenizer(model_path, cfg.model)
        if resume:
            if main:
                lock.acquire()
            checkpoint = resume_point(rd)
            resumed_state = checkpoint_state(checkpoint)
            if main:
                changes = record_resume(rd, cfg, resumed_state.get("global_step", 0))
                done = truncate_metrics(rd.metrics, resumed_state)
                print(f"resuming {rd.root} from {checkpoint or 'step 0 (no good checkpoint)'}")
                for key, (old, new) in changes.items():
                    print(f"resume changes {key}: {old} -> {new} (saved in config.yaml and resumes.jsonl)")
            splits = load_splits(rd.data)
        elif main:
            rd, created = make_run_dir(cfg.train.output_dir, overwrite, lock, (cfg.data.path, model_path, *protect))
            save_config(cfg, rd.config)
            rd.versions.write_text(dumps(library_versions(), indent=2), encoding="utf-8")
            try:
                splits, card = prepare_dataset(cfg.data, tokenizer, rd.data)
            except QtuneError:
                discard_run(rd, created)  # nothing trained: leave no run directory behind
                raise
            print(card.table())
        else:
            splits = load_splits(rd.data)
    splits = splits.remove_columns("row")
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if main and args.world_size > 1:
        print(
            f"distributed: {args.world_size} processes x batch {args.per_device_train_batch_size} x "
            f"accumulation {args.gradient_accumulation_steps} = global batch {global_batch}"
        )

    recorder = MetricsRecorder(rd.metrics)
    recorder.records = done
    bar = ProgressBar(recorder)
    board = tensorboard_callback(cfg.train.report_to, rd.tensorboard) if main else None
    trainer = build_trainer(
        cfg,
        model_path,
        tokenizer,
        splits["train"],
        splits.get("val"),
        rd.checkpoints,
        callbacks=(recorder, bar, NonFiniteLossGuard(), *callbacks, *([board] if board else [])),
        args=args,
    )
    make_checkpoints_atomic(trainer)
    keep_configured_learning_rate(trainer)
    model = cast("PeftModel", trainer.model)  # build_trainer attached the LoRA adapter
    trainable, total = model.get_nb_trainable_parameters()
    start = time.perf_counter()
    try:
        with explain_out_of_memory(model, cfg):
            result = train_from(trainer, checkpoint)
    finally:
        bar.close()  # a stopped run (NaN guard, out of memory) ends the bar's line before the error line
    wall = time.perf_counter() - start
    val = trainer.evaluate() if "val" in splits and cfg.train.eval_at_end else {}

    if not trainer.is_world_process_zero():
        return {"run_dir": str(rd.root), "process_index": args.process_index}

    train_recs = [r for r in recorder.records if "loss" in r]
    summary = {
        "run_dir": str(rd.root),
        "steps": result.global_step,
        "world_size": args.world_size,
        "global_batch_size": global_batch,
        "wall_time_s": round(wall, 2),
        "train_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(trainer.state.num_input_tokens_seen / wall, 2),
        "first_train_loss": train_recs[0]["loss"] if train_recs else None,
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "val_loss": val.get("eval_loss"),  # token-weighted, as `qtune eval` (qtune.train.validation.split_loss)
        "val_perplexity": val.get("eval_perplexity"),
        "val_tokens": val.get("eval_tokens"),
        "trainable_params": trainable,
        "total_params": total,
        **peak_memory(),
    }
    if checkpoint:  # tokens/s of this session only; the checkpoint brought the earlier tokens along
        summary |= resumed_summary(resumed_state, trainer.state.num_input_tokens_seen, wall)
    card_fields = (
        json.loads((rd.data / CARD_FILE).read_text(encoding="utf-8")) if (rd.data / CARD_FILE).is_file() else None
    )
    save_final(rd, model, tokenizer, summary, cfg, card_fields)  # the summary, written last, marks the run finished
    return summary
