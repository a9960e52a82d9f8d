"""Training on a tiny random LLaMA: NF4 + LoRA learns, only LoRA moves, the adapter round-trips through PEFT."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from qtune.data.prepare import load_splits
from qtune.data.tokenize import padding_collator
from qtune.errors import QtuneError
from qtune.evaluate.perplexity import evaluate_run, split_loss
from qtune.model.adapters import load_trained, lora_config
from qtune.rundir import RunDir
from qtune.train.trainer import train

from conftest import tiny_run_config

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Probe(TrainerCallback):
    """Snapshots frozen weights at the start and end; records which LoRA tensors had non-zero gradients."""

    def __init__(self):
        self.nonzero_grad: set[str] = set()
        self.lora_names: set[str] = set()

    @staticmethod
    def _frozen(model):
        state = {n: t.detach().clone() for n, t in model.named_parameters() if "lora_" not in n}
        state |= {n: t.detach().clone() for n, t in model.named_buffers()}
        return state

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = self._frozen(model)
        self.lora_names = {n for n, p in model.named_parameters() if "lora_" in n}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        for n, p in model.named_parameters():
            if "lora_" in n and p.grad is not None and p.grad.abs().sum() > 0:
                self.nonzero_grad.add(n)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = self._frozen(model)


@pytest.fixture(scope="module")
def nf4_run(tiny_model_dir, tmp_path_factory):
    probe = Probe()
    out = tmp_path_factory.mktemp("nf4") / "run"
    summary = train(tiny_run_config(tiny_model_dir, out), callbacks=(probe,))
    return summary, probe, RunDir(out)


@pytest.mark.slow
def test_nf4_lora_loss_falls(nf4_run):
    summary, _, rd = nf4_run
    records = [json.loads(line) for line in rd.metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # nats; measured drop about 0.8
    assert summary["val_loss"] is not None and summary["val_loss"] < losses[0]


@pytest.mark.slow
def test_every_lora_tensor_gets_a_gradient_and_the_base_stays_frozen(nf4_run):
    _, probe, _ = nf4_run
    assert probe.lora_names and probe.nonzero_grad == probe.lora_names
    assert probe.trainable == probe.lora_names
    assert probe.before.keys() == probe.after.keys()
    changed = [n for n in probe.before if not torch.equal(probe.before[n], probe.after[n])]
    assert changed == []
    # the base really is 4-bit: bitsandbytes Linear4bit weights are packed uint8
    assert any(t.dtype == torch.uint8 for t in probe.before.values())


@pytest.mark.slow
def test_metrics_record_every_step(nf4_run):
    _, _, rd = nf4_run
    steps = [json.loads(line) for line in rd.metrics.read_text().splitlines()]
    train_steps = [r for r in steps if "loss" in r]
    assert [r["step"] for r in train_steps] == list(range(1, 21))
    for r in train_steps:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["peak_rss_gib"] > 0
    lrs = [r["learning_rate"] for r in train_steps]
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < 0.05 * 1e-2  # warmup to the peak, cosine to near 0


@pytest.mark.slow
def test_saved_adapter_holds_every_target_module(nf4_run):
    _, _, rd = nf4_run
    tensors = load_file(rd.adapter / "adapter_model.safetensors")
    for layer in range(2):
        for module in LINEAR:
            for ab in ("lora_A", "lora_B"):
                assert any(f"layers.{layer}." in k and f".{module}.{ab}." in k for k in tensors), (layer, module, ab)
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    for name in ("config.yaml", "versions.json", "train_summary.json", "data/data_card.json"):
        assert (rd.root / name).is_file()


@pytest.fixture(scope="module")
def fp32_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "run"
    train(
        tiny_run_config(
            tiny_model_dir,
            out,
            quant={"quant": "none", "compute_dtype": "float32"},
            train={"max_steps": 10, "eval_at_end": False},
        )
    )
    return RunDir(out)


@pytest.mark.slow
def test_adapter_loads_with_plain_peft_and_matches_qtune(fp32_run, tiny_model_dir):
    rd = fp32_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3070, 314, 260, 1345, 30, 2]])
    with torch.no_grad():
        base_logits = base(ids).logits
    expected = set(
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            lora_config(tiny_run_config(tiny_model_dir, rd.root).lora),
        ).state_dict()
    )
    saved = set(load_file(rd.adapter / "adapter_model.safetensors"))
    assert {k.replace(".default", "") for k in expected if "lora_" in k} == saved  # no missing, no unexpected keys

    plain = PeftModel.from_pretrained(base, str(rd.adapter)).eval()
    ours, _, _ = load_trained(rd.root)
    with torch.no_grad():
        plain_logits, our_logits = plain(ids).logits, ours(ids).logits
    torch.testing.assert_close(our_logits, plain_logits, atol=1e-4, rtol=0)
    assert (plain_logits - base_logits).abs().max() > 1e-3


@pytest.mark.slow
def test_eval_compares_base_and_adapter(fp32_run, tiny_model_dir):
    result = evaluate_run(str(fp32_run.root), ("val",))
    assert result["adapter"]["val"]["loss"] < result["base"]["val"]["loss"]
    val = load_splits(fp32_run.data)["val"].remove_columns("row")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok_count = sum(sum(1 for x in lab[1:] if x != -100) for lab in val["labels"])
    from qtune.config import ModelConfig
    from qtune.model.load import load_tokenizer

    direct = split_loss(base, val, padding_collator(load_tokenizer(tiny_model_dir, ModelConfig())), batch_size=3)
    assert direct["tokens"] == tok_count == result["base"]["val"]["tokens"]
    assert direct["loss"] == pytest.approx(result["base"]["val"]["loss"], rel=1e-5)
    # the same figure from full logits and a plain cross-entropy over every supervised token
    total = 0.0
    with torch.no_grad():
        for sample in val:
            ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor(sample["labels"][1:])
            logits = base(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
    assert direct["loss"] == pytest.approx(total / tok_count, rel=1e-5)
    assert json.loads(fp32_run.eval.read_text())["adapter"]["val"]["loss"] == result["adapter"]["val"]["loss"]


class LayerCalls(TrainerCallback):
    """Counts calls of the first decoder layer's MLP forward (module hooks do not fire on recomputation)."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.calls, self.training = 0, []
        mlp = model.get_base_model().model.layers[0].mlp
        forward = mlp.forward

        def counted(*a, **k):
            self.calls += 1
            return forward(*a, **k)

        mlp.forward = counted

    def on_step_end(self, args, state, control, model=None, **kw):
        self.training.append(model.training)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing, calls", [(True, 2), (False, 1)])
