"""The sweep: a grid of quantization x LoRA rank (x learning rate, batch size, LoRA variant), one ``qtune train``
subprocess per run, one ``results/<run>.json`` per run, a table (CSV + Markdown) and the best configuration.

A sweep file (YAML)::

    base: ../demo.yaml          # run config the grid starts from (relative to this file); defaults when omitted
    output_dir: runs/sweep      # sweep directory: runs/<run>/, results/<run>.json, results.csv, results.md
    set: {train.max_steps: 10}  # overrides applied to every run
    axes:                       # each a list; short names or any dotted config key
      quant: [nf4, int8]        # quant.quant
      r: [8, 16]                # lora.r (lora_alpha follows as alpha_per_r x r unless lora.lora_alpha is set)
      learning_rate: [2.0e-4]   # train.learning_rate
      batch_size: [4]           # train.batch_size
      variant: [lora, dora]     # lora, dora, rslora, loraplus, loftq (loftq only on nf4/fp4; other pairs skipped)
    runs:                       # optional named configurations, each crossed with the axes (an ablation list)
      fp32: {quant.quant: none}
      nf4-lr5e-4: {train.learning_rate: 5.0e-4}
    extra_runs:                 # optional named runs NOT crossed with the axes (``set`` still applies)
      bf16-r16: {quant.quant: bf16, lora.r: 16}
    humaneval_limit: 20         # optional: greedy HumanEval pass@1 on the first N problems for each run
    val_halves: true            # optional: also the validation loss of each half of the val split (ranking check)
    reference_memory_gb:        # optional: published figures (decimal GB) drawn beside the report's estimates
      full fine-tuning, fp32 + Adam (paper): 112

Each run executes in its own process, so its peak memory is its own. A rerun skips runs whose result file exists
(``retry_failed`` reruns failures). A failed run (exception, out of memory, NaN loss) is recorded with its error
and the sweep goes on. Each finished run also gets the validation loss of its base alone (the quantization-only
setup: same weights, adapter disabled), computed once per distinct base; the table shows each base as its own row
(setup "quantization only" for an 8/4-bit base, "no fine-tuning" for a 16/32-bit one) beside the trained
runs ("LoRA only" on a 16/32-bit base, "quantization + LoRA").

``qtune sweep --dry-run`` (:func:`plan`) prints the expanded grid and each run's memory estimate without training.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qtune.config import format_validation_error, load_config, read_yaml
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.rundir import RunDir

AXIS_KEYS = {"quant": "quant.quant", "r": "lora.r", "learning_rate": "train.learning_rate",
             "batch_size": "train.batch_size"}
"""Short axis names and the config field each sets."""

VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "dora": {"lora.use_dora": True},
    "rslora": {"lora.use_rslora": True},
    "loraplus": {"lora.loraplus_lr_ratio": 16},
    "loftq": {"lora.init": "loftq"},
}
"""LoRA variants: the overrides each adds (PEFT use_dora, use_rslora, LoRA+ ratio 16 as Hayou et al. 2024
suggest, LoftQ initialisation)."""

SHORT = {"quant.quant": "", "lora.r": "r", "train.learning_rate": "lr", "train.batch_size": "b"}

QUANTIZED = ("int8", "nf4", "fp4")
"""``quant.quant`` values that quantize the frozen base (bitsandbytes); none, fp16 and bf16 keep it 32/16-bit."""

SETUPS = ("quantization only", "no fine-tuning", "LoRA only", "quantization + LoRA")
"""The study's setups, in the table's order: a base evaluated alone (8/4-bit: quantization only; 16/32-bit: the
reference), then the trained runs on a 16/32-bit base (LoRA only) and on a quantized one."""


def base_name(quant: str | None) -> str:
    """The table's name for a base evaluated alone: ``QUANT-base``, fp32 for ``quant.quant: none``."""
    return f"{'fp32' if quant == 'none' else quant}-base"


def setup_of(quant: str | None, trained: bool = True) -> str:
    """The setup a run belongs to: see :data:`SETUPS` (``trained=False``: a base evaluated alone)."""
    if not trained:
        return SETUPS[0] if quant in QUANTIZED else SETUPS[1]
    return SETUPS[3] if quant in QUANTIZED else SETUPS[2]


