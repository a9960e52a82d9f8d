"""The sweep report's figures (PNG, matplotlib), written to ``SWEEP_DIR/figures/`` and named after what they show
(the seed paper's figure in brackets):

    memory_per_configuration.png  measured peak memory per run (GiB) with the estimator's prediction beside it
    memory_full_vs_best.png       [Fig. 3] full fine-tuning (fp32 + AdamW, bf16 + AdamW; estimated) against the best
                                  configuration, estimated and measured, log scale; published figures beside them
                                  when the sweep file gives ``reference_memory_gb``
    memory_over_time.png          [Fig. 4] peak memory so far vs training time (s) of the best run
    training_loss.png             [Fig. 5] training loss (nats per token) per optimizer step: the best run in bold,
                                  every other finished run thin
    learning_rate.png             [Fig. 6] the best run's learning-rate schedule (runs with another schedule beside it)
    quality_vs_memory.png         validation loss vs peak memory, the Pareto front (no run both lower and leaner),
                                  each base evaluated alone as a dashed line (:mod:`qtune.study.pareto`)

Every figure labels its axes with units, marks the best configuration (lowest validation loss) and keeps its
legend and run labels off the data, so it stays readable at 16 and more runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtune.errors import QtuneError
from qtune.rundir import SweepDir
from qtune.study.plotting import (
    best_ticks,
    color,
    legend_below,
    memory_label,
    ordered,
    pyplot,
    quant_handles,
    quant_of,
    save,
)
from qtune.study.results import full_finetuning_estimates

FIGURES = (
    "memory_per_configuration",
    "memory_full_vs_best",
    "memory_over_time",
    "training_loss",
    "learning_rate",
    "quality_vs_memory",
)
TITLES = {
    "memory_per_configuration": "Peak memory per configuration, measured and estimated",
    "memory_full_vs_best": "Full fine-tuning against the best configuration (paper Fig. 3)",
    "memory_over_time": "Memory over the training of the best configuration (paper Fig. 4)",
    "training_loss": "Training loss over the steps (paper Fig. 5)",
    "learning_rate": "Learning-rate schedule (paper Fig. 6)",
    "quality_vs_memory": "Validation loss against peak memory, Pareto front",
}
"""Each figure's heading in report.md."""

PEAK_KEYS = (
    ("peak_allocated_gib", "peak allocated"),
    ("peak_reserved_gib", "peak reserved"),
    ("peak_rss_gib", "peak RSS"),
)
"""The memory figures of a ``metrics.jsonl`` record and their names in memory_over_time.png."""


def _metrics(sweep_dir: Path, result: dict) -> list[dict]:
    return SweepDir(Path(sweep_dir)).run_of(result).read_metrics()


def plot_memory(results: list[dict], out: Path, best: str | None = None) -> None:
    """Horizontal bars, one pair per finished run (table order): measured peak (solid, coloured by base format) and
    estimated peak (hatched), GiB; the best run's label is bold and starred."""
    plt = pyplot()
    from matplotlib.patches import Patch

    ok = ordered(results)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.42 * len(ok) + 1.8)))
    ys = range(len(ok))
    measured = [r.get("peak_gib") or 0 for r in ok]
    estimated = [r.get("estimate_gib") or 0 for r in ok]
    colors = [color(quant_of(r)) for r in ok]
    ax.barh([y - 0.2 for y in ys], measured, height=0.38, color=colors)
    ax.barh([y + 0.2 for y in ys], estimated, height=0.38, color="white", edgecolor=colors, hatch="///")
    top = max(measured + estimated + [1e-3])
    for y, m, e in zip(ys, measured, estimated, strict=False):
        if m:
            ax.text(m + top * 0.01, y - 0.2, f"{m:.2f}", va="center", fontsize=7)
        if e:
            ax.text(e + top * 0.01, y + 0.2, f"{e:.2f}", va="center", fontsize=7, color="dimgray")
    best_ticks(ax, [r["run"] for r in ok], best)
    ax.invert_yaxis()  # table order from the top
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel(memory_label(results))
    ax.set_title("Peak training memory per configuration")
    handles = [
        Patch(color="gray", label="measured"),
        Patch(facecolor="white", edgecolor="gray", hatch="///", label="estimate (qtune estimate)"),
    ]
    handles += quant_handles(quant_of(r) for r in ok)
    fig.tight_layout()
    legend_below(fig, ax, handles, ncol=min(len(handles), 4))
    save(plt, fig, out)


