"""Training arithmetic and failure handling: accumulation, schedule, NaN loss, out of memory, precision, safety."""

import json
import math
import re
import warnings
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import ModelConfig, QuantConfig
from qtune.data.prepare import load_splits
from qtune.data.tokenize import padding_collator
from qtune.errors import QtuneError, QtuneWarning
from qtune.evaluate.perplexity import split_loss
from qtune.model.load import load_tokenizer
from qtune.model.quantize import compute_dtype, precision_warnings
from qtune.rundir import RunDir
from qtune.train.trainer import train
from qtune.units import GIB

from conftest import CODEALPACA, CrashAt, tiny_run_config, write_rows

FAST = {"gradient_checkpointing": False, "eval_at_end": False, "warmup_steps": 0}


def _train_cli(model: str, out, *settings: str):
    """``qtune train`` of ``model`` on CodeAlpaca into ``out``, with ``--set`` for each of ``settings``, in process."""
    args = ["train"]
    for setting in (f"model.name={model}", f"data.path={CODEALPACA}", f"train.output_dir={out}", *settings):
        args += ["--set", setting]
    return CliRunner().invoke(app, args)


class Grads(TrainerCallback):
    """LoRA gradients just before each optimizer step, and the optimizer's learning rate there."""

    def __init__(self):
        self.grads, self.lrs, self.micro = [], [], 0

    def on_substep_end(self, args, state, control, **kw):
        self.micro += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self.micro += 1
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _two_rows(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {
            "instruction": "Explain recursion.",
            "input": "",
            "output": "A recursive function calls itself on a smaller part of the problem until it reaches a base case "
            "that it can answer directly; then the partial answers are combined on the way back up. " * 2,
        },
    ]
    return write_rows(tmp_path / "two.json", rows)


@pytest.fixture(scope="module")
def accumulation_runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accum")
    data = {"path": str(_two_rows(tmp)), "max_rows": None, "split": [1.0, 0.0, 0.0], "max_length": 128}
    out = {}
    for batch, accum in ((1, 2), (2, 1)):
        probe = Grads()
        cfg = tiny_run_config(
            tiny_model_dir,
            tmp / f"b{batch}a{accum}",
            quant={"quant": "none"},
            data=data,
            train={
                **FAST,
                "max_steps": 1,
                "batch_size": batch,
                "gradient_accumulation_steps": accum,
                "max_grad_norm": 1e9,
            },
        )
        train(cfg, callbacks=(probe,))
        out[(batch, accum)] = (probe, RunDir(tmp / f"b{batch}a{accum}"))
    return out


@pytest.mark.slow
def test_accumulation_gives_the_gradients_of_one_big_batch(accumulation_runs):
    (small, _), (big, _) = accumulation_runs[(1, 2)], accumulation_runs[(2, 1)]
    assert small.micro == 2 and big.micro == 1  # two micro-batches vs one, one optimizer step each
    [g_small], [g_big] = small.grads, big.grads
    assert g_small.keys() == g_big.keys() and len(g_big) == 2 * 2 * 7  # A and B, 2 layers x 7 linear layers
    flat_small = torch.cat([g_small[k].flatten() for k in sorted(g_small)])
    flat_big = torch.cat([g_big[k].flatten() for k in sorted(g_big)])
    assert flat_big.norm() > 0
    assert ((flat_small - flat_big).norm() / flat_big.norm()).item() < 1e-4
    # per element: float32 sums in another order (one packed row of two samples against two rows of one) leave
    # differences up to about 2.5e-7 of the largest gradient on near-zero elements (measured 5.7e-8 of 0.24)
    for k in g_big:
        torch.testing.assert_close(g_small[k], g_big[k], rtol=1e-4, atol=1e-6 * flat_big.abs().max().item())


