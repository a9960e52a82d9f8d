"""The memory model: exact weight, quantization-constant and LoRA terms on a real tiny model; published figures."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import LoraSettings, ModelConfig, QuantConfig
from qtune.errors import QtuneError
from qtune.model.adapters import attach_lora
from qtune.model.load import load_model
from qtune.model.memory import ALLOCATOR_OVERHEAD, GIB, TrainShape, count_model, estimate, fit

LLAMA2_7B = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-2-7b"
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
STOCK = dict(upcast_frozen=True, lora_dropout=0.05, batch_size=1)
"""The stock QLoRA recipe the published figures were measured with: PEFT's fp32 upcast of the frozen 16-bit
parameters, LoRA dropout 0.05, one sequence per micro-batch (qtune's own defaults differ: TrainShape())."""


@pytest.fixture(scope="module")
def tiny_counts(tiny_model_dir):
    return count_model(AutoConfig.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def llama7b():
    return count_model(AutoConfig.from_pretrained(LLAMA2_7B))


def _quant_state_bytes(model) -> int:
    """Bytes of every tensor bitsandbytes keeps beside the packed weights (per layer, shared or not)."""
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            tensors = [qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in tensors)
        scb = getattr(p, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


@pytest.mark.parametrize("quant, dq", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False), ("none", False)])
def test_weights_and_constants_match_the_loaded_model_exactly(tiny_model_dir, tiny_counts, quant, dq):
    model = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant=quant, double_quant=dq))
    est = estimate(tiny_counts, TrainShape(quant=quant, double_quant=dq, device="cpu"))
    assert est.term("frozen_weights").bytes == model.get_memory_footprint()
    assert est.term("quant_constants").bytes == _quant_state_bytes(model)
    stored = sum(p.numel() for p in model.parameters())
    if quant in ("nf4", "fp4"):  # 4-bit weights are packed two per byte, so fewer stored elements
        assert stored < est.total_params
    else:
        assert stored == est.total_params


@pytest.mark.parametrize("lora", [
    LoraSettings(r=8),
    LoraSettings(r=4, target_modules=["q_proj", "v_proj"]),
    LoraSettings(r=2, use_dora=True),
])
def test_lora_terms_match_peft_exactly(tiny_model_dir, tiny_counts, lora):
    model = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4"))
    model = attach_lora(model, lora, quantized=True, gradient_checkpointing=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tm = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    est = estimate(tiny_counts, TrainShape(r=lora.r, target_modules=tm, use_dora=lora.use_dora, device="cpu"))
    assert est.trainable_params == model.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable)
    assert est.term("lora_params").bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert est.term("optimizer_states").bytes == 2 * est.term("gradients").bytes == 2 * est.term("lora_params").bytes


def test_llama2_7b_parameter_counts(llama7b):
    # 32 layers x (4 x 4096^2 + 3 x 4096 x 11008) linear weights; embeddings + lm_head 2 x 32000 x 4096; 65 norms
    assert sum(o * i for _, o, i in llama7b.quantizable) == 6_476_005_376
    assert llama7b.total_params == 6_738_415_616
    assert estimate(llama7b, TrainShape(r=16)).trainable_params == 39_976_960


# (shape, published figure in GiB): the measurements on an H200 (transformers 5.17, PEFT 0.21, bnb 0.50.2)
PUBLISHED = [
    ("fp32 full fine-tuning, Adam: 4 x 28 GB", dict(quant="none", r=0, compute_dtype="float32"), 112e9 / GIB),
    ("NF4 r16 512x1 checkpointing", dict(quant="nf4", r=16, seq_len=512, batch_size=1), 5.22),
    ("NF4 r8 1024x4 checkpointing", dict(quant="nf4", r=8, seq_len=1024, batch_size=4), 8.85),
    ("bf16 LoRA r16 512x1 checkpointing", dict(quant="bf16", r=16, seq_len=512, batch_size=1), 13.45),
]


