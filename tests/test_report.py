"""Report figures read as a user wants: integer steps, LR in scientific notation, legends off the data, memory
over time ending with training (the final evaluation marked apart)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtune.rundir import SweepDir
from qtune.study import figures, pareto, plotting


def _run(sweep: Path, name: str, lr: float, with_eval: bool = True) -> dict:
    run_dir = sweep / "runs" / name
    run_dir.mkdir(parents=True)
    recs = [
        {
            "step": s,
            "time_s": 2.0 * s,
            "loss": 2.0 - 0.1 * s,
            "learning_rate": lr * (1 - s / 10),
            "peak_rss_gib": 1.0 + 0.01 * s,
        }
        for s in range(1, 8)
    ]
    if with_eval:
        recs.append({"step": 7, "time_s": 30.0, "eval_loss": 1.5, "peak_rss_gib": 1.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return {
        "run": name,
        "status": "ok",
        "peak_gib": 1.1,
        "estimate_gib": 1.0,
        "val_loss": 1.5,
        "config": {"train": {"output_dir": str(run_dir)}},
    }


def test_a_moved_sweep_reads_each_runs_metrics_from_its_own_runs_folder(tmp_path):
    res = _run(tmp_path, "a", 1e-3)
    assert SweepDir(tmp_path).run_of(res).root == tmp_path / "runs" / "a"
    res["config"]["train"]["output_dir"] = str(tmp_path / "elsewhere" / "a")  # trained there, since moved here
    rd = SweepDir(tmp_path).run_of(res)
    assert rd.root == tmp_path / "runs" / "a" and [r["step"] for r in rd.read_metrics()] == [1, 2, 3, 4, 5, 6, 7, 7]


@pytest.fixture
def plt():
    return plotting.pyplot()


def test_learning_rate_axis_is_scientific_and_steps_are_integers(tmp_path, plt, monkeypatch):
    results = [_run(tmp_path, f"r{i}", 2e-4 * (i + 1)) for i in range(3)]
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to inspect it
    figures.plot_curves(tmp_path, results, "learning_rate", "learning rate", "LR", tmp_path / "lr.png")
    ax = figs[0].axes[0]
    figs[0].canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() not in ("", "0")]
    assert labels and all("e-0" in t for t in labels), labels
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert all(float(t) == int(float(t)) for t in ax.get_xticks())
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1  # the legend sits right of the axes


def test_memory_over_time_ends_with_training_and_marks_the_evaluation(tmp_path, plt, monkeypatch):
    best = _run(tmp_path, "best", 2e-4)
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    figures.plot_memory_over_time(tmp_path, best, tmp_path / "m.png")
    ax = figs[0].axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "peak RSS"]
    assert list(line.get_xdata())[-1] == 14.0  # the last training step, not the evaluation after it
    evals = [c for c in ax.collections if c.get_label() == "peak RSS, during evaluation"]
    assert [tuple(x) for x in evals[0].get_offsets()] == [(30.0, 1.5)]


def test_pareto_legend_is_outside_the_axes(tmp_path, plt, monkeypatch):
    results = [
        dict(_run(tmp_path, f"p{i}", 1e-3, with_eval=False), peak_gib=1.0 + i, val_loss=2.0 - 0.3 * i) for i in range(4)
    ]
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    assert pareto.plot_pareto(results, tmp_path / "p.png") == ["p0", "p1", "p2", "p3"]
    ax = figs[0].axes[0]
    figs[0].canvas.draw()
    assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0