@pytest.mark.slow
def test_logged_loss_is_the_token_weighted_mean(accumulation_runs, tiny_model_dir):
    _, rd = accumulation_runs[(1, 2)]
    ds = load_splits(rd.data)["train"].remove_columns("row")
    supervised = sorted(sum(1 for x in lab[1:] if x != -100) for lab in ds["labels"])
    assert supervised[1] > 10 * supervised[0]  # very different supervised lengths
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    collate = padding_collator(load_tokenizer(tiny_model_dir, ModelConfig()))
    weighted = split_loss(base, ds, collate)["loss"]  # LoRA B starts at 0: step 1 sees the base model
    per_sample = [split_loss(base, ds.select([i]), collate)["loss"] for i in range(2)]
    assert abs(weighted - sum(per_sample) / 2) > 0.05  # a per-micro-batch mean would be told apart
    for key in ((1, 2), (2, 1)):
        rec = json.loads(accumulation_runs[key][1].metrics.read_text().splitlines()[0])
        assert rec["loss"] == pytest.approx(weighted, rel=1e-5), key


@pytest.mark.slow
def test_cosine_schedule_counts_warmup_in_optimizer_steps(tiny_model_dir, tmp_path):
    peak, warmup, steps, accum = 1e-2, 4, 12, 3
    probe = Grads()
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        quant={"quant": "none"},
        train={
            **FAST,
            "max_steps": steps,
            "warmup_steps": warmup,
            "batch_size": 1,
            "gradient_accumulation_steps": accum,
            "learning_rate": peak,
        },
    )
    train(cfg, callbacks=(probe,))
    assert probe.micro == steps * accum and len(probe.lrs) == steps

    def scheduled(s):  # the rate after s scheduler steps; optimizer step k uses scheduled(k - 1)
        return (
            peak * s / warmup if s < warmup else peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        )

    assert probe.lrs == pytest.approx([scheduled(k - 1) for k in range(1, steps + 1)], rel=1e-6, abs=1e-12)
    assert probe.lrs.index(max(probe.lrs)) == warmup  # step warmup + 1, the first after warmup, runs at the peak
    assert max(probe.lrs) == pytest.approx(peak)
    assert all(a < b for a, b in pairwise(probe.lrs[: warmup + 1]))
    assert all(a > b for a, b in pairwise(probe.lrs[warmup:]))
    assert probe.lrs[-1] < 0.05 * peak
    logged = [json.loads(x)["learning_rate"] for x in RunDir(tmp_path / "run").metrics.read_text().splitlines()]
    assert logged == pytest.approx(probe.lrs)


class PoisonAfter(TrainerCallback):
    """Sets one LoRA weight to NaN at the end of optimizer step ``step``: the next step's loss is NaN."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).view(-1)[0] = float("nan")


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_run_config(
        tiny_model_dir, tmp_path / "run", quant={"quant": "none"}, train={**FAST, "max_steps": 10, "save_steps": 2}
    )
    with pytest.raises(QtuneError) as err:
        train(cfg, callbacks=(PoisonAfter(5),))
    rd = RunDir(tmp_path / "run")
    first = str(err.value).splitlines()[0]
    assert first == f"training stopped: loss is nan at step 6; last good checkpoint {rd.checkpoints / 'checkpoint-4'}"
    bar = capsys.readouterr().err
    assert "train:" in bar and bar.endswith("\n")  # the progress bar was closed, so the error starts a new line
    names = sorted(p.name for p in rd.checkpoints.iterdir())
    assert names == ["checkpoint-2", "checkpoint-4"]  # step 6 (NaN) saved nothing
    saved = load_file(rd.checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    weights = torch.cat([t.flatten() for t in saved.values()])
    assert torch.isfinite(weights).all()
    assert not rd.adapter.exists()
    steps = [json.loads(x)["step"] for x in rd.metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (not JSON; Python's reader would accept them)."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def strict_records(rd: RunDir) -> list[dict]:
    return [strict_json(line) for line in rd.metrics.read_text().splitlines()]


def _finite_count(path):
    saved = load_file(path)
    return sum(bool(torch.isfinite(t).all()) for t in saved.values()), len(saved)


@pytest.mark.slow
def test_nan_guard_names_only_a_checkpoint_with_finite_weights(tiny_model_dir, tmp_path):
    """Checkpoint every step: the one of step 5 holds the poisoned weight, so step 4's is the last good one."""
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        quant={"quant": "none"},
        data={"max_rows": 100},
        train={**FAST, "max_steps": 10, "save_steps": 1},
    )
    with pytest.raises(QtuneError) as err:
        train(cfg, callbacks=(PoisonAfter(5),))
    rd = RunDir(tmp_path / "run")
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert _finite_count(rd.checkpoints / "checkpoint-5" / "adapter_model.safetensors") == (27, 28)
    assert _finite_count(rd.checkpoints / "checkpoint-4" / "adapter_model.safetensors") == (28, 28)
    first, second = str(err.value).splitlines()
    assert first == (
        f"training stopped: loss is nan at step 6; last good checkpoint {rd.checkpoints / 'checkpoint-4'} "
        "(not checkpoint-5: 1 of 28 adapter tensors not finite)"
    )
    assert second.startswith(
        f"lower the learning rate and resume from it: qtune train --resume {rd.root} "
        "--set train.learning_rate=0.001 (a tenth of now;"
    )
    records = strict_records(rd)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] is None and all(math.isfinite(r["loss"]) for r in records[:-1])


