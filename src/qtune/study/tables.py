"""The sweep's results table: each base evaluated alone and every run, as ``results.csv`` and ``results.md``
(:func:`write_table`), and whether the two halves of the validation split rank the runs alike."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from qtune.rundir import SweepDir
from qtune.study.results import base_key, best_run
from qtune.study.spec import SETUPS, base_name, setup_of

COLUMNS = [
    ("run", "run"),
    ("status", "status"),
    ("setup", "setup"),
    ("quant", "quant"),
    ("r", "r"),
    ("variant", "variant"),
    ("learning_rate", "lr"),
    ("batch_size", "batch"),
    ("peak_gib", "peak GiB"),
    ("estimate_gib", "estimate GiB"),
    ("wall_time_s", "train s"),
    ("tokens_per_s", "tokens/s"),
    ("trainable_params", "trainable"),
    ("final_train_loss", "final train loss"),
    ("val_loss", "val loss"),
    ("val_perplexity", "val ppl"),
    ("val_loss_half1", "val loss, 1st half"),
    ("val_loss_half2", "val loss, 2nd half"),
    ("base_val_loss", "base val loss"),
    ("humaneval_pass@1", "HumanEval pass@1"),
    ("base_humaneval_pass@1", "base HumanEval pass@1"),
    ("error", "error"),
]
"""The table's columns: (record key, heading)."""

OPTIONAL = {"error", "humaneval_pass@1", "base_humaneval_pass@1", "val_loss_half1", "val_loss_half2"}
"""Columns the Markdown table shows only when some row has a value in them."""

QUANT_ORDER = ("none", "fp16", "bf16", "int8", "nf4", "fp4")
"""Table order of the base formats: most bits first."""


def _variant(lora: dict) -> str:
    if lora.get("use_dora"):
        return "dora"
    if lora.get("use_rslora"):
        return "rslora"
    if lora.get("loraplus_lr_ratio"):
        return "loraplus"
    return "loftq" if lora.get("init") == "loftq" else "lora"


def table_rows(results: list[dict]) -> list[dict]:
    """One flat row per run (the table's columns), labels taken from the run's resolved config."""
    rows = []
    for r in results:
        cfg = r.get("config") or {}
        lora, train = cfg.get("lora", {}), cfg.get("train", {})
        labels = r.get("labels") or {}
        quant = cfg.get("quant", {}).get("quant", labels.get("quant"))
        row = {
            "run": r["run"],
            "status": r["status"],
            "setup": setup_of(quant),
            "quant": quant,
            "r": lora.get("r", labels.get("r")),
            "variant": labels.get("variant", _variant(lora)),
            "learning_rate": train.get("learning_rate"),
            "batch_size": train.get("batch_size"),
        }
        for key, _ in COLUMNS:
            row.setdefault(key, r.get(key))
        rows.append(row)
    return rows


def base_rows(results: list[dict]) -> list[dict]:
    """One row per distinct base (:func:`qtune.study.results.base_key`) that was evaluated alone: the
    quantization-only setup for an 8/4-bit base, the no-fine-tuning reference for a 16/32-bit one. Named by
    :func:`qtune.study.spec.base_name` (``-2``, ``-3`` ... when two bases share a format); its val loss, perplexity
    and HumanEval are the base's own (adapter disabled)."""
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
        rows.append(
            {
                "run": name,
                "status": "ok",
                "setup": setup_of(quant, trained=False),
                "quant": quant,
                "val_loss": r["base_val_loss"],
                "val_perplexity": ppl if ppl is not None else math.exp(min(r["base_val_loss"], 50.0)),
                "humaneval_pass@1": r.get("base_humaneval_pass@1"),
                "base_of": r["run"],
            }
        )
    return rows


def row_order(row: dict) -> tuple:
    """Sort key of a table row: setup (:data:`qtune.study.spec.SETUPS`), base format (:data:`QUANT_ORDER`), rank,
    name."""
    quant, r = row.get("quant"), row.get("r")
    return (
        SETUPS.index(row["setup"]) if row.get("setup") in SETUPS else len(SETUPS),
        QUANT_ORDER.index(quant) if quant in QUANT_ORDER else len(QUANT_ORDER),
        r if isinstance(r, (int, float)) else -1,
        str(row["run"]),
    )


def study_rows(results: list[dict]) -> list[dict]:
    """The results table: each base evaluated alone (:func:`base_rows`), then every run (:func:`table_rows`),
    ordered by :func:`row_order`."""
    return sorted(base_rows(results) + table_rows(results), key=row_order)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "/")


def md_table(rows: list[dict]) -> str:
    """The rows as a GitHub Markdown table (the :data:`OPTIONAL` columns only when some row has them)."""
    cols = [(k, h) for k, h in COLUMNS if k not in OPTIONAL or any(r.get(k) is not None for r in rows)]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_cell(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(out)


def write_table(sweep_dir: str | Path, results: list[dict]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in the sweep directory (:func:`study_rows`: the bases evaluated alone
    and every run); the Markdown names the best run and, with validation halves, whether they rank alike.
    Returns their paths (csv, md)."""
    sweep = SweepDir(Path(sweep_dir))
    rows = study_rows(results)
    with sweep.table_csv.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS])
        w.writeheader()
        w.writerows({k: row.get(k) for k, _ in COLUMNS} for row in rows)
    lines = [md_table(rows), ""]
    best = best_run(results)
    lines.append(
        f"Best by validation loss (ties: less memory): **{best['run']}**"
        if best
        else "No finished run with a validation loss."
    )
    stability = stability_line(results)
    if stability:
        lines += ["", stability]
    sweep.table_md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sweep.table_csv, sweep.table_md


def ranking_stability(results: list[dict], k: int = 3) -> dict | None:
    """Whether the two halves of the validation split rank the finished runs alike
    (:func:`qtune.study.evals.val_halves`).

    Returns:
        None when fewer than ``k + 1`` finished runs have both halves; else {"k", "runs" (counted), "top" (the
        ``k`` best by the whole val loss), "half1", "half2" (the ``k`` best by each half), "same_set" (both halves
        name the same ``k`` runs as the whole split), "same_order" (in the same order too)}.
    """
    keys = ("val_loss", "val_loss_half1", "val_loss_half2")
    ok = [r for r in results if r.get("status") == "ok" and all(r.get(key) is not None for key in keys)]
    if len(ok) <= k:
        return None

    def top(key: str) -> list[str]:
        """The ``k`` best runs by ``key`` (ties by name)."""
        return [r["run"] for r in sorted(ok, key=lambda r: (r[key], r["run"]))[:k]]

    full, a, b = top("val_loss"), top("val_loss_half1"), top("val_loss_half2")
    return {
        "k": k,
        "runs": len(ok),
        "top": full,
        "half1": a,
        "half2": b,
        "same_set": set(a) == set(full) == set(b),
        "same_order": a == full == b,
    }


def stability_line(results: list[dict], k: int = 3) -> str | None:
    """One Markdown sentence on :func:`ranking_stability`, or None without the halves."""
    st = ranking_stability(results, k)
    if st is None:
        return None
    if st["same_order"]:
        verdict = f"agree on the top {k} and their order"
    elif st["same_set"]:
        verdict = f"agree on the top {k} runs, not on their order"
    else:
        verdict = f"do not agree on the top {k}: the ranking below them is within noise"
    return (
        f"Ranking check: the two halves of the validation split {verdict} (whole: {', '.join(st['top'])}; "
        f"first half: {', '.join(st['half1'])}; second half: {', '.join(st['half2'])}; {st['runs']} runs)."
    )
