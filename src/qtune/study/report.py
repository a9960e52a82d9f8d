"""The sweep report: six matplotlib figures (PNG) and ``report.md`` embedding them with the results table.

Figures, written to ``SWEEP_DIR/figures/`` and named after what they show (the seed paper's figure in brackets):
    memory_per_configuration.png  measured peak memory per run (GiB) with the estimator's prediction beside it
    memory_full_vs_best.png       [Fig. 3] full fine-tuning (fp32 + AdamW, bf16 + AdamW; estimated) against the best
                                  configuration, estimated and measured, log scale; published figures beside them
                                  when the sweep file gives ``reference_memory_gb``
    memory_over_time.png          [Fig. 4] peak memory so far vs training time (s) of the best run
    training_loss.png             [Fig. 5] training loss (nats per token) per optimizer step: the best run in bold,
                                  every other finished run thin
    learning_rate.png             [Fig. 6] the best run's learning-rate schedule (runs with another schedule beside it)
    quality_vs_memory.png         validation loss vs peak memory, the Pareto front (no run both lower and leaner),
                                  each base evaluated alone as a dashed line

Every figure labels its axes with units, marks the best configuration (lowest validation loss) and keeps its
legend and run labels off the data, so it stays readable at 16 and more runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtune.errors import QtuneError
from qtune.study.sweep import (
    QUANT_ORDER,
    SweepSpec,
    _row_order,
    base_rows,
    best_run,
    full_finetuning_estimates,
    load_results,
    md_table,
    read_metrics,
    stability_line,
    study_rows,
    table_rows,
)

FIGURES = ("memory_per_configuration", "memory_full_vs_best", "memory_over_time", "training_loss", "learning_rate",
           "quality_vs_memory")
TITLES = {
    "memory_per_configuration": "Peak memory per configuration, measured and estimated",
    "memory_full_vs_best": "Full fine-tuning against the best configuration (paper Fig. 3)",
    "memory_over_time": "Memory over the training of the best configuration (paper Fig. 4)",
    "training_loss": "Training loss over the steps (paper Fig. 5)",
    "learning_rate": "Learning-rate schedule (paper Fig. 6)",
    "quality_vs_memory": "Validation loss against peak memory, Pareto front",
}

QUANT_COLORS = {"none": "#1f77b4", "fp16": "#8c564b", "bf16": "#17becf", "int8": "#ff7f0e", "nf4": "#2ca02c",
                "fp4": "#9467bd"}
QUANT_LABELS = {"none": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "nf4": "nf4", "fp4": "fp4"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(sweep_dir: Path, result: dict) -> list[dict]:
    cfg = result.get("config") or {}
    path = Path(cfg.get("train", {}).get("output_dir", sweep_dir / "runs" / result["run"])) / "metrics.jsonl"
    if not path.is_file():
        path = sweep_dir / "runs" / result["run"] / "metrics.jsonl"
    return read_metrics(path)


def _quant(result: dict) -> str:
    return ((result.get("config") or {}).get("quant", {}).get("quant")
            or (result.get("labels") or {}).get("quant") or "nf4")


def _color(quant: str) -> str:
    return QUANT_COLORS.get(quant, "#7f7f7f")


def _ordered(results: list[dict]) -> list[dict]:
    """Finished runs in the table's order (setup, base format, rank, name)."""
    ok = [r for r in results if r.get("status") == "ok"]
    rows = {row["run"]: row for row in table_rows(ok)}
    return sorted(ok, key=lambda r: _row_order(rows[r["run"]]))


