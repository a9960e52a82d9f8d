"""The sweep: grid expansion, one subprocess per run, a failing run recorded, resumption, selection, the report."""

import json
import math
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import LoraSettings, ModelConfig, QuantConfig, RunConfig
from qtune.errors import QtuneError
from qtune.model.adapters import attach_lora, lora_config, loraplus_optimizer
from qtune.model.load import load_model
from qtune.rundir import RunDir
from qtune.study.evals import qtune_eval
from qtune.study.figures import FIGURES
from qtune.study.pareto import pareto_front
from qtune.study.results import best_run, load_results
from qtune.study.runner import run_sweep
from qtune.study.spec import expand, load_sweep

from conftest import CODEALPACA, RUN_NAME_RULE, SHORT_KEY_HINT, sweep_error

runner = CliRunner()


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expand_names_overrides_variants_and_skips_loftq_on_int8(tmp_path):
    spec_path = _write(
        tmp_path / "s.yaml", {"axes": {"quant": ["nf4", "int8"], "r": [4, 16], "variant": ["lora", "dora", "loftq"]}}
    )
    runs, notes = expand(*load_sweep(spec_path))
    names = [r.name for r in runs]
    assert len(runs) == 2 * 2 * 3 - 2 and names[:3] == ["nf4-r4", "nf4-r4-dora", "nf4-r4-loftq"]
    assert "int8-r16-loftq" not in names and notes == [
        "int8-r4-loftq: skipped (LoftQ needs a 4-bit base)",
        "int8-r16-loftq: skipped (LoftQ needs a 4-bit base)",
    ]
    dora = runs[1].overrides
    assert dora["lora.use_dora"] is True and dora["lora.r"] == 4 and dora["lora.lora_alpha"] == 8.0


def test_named_runs_cross_the_axes_and_names_are_safe_file_names(tmp_path):
    spec_path = _write(
        tmp_path / "s.yaml",
        {
            "runs": {"fp32": {"quant.quant": "none"}, "nf4-skip": {"quant.skip_modules": ["down_proj"]}},
            "axes": {"r": [4, 16], "data.path": ["org/dataset"]},
        },
    )
    runs, _ = expand(*load_sweep(spec_path))
    assert [r.name for r in runs] == [
        "fp32-r4-path=org_dataset",
        "fp32-r16-path=org_dataset",
        "nf4-skip-r4-path=org_dataset",
        "nf4-skip-r16-path=org_dataset",
    ]
    assert runs[0].overrides["quant.quant"] == "none" and runs[0].labels["run"] == "fp32"
    assert runs[3].overrides["quant.skip_modules"] == ["down_proj"] and runs[3].overrides["lora.r"] == 16
    dup = _write(tmp_path / "d.yaml", {"axes": {"model.revision": ["a/b", "a_b"]}})
    with pytest.raises(QtuneError, match="run name .revision=a_b. occurs twice"):
        expand(*load_sweep(dup))


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs:\n  '..': {lora.r: 4}\n", f"$SWEEP: runs...: {RUN_NAME_RULE}"),
        ("runs:\n  a: {lora.r: 4}\n  a: {lora.r: 32}\n", "$SWEEP:3: invalid YAML: duplicate key 'a'"),
        (
            "runs:\n  a: {lora.r: 4}\naxes:\n  r: [8]\n",
            "$SWEEP: runs.a.lora.r: also an axis; the axis would override it",
        ),
        (
            "runs:\n  a: {quant: nf4}\n",
            f"$SWEEP: runs.a.quant: expected a dotted config key such as quant.quant {SHORT_KEY_HINT}",
        ),
        ("humaneval_limit: true\n", "$SWEEP: humaneval_limit: Input should be a valid integer (got True)"),
        ("", "$SWEEP: no axes and no runs: nothing to sweep (e.g. axes: {quant: [nf4, int8], r: [4, 16]})"),
        (
            "runs:\n  a: {lora.init: loftq, quant.quant: int8}\n",
            "a: config: lora.init=loftq needs quant.quant nf4 or fp4 (got int8)",
        ),
    ],
)
def test_bad_named_runs_are_errors_not_skips(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    assert sweep_error(path, text) == message.replace("$SWEEP", str(path))
    res = runner.invoke(app, ["sweep", "--config", str(tmp_path)])
    assert res.exit_code == 2 and res.output == f"error: {tmp_path}: is a directory, not a sweep file\n"


def test_metrics_reader_skips_a_truncated_last_line(tmp_path):
    from qtune.rundir import read_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(p) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


SWEEPS = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_expands_to_valid_runs(path):
    runs, notes = expand(*load_sweep(path))
    assert len(runs) >= 4 and notes == []
    assert "nf4" in {r.labels["quant"] for r in runs} and len({r.name for r in runs}) == len(runs)


def test_bad_sweep_files_report_every_problem(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"axes": {"rank": [1], "variant": ["qlora"], "quant": []}, "base": "nope.yaml"})
    with pytest.raises(QtuneError) as e:
        load_sweep(bad)
    msg = str(e.value)
    assert "axes.rank: unknown axis" in msg and "unknown variant 'qlora'" in msg and "axes.quant: empty list" in msg
    assert "base: config file not found" in msg
    invalid = _write(tmp_path / "inv.yaml", {"axes": {"r": [0, 8]}})
    with pytest.raises(QtuneError, match=r"r0: config: lora.r: Input should be greater than 0"):
        expand(*load_sweep(invalid))
    code = runner.invoke(app, ["sweep", "--config", str(bad)])
    assert code.exit_code == 2 and code.output.startswith("error:")


