import json
from collections import Counter

import pytest

from qtune.config import DataConfig
from qtune.data.clean import DataCard, clean_rows
from qtune.data.load import load_rows
from qtune.data.prepare import load_splits, prepare_dataset
from qtune.data.split import split_indices
from qtune.data.templates import format_prompt
from qtune.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt, padding_collator
from qtune.errors import QtuneError

from conftest import CODEALPACA, write_rows

FAULTY_ROWS = [
    {
        "instruction": "Add two numbers.",
        "input": None,
        "output": "def add(a, b):\n    return a + b",
    },  # kept, null input
    {"instruction": "Reverse a list.", "input": "", "output": "xs[::-1]"},  # kept
    {"instruction": "Reverse a list.\n", "input": None, "output": "xs[::-1]  \r\n\n"},  # duplicate of row 1
    {"instruction": "Print hello.", "input": "", "output": ""},  # empty output
    {"instruction": "   ", "input": "", "output": "print(1)"},  # empty instruction (whitespace only)
    {"instruction": "Write a long essay.", "input": "", "output": "word " * 3000},  # over the token budget
    {"instruction": "Square a number.", "input": "", "output": 42},  # not text
    {"instruction": "Cafe\u0301 sign.", "input": "", "output": "print('Cafe\u0301')"},  # kept exactly as given
]


