"""Resumable checkpoints: written atomically by transformers' Trainer, found again by ``qtune train --resume``.

Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, ``trainer_state.json``) straight into
``checkpoints/checkpoint-N``; a process killed mid-write would leave a half-written folder that
``get_last_checkpoint`` picks up. :func:`make_checkpoints_atomic` makes Trainer write into a hidden temporary
folder beside it and rename the finished folder to ``checkpoint-N``, so every ``checkpoint-N`` is complete.
Resuming itself is Trainer's own ``train(resume_from_checkpoint=...)``.

A complete checkpoint is not necessarily a good one: a diverging run saves non-finite (or finite but useless)
weights before its loss turns NaN. :func:`checkpoint_problem` verifies one (finite adapter weights and optimizer
state, finite losses at its step and at the step after it, which its weights computed); the NaN guard names and
``--resume`` uses only a verified checkpoint. A resume may change the fields in :data:`qtune.config.RESUME_SETTABLE`
(:func:`record_resume`, :func:`keep_configured_learning_rate`).

The final save (:func:`save_final`) is crash-safe the same way: adapter and tokenizer go into a temporary folder
renamed to ``adapter``, then ``train_summary.json`` (the run's "finished" marker) is written, and only then are
the checkpoints removed. A run killed before the summary exists is not finished: ``--resume`` restarts from its
last checkpoint (after the last step: only the final save again).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints

from qtune.config import RESUME_SETTABLE, RunConfig, TrainConfig, load_config, save_config
from qtune.errors import QtuneError, QtuneWarning
from qtune.jsonio import dumps
from qtune.model.adapters import finish_adapter, save_adapter
from qtune.rundir import ADAPTER_WEIGHTS, TMP_PREFIX, RunDir, read_metrics, write_atomic

KEEP_CHECKPOINTS = 2
"""Checkpoints kept on disk; older ones are deleted after a newer one is complete."""

STATE_FILE = "trainer_state.json"
"""In the run directory: one line per resume that changed a setting (step, then field: from, to)."""


def checkpoint_arguments(t: TrainConfig) -> dict:
    """``TrainingArguments`` keywords for checkpointing every ``t.save_steps`` optimizer steps (none when 0).

    ``logging_nan_inf_filter`` is off so that a non-finite loss reaches the log (and
    :class:`qtune.train.guards.NonFiniteLossGuard`) instead of being replaced by the mean of earlier losses.
    """
    steps = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "no"}
    return {**steps, "save_total_limit": KEEP_CHECKPOINTS, "logging_nan_inf_filter": False}


def make_checkpoints_atomic(trainer) -> None:
    """Make ``trainer`` write each checkpoint into a temporary folder, then rename it to ``checkpoint-N``.

    Wraps the instance's ``_save_checkpoint`` (the one place Trainer writes checkpoints), so it works with any
    ``Trainer`` subclass. The rename is atomic on one filesystem; older checkpoints are rotated only after it.
    """
    save = trainer._save_checkpoint

    def atomic_save(model, trial):
        real = trainer.args.output_dir
        os.makedirs(real, exist_ok=True)
        staging = tempfile.mkdtemp(dir=real, prefix=TMP_PREFIX)
        name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        trainer.args.output_dir = staging
        try:
            save(model, trial)
        finally:
            trainer.args.output_dir = real
        target = os.path.join(real, name)
        if os.path.isdir(target):  # a leftover from before a resume, at the same step
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)
        if trainer.args.should_save:
            rotate_checkpoints(real, save_total_limit=trainer.args.save_total_limit)

    trainer._save_checkpoint = atomic_save


def last_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoints_dir``, or None.

    Temporary folders (an interrupted write) are removed; a ``checkpoint-N`` without ``trainer_state.json``
    (written by an older, non-atomic run) is skipped.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    for tmp in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)
    while (last := get_last_checkpoint(str(root))) is not None:
        if (Path(last) / STATE_FILE).is_file():
            return Path(last)
        shutil.move(last, root / (TMP_PREFIX + "incomplete-" + Path(last).name))
    return None


def checkpoint_state(checkpoint: Path | None) -> dict:
    """A checkpoint's ``trainer_state.json`` as a dict (``global_step``, ``num_input_tokens_seen``, ...);
    ``{}`` for None (no checkpoint: training starts at step 0)."""
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")) if checkpoint else {}


def resumed_summary(state: dict, tokens_seen: int, wall_s: float) -> dict:
    """Summary fields of a resumed run: the step it resumed from and tokens/s of the resumed part alone.

    Args:
        state: the checkpoint's trainer state (:func:`checkpoint_state`), read before training.
        tokens_seen: non-padding input tokens since step 0; ``wall_s``: seconds of this session.

    ``tokens_per_s`` is None when the session trained no step (a resume that only redid the final save).
    """
    done = tokens_seen - int(state.get("num_input_tokens_seen", 0))
    return {"resumed_from_step": int(state["global_step"]), "tokens_per_s": round(done / wall_s, 2) if done else None}


def truncate_metrics(path: Path, state: dict) -> list[dict]:
    """Keep only the records of ``metrics.jsonl`` that the checkpoint with trainer state ``state`` had logged;
    return them (``state`` ``{}``: none).

    A run resumed from the checkpoint at step ``s`` logs steps ``s + 1`` onward again, so later records (and a
    last line cut short by a kill) are dropped to keep one record per step; at step ``s`` itself only as many
    training and evaluation records are kept as the checkpoint's ``log_history`` holds (an evaluation after the
    last checkpoint, at the end of training, is logged again).
    """
    step = int(state.get("global_step", 0))
    at_step = [r for r in state.get("log_history", []) if r.get("step") == step]
    room = {"loss": sum("loss" in r for r in at_step), "eval_loss": sum("eval_loss" in r for r in at_step)}
    kept: list[dict] = []
    for rec in read_metrics(path):
        if not isinstance(rec.get("step"), int) or rec["step"] > step:
            continue
        if rec["step"] == step:
            kind = "loss" if "loss" in rec else "eval_loss"
            if room[kind] == 0:
                continue
            room[kind] -= 1
        kept.append(rec)
    path.write_text("".join(dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


def _nonfinite(tensors) -> tuple[int, int]:
    """(how many of ``tensors`` hold a NaN or inf, how many there are)."""
    bad = total = 0
    for t in tensors:
        total += 1
        bad += bool(t.is_floating_point() and not torch.isfinite(t).all())
    return bad, total


def _optimizer_tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from _optimizer_tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _optimizer_tensors(v)


def checkpoint_problem(checkpoint: Path, losses: dict[int, float | None] | None = None) -> str | None:
    """Why ``checkpoint`` (``checkpoint-N``) is not a good one to resume from, or None when it is verified good.

    Good means: every tensor of its adapter (``adapter_model.safetensors``, also in a PEFT adapter subfolder) and
    of its optimizer state (``optimizer.pt``) is finite, and so are the logged training losses of step N and of
    step N + 1 (step N + 1's loss is computed with the weights saved at step N: when it is not finite, resuming
    from N, at any learning rate, meets it again). The shards of an FSDP ``SHARDED_STATE_DICT`` checkpoint
    (``pytorch_model_fsdp_0/``, ``optimizer_0/``) are not read: there only the losses are checked.

    Args:
        losses: optimizer step -> logged training loss, None for a loss that was not finite (``metrics.jsonl``
            writes null for it); the checkpoint's own ``trainer_state.json`` log fills in the steps missing here.
    """
    checkpoint = Path(checkpoint)
    step = int(checkpoint.name.rsplit("-", 1)[1])
    files = sorted(checkpoint.rglob(ADAPTER_WEIGHTS))  # none under FSDP's sharded state dict
    bad = total = 0
    optimizer = checkpoint / "optimizer.pt"
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                b, t = _nonfinite(st.get_tensor(k) for k in st.keys())
            bad, total = bad + b, total + t
        if bad:
            return f"{bad} of {total} adapter tensors not finite"
        if optimizer.is_file():
            bad, total = _nonfinite(_optimizer_tensors(torch.load(optimizer, map_location="cpu", weights_only=True)))
            if bad:
                return f"{bad} of {total} optimizer state tensors not finite"
    except Exception as e:  # noqa: BLE001 - a file that does not load makes the checkpoint unusable, whatever the error
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    logged = {r["step"]: r["loss"] for r in checkpoint_state(checkpoint).get("log_history", []) if "loss" in r}
    logged.update(losses or {})
    for s in (step, step + 1):
        if s in logged and (logged[s] is None or not math.isfinite(logged[s])):
            value = "a non-finite loss" if logged[s] is None else f"loss {logged[s]}"
            return f"{value} at step {s}" if s == step else f"its weights gave {value} at step {s}"
    return None


def last_good_checkpoint(
    checkpoints_dir: str | Path, losses: dict[int, float | None] | None = None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint in ``checkpoints_dir`` that :func:`checkpoint_problem` verifies, and the
    newer ones it rejected, each with its reason: ``(checkpoint or None, [(checkpoint, reason), ...])``."""
    root = Path(checkpoints_dir)
    found = [
        p
        for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", p.name) and (p / STATE_FILE).is_file()
    ]
    rejected: list[tuple[Path, str]] = []
    for ckpt in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        problem = checkpoint_problem(ckpt, losses)
        if problem is None:
            return ckpt, rejected
        rejected.append((ckpt, problem))
    return None, rejected