def _quant_handles(quants):
    from matplotlib.patches import Patch

    return [Patch(color=_color(q), label=f"{QUANT_LABELS.get(q, q)} base") for q in
            sorted(set(quants), key=lambda q: QUANT_ORDER.index(q) if q in QUANT_ORDER else 99)]


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (memory GiB, val loss, name) that no other point beats on both axes, sorted by memory."""
    front, best_loss = [], float("inf")
    for mem, loss, name in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best_loss:
            front.append((mem, loss, name))
            best_loss = loss
    return front


def spread(positions: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Label positions (axes fraction) moved apart to at least ``gap`` from each other, as little as possible,
    within [low, high] when they fit there; returned in the input order.

    Used to set a column of run labels beside the axes, each joined to its point by a line, so that no two labels
    overlap however close their points are.
    """
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    ys = [positions[i] for i in order]
    for i in range(1, len(ys)):  # push up
        ys[i] = max(ys[i], ys[i - 1] + gap)
    if ys and ys[-1] > high:  # over the top: push down from there, as far as the bottom allows
        ys[-1] = max(high, low + gap * (len(ys) - 1))
        for i in range(len(ys) - 2, -1, -1):
            ys[i] = min(ys[i], ys[i + 1] - gap)
    out = [0.0] * len(ys)
    for i, y in zip(order, ys):
        out[i] = y
    return out


def _memory_label(results: list[dict]) -> str:
    metrics = {r.get("memory_metric") for r in results if r.get("status") == "ok"}
    return "peak allocated (GiB)" if metrics == {"peak_allocated"} else "peak memory (GiB; RSS on CPU)"


def _legend_below(fig, ax, handles, ncol: int, fontsize: int = 8) -> None:
    """The legend centred under the axes, clear of their tick labels and axis label (0.6 in below them). Call it
    after ``fig.tight_layout()`` and save with ``bbox_inches="tight"`` (which takes the legend in)."""
    height = ax.get_position().height * fig.get_figheight()
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.6 / height), ncol=ncol,
              fontsize=fontsize, frameon=False)


def _best_ticks(ax, names: list[str], best: str | None, axis: str = "y") -> None:
    labels = [f"{n}  \u2605 best" if n == best else n for n in names]
    if axis == "y":
        ax.set_yticks(range(len(names)), labels)
        ticks = ax.get_yticklabels()
    else:
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right")
        ticks = ax.get_xticklabels()
    for t, n in zip(ticks, names):
        if n == best:
            t.set_fontweight("bold")


def plot_memory(results: list[dict], out: Path, best: str | None = None) -> None:
    """Horizontal bars, one pair per finished run (table order): measured peak (solid, coloured by base format) and
    estimated peak (hatched), GiB; the best run's label is bold and starred."""
    plt = _plt()
    from matplotlib.patches import Patch

    ok = _ordered(results)
    n = len(ok)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.42 * n + 1.8)))
    ys = range(n)
    measured = [r.get("peak_gib") or 0 for r in ok]
    estimated = [r.get("estimate_gib") or 0 for r in ok]
    colors = [_color(_quant(r)) for r in ok]
    ax.barh([y - 0.2 for y in ys], measured, height=0.38, color=colors)
    ax.barh([y + 0.2 for y in ys], estimated, height=0.38, color="white", edgecolor=colors, hatch="///")
    top = max(measured + estimated + [1e-3])
    for y, m, e in zip(ys, measured, estimated):
        if m:
            ax.text(m + top * 0.01, y - 0.2, f"{m:.2f}", va="center", fontsize=7)
        if e:
            ax.text(e + top * 0.01, y + 0.2, f"{e:.2f}", va="center", fontsize=7, color="dimgray")
    _best_ticks(ax, [r["run"] for r in ok], best)
    ax.invert_yaxis()  # table order from the top
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel(_memory_label(results))
    ax.set_title("Peak training memory per configuration")
    handles = [Patch(color="gray", label="measured"),
               Patch(facecolor="white", edgecolor="gray", hatch="///", label="estimate (qtune estimate)")]
    handles += _quant_handles(_quant(r) for r in ok)
    fig.tight_layout()
    _legend_below(fig, ax, handles, ncol=min(len(handles), 4))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def full_vs_best_bars(best: dict, references: dict[str, float] | None = None) -> tuple[list[dict], str | None]:
    """The bars of :func:`plot_full_vs_best`: [{"label", "gib", "kind" (estimate/measured/reference), "note"}],
    and why the full fine-tuning estimates are missing (None when present).

    The full fine-tuning estimates take the best run's model and estimator inputs (batch, sequence length, device,
    gradient checkpointing) with every parameter trainable (:func:`qtune.study.sweep.full_finetuning_estimates`);
    ``references`` (label -> decimal GB) are converted to GiB.
    """
    bars, missing = [], None
    inputs = (best.get("estimate") or {}).get("inputs")
    model = ((best.get("config") or {}).get("model") or {}).get("name")
    if inputs and model:
        try:
            for f in full_finetuning_estimates(model, inputs):
                bars.append({"label": f"{f['label']} (estimate)", "gib": f["gib"], "kind": "estimate",
                             "note": f"{f['trainable_params']:,} trainable parameters"})
        except (QtuneError, OSError, ValueError) as e:
            missing = f"full fine-tuning not estimated: {str(e).splitlines()[0]}"
    else:
        missing = "full fine-tuning not estimated: the best run has no estimate inputs"
    if best.get("estimate_gib"):
        bars.append({"label": f"{best['run']} (best): estimate", "gib": best["estimate_gib"], "kind": "estimate",
                     "note": "qtune estimate for the run's config"})
    if best.get("peak_gib"):
        metric = "peak allocated" if best.get("memory_metric") == "peak_allocated" else "peak RSS"
        bars.append({"label": f"{best['run']} (best): measured", "gib": best["peak_gib"], "kind": "measured",
                     "note": metric})
    for label, gb in (references or {}).items():
        bars.append({"label": label, "gib": gb * 1e9 / 2**30, "kind": "reference", "note": f"{gb:g} GB as published"})
    return bars, missing


