"""The progress bars: the training bar shows step N's own figures beside N; evaluation reports its progress."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qtune.data.tokenize import padding_collator
from qtune.train.callbacks import MetricsRecorder, ProgressBar
from qtune.train.validation import split_loss


def test_the_bar_shows_each_steps_own_loss_beside_it(tmp_path):
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl")
    bar = ProgressBar(recorder)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    args = SimpleNamespace(logging_steps=1)
    bar.on_train_begin(args, state, None)
    try:
        for step, loss in ((1, 2.5), (2, 1.25), (3, 0.625)):
            state.global_step = step
            bar.on_step_end(args, state, None)
            assert bar.bar.n == step - 1  # a step that logs moves the bar with its own record
            recorder.records.append({"step": step, "loss": loss, "learning_rate": 1e-3 * step, "tokens_per_s": 10.0})
            bar.on_log(args, state, None, logs={"loss": loss})
            assert bar.bar.n == step
            assert bar.bar.postfix == f"loss={loss:.4f}, lr={1e-3 * step:.2e}, tok_s=10"
    finally:
        bar.close()


def test_a_step_that_does_not_log_still_moves_the_bar(tmp_path):
    bar = ProgressBar(MetricsRecorder(tmp_path / "metrics.jsonl"))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=0)
    args = SimpleNamespace(logging_steps=2)
    bar.on_train_begin(args, state, None)
    try:
        state.global_step = 1
        bar.on_step_end(args, state, None)
        assert bar.bar.n == 1
    finally:
        bar.close()


def test_split_loss_reports_progress_once_per_sample(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, -100, 7, 8]}] * 3
    seen = []
    split_loss(model, rows, padding_collator(tokenizer), progress=seen.append)
    assert seen == [1, 2, 3]
