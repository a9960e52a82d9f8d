"""HumanEval code extraction: answers whose indentation differs from the prompt's are re-indented by structure."""

import ast
import json
import re
import textwrap
from pathlib import Path

import pytest

from qtune.evaluate.humaneval import default_humaneval_path, extract_code, load_problems, score_samples
from qtune.evaluate.sandbox import SandboxLimits

HUMANEVAL = default_humaneval_path()
needs_data = pytest.mark.skipif(not HUMANEVAL.is_file(), reason="shared HumanEval file not present")
INDENT_CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases" / "humaneval-indent" / "answers.jsonl"
LIMITS = SandboxLimits(timeout_s=10, memory_mb=512, nproc=8)

ADD = {
    "task_id": "Toy/0",
    "prompt": 'import math\n\n\ndef add(a: int, b: int) -> int:\n    """Sum of a and b.\n    """\n',
    "entry_point": "add",
}


def score(problems: dict, samples: list[dict], tmp_path) -> dict:
    """score_samples, with the task ids and errors of the samples that did not pass in the assertion message."""
    out = tmp_path / "results.jsonl"
    summary = score_samples(problems, samples, (1,), LIMITS, workers=2, results_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    bad = [(r["task_id"], r["status"], r["error"]) for r in rows if not r["passed"]]
    assert summary["pass@1"] == 1.0 and summary["counts"]["passed"] == len(samples), bad[:10]
    return summary


@needs_data
@pytest.mark.skipif(not INDENT_CASES.is_file(), reason="shared humaneval-indent cases not present")
def test_two_space_answers_from_the_shared_cases_pass(tmp_path):
    problems = load_problems()
    rows = [json.loads(line) for line in INDENT_CASES.read_text().splitlines() if line.strip()]
    samples = [{"task_id": r["task_id"], "completion": extract_code(r["answer"], problems[r["task_id"]])} for r in rows]
    for r, s in zip(rows, samples, strict=True):  # canonical bodies written with two spaces: back to the canonical text
        assert s["completion"] == problems[r["task_id"]]["canonical_solution"], r["task_id"]
    assert score(problems, samples, tmp_path)["samples"] == len(rows) == 3


def with_unit(body: str, unit: str) -> str:
    """A function body (four spaces a level) rewritten by its syntax tree with ``unit`` a level: the reference
    re-indentation, independent of the one under test (the canonical solutions hold no multi-line strings)."""
    text = ast.unparse(ast.parse("def f():\n" + body).body[0])
    lines = text.splitlines()[1:]
    body = "".join(re.sub(r"^(?:    )+", lambda m: unit * (len(m.group()) // 4), line) + "\n" for line in lines)
    return body.lstrip("\n")  # unparse puts a blank line before a nested def


def restated(problem: dict) -> tuple[str, str]:
    """The prompt's ``def`` line(s) of the entry point, and the function's body without its docstring (four
    spaces a level): statements the prompt puts above the docstring (HumanEval/115's ``import math``), then the
    canonical solution."""
    lines = problem["prompt"].splitlines(keepends=True)
    d = [
        n
        for n in ast.walk(ast.parse(problem["prompt"]))
        if isinstance(n, ast.FunctionDef) and n.name == problem["entry_point"]
    ][-1]
    doc = next(n for n in d.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    return "".join(lines[d.lineno - 1 : d.body[0].lineno - 1]), "".join(lines[d.body[0].lineno - 1 : doc.lineno - 1])


@pytest.mark.slow
@needs_data
def test_canonical_solutions_in_any_indentation_extract_to_passing_code(tmp_path):
    """All 164 canonical bodies, written with 2, 3, 8 spaces or tabs a level (raw, fenced, with the first line's
    indentation lost, 2 spaces a level from column 6), or as the whole function with 2 spaces in a fence
    between prose: each extracts to the four-space body (the raw answers), and every distinct completion
    passes in the sandbox."""
    problems = load_problems()
    samples = {}
    for task_id, p in problems.items():
        four = with_unit(p["canonical_solution"], "    ")
        raw = {unit: with_unit(p["canonical_solution"], unit) for unit in ("  ", "   ", " " * 8, "\t")}
        answers = [
            *raw.values(),
            f"```python\n{raw['   ']}```\n",
            "Sure:\n```\n" + raw["\t"] + "```",
            raw["  "].lstrip(),
            four.lstrip(),
            textwrap.indent(raw["  "], " " * 6),
        ]
        for answer in answers:
            assert extract_code(answer, p) == four, (task_id, answer)
        samples[(task_id, four)] = None
        head, above = restated(p)
        answer = f"Here is the function:\n```python\n{head}{with_unit(above + p['canonical_solution'], '  ')}```\nDone."
        completion = extract_code(answer, p)
        assert completion == "\n" + head + with_unit(above + p["canonical_solution"], "    "), task_id
        samples[(task_id, completion)] = None
        samples[(task_id, extract_code(p["canonical_solution"].lstrip(), p))] = None  # the original text
    summary = score(problems, [{"task_id": t, "completion": c} for t, c in samples], tmp_path)
    assert summary["problems"] == 164


@pytest.mark.parametrize(
    "answer, expected",
    [
        # two spaces a level, as small models write
        ("  if a > 0:\n    return a + b\n  return b\n", "    if a > 0:\n        return a + b\n    return b\n"),
        # first line not indented, the rest two spaces a level relative to it
        (
            "for x in [a]:\n  if x:\n    return x + b\nreturn b\n",
            "    for x in [a]:\n        if x:\n            return x + b\n    return b\n",
        ),
        # the first line lost its indentation (an answer stripped of leading space), the rest as in the file
        (
            "total = a\n    for _ in range(1):\n        total += b\n    return total",
            "    total = a\n    for _ in range(1):\n        total += b\n    return total\n",
        ),
        ("if a:\n        return a + b\n    return b\n", "    if a:\n        return a + b\n    return b\n"),
        # tabs, tabs mixed with spaces (a tab as four columns), eight spaces, three
        ("\tif a:\n\t\treturn a + b\n\treturn b\n", "    if a:\n        return a + b\n    return b\n"),
        ("\tif a:\n\t  return a + b\n    return b\n", "    if a:\n        return a + b\n    return b\n"),
        (
            "        if a:\n                return a + b\n        return b\n",
            "    if a:\n        return a + b\n    return b\n",
        ),
        ("   if a:\n      return a + b\n   return b\n", "    if a:\n        return a + b\n    return b\n"),
        # a nested helper function, three spaces a level
        (
            "   def twice(x):\n      return 2 * x\n   return twice(a) + b - a\n",
            "    def twice(x):\n        return 2 * x\n    return twice(a) + b - a\n",
        ),
        # multi-line strings keep their text; continuation lines move with their statement
        (
            "  s = '''one\n  two\nthree\t'''\n  t = [a,\n       b]\n  return sum(t)\n",
            "    s = '''one\n  two\nthree\t'''\n    t = [a,\n         b]\n    return sum(t)\n",
        ),
        (
            '  """Doc\n  string."""\n  x = a + \\\n      b\n  return x\n',
            '    """Doc\n  string."""\n    x = a + \\\n        b\n    return x\n',
        ),
        # a comment at column 0 inside the body stays; prose and an example call after it are cut
        (
            "  x = a  # first\n# then\n  return x + b\nThat's it.\nprint(add(1, 2))\n",
            "    x = a  # first\n    # then\n    return x + b\n",
        ),
        # an unindented body, then prose
        ("return a + b\nHere's why: it adds.", "    return a + b\n"),
        # blank lines holding spaces inside the body
        ("  x = a\n   \n  return x + b\n", "    x = a\n\n    return x + b\n"),
        ("```python\n  return a + b\n```", "    return a + b\n"),  # a fence holding just a body
    ],
)
def test_raw_bodies_are_reindented_to_the_prompts_body(answer, expected):
    assert extract_code(answer, ADD) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        (
            "```python\ndef add(a, b):\n  if a:\n\treturn a + b\n  return b\n```",
            "\ndef add(a, b):\n    if a:\n        return a + b\n    return b\n",
        ),
        (
            "import operator\n\ndef add(a, b):\n  '''Sum.\n  '''\n  return operator.add(a, b)\n\n"
            "This uses operator.add.",
            "\nimport operator\n\ndef add(a, b):\n    '''Sum.\n  '''\n    return operator.add(a, b)\n",
        ),
        ("  def add(a, b):\n     return a + b\n", "\ndef add(a, b):\n    return a + b\n"),
    ],
)
def test_restated_functions_are_reindented(answer, expected):
    assert extract_code(answer, ADD) == expected


@pytest.mark.parametrize(
    "prompt, answer, expected",
    [
        # a prompt written with two spaces a level: the body follows it
        (
            'def add(a, b):\n  """Sum."""\n',
            "    if a:\n        return a + b\n    return b\n",
            "  if a:\n    return a + b\n  return b\n",
        ),
        (
            'def add(a, b):\n\t"""Sum."""\n',
            "  if a:\n    return a + b\n  return b\n",
            "\tif a:\n\t\treturn a + b\n\treturn b\n",
        ),
        # a method: its body is eight spaces deep, a restated method goes back into the class
        ('class Calc:\n    def add(self, a, b):\n        """Sum."""\n', "  return a + b\n", "        return a + b\n"),
        (
            'class Calc:\n    def add(self, a, b):\n        """Sum."""\n',
            "def add(self, a, b):\n  return a + b\n",
            "\n    def add(self, a, b):\n        return a + b\n",
        ),
        # a prompt that stops after the signature (no docstring, so it does not parse on its own)
        ("def add(a, b):\n", "  return a + b\n", "    return a + b\n"),
    ],
)
def test_the_prompts_indentation_is_detected(prompt, answer, expected):
    problem = {"prompt": prompt, "entry_point": "add"}
    completion = extract_code(answer, problem)
    assert completion == expected
    namespace: dict = {}
    exec(prompt + completion, namespace)
    add = namespace["Calc"]().add if "Calc" in namespace else namespace["add"]
    assert add(2, 3) == 5 and add(0, 3) == 3
