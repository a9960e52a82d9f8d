"""HumanEval: pass@k estimator, code extraction, scoring a samples file (CLI), prompt in the training template."""

import gzip
import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtune.cli import app
from qtune.evaluate.humaneval import (
    build_program,
    check_call,
    default_humaneval_path,
    extract_code,
    load_problems,
    pass_at_k,
    problem_prompt,
    score_samples,
)
from qtune.evaluate.sandbox import SandboxLimits

runner = CliRunner()
HUMANEVAL = default_humaneval_path()
needs_data = pytest.mark.skipif(not HUMANEVAL.is_file(), reason="shared HumanEval file not present")
CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"

ADD = {
    "task_id": "Toy/0",
    "prompt": 'import math\n\n\ndef add(a: int, b: int) -> int:\n    """Sum of a and b.\n'
    '    >>> add(2, 3)\n    5\n    """\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "canonical_solution": "    return a + b\n",
}


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (20, 1, 10, 0.5),  # 1 - C(19,10)/C(20,10) = 1 - 10/20
        (4, 3, 2, 1.0),  # n - c < k: every draw of 2 holds a pass
        (200, 0, 100, 0.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12, abs_tol=1e-15)


def test_pass_at_k_matches_binomials_for_large_n():
    assert math.isclose(pass_at_k(200, 13, 100), 1 - math.comb(187, 100) / math.comb(200, 100), rel_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def passes(completion: str, problem=ADD) -> bool:
    namespace: dict = {}
    try:
        exec(build_program(problem, completion), namespace)  # trusted test code, so no sandbox needed
        eval(check_call(problem), namespace)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize(
    "answer",
    [
        "Here is the function:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\nIt adds.",
        "```\n    return a + b\n```",
        "Sure.\n```py\nimport math\n\ndef add(a, b):\n    return int(math.fsum([a, b]))\n```",
        "```python\nprint('usage')\n```\nand\n```python\ndef add(a, b):\n    return a + b\n```",  # block with the def
        "```python\ndef add(a, b):\n    return a + b\n",  # unclosed fence (generation hit max tokens)
        "    return a + b\n",  # raw body, indented
        "return a + b",  # raw body, not indented
        "    total = a + b\n    return total\nThis returns the sum.",  # body, then prose
        "import operator\n\ndef add(a: int, b: int) -> int:\n    return operator.add(a, b)\n\n"
        "This uses operator.add.",  # full function, import above, prose after
        "    def add(a, b):\n        return a + b\n",  # re-stated function, indented
        "def add(a, b):\n    return a + b\n\n# Test the function\nprint(addd(2, 3))  # 5\n",  # example call cut
    ],
)
def test_extracted_code_passes(answer):
    assert passes(extract_code(answer, ADD))


def test_extraction_of_a_wrong_answer_still_fails():
    assert not passes(extract_code("```python\ndef add(a, b):\n    return a - b\n```", ADD))
    assert extract_code("", ADD) == "    pass\n"
    assert not passes(extract_code("", ADD))


@pytest.mark.slow
def test_score_samples_reports_each_status(tmp_path):
    problems = {"Toy/0": ADD}
    samples = [
        {"task_id": "Toy/0", "completion": "    return a + b\n"},
        {"task_id": "Toy/0", "completion": "    return a - b\n"},
        {"task_id": "Toy/0", "completion": "    return undefined_name\n"},
        {"task_id": "Toy/0", "completion": "    while True:\n        pass\n"},
    ]
    out = tmp_path / "results.jsonl"
    summary = score_samples(
        problems, samples, (1, 2), SandboxLimits(timeout_s=2, memory_mb=256, nproc=8), workers=2, results_path=out
    )
    assert summary["counts"] == {"passed": 1, "failed": 1, "timed out": 1, "error": 1}
    assert summary["pass@1"] == pytest.approx(0.25) and summary["pass@2"] == pytest.approx(0.5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["passed", "failed", "error", "timed out"]
    assert rows[2]["error"] == "NameError: name 'undefined_name' is not defined"
    assert rows[0]["passed"] is True and rows[1]["passed"] is False
    assert summary["results"] == str(out) and "warning" not in summary


def test_the_program_does_not_call_check_the_sandbox_does():
    assert build_program(ADD, "    return a + b\n") == ADD["prompt"] + "    return a + b\n\n\n" + ADD["test"] + "\n"
    assert check_call(ADD) == "check(add)"


@pytest.mark.parametrize(
    "tail, status, error",
    [
        ("\nimport sys\nsys.exit(0)\n", "error", "program ended before check() completed (SystemExit: 0)"),
        ("\nimport os\nos._exit(0)\n", "error", "program ended before check() completed (exit status 0)"),
        (
            "\nimport unittest\nclass T(unittest.TestCase):\n    def test_nothing(self):\n"
            "        pass\nunittest.main()\n",
            "error",
            "program ended before check() completed (SystemExit: False)",
        ),
        (
            "\nif __name__ == '__main__':\n    import sys\n    sys.exit(0)\n",
            "error",
            "program ended before check() completed (SystemExit: 0)",
        ),
        ("\nimport atexit, os\natexit.register(os._exit, 0)\n", "failed", "AssertionError"),
        ("\nprint('passed')\n", "failed", "AssertionError"),
    ],
    ids=["sys.exit", "os._exit", "unittest.main", "__main__ block", "atexit", "printed marker"],
)
def test_a_wrong_answer_that_ends_early_scores_zero(tmp_path, tail, status, error):
    samples = [
        {"task_id": "Toy/0", "completion": "    return a - b\n" + tail},
        {"task_id": "Toy/0", "completion": "    return a + b\n" + tail},
    ]  # right, but the same ending
    out = tmp_path / "results.jsonl"
    summary = score_samples(
        {"Toy/0": ADD}, samples, (1,), SandboxLimits(timeout_s=5, memory_mb=256, nproc=8), results_path=out
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (rows[0]["status"], rows[0]["error"]) == (status, error)
    ends_early = status == "error"  # then the right answer never reaches check() either
    assert (rows[1]["status"], rows[1]["error"]) == ((status, error) if ends_early else ("passed", ""))
    assert summary["pass@1"] == (0.0 if ends_early else 0.5)


EXIT_STATUS_CASE = CASES / "humaneval-exit-status" / "samples.jsonl"
needs_case = pytest.mark.skipif(not EXIT_STATUS_CASE.is_file(), reason="shared case humaneval-exit-status missing")


@needs_data
@needs_case
def test_cli_exit_status_case_scores_zero_and_writes_results_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the samples sit in a read-only folder; results go to the current directory
    code, output = run("eval", "humaneval", "--samples-file", EXIT_STATUS_CASE, "--json")
    assert code == 0, output
    summary = json.loads(output)
    assert summary["pass@1"] == 0.0 and summary["counts"] == {"passed": 0, "failed": 1, "timed out": 0, "error": 1}
    assert summary["results"] == "samples_results.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["status"], r["error"]) for r in rows] == [
        ("HumanEval/0", "error", "program ended before check() completed (SystemExit: 0)"),
        ("HumanEval/2", "failed", "AssertionError"),
    ]
    code, output = run("eval", "humaneval", "--samples-file", EXIT_STATUS_CASE, "--out", tmp_path / "sub")
    assert code == 0 and re.search(r"^pass@1 +0\.0000$", output, re.M), output
    assert f"results: {tmp_path / 'sub' / 'samples_results.jsonl'}" in output
    assert len((tmp_path / "sub" / "samples_results.jsonl").read_text().splitlines()) == 2


@needs_data
@needs_case
def test_cli_unwritable_out_still_prints_the_score(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = runner.invoke(
        app, ["eval", "humaneval", "--samples-file", str(EXIT_STATUS_CASE), "--out", str(blocker / "x"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pass@1"] == 0.0 and summary["results"] is None
    warning = f"{blocker / 'x' / 'samples_results.jsonl'}: cannot write (Not a directory)"
    assert summary["warning"] == warning
    assert result.stderr == f"warning: {warning}\n"
    result = runner.invoke(app, ["eval", "humaneval", "--samples-file", str(EXIT_STATUS_CASE), "--out", str(blocker)])
    assert result.exit_code == 0, result.output
    assert re.search(r"^pass@1 +0\.0000$", result.stdout, re.M) and "results:" not in result.stdout
    assert result.stderr.startswith("warning: ") and len(result.stderr.splitlines()) == 1


@pytest.mark.slow
@needs_data
def test_cli_canonical_solutions_score_one_and_wrong_answers_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the per-sample results go
    rows = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]
    assert len(rows) == 164
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(
        "".join(json.dumps({"task_id": r["task_id"], "completion": r["canonical_solution"]}) + "\n" for r in rows)
    )
    bad.write_text(
        "".join(json.dumps({"task_id": r["task_id"], "completion": "    return None\n"}) + "\n" for r in rows[:12])
    )
    code, output = run("eval", "humaneval", "--samples-file", good, "--json")
    assert code == 0, output
    summary = json.loads(output)
    assert summary["pass@1"] == 1.0 and summary["counts"]["passed"] == 164
    assert len((tmp_path / "good_results.jsonl").read_text().splitlines()) == 164
    code, output = run("eval", "humaneval", "--samples-file", bad)
    assert code == 0, output
    assert re.search(r"^pass@1 +0\.0000$", output, re.M) and re.search(r"^passed +0$", output, re.M), output
    statuses = {json.loads(line)["status"] for line in (tmp_path / "bad_results.jsonl").read_text().splitlines()}
    assert statuses <= {"failed", "error"} and "failed" in statuses


@needs_data
@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (
            ['{"task_id": "HumanEval/0", "completion": "    return 1\\n"}'],
            ["--k", "2"],
            "error: --k 2: expected 1 to 1 (the fewest samples of any problem)",
        ),
        (['{"task_id": "Nope/1", "completion": ""}'], [], "error: {f}:1: unknown task_id 'Nope/1'"),
        (['{"task_id": "HumanEval/0"}'], [], "error: {f}:1: expected string fields task_id and completion"),
        (["not json"], [], "error: {f}:1:1: invalid JSON"),
        (["[" * 100_000 + "]" * 100_000], [], "error: {f}:1: invalid JSON: nested too deeply"),
        (
            ['{"completion": "x"}'],
            [],
            "error: {f}:1: expected string fields task_id and completion (task_id is missing",
        ),
        ([], [], "error: {f}: no samples"),
    ],
)
def test_cli_bad_samples_are_one_line_and_exit_2(tmp_path, lines, extra, message):
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(lines))
    code, output = run("eval", "humaneval", "--samples-file", f, *extra)
    assert code == 2
    assert len(output.strip().splitlines()) == 1 and output.startswith(message.format(f=f)), output


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(
            ["eval", "humaneval", "--samples-file", "missing.jsonl"],
            "error: missing.jsonl: file not found",
            marks=needs_data,
        ),  # the problems are read first
        (["eval", "humaneval", "--limit", "2"], "error: eval humaneval: pass --run DIR"),
        (["eval", "humaneval", "--run", "no/such/run"], "error: no/such/run: not a qtune run directory"),
        (
            ["eval", "humaneval", "--run", "no/such/run", "--problems", "x.jsonl"],
            "error: no/such/run: not a qtune run directory",
        ),
        (
            ["eval", "humaneval", "--run", "r", "--samples-file", "s.jsonl"],
            "error: eval humaneval: --run generates, --samples-file scores a file: pass one of them",
        ),
    ],
)
def test_cli_humaneval_usage_errors(args, message):
    code, output = run(*args)
    assert code == 2 and len(output.strip().splitlines()) == 1 and output.startswith(message), output


