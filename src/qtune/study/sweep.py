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
    humaneval_limit: 20         # optional: greedy HumanEval pass@1 on the first N problems for each run

Each run executes in its own process, so its peak memory is its own. A rerun skips runs whose result file exists
(``retry_failed`` reruns failures). A failed run (exception, out of memory, NaN loss) is recorded with its error
and the sweep goes on. Each finished run also gets the validation loss of its base alone (the quantization-only
setup: same weights, adapter disabled), computed once per distinct base.
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


class SweepSpec(BaseModel):
    """A validated sweep file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    base: str | None = Field(None, description="Run config the grid starts from, relative to the sweep file.")
    output_dir: str = Field("runs/sweep", description="Sweep directory (relative to the working directory).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted overrides applied to every run.")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Grid axes: name -> values.")
    runs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named configurations (name -> dotted overrides), each crossed with the axes.")
    humaneval_limit: int | None = Field(
        None, gt=0, strict=True, description="Greedy HumanEval pass@1 on the first N problems after each finished run.")
    humaneval_max_new_tokens: int = Field(384, gt=0, description="Most new tokens per HumanEval answer.")
    humaneval_base: bool = Field(True, description="Also HumanEval each distinct base alone (adapter disabled).")
    alpha_per_r: float | None = Field(2.0, description="lora_alpha = alpha_per_r x r per run; None keeps the base's.")
    timeout_s: float | None = Field(None, gt=0, description="Per-run wall-clock limit; a run over it is failed.")
    retry_failed: bool = Field(False, description="Rerun runs whose result says failed.")


@dataclass
class Run:
    """One grid point: its name and the ``--set`` overrides that make it."""

    name: str
    overrides: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)


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
    if not spec.axes and not spec.runs:
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
    for name, over in spec.runs.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", str(name)):
            problems.append(f"{path}: runs.{name}: a run name starts with a letter or digit and holds only letters, "
                            "digits and . _ = + -")
        if not isinstance(over, dict):
            problems.append(f"{path}: runs.{name}: expected a mapping of dotted config keys to values")
            continue
        for key in over:
            if "." not in str(key):
                problems.append(f"{path}: runs.{name}.{key}: expected a dotted config key such as "
                                f"{AXIS_KEYS.get(key, 'quant.quant')} (short axis names belong under axes)")
            elif key in axis_keys:
                problems.append(f"{path}: runs.{name}.{key}: also an axis; the axis would override it")
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

    With ``runs``, every named configuration is crossed with the axes; its name leads the run name.

    Every run's config is validated (``load_config``) before anything trains.

    Raises:
        QtuneError: a run's config is invalid (every problem, one line each).
    """
    axes = list(spec.axes.items())
    runs, notes, problems = [], [], []
    named = list(spec.runs.items()) or [("", {})]
    for (rname, rover), combo in itertools.product(named, itertools.product(*(values for _, values in axes))):
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
        if "lora.lora_alpha" not in overrides and spec.alpha_per_r is not None and "lora.r" in overrides:
            overrides["lora.lora_alpha"] = spec.alpha_per_r * overrides["lora.r"]
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
        runs.append(Run(name, overrides, labels))
    seen = [r.name for r in runs]
    problems += [f"run name {n!r} occurs twice (rename a runs: entry)" for n in sorted({n for n in seen if seen.count(n) > 1})]
    if problems:
        raise QtuneError("\n".join(problems))
    return runs, notes


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
    and, with ``spec.humaneval_limit``, greedy HumanEval pass@1 of the run and of its base unless
    ``spec.humaneval_base`` is off (``humaneval_pass@1``, ``base_humaneval_pass@1``). A failed evaluation is
    recorded in ``eval_error``; the run stays finished."""
    rd = (res.get("config") or {}).get("train", {}).get("output_dir")
    same = [r for r in earlier if r.get("status") == "ok" and base_key(r) == base_key(res) and r["run"] != res["run"]]
    try:
        # only a figure recorded with its token count is today's token-weighted one (see remeasure_val_loss)
        prev = next((r for r in same if r.get("base_val_tokens") is not None), None)
        if prev:
            res["base_val_loss"], res["base_val_tokens"] = prev["base_val_loss"], prev["base_val_tokens"]
        else:
            base = qtune_eval(["--run", rd, "--splits", "val"], spec.timeout_s)["base"]["val"]
            res["base_val_loss"], res["base_val_tokens"] = base["loss"], base["tokens"]
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
        res |= {"val_loss": None, "val_perplexity": None, "base_val_loss": None, "eval_error": str(e)}
        echo(f"    evaluation failed: {e}")
        return
    res |= {"val_loss": adapter["loss"], "val_perplexity": adapter["perplexity"], "val_tokens": adapter["tokens"],
            "base_val_loss": base["loss"], "base_val_tokens": base["tokens"]}


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


COLUMNS = [("run", "run"), ("status", "status"), ("quant", "quant"), ("r", "r"), ("variant", "variant"),
           ("learning_rate", "lr"), ("batch_size", "batch"), ("peak_gib", "peak GiB"),
           ("estimate_gib", "estimate GiB"), ("wall_time_s", "train s"), ("tokens_per_s", "tokens/s"),
           ("trainable_params", "trainable"), ("final_train_loss", "final train loss"), ("val_loss", "val loss"),
           ("val_perplexity", "val ppl"), ("base_val_loss", "base val loss"),
           ("humaneval_pass@1", "HumanEval pass@1"), ("base_humaneval_pass@1", "base HumanEval pass@1"),
           ("error", "error")]


def table_rows(results: list[dict]) -> list[dict]:
    """One flat row per run (the table's columns), labels taken from the run's resolved config."""
    rows = []
    for r in results:
        cfg = r.get("config") or {}
        lora = cfg.get("lora", {})
        variant = ("dora" if lora.get("use_dora") else "rslora" if lora.get("use_rslora") else
                   "loraplus" if lora.get("loraplus_lr_ratio") else "loftq" if lora.get("init") == "loftq" else "lora")
        row = {"run": r["run"], "status": r["status"], "quant": cfg.get("quant", {}).get("quant", r["labels"].get("quant")),
               "r": lora.get("r", r["labels"].get("r")), "variant": r["labels"].get("variant", variant),
               "learning_rate": cfg.get("train", {}).get("learning_rate"), "batch_size": cfg.get("train", {}).get("batch_size")}
        for key, _ in COLUMNS:
            row.setdefault(key, r.get(key))
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "/")


def write_table(sweep_dir: str | Path, results: list[dict]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in the sweep directory; the Markdown names the best run."""
    sweep_dir = Path(sweep_dir)
    rows = table_rows(results)
    csv_path, md_path = sweep_dir / "results.csv", sweep_dir / "results.md"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        w.writeheader()
        w.writerows({k: row.get(k) for k, _ in COLUMNS} for row in rows)
    lines = [md_table(rows), ""]
    best = best_run(results)
    lines.append(f"Best by validation loss (ties: less memory): **{best['run']}**" if best else "No finished run with a validation loss.")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def md_table(rows: list[dict]) -> str:
    """The rows as a GitHub Markdown table (error column only when some run failed)."""
    optional = {"error", "humaneval_pass@1", "base_humaneval_pass@1"}  # shown only when some run has them
    cols = [(k, h) for k, h in COLUMNS if k not in optional or any(r.get(k) is not None for r in rows)]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def run_sweep(path: str | Path, final: bool = False, echo=print) -> dict:
    """Run (or resume) the sweep in ``path``; write results, the table and, with ``final``, the final run.

    Returns:
        {"sweep_dir", "results": [...], "best": run name or None, "final": final record or None, "notes": [...]}.

    Raises:
        QtuneError: invalid sweep file or run config (before anything trains).
    """
    spec, base = load_sweep(path)
    runs, notes = expand(spec, base)
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
