"""Resumable checkpoints: written atomically by transformers' Trainer, found again by ``qtune train --resume``.

Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, ``trainer_state.json``) straight into
``checkpoints/checkpoint-N``; a process killed mid-write would leave a half-written folder that
``get_last_checkpoint`` picks up. :func:`make_checkpoints_atomic` makes Trainer write into a hidden temporary
folder beside it and rename the finished folder to ``checkpoint-N``, so every ``checkpoint-N`` is complete.
Resuming itself is Trainer's own ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from qtune.config import TrainConfig
from qtune.errors import QtuneError
from qtune.rundir import RunDir

KEEP_CHECKPOINTS = 2
"""Checkpoints kept on disk; older ones are deleted after a newer one is complete."""

TMP_PREFIX = ".tmp-"
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
    """
    done = tokens_seen - int(state.get("num_input_tokens_seen", 0))
    return {"resumed_from_step": int(state["global_step"]), "tokens_per_s": round(done / wall_s, 2)}


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep only the records of ``metrics.jsonl`` up to and including optimizer step ``step``; return them.

    A run resumed from the checkpoint at ``step`` logs steps ``step + 1`` onward again, so later records (and a
    last line cut short by a kill) are dropped to keep one record per step.
    """
    kept: list[dict] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
                kept.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


def resume_point(rd: RunDir) -> Path | None:
    """Checkpoint to resume the run in ``rd`` from (None: no checkpoint yet, start over from step 0).

    Raises:
        QtuneError: ``rd`` is not a run directory, has no prepared data, or its training already finished.
    """
    if not rd.config.is_file():
        raise QtuneError(f"{rd.root}: not a qtune run directory (no config.yaml); nothing to resume")
    if (rd.adapter / "adapter_config.json").is_file():
        raise QtuneError(f"{rd.root}: training already finished (adapter saved); nothing to resume")
    if not (rd.data / "splits").is_dir():
        raise QtuneError(f"{rd.root}: run stopped before its data was prepared; train again with --overwrite")
    return last_checkpoint(rd.checkpoints)