class SweepSpec(BaseModel):
    """A validated sweep file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    base: str | None = Field(None, description="Run config the grid starts from, relative to the sweep file.")
    output_dir: str = Field("runs/sweep", description="Sweep directory (relative to the working directory).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides applied to every run.")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Grid axes: name -> values.")
    runs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named configurations (name -> dotted overrides), each crossed with the axes.")
    extra_runs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named runs added after the grid, not crossed with the axes (name -> dotted "
        "overrides applied over set); the name is the run name.")
    humaneval_limit: int | None = Field(
        None, gt=0, strict=True, description="Greedy HumanEval pass@1 on the first N problems after each finished run.")
    humaneval_max_new_tokens: int = Field(384, gt=0, description="Most new tokens per HumanEval answer.")
    humaneval_base: bool = Field(True, description="Also HumanEval each distinct base alone (adapter disabled).")
    alpha_per_r: float | None = Field(2.0, description="lora_alpha = alpha_per_r x r per run; None keeps the base's.")
    timeout_s: float | None = Field(None, gt=0, description="Per-run wall-clock limit; a run over it is failed.")
    retry_failed: bool = Field(False, description="Rerun runs whose result says failed.")
    val_halves: bool = Field(
        False, description="Also the validation loss of each half of the val split (first and second half of its "
        "rows, same token-weighted function) per finished run, to check that the ranking holds on both: one more "
        "validation pass per run.")
    reference_memory_gb: dict[str, float] = Field(
        default_factory=dict, description="Published memory figures (label -> decimal GB, as printed) that the "
        "report draws beside qtune's estimates and measurement in memory_full_vs_best.png.")


@dataclass
class Run:
    """One grid point: its name and the ``--set`` overrides that make it."""

    name: str
    overrides: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)
    config: Any = field(default=None, repr=False, compare=False)
    """The validated :class:`qtune.config.RunConfig` (set by :func:`expand`)."""


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path | None]:
    """Read and validate a sweep file; returns the spec and the resolved base config path.

    Raises:
        QtuneError: missing file, YAML error, unknown key, empty or unknown axis, unknown variant, missing base.
    """
    path = Path(path)
    data = read_yaml(path, "sweep file") or {}
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise QtuneError(format_validation_error(e, str(path))) from None
    problems = []
    if not spec.axes and not spec.runs and not spec.extra_runs:
        problems.append(f"{path}: no axes and no runs: nothing to sweep (e.g. axes: {{quant: [nf4, int8], r: [4, 16]}})")
    for axis, values in spec.axes.items():
        if not values:
            problems.append(f"{path}: axes.{axis}: empty list")
        if axis not in AXIS_KEYS and axis != "variant" and "." not in axis:
            problems.append(f"{path}: axes.{axis}: unknown axis (use quant, r, learning_rate, batch_size, variant "
                            "or a dotted config key such as lora.lora_dropout)")
    for v in spec.axes.get("variant", []):
        if v not in VARIANTS:
            problems.append(f"{path}: axes.variant: unknown variant {v!r} (expected one of {', '.join(VARIANTS)})")
    axis_keys = {AXIS_KEYS.get(a, a) for a in spec.axes if a != "variant"}
    for section, entries in (("runs", spec.runs), ("extra_runs", spec.extra_runs)):
        for name, over in entries.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", str(name)):
                problems.append(f"{path}: {section}.{name}: a run name starts with a letter or digit and holds only "
                                "letters, digits and . _ = + -")
            if not isinstance(over, dict):
                problems.append(f"{path}: {section}.{name}: expected a mapping of dotted config keys to values")
                continue
            for key in over:
                if "." not in str(key):
                    problems.append(f"{path}: {section}.{name}.{key}: expected a dotted config key such as "
                                    f"{AXIS_KEYS.get(key, 'quant.quant')} (short axis names belong under axes)")
                elif section == "runs" and key in axis_keys:
                    problems.append(f"{path}: runs.{name}.{key}: also an axis; the axis would override it")
    for label, gb in spec.reference_memory_gb.items():
        if not gb > 0:
            problems.append(f"{path}: reference_memory_gb.{label}: expected a positive number of GB (got {gb})")
    base = None
    if spec.base:
        base = (path.parent / spec.base).resolve()
        if not base.is_file():
            problems.append(f"{path}: base: config file not found: {base}")
    if problems:
        raise QtuneError("\n".join(problems))
    return spec, base


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return str(v)


def run_name(parts: list[str]) -> str:
    """A run name safe as a file name: the parts joined by "-", anything but letters, digits and ``._=+-``
    replaced by "_" (an axis value such as ``org/model`` must not make a subdirectory)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(p for p in parts if p)) or "base"


def expand(spec: SweepSpec, base: Path | None) -> tuple[list[Run], list[str]]:
    """The grid as runs, in file order, plus a note for each skipped combination (loftq on a non-4-bit base).

    With ``runs``, every named configuration is crossed with the axes; its name leads the run name. The
    ``extra_runs`` follow, each once, under its own name.

    Every run's config is validated (``load_config``) before anything trains; each :class:`Run` keeps it.

    Raises:
        QtuneError: a run's config is invalid (every problem, one line each).
    """
    axes = list(spec.axes.items())
    runs, notes, problems = [], [], []
    named = list(spec.runs.items()) or [("", {})]
    combos = list(itertools.product(named, itertools.product(*(values for _, values in axes)))) if axes or spec.runs else []
    for (rname, rover), combo in combos:
        overrides = dict(spec.set) | rover
        labels, parts = ({"run": rname} if rname else {}), [rname]
        for (axis, _), value in zip(axes, combo):
            labels[axis] = value
            if axis == "variant":
                overrides |= VARIANTS[value]
                if value != "lora":
                    parts.append(value)
                continue
            key = AXIS_KEYS.get(axis, axis)
            overrides[key] = value
            prefix = SHORT.get(key, key.split(".")[-1] + "=")
            parts.append(f"{prefix}{_fmt(value)}")
        _alpha_follows_r(spec, overrides)
        name = run_name(parts)
        try:
            cfg = load_config(base, set_args(overrides))
        except QtuneError as e:
            msg = str(e)
            if "lora.init=loftq needs" in msg and labels.get("variant") == "loftq":
                notes.append(f"{name}: skipped (LoftQ needs a 4-bit base)")
                continue
            problems += [f"{name}: {line}" for line in msg.splitlines()]
            continue
        labels.setdefault("quant", cfg.quant.quant)
        labels.setdefault("r", cfg.lora.r)
        runs.append(Run(name, overrides, labels, cfg))
    for name, over in spec.extra_runs.items():
        overrides = _alpha_follows_r(spec, dict(spec.set) | over)
        try:
            cfg = load_config(base, set_args(overrides))
        except QtuneError as e:
            problems += [f"{name}: {line}" for line in str(e).splitlines()]
            continue
        runs.append(Run(name, overrides, {"run": name, "quant": cfg.quant.quant, "r": cfg.lora.r}, cfg))
    seen = [r.name for r in runs]
    problems += [f"run name {n!r} occurs twice (rename a runs: entry)" for n in sorted({n for n in seen if seen.count(n) > 1})]
    if problems:
        raise QtuneError("\n".join(problems))
    return runs, notes


