"""Every command that writes, run against a read-only output directory and a full disk: one ``error:`` line
naming the path, exit status 2, no traceback (qtune.cli.main's handler). Needs root and mount(8) (tmpfs and
read-only bind mounts); skipped elsewhere."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from qtune.cli import main
from qtune.config import default_humaneval_path
from qtune.rundir import RunDir
from qtune.train.trainer import train

from conftest import tiny_run_config

HUMANEVAL = default_humaneval_path()
REASON = {"ro": "Read-only file system", "full": "No space left on device"}


def _mount(*args) -> bool:
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/qtune-mount-probe-{uuid.uuid4().hex[:8]}")
    probe.mkdir()
    try:
        ok = _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", probe)
        if ok:
            subprocess.run(["umount", probe], check=True)
        return ok
    finally:
        probe.rmdir()


pytestmark = pytest.mark.skipif(not _can_mount(), reason="needs root and permission to mount a tmpfs")


@contextlib.contextmanager
def unwritable(kind: str, base: Path, content: Path | None = None):
    """A folder on which every write fails: ``kind`` "ro" (read-only) or "full" (a tmpfs with no space left).
    ``content`` (a folder) is made available inside it under its own name first."""
    mnt = base / f"{kind}-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    try:
        if kind == "ro" and content is None:
            assert _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", mnt)
        elif kind == "ro":
            inner = mnt / content.name
            inner.mkdir()
            assert _mount("--bind", mnt, mnt) and _mount("-o", "remount,bind,ro", mnt)
            assert _mount("--bind", content, inner) and _mount("-o", "remount,bind,ro", inner)
        else:
            size = (
                64 * 1024
                if content is None
                else sum(f.stat().st_size for f in content.rglob("*") if f.is_file()) + 2**22
            )
            assert _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt)
            if content is not None:
                shutil.copytree(content, mnt / content.name)
            with contextlib.suppress(OSError), open(mnt / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
            assert os.statvfs(mnt).f_bavail == 0
        yield mnt
    finally:
        # lazy: detaches the mount and those inside it now, even while a library still maps a file there
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


def run_main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["qtune", *map(str, argv)])
    monkeypatch.delenv("QTUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished run on the tiny model (2 steps) and a one-run sweep directory whose result is that run."""
    from qtune.study.sweep import Run, collect_result

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_run_config(
        tiny_model_dir,
        root / "run",
        data={"max_rows": 60},
        train={"max_steps": 2, "warmup_steps": 0, "gradient_checkpointing": False},
    )
    train(cfg)
    sweep = root / "sweep"
    (sweep / "results").mkdir(parents=True)
    res = collect_result(Run("a", {}, {}), RunDir(root / "run"), 0, 1.0, "", None)
    (sweep / "results" / "a.json").write_text(json.dumps(res))
    samples = root / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return False\n"}) + "\n")
    problems = root / "problems.jsonl"
    import gzip

    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
        problems.write_text(f.readline())
    return {"run": root / "run", "sweep": sweep, "samples": samples, "problems": problems, "cfg": cfg}


def _train_args(t, out):
    cfg = t["cfg"]
    return [
        "train",
        "--set",
        f"model.name={cfg.model.name}",
        "--set",
        f"data.path={cfg.data.path}",
        "--set",
        "data.max_rows=40",
        "--set",
        "data.max_length=128",
        "--set",
        "train.max_steps=1",
        "--set",
        "train.warmup_steps=0",
        "--set",
        f"train.output_dir={out / 'run'}",
    ]


def _sweep_args(t, out):
    spec = out.parent / f"sweep-{out.name}.yaml"
    cfg_file = out.parent / f"base-{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(t["cfg"].model_dump(mode="json")))
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(cfg_file),
                "output_dir": str(out / "sweep"),
                "axes": {"lora.r": [4]},
                "set": {"train.max_steps": 1},
            }
        )
    )
    return ["sweep", "--config", spec]


