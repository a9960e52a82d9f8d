"""A sweep's result records: one ``results/<run>.json`` per run (:func:`collect_result`), joined with the memory
estimate of the run's config (:func:`run_estimate`), read back by :func:`load_results`; the best run.

A record holds the run's name, status (ok or failed) and error, labels, overrides, resolved config, return code,
process wall time, package versions, the training summary's figures (``wall_time_s``, ``tokens_per_s``,
``trainable_params``, losses, peak memory, ``steps``), ``peak_gib`` and ``memory_metric`` (peak allocated on CUDA,
peak RSS on CPU), ``estimate_gib`` and ``estimate``, and the evaluations :mod:`qtune.study.evals` adds.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml

from qtune.config import load_config
from qtune.errors import QtuneError, QtuneWarning
from qtune.rundir import RunDir, SweepDir
from qtune.study.process import last_error
from qtune.study.spec import Run

SUMMARY_KEYS = (
    "wall_time_s",
    "tokens_per_s",
    "train_tokens",
    "trainable_params",
    "total_params",
    "first_train_loss",
    "final_train_loss",
    "val_loss",
    "val_perplexity",
    "val_tokens",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "peak_rss_gib",
    "steps",
)
"""Figures of ``train_summary.json`` copied into a run's result record."""

Device = Literal["cuda", "cpu"]
"""What a memory estimate is for: peak allocated on a CUDA GPU, peak RSS on the CPU."""

