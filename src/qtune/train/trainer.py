"""One fine-tuning run, top to bottom: set up the run directory -> data -> model -> LoRA -> fit -> validate -> save.

Built on ``transformers.Trainer`` (AdamW, warmup + cosine schedule, gradient accumulation and clipping); qtune
adds the data stage, the quantized model, the per-step record and the run directory layout (:class:`RunDir`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from qtune.config import RunConfig, check_require_cuda
from qtune.data.prepare import CARD_FILE, load_splits
from qtune.data.tokenize import padding_collator, training_collator
from qtune.errors import QtuneError
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
from qtune.train.start import discard_run, library_versions, make_run_dir, start_run
from qtune.train.summary import TrainSummary
from qtune.train.tensorboard import tensorboard_callback
from qtune.train.validation import ValidationTrainer

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = [  # make_run_dir, discard_run and library_versions live in qtune.train.start; importable here as before
    "build_trainer",
    "check_device_switches",
    "discard_run",
    "library_versions",
    "make_run_dir",
    "train",
    "training_arguments",
    "use_liger",
]


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

    Returns:
        the :class:`qtune.train.summary.TrainSummary` as its JSON object (:meth:`TrainSummary.to_json`, what
        ``train_summary.json`` holds); on the other processes of a distributed run, only ``run_dir`` and
        ``process_index`` (the main process reports).

    The main process holds the run directory's :class:`qtune.rundir.RunLock` from before it writes anything
    until it returns: one writer per run directory. The steps: :func:`_setup` (run directory, data, arguments),
    :func:`_fit` (model, LoRA, training, validation), :func:`_save` (summary, adapter, model card).

    Raises:
        QtuneError: the run directory in use by another process, an existing run directory without ``overwrite``
        or one that ``overwrite`` may not replace (:meth:`qtune.rundir.RunDir.check_replaceable`), unreadable
        data, no usable rows, a model that cannot be resolved, or ``data.max_length`` beyond the model's context
        (all before the weights load); with ``resume``, a run directory that cannot be resumed or a changed field
        outside ``RESUME_SETTABLE``; during training, a NaN/inf loss or running out of GPU memory.
    """
    lock = RunLock(cfg.train.output_dir)
    try:
        setup = _setup(cfg, overwrite, resume, protect, lock)
        fit = _fit(cfg, setup, callbacks)
        if not fit.trainer.is_world_process_zero():
            _wait_for_all_processes()  # while the main process saves
            return {"run_dir": str(setup.rd.root), "process_index": setup.args.process_index}
        summary = _save(cfg, setup, fit).to_json()
        _wait_for_all_processes()
        return summary
    finally:
        lock.release()
        _leave_process_group()


