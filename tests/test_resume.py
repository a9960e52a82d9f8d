"""Crash and resume: kill -9 mid-run, 'qtune train --resume' continues from the last complete checkpoint."""

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qtune.config import save_config
from qtune.errors import QtuneError
from qtune.rundir import RunDir
from qtune.train.checkpoints import last_checkpoint, truncate_metrics
from qtune.train.trainer import train

from conftest import CrashAt, tiny_run_config

SRC = Path(__file__).resolve().parents[1] / "src"
PAUSE_AT_STEP = Path(__file__).with_name("pause_at_step.py")
STEPS, SAVE = 16, 4


def qtune(*args, **kw):
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return [sys.executable, "-m", "qtune.cli", *map(str, args)], env


def steps_logged(rd: RunDir) -> list[int]:
    if not rd.metrics.is_file():
        return []
    out = []
    for line in rd.metrics.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path / "killed", train={"max_steps": STEPS, "save_steps": SAVE})
    cfg_file = tmp_path / "run.yaml"
    save_config(cfg, cfg_file)
    rd = RunDir(tmp_path / "killed")

    # kill between two checkpoints: the child holds still at the end of step SAVE + 3 (checkpoint-SAVE complete,
    # steps up to SAVE + 2 logged) and says so on a pipe; the test blocks on that pipe, then sends SIGKILL
    pause = SAVE + 3
    cmd, env = qtune("train", "--config", cfg_file)
    read_end, write_end = os.pipe()
    cmd = [sys.executable, str(PAUSE_AT_STEP), str(pause), str(write_end), *cmd[3:]]
    log = tmp_path / "killed.stderr"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=(write_end,))
    os.close(write_end)
    try:
        readable, _, _ = select.select([read_end], [], [], 300)  # at EOF too, if the child dies first
        said = os.read(read_end, 64) if readable else b"(nothing within 300 s)"
    finally:
        proc.kill()
        proc.wait()
        os.close(read_end)
    assert said == f"paused {pause}\n".encode(), log.read_text()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert not rd.adapter.exists()
    assert steps_logged(rd) == list(range(1, pause))  # the paused step itself is not logged yet
    assert [p.name for p in rd.checkpoints.iterdir()] == [f"checkpoint-{SAVE}"]

    # debris a crash can leave: an unfinished temporary folder and (from a non-atomic writer) a checkpoint
    # folder without its trainer state; neither may be picked up
    (rd.checkpoints / ".tmp-crashed" / f"checkpoint-{STEPS}").mkdir(parents=True)
    (rd.checkpoints / f"checkpoint-{STEPS - 1}").mkdir()
    (rd.checkpoints / f"checkpoint-{STEPS - 1}" / "adapter_model.safetensors").write_bytes(b"half")

    cmd, env = qtune("train", "--resume", rd.root)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_from = int(done.stdout.split("checkpoints/checkpoint-")[1].split()[0])
    assert resumed_from == SAVE

    ref = train(tiny_run_config(tiny_model_dir, tmp_path / "ref", train={"max_steps": STEPS, "save_steps": SAVE}))
    got = json.loads(rd.summary.read_text())
    assert got["steps"] == ref["steps"] == STEPS and got["resumed_from_step"] == resumed_from
    assert got["train_tokens"] == ref["train_tokens"] and got["tokens_per_s"] < got["train_tokens"] / got["wall_time_s"]
    assert got["final_train_loss"] == pytest.approx(ref["final_train_loss"], abs=1e-4)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-4)

    records = [json.loads(line) for line in rd.metrics.read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))  # no step twice, none missing
    ref_records = [json.loads(line) for line in RunDir(tmp_path / "ref").metrics.read_text().splitlines()]
    ref_losses = [r["loss"] for r in ref_records if "loss" in r]
    assert [r["loss"] for r in train_records] == pytest.approx(ref_losses, abs=1e-4)

    ours = load_file(rd.adapter / "adapter_model.safetensors")
    theirs = load_file(RunDir(tmp_path / "ref").adapter / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4)
    assert not rd.checkpoints.exists()  # removed once the run finished

    # a finished run cannot be resumed; --resume does not mix with a new config
    from typer.testing import CliRunner

    from qtune.cli import app

    again = CliRunner().invoke(app, ["train", "--resume", str(rd.root)])
    assert (
        again.exit_code == 2
        and again.output == f"error: {rd.root}: training already finished (adapter saved); nothing to resume\n"
    )


