"""What the report's figures share: matplotlib without a display, a colour per base format, the finished runs in
the table's order, legends below the axes, the best run's tick label, label positions that never overlap."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qtune.study.tables import QUANT_ORDER, row_order, table_rows

QUANT_COLORS = {
    "none": "#1f77b4",
    "fp16": "#8c564b",
    "bf16": "#17becf",
    "int8": "#ff7f0e",
    "nf4": "#2ca02c",
    "fp4": "#9467bd",
}
"""The colour of each base format (``quant.quant``) in every figure; another format is grey."""

QUANT_LABELS = {"none": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "nf4": "nf4", "fp4": "fp4"}
"""A base format's name in a legend."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quant_of(result: dict) -> str:
    """The base format of a result record (its config, else its labels; nf4 when neither says)."""
    return (
        (result.get("config") or {}).get("quant", {}).get("quant") or (result.get("labels") or {}).get("quant") or "nf4"
    )


def rank_of(result: dict) -> Any:
    """The LoRA rank of a result record (its config, else its labels), None when neither says."""
    return (result.get("config") or {}).get("lora", {}).get("r") or (result.get("labels") or {}).get("r")


def color(quant: str) -> str:
    """The colour of base format ``quant`` (:data:`QUANT_COLORS`)."""
    return QUANT_COLORS.get(quant, "#7f7f7f")


def ordered(results: list[dict]) -> list[dict]:
    """Finished runs in the table's order (setup, base format, rank, name)."""
    ok = [r for r in results if r.get("status") == "ok"]
    rows = {row["run"]: row for row in table_rows(ok)}
    return sorted(ok, key=lambda r: row_order(rows[r["run"]]))


def quant_handles(quants: Iterable[str]) -> list:
    """Legend patches, one per distinct base format in ``quants``, most bits first."""
    from matplotlib.patches import Patch

    order = sorted(set(quants), key=lambda q: QUANT_ORDER.index(q) if q in QUANT_ORDER else 99)
    return [Patch(color=color(q), label=f"{QUANT_LABELS.get(q, q)} base") for q in order]


def memory_label(results: list[dict]) -> str:
    """The memory axis's label: peak allocated when every finished run measured it (CUDA), else peak RSS."""
    metrics = {r.get("memory_metric") for r in results if r.get("status") == "ok"}
    return "peak allocated (GiB)" if metrics == {"peak_allocated"} else "peak memory (GiB; RSS on CPU)"


def legend_below(fig: Any, ax: Any, handles: list, ncol: int, fontsize: int = 8) -> None:
    """The legend centred under the axes, clear of their tick labels and axis label (0.6 in below them). Call it
    after ``fig.tight_layout()`` and save with ``bbox_inches="tight"`` (which takes the legend in)."""
    height = ax.get_position().height * fig.get_figheight()
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.6 / height),
        ncol=ncol,
        fontsize=fontsize,
        frameon=False,
    )


def best_ticks(ax: Any, names: list[str], best: str | None, axis: str = "y") -> None:
    """One tick per name on ``axis``, the best run's starred and bold."""
    labels = [f"{n}  \u2605 best" if n == best else n for n in names]
    if axis == "y":
        ax.set_yticks(range(len(names)), labels)
        ticks = ax.get_yticklabels()
    else:
        ax.set_xticks(range(len(names)), labels, rotation=30, ha="right")
        ticks = ax.get_xticklabels()
    for t, n in zip(ticks, names, strict=False):
        if n == best:
            t.set_fontweight("bold")


def save(plt: Any, fig: Any, out: Any) -> None:
    """Write ``fig`` as a PNG (110 dpi, legends outside the axes included) and close it."""
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


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
    for i, y in zip(order, ys, strict=False):
        out[i] = y
    return out