@pytest.mark.slow
def test_diverged_run_names_no_checkpoint_then_resumes_at_a_lower_rate(tiny_model_dir, tmp_path):
    """A huge learning rate: step 1's update leaves finite but enormous weights in checkpoint-1, which give a NaN
    loss at step 2; so checkpoint-1 is not good, and the resume with a sane rate starts over from step 0."""
    run = tmp_path / "run"
    cfg = tiny_run_config(
        tiny_model_dir,
        run,
        quant={"quant": "none"},
        data={"max_rows": 60},
        train={**FAST, "max_steps": 6, "save_steps": 1, "learning_rate": 1e30},
    )
    with pytest.raises(QtuneError) as err:
        train(cfg)
    rd = RunDir(run)
    weights = torch.cat(
        [t.flatten() for t in load_file(rd.checkpoints / "checkpoint-1" / "adapter_model.safetensors").values()]
    )
    assert torch.isfinite(weights).all() and weights.abs().max() > 1e20  # finite, and still no good
    first, second = str(err.value).splitlines()
    assert first == (
        "training stopped: loss is nan at step 2; "
        "no good checkpoint (checkpoint-1: its weights gave loss nan at step 2)"
    )
    assert second.startswith(
        f"lower the learning rate and resume from step 0: qtune train --resume {run} "
        "--set train.learning_rate=1e+29 (a tenth of now; --set may change train.learning_rate, "
        "train.max_grad_norm)"
    )
    records = strict_records(rd)
    assert [(r["step"], r["loss"] is None, r["grad_norm"] is None) for r in records] == [
        (1, False, False),
        (2, True, True),
    ]

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "train.learning_rate=0.01"])
    assert result.exit_code == 0, result.output
    assert (
        f"warning: {rd.checkpoints / 'checkpoint-1'}: not resumed from (its weights gave a non-finite loss at step 2); "
        "deleted\n"
    ) in result.output
    assert f"resuming {run} from step 0 (no good checkpoint)\n" in result.output
    assert (
        "resume changes train.learning_rate: 1e+30 -> 0.01 (saved in config.yaml and resumes.jsonl)\n" in result.output
    )
    records = strict_records(rd)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    lrs = [0.01 * 0.5 * (1 + math.cos(math.pi * (k - 1) / 6)) for k in range(1, 7)]
    assert [r["learning_rate"] for r in records] == pytest.approx(lrs, rel=1e-9)
    assert yaml.safe_load(rd.config.read_text())["train"]["learning_rate"] == 0.01
    assert [strict_json(x) for x in (run / "resumes.jsonl").read_text().splitlines()] == [
        {"step": 0, "changes": {"train.learning_rate": {"from": 1e30, "to": 0.01}}}
    ]
    strict_json(rd.summary.read_text())