def test_gradient_checkpointing_recomputes_in_train_mode(tiny_model_dir, tmp_path, checkpointing, calls):
    probe = LayerCalls()
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        train={"max_steps": 1, "warmup_steps": 0, "eval_at_end": False, "gradient_checkpointing": checkpointing},
    )
    train(cfg, callbacks=(probe,))
    assert probe.calls == calls  # forward, plus the recomputation in backward when checkpointing acts
    assert probe.training == [True]


@pytest.mark.slow
def test_run_dir_is_not_overwritten(nf4_run, tiny_model_dir):
    _, _, rd = nf4_run
    with pytest.raises(QtuneError, match="run directory exists"):
        train(tiny_run_config(tiny_model_dir, rd.root))


STOCK = {"packing": False, "response_logits_only": False, "upcast_frozen": True, "liger": "off"}


@pytest.mark.slow
def test_fast_path_matches_the_stock_recipe(tiny_model_dir, tmp_path):
    """Packing + response-only logits change the cost, not the math: same losses, same LoRA weights."""
    runs = {}
    for name, train_cfg in {"qtune": {}, "stock": STOCK}.items():
        cfg = tiny_run_config(
            tiny_model_dir,
            tmp_path / name,
            quant={"quant": "none", "compute_dtype": "float32"},  # the math in fp32: bf16 rounds the two apart
            train={"eval_at_end": False, **train_cfg},
        )
        train(cfg)
        losses = [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (losses, load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    (fast, fast_w), (stock, stock_w) = runs["qtune"], runs["stock"]
    assert len(fast) == len(stock) == 20
    for a, b in zip(fast, stock, strict=True):
        assert a == pytest.approx(b, rel=1e-3)
    for key in stock_w:
        torch.testing.assert_close(fast_w[key], stock_w[key], atol=2e-3, rtol=2e-2)


def test_packed_and_padded_batches_give_the_same_loss(tiny_model_dir, tokenizer):
    from qtune.data.tokenize import training_collator
    from qtune.model.attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    samples = load_splits_for_test(tokenizer)
    losses = {}
    for attention in ("sdpa", "packed"):  # transformers' block-diagonal mask, then qtune's per-sample attention
        if attention == "packed":
            use_packed_attention(model)
        for packing in (False, True):
            for selective in (False, True):
                batch = training_collator(tokenizer, packing, selective)(samples)
                if packing:
                    assert batch["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in samples))
                with torch.no_grad():
                    losses[attention, packing, selective] = model(**batch).loss.item()
    assert max(losses.values()) - min(losses.values()) < 1e-4 * losses["sdpa", False, False]


def load_splits_for_test(tokenizer):
    from qtune.data.templates import format_prompt
    from qtune.data.tokenize import encode_example

    pairs = [
        ("Add two numbers.", "def add(a, b):\n    return a + b"),
        ("Say hi.", "print('hi')"),
        ("Reverse a list in Python, explaining each step in detail.", "xs[::-1]  # slicing with step -1"),
    ]
    return [encode_example(format_prompt(q), a, tokenizer, 128) for q, a in pairs]


@pytest.mark.slow
def test_tensorboard_holds_every_training_step_and_the_validation_loss(nf4_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, rd = nf4_run
    events = EventAccumulator(str(rd.root / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 21))
    records = [json.loads(line) for line in rd.metrics.read_text().splitlines() if '"loss"' in line]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert "train/learning_rate" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/loss")] == [20]


@pytest.mark.slow
def test_report_to_none_writes_no_tensorboard(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        train={"max_steps": 2, "warmup_steps": 1, "report_to": "none", "eval_at_end": False},
    )
    train(cfg)
    assert not (tmp_path / "run" / "tensorboard").exists()