def logged_losses(path: Path) -> dict[int, float | None]:
    """Optimizer step -> training loss from a ``metrics.jsonl`` (None where it was not finite); torn lines skipped."""
    records = read_metrics(path)
    return {rec["step"]: rec["loss"] for rec in records if "loss" in rec and isinstance(rec.get("step"), int)}


def resume_point(rd: RunDir) -> Path | None:
    """Checkpoint to resume the run in ``rd`` from (None: no good checkpoint, start over from step 0).

    Only a checkpoint :func:`checkpoint_problem` verifies is used; newer ones that fail it (a diverged run's)
    are deleted, each with a :class:`QtuneWarning` naming the reason, so that the resumed run's own checkpoints
    replace them.

    A run is finished only once its ``train_summary.json`` exists (:func:`save_final`); what an interrupted
    final save left (temporary folders, an adapter without a summary) is redone. Temporary entries at the top of
    ``rd`` are removed.

    Raises:
        QtuneError: ``rd`` is not a run directory, has no prepared data, or its training already finished.
    """
    rd.require_config("nothing to resume")
    if rd.is_finished():
        raise QtuneError(f"{rd.root}: training already finished (adapter saved); nothing to resume")
    if not (rd.data / "splits").is_dir():
        raise QtuneError(f"{rd.root}: run stopped before its data was prepared; train again with --overwrite")
    for tmp in rd.root.glob(TMP_PREFIX + "*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
    if last_checkpoint(rd.checkpoints) is None:
        return None
    good, rejected = last_good_checkpoint(rd.checkpoints, logged_losses(rd.metrics))
    for ckpt, problem in rejected:
        warnings.warn(f"{ckpt}: not resumed from ({problem}); deleted", QtuneWarning, stacklevel=2)
        shutil.rmtree(ckpt)
    return good


def record_resume(rd: RunDir, cfg: RunConfig, step: int) -> dict[str, tuple]:
    """Compare ``cfg`` with the run's saved ``config.yaml`` before resuming it at optimizer step ``step``.

    Changed fields of :data:`qtune.config.RESUME_SETTABLE` are saved: ``config.yaml`` is rewritten with ``cfg``
    (atomically) and one line ``{"step", "changes": {field: {"from", "to"}}}`` is appended to ``RUN/resumes.jsonl``.

    Returns:
        {field: (old, new)} of the changed fields (empty when nothing changed).

    Raises:
        QtuneError: ``cfg`` differs from the saved config in another field (train.output_dir and
            model.trust_remote_code, set per invocation, are not compared).
    """
    saved = load_config(rd.config, saved_run=True).model_dump(mode="json")
    now = cfg.model_dump(mode="json")
    changes = {
        f"{sec}.{key}": (saved[sec][key], value)
        for sec, fields in now.items()
        for key, value in fields.items()
        if value != saved[sec][key] and f"{sec}.{key}" not in ("train.output_dir", "model.trust_remote_code")
    }
    other = [k for k in changes if k not in RESUME_SETTABLE]
    if other:
        raise QtuneError(
            f"{rd.root}: resuming with {', '.join(other)} changed from the saved config; only "
            f"{', '.join(RESUME_SETTABLE)} may change on resume"
        )
    if changes:
        for sec, key in (("train", "output_dir"), ("model", "trust_remote_code")):
            now[sec][key] = saved[sec][key]
        tmp = rd.config.with_name(rd.config.name + ".tmp")
        save_config(RunConfig.model_validate(now, context={"saved_run": True}), tmp)
        os.replace(tmp, rd.config)
        with rd.resumes.open("a", encoding="utf-8") as f:
            f.write(dumps({"step": step, "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}) + "\n")
    return changes


def keep_configured_learning_rate(trainer) -> None:
    """Make a resumed ``trainer`` continue at its own config's learning rate, not the checkpoint's.

    Trainer builds the optimizer and scheduler from the config, then loads their states from the checkpoint, which
    carry the old rate (the param groups' ``lr`` and ``initial_lr``, the scheduler's ``base_lrs``). Wraps the
    instance's ``_load_optimizer_and_scheduler`` so that after the load each group's rate is scaled by new / old
    base rate: the schedule continues at the same point, at the new peak (LoRA+ keeps its ratio between groups).
    """
    load = trainer._load_optimizer_and_scheduler

    def load_keeping_rate(checkpoint):
        sched = trainer.lr_scheduler
        wanted = list(getattr(sched, "base_lrs", []))
        load(checkpoint)
        if checkpoint is None or not wanted or list(sched.base_lrs) == wanted:
            return
        for group, old, new in zip(trainer.optimizer.param_groups, sched.base_lrs, wanted, strict=True):
            group["lr"] = group["lr"] / old * new
            group["initial_lr"] = new
        sched.base_lrs = wanted
        sched._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]

    trainer._load_optimizer_and_scheduler = load_keeping_rate


def train_from(trainer, checkpoint: Path | None) -> TrainOutput:
    """``trainer.train()``, resumed from ``checkpoint`` when one is given.

    A checkpoint at ``max_steps`` (a run stopped during its final save) is only loaded, weights and trainer
    state, between the callbacks' ``on_train_begin`` and ``on_train_end``: Trainer would train one step past
    ``max_steps`` from it.
    """
    if checkpoint is None or checkpoint_state(checkpoint)["global_step"] < trainer.args.max_steps:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer._load_from_checkpoint(str(checkpoint))  # what Trainer.train itself does when resuming
    trainer.state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))
    trainer.control = trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    trainer.control = trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    return TrainOutput(trainer.state.global_step, 0.0, {})


def save_final(
    rd: RunDir, model, tokenizer, summary: dict, cfg: RunConfig | None = None, data_card: dict | None = None
) -> None:
    """Save the trained adapter and tokenizer to ``rd.adapter``, then ``summary`` to ``rd.summary``, then
    remove the checkpoints; a process killed at any point leaves a run that ``--resume`` completes.

    The adapter and tokenizer are written into a temporary folder in ``rd`` that is renamed to ``adapter``
    (replacing one from an earlier, interrupted final save); the summary is written atomically and marks the
    run finished (:meth:`qtune.rundir.RunDir.is_finished`); the checkpoints go only after it. With ``cfg``, the
    adapter folder is made portable and gets a model card (:func:`qtune.model.adapters.finish_adapter`).
    """
    staging = Path(tempfile.mkdtemp(dir=rd.root, prefix=TMP_PREFIX + "adapter-"))
    save_adapter(model, staging)
    tokenizer.save_pretrained(str(staging))
    if cfg is not None:
        finish_adapter(staging, cfg, summary, data_card)
    if rd.adapter.exists():
        shutil.rmtree(rd.adapter)
    os.replace(staging, rd.adapter)
    write_atomic(rd.summary, dumps(summary, indent=2))
    shutil.rmtree(rd.checkpoints, ignore_errors=True)
