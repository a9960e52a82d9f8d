"""A tiny run directory for serving tests: config.yaml + a random (non-zero) LoRA adapter + a summary, no training."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtune.config import save_config
from qtune.model.adapters import lora_config
from qtune.rundir import RunDir

from conftest import tiny_run_config


def make_tiny_run(model_dir: str, out: Path, random_adapter: bool = True, **sections) -> RunDir:
    """Write a run directory whose adapter has random A and B (so it changes the base's output), or PEFT's own
    initialisation (B = 0, the base's output) when ``random_adapter`` is False."""
    rd = RunDir(Path(out))
    rd.root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_run_config(model_dir, rd.root, **sections)
    save_config(cfg, rd.config)
    torch.manual_seed(0)
    config = lora_config(cfg.lora)
    config.init_lora_weights = not random_adapter
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and random_adapter:
                p.mul_(0.5)
    model.save_pretrained(str(rd.adapter))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(rd.adapter))
    rd.summary.write_text("{}\n")  # the finished marker training writes last
    return rd