@pytest.mark.parametrize("label, shape, published", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_peaks_within_15_percent(llama7b, label, shape, published):
    peak = estimate(llama7b, TrainShape(**(STOCK | shape))).peak_gib
    assert abs(peak / published - 1) <= 0.15, f"{label}: predicted {peak:.2f} GiB vs {published:.2f}"


def test_nf4_double_quant_weights_after_load(llama7b):
    est = estimate(llama7b, TrainShape(quant="nf4", double_quant=True))
    after_load = (est.term("frozen_weights").bytes + est.term("quant_constants").bytes) / GIB
    assert after_load == pytest.approx(3.61, rel=0.01)
    # double quantization saves about 0.373 bit per weight (QLoRA: 0.5 -> 0.127 bit)
    single = estimate(llama7b, TrainShape(quant="nf4", double_quant=False)).term("quant_constants").bytes
    saved_bits = 8 * (single - est.term("quant_constants").bytes) / sum(o * i for _, o, i in llama7b.quantizable)
    assert saved_bits == pytest.approx(0.373, abs=0.002)


def test_skip_modules_are_counted_unquantized_as_loaded(tiny_model_dir):
    q = QuantConfig(quant="nf4", skip_modules=["down_proj"])
    model = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), q)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(model.lm_head) is torch.nn.Linear  # still left unquantized beside the named modules
    counts = count_model(AutoConfig.from_pretrained(tiny_model_dir), ("down_proj",))
    assert not any(name.endswith("down_proj") for name, _, _ in counts.quantizable)
    est = estimate(counts, TrainShape(quant="nf4", device="cpu"))
    assert est.term("frozen_weights").bytes == model.get_memory_footprint()
    assert est.term("quant_constants").bytes == _quant_state_bytes(model)
    with pytest.raises(QtuneError, match="quant.skip_modules: 'down_prj' names no linear layer"):
        load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4", skip_modules=["down_prj"]))
    from qtune.config import RunConfig

    with pytest.raises(ValueError, match="quant.skip_modules needs a quantized base"):
        RunConfig.model_validate({"quant": {"quant": "fp16", "skip_modules": ["down_proj"]}})


def test_qtune_switches_remove_the_upcast_and_shrink_the_logits(llama7b):
    stock = TrainShape(quant="nf4", r=16, seq_len=512, **STOCK)
    est = estimate(llama7b, stock)
    no_upcast = estimate(llama7b, replace(stock, upcast_frozen=False))
    assert est.term("kbit_fp32_upcast").bytes == 2 * llama7b.kept_params and no_upcast.term("kbit_fp32_upcast").bytes == 0
    assert est.term("autocast_copies").bytes == 2 * llama7b.lm_head_params and no_upcast.term("autocast_copies").bytes == 0
    # the residual stream stays bf16: each layer input saved under checkpointing halves
    assert no_upcast.term("activations").bytes == est.term("activations").bytes // 2
    quarter = estimate(llama7b, replace(stock, logit_fraction=0.25))
    assert quarter.term("logits_loss").bytes == est.term("logits_loss").bytes // 4 == 3 * 512 * 32000


def test_checkpointing_and_batch_move_the_peak_the_right_way(llama7b):
    base = TrainShape(**(STOCK | dict(quant="nf4", r=16, seq_len=1024, batch_size=2)))
    with_gc = estimate(llama7b, base)
    without = estimate(llama7b, replace(base, gradient_checkpointing=False))
    assert without.term("activations").bytes > 10 * with_gc.term("activations").bytes
    assert estimate(llama7b, replace(base, batch_size=4)).peak_gib > with_gc.peak_gib


