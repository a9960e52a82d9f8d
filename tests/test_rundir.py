"""Run directories are qtune's own: --overwrite replaces only a run qtune wrote, and one process writes a run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import save_config
from qtune.errors import QtuneError
from qtune.rundir import RunDir, RunLock, build_dir_once
from qtune.train.trainer import make_run_dir

from conftest import CODEALPACA, tiny_run_config

SRC = Path(__file__).resolve().parents[1] / "src"


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")


def contents(root: Path) -> dict:
    """Every file and folder under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def user_folder(root: Path) -> Path:
    """A project folder of the user's own: a config.yaml of theirs, notes and data."""
    (root / "data").mkdir(parents=True)
    (root / "config.yaml").write_text("# my own settings\nlr: 3\n")
    (root / "notes.md").write_text("experiments to try\n")
    (root / "data" / "rows.json").write_text(CODEALPACA.read_text())
    return root


def old_run(root: Path) -> Path:
    """A finished run written by a qtune before run directories were marked."""
    for name in ("config.yaml", "metrics.jsonl", "versions.json", "train_summary.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}\n")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}\n")
    return root


def marked_run(root: Path) -> Path:
    old_run(root)
    RunDir(root).write_marker()
    return root


def train_args(tiny_model_dir, output_dir, *extra):
    return ["train", "--set", f"model.name={tiny_model_dir}", "--set", f"train.output_dir={output_dir}", *extra]


@pytest.mark.parametrize(
    "case",
    [
        "config inside",
        "no marker",
        "old run",
        "cwd",
        "parent of cwd",
        "home",
        "data inside",
        "foreign file",
        "foreign file inside",
        "symlink",
    ],
)
def test_overwrite_refuses_what_qtune_did_not_write(case, tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "project"
    extra = ["--overwrite"]
    output_dir = str(folder)
    if case in ("config inside", "no marker"):
        user_folder(folder)
        if case == "config inside":  # qtune's own config file, in the folder to be replaced
            save_config(tiny_run_config(tiny_model_dir, folder), folder / "run.yaml")
            extra += ["--config", str(folder / "run.yaml")]
        expected = {
            "config inside": f"it holds {folder / 'run.yaml'}, which this run reads; delete it yourself",
            "no marker": "no .qtune-run marker, so not a run directory qtune created",
        }[case]
    elif case == "old run":
        old_run(folder)
        expected = (
            "no .qtune-run marker, so not a run directory qtune created (or one from an older qtune); "
            "delete it yourself"
        )
    elif case in ("cwd", "parent of cwd", "home"):
        marked_run(folder)  # even a real run: never the folder the user stands in, or their home
        (folder / "sub").mkdir()
        where = {"cwd": folder, "parent of cwd": folder / "sub", "home": tmp_path}[case]
        monkeypatch.chdir(where)
        if case == "cwd":
            output_dir, expected = ".", "it is the current directory"
        elif case == "parent of cwd":
            expected = f"it holds the current directory ({(folder / 'sub').resolve()})"
        else:
            monkeypatch.setenv("HOME", str(folder))
            expected = "it is the home directory"
    elif case == "data inside":
        marked_run(folder)
        (folder / "data" / "rows.json").parent.mkdir()
        (folder / "data" / "rows.json").write_text(CODEALPACA.read_text())
        extra += ["--set", f"data.path={folder / 'data' / 'rows.json'}"]
        expected = f"it holds {folder / 'data' / 'rows.json'}, which this run reads"
    elif case == "foreign file":
        marked_run(folder)
        (folder / "notes.md").write_text("mine\n")
        (folder / "plots").mkdir()
        expected = (
            "it holds notes.md, plots/, which qtune did not write; delete it yourself or choose another "
            "train.output_dir"
        )
    elif case == "foreign file inside":  # the user's files inside qtune's own folders are theirs too
        marked_run(folder)
        (folder / "adapter" / "mynotes.txt").write_text("precious\n")
        (folder / "data" / "mystuff").mkdir(parents=True)
        (folder / "data" / "mystuff" / "x").write_text("p\n")
        expected = "it holds adapter/mynotes.txt, data/mystuff/x, which qtune did not write"
    else:  # the run's data folder is a link to the user's own data
        marked_run(folder)
        user_folder(tmp_path / "mine")
        (folder / "data").symlink_to(tmp_path / "mine" / "data")
        expected = "it holds data/, which qtune did not write"
    before = contents(tmp_path)
    result = CliRunner().invoke(app, train_args(tiny_model_dir, output_dir, *extra))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith(f"error: {output_dir}: --overwrite refused: ") and expected in lines[0]
    ), lines
    assert contents(tmp_path) == before  # every file intact, nothing added