def _wait_for_all_processes() -> None:
    """On a distributed run, a barrier: every rank reaches the end of a successful run before any leaves the
    process group, so none tears its connections down while another still holds them open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _leave_process_group() -> None:
    """Destroy the torch.distributed process group, if one was joined (torchrun), before the process exits.

    PyTorch asks for it (``destroy_process_group`` at the end of a program); without it a gloo rank was once seen
    aborting at exit ("terminate called without an active exception", SIGABRT) after training had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class _Setup:
    """What the setup step leaves for fitting and saving."""

    rd: RunDir
    args: TrainingArguments
    model_path: str
    tokenizer: Any
    splits: Any  # datasets.DatasetDict: train and, where configured, val
    checkpoint: Path | None  # the checkpoint a resumed run continues from; None: step 0
    resumed_state: dict  # its trainer state ({} without one)
    records: list[dict]  # the metrics.jsonl records the checkpoint had logged

    @property
    def main(self) -> bool:
        return self.args.process_index == 0

    @property
    def global_batch(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size


def _setup(cfg: RunConfig, overwrite: bool, resume: bool, protect: tuple, lock: RunLock) -> _Setup:
    """Check the switches, build the training arguments, then (main process first) resolve the model, load the
    tokenizer and make the run directory with its prepared data, or, with ``resume``, take up the existing one."""
    check_device_switches(cfg)
    use_liger(cfg)
    rd = RunDir(Path(cfg.train.output_dir))
    args = training_arguments(cfg, rd.checkpoints)  # under torchrun/accelerate this joins the process group
    main = args.process_index == 0
    checkpoint: Path | None = None
    resumed_state: dict = {}
    done: list[dict] = []
    # The main process resolves the model, writes the run directory and prepares the data; the other ranks wait,
    # then read what it wrote (a launcher stops them all if the main process fails here).
    with args.main_process_first(local=False, desc="data preparation"):
        model_path = resolve_model(cfg.model)
        check_max_length(model_path, cfg.model, cfg.data.max_length)
        tokenizer = load_tokenizer(model_path, cfg.model)
        if resume:
            checkpoint, resumed_state, done = _take_up(rd, cfg, lock, main)
            splits = load_splits(rd.data)
        elif main:
            rd, splits = start_run(cfg, overwrite, lock, tokenizer, (cfg.data.path, model_path, *protect))
        else:
            splits = load_splits(rd.data)
    setup = _Setup(rd, args, model_path, tokenizer, splits.remove_columns("row"), checkpoint, resumed_state, done)
    if main and args.world_size > 1:
        print(
            f"distributed: {args.world_size} processes x batch {args.per_device_train_batch_size} x "
            f"accumulation {args.gradient_accumulation_steps} = global batch {setup.global_batch}"
        )
    return setup


def _take_up(rd: RunDir, cfg: RunConfig, lock: RunLock, main: bool) -> tuple[Path | None, dict, list[dict]]:
    """(checkpoint, its trainer state, the metrics records it had logged) of the run in ``rd`` to resume; the
    main process takes the lock, records what ``cfg`` changes and cuts ``metrics.jsonl`` back to the checkpoint."""
    if main:
        lock.acquire()
    checkpoint = resume_point(rd)
    resumed_state = checkpoint_state(checkpoint)
    done: list[dict] = []
    if main:
        changes = record_resume(rd, cfg, resumed_state.get("global_step", 0))
        done = truncate_metrics(rd.metrics, resumed_state)
        print(f"resuming {rd.root} from {checkpoint or 'step 0 (no good checkpoint)'}")
        for key, (old, new) in changes.items():
            print(f"resume changes {key}: {old} -> {new} (saved in config.yaml and resumes.jsonl)")
    return checkpoint, resumed_state, done


@dataclass
class _Fit:
    """What the fitting step leaves for saving."""

    trainer: Trainer
    model: PeftModel
    records: list[dict]  # every metrics.jsonl record of the run, the resumed ones first
    steps: int
    wall_s: float  # seconds of training, this session
    val: dict  # the final evaluation's metrics (eval_loss, eval_perplexity, eval_tokens); {} without one
    trainable_params: int
    total_params: int


def _fit(cfg: RunConfig, s: _Setup, callbacks: tuple) -> _Fit:
    """Build the trainer (base, LoRA, qtune's callbacks), train from ``s.checkpoint`` (or step 0) and evaluate
    the validation split at the end when configured."""
    recorder = MetricsRecorder(s.rd.metrics)
    recorder.records = s.records
    bar = ProgressBar(recorder)
    board = tensorboard_callback(cfg.train.report_to, s.rd.tensorboard) if s.main else None
    trainer = build_trainer(
        cfg,
        s.model_path,
        s.tokenizer,
        s.splits["train"],
        s.splits.get("val"),
        s.rd.checkpoints,
        callbacks=(recorder, bar, NonFiniteLossGuard(), *callbacks, *([board] if board else [])),
        args=s.args,
    )
    make_checkpoints_atomic(trainer)
    keep_configured_learning_rate(trainer)
    model = cast("PeftModel", trainer.model)  # build_trainer attached the LoRA adapter
    trainable, total = model.get_nb_trainable_parameters()
    start = time.perf_counter()
    try:
        with explain_out_of_memory(model, cfg):
            result = train_from(trainer, s.checkpoint)
    finally:
        bar.close()  # a stopped run (NaN guard, out of memory) ends the bar's line before the error line
    wall = time.perf_counter() - start
    val = trainer.evaluate() if "val" in s.splits and cfg.train.eval_at_end else {}
    return _Fit(trainer, model, recorder.records, result.global_step, wall, val, trainable, total)


def _save(cfg: RunConfig, s: _Setup, f: _Fit) -> TrainSummary:
    """The run's :class:`TrainSummary`, saved with the adapter, tokenizer and model card (:func:`save_final`)."""
    train_recs = [r for r in f.records if "loss" in r]
    tokens = f.trainer.state.num_input_tokens_seen
    memory: dict[str, Any] = peak_memory()
    summary = TrainSummary(
        run_dir=str(s.rd.root),
        steps=f.steps,
        world_size=s.args.world_size,
        global_batch_size=s.global_batch,
        wall_time_s=round(f.wall_s, 2),
        train_tokens=tokens,
        tokens_per_s=round(tokens / f.wall_s, 2),
        first_train_loss=train_recs[0]["loss"] if train_recs else None,
        final_train_loss=train_recs[-1]["loss"] if train_recs else None,
        val_loss=f.val.get("eval_loss"),  # token-weighted, as `qtune eval` (qtune.train.validation.split_loss)
        val_perplexity=f.val.get("eval_perplexity"),
        val_tokens=f.val.get("eval_tokens"),
        trainable_params=f.trainable_params,
        total_params=f.total_params,
        **memory,
        compute_dtype=str(compute_dtype(cfg.quant)).removeprefix("torch."),
        val_halves=f.val.get("eval_halves"),
    )
    if s.checkpoint:  # tokens/s of this session only; the checkpoint brought the earlier tokens along
        summary = replace(summary, **resumed_summary(s.resumed_state, tokens, f.wall_s))
    card = s.rd.data / CARD_FILE
    card_fields = json.loads(card.read_text(encoding="utf-8")) if card.is_file() else None
    save_final(s.rd, f.model, s.tokenizer, summary.to_json(), cfg, card_fields)  # written last: the run finished
    return summary
