"""Random weights of a model's shape (a config.json and the qtune_random_weights.json marker): built once, with a
tokenizer cut to the config's vocabulary, then trained on like any checkpoint (the 7B grid's memory/time path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaConfig

from qtune.config import ModelConfig
from qtune.errors import QtuneError, QtuneWarning
from qtune.model.load import resolve_model
from qtune.model.random_weights import MARKER, random_weights_spec, truncate_bpe

from conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def _shape_dir(root: Path, tokenizer_dir: str, vocab: int = 32000, **marker) -> Path:
    """A config-only model directory of a tiny LLaMA with ``vocab`` tokens, marked for random weights."""
    root.mkdir(parents=True, exist_ok=True)
    conf = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    conf.save_pretrained(root)
    (root / MARKER).write_text(json.dumps({"seed": 0, "tokenizer": tokenizer_dir, **marker}), encoding="utf-8")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QTUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_once_with_the_shape_and_a_tokenizer_cut_to_the_vocabulary(tmp_path, cache, tiny_model_dir):
    shape = _shape_dir(tmp_path / "shape", tiny_model_dir)
    # the estimate and data preparation: the config and the cut tokenizer, no weights built
    light = Path(resolve_model(ModelConfig(name=str(shape)), require_weights=False))
    assert light.parent == cache / "random" and not list(light.glob("*.safetensors"))
    assert json.loads((light / "config.json").read_text())["hidden_size"] == 64
    assert len(AutoTokenizer.from_pretrained(str(light))) == 32000
    with pytest.warns(QtuneWarning, match="random weights of this shape"):
        built = Path(resolve_model(ModelConfig(name=str(shape))))
    assert built.parent == cache / "random"
    (weights,) = built.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (32000, 64)
        assert f.get_tensor("lm_head.weight").shape == (32000, 64)
    tok = AutoTokenizer.from_pretrained(str(built))
    full = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(full) == 49152 and len(tok) == 32000
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # ünïcode"
    ids = tok(text)["input_ids"]
    assert max(ids) < 32000 and tok.decode(ids) == text
    assert len(ids) >= len(full(text)["input_ids"])  # fewer merges: never fewer tokens
    assert tok.eos_token == full.eos_token and tok.eos_token_id == full.eos_token_id
    stamp = weights.stat().st_mtime_ns
    with pytest.warns(QtuneWarning):
        assert Path(resolve_model(ModelConfig(name=str(shape)))) == built  # built once
    assert weights.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_random_weights_shape_trains_like_a_checkpoint(tmp_path, cache, tiny_model_dir):
    from qtune.train.trainer import train

    shape = _shape_dir(tmp_path / "shape", tiny_model_dir)
    cfg = tiny_run_config(str(shape), tmp_path / "run", train={"max_steps": 3}, data={"max_rows": 60})
    with pytest.warns(QtuneWarning, match="random weights"):
        summary = train(cfg)
    assert summary["steps"] == 3 and summary["trainable_params"] > 0
    assert summary["val_loss"] == pytest.approx(10.37, abs=0.2)  # ln(32000) = 10.37: a random model's loss
    adapter = Path(summary["run_dir"]) / "adapter"
    card = (adapter / "README.md").read_text(encoding="utf-8")
    assert f"| base | `{shape}` (RANDOM weights of this shape (seed 0," in card  # never passed off as a model
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(shape)


def test_truncate_bpe_keeps_the_first_ids_and_refuses_what_it_cannot_cut():
    tj = {
        "added_tokens": [{"id": 0, "content": "<eos>"}],
        "model": {
            "type": "BPE",
            "vocab": {"<eos>": 0, "a": 1, "b": 2, "ab": 3, "abb": 4, "abab": 5},
            "merges": [["a", "b"], ["ab", "b"], ["ab", "ab"]],
        },
    }
    cut = truncate_bpe(tj, 5)
    assert cut["model"]["vocab"] == {"<eos>": 0, "a": 1, "b": 2, "ab": 3, "abb": 4}
    assert cut["model"]["merges"] == [["a", "b"], ["ab", "b"]]
    assert tj["model"]["merges"][2] == ["ab", "ab"]  # the input is left as it was
    assert truncate_bpe(tj, 6) == tj
    shuffled = json.loads(json.dumps(tj))
    shuffled["model"]["merges"] = [["ab", "b"], ["a", "b"], ["ab", "ab"]]
    with pytest.raises(QtuneError, match="not in the order of the ids"):
        truncate_bpe(shuffled, 5)
    special = json.loads(json.dumps(tj))
    special["added_tokens"].append({"id": 5, "content": "<pad>"})
    with pytest.raises(QtuneError, match=r"special tokens \['<pad>'\]"):
        truncate_bpe(special, 5)
    with pytest.raises(QtuneError, match="below its 3 base tokens"):
        truncate_bpe(tj, 2)
    with pytest.raises(QtuneError, match="only a BPE"):
        truncate_bpe({"model": {"type": "Unigram", "vocab": [], "merges": []}}, 5)


@pytest.mark.parametrize(
    "marker, message",
    [
        ("[1]", "expected a JSON object, got a list"),
        ('{"seed": "x"}', "seed: expected an integer, got 'x'"),
        ('{"dtype": "int4"}', "dtype: expected one of float16, bfloat16, float32, got 'int4'"),
        ('{"tokenizer": ""}', "tokenizer: expected a model name, got ''"),
        ("{", "not readable JSON"),
    ],
)
def test_a_bad_marker_is_one_line_naming_the_file_and_field(tmp_path, marker, message):
    (tmp_path / MARKER).write_text(marker, encoding="utf-8")
    with pytest.raises(QtuneError) as e:
        random_weights_spec(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / MARKER}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_7b_shape_is_marked_and_keeps_llama2_vocabulary():
    shape = REPO / "configs" / "models" / "llama-2-7b"
    assert random_weights_spec(shape) == {"seed": 0, "tokenizer": "smollm2-135m-instruct", "dtype": "float16"}
    assert json.loads((shape / "config.json").read_text())["vocab_size"] == 32000
    light = Path(resolve_model(ModelConfig(name=str(shape)), require_weights=False))  # config + tokenizer, no 7B
    assert not list(light.glob("*.safetensors")) and len(AutoTokenizer.from_pretrained(str(light))) == 32000


def test_a_marker_naming_itself_as_tokenizer_is_refused_not_recursed(tmp_path, cache):
    shape = _shape_dir(tmp_path / "shape", ".")
    with pytest.raises(QtuneError, match="is itself a random-weights shape"):
        resolve_model(ModelConfig(name=str(shape)), require_weights=False)


def test_a_config_transformers_rejects_is_one_line(tmp_path, cache, tiny_model_dir):
    shape = _shape_dir(tmp_path / "shape", tiny_model_dir)
    conf = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps(conf | {"num_attention_heads": 5}))  # 64 is not a multiple of 5
    with pytest.raises(QtuneError, match="cannot read the model config") as e:
        resolve_model(ModelConfig(name=str(shape)), require_weights=False)
    assert "\n" not in str(e.value)
