"""Benchmark decontamination: 13-gram overlap with HumanEval, dropped and counted in the data card."""

import gzip
import json

import pytest
from typer.testing import CliRunner

from qtune.cli import app
from qtune.config import DataConfig
from qtune.data.clean import DataCard
from qtune.data.decontaminate import decontaminate, default_benchmark_path, find_overlap, ngrams, words
from qtune.data.prepare import prepare_dataset
from qtune.errors import QtuneError

from conftest import prepare_cli, write_rows

runner = CliRunner()

# 13 consecutive words of HumanEval/0's docstring, re-cased, re-punctuated and re-indented; and the first 12 of them
FRAGMENT_13 = "CHECK if in given list\n    of numbers, are any two numbers -- closer to"
FRAGMENT_12 = "Check if in given list of numbers, are any two numbers closer"

PROBLEMS = [
    {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Return the sum of the two integers a and b, which may be '
        'negative or zero."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "assert add(1, 2) == 3\n",
        "entry_point": "add",
    },
    {
        "task_id": "Toy/1",
        "prompt": 'def rev(s):\n    """Return the string s written backwards, from its last '
        'character to its first one."""\n',
        "canonical_solution": "    return s[::-1]\n",
        "test": "",
        "entry_point": "rev",
    },
]
TOY_COPY = "Return the string s written backwards from its last character to its first one"  # 14 words of Toy/1