FULL_FINETUNING: tuple[tuple[str, dict[str, Any]], ...] = (
    ("full fine-tuning, fp32 + AdamW", {"quant": "none", "compute_dtype": "float32"}),
    ("full fine-tuning, bf16 + AdamW", {"quant": "bf16", "compute_dtype": "bfloat16"}),
)
"""The full fine-tuning references of the memory comparison: every parameter trainable with AdamW, fp32
(weights, gradients, two AdamW states: 16 bytes per parameter) or bf16 throughout (8 bytes per parameter)."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or not JSON (a record cut short by a kill)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_estimate(rd: RunDir, device: Device, world_size: int = 1) -> Any:
    """The memory estimate of the finished run in ``rd`` (:func:`qtune.model.memory.estimate_run_config`), from its
    saved config, on ``device`` (cuda: the run measured peak allocated; cpu: peak RSS) over ``world_size``
    processes, with ``seq_len`` the longest sample and the supervised share of the run's own training split
    (:func:`qtune.model.memory.training_split_stats`). A sweep's run is one ``qtune train`` process (DDP over
    ``world_size`` when a launcher started more). Without the split: ``data.max_length`` and every position (bounds).

    Raises:
        QtuneError: the saved config or the model config cannot be read.
    """
    from qtune.model.memory import estimate_run_config, training_split_stats

    try:
        from qtune.data.prepare import load_splits

        seq, share = training_split_stats(load_splits(rd.data)["train"])
    except Exception:  # noqa: BLE001 - a missing or unreadable split only loosens the estimate to its bounds
        seq, share = None, None
    return estimate_run_config(
        load_config(rd.config, saved_run=True),
        seq_len=seq,
        device=device,
        supervised_share=share,
        world_size=world_size,
    )


def full_finetuning_estimates(model: str, inputs: dict) -> list[dict]:
    """Estimated peak memory of full fine-tuning (:data:`FULL_FINETUNING`) of ``model`` at a run's shape.

    Args:
        model: the run's ``model.name`` (a config.json alone is enough).
        inputs: the run's estimator inputs (``estimate["inputs"]`` of a result, :class:`qtune.model.memory.TrainShape`
            fields); batch, sequence length, checkpointing and device are kept, the rest made full fine-tuning.

    Returns:
        [{"label", "gib" (peak allocated on cuda, peak RSS on cpu), "trainable_params"}] in FULL_FINETUNING order.

    Raises:
        QtuneError: the model config cannot be read.
    """
    from dataclasses import fields, replace

    from qtune.model.memory import TrainShape, count_model, estimate, load_model_config

    known = {f.name for f in fields(TrainShape)}
    kept: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in inputs.items() if k in known}
    shape = TrainShape(**kept)
    counts = count_model(load_model_config(model))
    out = []
    for label, change in FULL_FINETUNING:
        est = estimate(counts, replace(shape, r=0, use_dora=False, lora_dropout=0.0, upcast_frozen=False, **change))
        out.append({"label": label, "gib": round(est.peak_gib, 4), "trainable_params": est.trainable_params})
    return out


def _status(rd: RunDir, rc: int, log: str, summary: dict) -> tuple[str, str | None]:
    """(ok or failed, the error) of a training process that exited with ``rc``."""
    if rc != 0 or not summary:
        return "failed", last_error(log) if rc != 0 else "no train_summary.json"
    # a logged loss is null when it was not finite (qtune.jsonio); older files may still hold NaN
    losses = [rec[k] for rec in rd.read_metrics() for k in ("loss", "eval_loss") if k in rec]
    val = summary.get("val_loss")
    if any(x is None or not math.isfinite(x) for x in losses) or (isinstance(val, float) and not math.isfinite(val)):
        return "failed", "NaN or infinite loss"
    return "ok", None


def collect_result(run: Run, rd: RunDir, rc: int, wall: float, log: str, base: Path | None) -> dict:
    """The result record of one finished training process (see the module docstring for the fields).

    Args:
        rc: the process's return code; ``wall``: its wall time (s); ``log``: its output (for the error line).
        base: the sweep's base config (unused; kept for callers).
    """
    summary = read_json(rd.summary) or {}
    status, error = _status(rd, rc, log, summary)
    result = {
        "run": run.name,
        "status": status,
        "error": error,
        "labels": run.labels,
        "overrides": run.overrides,
        "config": yaml.safe_load(rd.config.read_text()) if rd.config.is_file() else None,
        "returncode": rc,
        "process_wall_s": round(wall, 2),
        "versions": read_json(rd.versions),
    }
    for key in SUMMARY_KEYS:
        result[key] = summary.get(key)
    allocated = result["peak_allocated_gib"]
    result["peak_gib"] = allocated if allocated is not None else result["peak_rss_gib"]
    result["memory_metric"] = "peak_allocated" if allocated is not None else "peak_rss"
    result["estimate_gib"] = None
    if status == "ok":
        try:
            est = run_estimate(rd, "cuda" if allocated is not None else "cpu", summary.get("world_size") or 1)
            result["estimate_gib"] = round(est.peak_gib, 4)
            result["estimate"] = est.to_dict()
        except Exception as e:  # noqa: BLE001 - an estimate failure must not lose a finished run
            result["estimate_error"] = f"{type(e).__name__}: {e}"
    return result


def read_results(sweep: SweepDir) -> list[dict]:
    """Every readable result record of ``sweep``, sorted by run name; [] without any."""
    return [r for r in (read_json(f) for f in sweep.result_files()) if r]


def load_results(sweep_dir: str | Path) -> list[dict]:
    """Every ``results/<run>.json`` of a sweep directory, sorted by run name.

    A file that is not a result record (not JSON, cut short, no ``run`` and ``status``) is left out with a
    :class:`qtune.errors.QtuneWarning` naming it, never silently: rerunning the sweep redoes that run.

    Raises:
        QtuneError: the directory holds no results.
    """
    sweep = SweepDir(Path(sweep_dir))
    files = sweep.result_files()
    if not files:
        raise QtuneError(f"{sweep_dir}: no sweep results (expected {sweep.results}/<run>.json)")
    results = []
    for f in files:
        r = read_json(f)
        if isinstance(r, dict) and isinstance(r.get("run"), str) and "status" in r:
            results.append(r)
        else:
            warnings.warn(
                f"{f}: not a result record (expected a JSON object with run and status); left out, "
                "rerun the sweep to redo that run",
                QtuneWarning,
                stacklevel=2,
            )
    return results


def best_run(results: list[dict]) -> dict | None:
    """The finished run with the lowest validation loss (to 4 decimals); ties go to the lower peak memory."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("val_loss") is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(r["val_loss"], 4), r.get("peak_gib") or math.inf, r["run"]))


def base_key(result: dict) -> str:
    """What the base model of a run depends on: model, quantization and data (the same key, the same base loss)."""
    cfg = result.get("config") or {}
    return json.dumps([cfg.get("model"), cfg.get("quant"), cfg.get("data")], sort_keys=True)
