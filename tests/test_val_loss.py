"""One validation loss everywhere: training's periodic and final evaluation, train_summary.json and `qtune eval`
report the same token-weighted figure, bit for bit, whatever the eval batch size."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from qtune.data.prepare import load_splits
from qtune.data.tokenize import padding_collator
from qtune.evaluate.perplexity import evaluate_run, split_loss
from qtune.model.adapters import load_trained
from qtune.model.quantize import compute_autocast
from qtune.rundir import RunDir
from qtune.train.trainer import train

from conftest import tiny_run_config

pytestmark = pytest.mark.slow  # every test trains the tiny model


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """NF4 + LoRA on the tiny model, 6 steps, validation every 3 steps and after the last, eval batch 8."""
    out = tmp_path_factory.mktemp("valloss") / "run"
    cfg = tiny_run_config(
        tiny_model_dir,
        out,
        train={"max_steps": 6, "eval_steps": 3, "eval_batch_size": 8, "gradient_checkpointing": False},
    )
    return train(cfg), RunDir(out)


def _val(rd):
    return load_splits(rd.data)["val"].remove_columns("row")


def test_val_loss_is_the_same_for_every_batch_size_and_equals_qtune_eval(run):
    summary, rd = run
    val = _val(rd)
    supervised = sum(sum(1 for x in lab[1:] if x != -100) for lab in val["labels"])
    model, tokenizer, cfg = load_trained(rd.root)
    collate = padding_collator(tokenizer)
    with compute_autocast(cfg.quant, "cpu"):  # bf16 matmuls on a CPU with AMX/AVX512-BF16, as training ran
        one, eight = split_loss(model, val, collate, batch_size=1), split_loss(model, val, collate, batch_size=8)
        reordered = split_loss(model, val.select(range(len(val) - 1, -1, -1)), collate)
    assert one == eight == reordered  # exact: no tolerance
    assert one["tokens"] == supervised > 0

    evaluated = evaluate_run(str(rd.root), ("val",))["adapter"]["val"]  # what `qtune eval` prints
    assert evaluated == one
    assert summary["val_loss"] == one["loss"]
    assert summary["val_perplexity"] == one["perplexity"] == math.exp(one["loss"])
    assert summary["val_tokens"] == supervised


def test_halves_from_one_pass_equal_each_half_evaluated_alone(run):
    summary, rd = run
    val = _val(rd)
    model, tokenizer, cfg = load_trained(rd.root)
    collate = padding_collator(tokenizer)
    rows = [dict(r) for r in val.select(range(7))]  # an odd count: the first half takes the middle row
    rows[1]["labels"] = [-100] * len(rows[1]["labels"])  # a row without a supervised token
    cut = (len(val) + 1) // 2
    with compute_autocast(cfg.quant, "cpu"):
        got = split_loss(model, rows, collate, halves=True)
        alone = [split_loss(model, rows[:4], collate), split_loss(model, rows[4:], collate)]
        whole = split_loss(model, rows, collate)
        halves = [val.select(range(cut)), val.select(range(cut, len(val)))]
        trained = [split_loss(model, half, collate) for half in halves]
    assert got["halves"] == alone and {k: got[k] for k in whole} == whole
    assert alone[0]["tokens"] + alone[1]["tokens"] == whole["tokens"]
    assert summary["val_halves"] == trained  # training's final pass, to the bit


def test_metrics_eval_records_are_the_same_figure(run):
    summary, rd = run
    evals = [r for r in map(json.loads, rd.metrics.read_text().splitlines()) if "eval_loss" in r]
    # periodic at steps 3 and 6, then the final evaluation (same weights as step 6)
    assert [r["step"] for r in evals] == [3, 6, 6]
    assert evals[1]["eval_loss"] == evals[2]["eval_loss"] == summary["val_loss"]
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]  # the adapter moved between steps 3 and 6
    for r in evals:
        assert r["eval_tokens"] == summary["val_tokens"]
        assert r["eval_perplexity"] == math.exp(r["eval_loss"])


def test_loss_is_the_token_weighted_mean_of_full_logits(run, tiny_model_dir, tokenizer):
    """An independent reference: full logits, one plain cross-entropy per sample, summed over samples."""
    _, rd = run
    val = _val(rd)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for s in val:
            logits = base(torch.tensor([s["input_ids"]])).logits[0, :-1]
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(s["labels"][1:]), reduction="none")
            supervised = torch.tensor(s["labels"][1:]) != -100
            total += ce[supervised].double().sum().item()
            count += int(supervised.sum())
            means.append(ce[supervised].mean().item())
    got = split_loss(base, val, padding_collator(tokenizer))
    assert got["tokens"] == count
    # the LM head over the supervised positions only rounds differently from full logits in the last bits
    assert got["loss"] == pytest.approx(total / count, rel=1e-6)
    assert abs(got["loss"] - sum(means) / len(means)) > 1e-3  # a mean of per-sample means is told apart


def test_upcast_training_weights_are_evaluated_as_qtune_eval_loads_them(tiny_model_dir, tmp_path):
    """bfloat16 compute with train.upcast_frozen: training keeps norms, embeddings and LM head in float32
    (prepare_model_for_kbit_training); the in-training evaluation casts them back to the bfloat16 they were loaded
    in, so train_summary.json still equals `qtune eval`."""
    cfg = tiny_run_config(
        tiny_model_dir,
        tmp_path / "run",
        quant={"compute_dtype": "bfloat16"},
        train={"max_steps": 2, "warmup_steps": 0, "gradient_checkpointing": False, "upcast_frozen": True},
    )
    summary = train(cfg)
    evaluated = evaluate_run(str(tmp_path / "run"), ("val",))["adapter"]["val"]
    assert summary["val_loss"] == evaluated["loss"] and summary["val_tokens"] == evaluated["tokens"]
