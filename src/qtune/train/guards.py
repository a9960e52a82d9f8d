"""Failures during training turned into one clear message: non-finite loss, out of memory, risky precision.

- :class:`NonFiniteLossGuard` stops the run at the first NaN/inf training loss, before that step's checkpoint is
  written, and names the step and the last checkpoint verified good (finite weights and losses).
- :func:`explain_out_of_memory` turns ``torch.OutOfMemoryError`` into a :class:`QtuneError` with a memory
  breakdown and the largest batch x length expected to fit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from qtune.config import RESUME_SETTABLE, RunConfig
from qtune.errors import QtuneError
from qtune.units import GIB

if TYPE_CHECKING:
    from qtune.model.memory import Strategy


class NonFiniteLossGuard(TrainerCallback):
    """Raises :class:`QtuneError` when a logged training loss is NaN or inf.

    Trainer logs before it saves, so the step with the bad loss never gets a checkpoint. The checkpoints before
    it are not all good, though: the one of the step before was saved with the weights that gave the bad loss,
    and a diverging run saves non-finite weights before its loss turns NaN. The message names the newest
    checkpoint :func:`qtune.train.checkpoints.checkpoint_problem` verifies (or says there is none, and why) and the
    resume command with a lower learning rate. Needs ``logging_steps=1`` and ``logging_nan_inf_filter=False``
    (see :func:`qtune.train.checkpoints.checkpoint_arguments`).
    """

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return
        from qtune.train.checkpoints import last_good_checkpoint

        losses = {r["step"]: r["loss"] for r in state.log_history if "loss" in r}
        good, rejected = last_good_checkpoint(args.output_dir, losses)
        not_good = ", ".join(f"{ckpt.name}: {why}" for ckpt, why in rejected)
        if good:
            found = f"last good checkpoint {good}" + (f" (not {not_good})" if rejected else "")
        else:
            found = f"no good checkpoint ({not_good})" if rejected else "no checkpoint saved yet"
        run = Path(args.output_dir).parent
        raise QtuneError(
            f"training stopped: loss is {loss} at step {state.global_step}; {found}\n"
            f"lower the learning rate and resume {'from it' if good else 'from step 0'}: qtune train --resume {run} "
            f"--set train.learning_rate={args.learning_rate / 10:g} (a tenth of now; --set may change "
            f"{', '.join(RESUME_SETTABLE)}); "
            "or train anew (--overwrite) with quant.compute_dtype float32 or bfloat16"
        )


def oom_message(cfg: RunConfig, total_bytes: float, world_size: int = 1, strategy: Strategy = "ddp") -> str:
    """The two-line explanation printed when training runs out of GPU memory: the memory model's breakdown
    (:mod:`qtune.model.memory`) for this config on ``world_size`` GPUs under ``strategy`` (ddp or fsdp), and the
    largest micro-batch it expects to fit in 90% of the GPU. Every position's logits are counted (a bound)."""
    from qtune.model.memory import estimate, fit, run_config_inputs

    t = cfg.train
    counts, shape = run_config_inputs(cfg, device="cuda", world_size=world_size, strategy=strategy)
    est = estimate(counts, shape)
    terms = " + ".join(f"{term.name} {term.gib:.2f}" for term in est.terms if term.in_peak and term.bytes)
    budget = 0.9 * total_bytes / GIB
    fitted = fit(counts, shape, budget, cfg.data.max_length)
    if fitted["max_batch_size"] >= 1:
        advice = f"batch_size {fitted['max_batch_size']} x max_length {cfg.data.max_length}"
    else:
        shorter = [row for row in fitted["table"] if row["max_batch_size"] >= 1]
        advice = (
            f"batch_size {shorter[-1]['max_batch_size']} x max_length {shorter[-1]['seq_len']}"
            if shorter
            else "nothing: the weights alone do not fit; use a smaller model or 4-bit weights (quant.quant=nf4)"
        )
    per_gpu = f" per GPU ({world_size} x {strategy})" if world_size > 1 else ""
    return (
        f"out of GPU memory (batch_size {t.batch_size} x max_length {cfg.data.max_length}): memory model (GiB"
        f"{per_gpu}): {terms} = {est.peak_gib:.2f} GiB; GPU has {total_bytes / GIB:.2f} GiB\n"
        f"largest that should fit: {advice}; lower train.batch_size (raise train.gradient_accumulation_steps to "
        "keep the effective batch) or data.max_length, or turn train.gradient_checkpointing on"
    )


def distributed_layout() -> tuple[int, Strategy]:
    """(world size, strategy) of this training process as the Trainer runs it: accelerate's state, which
    transformers' Trainer sets up from the launcher (torchrun / accelerate launch): its process count, and fsdp
    when its distributed type is FSDP, else ddp. (1, "ddp") before any Trainer exists."""
    from accelerate.state import AcceleratorState, DistributedType, is_initialized

    if not is_initialized():
        return 1, "ddp"
    state = AcceleratorState()
    return state.num_processes, "fsdp" if state.distributed_type == DistributedType.FSDP else "ddp"


def gpu_total_bytes() -> float:
    """Total memory of the current CUDA device in bytes (0 without CUDA)."""
    return (
        float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
        if torch.cuda.is_available()
        else 0.0
    )


@contextlib.contextmanager
def explain_out_of_memory(
    model,
    cfg: RunConfig,
    total_bytes: float | None = None,
    world_size: int | None = None,
    strategy: Strategy | None = None,
) -> Iterator[None]:
    """Context manager: running out of GPU memory inside becomes a :class:`QtuneError` (see :func:`oom_message`);
    other errors pass through unchanged.

    ``total_bytes`` is the device's memory (default: the current CUDA device's); ``world_size`` and ``strategy``
    default to the Trainer's (:func:`distributed_layout`).
    """
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError, or a CUDA library's "out of memory" RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        total = gpu_total_bytes() if total_bytes is None else total_bytes
        known_world, known_strategy = distributed_layout()
        raise QtuneError(oom_message(cfg, total, world_size or known_world, strategy or known_strategy)) from None
