"""TrainSummary: the keys and values of train_summary.json, written and read back."""

import json
from dataclasses import replace

import pytest

from qtune.errors import QtuneError
from qtune.train.summary import TrainSummary

CPU_RUN = {
    "run_dir": "runs/demo",
    "steps": 20,
    "world_size": 1,
    "global_batch_size": 8,
    "wall_time_s": 12.5,
    "train_tokens": 4096,
    "tokens_per_s": 327.68,
    "first_train_loss": 2.5,
    "final_train_loss": 1.25,
    "val_loss": 1.5,
    "val_perplexity": 4.4817,
    "val_tokens": 512,
    "trainable_params": 1234,
    "total_params": 56789,
    "peak_rss_gib": 1.5,
}


def test_a_cpu_run_writes_its_keys_in_order_without_the_unset_ones():
    s = TrainSummary(**CPU_RUN)
    assert s.peak_allocated_gib is None and s.resumed_from_step is None
    assert list(s.to_json().items()) == list(CPU_RUN.items())


def test_cuda_and_resume_fields_follow_when_set():
    s = replace(TrainSummary(**CPU_RUN), peak_allocated_gib=0.75, peak_reserved_gib=1.0, resumed_from_step=10)
    assert list(s.to_json())[-4:] == ["peak_rss_gib", "peak_allocated_gib", "peak_reserved_gib", "resumed_from_step"]
    assert s.to_json()["resumed_from_step"] == 10 and s.to_json()["peak_reserved_gib"] == 1.0


def test_from_json_reads_back_what_to_json_wrote(tmp_path):
    s = replace(TrainSummary(**CPU_RUN), val_loss=None, tokens_per_s=None, resumed_from_step=4)
    path = tmp_path / "train_summary.json"
    path.write_text(json.dumps(s.to_json(), indent=2))
    assert TrainSummary.read(path) == s
    assert TrainSummary.from_json({**CPU_RUN, "from_a_later_version": 1}) == TrainSummary(**CPU_RUN)


def test_a_file_that_is_not_a_summary_is_one_error_line(tmp_path):
    with pytest.raises(QtuneError, match=r"^not a qtune training summary \(no steps, val_loss\)$"):
        TrainSummary.from_json({k: v for k, v in CPU_RUN.items() if k not in ("steps", "val_loss")})
    with pytest.raises(QtuneError, match=r"not a qtune training summary \(a JSON list, not an object\)"):
        TrainSummary.from_json([1])  # type: ignore[arg-type]
    bad = tmp_path / "train_summary.json"
    bad.write_text("{")
    with pytest.raises(QtuneError, match=rf"^{bad}: not JSON "):
        TrainSummary.read(bad)
    with pytest.raises(QtuneError, match=rf"^{tmp_path / 'none.json'}: cannot read \(No such file or directory\)$"):
        TrainSummary.read(tmp_path / "none.json")


def test_the_sweep_copies_only_summary_fields():
    from dataclasses import fields

    from qtune.study.results import SUMMARY_KEYS

    assert set(SUMMARY_KEYS) <= {f.name for f in fields(TrainSummary)}
