"""quality_vs_memory.png: validation loss against peak memory, one point per finished run, the Pareto front, and
each base evaluated alone as a dashed line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtune.study.plotting import (
    color,
    legend_below,
    memory_label,
    ordered,
    pyplot,
    quant_handles,
    quant_of,
    rank_of,
    save,
    spread,
)
from qtune.study.tables import base_rows, row_order

RANK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")
"""Markers of the LoRA ranks in quality_vs_memory.png, smallest rank first."""

Point = tuple[float, float, str]
"""(peak memory GiB, validation loss, run name)."""


def pareto_front(points: list[Point]) -> list[Point]:
    """Points (memory GiB, val loss, name) that no other point beats on both axes, sorted by memory."""
    front, best_loss = [], float("inf")
    for mem, loss, name in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best_loss:
            front.append((mem, loss, name))
            best_loss = loss
    return front


def _limits(ax: Any, pts: list[Point]) -> None:
    """Axes limits around the points, with a margin."""
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xpad = (max(xs) - min(xs)) * 0.08 or max(xs) * 0.02
        ypad = (max(ys) - min(ys)) * 0.12 or max(ys) * 0.01
        ax.set_xlim(min(xs) - xpad, max(xs) + xpad)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad)


def _base_lines(ax: Any, results: list[dict]) -> None:
    """Each base evaluated alone: a dashed line at its validation loss when that lies in the plotted range; its
    value in the legend either way (with "above/below the plot" when outside)."""
    y0, y1 = ax.get_ylim()
    for b in sorted(base_rows(results), key=row_order):
        loss = b["val_loss"]
        inside = y0 <= loss <= y1
        where = "" if inside else ", above the plot" if loss > y1 else ", below the plot"
        label = f"{b['run']} alone ({b['setup']}): {loss:.3f}{where}"
        if inside:
            ax.axhline(loss, color=color(b["quant"]), linestyle="--", linewidth=1.0, label=label)
        else:
            ax.plot([], [], color=color(b["quant"]), linestyle="--", linewidth=1.0, label=label)
    ax.set_ylim(y0, y1)


def _ring_best(ax: Any, pts: list[Point], best: str | None, by_marker: bool) -> None:
    """The best run's point ringed; named beside it when the points carry no labels (``by_marker``)."""
    named = {p[2]: p for p in pts}
    if best not in named:
        return
    bx, by, _ = named[best]
    ax.scatter(bx, by, s=320, facecolors="none", edgecolors="black", linewidths=1.5, zorder=5)
    if by_marker:
        ax.annotate(
            f"\u2605 best: {best}",
            xy=(bx, by),
            xytext=(12, 14),
            textcoords="offset points",
            fontsize=8,
            fontweight="bold",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "gray"},
            arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.6},
            zorder=6,
        )


def _label_column(ax: Any, pts: list[Point], best: str | None, height: float) -> None:
    """Run names in a column right of the axes, each joined to its point, none overlapping another. Call it
    after ``fig.tight_layout()``: the labels are spaced in the axes' final size."""
    y0, y1 = ax.get_ylim()
    frac = [(p[1] - y0) / (y1 - y0) for p in pts]
    gap = 9.5 / 72 / (ax.get_position().height * height)  # one 7-pt text line in axes fraction
    line = {"arrowstyle": "-", "color": "gray", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3}
    for (x, y, name), ty in zip(pts, spread(frac, gap), strict=False):
        ax.annotate(
            name + ("  \u2605 best" if name == best else ""),
            xy=(x, y),
            xycoords="data",
            xytext=(1.03, ty),
            textcoords="axes fraction",
            va="center",
            fontsize=7,
            fontweight="bold" if name == best else "normal",
            arrowprops=line,
        )


def _legend(fig: Any, ax: Any, ok: list[dict], ranks: list, by_marker: bool) -> None:
    """The legend below the axes, one column per group: lines, base formats, ranks (with ``by_marker``)."""
    from matplotlib.lines import Line2D

    groups = [ax.get_legend_handles_labels()[0], quant_handles(quant_of(r) for r in ok)]
    if by_marker:
        groups.append(
            [
                Line2D([], [], color="dimgray", marker=m, linestyle="none", label=f"LoRA r = {r}")
                for m, r in zip(RANK_MARKERS, ranks, strict=False)
            ]
        )
    rows = max(len(g) for g in groups)
    blank = Line2D([], [], linestyle="none", label=" ")
    handles = [h for g in groups for h in g + [blank] * (rows - len(g))]
    legend_below(fig, ax, handles, ncol=len(groups))  # below the axes, never over a point


def plot_pareto(results: list[dict], out: Path, best: str | None = None) -> list[str]:
    """Validation loss against peak memory, one point per finished run, the Pareto front as a step line; returns
    the front's runs.

    A point's colour is its base format; when base format and rank name every run (a quantization x rank grid) the
    marker is the rank and the legend says which, so no point needs a label; otherwise the run names sit in a
    column right of the axes, each joined to its point, spaced so that none overlaps another. The best run is
    ringed and named. Each base evaluated alone is a dashed line at its validation loss when that lies in the
    plotted range, and its value is in the legend either way.
    """
    plt = pyplot()
    ok = [r for r in ordered(results) if r.get("val_loss") is not None and r.get("peak_gib") is not None]
    pts = [(r["peak_gib"], r["val_loss"], r["run"]) for r in ok]
    front = pareto_front(pts)
    ranks = sorted({rank_of(r) for r in ok if rank_of(r) is not None})
    by_marker = len({(quant_of(r), rank_of(r)) for r in ok}) == len(ok) and len(ranks) <= len(RANK_MARKERS)
    height = 4.5 if by_marker else max(4.5, 0.2 * len(pts) + 1.5)
    fig, ax = plt.subplots(figsize=(7.5, height))
    for r in ok:
        marker = RANK_MARKERS[ranks.index(rank_of(r))] if by_marker else "o"
        ax.scatter(r["peak_gib"], r["val_loss"], color=color(quant_of(r)), marker=marker, s=45, zorder=4)
    if front:
        fx, fy = [p[0] for p in front], [p[1] for p in front]
        ax.step(fx, fy, where="post", color="red", linewidth=1.2, label="Pareto front", zorder=3)
    ax.set_xlabel(memory_label(results))
    ax.set_ylabel("validation loss (nats per token; lower is better)")
    ax.set_title("Validation loss vs peak memory")
    _limits(ax, pts)
    _base_lines(ax, results)
    _ring_best(ax, pts, best, by_marker)
    fig.tight_layout()  # the axes' final size: the labels are spaced in their fraction
    if pts and not by_marker:
        _label_column(ax, pts, best, height)
    _legend(fig, ax, ok, ranks, by_marker)
    save(plt, fig, out)
    return [p[2] for p in front]
