"""Per-step records (loss, learning rate, grad norm, tokens/s, peak memory) and the terminal progress bar."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from qtune.jsonio import dumps
from qtune.units import GIB


def peak_memory() -> dict[str, float]:
    """Peak memory so far, in GiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` (since the last reset). Always:
    the process's peak resident set size from ``getrusage`` (``ru_maxrss`` is KiB on Linux, bytes on macOS).
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    out = {"peak_rss_gib": round(rss_bytes / GIB, 4)}
    if torch.cuda.is_available():
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 4)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 4)
    return out


class MetricsRecorder(TrainerCallback):
    """Appends one JSON object per Trainer log event to ``path`` (``metrics.jsonl``).

    Training records: step, time_s (since training began), loss, learning_rate, grad_norm, tokens (non-padding
    input tokens since the last record), tokens_per_s (non-padding input tokens per second of wall time) and
    peak memory (see :func:`peak_memory`). Evaluation records carry, instead of loss, eval_loss (token-weighted,
    the figure of ``qtune eval``: :func:`qtune.train.validation.split_loss`), eval_perplexity and eval_tokens
    (supervised tokens counted).
    Requires ``TrainingArguments(include_num_input_tokens_seen="non_padding", logging_steps=1)``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.t0 = self.t_last = time.perf_counter()
        self.tokens_last = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not state.is_world_process_zero:  # one writer: the main process (logs hold figures reduced over ranks)
            return
        logs = logs or {}
        now = time.perf_counter()
        rec = {"step": state.global_step, "time_s": round(now - self.t0, 3)}
        if "loss" in logs:
            tokens = state.num_input_tokens_seen - self.tokens_last
            dt = max(now - self.t_last, 1e-9)
            rec |= {
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens": tokens,
                "tokens_per_s": round(tokens / dt, 2),
            }
            self.t_last, self.tokens_last = now, state.num_input_tokens_seen
        elif "eval_loss" in logs:
            rec |= {k: logs.get(k) for k in ("eval_loss", "eval_perplexity", "eval_tokens")}
        else:
            return
        rec |= peak_memory()
        self.records.append(rec)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(dumps(rec) + "\n")


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps showing, beside step N, step N's loss, learning rate and tokens/s (the bar
    moves when the step's record is logged). Evaluations show their own bar (:class:`qtune.train.validation.
    ValidationTrainer`)."""

    def __init__(self, recorder: MetricsRecorder):
        self.recorder = recorder
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True
            )  # a resumed run starts at its checkpoint's step

    def on_step_end(self, args, state, control, **kwargs) -> None:
        # a step that logs moves the bar in on_log, together with its own figures (not the previous step's)
        if self.bar is not None and state.global_step % max(args.logging_steps, 1):
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        last = self.recorder.records[-1] if self.recorder.records else {}
        if self.bar is not None and "loss" in last and last.get("step") == state.global_step:
            self.bar.set_postfix(
                loss=f"{last['loss']:.4f}",
                lr=f"{last['learning_rate']:.2e}",
                tok_s=f"{last['tokens_per_s']:.0f}",
                refresh=False,
            )
            self.bar.update(state.global_step - self.bar.n)  # refreshes: the step count and its figures together
        if self.bar is not None and "eval_loss" in (logs or {}):
            self.bar.write(f"step {state.global_step}: val loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