@pytest.mark.slow
def test_resume_with_a_new_learning_rate_runs_the_rest_of_the_schedule_at_it(tiny_model_dir, tmp_path):
    """The checkpoint's optimizer and scheduler state carry the old rate; the resumed steps use the new one."""
    from qtune.config import load_config

    steps, old, new = 6, 1e-2, 1e-3
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        quant={"quant": "none"},
        data={"max_rows": 60},
        train={**FAST, "max_steps": steps, "save_steps": 2, "learning_rate": old},
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=(CrashAt(3),))
    rd = RunDir(tmp_path / "run")
    longer = load_config(rd.config, ["train.max_steps=8"])
    with pytest.raises(
        QtuneError,
        match=r"resuming with train.max_steps changed from the saved config; only "
        r"train.learning_rate, train.max_grad_norm may change on resume$",
    ):
        train(longer, resume=True)
    probe = Grads()
    summary = train(load_config(rd.config, [f"train.learning_rate={new}"]), resume=True, callbacks=(probe,))
    assert summary["resumed_from_step"] == 2

    def factor(s):  # cosine without warmup after s scheduler steps; optimizer step k uses factor(k - 1)
        return 0.5 * (1 + math.cos(math.pi * s / steps))

    assert probe.lrs == pytest.approx([new * factor(k - 1) for k in range(3, steps + 1)], rel=1e-9)
    logged = [r["learning_rate"] for r in strict_records(rd)]
    assert logged == pytest.approx([old * factor(0), old * factor(1)] + probe.lrs, rel=1e-9)
    assert load_config(rd.config).train.learning_rate == new


def test_resume_refuses_other_settings_and_lists_the_allowed_ones(tmp_path):
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--set", "train.max_steps=100"])
    assert result.exit_code == 2
    assert result.output == (
        "error: --resume: continues the run with its saved config; --set train.max_steps cannot "
        "change on resume (allowed: train.learning_rate, train.max_grad_norm; anything else: a "
        "new run)\n"
    )


def test_checkpoint_verification_reads_weights_and_both_losses(tmp_path):
    from safetensors.torch import save_file

    from qtune.train.checkpoints import checkpoint_problem, last_good_checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ckpt = root / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": step, "loss": 1.0}]}))
        save_file({"a": torch.ones(3), "b": torch.zeros(2)}, ckpt / "adapter_model.safetensors")
    (root / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"torn")
    assert checkpoint_problem(root / "checkpoint-6").startswith("unreadable (")
    assert checkpoint_problem(root / "checkpoint-4") is None
    assert checkpoint_problem(root / "checkpoint-4", {5: None}) == "its weights gave a non-finite loss at step 5"
    assert checkpoint_problem(root / "checkpoint-4", {4: math.inf}) == "loss inf at step 4"
    good, rejected = last_good_checkpoint(root, {5: math.nan})
    assert good == root / "checkpoint-2"
    assert [(p.name, why[:10]) for p, why in rejected] == [
        ("checkpoint-6", "unreadable"),
        ("checkpoint-4", "its weight"),
    ]
    (root / "checkpoint-2" / "adapter_model.safetensors").unlink()  # FSDP's sharded checkpoints hold none
    assert checkpoint_problem(root / "checkpoint-2") is None


def test_out_of_memory_is_explained(tiny_model_dir, tmp_path, monkeypatch):
    """No GPU here: Trainer.train raises the error CUDA would; the message and the exit status are checked."""
    from transformers import Trainer

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train", oom)
    monkeypatch.setattr("qtune.train.guards.gpu_total_bytes", lambda: float(GIB))
    result = _train_cli(
        tiny_model_dir, tmp_path / "run", "data.max_rows=40", "data.max_length=128", "train.batch_size=64"
    )
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(lines) == 2 and "Traceback" not in result.output
    assert lines[0].startswith(
        "error: out of GPU memory (batch_size 64 x max_length 128): memory model (GiB): frozen_weights"
    )
    assert "GPU has 1.00 GiB" in lines[0]
    assert re.search(r"largest that should fit: batch_size [1-9]\d* x max_length 128; lower train.batch_size", lines[1])


