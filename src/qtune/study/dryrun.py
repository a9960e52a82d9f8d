"""``qtune sweep --dry-run``: the expanded grid with each run's memory estimate (:func:`plan`), as text
(:func:`format_plan`); nothing trains and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtune.errors import QtuneError
from qtune.study.results import Device, full_finetuning_estimates
from qtune.study.spec import Run, SweepSpec, base_name, expand, fmt_value, load_sweep, setup_of


def _device(runs: list[Run], device: str | None) -> Device:
    """The device to estimate for: ``device`` (checked), else cuda when a run has ``train.require_cuda`` or a GPU
    is visible, else cpu."""
    if device is None:
        import torch

        need = any(r.config.train.require_cuda for r in runs)
        device = "cuda" if need or torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise QtuneError(f"--device {device!r}: expected cuda or cpu")
    return "cuda" if device == "cuda" else "cpu"


def _estimate(run: Run, device: Device) -> Any:
    from qtune.model.memory import estimate_run_config

    try:
        return estimate_run_config(run.config, device=device)
    except (OSError, ValueError) as e:  # a hub id the estimator cannot reach (offline), an unreadable config
        raise QtuneError(f"{run.name}: memory estimate: {run.config.model.name}: {str(e).splitlines()[0]}") from None


def plan(path: str | Path, device: str | None = None) -> dict:
    """What ``qtune sweep`` would do, without training: the expanded grid with each run's memory estimate.

    ``device``: cuda or cpu for the estimates; default cuda when a run has ``train.require_cuda`` (the config
    targets a GPU) or a GPU is visible, else cpu. The estimate takes ``data.max_length`` as the sequence length and
    logits at every position (no prepared data yet), an upper bound of the sweep's own estimate column.

    Returns:
        {"path", "device", "set", "runs": [{"run", "setup", "quant", "r", "overrides" (beyond ``set``),
        "estimate_gib", "trainable_params"}], "bases": [{"quant", "setup", "runs"}] (each distinct base, evaluated
        alone), "full_finetuning": see :func:`qtune.study.results.full_finetuning_estimates` (the first run's model
        and shape), "notes", "humaneval_limit", "humaneval_base", "val_halves"}.

    Raises:
        QtuneError: invalid sweep file or run config, an unknown device, a model config that cannot be read.
    """
    spec, base = load_sweep(path)
    runs, notes = expand(spec, base)
    device = _device(runs, device)
    rows: list[dict] = []
    bases: dict[str, dict] = {}
    first_inputs: dict = {}
    for run in runs:
        cfg = run.config
        est = _estimate(run, device)
        first_inputs = first_inputs or est.to_dict()["inputs"]
        rows.append(_row(spec, run, est))
        key = json.dumps([cfg.model.model_dump(), cfg.quant.model_dump(), cfg.data.model_dump()], sort_keys=True)
        alone = {"quant": cfg.quant.quant, "setup": setup_of(cfg.quant.quant, trained=False), "runs": []}
        bases.setdefault(key, alone)["runs"].append(run.name)
    full = full_finetuning_estimates(runs[0].config.model.name, first_inputs) if runs and first_inputs else []
    return {
        "path": str(path),
        "device": device,
        "set": dict(spec.set),
        "runs": rows,
        "bases": list(bases.values()),
        "full_finetuning": full,
        "notes": notes,
        "humaneval_limit": spec.humaneval_limit,
        "humaneval_base": spec.humaneval_base,
        "val_halves": spec.val_halves,
    }


def _row(spec: SweepSpec, run: Run, est: Any) -> dict:
    cfg = run.config
    return {
        "run": run.name,
        "setup": setup_of(cfg.quant.quant),
        "quant": cfg.quant.quant,
        "r": cfg.lora.r,
        "overrides": {k: v for k, v in run.overrides.items() if k not in spec.set or spec.set[k] != v},
        "estimate_gib": round(est.peak_gib, 4),
        "trainable_params": est.trainable_params,
    }


def _run_table(runs: list[dict]) -> list[str]:
    """The runs as aligned text columns (numbers right-aligned), a heading line first."""
    heads = ("run", "setup", "quant", "r", "estimate GiB", "trainable", "overrides")
    table = [
        [
            r["run"],
            r["setup"],
            r["quant"],
            str(r["r"]),
            f"{r['estimate_gib']:.2f}",
            f"{r['trainable_params']:,}",
            " ".join(f"{k}={fmt_value(v)}" for k, v in r["overrides"].items()),
        ]
        for r in runs
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(heads)]
    right = {3, 4, 5}
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ).rstrip()
        for row in [list(heads)] + table
    ]


def format_plan(p: dict) -> str:
    """:func:`plan`'s result as the text ``qtune sweep --dry-run`` prints (GiB)."""
    metric = "peak allocated" if p["device"] == "cuda" else "peak RSS"
    head = (
        f"{p['path']}: {len(p['runs'])} training runs, {len(p['bases'])} bases evaluated alone; memory "
        f"estimates for {p['device']} ({metric}, GiB; sequence length data.max_length, logits at every "
        "position: an upper bound)"
    )
    lines = [head]
    if p["set"]:
        lines.append("every run: " + " ".join(f"{k}={fmt_value(v)}" for k, v in p["set"].items()))
    lines += _run_table(p["runs"])
    lines.append("bases evaluated alone (no training; adapter disabled after the base's first run):")
    for b in p["bases"]:
        lines.append(f"  {base_name(b['quant']):<10} {b['setup']:<22} base of {', '.join(b['runs'])}")
    for f in p["full_finetuning"]:
        lines.append(
            f"reference, not trained: {f['label']}: {f['gib']:.2f} GiB estimated ({f['trainable_params']:,} trainable)"
        )
    evals = ["validation loss and perplexity (token-weighted) of every run and base"]
    if p["val_halves"]:
        evals.append("the validation loss of each half of the val split")
    if p["humaneval_limit"]:
        evals.append(
            f"greedy HumanEval pass@1 on the first {p['humaneval_limit']} problems"
            + (" (bases too)" if p["humaneval_base"] else "")
        )
    lines.append("evaluations: " + "; ".join(evals))
    lines += p["notes"]
    lines.append("dry run: nothing was trained")
    return "\n".join(lines)
