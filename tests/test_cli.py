"""The command line: bad input gets one clear line and exit status 2; the data command prints its card."""

import json
import re

import pytest
from typer.testing import CliRunner

from qtune.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "lora.r=0"], "error: config: lora.r: Input should be greater than 0 (got 0)"),
        (["train", "--set", "quant.quant=int2"], "error: config: quant.quant: Input should be"),
        (["train", "--set", "data.path=missing.json"], "error: config: data.path: data file not found: missing.json"),
        (["train", "--config", "nope.yaml"], "error: nope.yaml: config file not found"),
        (["eval", "loss", "--run", "no/such/run"], "error: no/such/run: not a qtune run directory (no config.yaml)"),
        (["generate", "--run", "no/such/run", "hi"], "error: no/such/run: not a qtune run directory (no config.yaml)"),
        (["data", "prepare", "--data", "missing.jsonl", "--out", "x"], "error: config: data.path: data file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    code, output = run(*args)
    assert code == 2
    assert output.strip().splitlines() == [output.strip().splitlines()[0]]
    assert output.startswith(message)


def test_max_length_above_context_fails_before_loading(tiny_model_dir, tmp_path):
    code, output = run(
        "train",
        "--set",
        f"model.name={tiny_model_dir}",
        "--set",
        "data.max_length=4096",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
    )
    assert code == 2 and "data.max_length: 4096 exceeds the model's context of 512 tokens" in output
    assert not (tmp_path / "run").exists()


def test_run_dir_without_adapter(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    code, output = run("generate", "--run", tmp_path, "hi")
    assert code == 2 and "no trained adapter" in output


def test_data_prepare_prints_card_and_maps_columns(tmp_path, tiny_model_dir):
    src = tmp_path / "rows.jsonl"
    lines = [{"prompt": f"Task {i}", "completion": f"print({i})"} for i in range(20)]
    lines.append({"prompt": "Task 0", "completion": "print(0)  \r\n"})  # duplicate: trailing whitespace ignored
    src.write_text("\n".join(json.dumps(x) for x in lines))
    code, output = run("data", "prepare", "--data", src, "--model", tiny_model_dir, "--out", tmp_path / "out")
    assert code == 2 and "found ['completion', 'prompt']" in output and "--columns" in output
    code, output = run(
        "data",
        "prepare",
        "--data",
        src,
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "out",
        "--columns",
        "instruction=prompt,output=completion",
    )
    assert code == 0, output
    card = json.loads((tmp_path / "out" / "data_card.json").read_text())
    assert card["rows_in"] == 21 and card["rows_kept"] == 20 and card["dropped"]["duplicate"] == 1
    assert card["splits"] == {"val": 1, "test": 1, "train": 18}
    assert re.search(r"rows kept +20\n", output)


def test_bad_jsonl_line_is_named(tmp_path, tiny_model_dir):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    code, output = run("data", "prepare", "--data", src, "--model", tiny_model_dir, "--out", tmp_path / "out")
    assert code == 2 and f"error: {src}:2:1: invalid JSON" in output


@pytest.mark.parametrize(
    "argv, code, first",
    [
        (
            ["estimate", "--logit-fraction", "1.5"],
            2,
            "error: Invalid value for '--logit-fraction': Input should be less than or equal to 1 "
            "(see 'qtune estimate --help')",
        ),
        (["estimate", "--bogus"], 2, "error: No such option: --bogus (see 'qtune estimate --help')"),
        (["nosuch"], 2, "error: No such command 'nosuch'. (see 'qtune --help')"),
        (["data"], 0, None),
    ],
)
def test_console_entry_point_turns_usage_errors_into_one_line(monkeypatch, capsys, argv, code, first):
    import sys

    from qtune.cli import main

    monkeypatch.setattr(sys, "argv", ["qtune", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == code
    if first is None:  # a group without a command shows its help
        assert "prepare" in out.out and out.err == ""
    else:
        assert out.err == first + "\n"