def test_fit_answers_the_largest_batch(llama7b):
    shape = TrainShape(quant="nf4", r=16, seq_len=1024, **STOCK)
    ans = fit(llama7b, shape, 12.0, max_seq_len=4096)
    b = ans["max_batch_size"]
    assert b >= 1
    # the fit leaves the caching allocator's headroom: reserved (allocated + overhead) within the budget
    assert estimate(llama7b, replace(shape, batch_size=b)).peak_reserved_gib <= 12.0
    assert estimate(llama7b, replace(shape, batch_size=b + 1)).peak_reserved_gib > 12.0
    est = estimate(llama7b, replace(shape, batch_size=b))
    assert est.peak_reserved_gib == pytest.approx(est.peak_gib * (1 + ALLOCATOR_OVERHEAD))
    assert f"peak reserved          {est.peak_reserved_gib:>9.3f}" in est.table()
    cpu = estimate(llama7b, replace(shape, device="cpu"))
    assert cpu.peak_reserved_gib == cpu.peak_gib and "peak reserved" not in cpu.table()
    assert [row["seq_len"] for row in ans["table"]] == [128, 256, 512, 1024, 2048, 4096]
    assert fit(llama7b, shape, 1.0)["max_batch_size"] == 0  # the weights alone exceed 1 GiB


def test_full_fine_tuning_of_a_quantized_base_is_refused(llama7b):
    with pytest.raises(QtuneError, match="full fine-tuning"):
        estimate(llama7b, TrainShape(quant="nf4", r=0))


def test_estimate_cli_json_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["estimate", "--model", str(LLAMA2_7B), "--quant", "nf4", "--r", "16", "--seq-len", "512",
                              "--batch-size", "1", "--device", "cuda", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out == estimate(count_model(AutoConfig.from_pretrained(LLAMA2_7B)), TrainShape(batch_size=1)).to_dict()
    assert set(out["terms_gib"]) >= {"frozen_weights", "quant_constants", "lora_params", "gradients",
                                     "optimizer_states", "activations", "logits_loss"}
    res = runner.invoke(app, ["estimate", "--model", str(LLAMA2_7B), "--fit", "10", "--seq-len", "2048"])
    assert res.exit_code == 0 and "largest batch at 2048 tokens:" in res.output
    (tmp_path / "empty").mkdir()
    for args, msg in [(["--model", str(tmp_path / "empty")], "not a model directory"),
                      (["--model", str(LLAMA2_7B), "--quant", "nf4", "--r", "0"], "full fine-tuning"),
                      (["--model", str(LLAMA2_7B), "--target-modules", "foo"], "Target modules {'foo'} not found"),
                      (["--model", str(LLAMA2_7B), "--skip-modules", "down_prj"], "'down_prj' names no linear layer"),
                      (["--model", str(LLAMA2_7B), "--strategy", "fsdp"], "--world-size 2 or more")]:
        res = runner.invoke(app, ["estimate", *args])
        assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1


def test_per_gpu_estimate_under_ddp_and_fsdp():
    from qtune.model.memory import TrainShape, count_model, estimate, load_model_config

    counts = count_model(load_model_config(str(LLAMA2_7B)))
    one = estimate(counts, TrainShape(quant="nf4", r=16, seq_len=512, **STOCK))
    ddp = estimate(counts, TrainShape(quant="nf4", r=16, seq_len=512, world_size=8, strategy="ddp", **STOCK))
    fsdp = estimate(counts, TrainShape(quant="nf4", r=16, seq_len=512, world_size=8, strategy="fsdp", **STOCK))
    assert ddp.term("ddp_buckets").bytes == one.term("gradients").bytes
    assert ddp.peak_bytes == one.peak_bytes + one.term("gradients").bytes
    for name in ("frozen_weights", "optimizer_states", "gradients"):
        assert fsdp.term(name).bytes == -(-one.term(name).bytes // 8)
    assert fsdp.term("activations").bytes == one.term("activations").bytes  # activations are not sharded
    layer = fsdp.term("fsdp_gathered_layer").bytes
    assert 0 < layer < one.term("frozen_weights").bytes / 16
    assert fsdp.peak_gib < 0.5 * one.peak_gib