@pytest.mark.slow
def test_checkpoint_interrupted_while_written_is_never_used(tiny_model_dir, tmp_path, monkeypatch):
    """A save that dies half-way leaves only a temporary folder; the previous checkpoint stays the last one."""
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler
    calls = []

    def dies_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill in the middle of writing
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", dies_on_second_save)
    cfg = tiny_run_config(
        tiny_model_dir, tmp_path / "run", train={"max_steps": 6, "save_steps": 2, "eval_at_end": False}
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    rd = RunDir(tmp_path / "run")
    names = sorted(p.name for p in rd.checkpoints.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names
    assert any(n.startswith(".tmp-") for n in names)  # the half-written one, under its temporary name
    assert "/.tmp-" in calls[1] and calls[1].endswith("checkpoint-4")
    assert last_checkpoint(rd.checkpoints) == rd.checkpoints / "checkpoint-2"
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["checkpoint-2"]  # debris cleared


def test_truncate_metrics_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    lines.insert(4, json.dumps({"step": 4, "eval_loss": 0.5}))
    path.write_text("\n".join(lines) + '\n{"step": 7, "lo')
    state = {
        "global_step": 4,
        "log_history": [{"step": s, "loss": 1.0 / s} for s in range(1, 5)] + [{"step": 4, "eval_loss": 0.5}],
    }
    kept = truncate_metrics(path, state)
    assert [(r["step"], "eval_loss" in r) for r in kept] == [(1, False), (2, False), (3, False), (4, False), (4, True)]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 4]
    assert truncate_metrics(path, {}) == [] and path.read_text() == ""  # no checkpoint: from step 0


def test_truncate_metrics_drops_the_evaluation_after_the_last_checkpoint(tmp_path):
    """The end-of-training evaluation comes after the checkpoint at the last step; a resume logs it again."""
    path = tmp_path / "metrics.jsonl"
    recs = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 2, "eval_loss": 1.4},
        {"step": 2, "eval_loss": 1.4},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    state = {"global_step": 2, "log_history": [recs[0], recs[1], recs[2], {"step": 2, "train_runtime": 1.0}]}
    assert truncate_metrics(path, state) == recs[:3]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, [], "$RUN: not a qtune run directory (no config.yaml); nothing to resume"),
        (
            "config",
            ["--set", "train.max_steps=3"],
            "--resume: continues the run with its saved config; --set train.max_steps cannot change on resume "
            "(allowed: train.learning_rate, train.max_grad_norm; anything else: a new run)",
        ),
        ("config", [], "$RUN: run stopped before its data was prepared; train again with --overwrite"),
    ],
)
def test_resume_refuses_what_it_cannot_resume(tmp_path, tiny_model_dir, setup, args, message):
    from typer.testing import CliRunner

    from qtune.cli import app

    run = tmp_path / "run"
    run.mkdir()
    if setup == "config":
        cfg = tiny_run_config(tiny_model_dir, run)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", "--resume", str(run), *args])
    assert result.exit_code == 2
    assert result.output == "error: " + message.replace("$RUN", str(run)) + "\n"


def test_resume_point_is_an_error_for_a_finished_run(tmp_path):
    from qtune.train.checkpoints import resume_point

    rd = RunDir(tmp_path)
    rd.config.write_text("{}")
    (rd.data / "splits").mkdir(parents=True)
    (rd.adapter).mkdir()
    (rd.adapter / "adapter_config.json").write_text("{}")
    assert resume_point(rd) is None  # an adapter without the summary: the final save did not finish
    assert rd.adapter.is_dir()
    rd.summary.write_text("{}")
    with pytest.raises(QtuneError, match="training already finished"):
        resume_point(rd)


