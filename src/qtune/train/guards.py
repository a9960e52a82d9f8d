"""Failures during training turned into one clear message: non-finite loss, out of memory, risky precision.

- :class:`NonFiniteLossGuard` stops the run at the first NaN/inf training loss, before that step's checkpoint is
  written, and names the step and the last good checkpoint.
- :func:`explain_out_of_memory` turns ``torch.OutOfMemoryError`` into a :class:`QtuneError` with a memory
  breakdown and the largest batch x length expected to fit.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import TrainerCallback

from qtune.config import RunConfig
from qtune.errors import QtuneError
from qtune.model.quantize import compute_dtype

GIB = 1024**3
MIB = 1024**2


class NonFiniteLossGuard(TrainerCallback):
    """Raises :class:`QtuneError` when a logged training loss is NaN or inf.

    Trainer logs before it saves, so the step with the bad loss never gets a checkpoint and the last checkpoint
    on disk is the last good one (it is named in the message). Needs ``logging_steps=1`` and
    ``logging_nan_inf_filter=False`` (see :func:`qtune.train.checkpoints.checkpoint_arguments`).
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return
        from qtune.train.checkpoints import last_checkpoint

        good = last_checkpoint(args.output_dir)
        keep = f"last good checkpoint {good} (resume with 'qtune train --resume RUN')" if good else "no checkpoint yet"
        raise QtuneError(
            f"training stopped: loss is {loss} at step {state.global_step}; {keep}; lower train.learning_rate "
            "or train.max_grad_norm, or use quant.compute_dtype float32/bfloat16"
        )


def memory_breakdown(model, cfg: RunConfig) -> dict[str, float]:
    """A coarse memory model of one training step, in bytes.

    - ``weights``: every parameter and buffer as stored (4-bit weights are packed two per byte).
    - ``trainable_state``: 16 bytes per trainable parameter (fp32 value, gradient, AdamW's two moments).
    - ``activations_per_token``: with gradient checkpointing, each layer keeps its input (hidden x dtype bytes)
      and one layer at a time holds its full activations (about 34 x hidden bytes at 16-bit, Korthikanti et al.
      2022, scaled to the compute dtype); without it every layer holds them. The LM head adds 12 bytes per
      vocabulary entry (fp32 logits, their softmax and gradient).
    """
    conf = model.config
    hidden, layers, vocab = conf.hidden_size, conf.num_hidden_layers, conf.vocab_size
    dtype_bytes = torch.finfo(compute_dtype(cfg.quant)).bits // 8
    layer_full = 34 * hidden * dtype_bytes / 2
    if cfg.train.gradient_checkpointing:
        per_layer = layers * hidden * dtype_bytes + layer_full
    else:
        per_layer = layers * layer_full
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    weights += sum(t.numel() * t.element_size() for t in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"weights": float(weights), "trainable_state": 16.0 * trainable,
            "activations_per_token": float(per_layer + 12 * vocab)}


def fit_advice(breakdown: dict[str, float], total_bytes: float, max_length: int, headroom: float = 0.9) -> dict:
    """Largest micro-batch expected to fit in ``headroom`` x ``total_bytes`` under :func:`memory_breakdown`.

    Returns:
        {"tokens": most tokens per micro-batch, "batch_size": most sequences of ``max_length`` tokens (may be 0),
        "max_length": ``max_length`` or, when not even one sequence fits, the longest that does}.
    """
    free = headroom * total_bytes - breakdown["weights"] - breakdown["trainable_state"]
    tokens = max(int(free // breakdown["activations_per_token"]), 0)
    return {"tokens": tokens, "batch_size": tokens // max_length, "max_length": min(max_length, tokens)}


def oom_message(model, cfg: RunConfig, total_bytes: float) -> str:
    """The two-line explanation printed when training runs out of GPU memory."""
    b = memory_breakdown(model, cfg)
    t = cfg.train
    tokens = t.batch_size * cfg.data.max_length
    fit = fit_advice(b, total_bytes, cfg.data.max_length)
    if fit["batch_size"] >= 1:
        advice = f"batch_size {fit['batch_size']} x max_length {cfg.data.max_length}"
    elif fit["tokens"] >= 1:
        advice = f"batch_size 1 x max_length {fit['max_length']}"
    else:
        advice = "nothing: the weights alone do not fit; use a smaller model or 4-bit weights (quant.quant=nf4)"
    return (
        f"out of GPU memory (batch_size {t.batch_size} x max_length {cfg.data.max_length}): memory model: weights "
        f"{b['weights'] / GIB:.2f} GiB + LoRA params, grads and AdamW {b['trainable_state'] / GIB:.2f} GiB + "
        f"activations {b['activations_per_token'] / MIB:.3f} MiB/token x {tokens} tokens = "
        f"{(b['weights'] + b['trainable_state'] + tokens * b['activations_per_token']) / GIB:.2f} GiB; GPU has "
        f"{total_bytes / GIB:.2f} GiB\n"
        f"largest that should fit: {advice}; lower train.batch_size (raise train.gradient_accumulation_steps to "
        "keep the effective batch) or data.max_length, or turn train.gradient_checkpointing on"
    )


def gpu_total_bytes() -> float:
    """Total memory of the current CUDA device in bytes (0 without CUDA)."""
    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory) if torch.cuda.is_available() else 0.0


@contextlib.contextmanager
def explain_out_of_memory(model, cfg: RunConfig, total_bytes: float | None = None):
    """Context manager: running out of GPU memory inside becomes a :class:`QtuneError` (see :func:`oom_message`);
    other errors pass through unchanged.

    ``total_bytes`` is the device's memory (default: the current CUDA device's).
    """
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError, or a CUDA library's "out of memory" RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        total = gpu_total_bytes() if total_bytes is None else total_bytes
        raise QtuneError(oom_message(model, cfg, total)) from None
