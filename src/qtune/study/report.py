"""The sweep report: the figures (:mod:`qtune.study.figures`, :mod:`qtune.study.pareto`) and ``report.md``
embedding them with the results table, the best and the Pareto front, the memory comparison and the final run."""

from __future__ import annotations

from pathlib import Path

from qtune.errors import QtuneError
from qtune.rundir import SweepDir
from qtune.study.figures import (
    FIGURES,
    TITLES,
    full_vs_best_bars,
    plot_curves,
    plot_full_vs_best,
    plot_memory,
    plot_memory_over_time,
)
from qtune.study.pareto import plot_pareto
from qtune.study.plotting import memory_label
from qtune.study.results import best_run, load_results, read_json
from qtune.study.spec import SweepSpec
from qtune.study.tables import md_table, stability_line, study_rows


def _references(sweep_dir: Path) -> dict[str, float]:
    """``reference_memory_gb`` of the sweep file the sweep ran (its copy ``sweep.yaml``); {} without one."""
    path = SweepDir(Path(sweep_dir)).spec
    if not path.is_file():
        return {}
    try:
        from qtune.config import read_yaml

        return SweepSpec.model_validate(read_yaml(path, "sweep file") or {}).reference_memory_gb
    except Exception:  # noqa: BLE001 - a sweep.yaml from another qtune only loses the reference bars
        return {}


def _write_figures(sweep: SweepDir, results: list[dict], best: dict) -> tuple[list[dict], str | None, list[str]]:
    """Every figure of :data:`qtune.study.figures.FIGURES`; returns the memory comparison's bars, why its full
    fine-tuning estimates are missing (None when present), and the Pareto front's runs."""
    sweep.figures.mkdir(exist_ok=True)
    name = best["run"]
    plot_memory(results, sweep.figure("memory_per_configuration"), name)
    bars, missing = full_vs_best_bars(best, _references(sweep.root))
    plot_full_vs_best(bars, best, memory_label([best]), sweep.figure("memory_full_vs_best"))
    plot_memory_over_time(sweep.root, best, sweep.figure("memory_over_time"))
    loss_label = "training loss (nats per token)"
    plot_curves(sweep.root, results, "loss", loss_label, "Training loss", sweep.figure("training_loss"), name)
    lr_title = "Learning-rate schedule"
    plot_curves(sweep.root, results, "learning_rate", "learning rate", lr_title, sweep.figure("learning_rate"), name)
    front = plot_pareto(results, sweep.figure("quality_vs_memory"), name)
    return bars, missing, front


def _summary_lines(results: list[dict], best: dict, front: list[str]) -> list[str]:
    """The table, the best run, the Pareto front, the ranking check, failures, estimate against measurement."""
    lines = [
        "# Sweep report",
        "",
        md_table(study_rows(results)),
        "",
        (
            f"Best configuration by validation loss (ties: less memory): **{best['run']}** "
            f"(val loss {best['val_loss']:.4f}, peak {best['peak_gib']} GiB)."
        ),
        "",
        f"Pareto front (no other run has both lower validation loss and lower peak memory): {', '.join(front)}.",
        "",
    ]
    stability = stability_line(results)
    if stability:
        lines += [stability, ""]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["Failed runs: " + "; ".join(f"{r['run']}: {r.get('error')}" for r in failed), ""]
    ok = [r for r in results if r.get("status") == "ok"]
    est = [(r["run"], r["peak_gib"], r["estimate_gib"]) for r in ok if r.get("estimate_gib") and r.get("peak_gib")]
    if est:
        lines += [
            "Estimate vs measured: "
            + ", ".join(f"{n} {e / m - 1:+.0%}" for n, m, e in est)
            + f" ({memory_label(results)}; the estimate uses the longest training sample as sequence length).",
            "",
        ]
    return lines


def _memory_lines(bars: list[dict], missing: str | None) -> list[str]:
    """The memory comparison (full fine-tuning against the best run) as a Markdown table."""
    lines = [
        "Memory of full fine-tuning against the best configuration (GiB; figure below):",
        "",
        "| what | GiB | kind | note |",
        "|---|---|---|---|",
    ]
    lines += [f"| {b['label']} | {b['gib']:.2f} | {b['kind']} | {b['note']} |" for b in bars]
    return lines + [""] + ([missing + ".", ""] if missing else [])


def _final_lines(sweep: SweepDir) -> list[str]:
    """The retrained best run's test loss (``final.json``), when there is one."""
    rec = (read_json(sweep.final) if sweep.final.is_file() else None) or {}
    test = (rec.get("test") or {}).get("adapter", {}).get("test")
    if not test:
        return []
    return [
        (
            f"Final: {rec['run']} retrained, test loss {test['loss']:.4f} (perplexity {test['perplexity']:.3f}, "
            f"{test['tokens']} tokens); base without adapter {rec['test']['base']['test']['loss']:.4f}."
        ),
        "",
    ]


def write_report(sweep_dir: str | Path) -> Path:
    """Write the figures (:data:`qtune.study.figures.FIGURES`) and ``report.md`` for a sweep directory; returns
    the report's path.

    Raises:
        QtuneError: no results in ``sweep_dir``, or no finished run to plot.
    """
    sweep = SweepDir(Path(sweep_dir))
    results = load_results(sweep.root)
    best = best_run(results)
    if best is None:
        raise QtuneError(f"{sweep_dir}: no finished run with a validation loss to report")
    bars, missing, front = _write_figures(sweep, results, best)
    lines = _summary_lines(results, best, front) + _memory_lines(bars, missing) + _final_lines(sweep)
    for fig in FIGURES:
        lines += [f"## {TITLES[fig]}", "", f"![{TITLES[fig]}](figures/{fig}.png)", ""]
    sweep.report.write_text("\n".join(lines), encoding="utf-8")
    return sweep.report
