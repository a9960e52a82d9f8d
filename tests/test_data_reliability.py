"""Malformed data not covered in test_data.py, and property tests of the cleaner and the formatter."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import DataConfig
from qtune.data.clean import REASONS, DataCard, clean_rows, dedup_key
from qtune.data.load import FIELDS, load_rows
from qtune.data.prepare import prepare_dataset
from qtune.data.templates import format_prompt
from qtune.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt
from qtune.errors import QtuneError

from conftest import prepare_cli, write_rows

runner = CliRunner()


def test_lists_missing_keys_and_null_fields_are_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"instruction": "Sort a list.", "output": "sorted(xs)"},  # no input key: kept
        {"instruction": ["Sort", "a list."], "input": "", "output": "sorted(xs)"},  # list: not text
        {"instruction": "Sum.", "input": {"a": 1}, "output": "a + b"},  # object: not text
        {"instruction": "Sum.", "input": "", "output": 3.5},  # number: not text
        {"input": "", "output": "print()"},  # no instruction key
        {"instruction": "Print.", "input": "x"},  # no output key
        {"instruction": "Print.", "input": "", "output": None},  # null output
        {"instruction": "Lone \ud800 surrogate.", "input": "", "output": "x"},  # not valid Unicode: not text
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded, unit = load_rows(str(path))
    card = DataCard(source=str(path), rows_in=len(loaded))
    kept = clean_rows(loaded, card)
    assert unit == "line" and [r["row"] for r in kept] == [1]
    assert card.dropped == {
        "not_text": 4,
        "empty_instruction": 1,
        "empty_output": 2,
        "duplicate": 0,
        "contaminated": 0,
        "over_token_budget": 0,
    }
    assert card.examples["not_text"] == [2, 3, 4, 8] and card.examples["empty_output"] == [6, 7]  # line numbers


def test_json_array_with_bom_and_crlf_loads(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(
        b"\xef\xbb\xbf[\r\n" + b'{"instruction": "a", "output": "b"},\r\n{"instruction": "c", "output": "d"}\r\n]\r\n'
    )
    rows, unit = load_rows(str(path))
    assert unit == "row" and [(r["row"], r["instruction"], r["output"]) for r in rows] == [(0, "a", "b"), (1, "c", "d")]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("rows.jsonl", b"\n  \n\r\n", "rows.jsonl: file is empty; expected one JSON object per line"),
        (
            "rows.jsonl",
            b'{"instruction": "a", "output": "b"}\n{"instruction": "\xe9t\xe9", "output": "b"}\n',
            "rows.jsonl:2: not UTF-8 text",
        ),
        (
            "rows.jsonl",
            b'{"instruction": "a", "output": "b"}\n["a", "b"]\n',
            "rows.jsonl: line 2: expected an object with instruction, input, output, got list",
        ),
        ("rows.json", b"[" * 100_000 + b"]" * 100_000, "rows.json: JSON nested too deeply"),
        ("rows.json", b'"just a string"', "rows.json: top level is str; expected a JSON array of rows"),
        ("rows.csv", b"instruction,output\na,b\n", "unsupported file type '.csv'"),
        ("rows.json", b" [ ] ", "rows.json: file is empty (an empty JSON array)"),
        (
            "rows.jsonl",
            b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n",
            "rows.jsonl:1: invalid JSON: Exceeds the limit (4300 digits) for integer string conversion",
        ),
        ("rows.json", b'[{"instruction": "a", "output": ' + b"9" * 5000 + b"}]", "rows.json: invalid JSON: Exceeds"),
    ],
)
def test_more_malformed_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(QtuneError) as err:
        load_rows(str(path))
    assert expected in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_missing_file_with_a_file_suffix_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QtuneError, match="nope.csv: data file not found"):
        load_rows("nope.csv")


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "rows.json"
    path.write_text("[]")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(QtuneError, match=r"rows.json: cannot read file \(Permission denied\)$"):
        load_rows(str(path))


def test_bad_columns_option_is_one_line(tmp_path):
    src = write_rows(tmp_path / "rows.json", [{"prompt": "a", "completion": "b"}])
    code = runner.invoke(
        app, ["data", "prepare", "--data", str(src), "--out", str(tmp_path / "o"), "--columns", "instr=prompt"]
    )
    assert code.exit_code == 2
    assert code.output == (
        "error: config: data.columns: keys must be among instruction, input, output; got ['instr'] "
        "(got {'instr': 'prompt'})\n"
    )
    code = runner.invoke(
        app, ["data", "prepare", "--data", str(src), "--out", str(tmp_path / "o"), "--columns", "instruction"]
    )
    assert code.exit_code == 2
    assert code.output == "error: --columns 'instruction': expected field=column pairs separated by commas\n"
    # mapped to a column the file does not have: the error lists the expected and the found columns
    code = runner.invoke(
        app,
        [
            "data",
            "prepare",
            "--data",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--columns",
            "instruction=question,output=completion",
        ],
    )
    assert code.exit_code == 2
    assert code.output == (
        f"error: {src}: no column for instruction (column 'question'); expected columns ['completion', 'input', "
        "'question'], found ['completion', 'prompt']; map them with --columns instruction=NAME,output=NAME\n"
    )


def test_no_usable_rows_stops_train_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    rows = [{"instruction": "a", "output": " "}, {"instruction": "", "output": "b"}, {"instruction": 1, "output": "c"}]
    src = write_rows(tmp_path / "rows.json", rows)

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("qtune.train.trainer.load_model", must_not_load)
    result = runner.invoke(
        app,
        [
            "train",
            "--set",
            f"model.name={tiny_model_dir}",
            "--set",
            f"data.path={src}",
            "--set",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    assert result.exit_code == 2
    assert result.output.startswith(
        f"error: {src}: no usable rows left after cleaning (3 read; dropped {{'not_text': 1, "
        "'empty_instruction': 1, 'empty_output': 1,"
    )
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left behind that would need --overwrite


def test_several_megabyte_jsonl_row_is_dropped_without_tokenizing_it(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "rows.jsonl"
    big = {"instruction": "Repeat.", "input": "z " * 2_000_000, "output": "ok"}
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n" + json.dumps(big) + "\n")
    assert path.stat().st_size > 4_000_000
    longest = []
    original = type(tokenizer).__call__
    monkeypatch.setattr(
        type(tokenizer), "__call__", lambda self, text, **kw: (longest.append(len(text)), original(self, text, **kw))[1]
    )
    _, card = prepare_dataset(
        DataConfig(path=str(path), max_length=64, split=(1.0, 0.0, 0.0)), tokenizer, tmp_path / "o"
    )
    assert card.dropped["over_token_budget"] == 1 and card.examples["over_token_budget"] == [2] and card.rows_kept == 1
    assert max(longest) < 10_000


# --- property tests -----------------------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
WHITESPACE = st.text(alphabet=" \t\n\r\u00a0\u3000", max_size=5)
VALUE = st.one_of(
    TEXT,
    WHITESPACE,
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(TEXT, max_size=3),
    st.dictionaries(TEXT, TEXT, max_size=2),
    st.sampled_from(["Sort a list.", "  sort A   list. ", "SORT a list.", "sorted(xs)", "Cafe\u0301"]),
)
ROW = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, VALUE))


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(ROW, max_size=12))
def test_cleaner_keeps_clean_text_or_counts_the_row(rows):
    loaded = [{"row": i, **{f: r.get(f) for f in FIELDS}} for i, r in enumerate(rows)]
    card = DataCard(source="mem", rows_in=len(loaded))
    kept = clean_rows(loaded, card)
    assert len(kept) + sum(card.dropped.values()) == len(rows)
    assert set(card.dropped) == set(REASONS)
    assert [r["row"] for r in kept] == sorted(r["row"] for r in kept)  # source order
    assert len({dedup_key(r) for r in kept}) == len(kept)  # no two kept rows are duplicates
    for r in kept:
        src = rows[r["row"]]
        for f in FIELDS:
            assert isinstance(r[f], str) and r[f] == (src.get(f) or "")  # exactly the source text
        assert r["instruction"].strip() and r["output"].strip()
    for i, src in enumerate(rows):
        if any(src.get(f) is not None and not isinstance(src.get(f), str) for f in FIELDS):
            assert i not in {r["row"] for r in kept}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    instruction=TEXT,
    input=st.one_of(st.just(""), TEXT),
    output=TEXT,
    template=st.sampled_from(["alpaca", "chat"]),
    max_length=st.integers(9, 96),
)
def test_formatter_gives_consistent_labels_or_none(tokenizer, instruction, input, output, template, max_length):
    if not instruction.strip() or not output.strip():
        return
    prompt = format_prompt(instruction, input, template, tokenizer)
    assert instruction in prompt and (not input.strip() or input in prompt)
    enc = encode_example(prompt, output, tokenizer, max_length)
    n_prompt = len(encode_prompt(prompt, tokenizer))
    n_response = len(tokenizer(output, add_special_tokens=False)["input_ids"]) + 1
    if enc is None:
        assert n_prompt + n_response > max_length
        return
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(enc["attention_mask"]) == n_prompt + n_response <= max_length
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id and all(m == 1 for m in enc["attention_mask"])
    assert labels[n_prompt:-1] == tokenizer(output, add_special_tokens=False)["input_ids"]  # the output as given


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=8))
def test_every_row_becomes_a_sample_or_a_counted_rejection(tokenizer, tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("prop") / "rows.json"
    path.write_text(json.dumps(rows, allow_nan=True))
    cfg = DataConfig(path=str(path), max_length=96, split=(1.0, 0.0, 0.0))
    try:
        splits, card = prepare_dataset(cfg, tokenizer, path.parent / "out")
    except QtuneError as err:  # the whole file rejected, in one line that says why
        present = {k for r in rows for k in r}
        if not {"instruction", "output"} <= present:
            assert "no column for" in str(err) and str(path) in str(err)
        else:
            assert "no usable rows left after cleaning" in str(err) and f"({len(rows)} read;" in str(err)
        return
    samples = list(splits["train"])
    assert card.rows_in == len(rows) and len(samples) + sum(card.dropped.values()) == len(rows)
    for s in samples:
        labels, ids = s["labels"], s["input_ids"]
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert (
            labels[first:] == ids[first:]
            and set(labels[:first]) == {IGNORE_INDEX}
            and ids[-1] == tokenizer.eos_token_id
        )
        assert len(ids) <= 96


def test_rows_too_few_for_a_training_split_and_zero_budget_are_one_line(tmp_path, tiny_model_dir):
    src = write_rows(tmp_path / "rows.json", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2)])
    out = tmp_path / "d"
    result = prepare_cli(src, out, tiny_model_dir, "--set", "data.split=[0.2, 0.4, 0.4]")
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"error: {src}: 2 usable rows leave no training rows after the validation and test splits "
        "(data.split=[0.2, 0.4, 0.4]); use more rows or smaller val/test fractions\n"
    )
    assert not (out / "splits").exists()
    result = prepare_cli(src, out, tiny_model_dir, "--max-length", "0")
    assert result.exit_code == 2
    assert result.output == "error: config: data.max_length: Input should be greater than 8 (got 0)\n"