def full_vs_best_bars(best: dict, references: dict[str, float] | None = None) -> tuple[list[dict], str | None]:
    """The bars of :func:`plot_full_vs_best`: [{"label", "gib", "kind" (estimate/measured/reference), "note"}],
    and why the full fine-tuning estimates are missing (None when present).

    The full fine-tuning estimates take the best run's model and estimator inputs (batch, sequence length, device,
    gradient checkpointing) with every parameter trainable (:func:`qtune.study.results.full_finetuning_estimates`);
    ``references`` (label -> decimal GB) are converted to GiB.
    """
    bars, missing = [], None
    inputs = (best.get("estimate") or {}).get("inputs")
    model = ((best.get("config") or {}).get("model") or {}).get("name")
    if inputs and model:
        try:
            for f in full_finetuning_estimates(model, inputs):
                note = f"{f['trainable_params']:,} trainable parameters"
                bars.append({"label": f"{f['label']} (estimate)", "gib": f["gib"], "kind": "estimate", "note": note})
        except (QtuneError, OSError, ValueError) as e:
            missing = f"full fine-tuning not estimated: {str(e).splitlines()[0]}"
    else:
        missing = "full fine-tuning not estimated: the best run has no estimate inputs"
    if best.get("estimate_gib"):
        note = "qtune estimate for the run's config"
        bars.append(
            {"label": f"{best['run']} (best): estimate", "gib": best["estimate_gib"], "kind": "estimate", "note": note}
        )
    if best.get("peak_gib"):
        metric = "peak allocated" if best.get("memory_metric") == "peak_allocated" else "peak RSS"
        bars.append(
            {"label": f"{best['run']} (best): measured", "gib": best["peak_gib"], "kind": "measured", "note": metric}
        )
    for label, gb in (references or {}).items():
        bars.append({"label": label, "gib": gb * 1e9 / 2**30, "kind": "reference", "note": f"{gb:g} GB as published"})
    return bars, missing


BAR_STYLE: dict[str, dict[str, Any]] = {
    "estimate": {"facecolor": "white", "edgecolor": "#1f77b4", "hatch": "///"},
    "measured": {"facecolor": "#2ca02c", "edgecolor": "#2ca02c"},
    "reference": {"facecolor": "#bbbbbb", "edgecolor": "#555555"},
}
BAR_NAMES = {
    "estimate": "estimate (qtune.model.memory)",
    "measured": "measured in this sweep",
    "reference": "published figure (GB converted to GiB)",
}


def plot_full_vs_best(bars: list[dict], best: dict, ylabel: str, out: Path) -> None:
    """Horizontal bars on a log scale (GiB), each labelled with its value: see :func:`full_vs_best_bars`."""
    plt = pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(8, max(2.6, 0.5 * len(bars) + 1.6)))
    for y, b in enumerate(bars):
        ax.barh(y, b["gib"], height=0.6, **BAR_STYLE[b["kind"]])
        text = f"{b['gib']:.1f} GiB" if b["gib"] >= 10 else f"{b['gib']:.2f} GiB"
        if b["kind"] == "reference":
            text += f" ({b['note'].split(' ')[0]} GB)"
        ax.text(b["gib"] * 1.08, y, text, va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b["label"] for b in bars], fontsize=8)
    for t, b in zip(ax.get_yticklabels(), bars, strict=False):
        if b["label"].startswith(f"{best['run']} (best)"):
            t.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xscale("log")
    values = [b["gib"] for b in bars] or [1.0]
    ax.set_xlim(min(values) / 2, max(values) * 4)  # room for the value labels right of the longest bar
    ax.set_xlabel(f"{ylabel}, log scale")
    ax.set_title(f"Training memory: full fine-tuning vs the best configuration ({best['run']})")
    kinds = [k for k in ("estimate", "measured", "reference") if any(b["kind"] == k for b in bars)]
    fig.tight_layout()
    legend_below(fig, ax, [Patch(**BAR_STYLE[k], label=BAR_NAMES[k]) for k in kinds], ncol=len(kinds))
    save(plt, fig, out)


