"""The seed paper's study: the grid files, ``qtune sweep --dry-run``, the CUDA-only refusal, the setups as rows,
validation halves, resuming a killed sweep, and the report's figures at 16 runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import REQUIRE_CUDA_MESSAGE, load_config
from qtune.errors import QtuneError, QtuneWarning
from qtune.rundir import RunDir, read_metrics
from qtune.study import figures, pareto, plotting, report
from qtune.study import runner as sweep_runner
from qtune.study.dryrun import plan
from qtune.study.evals import val_halves
from qtune.study.results import full_finetuning_estimates, load_results
from qtune.study.runner import run_sweep
from qtune.study.spec import expand, load_sweep
from qtune.study.tables import base_rows, md_table, ranking_stability, stability_line, study_rows

from conftest import CODEALPACA, RUN_NAME_RULE, SHORT_KEY_HINT, sweep_error

ROOT = Path(__file__).resolve().parents[1]
SMOL = ROOT / "configs" / "sweeps" / "paper-smollm2.yaml"
LLAMA = ROOT / "configs" / "sweeps" / "paper-llama2-7b.yaml"
SHAPE_7B = ROOT / "configs" / "models" / "llama-2-7b"
RANKS = [1, 4, 8, 16, 64]
runner = CliRunner()


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- the grid files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, unquantized, sixteenth",
    [(SMOL, "fp32", "bf16-r16"), (LLAMA, "bf16", "fp32-r16")],
    ids=["smollm2", "llama2-7b"],
)
def test_paper_grids_are_the_three_setups_plus_one(path, unquantized, sixteenth):
    runs, notes = expand(*load_sweep(path))
    expected = [f"{q}-r{r}" for q in (unquantized, "int8", "nf4") for r in RANKS] + [sixteenth]
    assert [r.name for r in runs] == expected and notes == []
    for run in runs:
        assert run.config.lora.lora_alpha == 2 * run.config.lora.r  # qtune's alpha_per_r convention
    quants = {r.name: r.config.quant.quant for r in runs}
    assert quants[f"{unquantized}-r8"] == {"fp32": "none", "bf16": "bf16"}[unquantized]
    assert quants[sixteenth] == {"bf16-r16": "bf16", "fp32-r16": "none"}[sixteenth]
    assert runs[-1].config.lora.r == 16
    spec, _ = load_sweep(path)
    assert spec.val_halves is True and spec.humaneval_limit is not None


def test_paper_llama_config_is_the_papers_run():
    cfg = load_config(ROOT / "configs" / "paper-llama2-7b.yaml")
    assert cfg.data.path == "sahil280114/codealpaca-20k" and cfg.train.max_steps == 5000
    assert cfg.train.lr_scheduler == "cosine" and cfg.quant.compute_dtype == "bfloat16"
    assert cfg.train.require_cuda is True and cfg.model.name == "configs/models/llama-2-7b"


def test_paper_smollm2_budget_settings():
    spec, base = load_sweep(SMOL)
    cfg = expand(spec, base)[0][0].config
    assert (cfg.train.max_steps, cfg.data.max_length, cfg.train.batch_size) == (30, 256, 4)
    assert cfg.data.split == (0.93, 0.04, 0.03) and spec.humaneval_limit == 20
    assert cfg.train.require_cuda is False and cfg.data.path == str(CODEALPACA)


# --- qtune sweep --dry-run --------------------------------------------------------------------------------------


def _dry_run(monkeypatch, path: Path, *extra: str):
    monkeypatch.chdir(ROOT)  # model.name configs/models/llama-2-7b is relative to the repository root
    out_dir = ROOT / load_sweep(path)[0].output_dir
    existed = out_dir.exists()
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, whatever this one is

    def no_training(*a, **k):
        raise AssertionError("the dry run trained")

    monkeypatch.setattr(sweep_runner, "run_one", no_training)
    res = runner.invoke(app, ["sweep", "--config", str(path), "--dry-run", *extra])
    assert out_dir.exists() == existed  # nothing written
    return res


@pytest.mark.slow
def test_dry_run_of_the_7b_grid_on_cpu_lists_every_run_with_its_estimate(monkeypatch):
    from qtune.model.memory import estimate_run_config

    res = _dry_run(monkeypatch, LLAMA)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(
        f"{LLAMA}: 16 training runs, 4 bases evaluated alone; memory estimates for cuda (peak allocated, GiB"
    )
    runs = expand(*load_sweep(LLAMA))[0]
    by_name = {ln.split()[0]: ln for ln in lines}
    for run in runs:
        est = estimate_run_config(run.config, device="cuda")  # the config targets a GPU: estimated as for cuda
        assert f"  {est.peak_gib:.2f}  " in by_name[run.name], by_name[run.name]
        assert f"{est.trainable_params:,}" in by_name[run.name]
    assert "LoRA only" in by_name["bf16-r4"] and "quantization + LoRA" in by_name["nf4-r64"]
    assert "  int8-base  quantization only" in res.output and "  bf16-base  no fine-tuning" in res.output
    full = full_finetuning_estimates(
        str(SHAPE_7B), estimate_run_config(runs[0].config, device="cuda").to_dict()["inputs"]
    )
    assert f"full fine-tuning, fp32 + AdamW: {full[0]['gib']:.2f} GiB estimated (6,738,415,616 trainable)" in res.output
    assert full[0]["gib"] > 90 and full[1]["gib"] < full[0]["gib"]
    assert lines[-1] == "dry run: nothing was trained"


@pytest.mark.slow
def test_dry_run_of_the_smollm2_grid_estimates_for_cpu(monkeypatch):
    res = _dry_run(monkeypatch, SMOL)
    assert res.exit_code == 0, res.output
    assert "memory estimates for cpu (peak RSS, GiB" in res.output.splitlines()[0]
    p = plan(SMOL)
    assert [r["run"] for r in p["runs"]] == [r.name for r in expand(*load_sweep(SMOL))[0]]
    assert p["runs"][0]["overrides"] == {"quant.quant": "none", "lora.r": 1, "lora.lora_alpha": 2.0}
    assert [b["quant"] for b in p["bases"]] == ["none", "int8", "nf4", "bf16"]
    assert "greedy HumanEval pass@1 on the first 20 problems (bases too)" in res.output


def test_dry_run_device_option(monkeypatch):
    res = _dry_run(monkeypatch, SMOL, "--device", "gpu")
    assert res.exit_code == 2 and res.output == "error: --device 'gpu': expected cuda or cpu\n"
    res = runner.invoke(app, ["sweep", "--config", str(SMOL), "--device", "cpu"])
    assert res.exit_code == 2 and res.output.startswith("error: --device applies to --dry-run only")


# --- the CUDA-only refusal --------------------------------------------------------------------------------------


def test_7b_config_refuses_on_cpu_before_anything_loads(monkeypatch, tmp_path):
    import torch

    import qtune.model.load

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(qtune.model.load, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "run"
    res = runner.invoke(
        app, ["train", "--config", str(ROOT / "configs" / "paper-llama2-7b.yaml"), "--set", f"train.output_dir={out}"]
    )
    assert res.exit_code == 2 and res.output == f"error: {REQUIRE_CUDA_MESSAGE}\n"
    assert not out.exists()
    monkeypatch.chdir(ROOT)
    res = runner.invoke(app, ["sweep", "--config", str(LLAMA)])
    assert res.exit_code == 2 and res.output == f"error: {LLAMA}: {REQUIRE_CUDA_MESSAGE}\n"
    assert res.output.count("\n") == 1
    from qtune.train.trainer import check_device_switches

    with pytest.raises(QtuneError, match="train.require_cuda: this config is sized for a CUDA GPU"):
        check_device_switches(load_config(None, ["train.require_cuda=true"]))
    check_device_switches(load_config(None, []))  # off by default


# --- sweep file checks for the new fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("extra_runs:\n  a/b: {quant.quant: none}\n", f"$SWEEP: extra_runs.a/b: {RUN_NAME_RULE}"),
        (
            "extra_runs:\n  x: {r: 4}\n",
            f"$SWEEP: extra_runs.x.r: expected a dotted config key such as lora.r {SHORT_KEY_HINT}",
        ),
        ("extra_runs:\n  x: 3\n", "$SWEEP: extra_runs.x: Input should be a valid dictionary (got 3)"),
        (
            "axes: {r: [4]}\nreference_memory_gb: {paper: -1}\n",
            "$SWEEP: reference_memory_gb.paper: expected a positive number of GB (got -1.0)",
        ),
        ("axes: {r: [4]}\nextra_runs:\n  r4: {lora.r: 8}\n", "run name 'r4' occurs twice (rename a runs: entry)"),
        (  # lora_alpha follows the rank (2r), so it is 0 too
            "extra_runs:\n  x: {lora.r: 0}\n",
            "x: config: lora.r: Input should be greater than 0 (got 0)\n"
            "x: config: lora.lora_alpha: Input should be greater than 0 (got 0.0)",
        ),
    ],
)
def test_bad_extra_runs_and_references(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    assert sweep_error(path, text) == message.replace("$SWEEP", str(path))


def test_extra_runs_alone_make_a_sweep(tmp_path):
    path = _write(tmp_path / "s.yaml", {"extra_runs": {"a": {"lora.r": 2}, "b": {"quant.quant": "int8"}}})
    runs, _ = expand(*load_sweep(path))
    assert [(r.name, r.overrides) for r in runs] == [
        ("a", {"lora.r": 2, "lora.lora_alpha": 4.0}),
        ("b", {"quant.quant": "int8"}),
    ]
    assert runs[1].config.lora.lora_alpha == 32.0  # no rank set: the base's alpha stays


# --- the setups as rows, ranking stability ----------------------------------------------------------------------


def _res(name: str, quant: str, r: int, val: float, halves=None, base=None, peak=1.0, status="ok") -> dict:
    cfg = {
        "model": {"name": "m"},
        "quant": {"quant": quant},
        "data": {"path": "d"},
        "lora": {"r": r},
        "train": {"learning_rate": 2e-4, "batch_size": 4},
    }
    out = {
        "run": name,
        "status": status,
        "labels": {"quant": quant, "r": r},
        "config": cfg,
        "val_loss": val,
        "peak_gib": peak,
        "base_val_loss": base,
        "base_val_perplexity": math.exp(base) if base else None,
    }
    if halves:
        out["val_loss_half1"], out["val_loss_half2"] = halves
    return out


def test_bases_are_their_own_rows_in_setup_order():
    results = [
        _res("nf4-r4", "nf4", 4, 1.1, base=1.3),
        _res("none-r16", "none", 16, 1.0, base=1.2),
        _res("nf4-r16", "nf4", 16, 1.05, base=1.3),
        _res("int8-r4", "int8", 4, 1.02, base=1.25),
        _res("bf16-r16", "bf16", 16, 0.99, base=1.2),
    ]
    rows = study_rows(results)
    assert [(r["run"], r["setup"]) for r in rows] == [
        ("int8-base", "quantization only"),
        ("nf4-base", "quantization only"),
        ("fp32-base", "no fine-tuning"),
        ("bf16-base", "no fine-tuning"),
        ("none-r16", "LoRA only"),
        ("bf16-r16", "LoRA only"),
        ("int8-r4", "quantization + LoRA"),
        ("nf4-r4", "quantization + LoRA"),
        ("nf4-r16", "quantization + LoRA"),
    ]
    nf4 = next(r for r in base_rows(results) if r["run"] == "nf4-base")
    assert (nf4["val_loss"], nf4["val_perplexity"], nf4["base_of"]) == (1.3, math.exp(1.3), "nf4-r4")
    table = md_table(rows)
    assert "| int8-base | ok | quantization only | int8 |" in table and "val loss, 1st half" not in table


def test_ranking_stability_of_the_halves():
    results = [
        _res(n, "nf4", 4, v, halves=h)
        for n, v, h in [
            ("a", 1.00, (0.99, 1.01)),
            ("b", 1.01, (1.00, 1.02)),
            ("c", 1.02, (1.03, 1.01)),
            ("d", 1.03, (1.02, 1.04)),
        ]
    ]
    st = ranking_stability(results)
    assert st == {
        "k": 3,
        "runs": 4,
        "top": ["a", "b", "c"],
        "half1": ["a", "b", "d"],
        "half2": ["a", "c", "b"],
        "same_set": False,
        "same_order": False,
    }
    results[2]["val_loss_half1"] = 1.015
    st = ranking_stability(results)
    assert (st["half1"], st["same_set"], st["same_order"]) == (["a", "b", "c"], True, False)
    assert stability_line(results).startswith(
        "Ranking check: the two halves of the validation split agree on the top 3 runs, not on their order"
    )
    assert ranking_stability(results[:3]) is None  # 3 runs: any top 3 is all of them


# --- resuming a killed sweep, on the tiny model, with validation halves -----------------------------------------


@pytest.mark.slow
def test_killed_sweep_reruns_only_the_missing_runs(tiny_model_dir, tmp_path, monkeypatch):
    spec = {
        "output_dir": str(tmp_path / "out"),
        "set": {
            "model.name": tiny_model_dir,
            "data.path": str(CODEALPACA),
            "data.max_rows": 120,
            "data.max_length": 96,
            "train.max_steps": 2,
            "train.warmup_steps": 1,
            "train.batch_size": 4,
            "train.seed": 0,
            "train.save_steps": 0,
            "quant.quant": "none",
        },
        "axes": {"r": [2, 4]},
        "extra_runs": {"r8-dropout": {"lora.r": 8, "lora.lora_dropout": 0.1}},
        "val_halves": True,
    }
    path = _write(tmp_path / "sweep.yaml", spec)
    real = sweep_runner.run_one
    calls = []

    def killed_after_the_first(run, *a, **k):
        calls.append(run.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) while the second run trains
        return real(run, *a, **k)

    monkeypatch.setattr(sweep_runner, "run_one", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, echo=lambda s: None)
    results = tmp_path / "out" / "results"
    assert sorted(p.name for p in results.glob("*.json")) == ["r2.json"]
    first = (results / "r2.json").stat().st_mtime_ns

    monkeypatch.setattr(sweep_runner, "run_one", real)
    lines = []
    out = run_sweep(path, echo=lines.append)
    assert [ln for ln in lines if "training" in ln or "skipped" in ln] == [
        "[1/3] r2: ok earlier, skipped",
        "[2/3] r4: training ...",
        "[3/3] r8-dropout: training ...",
    ]
    assert (results / "r2.json").stat().st_mtime_ns == first
    assert [r["run"] for r in out["results"]] == ["r2", "r4", "r8-dropout"]
    assert all(r["status"] == "ok" for r in out["results"])
    for r in out["results"]:  # the halves partition the split: their tokens and token-weighted losses add up
        a, b = r["val_halves"]
        assert a["tokens"] + b["tokens"] == r["val_tokens"]
        assert (a["loss"] * a["tokens"] + b["loss"] * b["tokens"]) / r["val_tokens"] == pytest.approx(
            r["val_loss"], rel=1e-6
        )
        assert (r["val_loss_half1"], r["val_loss_half2"]) == (a["loss"], b["loss"])
        rd = RunDir(tmp_path / "out" / "runs" / r["run"])
        assert json.loads(rd.summary.read_text())["val_halves"] == [a, b]  # training's final pass made them
        assert not rd.val_halves.exists()  # so no second pass ran
    # a separate pass on the saved adapter (a run trained without them) gives the same figures, to the bit
    assert val_halves(tmp_path / "out" / "runs" / "r4") == out["results"][1]["val_halves"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| fp32-base | ok | no fine-tuning | none |" in table and "val loss, 2nd half" in table
    assert len(load_results(tmp_path / "out")) == 3
    # a record cut short (written in place by an older qtune, or by hand) is named, left out, and redone
    (results / "r4.json").write_text('{"run": "r4", "sta', encoding="utf-8")
    with pytest.warns(QtuneWarning, match=r"r4\.json: not a result record"):
        assert [r["run"] for r in load_results(tmp_path / "out")] == ["r2", "r8-dropout"]
    lines.clear()
    run_sweep(path, echo=lines.append)
    assert [ln for ln in lines if "training" in ln] == ["[2/3] r4: training ..."]
    assert json.loads((results / "r4.json").read_text())["status"] == "ok"
    assert not list(results.glob(".tmp-*"))  # records are written whole, through a temporary file


# --- the report at 16 runs --------------------------------------------------------------------------------------


def synthetic_sweep(root: Path, steps: int = 300) -> Path:
    """A finished 16-run paper grid (the 7B file's names) with metrics, as a sweep directory; no training."""
    from qtune.model.memory import TrainShape

    root.mkdir(parents=True, exist_ok=True)
    (root / "results").mkdir()
    (root / "sweep.yaml").write_text(LLAMA.read_text())
    inputs = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in TrainShape(batch_size=4, seq_len=512).__dict__.items()
    }
    base_loss = {"bf16": 1.20, "int8": 1.21, "nf4": 1.27, "none": 1.20}
    peak = {"bf16": 14.0, "int8": 8.0, "nf4": 5.0, "none": 27.5}
    grid = [(q, r) for q in ("bf16", "int8", "nf4") for r in RANKS] + [("none", 16)]
    for i, (q, r) in enumerate(grid):
        name = f"{'fp32' if q == 'none' else q}-r{r}"
        val = base_loss[q] - 0.35 - 0.004 * math.log2(r) + 0.001 * (i % 3)
        run_dir = root / "runs" / name
        run_dir.mkdir(parents=True)
        recs = []
        for s in range(1, steps + 1):
            lr = 2e-4 * (s / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * (s - 10) / (steps - 10))))
            recs.append(
                {
                    "step": s,
                    "time_s": 0.3 * s,
                    "loss": val + 0.6 * math.exp(-s / 40) + 0.05 * math.sin(s + i),
                    "learning_rate": lr,
                    "peak_allocated_gib": peak[q] * (0.8 + 0.2 * min(1, s / 20)) + 0.01 * r,
                }
            )
            if s % 100 == 0:
                recs.append(
                    {
                        "step": s,
                        "time_s": 0.3 * s + 1,
                        "eval_loss": val + 0.3 * math.exp(-s / 60),
                        "peak_allocated_gib": peak[q] + 0.01 * r + 0.2,
                    }
                )
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
        res = _res(
            name,
            q,
            r,
            val,
            halves=(val - 0.01 + 0.002 * (i % 4), val + 0.01 - 0.002 * (i % 5)),
            base=base_loss[q],
            peak=peak[q] + 0.01 * r + 0.3,
        )
        res["config"]["model"]["name"] = str(SHAPE_7B)
        res["config"]["train"]["output_dir"] = str(run_dir)
        res |= {
            "estimate_gib": peak[q] + 0.01 * r,
            "estimate": {"inputs": inputs},
            "memory_metric": "peak_allocated",
            "humaneval_pass@1": 0.0,
            "base_humaneval_pass@1": 0.0,
        }
        (root / "results" / f"{name}.json").write_text(json.dumps(res))
    return root


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory):
    d = synthetic_sweep(tmp_path_factory.mktemp("paper") / "sweep")
    return d, report.write_report(d)