def _result(run, val_loss, peak, status="ok"):
    return {"run": run, "status": status, "val_loss": val_loss, "peak_gib": peak}


def test_selection_by_val_loss_with_ties_to_less_memory():
    results = [
        _result("a", 1.50001, 3.0),
        _result("b", 1.5, 2.0),
        _result("c", 1.6, 1.0),
        _result("d", 0.1, 0.5, status="failed"),
        _result("e", None, 0.1),
    ]
    assert best_run(results)["run"] == "b"  # a and b tie to 4 decimals; b uses less memory
    assert best_run([_result("x", None, 1.0)]) is None
    assert pareto_front([(3.0, 1.5, "a"), (2.0, 1.5, "b"), (1.0, 1.6, "c"), (2.5, 1.4, "f")]) == [
        (1.0, 1.6, "c"),
        (2.0, 1.5, "b"),
        (2.5, 1.4, "f"),
    ]


@pytest.fixture(scope="module")
def sweep_dir(tiny_model_dir, tmp_path_factory):
    """A real two-run sweep on the tiny model: one run trains, one fails (no such target module)."""
    root = tmp_path_factory.mktemp("sweep")
    spec = {
        "output_dir": str(root / "out"),
        "set": {
            "model.name": tiny_model_dir,
            "data.path": str(CODEALPACA),
            "data.max_rows": 120,
            "data.max_length": 96,
            "train.max_steps": 4,
            "train.warmup_steps": 1,
            "train.batch_size": 4,
            "train.learning_rate": 1e-2,
            "train.seed": 0,
        },
        "axes": {"r": [4], "lora.target_modules": ["all-linear", ["no_such_module"]]},
        "humaneval_limit": 2,
        "humaneval_max_new_tokens": 8,
    }
    path = _write(root / "sweep.yaml", spec)
    out = run_sweep(path, final=True, echo=lambda s: None)
    return Path(out["sweep_dir"]), path, out


@pytest.mark.slow
def test_sweep_records_success_and_failure(sweep_dir):
    d, _, out = sweep_dir
    results = {r["run"]: r for r in load_results(d)}
    ok, bad = results["r4-target_modules=all-linear"], results["r4-target_modules=no_such_module"]
    assert ok["status"] == "ok" and ok["error"] is None and ok["steps"] == 4
    assert (
        ok["trainable_params"] > 0
        and math.isfinite(ok["val_loss"])
        and ok["val_perplexity"] == pytest.approx(math.exp(ok["val_loss"]))
    )
    assert ok["peak_gib"] > 0 and ok["memory_metric"] == "peak_rss" and ok["tokens_per_s"] > 0
    assert ok["versions"]["torch"] == version("torch") and ok["versions"]["peft"] == version("peft")
    assert ok["config"]["lora"]["r"] == 4 and ok["estimate_gib"] > 0
    assert ok["estimate"]["trainable_params"] == ok["trainable_params"]  # the estimator counts what PEFT trained
    assert bad["status"] == "failed" and "no_such_module" in bad["error"] and bad["returncode"] != 0
    assert out["best"] == ok["run"]
    # the base alone on the same validation rows, as `qtune eval` computes it
    from qtune.evaluate.perplexity import evaluate_run

    again = evaluate_run(ok["config"]["train"]["output_dir"], ("val",))
    # one token-weighted figure: the val loss column is training's own, identical to `qtune eval`'s
    base, adapter = again["base"]["val"], again["adapter"]["val"]
    assert (ok["base_val_loss"], ok["base_val_tokens"]) == (base["loss"], base["tokens"])
    assert (ok["val_loss"], ok["val_tokens"]) == (adapter["loss"], adapter["tokens"])
    # 8 new tokens from a random model pass nothing; the samples were generated and scored
    assert ok["humaneval_pass@1"] == 0.0 and ok["base_humaneval_pass@1"] == 0.0 and ok["humaneval_limit"] == 2
    he = Path(ok["config"]["train"]["output_dir"]) / "humaneval"
    assert len((he / "adapter_results.jsonl").read_text().splitlines()) == 2 and (he / "base.json").is_file()
    table = (d / "results.md").read_text()
    assert "| r4-target_modules=all-linear | ok |" in table and "failed" in table and "HumanEval pass@1" in table
    assert (d / "results.csv").read_text().count("\n") == 4  # header, the nf4 base alone, two runs


