"""The benchmark harness itself, on the tiny CPU shape: both recipes run and see the same first loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_tiny_runs_both_recipes(tmp_path):
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "run.sh"),
            "--tiny",
            "--rows",
            "nf4-r16-codealpaca-b4",
            "--out",
            str(tmp_path),
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "bench-tiny.json").read_text())["results"]
    by_recipe = {r["recipe"]: r for r in results}
    assert set(by_recipe) == {"stock", "qtune"} and not any("error" in r for r in results)
    stock, ours = by_recipe["stock"], by_recipe["qtune"]
    assert stock["padding_pct"] > 5 and ours["padding_pct"] == 0  # padded batches vs packing, on real lengths
    assert ours["losses"][0] == pytest.approx(stock["losses"][0], rel=1e-2)  # same batch, same seed, same math
    assert "| nf4-r16-codealpaca-b4 | qtune |" in (tmp_path / "bench-tiny.md").read_text()