def test_prompt_uses_the_training_template():
    prompt = problem_prompt(ADD, "alpaca")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nComplete the following Python function." in prompt
    assert "### Input:\nimport math\n\n\ndef add(a: int, b: int) -> int:" in prompt
    assert prompt.endswith('    """\n\n### Response:\n')


@needs_data
def test_problems_file_loads():
    problems = load_problems()
    assert len(problems) == 164 and problems["HumanEval/0"]["entry_point"] == "has_close_elements"


def test_dequantized_nf4_model_gives_the_same_logits(tiny_model_dir):
    """Same logits as bitsandbytes' fp32 dequantize-and-matmul path (its bf16 CPU kernel is switched off)."""
    import torch

    from qtune.config import ModelConfig, QuantConfig
    from qtune.model.load import load_model
    from qtune.model.quantize import dequantize_for_inference

    ids = torch.tensor([[1, 50, 300, 7, 1000, 42]])
    model = load_model(tiny_model_dir, ModelConfig(name=tiny_model_dir), QuantConfig(quant="nf4"))
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' fp32 path: dequantize, then matmul
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        assert dequantize_for_inference(model) == 14  # 2 layers x (4 attention + 3 MLP) linears
        out = model(input_ids=ids).logits
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert torch.allclose(reference, out, atol=1e-5, rtol=1e-5), (reference - out).abs().max()