@pytest.mark.slow
def test_final_run_keeps_the_grid_runs_log_and_reads_the_test_split_from_eval_json(sweep_dir):
    d, _, out = sweep_dir
    name = "r4-target_modules=all-linear"
    final = json.loads((d / "final.json").read_text())
    assert final == out["final"] and final["status"] == "ok" and final["run"] == name
    written = json.loads(RunDir(d / "final" / name).eval.read_text())  # what the child `qtune eval` wrote
    assert final["test"] == written and set(written["adapter"]) == {"test"}
    grid_log = (d / "logs" / f"{name}.log").read_text()
    commands = [ln.split(" -m qtune.cli ")[1].split(" --")[0] for ln in grid_log.splitlines() if ln.startswith("$ ")]
    assert commands == [
        "train",
        "eval loss",
        "eval humaneval",
        "eval humaneval",
    ]  # training, base val loss, HumanEval of run and base
    final_log = (d / "logs" / "final" / f"{name}.log").read_text()
    assert [ln.split(" -m qtune.cli ")[1].split(" --")[0] for ln in final_log.splitlines() if ln.startswith("$ ")] == [
        "train",
        "eval loss",
    ]
    assert f"--run {d / 'final' / name} --splits test" in final_log


@pytest.mark.slow
def test_an_evaluation_reads_only_the_file_its_own_child_wrote(tmp_path):
    """A failed child leaves no figure behind: the file it was to write is removed before it starts, and its
    error line (from the run's log) is the error."""
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    rd.eval.write_text(json.dumps({"base": {"val": {"loss": 1.0, "perplexity": 2.7, "tokens": 5}}}))
    log = tmp_path / "logs" / "run.log"
    with pytest.raises(QtuneError) as e:
        qtune_eval(rd, "val", log)
    assert str(e.value) == f"error: {rd.root}: not a qtune run directory (no config.yaml)"
    assert not rd.eval.exists()
    assert log.read_text().splitlines()[0].endswith(f"-m qtune.cli eval loss --run {rd.root} --splits val")


@pytest.mark.slow
def test_rerun_skips_finished_runs(sweep_dir):
    d, path, _ = sweep_dir
    before = {p.name: p.stat().st_mtime_ns for p in (d / "results").glob("*.json")}
    lines = []
    run_sweep(path, echo=lines.append)
    assert {p.name: p.stat().st_mtime_ns for p in (d / "results").glob("*.json")} == before
    assert sum("earlier, skipped" in ln for ln in lines) == 2 and not any("training" in ln for ln in lines)


@pytest.mark.slow
def test_a_val_loss_from_an_older_qtune_is_measured_again(sweep_dir, tmp_path):
    """A result without val_tokens holds an older qtune's val loss (a mean of per-batch means); a rerun replaces
    it with `qtune eval`'s figure, so the sweep ranks one quantity."""
    d, path, _ = sweep_dir
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    spec = yaml.safe_load(path.read_text()) | {"output_dir": str(copy)}
    f = copy / "results" / "r4-target_modules=all-linear.json"
    good = json.loads(f.read_text())
    old = {k: v for k, v in good.items() if k not in ("val_tokens", "base_val_tokens")}
    f.write_text(json.dumps(old | {"val_loss": 0.5, "val_perplexity": math.exp(0.5), "base_val_loss": 0.6}))
    lines = []
    run_sweep(_write(tmp_path / "sweep.yaml", spec), echo=lines.append)
    again = json.loads(f.read_text())
    assert sum("measuring it again" in ln for ln in lines) == 1 and not any("training" in ln for ln in lines)
    for key in ("val_loss", "val_perplexity", "val_tokens", "base_val_loss", "base_val_tokens"):
        assert again[key] == good[key], key