@pytest.mark.slow
def test_report_names_its_figures_after_what_they_show(paper_report):
    d, md_path = paper_report
    assert figures.FIGURES == (
        "memory_per_configuration",
        "memory_full_vs_best",
        "memory_over_time",
        "training_loss",
        "learning_rate",
        "quality_vs_memory",
    )
    for name in figures.FIGURES:
        png = d / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    md = md_path.read_text()
    assert md.count("![") == 6 and "(figures/memory_full_vs_best.png)" in md
    best = min(load_results(d), key=lambda r: r["val_loss"])["run"]
    assert f"**{best}**" in md and best == "bf16-r64"
    assert "| int8-base | ok | quantization only | int8 |" in md and "Ranking check:" in md


@pytest.mark.slow
def test_full_vs_best_bars_carry_the_estimates_and_the_papers_figures(paper_report):
    d, _ = paper_report
    best = next(r for r in load_results(d) if r["run"] == "bf16-r64")
    bars, missing = figures.full_vs_best_bars(best, report._references(d))
    full = full_finetuning_estimates(str(SHAPE_7B), best["estimate"]["inputs"])
    assert missing is None
    assert [(b["label"], b["kind"]) for b in bars] == [
        ("full fine-tuning, fp32 + AdamW (estimate)", "estimate"),
        ("full fine-tuning, bf16 + AdamW (estimate)", "estimate"),
        ("bf16-r64 (best): estimate", "estimate"),
        ("bf16-r64 (best): measured", "measured"),
        ("paper: full fine-tuning, fp32 + Adam (4 x 28 GB)", "reference"),
        ("paper: chosen configuration, estimated", "reference"),
        ("paper: chosen configuration, measured", "reference"),
    ]
    assert [b["gib"] for b in bars] == [
        full[0]["gib"],
        full[1]["gib"],
        best["estimate_gib"],
        best["peak_gib"],
        112 * 1e9 / 2**30,
        9.3 * 1e9 / 2**30,
        10.8 * 1e9 / 2**30,
    ]
    md = (d / "report.md").read_text()
    assert f"| full fine-tuning, fp32 + AdamW (estimate) | {full[0]['gib']:.2f} | estimate |" in md
    assert "| paper: full fine-tuning, fp32 + Adam (4 x 28 GB) | 104.31 | reference | 112 GB as published |" in md


