"""Every JSON file and JSON line qtune writes is strict JSON: a non-finite number is written as null."""

import json
import math

import pytest
from typer.testing import CliRunner

from qtune.cli import app
from qtune.jsonio import dumps
from qtune.rundir import RunDir

from conftest import tiny_run_config


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (Python's reader accepts them; JSON has no such tokens)."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_dumps_writes_null_for_non_finite_numbers():
    text = dumps({"a": math.nan, "b": [math.inf, 1.5, (-math.inf, 2)], "c": {"d": 0.0, "e": "nan"}, "f": None})
    assert text == '{"a": null, "b": [null, 1.5, [null, 2]], "c": {"d": 0.0, "e": "nan"}, "f": null}'
    assert strict_json(text) == {"a": None, "b": [None, 1.5, [None, 2]], "c": {"d": 0.0, "e": "nan"}, "f": None}
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict_json(json.dumps({"a": math.nan}))  # what Python's own writer would have written


@pytest.mark.slow
def test_summary_eval_json_and_printed_json_are_strict_with_a_nan_loss(tiny_model_dir, tmp_path, monkeypatch):
    import qtune.evaluate.perplexity as perplexity
    import qtune.train.validation as validation
    from qtune.train.trainer import train

    # training's evaluation (ValidationTrainer.evaluate) computes its loss with validation.split_loss
    monkeypatch.setattr(
        validation, "split_loss", lambda *a, **k: {"loss": math.nan, "perplexity": math.inf, "tokens": 7}
    )
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        quant={"quant": "none"},
        data={"max_rows": 60},
        train={"max_steps": 1, "warmup_steps": 0, "gradient_checkpointing": False},
    )
    train(cfg)
    rd = RunDir(tmp_path / "run")
    summary = strict_json(rd.summary.read_text())
    assert summary["val_loss"] is None and summary["val_perplexity"] is None and summary["steps"] == 1
    for line in rd.metrics.read_text().splitlines():
        strict_json(line)

    monkeypatch.setattr(
        perplexity, "split_loss", lambda *a, **k: {"loss": math.nan, "perplexity": math.inf, "tokens": 7}
    )
    result = CliRunner().invoke(app, ["eval", "loss", "--run", str(rd.root), "--splits", "val", "--json"])
    assert result.exit_code == 0, result.output
    expected = {who: {"val": {"loss": None, "perplexity": None, "tokens": 7}} for who in ("base", "adapter")}
    assert strict_json(result.output.strip().splitlines()[-1]) == expected
    assert strict_json(rd.eval.read_text()) == expected


def test_sweep_reads_a_null_loss_as_a_diverged_run(tmp_path):
    from qtune.study.sweep import Run, collect_result

    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    rd.summary.write_text(dumps({"steps": 2, "val_loss": 1.5, "wall_time_s": 1.0}))
    rd.metrics.write_text(dumps({"step": 1, "loss": 2.0}) + "\n" + dumps({"step": 2, "loss": math.nan}) + "\n")
    res = collect_result(Run("a", {}, {}), rd, 0, 1.0, "", None)
    assert (res["status"], res["error"]) == ("failed", "NaN or infinite loss")
    rd.metrics.write_text(dumps({"step": 1, "loss": 2.0}) + "\n" + dumps({"step": 2, "eval_loss": math.inf}) + "\n")
    assert collect_result(Run("a", {}, {}), rd, 0, 1.0, "", None)["status"] == "failed"
