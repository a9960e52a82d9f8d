"""Export edges: GGUF metadata as llama.cpp's converter writes it, LoRA on a tied LM head refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import DEFAULT_MODEL, LoraSettings, save_config
from qtune.errors import QtuneError
from qtune.model.adapters import lora_config, peft_model
from qtune.rundir import RunDir

from conftest import tiny_run_config

runner = CliRunner()


def test_lora_on_a_tied_lm_head_is_refused_in_one_line(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    for targets in (["lm_head"], ["q_proj", "lm_head"]):
        with pytest.raises(QtuneError) as e:
            peft_model(LlamaForCausalLM(config), LoraSettings(r=4, lora_alpha=8, target_modules=targets))
        assert "'lm_head' is tied to the input embeddings" in str(e.value) and "\n" not in str(e.value)
    # untied models and all-linear (which leaves lm_head out) are fine
    peft_model(LlamaForCausalLM(config), LoraSettings(r=4, lora_alpha=8, target_modules="all-linear"))
    config.tie_word_embeddings = False
    peft_model(LlamaForCausalLM(config), LoraSettings(r=4, lora_alpha=8, target_modules=["lm_head"]))


@pytest.fixture(scope="module")
def smol_run(smol_dir, tmp_path_factory) -> RunDir:
    """A SmolLM2 run directory (model name: the wheel alias) with a small random adapter on q_proj."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rd = RunDir(tmp_path_factory.mktemp("smol-run"))
    cfg = tiny_run_config(DEFAULT_MODEL, rd.root, lora={"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    save_config(cfg, rd.config)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smol_dir), lora_config(cfg.lora))
    model.save_pretrained(str(rd.adapter))
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(str(rd.adapter))
    rd.summary.write_text("{}\n")  # a finished run (its summary is written last)
    return rd


@pytest.mark.slow
def test_gguf_metadata_matches_the_shipped_smollm2_gguf_key_by_key(smol_run, tmp_path):
    import gguf

    from qtune.model.load import wheel_gguf

    out = tmp_path / "smol.gguf"
    result = runner.invoke(app, ["export", "--run", str(smol_run.root), "--gguf", str(out)])
    assert result.exit_code == 0, result.output

    def fields(path: Path) -> dict:
        skip = ("GGUF.",)
        return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith(skip)}

    shipped, ours = fields(wheel_gguf()), fields(out)
    must_differ = {
        "general.file_type": (3, 1),  # MOSTLY_Q4_1 in the wheel, MOSTLY_F16 here
    }
    absent_here = {"general.quantization_version"}  # only quantized files carry it
    assert ours["tokenizer.ggml.pre"] == "smollm"
    # the run was trained with the alpaca template, so the embedded template is that one, not SmolLM2's ChatML
    assert "<|im_start|>" in shipped["tokenizer.chat_template"]
    assert ours.pop("tokenizer.chat_template").startswith("{%- if messages[0]['role'] == 'system' -%}")
    shipped.pop("tokenizer.chat_template")
    for key, value in shipped.items():
        if key in absent_here:
            assert key not in ours
        elif key in must_differ:
            assert (value, ours[key]) == must_differ[key], key
        else:
            assert ours.get(key) == value, key
    assert set(ours) - set(shipped) == set()


def test_adapter_records_the_public_base_and_a_model_card(tiny_model_dir, tmp_path):
    import json

    from qtune.config import load_config
    from qtune.model.adapters import SMOLLM2_HUB_ID, finish_adapter

    from serve_fixtures import make_tiny_run

    rd = make_tiny_run(tiny_model_dir, tmp_path / "run")
    cfg = load_config(rd.config, [f"model.name={DEFAULT_MODEL}"], saved_run=True)
    card = {
        "rows_in": 300,
        "rows_kept": 298,
        "dropped": {"empty_output": 2, "duplicate": 0},
        "splits": {"train": 268, "val": 15, "test": 15},
    }
    finish_adapter(rd.adapter, cfg, {"steps": 20, "val_loss": 1.2345, "trainable_params": 1234}, card)
    conf = json.loads((rd.adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == SMOLLM2_HUB_ID
    readme = (rd.adapter / "README.md").read_text()
    assert readme.startswith(f"---\nbase_model: {SMOLLM2_HUB_ID}\n")
    for expected in (
        "Q4_1.gguf",
        "| LoRA | r 8, lora_alpha 16.0,",
        "300 rows in, 298 kept (dropped: empty_output 2)",
        "| validation loss (token-weighted) | 1.2345 |",
        "### Instruction:\n{instruction}",
    ):
        assert expected in readme, expected
    # the adapter still loads onto its base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(rd.adapter))


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Write a loop.\n  (indented note)"}],
    "one turn, system": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a loop."},
    ],
    "three turns": [
        {"role": "user", "content": "Write a loop."},
        {"role": "assistant", "content": "    for i in range(3):\n        print(i)"},
        {"role": "user", "content": "Now a function."},
        {"role": "assistant", "content": "def f():\n    return 1"},
        {"role": "user", "content": "Call it."},
    ],
    "three turns, system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_prompt_token_ids_agree_across_training_merged_tokenizer_gguf_template_and_api(
    template, tiny_model_dir, tmp_path
):
    import gguf
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    from qtune.data.templates import format_conversation
    from qtune.data.tokenize import encode_prompt
    from qtune.serve.engine import Engine, GenerationSettings
    from qtune.serve.session import fit_messages

    from serve_fixtures import make_tiny_run

    rd = make_tiny_run(tiny_model_dir, tmp_path / "run", data={"template": template})
    merged, gguf_file = tmp_path / "merged", tmp_path / "model.gguf"
    result = runner.invoke(app, ["export", "--run", str(rd.root), "--merged", str(merged), "--gguf", str(gguf_file)])
    assert result.exit_code == 0, result.output
    train_tok = AutoTokenizer.from_pretrained(str(rd.adapter))
    merged_tok = AutoTokenizer.from_pretrained(str(merged))
    gguf_template = gguf.GGUFReader(str(gguf_file)).fields["tokenizer.chat_template"].contents()
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(gguf_template)
    engine = Engine(str(rd.root))
    for name, messages in CONVERSATIONS.items():
        training = encode_prompt(format_conversation(messages, template, train_tok), train_tok)
        exported = merged_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        text = jinja.render(
            messages=messages, add_generation_prompt=True, bos_token=train_tok.bos_token, eos_token=train_tok.eos_token
        )
        from_gguf = train_tok(text, add_special_tokens=False)["input_ids"]
        api = fit_messages(engine, messages, GenerationSettings(max_new_tokens=8)).prompt_ids
        assert training == exported == from_gguf == api, (template, name)
    if template == "alpaca":  # not the base's ChatML
        assert "<|im_start|>" not in gguf_template and "### Instruction:" in gguf_template


@pytest.fixture(scope="module")
def run_with_data(tiny_model_dir, tokenizer, tmp_path_factory):
    """A tiny run (random adapter) with its prepared data, as training leaves it."""
    from qtune.config import load_config
    from qtune.data.prepare import prepare_dataset

    from serve_fixtures import make_tiny_run

    rd = make_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("run") / "run")
    prepare_dataset(load_config(rd.config, saved_run=True).data, tokenizer, rd.data)
    return rd


