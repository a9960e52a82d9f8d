"""Text is trained exactly as given: no strip of outputs, inputs or earlier answers; duplicates keep indentation."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtune.config import DataConfig
from qtune.data.clean import DataCard, clean_rows, dedup_key, text_key
from qtune.data.load import load_rows
from qtune.data.prepare import prepare_dataset
from qtune.data.templates import format_conversation, format_prompt
from qtune.data.tokenize import IGNORE_INDEX, encode_example, encode_prompt

from conftest import write_rows

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"


def _supervised_text(sample, tokenizer) -> str:
    """The text of the supervised labels (the response), without the final EOS."""
    labels = sample["labels"]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert labels[-1] == tokenizer.eos_token_id and labels[first:] == sample["input_ids"][first:]
    return tokenizer.decode(labels[first:-1])


def test_indented_outputs_are_trained_exactly(tmp_path, tokenizer):
    path = CASES / "indented-output" / "rows.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    source = json.loads(path.read_text(encoding="utf-8"))
    splits, card = prepare_dataset(DataConfig(path=str(path), split=(1.0, 0.0, 0.0)), tokenizer, tmp_path / "out")
    assert card.rows_in == card.rows_kept == 7 and sum(card.dropped.values()) == 0
    samples = {s["row"]: s for s in splits["train"]}
    assert sorted(samples) == list(range(7))
    for i, row in enumerate(source):
        assert _supervised_text(samples[i], tokenizer) == row["output"]
    assert _supervised_text(samples[4], tokenizer) == "    x = 1"
    assert _supervised_text(samples[0], tokenizer).startswith("    total = 0\n    for x in xs:\n")


@pytest.mark.parametrize(
    "output",
    [
        "    x = 1",
        "\tx = 1",
        "\n\nx = 1",
        "\r\nx = 1\r\n",
        " x",
        "  ",
        "def f():\n    return 1\n\n",
        "x = 1 \n",
        "\u00a0\u3000x",
        '    """Doc."""\n    return None',
    ],
)
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_response_boundary_keeps_leading_whitespace(tokenizer, output, template):
    prompt = format_prompt("Write it.", "", template, tokenizer)
    enc = encode_example(prompt, output, tokenizer, max_length=256)
    assert enc["input_ids"][: len(encode_prompt(prompt, tokenizer))] == encode_prompt(prompt, tokenizer)
    assert _supervised_text(enc, tokenizer) == output


def test_inputs_and_instructions_are_placed_exactly():
    prompt = format_prompt("  Fix the indentation:\n", "    if x:\n    return 1\n")
    assert (
        "### Instruction:\n  Fix the indentation:\n\n\n### Input:\n    if x:\n    return 1\n\n\n### Response:\n"
        in prompt
    )
    # an input that is whitespace only is no input (the one place whitespace is tested)
    assert format_prompt("Sum.", " \n\t") == format_prompt("Sum.", "")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_earlier_answers_keep_their_indentation(tokenizer, template):
    answer = "    total = 0\n    for x in xs:\n        total += x\n"
    text = format_conversation(
        [
            {"role": "user", "content": "Body of total(xs)?"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "\tAnd for a product?"},
        ],
        template,
        tokenizer,
    )
    assert answer in text and "\tAnd for a product?" in text
    if template == "alpaca":
        assert text.endswith(f"### Response:\n{answer}\n\n### Instruction:\n\tAnd for a product?\n\n### Response:\n")


def _row(i, output, instruction="Write a guard clause.", input=""):
    return {"row": i, "instruction": instruction, "input": input, "output": output}


def test_duplicate_key_keeps_indentation_and_case():
    rows = [
        _row(0, "if not xs:\n    return None"),
        _row(1, "if not xs:\n        return None"),  # other indentation: kept
        _row(2, "if not xs:\n\treturn None"),  # tab instead of spaces: kept
        _row(3, "    if not xs:\n    return None"),  # first line indented: kept
        _row(4, "IF not xs:\n    return None"),  # other case: kept (code is case-sensitive)
        _row(
            5, "if not xs:  \r\n    return None\r\n\n"
        ),  # line endings, trailing spaces, blank edge lines: duplicate of 0
        _row(6, "\n\nif not xs:\n    return None"),  # blank leading lines: duplicate of 0
        _row(7, "if not xs:\n    return None", instruction="Write a guard clause.  \n"),  # duplicate of 0
        _row(8, "if not xs:\n\n    return None"),  # a blank line inside: kept
    ]
    card = DataCard(source="mem", rows_in=len(rows))
    kept = clean_rows(rows, card)
    assert [r["row"] for r in kept] == [0, 1, 2, 3, 4, 8]
    assert card.dropped["duplicate"] == 3 and card.examples["duplicate"] == [5, 6, 7]
    assert [r["output"] for r in kept] == [rows[i]["output"] for i in (0, 1, 2, 3, 4, 8)]


def test_text_key():
    assert text_key("\n  \n  x = 1  \r\n\ty\t\n\n") == "  x = 1\n\ty"
    assert text_key("Cafe\u0301") == text_key("Caf\u00e9")  # canonically equivalent spellings of one text
    assert text_key("X") != text_key("x")
    assert dedup_key({"instruction": "a", "input": "", "output": " b"}) != dedup_key(
        {"instruction": "a", "input": "", "output": "b"}
    )


INDENT = st.text(alphabet=" \t", min_size=1, max_size=6)
LINE = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Cc", "Zl", "Zp")), min_size=1, max_size=20
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(LINE, min_size=1, max_size=4), a=st.one_of(st.just(""), INDENT), b=INDENT, k=st.integers(0, 3))
def test_rows_that_differ_in_indentation_are_never_merged(lines, a, b, k):
    k = min(k, len(lines) - 1)  # line k is indented by a in the first row and by a + b in the second
    first = "\n".join(a + line if i == k else line for i, line in enumerate(lines))
    second = "\n".join(a + b + line if i == k else line for i, line in enumerate(lines))
    card = DataCard(source="mem", rows_in=2)
    kept = clean_rows([_row(0, first), _row(1, second)], card)
    assert [r["output"] for r in kept] == [first, second] and card.dropped["duplicate"] == 0


def test_whitespace_only_fields_are_empty_and_real_text_is_unchanged(tmp_path):
    rows = [
        {"instruction": "\u3000\n", "output": "x"},
        {"instruction": "a", "output": " \t\r\n"},
        {"instruction": "\ta\n", "input": " ", "output": "  x\n"},
    ]
    path = write_rows(tmp_path / "rows.json", rows)
    loaded, _ = load_rows(str(path))
    card = DataCard(source=str(path), rows_in=3)
    kept = clean_rows(loaded, card)
    assert card.dropped["empty_instruction"] == 1 and card.dropped["empty_output"] == 1
    assert kept == [{"row": 2, "instruction": "\ta\n", "input": " ", "output": "  x\n"}]