def _alpha_follows_r(spec: SweepSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    """Set ``lora.lora_alpha = alpha_per_r x lora.r`` in ``overrides`` (in place) when the run sets a rank and no
    alpha; returns ``overrides``."""
    if "lora.lora_alpha" not in overrides and spec.alpha_per_r is not None and "lora.r" in overrides:
        overrides["lora.lora_alpha"] = spec.alpha_per_r * overrides["lora.r"]
    return overrides


def check_cuda(runs: list[Run], path: str | Path) -> None:
    """Raises QtuneError (one line) when a run's config has ``train.require_cuda`` and no CUDA GPU is visible,
    before anything starts."""
    from qtune.config import check_require_cuda

    for r in runs:
        check_require_cuda(r.config, path)


FULL_FINETUNING = (
    ("full fine-tuning, fp32 + AdamW", {"quant": "none", "compute_dtype": "float32"}),
    ("full fine-tuning, bf16 + AdamW", {"quant": "bf16", "compute_dtype": "bfloat16"}),
)
"""The full fine-tuning references of the memory comparison: every parameter trainable with AdamW, fp32
(weights, gradients, two AdamW states: 16 bytes per parameter) or bf16 throughout (8 bytes per parameter)."""


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
    shape = TrainShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in inputs.items() if k in known})
    counts = count_model(load_model_config(model))
    out = []
    for label, change in FULL_FINETUNING:
        est = estimate(counts, replace(shape, r=0, use_dora=False, lora_dropout=0.0, upcast_frozen=False, **change))
        out.append({"label": label, "gib": round(est.peak_gib, 4), "trainable_params": est.trainable_params})
    return out


def plan(path: str | Path, device: str | None = None) -> dict:
    """What ``qtune sweep`` would do, without training: the expanded grid with each run's memory estimate.

    ``device``: cuda or cpu for the estimates; default cuda when a run has ``train.require_cuda`` (the config
    targets a GPU) or a GPU is visible, else cpu. The estimate takes ``data.max_length`` as the sequence length and
    logits at every position (no prepared data yet), an upper bound of the sweep's own estimate column.

    Returns:
        {"path", "device", "set", "runs": [{"run", "setup", "quant", "r", "overrides" (beyond ``set``),
        "estimate_gib", "trainable_params"}], "bases": [{"quant", "setup", "runs"}] (each distinct base, evaluated
        alone), "full_finetuning": see :func:`full_finetuning_estimates` (the first run's model and shape),
        "notes", "humaneval_limit", "val_halves"}.

    Raises:
        QtuneError: invalid sweep file or run config, an unknown device, a model config that cannot be read.
    """
    from qtune.model.memory import estimate_run_config

    spec, base = load_sweep(path)
    runs, notes = expand(spec, base)
    if device is None:
        import torch

        need = any(r.config.train.require_cuda for r in runs)
        device = "cuda" if need or torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise QtuneError(f"--device {device!r}: expected cuda or cpu")
    rows, bases, first_inputs = [], {}, None
    for run in runs:
        cfg = run.config
        try:
            est = estimate_run_config(cfg, device=device)
        except (OSError, ValueError) as e:  # a hub id the estimator cannot reach (offline), an unreadable config
            raise QtuneError(f"{run.name}: memory estimate: {cfg.model.name}: {str(e).splitlines()[0]}") from None
        first_inputs = first_inputs or est.to_dict()["inputs"]
        rows.append({"run": run.name, "setup": setup_of(cfg.quant.quant), "quant": cfg.quant.quant, "r": cfg.lora.r,
                     "overrides": {k: v for k, v in run.overrides.items() if k not in spec.set or spec.set[k] != v},
                     "estimate_gib": round(est.peak_gib, 4), "trainable_params": est.trainable_params})
        key = json.dumps([cfg.model.model_dump(), cfg.quant.model_dump(), cfg.data.model_dump()], sort_keys=True)
        bases.setdefault(key, {"quant": cfg.quant.quant, "setup": setup_of(cfg.quant.quant, trained=False),
                               "runs": []})["runs"].append(run.name)
    full = full_finetuning_estimates(runs[0].config.model.name, first_inputs) if runs else []
    return {"path": str(path), "device": device, "set": dict(spec.set), "runs": rows, "bases": list(bases.values()),
            "full_finetuning": full, "notes": notes, "humaneval_limit": spec.humaneval_limit,
            "humaneval_base": spec.humaneval_base, "val_halves": spec.val_halves}


