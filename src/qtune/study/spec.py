"""The sweep file and its grid: :class:`SweepSpec` (validated YAML), :func:`expand` (the runs, each with its
validated config) and the names of setups and bases the tables and figures use.

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
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qtune.config import format_validation_error, load_config, read_yaml
from qtune.errors import QtuneError

AXIS_KEYS = {
    "quant": "quant.quant",
    "r": "lora.r",
    "learning_rate": "train.learning_rate",
    "batch_size": "train.batch_size",
}
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
"""Prefix of an axis value in a run name (``r16``, ``lr0.0002``); other keys use their last part and ``=``."""

QUANTIZED = ("int8", "nf4", "fp4")
"""``quant.quant`` values that quantize the frozen base (bitsandbytes); none, fp16 and bf16 keep it 32/16-bit."""

SETUPS = ("quantization only", "no fine-tuning", "LoRA only", "quantization + LoRA")
"""The study's setups, in the table's order: a base evaluated alone (8/4-bit: quantization only; 16/32-bit: the
reference), then the trained runs on a 16/32-bit base (LoRA only) and on a quantized one."""

RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9._=+-]*"
"""What a ``runs:`` or ``extra_runs:`` name may be: safe as a file name."""


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
        default_factory=dict, description="Named configurations (name -> dotted overrides), each crossed with the axes."
    )
    extra_runs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named runs added after the grid, not crossed with the axes (name -> dotted "
        "overrides applied over set); the name is the run name.",
    )
    humaneval_limit: int | None = Field(
        None, gt=0, strict=True, description="Greedy HumanEval pass@1 on the first N problems after each finished run."
    )
    humaneval_max_new_tokens: int = Field(384, gt=0, description="Most new tokens per HumanEval answer.")
    humaneval_base: bool = Field(True, description="Also HumanEval each distinct base alone (adapter disabled).")
    alpha_per_r: float | None = Field(2.0, description="lora_alpha = alpha_per_r x r per run; None keeps the base's.")
    timeout_s: float | None = Field(None, gt=0, description="Per-run wall-clock limit; a run over it is failed.")
    retry_failed: bool = Field(False, description="Rerun runs whose result says failed.")
    val_halves: bool = Field(
        False,
        description="Also the validation loss of each half of the val split (first and second half of its "
        "rows, same token-weighted function) per finished run, to check that the ranking holds on both: one more "
        "validation pass per run.",
    )
    reference_memory_gb: dict[str, float] = Field(
        default_factory=dict,
        description="Published memory figures (label -> decimal GB, as printed) that the "
        "report draws beside qtune's estimates and measurement in memory_full_vs_best.png.",
    )


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
        QtuneError: missing file, YAML error, unknown key, empty or unknown axis, unknown variant, missing base
            (every problem, one line each).
    """
    path = Path(path)
    data = read_yaml(path, "sweep file") or {}
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise QtuneError(format_validation_error(e, str(path))) from None
    problems = _axis_problems(spec, path) + _named_run_problems(spec, path)
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


def _axis_problems(spec: SweepSpec, path: Path) -> list[str]:
    problems = []
    if not spec.axes and not spec.runs and not spec.extra_runs:
        problems.append(
            f"{path}: no axes and no runs: nothing to sweep (e.g. axes: {{quant: [nf4, int8], r: [4, 16]}})"
        )
    for axis, values in spec.axes.items():
        if not values:
            problems.append(f"{path}: axes.{axis}: empty list")
        if axis not in AXIS_KEYS and axis != "variant" and "." not in axis:
            problems.append(
                f"{path}: axes.{axis}: unknown axis (use quant, r, learning_rate, batch_size, variant "
                "or a dotted config key such as lora.lora_dropout)"
            )
    for v in spec.axes.get("variant", []):
        if v not in VARIANTS:
            problems.append(f"{path}: axes.variant: unknown variant {v!r} (expected one of {', '.join(VARIANTS)})")
    return problems