def test_oom_advice_comes_from_the_memory_model(tiny_model_dir):
    from qtune.model.memory import estimate, run_config_inputs
    from qtune.train.guards import oom_message

    cfg = tiny_run_config(tiny_model_dir, "unused", train={"batch_size": 64})
    counts, shape = run_config_inputs(cfg, device="cuda")
    at4 = estimate(counts, replace(shape, batch_size=4)).peak_bytes
    at5 = estimate(counts, replace(shape, batch_size=5)).peak_bytes
    budget = (at4 + at5) / 2 / 0.9  # 90% of the GPU lies between the peaks of batch 4 and batch 5
    first, second = oom_message(cfg, budget).splitlines()
    assert f"= {estimate(counts, shape).peak_gib:.2f} GiB" in first and "frozen_weights" in first
    assert second.startswith("largest that should fit: batch_size 4 x max_length 128;")
    long = tiny_run_config(tiny_model_dir, "unused", data={"max_length": 256}, train={"batch_size": 64})
    counts, shape = run_config_inputs(long, device="cuda")
    between = (
        (
            estimate(counts, replace(shape, batch_size=1, seq_len=128)).peak_bytes
            + estimate(counts, replace(shape, batch_size=1, seq_len=256)).peak_bytes
        )
        / 2
        / 0.9
    )
    assert (
        oom_message(long, between).splitlines()[1].startswith("largest that should fit: batch_size 1 x max_length 128;")
    )
    nothing = estimate(counts, shape).term("frozen_weights").bytes * 0.5
    assert "largest that should fit: nothing: the weights alone do not fit" in oom_message(long, nothing)


def test_fp16_compute_with_4bit_weights_warns_and_auto_prefers_bf16(monkeypatch):
    risky = QuantConfig(quant="nf4", compute_dtype="float16")
    [message] = precision_warnings(risky, cuda=False)
    assert "float16 with nf4 weights" in message and "use float32" in message
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert "use bfloat16 (this GPU has it)" in precision_warnings(risky, cuda=True)[0]
    assert compute_dtype(QuantConfig(quant="nf4"), cuda=True) == torch.bfloat16
    assert compute_dtype(QuantConfig(quant="nf4"), cuda=False) == torch.float32
    assert precision_warnings(QuantConfig(quant="nf4"), cuda=True) == []
    assert precision_warnings(QuantConfig(quant="int8", compute_dtype="float16"), cuda=True) == []


def test_fp16_warning_reaches_the_user(tiny_model_dir, tmp_path):
    from qtune.model.load import load_model

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4", compute_dtype="float16"))
    assert [w.category for w in seen if issubclass(w.category, QtuneWarning)] == [QtuneWarning]


def test_remote_code_needs_the_flag(tiny_model_dir, tmp_path):
    result = _train_cli(tiny_model_dir, tmp_path / "run", "model.trust_remote_code=true")
    assert result.exit_code == 2
    assert (
        result.output
        == "error: model.trust_remote_code: true also needs the --trust-remote-code flag on the command line\n"
    )
    assert not (tmp_path / "run").exists()
    data = tiny_run_config(tiny_model_dir, tmp_path).data.path
    result = CliRunner().invoke(
        app, ["data", "prepare", "--data", data, "--out", str(tmp_path / "d"), "--set", "model.trust_remote_code=true"]
    )
    assert result.exit_code == 2 and "--trust-remote-code flag" in result.output


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    load_tokenizer(tiny_model_dir, ModelConfig()).save_pretrained(pickled)
    assert not list(pickled.glob("*.safetensors")) and list(pickled.glob("*.bin"))
    result = _train_cli(str(pickled), tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.startswith(
        f"error: {pickled}: no .safetensors weights; qtune loads weights from safetensors only"
    )
    assert not (tmp_path / "run").exists()


def test_only_out_of_memory_errors_are_rewritten(tiny_model_dir):
    from qtune.train.guards import explain_out_of_memory

    cfg = tiny_run_config(tiny_model_dir, "unused", quant={"quant": "none"})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(QtuneError, match=r"^out of GPU memory \(batch_size 4 x max_length 128\)"):
        with explain_out_of_memory(model, cfg, total_bytes=2 * GIB):
            raise RuntimeError("CUDA error: out of memory")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with explain_out_of_memory(model, cfg, total_bytes=2 * GIB):
            raise RuntimeError("shape mismatch")


def test_target_modules_naming_nothing_is_one_line(tiny_model_dir, tmp_path):
    result = _train_cli(tiny_model_dir, tmp_path / "run", "data.max_rows=50", "lora.target_modules=[no_such_proj]")
    assert result.exit_code == 2
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: lora.target_modules=['no_such_proj']: Target modules")
    assert "Traceback" not in result.output