def format_plan(p: dict) -> str:
    """:func:`plan`'s result as the text ``qtune sweep --dry-run`` prints (GiB)."""
    metric = "peak allocated" if p["device"] == "cuda" else "peak RSS"
    lines = [(f"{p['path']}: {len(p['runs'])} training runs, {len(p['bases'])} bases evaluated alone; memory "
              f"estimates for {p['device']} ({metric}, GiB; sequence length data.max_length, logits at every "
              "position: an upper bound)")]
    if p["set"]:
        lines.append("every run: " + " ".join(f"{k}={_fmt(v)}" for k, v in p["set"].items()))
    heads = ("run", "setup", "quant", "r", "estimate GiB", "trainable", "overrides")
    table = [[r["run"], r["setup"], r["quant"], str(r["r"]), f"{r['estimate_gib']:.2f}", f"{r['trainable_params']:,}",
              " ".join(f"{k}={_fmt(v)}" for k, v in r["overrides"].items())] for r in p["runs"]]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(heads)]
    right = {3, 4, 5}
    for row in [list(heads)] + table:
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append("bases evaluated alone (no training; adapter disabled after the base's first run):")
    for b in p["bases"]:
        lines.append(f"  {base_name(b['quant']):<10} {b['setup']:<22} base of {', '.join(b['runs'])}")
    for f in p["full_finetuning"]:
        lines.append(f"reference, not trained: {f['label']}: {f['gib']:.2f} GiB estimated "
                     f"({f['trainable_params']:,} trainable)")
    evals = ["validation loss and perplexity (token-weighted) of every run and base"]
    if p["val_halves"]:
        evals.append("the validation loss of each half of the val split")
    if p["humaneval_limit"]:
        evals.append(f"greedy HumanEval pass@1 on the first {p['humaneval_limit']} problems"
                     + (" (bases too)" if p["humaneval_base"] else ""))
    lines.append("evaluations: " + "; ".join(evals))
    lines += p["notes"]
    lines.append("dry run: nothing was trained")
    return "\n".join(lines)


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``key=value`` strings for ``--set`` (values as JSON, which the config loader reads as YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def _last_error(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln.split(":")[0] or "OutOfMemory" in ln:
            return ln[:500]
    return lines[-1][:500] if lines else "no output"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line that is not a JSON object (a run killed mid-write leaves a
    truncated last line) is skipped."""
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def run_estimate(rd: RunDir, device: str, world_size: int = 1):
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
    return estimate_run_config(load_config(rd.config, saved_run=True), seq_len=seq, device=device,
                               supervised_share=share, world_size=world_size)


def collect_result(run: Run, rd: RunDir, rc: int, wall: float, log: str, base: Path | None) -> dict:
    """The result record of one finished subprocess (see the module docstring for the fields)."""
    summary = _read_json(rd.summary) or {}
    status, error = "ok", None
    if rc != 0 or not summary:
        status, error = "failed", _last_error(log) if rc != 0 else "no train_summary.json"
    # a logged loss is null when it was not finite (qtune.jsonio); older files may still hold NaN
    losses = [rec[k] for rec in read_metrics(rd.metrics) for k in ("loss", "eval_loss") if k in rec]
    val = summary.get("val_loss")
    if status == "ok" and (any(x is None or not math.isfinite(x) for x in losses)
                           or (isinstance(val, float) and not math.isfinite(val))):
        status, error = "failed", "NaN or infinite loss"
    result = {
        "run": run.name, "status": status, "error": error, "labels": run.labels, "overrides": run.overrides,
        "config": yaml.safe_load(rd.config.read_text()) if rd.config.is_file() else None,
        "returncode": rc, "process_wall_s": round(wall, 2),
        "versions": _read_json(rd.versions),
    }
    for key in ("wall_time_s", "tokens_per_s", "train_tokens", "trainable_params", "total_params", "first_train_loss",
                "final_train_loss", "val_loss", "val_perplexity", "val_tokens", "peak_allocated_gib",
                "peak_reserved_gib", "peak_rss_gib", "steps"):
        result[key] = summary.get(key)
    result["peak_gib"] = result["peak_allocated_gib"] if result["peak_allocated_gib"] is not None else result["peak_rss_gib"]
    result["memory_metric"] = "peak_allocated" if result["peak_allocated_gib"] is not None else "peak_rss"
    result["estimate_gib"] = None
    if status == "ok":
        try:
            device = "cuda" if result["peak_allocated_gib"] is not None else "cpu"
            est = run_estimate(rd, device, summary.get("world_size") or 1)
            result["estimate_gib"] = round(est.peak_gib, 4)
            result["estimate"] = est.to_dict()
        except Exception as e:  # noqa: BLE001 - an estimate failure must not lose a finished run
            result["estimate_error"] = f"{type(e).__name__}: {e}"
    return result


MMAP_THRESHOLD = 131072
"""glibc ``M_MMAP_THRESHOLD`` (bytes) for CPU runs: a fixed value turns off glibc's dynamic threshold, so freed
tensors above it go back to the OS and peak RSS tracks live memory (like CUDA's peak allocated) instead of what the
heap retains (mallopt(3)). Measured on SmolLM2-135M, NF4, 4 x 252 tokens: peak RSS 1.77 GiB with it, 3.28 without."""


def qtune_env() -> dict[str, str]:
    """This process's environment with the qtune it runs first on PYTHONPATH, so a child ``python -m qtune.cli``
    runs the same code."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def child_env() -> dict[str, str]:
    """Environment additions for each run's process: the fixed glibc mmap threshold on Linux CPU runs, unless the
    caller already set ``MALLOC_MMAP_THRESHOLD_``."""
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    return {}


def run_one(run: Run, sweep_dir: Path, base: Path | None, timeout_s: float | None = None,
            extra: list[str] | None = None, run_root: str = "runs") -> dict:
    """Train one grid point in a fresh ``python -m qtune.cli train`` process; returns its result record.

    The child's stdout and stderr go to ``logs/<run>.log`` in the sweep directory.
    """
    rd = RunDir(sweep_dir / run_root / run.name)
    cmd = [sys.executable, "-m", "qtune.cli", "train", "--overwrite"]
    if base is not None:
        cmd += ["--config", str(base)]
    for s in set_args(run.overrides) + [f"train.output_dir={json.dumps(str(rd.root))}"] + list(extra or []):
        cmd += ["--set", s]
    log_path = sweep_dir / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = qtune_env()
    env.update(child_env())
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = -9
            log.write(f"\nerror: timed out after {timeout_s} s\n")
    wall = time.perf_counter() - start
    result = collect_result(run, rd, rc, wall, log_path.read_text(encoding="utf-8", errors="replace"), base)
    result["child_env"] = child_env()
    return result


def qtune_eval(args: list[str], timeout_s: float | None = None) -> dict:
    """Run ``qtune eval ARGS --json`` in a fresh process (the qtune this process runs) and return its JSON.

    Raises:
        QtuneError: the evaluation failed or timed out (its last error line).
    """
    env = qtune_env()
    try:
        proc = subprocess.run([sys.executable, "-m", "qtune.cli", "eval", *args, "--json"], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise QtuneError(f"qtune eval {' '.join(args)}: timed out after {timeout_s} s") from None
    if proc.returncode != 0:
        raise QtuneError(_last_error(proc.stderr + proc.stdout))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def base_key(result: dict) -> str:
    """What the base model of a run depends on: model, quantization and data (the same key, the same base loss)."""
    cfg = result.get("config") or {}
    return json.dumps([cfg.get("model"), cfg.get("quant"), cfg.get("data")], sort_keys=True)


def add_evaluations(res: dict, spec: SweepSpec, earlier: list[dict], echo=print) -> None:
    """Add to a finished run's record the validation loss of its base alone (``base_val_loss`` over
    ``base_val_tokens`` supervised tokens, from ``qtune eval`` or reused from an earlier run with the same base)
    and perplexity (``base_val_perplexity``); with ``spec.val_halves`` the run's validation loss on each half of
    the val split (``val_halves``: two :func:`qtune.train.validation.split_loss` records; ``val_loss_half1``,
    ``val_loss_half2``); with ``spec.humaneval_limit``, greedy HumanEval pass@1 of the run and of its base unless
    ``spec.humaneval_base`` is off (``humaneval_pass@1``, ``base_humaneval_pass@1``). A failed evaluation is
    recorded in ``eval_error``; the run stays finished."""
    rd = (res.get("config") or {}).get("train", {}).get("output_dir")
    same = [r for r in earlier if r.get("status") == "ok" and base_key(r) == base_key(res) and r["run"] != res["run"]]
    try:
        # only a figure recorded with its token count is today's token-weighted one (see remeasure_val_loss)
        prev = next((r for r in same if r.get("base_val_tokens") is not None), None)
        if prev:
            res["base_val_loss"], res["base_val_tokens"] = prev["base_val_loss"], prev["base_val_tokens"]
            res["base_val_perplexity"] = prev.get("base_val_perplexity", math.exp(min(prev["base_val_loss"], 50.0)))
        else:
            base = qtune_eval(["--run", rd, "--splits", "val"], spec.timeout_s)["base"]["val"]
            res["base_val_loss"], res["base_val_tokens"] = base["loss"], base["tokens"]
            res["base_val_perplexity"] = base["perplexity"]
        if spec.val_halves:
            echo("    validation loss of each half of the val split ...")
            halves = run_val_halves(rd, spec.timeout_s)
            res["val_halves"] = halves
            res["val_loss_half1"], res["val_loss_half2"] = halves[0]["loss"], halves[1]["loss"]
        if spec.humaneval_limit:
            he = ["--run", rd, "--humaneval", "--limit", str(spec.humaneval_limit),
                  "--max-new-tokens", str(spec.humaneval_max_new_tokens)]
            echo(f"    HumanEval, first {spec.humaneval_limit} problems ...")
            res["humaneval_limit"] = spec.humaneval_limit
            res["humaneval_pass@1"] = qtune_eval(he, spec.timeout_s)["pass@1"]
            prev = next((r for r in same if r.get("base_humaneval_pass@1") is not None
                         and r.get("humaneval_limit") == spec.humaneval_limit), None)
            if prev:
                res["base_humaneval_pass@1"] = prev["base_humaneval_pass@1"]
            elif spec.humaneval_base:
                res["base_humaneval_pass@1"] = qtune_eval(he + ["--base"], spec.timeout_s)["pass@1"]
    except (QtuneError, KeyError, ValueError) as e:
        res["eval_error"] = str(e)
        echo(f"    evaluation failed: {e}")


def val_halves(run_dir: str | Path) -> list[dict]:
    """The trained adapter's validation loss on each half of the run's val split: rows ``[0, ceil(n/2))`` and
    ``[ceil(n/2), n)`` in split order, each :func:`qtune.train.validation.split_loss` (the one token-weighted
    function of every other loss column). Two halves that rank the runs alike show the ranking is not noise.

    Returns:
        [first half, second half], each {"loss", "perplexity", "tokens"}.

    Raises:
        QtuneError: the run holds no trained adapter or no prepared validation split.
    """
    from qtune.data.prepare import load_splits
    from qtune.data.tokenize import padding_collator
    from qtune.model.adapters import load_trained
    from qtune.train.validation import split_loss

    rd = RunDir(Path(run_dir)).require_adapter()
    splits = load_splits(rd.data)
    if "val" not in splits or len(splits["val"]) < 2:
        raise QtuneError(f"{run_dir}: no validation split of at least 2 rows to halve")
    val = splits["val"].remove_columns([c for c in splits["val"].column_names if c == "row"])
    model, tokenizer, _ = load_trained(rd.root)
    collate = padding_collator(tokenizer)
    cut = (len(val) + 1) // 2
    return [split_loss(model, val.select(range(cut)), collate),
            split_loss(model, val.select(range(cut, len(val))), collate)]


def run_val_halves(run_dir: str | Path, timeout_s: float | None = None) -> list[dict]:
    """:func:`val_halves` in a fresh process (the model's memory is freed with it).

    Raises:
        QtuneError: it failed or timed out (its last error line).
    """
    code = ("import json, sys; from qtune.study.sweep import val_halves; "
            "print(json.dumps(val_halves(sys.argv[1])))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                              timeout=timeout_s, env=qtune_env(), check=False)
    except subprocess.TimeoutExpired:
        raise QtuneError(f"{run_dir}: validation halves timed out after {timeout_s} s") from None
    if proc.returncode != 0:
        raise QtuneError(_last_error(proc.stderr + proc.stdout))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ranking_stability(results: list[dict], k: int = 3) -> dict | None:
    """Whether the two halves of the validation split rank the finished runs alike (:func:`val_halves`).

    Returns:
        None when fewer than ``k + 1`` finished runs have both halves; else {"k", "runs" (counted), "top" (the
        ``k`` best by the whole val loss), "half1", "half2" (the ``k`` best by each half), "same_set" (both halves
        name the same ``k`` runs as the whole split), "same_order" (in the same order too)}.
    """
    ok = [r for r in results if r.get("status") == "ok" and r.get("val_loss") is not None
          and r.get("val_loss_half1") is not None and r.get("val_loss_half2") is not None]
    if len(ok) <= k:
        return None

    def top(key: str) -> list[str]:
        return [r["run"] for r in sorted(ok, key=lambda r: (r[key], r["run"]))[:k]]

    full, a, b = top("val_loss"), top("val_loss_half1"), top("val_loss_half2")
    return {"k": k, "runs": len(ok), "top": full, "half1": a, "half2": b,
            "same_set": set(a) == set(full) == set(b), "same_order": a == full == b}


def stability_line(results: list[dict], k: int = 3) -> str | None:
    """One Markdown sentence on :func:`ranking_stability`, or None without the halves."""
    st = ranking_stability(results, k)
    if st is None:
        return None
    verdict = ("agree on the top {k} and their order" if st["same_order"] else
               "agree on the top {k} runs, not on their order" if st["same_set"] else
               "do not agree on the top {k}: the ranking below them is within noise").format(k=k)
    return (f"Ranking check: the two halves of the validation split {verdict} (whole: {', '.join(st['top'])}; "
            f"first half: {', '.join(st['half1'])}; second half: {', '.join(st['half2'])}; {st['runs']} runs).")


def remeasure_val_loss(res: dict, timeout_s: float | None = None, echo=print) -> None:
    """Replace a result's validation figures with ``qtune eval``'s for its saved adapter (in place).

    Results written before qtune had one validation loss hold no ``val_tokens``: their ``val_loss`` was a mean of
    per-batch means (it moved with the eval batch size) and their ``base_val_loss`` a batched figure. A sweep that
    ranks them with today's runs must rank one quantity, so they are measured again; when that fails (the run
    directory is gone) the old figures are dropped and the error kept in ``eval_error``.
    """
    rd = (res.get("config") or {}).get("train", {}).get("output_dir")
    try:
        ev = qtune_eval(["--run", str(rd), "--splits", "val"], timeout_s)
        adapter, base = ev["adapter"]["val"], ev["base"]["val"]
    except (QtuneError, KeyError, ValueError) as e:
        res |= {"val_loss": None, "val_perplexity": None, "base_val_loss": None, "base_val_perplexity": None,
                "eval_error": str(e)}
        echo(f"    evaluation failed: {e}")
        return
    res |= {"val_loss": adapter["loss"], "val_perplexity": adapter["perplexity"], "val_tokens": adapter["tokens"],
            "base_val_loss": base["loss"], "base_val_tokens": base["tokens"], "base_val_perplexity": base["perplexity"]}


def results_dir(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / "results"


def load_results(sweep_dir: str | Path) -> list[dict]:
    """Every ``results/<run>.json`` of a sweep directory, sorted by run name.

    Raises:
        QtuneError: the directory holds no results.
    """
    files = sorted(results_dir(Path(sweep_dir)).glob("*.json"))
    if not files:
        raise QtuneError(f"{sweep_dir}: no sweep results (expected {results_dir(Path(sweep_dir))}/<run>.json)")
    return [r for r in (_read_json(f) for f in files) if r is not None]


def best_run(results: list[dict]) -> dict | None:
    """The finished run with the lowest validation loss (to 4 decimals); ties go to the lower peak memory."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("val_loss") is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: (round(r["val_loss"], 4), r.get("peak_gib") or math.inf, r["run"]))


COLUMNS = [("run", "run"), ("status", "status"), ("setup", "setup"), ("quant", "quant"), ("r", "r"),
           ("variant", "variant"), ("learning_rate", "lr"), ("batch_size", "batch"), ("peak_gib", "peak GiB"),
           ("estimate_gib", "estimate GiB"), ("wall_time_s", "train s"), ("tokens_per_s", "tokens/s"),
           ("trainable_params", "trainable"), ("final_train_loss", "final train loss"), ("val_loss", "val loss"),
           ("val_perplexity", "val ppl"), ("val_loss_half1", "val loss, 1st half"),
           ("val_loss_half2", "val loss, 2nd half"), ("base_val_loss", "base val loss"),
           ("humaneval_pass@1", "HumanEval pass@1"), ("base_humaneval_pass@1", "base HumanEval pass@1"),
           ("error", "error")]

QUANT_ORDER = ("none", "fp16", "bf16", "int8", "nf4", "fp4")
"""Table order of the base formats: most bits first."""


def table_rows(results: list[dict]) -> list[dict]:
    """One flat row per run (the table's columns), labels taken from the run's resolved config."""
    rows = []
    for r in results:
        cfg = r.get("config") or {}
        lora = cfg.get("lora", {})
        variant = ("dora" if lora.get("use_dora") else "rslora" if lora.get("use_rslora") else
                   "loraplus" if lora.get("loraplus_lr_ratio") else "loftq" if lora.get("init") == "loftq" else "lora")
        labels = r.get("labels") or {}
        quant = cfg.get("quant", {}).get("quant", labels.get("quant"))
        row = {"run": r["run"], "status": r["status"], "setup": setup_of(quant), "quant": quant,
               "r": lora.get("r", labels.get("r")), "variant": labels.get("variant", variant),
               "learning_rate": cfg.get("train", {}).get("learning_rate"), "batch_size": cfg.get("train", {}).get("batch_size")}
        for key, _ in COLUMNS:
            row.setdefault(key, r.get(key))
        rows.append(row)
    return rows


def base_rows(results: list[dict]) -> list[dict]:
    """One row per distinct base (:func:`base_key`) that was evaluated alone: the quantization-only setup for an
    8/4-bit base, the no-fine-tuning reference for a 16/32-bit one. Named by :func:`base_name` (``-2``, ``-3`` ...
    when two bases share a format); its val loss, perplexity and HumanEval are the base's own (adapter disabled)."""
    rows, seen, names = [], set(), []
    for r in results:
        if r.get("status") != "ok" or r.get("base_val_loss") is None or base_key(r) in seen:
            continue
        seen.add(base_key(r))
        quant = (r.get("config") or {}).get("quant", {}).get("quant", r.get("labels", {}).get("quant"))
        name = base_name(quant)
        names.append(name)
        if names.count(name) > 1:
            name += f"-{names.count(name)}"
        ppl = r.get("base_val_perplexity")
        rows.append({"run": name, "status": "ok", "setup": setup_of(quant, trained=False), "quant": quant,
                     "val_loss": r["base_val_loss"],
                     "val_perplexity": ppl if ppl is not None else math.exp(min(r["base_val_loss"], 50.0)),
                     "humaneval_pass@1": r.get("base_humaneval_pass@1"), "base_of": r["run"]})
    return rows


def _row_order(row: dict) -> tuple:
    quant, r = row.get("quant"), row.get("r")
    return (SETUPS.index(row["setup"]) if row.get("setup") in SETUPS else len(SETUPS),
            QUANT_ORDER.index(quant) if quant in QUANT_ORDER else len(QUANT_ORDER),
            r if isinstance(r, (int, float)) else -1, str(row["run"]))


def study_rows(results: list[dict]) -> list[dict]:
    """The results table: each base evaluated alone (:func:`base_rows`), then every run (:func:`table_rows`),
    ordered by setup (:data:`SETUPS`), base format (:data:`QUANT_ORDER`), rank and name."""
    return sorted(base_rows(results) + table_rows(results), key=_row_order)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "/")


def write_table(sweep_dir: str | Path, results: list[dict]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in the sweep directory (:func:`study_rows`: the bases evaluated alone
    and every run); the Markdown names the best run and, with validation halves, whether they rank alike."""
    sweep_dir = Path(sweep_dir)
    rows = study_rows(results)
    csv_path, md_path = sweep_dir / "results.csv", sweep_dir / "results.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        w.writeheader()
        w.writerows({k: row.get(k) for k, _ in COLUMNS} for row in rows)
    lines = [md_table(rows), ""]
    best = best_run(results)
    lines.append(f"Best by validation loss (ties: less memory): **{best['run']}**" if best else "No finished run with a validation loss.")
    stability = stability_line(results)
    if stability:
        lines += ["", stability]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def md_table(rows: list[dict]) -> str:
    """The rows as a GitHub Markdown table (error column only when some run failed)."""
    optional = {"error", "humaneval_pass@1", "base_humaneval_pass@1", "val_loss_half1", "val_loss_half2"}  # shown only when some run has them
    cols = [(k, h) for k, h in COLUMNS if k not in optional or any(r.get(k) is not None for r in rows)]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def run_sweep(path: str | Path, final: bool = False, echo=print) -> dict:
    """Run (or resume) the sweep in ``path``; write results, the table and, with ``final``, the final run.

    Returns:
        {"sweep_dir", "results": [...], "best": run name or None, "final": final record or None, "notes": [...]}.

    Raises:
        QtuneError: invalid sweep file or run config, or ``train.require_cuda`` without a GPU (before anything
            trains).
    """
    spec, base = load_sweep(path)
    runs, notes = expand(spec, base)
    check_cuda(runs, path)
    sweep_dir = Path(spec.output_dir)
    (sweep_dir / "results").mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    for note in notes:
        echo(note)
    for i, run in enumerate(runs, 1):
        out = results_dir(sweep_dir) / f"{run.name}.json"
        prev = _read_json(out)
        if prev and prev.get("status") == "ok" and prev.get("val_loss") is not None and prev.get("val_tokens") is None:
            echo(f"[{i}/{len(runs)}] {run.name}: val loss recorded by an older qtune, measuring it again ...")
            remeasure_val_loss(prev, spec.timeout_s, echo)
            out.write_text(json.dumps(prev, indent=2), encoding="utf-8")
        if prev and (prev.get("status") == "ok" or not spec.retry_failed):
            echo(f"[{i}/{len(runs)}] {run.name}: {prev.get('status')} earlier, skipped")
            continue
        echo(f"[{i}/{len(runs)}] {run.name}: training ...")
        res = run_one(run, sweep_dir, base, spec.timeout_s)
        if res["status"] == "ok":
            earlier = [r for r in (_read_json(f) for f in results_dir(sweep_dir).glob("*.json")) if r]
            add_evaluations(res, spec, earlier, echo)
        out.write_text(dumps(res, indent=2), encoding="utf-8")
        if res["status"] == "ok":
            he = f", HumanEval pass@1 {res['humaneval_pass@1']}" if res.get("humaneval_pass@1") is not None else ""
            echo(f"[{i}/{len(runs)}] {run.name}: ok, {res['wall_time_s']} s, peak {res['peak_gib']} GiB "
                 f"(estimate {res['estimate_gib']}), val loss {res['val_loss']} (base {res.get('base_val_loss')}){he}")
        else:
            echo(f"[{i}/{len(runs)}] {run.name}: FAILED: {res['error']}")
    names = {r.name for r in runs}
    results = [r for r in load_results(sweep_dir) if r["run"] in names]
    write_table(sweep_dir, results)
    best = best_run(results)
    final_rec = None
    if best:
        echo(f"best: {best['run']} (val loss {best['val_loss']:.4f}, peak {best['peak_gib']} GiB)")
    if final and best:
        final_rec = run_final(sweep_dir, Run(best["run"], best["overrides"], best["labels"]), base, spec.timeout_s, echo)
    return {"sweep_dir": str(sweep_dir), "results": results, "best": best["run"] if best else None,
            "final": final_rec, "notes": notes}


def run_final(sweep_dir: Path, run: Run, base: Path | None, timeout_s: float | None, echo=print) -> dict:
    """Retrain the best configuration into ``final/<run>`` and evaluate it once on the test split
    (``qtune eval --splits test``); writes and returns ``final.json``."""
    echo(f"final: retraining {run.name} ...")
    res = run_one(run, sweep_dir, base, timeout_s, run_root="final")
    if res["status"] == "ok":
        rd = sweep_dir / "final" / run.name
        try:
            res["test"] = qtune_eval(["--run", str(rd), "--splits", "test"], timeout_s)
            t = res["test"]["adapter"].get("test")
            if t:
                echo(f"final: test loss {t['loss']:.4f} (perplexity {t['perplexity']:.3f}); base {res['test']['base']['test']['loss']:.4f}")
        except QtuneError as e:
            res["status"], res["error"] = "failed", str(e)
    (sweep_dir / "final.json").write_text(dumps(res, indent=2), encoding="utf-8")
    return res