def _toy_benchmark(tmp_path, monkeypatch):
    """A two-problem HumanEval-format file as the shared data directory's humaneval/HumanEval.jsonl.gz."""
    folder = tmp_path / "shared" / "humaneval"
    folder.mkdir(parents=True)
    (folder / "HumanEval.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(p) for p in PROBLEMS).encode()))
    monkeypatch.setenv("QTUNE_DATA_DIR", str(tmp_path / "shared"))
    return folder / "HumanEval.jsonl.gz"


def test_words_are_lowercased_word_runs_and_ngrams_join_them():
    assert words("def Has_Close(x):\n    return  X[0]!= 1.5") == ["def", "has_close", "x", "return", "x", "0", "1", "5"]
    assert ngrams("Def  F(x):\n    return X", n=3) == {"def f x", "f x return", "x return x"}
    assert ngrams("one two", n=3) == set()
    assert len(words(FRAGMENT_13)) == 13 and len(words(FRAGMENT_12)) == 12


def test_a_copied_humaneval_fragment_is_dropped_and_counted(tmp_path, tokenizer):
    if not default_benchmark_path("humaneval").is_file():
        pytest.skip(f"{default_benchmark_path('humaneval')} not found")
    rows = [
        {
            "instruction": "Write a function that reverses a list.",
            "input": "",
            "output": "def rev(xs):\n    return xs[::-1]",
        },
        {"instruction": f"{FRAGMENT_13}.", "input": "", "output": "def f(numbers, t):\n    return False"},
        {
            "instruction": f"{FRAGMENT_12}.",
            "input": "",
            "output": "def f(numbers, t):\n    return True",
        },  # 12 words: kept
    ]
    cfg = DataConfig(
        path=str(write_rows(tmp_path / "rows.json", rows)), split=(1.0, 0.0, 0.0), decontaminate=["humaneval"]
    )
    splits, card = prepare_dataset(cfg, tokenizer, tmp_path / "out")
    assert card.dropped["contaminated"] == 1 and card.examples["contaminated"] == [1]
    assert card.decontaminated == ["humaneval"] and card.contamination == {"humaneval": {"HumanEval/0": [1]}}
    assert sorted(splits["train"]["row"]) == [0, 2] and card.rows_kept == 2
    assert f"  {'dropped: contaminated':<32}{1:>8}" in card.table()
    saved = json.loads((tmp_path / "out" / "data_card.json").read_text())
    assert saved["dropped"]["contaminated"] == 1 and saved["contamination"] == {"humaneval": {"HumanEval/0": [1]}}


def test_overlap_counts_rows_per_problem_and_shared_ngrams(tmp_path, monkeypatch):
    path = _toy_benchmark(tmp_path, monkeypatch)
    rows = [
        {"row": 0, "instruction": "Sum two numbers.", "input": None, "output": "a + b"},
        {"row": 1, "instruction": "Reverse a string.", "input": "", "output": f"# {TOY_COPY}\nreturn s[::-1]"},
        {"row": 2, "instruction": TOY_COPY, "input": 7, "output": "s[::-1]"},  # a field that is not text is skipped
    ]
    overlap = find_overlap(rows, "humaneval", path)
    assert overlap.rows_checked == 3 and overlap.rows == {1: {"Toy/1": 2}, 2: {"Toy/1": 2}}
    assert overlap.problems == {"Toy/1": [1, 2]}
    assert (
        overlap.summary().splitlines()[0]
        == "humaneval: 2 of 3 rows share a 13-gram with 1 of 2 problems (lowercased \\w+ words)"
    )


def test_decontaminate_drops_each_row_once(tmp_path, monkeypatch):
    _toy_benchmark(tmp_path, monkeypatch)
    rows = [
        {"row": i, "instruction": text, "input": "", "output": "x"}
        for i, text in enumerate(
            ["Add them.", TOY_COPY, "Return the sum of the two integers a and b which may be negative or zero"]
        )
    ]
    card = DataCard(source="mem", rows_in=3)
    kept = decontaminate(rows, card, ["humaneval", "humaneval"])
    assert [r["row"] for r in kept] == [0]
    assert card.dropped["contaminated"] == 2 and card.examples["contaminated"] == [1, 2]
    assert card.decontaminated == ["humaneval"] and card.contamination == {"humaneval": {"Toy/0": [2], "Toy/1": [1]}}


def test_not_checked_shows_a_dash():
    card = DataCard(source="mem", rows_in=1)
    assert f"  {'dropped: contaminated':<32}{'-':>8}" in card.table()
    assert DataConfig.model_fields["decontaminate"].get_default(call_default_factory=True) == []  # off unless asked


def test_overlap_and_prepare_commands(tmp_path, monkeypatch, tiny_model_dir):
    _toy_benchmark(tmp_path, monkeypatch)
    src = write_rows(
        tmp_path / "rows.json",
        [
            {"instruction": "Reverse s.", "output": TOY_COPY},
            {"instruction": "Add.", "output": "a + b"},
            {"instruction": "Sub.", "output": "a - b"},
        ],
    )
    result = runner.invoke(app, ["data", "overlap", "--data", str(src), "--benchmark", "humaneval"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "humaneval: 1 of 3 rows share a 13-gram with 1 of 2 problems (lowercased \\w+ words)\n"
        "  Toy/1 (5 13-grams): rows 0 (2)\n"
    )
    out = tmp_path / "prepared"
    result = prepare_cli(
        src, out, tiny_model_dir, "--decontaminate", "humaneval", "--set", "data.split=[1.0, 0.0, 0.0]"
    )
    assert result.exit_code == 0, result.output
    assert f"  {'dropped: contaminated':<32}{1:>8}\n" in result.output
    card = json.loads((out / "data_card.json").read_text())
    assert card["rows_kept"] == 2 and card["contamination"] == {"humaneval": {"Toy/1": [0]}}


def test_missing_or_unknown_benchmark_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_DATA_DIR", str(tmp_path / "nowhere"))
    src = write_rows(tmp_path / "rows.json", [{"instruction": "Add.", "output": "a + b"}])
    result = runner.invoke(app, ["data", "overlap", "--data", str(src)])
    assert result.exit_code == 2
    assert result.output == (
        f"error: {tmp_path / 'nowhere' / 'humaneval' / 'HumanEval.jsonl.gz'}: humaneval problems not "
        "found (needed to decontaminate against humaneval); set QTUNE_DATA_DIR to the folder "
        "holding humaneval/HumanEval.jsonl.gz\n"
    )
    result = runner.invoke(app, ["data", "overlap", "--data", str(src), "--benchmark", "mbpp"])
    assert result.exit_code == 2
    assert result.output == "error: config: data.decontaminate.0: Input should be 'humaneval' (got 'mbpp')\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "X/0"}\n')
    with pytest.raises(
        QtuneError, match=r"bad.jsonl:1: not a humaneval problem \(expected an object with text task_id and prompt\)"
    ):
        find_overlap([], "humaneval", bad)
