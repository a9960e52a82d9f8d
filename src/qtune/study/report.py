"""The sweep report: five matplotlib figures (PNG) and ``report.md`` embedding them with the results table.

Figures, written to ``SWEEP_DIR/figures/``:
    memory.png            measured peak memory per run (GiB) with the estimator's prediction beside it
    memory_over_time.png  peak memory so far vs wall time (s) of the best run, from its metrics.jsonl
    loss.png              training loss (nats per token) per optimizer step, every finished run
    lr.png                learning rate per optimizer step, every finished run
    pareto.png            validation loss vs peak memory, with the Pareto front (no run both lower and leaner)
"""

from __future__ import annotations

import json
from pathlib import Path

from qtune.errors import QtuneError
from qtune.study.sweep import best_run, load_results, md_table, read_metrics, table_rows

FIGURES = ("memory", "memory_over_time", "loss", "lr", "pareto")


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


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (memory GiB, val loss, name) that no other point beats on both axes, sorted by memory."""
    front, best_loss = [], float("inf")
    for mem, loss, name in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best_loss:
            front.append((mem, loss, name))
            best_loss = loss
    return front


def _memory_label(results: list[dict]) -> str:
    metrics = {r.get("memory_metric") for r in results if r.get("status") == "ok"}
    return "peak allocated (GiB)" if metrics == {"peak_allocated"} else "peak memory (GiB; RSS on CPU)"


def plot_memory(results: list[dict], out: Path) -> None:
    """Grouped bars: measured peak and estimated peak (GiB) per finished run."""
    plt = _plt()
    ok = [r for r in results if r.get("status") == "ok"]
    names = [r["run"] for r in ok]
    x = range(len(ok))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(ok) + 2), 4))
    ax.bar([i - 0.2 for i in x], [r.get("peak_gib") or 0 for r in ok], width=0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r.get("estimate_gib") or 0 for r in ok], width=0.4, label="estimate (qtune estimate)")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel(_memory_label(results))
    ax.set_title("Peak training memory per configuration")
    top = max([r.get("peak_gib") or 0 for r in ok] + [r.get("estimate_gib") or 0 for r in ok] + [1e-3])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.legend(loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_memory_over_time(sweep_dir: Path, best: dict, out: Path) -> None:
    """Peak memory so far (GiB) against training wall time (s) of the best run."""
    plt = _plt()
    recs = [r for r in _metrics(sweep_dir, best) if "time_s" in r]
    steps = [r for r in recs if "loss" in r]  # training steps; the line ends where training ended
    evals = [r for r in recs if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("peak_allocated_gib", "peak allocated"), ("peak_reserved_gib", "peak reserved"),
                       ("peak_rss_gib", "peak RSS")):
        pts = [(r["time_s"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            line, = ax.plot(*zip(*pts), marker=".", label=label)
            ev = [(r["time_s"], r[key]) for r in evals if r.get(key) is not None]
            if ev:
                ax.scatter(*zip(*ev), marker="D", color=line.get_color(), zorder=3,
                           label=f"{label}, during evaluation")
    if best.get("estimate_gib"):
        ax.axhline(best["estimate_gib"], linestyle="--", color="gray", label="estimate")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("GiB (peak so far at each logged step)")
    ax.set_title(f"Memory over time: {best['run']} (best)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_curves(sweep_dir: Path, results: list[dict], key: str, ylabel: str, title: str, out: Path) -> None:
    """One line per finished run: ``key`` from metrics.jsonl against the optimizer step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.get("status") != "ok":
            continue
        pts = [(m["step"], m[key]) for m in _metrics(sweep_dir, r) if m.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=r["run"])
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if key == "learning_rate":  # 2e-4 rather than 0.0002, no shared offset label
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, never over a line
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_pareto(results: list[dict], out: Path) -> list[str]:
    """Validation loss against peak memory; the Pareto front drawn as a step line. Returns the front's runs."""
    plt = _plt()
    pts = [(r["peak_gib"], r["val_loss"], r["run"]) for r in results
           if r.get("status") == "ok" and r.get("val_loss") is not None and r.get("peak_gib") is not None]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        for m, v, n in pts:
            ax.annotate(n, (m, v), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="red", marker="x", label="Pareto front")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18))  # below the axes, never over a point
    ax.set_xlabel(_memory_label(results))
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title("Validation loss vs peak memory")
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [p[2] for p in front]


def write_report(sweep_dir: str | Path) -> Path:
    """Write the five figures and ``report.md`` for a sweep directory; returns the report's path.

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
    plot_memory(results, figs / "memory.png")
    plot_memory_over_time(sweep_dir, best, figs / "memory_over_time.png")
    plot_curves(sweep_dir, results, "loss", "training loss (nats per token)", "Training loss", figs / "loss.png")
    plot_curves(sweep_dir, results, "learning_rate", "learning rate", "Learning-rate schedule", figs / "lr.png")
    front = plot_pareto(results, figs / "pareto.png")

    ok = [r for r in results if r.get("status") == "ok"]
    lines = ["# Sweep report", "", md_table(table_rows(results)), "",
             f"Best configuration by validation loss (ties: less memory): **{best['run']}** "
             f"(val loss {best['val_loss']:.4f}, peak {best['peak_gib']} GiB).", "",
             f"Pareto front (no other run has both lower validation loss and lower peak memory): {', '.join(front)}.", ""]
    failed = [r for r in results if r.get("status") != "ok"]
    if failed:
        lines += ["Failed runs: " + "; ".join(f"{r['run']}: {r.get('error')}" for r in failed), ""]
    est = [(r["run"], r["peak_gib"], r["estimate_gib"]) for r in ok if r.get("estimate_gib") and r.get("peak_gib")]
    if est:
        lines += ["Estimate vs measured: " + ", ".join(f"{n} {e / m - 1:+.0%}" for n, m, e in est)
                  + f" ({_memory_label(results)}; the estimate uses the longest training sample as sequence length).", ""]
    final = sweep_dir / "final.json"
    if final.is_file():
        rec = json.loads(final.read_text(encoding="utf-8"))
        test = (rec.get("test") or {}).get("adapter", {}).get("test")
        if test:
            lines += [f"Final: {rec['run']} retrained, test loss {test['loss']:.4f} (perplexity {test['perplexity']:.3f}, "
                      f"{test['tokens']} tokens); base without adapter {rec['test']['base']['test']['loss']:.4f}.", ""]
    titles = {"memory": "Peak memory, measured and estimated", "memory_over_time": "Memory over time (best run)",
              "loss": "Training loss", "lr": "Learning-rate schedule", "pareto": "Validation loss vs peak memory"}
    for name in FIGURES:
        lines += [f"## {titles[name]}", "", f"![{name}](figures/{name}.png)", ""]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
