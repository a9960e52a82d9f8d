"""Compute dtype on CPU (issue 16): bf16 is detected from the CPU flags and is a switch (``compute_dtype:
bfloat16``; auto stays fp32 on CPU, as measured), and a bf16 run keeps its LoRA weights, their gradients and the
AdamW states in float32 while its matmuls run in bf16 (mixed precision)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from qtune.config import QuantConfig
from qtune.model import quantize
from qtune.model.quantize import compute_dtype, cpu_bf16_fast, load_kwargs, precision_warnings
from qtune.train.trainer import train, training_arguments

from conftest import tiny_run_config

X86_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd crc32\n"


@pytest.mark.parametrize(
    ("cpuinfo", "fast"), [(X86_AMX, True), (X86_AVX2, False), (ARM_BF16, True), (ARM_OLD, False), (None, False)]
)
def test_bf16_is_detected_from_the_cpu_flags(tmp_path, cpuinfo, fast):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert cpu_bf16_fast(path) is fast


def test_auto_is_float32_on_a_cpu_bf16_a_switch(monkeypatch):
    """bf16 trained no faster than fp32 on this project's AMX CPU (bench/RESULTS.md): auto keeps fp32 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype(QuantConfig(quant="nf4")) == torch.float32
    assert compute_dtype(QuantConfig(quant="nf4", compute_dtype="bfloat16")) == torch.bfloat16
    assert compute_dtype(QuantConfig(quant="none", compute_dtype="bfloat16")) == torch.bfloat16
    assert load_kwargs(QuantConfig(quant="none", compute_dtype="bfloat16")) == {"dtype": torch.float32}
    assert load_kwargs(QuantConfig(quant="nf4", compute_dtype="bfloat16"))["dtype"] == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, native):
    monkeypatch.setattr(quantize, "cpu_bf16_fast", lambda: native)
    warnings = precision_warnings(QuantConfig(quant="nf4", compute_dtype="bfloat16"), cuda=False)
    expected = [
        "bfloat16 compute on a CPU without native bf16 matmuls (no amx_bf16, avx512_bf16 or bf16 flag): "
        "it is emulated and slower than quant.compute_dtype float32"
    ]
    assert warnings == ([] if native else expected)
    assert precision_warnings(QuantConfig(quant="nf4"), cuda=False) == []


class _Probe(TrainerCallback):
    """Records, after each optimizer step, the dtypes of trainable weights, their optimizer states, and of one
    LoRA-wrapped projection's output in the forward pass."""

    def __init__(self):
        self.weights: set[torch.dtype] = set()
        self.states: set[torch.dtype] = set()
        self.outputs: set[torch.dtype] = set()
        self.steps = 0

    def on_train_begin(self, args, state, control, model=None, **kw):
        proj = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
        proj.register_forward_hook(lambda _m, _i, out: self.outputs.add(out.dtype))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.steps += 1
        self.weights |= {p.dtype for p in model.parameters() if p.requires_grad}
        for group in optimizer.state.values():
            self.states |= {v.dtype for k, v in group.items() if k in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize(
    ("quant", "dtype", "matmul"),
    [("nf4", "bfloat16", torch.bfloat16), ("none", "bfloat16", torch.bfloat16), ("nf4", "float32", torch.float32)],
)
def test_a_bf16_run_keeps_lora_weights_and_adamw_states_in_float32(tiny_model_dir, tmp_path, quant, dtype, matmul):
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        quant={"quant": quant, "compute_dtype": dtype},
        train={"max_steps": 2, "warmup_steps": 1, "eval_at_end": False, "gradient_checkpointing": False},
    )
    assert training_arguments(cfg, tmp_path).bf16 is (matmul == torch.bfloat16)  # the Trainer's autocast, on CPU too
    probe = _Probe()
    summary = train(cfg, callbacks=(probe,))
    assert probe.steps == 2
    assert probe.weights == {torch.float32}
    assert probe.states == {torch.float32}
    assert probe.outputs == {matmul}  # the dtype the projections computed in
    assert summary["compute_dtype"] == str(matmul).removeprefix("torch.")  # recorded in train_summary.json
    assert math.isfinite(summary["first_train_loss"]) and summary["first_train_loss"] > 0