def plot_memory_over_time(sweep_dir: Path, best: dict, out: Path) -> None:
    """Peak memory so far (GiB) against training wall time (s) of the best run."""
    plt = pyplot()
    recs = [r for r in _metrics(sweep_dir, best) if "time_s" in r]
    steps = [r for r in recs if "loss" in r]  # training steps; the line ends where training ended
    evals = [r for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in PEAK_KEYS:
        pts = [(r["time_s"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            (line,) = ax.plot(*zip(*pts, strict=False), marker="." if len(pts) <= 200 else None, label=label)
            ev = [(r["time_s"], r[key]) for r in evals if r.get(key) is not None]
            if ev:
                ax.scatter(
                    *zip(*ev, strict=False),
                    marker="D",
                    color=line.get_color(),
                    zorder=3,
                    label=f"{label}, during evaluation",
                )
    if best.get("estimate_gib"):
        ax.axhline(best["estimate_gib"], linestyle="--", color="gray", label="estimate")
    values = [r[k] for r in recs for k, _ in PEAK_KEYS if r.get(k) is not None] + [best.get("estimate_gib") or 0]
    ax.set_ylim(0, max(values + [1e-3]) * 1.08)  # the top markers whole, not cut by the frame
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("GiB (peak so far at each logged step)")
    ax.set_title(f"Memory over training: {best['run']} (best)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save(plt, fig, out)


def _series(sweep_dir: Path, result: dict, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in _metrics(sweep_dir, result) if m.get(key) is not None and "step" in m]


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start), same length as ``values``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _shade(base_color: str, i: int, n: int) -> tuple:
    """``base_color`` lightened towards white for the ``i``-th of ``n`` runs of one base format (the lowest rank
    lightest), so runs sharing a colour stay apart in the legend."""
    from matplotlib.colors import to_rgb

    t = 0.6 * (1 - i / (n - 1)) if n > 1 else 0.0
    return tuple(c + (1 - c) * t for c in to_rgb(base_color))


def _other_curves(ax: Any, ok: list[dict], series: dict, skip: set, window: int) -> None:
    """Every run's curve but those in ``skip``: thin, its base format's colour, lighter for lower ranks."""
    per_quant: dict[str, list[str]] = {}
    for r in ok:
        per_quant.setdefault(quant_of(r), []).append(r["run"])
    for r in ok:
        name, pts = r["run"], series[r["run"]]
        if not pts or name in skip:
            continue
        group = per_quant[quant_of(r)]
        xs, ys = zip(*pts, strict=False)
        shade = _shade(color(quant_of(r)), group.index(name), len(group))
        ax.plot(xs, moving_mean(list(ys), window), linewidth=1.0, alpha=0.9, color=shade, label=name)


def _best_curve(ax: Any, sweep_dir: Path, best: dict, key: str, pts: list, window: int, same: int) -> None:
    """The best run's curve, bold and black (each step faint behind its mean), its validation losses marked."""
    name = best["run"]
    label = f"{name} (best)" + (f"; same schedule: {same} other run{'s' * (same != 1)}" if same else "")
    xs, ys = zip(*pts, strict=False)
    if window > 1:
        ax.plot(xs, ys, linewidth=0.6, color="black", alpha=0.25, zorder=4, label=f"{name}: each step")
        label += f", mean over {window} steps"
    ax.plot(xs, moving_mean(list(ys), window), linewidth=2.4, color="black", label=label, zorder=5)
    evals = _series(sweep_dir, best, "eval_loss") if key == "loss" else []
    if evals:
        ax.plot(
            *zip(*evals, strict=False),
            marker="D",
            linestyle="--",
            color="crimson",
            zorder=6,
            label=f"{name}: validation loss",
        )


def plot_curves(
    sweep_dir: Path, results: list[dict], key: str, ylabel: str, title: str, out: Path, best: str | None = None
) -> None:
    """``key`` from metrics.jsonl against the optimizer step: the best run bold and black, every other finished run
    thin in its base format's colour, lighter for lower ranks (legend beside the axes).

    Training loss (``key`` "loss") over more than 100 steps is drawn as the mean over 1/50 of the steps for the
    other runs (the best run: that mean bold, each step's loss faint behind it), so 16 noisy per-step lines do not
    hide each other; the best run's validation losses are marked. For ``learning_rate`` a run whose schedule
    equals the best run's is not drawn again: the best line's label counts them."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ok = ordered(results)
    series = {r["run"]: _series(sweep_dir, r, key) for r in ok}
    best = best if best in series else None
    longest = max((len(p) for p in series.values()), default=0)
    window = longest // 50 if key == "loss" and longest > 100 else 1
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    same = [n for n in series if best and n != best and key == "learning_rate" and series[n] == series[best]]
    _other_curves(ax, ok, series, {best, *same}, window)
    if best and series[best]:
        _best_curve(ax, sweep_dir, next(r for r in ok if r["run"] == best), key, series[best], window, len(same))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if key == "learning_rate":  # 2e-4 rather than 0.0002, no shared offset label
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f", mean over {window} steps" if window > 1 else ""))
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # beside the axes, never over a line
        small, wide = len(labels) > 12, len(labels) > 24
        ax.legend(
            handles,
            labels,
            fontsize=7 if small else 8,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            ncol=2 if wide else 1,
        )
    fig.tight_layout()
    save(plt, fig, out)