# command -> (what must already exist in the output folder, argv given the folder, the path named in the error)
COMMANDS = {
    "train": (None, _train_args, lambda t, out: out / "run"),
    "data prepare": (
        None,
        lambda t, out: [
            "data",
            "prepare",
            "--data",
            t["cfg"].data.path,
            "--model",
            t["cfg"].model.name,
            "--max-length",
            128,
            "--out",
            out / "data",
        ],
        lambda t, out: out / "data",
    ),
    "eval loss": (
        "run",
        lambda t, out: ["eval", "loss", "--run", out / "run", "--splits", "val", "--json"],
        lambda t, out: out / "run" / "eval.json",
    ),
    "eval humaneval": (
        "run",
        lambda t, out: [
            "eval",
            "humaneval",
            "--run",
            out / "run",
            "--problems",
            t["problems"],
            "--max-new-tokens",
            4,
            "--json",
        ],
        lambda t, out: out / "run" / "humaneval",
    ),
    "eval humaneval --samples-file": (
        None,
        lambda t, out: [
            "eval",
            "humaneval",
            "--samples-file",
            t["samples"],
            "--problems",
            t["problems"],
            "--results",
            out / "results.jsonl",
            "--json",
        ],
        lambda t, out: out / "results.jsonl",
    ),
    "export --merged": (
        None,
        lambda t, out: ["export", "--run", t["run"], "--merged", out / "merged"],
        lambda t, out: out / "merged",
    ),
    "export --gguf": (
        None,
        lambda t, out: ["export", "--run", t["run"], "--gguf", out / "m.gguf"],
        lambda t, out: out / "m.gguf",
    ),
    "sweep": (None, _sweep_args, lambda t, out: out / "sweep"),
    "report": ("sweep", lambda t, out: ["report", out / "sweep"], lambda t, out: out / "sweep"),
}


SCORE_KEPT = {
    ("eval humaneval --samples-file", "ro"),
    ("eval humaneval --samples-file", "full"),
    ("eval humaneval", "full"),
}
"""HumanEval never loses a score for its files: per-sample results that cannot be written are a warning, the score is
printed (a run directory that is read-only is refused before generating, as an error)."""


@pytest.mark.slow  # about 20 cases, each runs a command against a mounted tmpfs
@pytest.mark.parametrize("kind", ["ro", "full"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_unwritable_output_is_one_error_line(trained, tmp_path, monkeypatch, capsys, command, kind):
    needs, argv, named = COMMANDS[command]
    with unwritable(kind, tmp_path, trained[needs] if needs else None) as out:
        code, stdout, stderr = run_main(monkeypatch, capsys, *argv(trained, out))
        if (command, kind) in SCORE_KEPT:
            assert "Traceback" not in stderr + stdout and code == 0, stderr
            warnings = stderr.splitlines()
            assert len(warnings) == 1 and warnings[0].startswith(f"warning: {named(trained, out)}"), stderr
            assert f"cannot write ({REASON[kind]})" in warnings[0]
            assert "pass@1" in json.loads(stdout)
            return
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in stderr + stdout
        assert code == 2, stderr
        assert len(errors) == 1 and stderr == errors[0] + "\n", stderr
        path = re.escape(str(named(trained, out)))
        assert re.fullmatch(rf"error: {path}\S*: cannot write \({REASON[kind]}\)", errors[0]), errors[0]


def test_a_bug_is_one_line_with_a_hint_and_status_1(monkeypatch, capsys):
    import qtune.model.memory as memory

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(memory, "load_model_config", broken)
    code, _, stderr = run_main(monkeypatch, capsys, "estimate")
    assert code == 1
    assert stderr == (
        "error: internal error: ZeroDivisionError: division by zero (a bug in qtune; rerun with "
        "QTUNE_DEBUG=1 for the traceback)\n"
    )
    monkeypatch.setattr(sys, "argv", ["qtune", "estimate"])
    monkeypatch.setenv("QTUNE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main()


def test_an_oserror_without_a_file_name_names_the_full_output(monkeypatch, capsys, tmp_path):
    """A full disk fails in write(), whose OSError names no file: the output on the full file system is named, and
    no path at all when the output's file system is fine (the failed write was elsewhere, e.g. stdout)."""
    import errno

    import qtune.study.report as report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "write_report", full)
    code, _, stderr = run_main(monkeypatch, capsys, "report", tmp_path / "sweep")
    assert (code, stderr) == (2, "error: cannot write (No space left on device)\n")
    with unwritable("full", tmp_path) as out:
        code, _, stderr = run_main(monkeypatch, capsys, "report", out / "sweep")
    assert (code, stderr) == (2, f"error: {out / 'sweep'}: cannot write (No space left on device)\n")