def test_without_overwrite_a_folder_with_files_is_refused(tiny_model_dir, tmp_path):
    folder = user_folder(tmp_path / "project")
    before = contents(tmp_path)
    result = CliRunner().invoke(app, train_args(tiny_model_dir, folder))
    assert result.exit_code == 2
    assert result.output == (
        f"error: {folder}: run directory exists and is not empty; pass --overwrite or choose another train.output_dir\n"
    )
    assert contents(tmp_path) == before
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, train_args(tiny_model_dir, tmp_path / "file"))
    assert (
        result.output == f"error: {tmp_path / 'file'}: exists and is not a directory; choose another train.output_dir\n"
    )


def test_overwrite_replaces_a_run_qtune_wrote(tmp_path):
    rd, created = make_run_dir(tmp_path / "run", False, lock := RunLock(tmp_path / "run"))
    assert created and lock.held
    assert sorted(p.name for p in rd.root.iterdir()) == [".qtune-lock", ".qtune-run"]
    assert json.loads(rd.marker.read_text())["version"] == 1
    lock.release()
    for path in (
        rd.config,
        rd.metrics,
        rd.versions,
        rd.summary,
        rd.eval,
        rd.humaneval / "adapter.json",
        rd.adapter / "adapter_config.json",
        rd.data / "splits" / "train" / "data-00000-of-00001.arrow",
        rd.checkpoints / "checkpoint-2" / "x",
        rd.root / ".tmp-adapter-abc" / "x",
        rd.root / ".tmp-train_summary.json",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    outside = tmp_path / "kept.txt"
    outside.write_text("mine")
    rd, created = make_run_dir(rd.root, True, lock := RunLock(rd.root))
    assert created and lock.held
    assert sorted(p.name for p in rd.root.iterdir()) == [".qtune-lock", ".qtune-run"]
    assert outside.read_text() == "mine"
    lock.release()


def test_a_failed_start_leaves_an_empty_folder_it_did_not_create(tiny_model_dir, tmp_path, monkeypatch):
    """Data that yields no rows stops the run before training; a folder the user made stays (empty)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"instruction": "", "output": ""}) + "\n")
    result = CliRunner().invoke(app, train_args(tiny_model_dir, ".", "--set", f"data.path={tmp_path / 'empty.jsonl'}"))
    assert result.exit_code == 2 and "no usable rows" in result.output
    assert folder.is_dir() and list(folder.iterdir()) == []
    result = CliRunner().invoke(
        app, train_args(tiny_model_dir, tmp_path / "new", "--set", f"data.path={tmp_path / 'empty.jsonl'}")
    )
    assert result.exit_code == 2 and not (tmp_path / "new").exists()


HOLD = (
    "import sys, time; from qtune.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(600)"
)


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(QtuneError) as refused:
            RunLock(tmp_path).acquire()
        assert re.fullmatch(
            rf"{tmp_path}: in use by qtune process {holder.pid} \(started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); "
            "wait for it to finish or stop it",
            str(refused.value),
        ), str(refused.value)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # kill -9 left no stale lock
    assert json.loads((tmp_path / ".qtune-lock").read_text())["pid"] == os.getpid()
    lock.release()
    RunLock(tmp_path).acquire()  # released: free again


GATED_TRAINING = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from qtune.config import load_config
from qtune.train.trainer import train

class Gate(TrainerCallback):
    '''Waits at optimizer step 3 (step 2 logged and checkpointed) until the test says go: the run is live,
    mid-training, while others try it.'''
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            Path(sys.argv[2], "paused").touch()
            deadline = time.monotonic() + 300
            while not Path(sys.argv[2], "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

train(load_config(sys.argv[1]), callbacks=(Gate(),))
"""


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_trains(tiny_model_dir, tmp_path):
    run, steps = tmp_path / "run", 6
    cfg_file = tmp_path / "run.yaml"
    save_config(
        tiny_run_config(
            tiny_model_dir,
            run,
            quant={"quant": "none"},
            data={"max_rows": 100},
            train={"max_steps": steps, "save_steps": 2, "eval_at_end": False},
        ),
        cfg_file,
    )
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(
            [sys.executable, "-c", GATED_TRAINING, str(cfg_file), str(tmp_path)],
            env=child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists():
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = contents(run)
        assert "checkpoints/checkpoint-2/trainer_state.json" in before
        message = (
            rf"error: {run}: in use by qtune process {first.pid} \(started [\d: -]+\); "
            r"wait for it to finish or stop it\n"
        )
        for args in (
            ["train", "--resume", str(run)],
            ["train", "--config", str(cfg_file), "--overwrite"],
            ["train", "--config", str(cfg_file)],
        ):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2 and re.fullmatch(message, result.output), (args, result.output)
        assert contents(run) == before  # the refused --overwrite deleted nothing under the live run
    finally:
        (tmp_path / "go").touch()
        first.wait(timeout=300)
    assert first.returncode == 0, log.read_text()[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert json.loads((run / "train_summary.json").read_text())["steps"] == steps
    # finished and no longer held: --overwrite replaces it
    result = CliRunner().invoke(app, ["train", "--config", str(cfg_file), "--overwrite", "--set", "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- export --overwrite: the same rule for the merged model and the GGUF file ------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    from serve_fixtures import make_tiny_run

    return make_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("export") / "run")


@pytest.mark.slow
def test_export_overwrite_replaces_only_its_own_output(finished_run, tmp_path, monkeypatch):
    runner = CliRunner()
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["export", "--run", str(finished_run.root), "--merged", str(merged)]).exit_code == 0
    listed = json.loads((merged / "qtune.json").read_text())["files"]
    assert listed == sorted(p.name for p in merged.iterdir()) and "model.safetensors" in listed
    again = runner.invoke(app, ["export", "--run", str(finished_run.root), "--merged", str(merged), "--overwrite"])
    assert again.exit_code == 0, again.output  # its own export: replaced
    assert sorted(p.name for p in merged.iterdir()) == listed and not list(tmp_path.glob(".tmp-*"))

    shutil.copytree(merged, tmp_path / "cwd")  # an export of qtune's own, but the folder the user stands in
    monkeypatch.chdir(tmp_path / "cwd")
    (merged / "notes.md").write_text("mine\n")
    user_folder(tmp_path / "project")
    cases = {
        merged: "it holds notes.md, which qtune did not write; delete it yourself or choose another --merged",
        tmp_path / "project": "no readable qtune.json, so not a merged model qtune exported",
        Path("."): "it is the current directory",
    }
    for out, expected in cases.items():
        before = contents(tmp_path)
        result = runner.invoke(app, ["export", "--run", str(finished_run.root), "--merged", str(out), "--overwrite"])
        assert result.exit_code == 2 and result.output.startswith(f"error: {out}: --overwrite refused: {expected}"), (
            result.output
        )
        assert len(result.output.splitlines()) == 1 and contents(tmp_path) == before


def test_export_into_the_empty_current_directory_keeps_it(finished_run, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    result = CliRunner().invoke(app, ["export", "--run", str(finished_run.root), "--merged", "."])
    assert result.exit_code == 0, result.output
    assert here.stat().st_ino == inode and (here / "qtune.json").is_file() and (here / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_gguf_overwrite_replaces_only_a_gguf_file(finished_run, tmp_path):
    runner = CliRunner()
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes, not a model\n")
    result = runner.invoke(app, ["export", "--run", str(finished_run.root), "--gguf", str(notes), "--overwrite"])
    assert result.exit_code == 2
    assert (
        result.output
        == f"error: {notes}: --overwrite refused: not a GGUF file; delete it yourself or choose another --gguf\n"
    )
    assert notes.read_text() == "my notes, not a model\n"
    result = runner.invoke(app, ["export", "--run", str(finished_run.root), "--gguf", str(tmp_path), "--overwrite"])
    assert result.exit_code == 2 and result.output.startswith(
        f"error: {tmp_path}: is a directory; --gguf takes the file"
    )
    out = tmp_path / "model.gguf"
    for _ in range(2):  # written, then replaced
        result = runner.invoke(app, ["export", "--run", str(finished_run.root), "--gguf", str(out), "--overwrite"])
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:4] == b"GGUF" and not list(tmp_path.glob(".tmp-*"))


def test_not_a_run_directory_is_one_message_wherever_it_is_found(tmp_path):
    from qtune.train.checkpoints import resume_point

    rd = RunDir(tmp_path / "empty")
    expected = f"{rd.root}: not a qtune run directory (no config.yaml)"
    with pytest.raises(QtuneError) as e:
        rd.require_adapter()
    assert str(e.value) == expected
    with pytest.raises(QtuneError) as e:
        resume_point(rd)
    assert str(e.value) == f"{expected}; nothing to resume"
    result = CliRunner().invoke(app, ["train", "--resume", str(rd.root)])
    assert (result.exit_code, result.output) == (2, f"error: {expected}; nothing to resume\n")
    result = CliRunner().invoke(app, ["eval", "loss", "--run", str(rd.root)])
    assert (result.exit_code, result.output) == (2, f"error: {expected}\n")


def test_build_dir_once_builds_whole_or_not_at_all_and_lets_a_concurrent_build_win(tmp_path):
    target = tmp_path / "cache" / "model"
    calls = []

    def failing(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        build_dir_once(target, failing)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half-built copy, no temporary left

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    assert build_dir_once(target, build) == target and (target / "config.json").read_text() == "{}"
    assert build_dir_once(target, build) == target and len(calls) == 1  # complete: never built again

    other = tmp_path / "cache" / "other"

    def raced(tmp: Path) -> None:  # another process renames its own build into place first
        other.mkdir()
        (other / "config.json").write_text('{"first": true}')
        (other / "more").write_text("x")  # a non-empty directory: this process's rename fails
        (tmp / "config.json").write_text("{}")

    assert build_dir_once(other, raced) == other
    assert (other / "config.json").read_text() == '{"first": true}'  # the winner's copy stands
    assert sorted(p.name for p in other.parent.iterdir()) == ["model", "other"]  # the loser's was removed
