"""Two CPU processes under torchrun (gloo): DDP equals one process with the same global batch; a killed rank
fails the launch instead of hanging."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import CODEALPACA

pytestmark = [
    pytest.mark.slow,  # each test launches training processes
    pytest.mark.skipif(
        shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
        reason="torchrun not installed beside this Python",
    ),
]
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _config(tmp_path, model_dir, steps, batch):
    cfg = {
        "model": {"name": model_dir},
        "quant": {"quant": "nf4"},
        "lora": {"r": 8, "lora_alpha": 16},
        "data": {"path": str(CODEALPACA), "max_rows": 300, "max_length": 128},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "learning_rate": 1e-2,
            "warmup_steps": 2,
            "eval_at_end": False,
            "seed": 0,
        },
    }
    path = tmp_path / f"cfg-{steps}-{batch}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def _train(launcher: list[str], config: Path, out: Path) -> list[str]:
    """The command line of ``qtune train --config CONFIG`` into ``out``, started by ``launcher``."""
    return [*launcher, "-m", "qtune.cli", "train", "--config", str(config), "--set", f"train.output_dir={out}"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _failure(stderr: str) -> str:
    """What a failed launch printed: its C++ and Python error lines first (a rank's own message scrolls out of
    the tail behind torchrun's report), then the tail."""
    marks = ("terminate called", "Error", "error:", "what():")
    return "\n".join([x for x in stderr.splitlines() if any(m in x for m in marks)][:20] + [stderr[-2000:]])


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    one = _run(_train([sys.executable], _config(tmp_path, tiny_model_dir, 10, 4), single))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(_train(TORCHRUN, _config(tmp_path, tiny_model_dir, 10, 2), ddp))
    assert two.returncode == 0, _failure(two.stderr)
    assert "global batch 4" in two.stdout and two.stdout.count("run directory:") == 1
    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 10
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < 1e-4
    assert len(list(tmp_path.rglob("adapter_model.safetensors"))) == 2  # one per run: ranks > 0 write nothing
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 4


def test_killed_rank_fails_the_launch_without_hanging(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _train(TORCHRUN, _config(tmp_path, tiny_model_dir, 2000, 2), run),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.5)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "qtune.cli" in " ".join(p.cmdline())]
    assert len(workers) == 2
    victim = workers[-1]
    victim.kill()
    out, _ = proc.communicate(timeout=180)  # raises TimeoutExpired if the launch hangs
    assert proc.returncode != 0
    assert "\nqtune.cli FAILED\n" in out
    root_cause = out[out.index("Root Cause (first observed failure):") :]
    assert f"  exitcode  : -9 (pid: {victim.pid})" in root_cause  # the killed rank, not the one torchrun stopped
    assert f"  traceback : Signal 9 (SIGKILL) received by PID {victim.pid}" in root_cause