def _table_losses(output: str) -> dict[str, float]:
    """{model form: loss} from the export check's table lines ("  NAME   LOSS  [drift +D]")."""
    import re

    return {m[1]: float(m[2]) for m in re.finditer(r"^  (\S.*?)\s{2,}(\d+\.\d+)", output, re.M)}


@pytest.mark.slow
def test_export_prints_the_parity_table_and_passes(run_with_data, tmp_path):
    result = runner.invoke(
        app,
        [
            "export",
            "--run",
            str(run_with_data.root),
            "--merged",
            str(tmp_path / "m"),
            "--gguf",
            str(tmp_path / "m.gguf"),
            "--check-rows",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "export check: 8 validation rows" in result.output
    losses = _table_losses(result.output)
    assert set(losses) == {
        "adapter on the nf4 base (as trained)",
        "adapter on the float32 base (not merged)",
        "merged model (read back)",
        "GGUF file (read back by transformers)",
    }
    ref = losses["adapter on the float32 base (not merged)"]
    assert abs(losses["merged model (read back)"] - ref) < 0.01
    assert abs(losses["GGUF file (read back by transformers)"] - ref) < 0.01
    assert ref != losses["adapter on the nf4 base (as trained)"]  # the quantization gap is real and shown


@pytest.mark.slow
def test_export_fails_when_the_merged_model_drifts(run_with_data, tmp_path, monkeypatch):
    import torch

    import qtune.serve.export as export

    real = export.merge_run

    def broken(*a, **k):  # a merge that gets one matrix wrong, as the tied lm_head merge did
        model, tok, cfg = real(*a, **k)
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        return model, tok, cfg

    monkeypatch.setattr(export, "merge_run", broken)
    result = runner.invoke(
        app, ["export", "--run", str(run_with_data.root), "--merged", str(tmp_path / "m"), "--check-rows", "8"]
    )
    assert result.exit_code == 2
    assert "exceeds --max-drift 0.01" in result.output
    skipped = runner.invoke(
        app, ["export", "--run", str(run_with_data.root), "--merged", str(tmp_path / "m2"), "--no-check"]
    )
    assert skipped.exit_code == 0 and "export check" not in skipped.output