def plot_full_vs_best(bars: list[dict], best: dict, ylabel: str, out: Path) -> None:
    """Horizontal bars on a log scale (GiB), each labelled with its value: see :func:`full_vs_best_bars`."""
    plt = _plt()
    from matplotlib.patches import Patch

    style = {"estimate": {"facecolor": "white", "edgecolor": "#1f77b4", "hatch": "///"},
             "measured": {"facecolor": "#2ca02c", "edgecolor": "#2ca02c"},
             "reference": {"facecolor": "#bbbbbb", "edgecolor": "#555555"}}
    fig, ax = plt.subplots(figsize=(8, max(2.6, 0.5 * len(bars) + 1.6)))
    for y, b in enumerate(bars):
        ax.barh(y, b["gib"], height=0.6, **style[b["kind"]])
        text = f"{b['gib']:.1f} GiB" if b["gib"] >= 10 else f"{b['gib']:.2f} GiB"
        if b["kind"] == "reference":
            text += f" ({b['note'].split(' ')[0]} GB)"
        ax.text(b["gib"] * 1.08, y, text, va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b["label"] for b in bars], fontsize=8)
    for t, b in zip(ax.get_yticklabels(), bars):
        if b["label"].startswith(f"{best['run']} (best)"):
            t.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xscale("log")
    values = [b["gib"] for b in bars] or [1.0]
    ax.set_xlim(min(values) / 2, max(values) * 4)  # room for the value labels right of the longest bar
    ax.set_xlabel(f"{ylabel}, log scale")
    ax.set_title(f"Training memory: full fine-tuning vs the best configuration ({best['run']})")
    kinds = [k for k in ("estimate", "measured", "reference") if any(b["kind"] == k for b in bars)]
    names = {"estimate": "estimate (qtune.model.memory)", "measured": "measured in this sweep",
             "reference": "published figure (GB converted to GiB)"}
    fig.tight_layout()
    _legend_below(fig, ax, [Patch(**style[k], label=names[k]) for k in kinds], ncol=len(kinds))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_memory_over_time(sweep_dir: Path, best: dict, out: Path) -> None:
    """Peak memory so far (GiB) against training wall time (s) of the best run."""
    plt = _plt()
    recs = [r for r in _metrics(sweep_dir, best) if "time_s" in r]
    steps = [r for r in recs if "loss" in r]  # training steps; the line ends where training ended
    evals = [r for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("peak_allocated_gib", "peak allocated"), ("peak_reserved_gib", "peak reserved"),
                       ("peak_rss_gib", "peak RSS")):
        pts = [(r["time_s"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            line, = ax.plot(*zip(*pts), marker="." if len(pts) <= 200 else None, label=label)
            ev = [(r["time_s"], r[key]) for r in evals if r.get(key) is not None]
            if ev:
                ax.scatter(*zip(*ev), marker="D", color=line.get_color(), zorder=3,
                           label=f"{label}, during evaluation")
    if best.get("estimate_gib"):
        ax.axhline(best["estimate_gib"], linestyle="--", color="gray", label="estimate")
    values = [r[k] for r in recs for k in ("peak_allocated_gib", "peak_reserved_gib", "peak_rss_gib")
              if r.get(k) is not None] + [best.get("estimate_gib") or 0]
    ax.set_ylim(0, max(values + [1e-3]) * 1.08)  # the top markers whole, not cut by the frame
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("GiB (peak so far at each logged step)")
    ax.set_title(f"Memory over training: {best['run']} (best)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


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


def _shade(color: str, i: int, n: int) -> tuple:
    """``color`` lightened towards white for the ``i``-th of ``n`` runs of one base format (the lowest rank
    lightest), so runs sharing a colour stay apart in the legend."""
    from matplotlib.colors import to_rgb

    t = 0.6 * (1 - i / (n - 1)) if n > 1 else 0.0
    return tuple(c + (1 - c) * t for c in to_rgb(color))


def plot_curves(sweep_dir: Path, results: list[dict], key: str, ylabel: str, title: str, out: Path,
                best: str | None = None) -> None:
    """``key`` from metrics.jsonl against the optimizer step: the best run bold and black, every other finished run
    thin in its base format's colour, lighter for lower ranks (legend beside the axes).

    Training loss (``key`` "loss") over more than 100 steps is drawn as the mean over 1/50 of the steps for the
    other runs (the best run: that mean bold, each step's loss faint behind it), so 16 noisy per-step lines do not
    hide each other; the best run's validation losses are marked. For ``learning_rate`` a run whose schedule
    equals the best run's is not drawn again: the best line's label counts them."""
    plt = _plt()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ok = _ordered(results)
    series = {r["run"]: _series(sweep_dir, r, key) for r in ok}
    best = best if best in series else None
    longest = max((len(p) for p in series.values()), default=0)
    window = longest // 50 if key == "loss" and longest > 100 else 1
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    same = [n for n in series if best and n != best and key == "learning_rate" and series[n] == series[best]]
    per_quant: dict[str, list[str]] = {}
    for r in ok:
        per_quant.setdefault(_quant(r), []).append(r["run"])
    for r in ok:
        name, pts = r["run"], series[r["run"]]
        if not pts or name == best or name in same:
            continue
        group = per_quant[_quant(r)]
        xs, ys = zip(*pts)
        ax.plot(xs, moving_mean(list(ys), window), linewidth=1.0, alpha=0.9,
                color=_shade(_color(_quant(r)), group.index(name), len(group)), label=name)
    if best and series[best]:
        label = f"{best} (best)" + (f"; same schedule: {len(same)} other run{'s' * (len(same) != 1)}" if same else "")
        xs, ys = zip(*series[best])
        if window > 1:
            ax.plot(xs, ys, linewidth=0.6, color="black", alpha=0.25, zorder=4, label=f"{best}: each step")
            label += f", mean over {window} steps"
        ax.plot(xs, moving_mean(list(ys), window), linewidth=2.4, color="black", label=label, zorder=5)
        if key == "loss":
            evals = _series(sweep_dir, next(r for r in ok if r["run"] == best), "eval_loss")
            if evals:
                ax.plot(*zip(*evals), marker="D", linestyle="--", color="crimson", zorder=6,
                        label=f"{best}: validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if key == "learning_rate":  # 2e-4 rather than 0.0002, no shared offset label
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f", mean over {window} steps" if window > 1 else ""))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7 if len(labels) > 12 else 8, loc="center left",
                  bbox_to_anchor=(1.01, 0.5), ncol=2 if len(labels) > 24 else 1)  # beside the axes, never over a line
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


RANK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
"""Markers of the LoRA ranks in quality_vs_memory.png, smallest rank first."""


def _rank(result: dict):
    return ((result.get("config") or {}).get("lora", {}).get("r") or (result.get("labels") or {}).get("r"))


def plot_pareto(results: list[dict], out: Path, best: str | None = None) -> list[str]:
    """Validation loss against peak memory, one point per finished run, the Pareto front as a step line; returns
    the front's runs.

    A point's colour is its base format; when base format and rank name every run (a quantization x rank grid) the
    marker is the rank and the legend says which, so no point needs a label; otherwise the run names sit in a
    column right of the axes, each joined to its point, spaced so that none overlaps another. The best run is
    ringed and named. Each base evaluated alone is a dashed line at its validation loss when that lies in the
    plotted range, and its value is in the legend either way.
    """
    plt = _plt()
    from matplotlib.lines import Line2D

    ok = [r for r in _ordered(results) if r.get("val_loss") is not None and r.get("peak_gib") is not None]
    pts = [(r["peak_gib"], r["val_loss"], r["run"]) for r in ok]
    front = pareto_front(pts)
    ranks = sorted({_rank(r) for r in ok if _rank(r) is not None})
    by_marker = len({(_quant(r), _rank(r)) for r in ok}) == len(ok) and len(ranks) <= len(RANK_MARKERS)
    height = 4.5 if by_marker else max(4.5, 0.2 * len(pts) + 1.5)
    fig, ax = plt.subplots(figsize=(7.5, height))
    for r in ok:
        marker = RANK_MARKERS[ranks.index(_rank(r))] if by_marker else "o"
        ax.scatter(r["peak_gib"], r["val_loss"], color=_color(_quant(r)), marker=marker, s=45, zorder=4)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="red", linewidth=1.2,
                label="Pareto front", zorder=3)
    ax.set_xlabel(_memory_label(results))
    ax.set_ylabel("validation loss (nats per token; lower is better)")
    ax.set_title("Validation loss vs peak memory")
    bases = sorted(base_rows(results), key=_row_order)
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xpad = (max(xs) - min(xs)) * 0.08 or max(xs) * 0.02
        ypad = (max(ys) - min(ys)) * 0.12 or max(ys) * 0.01
        ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
    y0, y1 = ax.get_ylim()
    for b in bases:
        inside = y0 <= b["val_loss"] <= y1
        label = f"{b['run']} alone ({b['setup']}): {b['val_loss']:.3f}" + ("" if inside else ", above the plot"
                                                                           if b["val_loss"] > y1 else ", below the plot")
        if inside:
            ax.axhline(b["val_loss"], color=_color(b["quant"]), linestyle="--", linewidth=1.0, label=label)
        else:
            ax.plot([], [], color=_color(b["quant"]), linestyle="--", linewidth=1.0, label=label)
    ax.set_ylim(y0, y1)
    named = {p[2]: p for p in pts}
    if best in named:
        bx, by, _ = named[best]
        ax.scatter(bx, by, s=320, facecolors="none", edgecolors="black", linewidths=1.5, zorder=5)
        if by_marker:
            ax.annotate(f"\u2605 best: {best}", xy=(bx, by), xytext=(12, 14), textcoords="offset points", fontsize=8,
                        fontweight="bold", bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "gray"},
                        arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.6}, zorder=6)
    fig.tight_layout()  # the axes' final size: the labels are spaced in their fraction
    if pts and not by_marker:
        frac = [(p[1] - y0) / (y1 - y0) for p in pts]
        gap = 9.5 / 72 / (ax.get_position().height * height)  # one 7-pt text line in axes fraction
        for (x, y, name), ty in zip(pts, spread(frac, gap)):
            ax.annotate(name + ("  \u2605 best" if name == best else ""), xy=(x, y), xycoords="data",
                        xytext=(1.03, ty), textcoords="axes fraction", va="center", fontsize=7,
                        fontweight="bold" if name == best else "normal",
                        arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3})
    groups = [ax.get_legend_handles_labels()[0], _quant_handles(_quant(r) for r in ok)]
    if by_marker:
        groups.append([Line2D([], [], color="dimgray", marker=m, linestyle="none", label=f"LoRA r = {r}")
                       for m, r in zip(RANK_MARKERS, ranks)])
    rows = max(len(g) for g in groups)  # one legend column per group: lines, base formats, ranks
    blank = Line2D([], [], linestyle="none", label=" ")
    handles = [h for g in groups for h in g + [blank] * (rows - len(g))]
    _legend_below(fig, ax, handles, ncol=len(groups))  # below the axes, never over a point
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [p[2] for p in front]