def test_cleaning_counts_each_fault_kind(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rows.json", FAULTY_ROWS)
    cfg = DataConfig(path=str(path), max_length=256, split=(1.0, 0.0, 0.0))
    splits, card = prepare_dataset(cfg, tokenizer, tmp_path / "out")
    assert card.rows_in == 8 and card.rows_kept == 3
    assert card.dropped == {
        "not_text": 1,
        "empty_instruction": 1,
        "empty_output": 1,
        "duplicate": 1,
        "contaminated": 0,
        "over_token_budget": 1,
    }
    assert card.examples["duplicate"] == [2] and card.examples["over_token_budget"] == [5]
    assert sorted(splits["train"]["row"]) == [0, 1, 7]
    saved = json.loads((tmp_path / "out" / "data_card.json").read_text())
    assert saved["rows_kept"] == 3 and saved["dropped"]["duplicate"] == 1
    assert load_splits(tmp_path / "out")["train"].num_rows == 3
    assert "dropped: duplicate" in card.table()


def test_text_is_kept_exactly():
    card = DataCard(source="x", rows_in=1)
    [row] = clean_rows([{"row": 0, "instruction": " Cafe\u0301 ", "input": None, "output": "\tok\n"}], card)
    assert row == {"row": 0, "instruction": " Cafe\u0301 ", "input": "", "output": "\tok\n"}


def test_huge_row_dropped_without_tokenizing(tmp_path, tokenizer, monkeypatch):
    rows = [
        {"instruction": "big", "input": "", "output": "x" * 5_000_000},
        {"instruction": "small", "input": "", "output": "y"},
    ]
    path = write_rows(tmp_path / "rows.json", rows)
    seen = []
    original = tokenizer.__class__.__call__
    monkeypatch.setattr(
        tokenizer.__class__,
        "__call__",
        lambda self, text, **kw: (seen.append(len(text)), original(self, text, **kw))[1],
    )
    _, card = prepare_dataset(
        DataConfig(path=str(path), max_length=64, split=(1.0, 0.0, 0.0)), tokenizer, tmp_path / "o"
    )
    assert card.dropped["over_token_budget"] == 1 and card.rows_kept == 1
    assert max(seen) < 1000


def test_jsonl_bom_crlf_and_line_numbers(tmp_path):
    good = tmp_path / "rows.jsonl"
    good.write_bytes(
        b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\r\n\r\n{"instruction": "c", "output": "d"}\r\n'
    )
    rows, unit = load_rows(str(good))
    assert unit == "line" and [r["row"] for r in rows] == [1, 3] and rows[1]["instruction"] == "c"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", output: "d"}\n')
    with pytest.raises(QtuneError, match=r"bad.jsonl:2:\d+: invalid JSON"):
        load_rows(str(bad))


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "file is empty"),
        ('{"instruction": "a", "output": "b"}', "top level is an object; expected a JSON array"),
        ('[{"instruction": "a", "output": "b"}, [1, 2]]', "row 1: expected an object"),
        (
            '[{"prompt": "a", "completion": "b"}]',
            "no column for instruction (column 'instruction'), output (column 'output'); "
            "expected columns ['input', 'instruction', 'output'], found ['completion', 'prompt']",
        ),
    ],
)
def test_malformed_json_files(tmp_path, content, expected):
    path = tmp_path / "rows.json"
    path.write_text(content)
    with pytest.raises(QtuneError) as err:
        load_rows(str(path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[\n{"instruction": "a", "output": "\xff"}]')
    with pytest.raises(QtuneError, match=r"rows.json:2: not UTF-8"):
        load_rows(str(path))


def test_column_mapping(tmp_path):
    path = write_rows(tmp_path / "rows.json", [{"prompt": "a", "completion": "b"}])
    rows, _ = load_rows(str(path), {"instruction": "prompt", "output": "completion"})
    assert rows == [{"row": 0, "instruction": "a", "input": None, "output": "b"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "input": ["", "x"], "output": ["1", "2"]}), path)
    rows, _ = load_rows(str(path))
    assert [r["output"] for r in rows] == ["1", "2"]


def test_alpaca_template_variants():
    assert format_prompt("Sum.", "").endswith("### Instruction:\nSum.\n\n### Response:\n")
    with_input = format_prompt("Sum.", "1 2")
    assert "paired with an input" in with_input and "### Input:\n1 2\n\n### Response:\n" in with_input
    assert "### Input" not in format_prompt("Sum.", "")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_label_invariants_on_real_rows(tmp_path, tokenizer, template):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: pad is EOS, the hard case for EOS training
    cfg = DataConfig(path=str(CODEALPACA), max_rows=400, max_length=256, template=template)
    splits, card = prepare_dataset(cfg, tokenizer, tmp_path / template)
    rows = {r["row"]: r for r in load_rows(str(CODEALPACA), max_rows=400)[0]}
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    n = 0
    for split in splits.values():
        for sample in split:
            ids, labels = sample["input_ids"], sample["labels"]
            supervised = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
            assert supervised, "no sample may be all -100"
            first = supervised[0]
            assert supervised == list(range(first, len(ids))), "prompt masked, response fully supervised"
            assert labels[-1] == eos and [labels[i] for i in supervised].count(eos) == 1
            row = rows[sample["row"]]
            prompt = format_prompt(row["instruction"], row["input"] or "", template, tokenizer)
            assert first == len(encode_prompt(prompt, tokenizer))
            assert ids[:first] == encode_prompt(prompt, tokenizer)
            assert tokenizer.decode(labels[first:-1]) == row["output"]  # the supervised text is the output, exactly
            assert ids[:2] != [bos, bos]
            n += 1
    assert n == card.rows_kept > 350


def test_collator_pads_labels_with_ignore_index(tokenizer):
    a = encode_example("### Instruction:\nx\n\n### Response:\n", "yes", tokenizer, 64)
    b = encode_example("### Instruction:\nlonger question here\n\n### Response:\n", "a longer answer", tokenizer, 64)
    batch = padding_collator(tokenizer)([a, b])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(b["input_ids"]))
    pad = len(b["input_ids"]) - len(a["input_ids"])
    assert batch["labels"][0, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["attention_mask"][0].sum() == len(a["input_ids"])
    assert batch["labels"][0, len(a["input_ids"]) - 1] == tokenizer.eos_token_id


def test_truncated_response_is_dropped_not_cut(tokenizer):
    prompt = format_prompt("Explain.", "")
    assert encode_example(prompt, "word " * 200, tokenizer, max_length=64) is None
    enc = encode_example(prompt, "short", tokenizer, max_length=64)
    assert enc is not None and enc["labels"][-1] == tokenizer.eos_token_id


def test_split_is_seeded_disjoint_and_sized():
    a = split_indices(1000, (0.9, 0.05, 0.05), seed=1)
    assert a == split_indices(1000, (0.9, 0.05, 0.05), seed=1)
    assert a != split_indices(1000, (0.9, 0.05, 0.05), seed=2)
    assert Counter(len(v) for v in a.values()) == Counter([900, 50, 50])
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(1000))


def test_no_rows_left_is_an_error(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rows.json", [{"instruction": "a", "input": "", "output": ""}])
    with pytest.raises(QtuneError, match="no usable rows left after cleaning"):
        prepare_dataset(DataConfig(path=str(path)), tokenizer, tmp_path / "o")