@pytest.mark.slow
def test_resume_with_a_custom_adapter_name(tiny_model_dir, tmp_path):
    settings = {
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "adapter_name": "code"},
        "data": {"max_rows": 100},
        "train": {"max_steps": 6, "save_steps": 2, "eval_at_end": False},
    }
    cfg = tiny_run_config(tiny_model_dir, tmp_path / "run", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=(CrashAt(3),))
    rd = RunDir(tmp_path / "run")
    assert (rd.checkpoints / "checkpoint-2" / "code" / "adapter_model.safetensors").is_file()  # PEFT's subfolder
    resumed = train(cfg, resume=True)
    ref = train(tiny_run_config(tiny_model_dir, tmp_path / "ref", **settings))
    assert resumed["final_train_loss"] == pytest.approx(ref["final_train_loss"], abs=1e-4)
    assert [json.loads(x)["step"] for x in rd.metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    saved = load_file(rd.adapter / "adapter_model.safetensors")  # flat layout, whatever the adapter's name
    assert saved.keys() == load_file(RunDir(tmp_path / "ref").adapter / "adapter_model.safetensors").keys()
    assert (rd.adapter / "adapter_config.json").is_file() and not (rd.adapter / "code").exists()


def _kill_before_file_operation(k: int, root: Path) -> None:
    """From now on, this process kills itself with SIGKILL just before its ``k``-th file operation in ``root``:
    opening a file for writing, creating a folder, renaming or starting to delete a tree (audit events)."""
    prefix, count = str(root) + os.sep, [0]

    def writes(args) -> bool:
        mode, flags = args[1], args[2]
        return (
            any(c in mode for c in "wax+")
            if isinstance(mode, str)
            else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        )

    def hook(event, args):
        if event not in ("open", "os.mkdir", "os.rename", "shutil.rmtree") or not isinstance(
            args[0], (str, os.PathLike)
        ):
            return
        if not (os.fspath(args[0]) + os.sep).startswith(prefix) or (event == "open" and not writes(args)):
            return
        count[0] += 1
        if count[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _tree(root: Path) -> tuple:
    return tuple(sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")))


@pytest.mark.slow
def test_a_kill_at_any_file_of_the_final_save_is_completed_by_resume(tiny_model_dir, tmp_path, monkeypatch):
    """The final save is run again and again in a forked copy of the training process, killed with SIGKILL just
    before its 1st, 2nd, ... file operation, until one copy completes it (the reference). Each run left by a kill
    is either finished (usable, not resumable) or not usable until '--resume', which then completes it exactly like
    the uninterrupted save: same summary, adapter, tokenizer and metrics, and nothing temporary left behind."""
    import shutil

    from typer.testing import CliRunner

    import qtune.train.trainer as trainer_module
    from qtune.cli import app
    from qtune.model.adapters import load_trained
    from qtune.train.checkpoints import save_final

    run, crashed = tmp_path / "run", tmp_path / "crashed"
    crashed.mkdir()

    def save_with_kills(rd, *args):
        pristine = tmp_path / "pristine"
        shutil.copytree(rd.root, pristine)
        for k in range(1, 200):
            pid = os.fork()
            if pid == 0:  # the child: no return to pytest, whatever happens
                try:
                    _kill_before_file_operation(k, rd.root)
                    save_final(rd, *args)
                    os._exit(0)
                finally:
                    os._exit(3)
            exited = os.pidfd_open(pid)  # readable once the child has exited
            try:
                if not select.select([exited], [], [], 120)[0]:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    pytest.fail(f"the final save hung in the copy killed at operation {k}")
            finally:
                os.close(exited)
            status = os.waitpid(pid, 0)[1]
            if os.WIFEXITED(status):
                assert os.WEXITSTATUS(status) == 0, f"the final save failed in the copy killed at operation {k}"
                return  # k passed the save's last operation: this copy saved everything, in rd.root
            assert os.WTERMSIG(status) == signal.SIGKILL
            os.rename(rd.root, crashed / f"{k:03d}")
            shutil.copytree(pristine, rd.root)
        pytest.fail("the final save never completed")

    monkeypatch.setattr(trainer_module, "save_final", save_with_kills)
    settings = {
        "quant": {"quant": "none"},
        "data": {"max_rows": 100},
        "train": {"max_steps": 4, "save_steps": 2, "eval_steps": 2, "gradient_checkpointing": False},
    }
    train(tiny_run_config(tiny_model_dir, run, **settings))
    monkeypatch.undo()

    ref = RunDir(run)
    ref_summary = json.loads(ref.summary.read_text())
    ref_adapter = load_file(ref.adapter / "adapter_model.safetensors")
    ref_metrics = [json.loads(x) for x in ref.metrics.read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in ref_metrics] == [
        (1, True),
        (2, True),
        (2, False),
        (3, True),
        (4, True),
        (4, False),
        (4, False),
    ]
    _, ref_tokenizer, _ = load_trained(run)
    sample = ref_tokenizer("def f(x):\n    return x").input_ids

    kinds, staged, seen = [], [], set()
    for folder in sorted(crashed.iterdir()):
        if _tree(folder) in seen:  # a kill before an operation that changed nothing on disk (makedirs of a folder)
            continue
        seen.add(_tree(folder))
        rd = RunDir(folder)
        runner = CliRunner()
        if rd.is_finished():  # killed while the checkpoints were being removed: the run is complete
            kinds.append("finished")
            rd.require_adapter()
            again = runner.invoke(app, ["train", "--resume", str(folder)])
            assert (
                again.exit_code == 2
                and again.output == f"error: {folder}: training already finished (adapter saved); nothing to resume\n"
            )
        else:
            kinds.append("adapter" if rd.adapter.exists() else "staging" if list(folder.glob(".tmp-*")) else "none")
            staged += [{p.name for p in d.iterdir()} for d in folder.glob(".tmp-adapter-*")]
            unusable = (
                f"{folder}: training did not finish (no train_summary.json); 'qtune train --resume {folder}' "
                "completes it"
                if kinds[-1] == "adapter"
                else f"{folder}: no trained adapter (expected "
                f"{folder}/adapter/adapter_config.json); did training finish?"
            )
            with pytest.raises(QtuneError) as err:
                rd.require_adapter()
            assert str(err.value) == unusable
            used = runner.invoke(app, ["generate", "--run", str(folder), "--max-new-tokens", "2", "hi"])
            assert used.exit_code == 2 and used.output == f"error: {unusable}\n"
            resumed = runner.invoke(app, ["train", "--resume", str(folder)])
            assert resumed.exit_code == 0, resumed.output
            assert f"resuming {folder} from {folder}/checkpoints/checkpoint-4" in resumed.output
            assert not rd.checkpoints.exists()
            summary = json.loads(rd.summary.read_text())
            assert summary["resumed_from_step"] == 4 and summary["tokens_per_s"] is None  # no step trained again
            for key in ("steps", "train_tokens", "first_train_loss", "final_train_loss", "trainable_params"):
                assert summary[key] == ref_summary[key], key
            assert summary["val_loss"] == pytest.approx(ref_summary["val_loss"], abs=1e-6)
            metrics = [json.loads(x) for x in rd.metrics.read_text().splitlines()]
            assert [(r["step"], r.get("loss")) for r in metrics] == [(r["step"], r.get("loss")) for r in ref_metrics]
            assert [r.get("eval_loss", 0) for r in metrics] == pytest.approx(
                [r.get("eval_loss", 0) for r in ref_metrics]
            )
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-")) == []
        adapter = load_file(rd.adapter / "adapter_model.safetensors")
        assert adapter.keys() == ref_adapter.keys()
        assert all(torch.equal(adapter[k], ref_adapter[k]) for k in adapter)
        _, tokenizer, _ = load_trained(folder)
        assert tokenizer("def f(x):\n    return x").input_ids == sample
        used = runner.invoke(app, ["generate", "--run", str(folder), "--max-new-tokens", "2", "hi"])
        assert used.exit_code == 0, used.output
    # every kind of state a kill can leave was met: before the staging folder, inside it (each file of adapter and
    # tokenizer), the adapter in place before the summary, the summary written before the checkpoints went
    assert kinds[0] == "none" and kinds[-1] == "finished" and "adapter" in kinds and kinds.count("staging") >= 5, kinds
    # among them the one of the report: the adapter's files written, the tokenizer's not yet
    assert any(
        {"adapter_config.json", "adapter_model.safetensors"} <= names and not any("token" in n for n in names)
        for names in staged
    ), staged