def _figure(monkeypatch, draw):
    plt = plotting.pyplot()
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure to inspect it
    draw()
    figs[0].canvas.draw()
    return figs[0]


def _overlaps(boxes) -> list:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


@pytest.mark.slow
def test_quality_vs_memory_of_a_grid_names_points_by_colour_and_marker(paper_report, monkeypatch, tmp_path):
    d, _ = paper_report
    results = load_results(d)
    fig = _figure(monkeypatch, lambda: pareto.plot_pareto(results, tmp_path / "q.png", "bf16-r64"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["\u2605 best: bf16-r64"]  # no other label: colour + marker say it
    markers = {tuple(c.get_offsets()[0]): c.get_paths()[0].vertices.shape for c in ax.collections}
    assert len(markers) == 16
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "Pareto front",
        "int8-base alone (quantization only): 1.210, above the plot",
        "nf4-base alone (quantization only): 1.270, above the plot",
        "fp32-base alone (no fine-tuning): 1.200, above the plot",
        "bf16-base alone (no fine-tuning): 1.200, above the plot",
        "fp32 base",
        "bf16 base",
        "int8 base",
        "nf4 base",
        " ",
        "LoRA r = 1",
        "LoRA r = 4",
        "LoRA r = 8",
        "LoRA r = 16",
        "LoRA r = 64",
    ]
    assert ax.get_legend().get_window_extent().y1 < ax.get_window_extent().y0  # below the axes


def test_quality_vs_memory_labels_never_overlap_when_runs_share_format_and_rank(monkeypatch, tmp_path):
    """An ablation list (16 runs of one format and rank, learning rates apart): the names go in a column beside
    the axes, spaced so that no two overlap, however close the points."""
    from matplotlib.text import Text

    results = [_res(f"nf4-lr{i}", "nf4", 16, 1.0 + 0.0005 * (i % 5), peak=2.0 + 0.001 * i) for i in range(16)]
    fig = _figure(monkeypatch, lambda: pareto.plot_pareto(results, tmp_path / "q.png", "nf4-lr0"))
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(
        ["nf4-lr0  \u2605 best"] + [f"nf4-lr{i}" for i in range(1, 16)]
    )
    boxes = [Text.get_window_extent(t) for t in ax.texts]  # the text alone, not its leader line
    assert _overlaps(boxes) == []
    assert all(b.x0 > ax.get_window_extent().x1 for b in boxes)  # a column beside the axes, off the data
    (best,) = [t for t in ax.texts if "best" in t.get_text()]
    assert best.get_fontweight() == "bold"


@pytest.mark.slow
def test_memory_per_configuration_is_readable_at_16_runs(paper_report, monkeypatch, tmp_path):
    d, _ = paper_report
    results = load_results(d)
    fig = _figure(monkeypatch, lambda: figures.plot_memory(results, tmp_path / "m.png", "bf16-r64"))
    ax = fig.axes[0]
    ticks = ax.get_yticklabels()
    assert [t.get_text() for t in ticks][:6] == [
        "fp32-r16",
        "bf16-r1",
        "bf16-r4",
        "bf16-r8",
        "bf16-r16",
        "bf16-r64  \u2605 best",
    ]
    assert len(ticks) == 16 and _overlaps([t.get_window_extent() for t in ticks]) == []
    assert [t.get_fontweight() for t in ticks].count("bold") == 1
    assert ax.get_xlabel() == "peak allocated (GiB)"


@pytest.mark.slow
def test_learning_rate_figure_draws_one_schedule_for_identical_runs(paper_report, monkeypatch, tmp_path):
    d, _ = paper_report
    results = load_results(d)
    fig = _figure(
        monkeypatch,
        lambda: figures.plot_curves(
            d, results, "learning_rate", "learning rate", "LR", tmp_path / "lr.png", "bf16-r64"
        ),
    )
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["bf16-r64 (best); same schedule: 15 other runs"]
    fig = _figure(
        monkeypatch,
        lambda: figures.plot_curves(d, results, "loss", "training loss", "Loss", tmp_path / "loss.png", "bf16-r64"),
    )
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert len(labels) == 18 and labels[-3:] == [
        "bf16-r64: each step",
        "bf16-r64 (best), mean over 6 steps",
        "bf16-r64: validation loss",
    ]  # 300 steps: a mean over 300 // 50
    assert fig.axes[0].get_title() == "Loss, mean over 6 steps"
    raw = [m["loss"] for m in read_metrics(d / "runs" / "nf4-r4" / "metrics.jsonl") if "loss" in m]
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "nf4-r4"]
    assert list(line.get_ydata()) == figures.moving_mean(raw, 6)


def test_moving_mean():
    assert figures.moving_mean([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert figures.moving_mean([1.0, 3.0], 1) == [1.0, 3.0]


def test_spread_keeps_order_and_gap():
    assert plotting.spread([0.5, 0.5, 0.5], 0.1) == pytest.approx([0.5, 0.6, 0.7])
    assert plotting.spread([0.95, 0.99, 0.1], 0.1) == pytest.approx([0.9, 1.0, 0.1])
    assert plotting.spread([0.3, 0.2], 0.05) == [0.3, 0.2]
