"""Resumable checkpoints: written atomically by transformers' Trainer, found again by ``qtune train --resume``.

Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, ``trainer_state.json``) straight into
``checkpoints/checkpoint-N``; a process killed mid-write would leave a half-written folder that
``get_last_checkpoint`` picks up. :func:`make_checkpoints_atomic` makes Trainer write into a hidden temporary
folder beside it and rename the finished folder to ``checkpoint-N``, so every ``checkpoint-N`` is complete.
Resuming itself is Trainer's own ``train(resume_from_checkpoint=...)``.

The final save (:func:`save_final`) is crash-safe the same way: adapter and tokenizer go into a temporary folder
renamed to ``adapter``, then ``train_summary.json`` (the run's "finished" marker) is written, and only then are
the checkpoints removed. A run killed before the summary exists is not finished: ``--resume`` restarts from its
last checkpoint (after the last step: only the final save again).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints

from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.model.adapters import save_adapter
from qtune.rundir import TMP_PREFIX, RunDir, write_atomic

KEEP_CHECKPOINTS = 2
"""Checkpoints kept on disk; older ones are deleted after a newer one is complete."""

STATE_FILE = "trainer_state.json"


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
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] > step:
                continue
            if rec["step"] == step:
                kind = "loss" if "loss" in rec else "eval_loss"
                if room[kind] == 0:
                    continue
                room[kind] -= 1
            kept.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


def resume_point(rd: RunDir) -> Path | None:
    """Checkpoint to resume the run in ``rd`` from (None: no checkpoint yet, start over from step 0).

    A run is finished only once its ``train_summary.json`` exists (:func:`save_final`); what an interrupted
    final save left (temporary folders, an adapter without a summary) is redone. Temporary entries at the top of
    ``rd`` are removed.

    Raises:
        QtuneError: ``rd`` is not a run directory, has no prepared data, or its training already finished.
    """
    if not rd.config.is_file():
        raise QtuneError(f"{rd.root}: not a qtune run directory (no config.yaml); nothing to resume")
    if rd.is_finished():
        raise QtuneError(f"{rd.root}: training already finished (adapter saved); nothing to resume")
    if not (rd.data / "splits").is_dir():
        raise QtuneError(f"{rd.root}: run stopped before its data was prepared; train again with --overwrite")
    for tmp in rd.root.glob(TMP_PREFIX + "*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
    return last_checkpoint(rd.checkpoints)


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


def save_final(rd: RunDir, model, tokenizer, summary: dict) -> None:
    """Save the trained adapter and tokenizer to ``rd.adapter``, then ``summary`` to ``rd.summary``, then
    remove the checkpoints; a process killed at any point leaves a run that ``--resume`` completes.

    The adapter and tokenizer are written into a temporary folder in ``rd`` that is renamed to ``adapter``
    (replacing one from an earlier, interrupted final save); the summary is written atomically and marks the
    run finished (:meth:`qtune.rundir.RunDir.is_finished`); the checkpoints go only after it.
    """
    staging = Path(tempfile.mkdtemp(dir=rd.root, prefix=TMP_PREFIX + "adapter-"))
    save_adapter(model, staging)
    tokenizer.save_pretrained(str(staging))
    if rd.adapter.exists():
        shutil.rmtree(rd.adapter)
    os.replace(staging, rd.adapter)
    write_atomic(rd.summary, json.dumps(summary, indent=2))
    shutil.rmtree(rd.checkpoints, ignore_errors=True)