def _references(sweep_dir: Path) -> dict[str, float]:
    """``reference_memory_gb`` of the sweep file the sweep ran (its copy ``sweep.yaml``); {} without one."""
    path = sweep_dir / "sweep.yaml"
    if not path.is_file():
        return {}
    try:
        from qtune.config import read_yaml

        return SweepSpec.model_validate(read_yaml(path, "sweep file") or {}).reference_memory_gb
    except Exception:  # noqa: BLE001 - a sweep.yaml from another qtune only loses the reference bars
        return {}


def write_report(sweep_dir: str | Path) -> Path:
    """Write the figures (:data:`FIGURES`) and ``report.md`` for a sweep directory; returns the report's path.

    Raises:
        QtuneError: no results in ``sweep_dir``, or no finished run to plot.
    """
    sweep_dir = Path(sweep_dir)
    results = load_results(sweep_dir)
    best = best_run(results)
    if best is None:
        raise QtuneError(f"{sweep_dir}: no finished run with a validation loss to report")
    figs = sweep_dir / "figures"
    figs.mkdir(exist_ok=True)
    name = best["run"]
    plot_memory(results, figs / "memory_per_configuration.png", name)
    bars, missing = full_vs_best_bars(best, _references(sweep_dir))
    plot_full_vs_best(bars, best, _memory_label([best]), figs / "memory_full_vs_best.png")
    plot_memory_over_time(sweep_dir, best, figs / "memory_over_time.png")
    plot_curves(sweep_dir, results, "loss", "training loss (nats per token)", "Training loss", figs / "training_loss.png",
                name)
    plot_curves(sweep_dir, results, "learning_rate", "learning rate", "Learning-rate schedule",
                figs / "learning_rate.png", name)
    front = plot_pareto(results, figs / "quality_vs_memory.png", name)

    ok = [r for r in results if r.get("status") == "ok"]
    lines = ["# Sweep report", "", md_table(study_rows(results)), "",
             f"Best configuration by validation loss (ties: less memory): **{name}** "
             f"(val loss {best['val_loss']:.4f}, peak {best['peak_gib']} GiB).", "",
             f"Pareto front (no other run has both lower validation loss and lower peak memory): {', '.join(front)}.", ""]
    stability = stability_line(results)
    if stability:
        lines += [stability, ""]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["Failed runs: " + "; ".join(f"{r['run']}: {r.get('error')}" for r in failed), ""]
    est = [(r["run"], r["peak_gib"], r["estimate_gib"]) for r in ok if r.get("estimate_gib") and r.get("peak_gib")]
    if est:
        lines += ["Estimate vs measured: " + ", ".join(f"{n} {e / m - 1:+.0%}" for n, m, e in est)
                  + f" ({_memory_label(results)}; the estimate uses the longest training sample as sequence length).", ""]
    lines += ["Memory of full fine-tuning against the best configuration (GiB; figure below):", "",
              "| what | GiB | kind | note |", "|---|---|---|---|"]
    lines += [f"| {b['label']} | {b['gib']:.2f} | {b['kind']} | {b['note']} |" for b in bars]
    lines += [""] + ([missing + ".", ""] if missing else [])
    final = sweep_dir / "final.json"
    if final.is_file():
        rec = json.loads(final.read_text(encoding="utf-8"))
        test = (rec.get("test") or {}).get("adapter", {}).get("test")
        if test:
            lines += [f"Final: {rec['run']} retrained, test loss {test['loss']:.4f} (perplexity {test['perplexity']:.3f}, "
                      f"{test['tokens']} tokens); base without adapter {rec['test']['base']['test']['loss']:.4f}.", ""]
    for fig in FIGURES:
        lines += [f"## {TITLES[fig]}", "", f"![{TITLES[fig]}](figures/{fig}.png)", ""]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out