def _named_run_problems(spec: SweepSpec, path: Path) -> list[str]:
    problems = []
    axis_keys = {AXIS_KEYS.get(a, a) for a in spec.axes if a != "variant"}
    for section, entries in (("runs", spec.runs), ("extra_runs", spec.extra_runs)):
        for name, over in entries.items():
            if not re.fullmatch(RUN_NAME, str(name)):
                problems.append(
                    f"{path}: {section}.{name}: a run name starts with a letter or digit and holds only "
                    "letters, digits and . _ = + -"
                )
            if not isinstance(over, dict):
                problems.append(f"{path}: {section}.{name}: expected a mapping of dotted config keys to values")
                continue
            for key in over:
                if "." not in str(key):
                    problems.append(
                        f"{path}: {section}.{name}.{key}: expected a dotted config key such as "
                        f"{AXIS_KEYS.get(key, 'quant.quant')} (short axis names belong under axes)"
                    )
                elif section == "runs" and key in axis_keys:
                    problems.append(f"{path}: runs.{name}.{key}: also an axis; the axis would override it")
    return problems


def fmt_value(v: Any) -> str:
    """An override value as a run name or the dry run prints it: floats in ``%g``, lists joined by ``+``."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return str(v)


def run_name(parts: list[str]) -> str:
    """A run name safe as a file name: the parts joined by "-", anything but letters, digits and ``._=+-``
    replaced by "_" (an axis value such as ``org/model`` must not make a subdirectory)."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(p for p in parts if p)) or "base"


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``key=value`` strings for ``--set`` (values as JSON, which the config loader reads as YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def expand(spec: SweepSpec, base: Path | None) -> tuple[list[Run], list[str]]:
    """The grid as runs, in file order, plus a note for each skipped combination (loftq on a non-4-bit base).

    With ``runs``, every named configuration is crossed with the axes; its name leads the run name. The
    ``extra_runs`` follow, each once, under its own name.

    Every run's config is validated (``load_config``) before anything trains; each :class:`Run` keeps it.

    Raises:
        QtuneError: a run's config is invalid (every problem, one line each), or two runs share a name.
    """
    runs, notes, problems = _grid_runs(spec, base)
    for name, over in spec.extra_runs.items():
        overrides = _alpha_follows_r(spec, dict(spec.set) | over)
        try:
            cfg = load_config(base, set_args(overrides))
        except QtuneError as e:
            problems += [f"{name}: {line}" for line in str(e).splitlines()]
            continue
        runs.append(Run(name, overrides, {"run": name, "quant": cfg.quant.quant, "r": cfg.lora.r}, cfg))
    seen = [r.name for r in runs]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    problems += [f"run name {n!r} occurs twice (rename a runs: entry)" for n in twice]
    if problems:
        raise QtuneError("\n".join(problems))
    return runs, notes


def _grid_runs(spec: SweepSpec, base: Path | None) -> tuple[list[Run], list[str], list[str]]:
    """The named configurations crossed with the axes: (runs, notes on skipped LoftQ pairs, config problems)."""
    axes = list(spec.axes.items())
    runs: list[Run] = []
    notes: list[str] = []
    problems: list[str] = []
    named = list(spec.runs.items()) or [("", {})]
    combos = itertools.product(named, itertools.product(*(values for _, values in axes))) if axes or spec.runs else []
    for (rname, rover), combo in combos:
        overrides, labels, name = _grid_point(spec, rname, rover, [axis for axis, _ in axes], combo)
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
    return runs, notes, problems


def _grid_point(
    spec: SweepSpec, rname: str, rover: dict[str, Any], axes: list[str], combo: tuple
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The overrides, labels and name of one named configuration at one combination of axis values."""
    overrides = dict(spec.set) | rover
    labels: dict[str, Any] = {"run": rname} if rname else {}
    parts = [rname]
    for axis, value in zip(axes, combo, strict=False):
        labels[axis] = value
        if axis == "variant":
            overrides |= VARIANTS[value]
            if value != "lora":
                parts.append(value)
            continue
        key = AXIS_KEYS.get(axis, axis)
        overrides[key] = value
        prefix = SHORT.get(key, key.split(".")[-1] + "=")
        parts.append(f"{prefix}{fmt_value(value)}")
    _alpha_follows_r(spec, overrides)
    return overrides, labels, run_name(parts)


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