@pytest.mark.slow
def test_report_writes_six_figures_and_markdown(sweep_dir):
    d, _, _ = sweep_dir
    res = runner.invoke(app, ["report", str(d)])
    assert res.exit_code == 0, res.output
    for name in FIGURES:
        png = d / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (d / "report.md").read_text()
    assert (
        "**r4-target_modules=all-linear**" in md
        and md.count("![") == 6
        and "Failed runs: r4-target_modules=no_such_module" in md
    )


def test_report_on_an_empty_directory_is_one_line(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "no sweep results" in res.output and len(res.output.strip().splitlines()) == 1


# --- LoRA variants, each through PEFT -------------------------------------------------------------------------


def test_dora_and_rslora_reach_peft(tiny_model_dir):
    assert lora_config(LoraSettings(use_dora=True)).use_dora is True
    conf = lora_config(LoraSettings(r=16, lora_alpha=32, use_rslora=True))
    assert conf.use_rslora is True
    model = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4"))
    model = attach_lora(model, LoraSettings(r=16, lora_alpha=32, use_rslora=True, use_dora=True), True, False)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(32 / 4)  # rsLoRA: alpha / sqrt(r), not alpha / r = 2
    assert q.lora_magnitude_vector["default"].weight.shape == (q.out_features,)  # DoRA magnitude per output


def test_loraplus_optimizer_gives_b_a_higher_learning_rate(tiny_model_dir):
    model = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4"))
    model = attach_lora(model, LoraSettings(r=4, loraplus_lr_ratio=16), True, False)
    opt = loraplus_optimizer(model, LoraSettings(r=4, loraplus_lr_ratio=16), 1e-3, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[names[id(p)]] = g["lr"]
    assert {lr for n, lr in lrs.items() if "lora_A" in n} == {1e-3}
    b_lrs = sorted({lr for n, lr in lrs.items() if "lora_B" in n})
    assert b_lrs == [pytest.approx(16e-3)]
    assert loraplus_optimizer(model, LoraSettings(r=4), 1e-3, 0.0) is None


def test_loftq_needs_a_4bit_base(tiny_model_dir):
    with pytest.raises(ValueError, match="lora.init=loftq needs quant.quant nf4 or fp4"):
        RunConfig.model_validate({"quant": {"quant": "int8"}, "lora": {"init": "loftq"}})


def test_loftq_adapter_is_the_rank_r_svd_of_the_quantization_error(tiny_model_dir):
    """scaling * B @ A equals the best rank-r approximation of W - dequantize(Q), layer by layer, so the
    model at step 0 is closer to the full-precision one than NF4 alone."""
    from safetensors.torch import load_file

    from qtune.model.quantize import dequantized_weight

    x = torch.randint(0, 1000, (2, 16))
    ref = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="none"))
    with torch.no_grad():
        target = ref(input_ids=x).logits.float()
    weights = load_file(f"{tiny_model_dir}/model.safetensors")
    err = {}
    for init in ("default", "loftq"):
        m = load_model(
            tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4", compute_dtype="float32")
        )
        m = attach_lora(m, LoraSettings(r=8, lora_alpha=16, init=init), True, False, model_path=tiny_model_dir).eval()
        if init == "loftq":
            layer = m.base_model.model.model.layers[1].mlp.down_proj
            e = weights["model.layers.1.mlp.down_proj.weight"].float() - dequantized_weight(layer.base_layer)
            u, s, vh = torch.linalg.svd(e, full_matrices=False)
            best = (u[:, :8] * s[:8]) @ vh[:8]
            got = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            assert layer.scaling["default"] == 2.0
            torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            err[init] = (m(input_ids=x).logits.float() - target).pow(2).mean().item()
    assert err["loftq"] < 0.9 * err["default"]


def test_loftq_without_original_weights_is_one_line(tiny_model_dir, tmp_path):
    m = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4"))
    with pytest.raises(QtuneError, match="holds no .safetensors weights"):
        attach_lora(m, LoraSettings(r=4, init="loftq"), True, False, model_path=str(tmp_path))
