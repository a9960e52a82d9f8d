"""`qtune eval loss` and `qtune eval humaneval`, and the flag forms before them (`qtune eval --run`, `--humaneval`,
`--humaneval-samples`): the old form prints one deprecation line on stderr and then does exactly what the new one
does (same call, same output)."""

import json
import sys

import pytest
from typer.testing import CliRunner

import qtune.evaluate.humaneval as humaneval
import qtune.evaluate.perplexity as perplexity
from qtune.cli import app
from qtune.cli.eval_legacy import WARNINGS, translate
from qtune.evaluate.sandbox import SandboxLimits

runner = CliRunner()

LOSS = {
    "base": {"val": {"loss": 1.25, "perplexity": 3.4903, "tokens": 120}},
    "adapter": {"val": {"loss": 0.96523, "perplexity": 2.6254, "tokens": 120}},
}
LOSS_TABLE = (
    "split  model        loss  perplexity   tokens\n"
    "val    base       1.2500       3.490      120\n"
    "val    adapter    0.9652       2.625      120\n"
)
SUMMARY = {"problems": 2, "samples": 2, "counts": {"passed": 1, "failed": 1}, "pass@1": 0.5, "results": None}

TOY = {
    "task_id": "Toy/0",
    "prompt": "def add(a, b):\n",
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
}


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def loss_calls(monkeypatch):
    calls = []

    def fake(run_dir, splits, batch_size=None, trust_remote_code=False):
        calls.append((run_dir, splits, trust_remote_code))
        return LOSS

    monkeypatch.setattr(perplexity, "evaluate_run", fake)
    return calls


@pytest.fixture
def humaneval_calls(monkeypatch):
    calls = []

    def fake(*args, progress=None, **kwargs):
        calls.append((args, kwargs, progress is None))
        return SUMMARY

    monkeypatch.setattr(humaneval, "evaluate_run_humaneval", fake)
    return calls


def test_eval_loss_prints_the_table_and_where_it_saved(loss_calls, tmp_path):
    run = tmp_path / "run"
    code, out, err = invoke("eval", "loss", "--run", run, "--splits", "val")
    assert (code, err) == (0, ""), err
    assert out == LOSS_TABLE + f"saved: {run / 'eval.json'}\n"
    assert loss_calls == [(str(run), ("val",), False)]
    code, out, err = invoke("eval", "loss", "--run", run, "--json", "--trust-remote-code")
    assert (code, err) == (0, "") and json.loads(out) == LOSS
    assert loss_calls[1] == (str(run), ("val", "test"), True)


def test_eval_loss_refuses_an_unknown_split_and_a_missing_run(loss_calls, tmp_path):
    code, out, err = invoke("eval", "loss", "--run", tmp_path, "--splits", "val,dev")
    assert (code, out) == (
        2,
        "",
    ) and err == "error: --splits 'val,dev': expected a comma-separated subset of train, val, test\n"
    code, _, err = invoke("eval", "loss")
    assert code == 2 and "Missing option '--run'" in err
    assert loss_calls == []


@pytest.mark.parametrize(
    "old",
    [
        ["--run", "RUN", "--splits", "val"],
        ["--splits=val", "--run=RUN"],
        ["--run", "RUN", "--splits", "val", "--limit", "3", "--base", "--out", "x"],  # humaneval options: ignored
    ],
)
def test_the_old_loss_form_warns_once_then_does_the_same(loss_calls, tmp_path, old):
    run = tmp_path / "run"
    new = invoke("eval", "loss", "--run", run, "--splits", "val")
    code, out, err = invoke("eval", *[a.replace("RUN", str(run)) for a in old])
    assert (code, out) == (0, new[1])
    assert err == "warning: `qtune eval --run RUN` is deprecated; use `qtune eval loss --run RUN`\n"
    assert loss_calls[0] == loss_calls[1] == (str(run), ("val",), False)


def test_eval_humaneval_generates_with_the_run_and_the_old_form_is_the_same(humaneval_calls, tmp_path):
    run, problems = tmp_path / "run", tmp_path / "p.jsonl"
    options = ["--limit", "2", "--max-new-tokens", "4", "--k", "1", "--workers", "3", "--json"]
    code, out, err = invoke("eval", "humaneval", "--run", run, "--problems", problems, *options)
    assert (code, err) == (0, "") and json.loads(out) == SUMMARY
    args, kwargs, quiet = humaneval_calls[0]
    limits = SandboxLimits(timeout_s=10.0, memory_mb=1024)
    assert args == (str(run), problems, 2, 1, False, (1,), 0.0, 0.95, 4, 8, limits, 3)
    assert kwargs == {"trust_remote_code": False} and quiet  # --json: no progress lines

    code, old_out, err = invoke("eval", "--run", run, "--humaneval", problems, *options, "--splits", "val")
    assert (code, old_out) == (0, out)
    assert err == f"warning: {WARNINGS['generate']}\n"
    assert humaneval_calls[1] == humaneval_calls[0]
    code, _, err = invoke("eval", "--run", run, "--humaneval", "--limit", "2", "--base")  # the default problems
    assert code == 0 and err.splitlines()[0] == f"warning: {WARNINGS['generate']}"
    assert humaneval_calls[2][0][1:5] == (None, 2, 1, True) and not humaneval_calls[2][2]


def test_eval_humaneval_scores_a_samples_file_and_the_old_form_is_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems, samples = tmp_path / "toy.jsonl", tmp_path / "answers.jsonl"
    problems.write_text(json.dumps(TOY) + "\n")
    right, wrong = "    return a + b\n", "    return a - b\n"
    samples.write_text("".join(json.dumps({"task_id": "Toy/0", "completion": c}) + "\n" for c in (right, wrong)))
    code, out, err = invoke("eval", "humaneval", "--samples-file", samples, "--problems", problems, "--json")
    assert (code, err) == (0, ""), out + err
    summary = json.loads(out)
    assert summary["pass@1"] == 0.5 and summary["counts"] == {"passed": 1, "failed": 1, "timed out": 0, "error": 0}
    assert summary["results"] == "answers_results.jsonl"
    statuses = [json.loads(line)["status"] for line in (tmp_path / "answers_results.jsonl").read_text().splitlines()]
    assert statuses == ["passed", "failed"]

    code, old_out, err = invoke("eval", "--humaneval-samples", samples, "--problems", problems, "--run", "x", "--json")
    assert (code, err) == (0, f"warning: {WARNINGS['score']}\n")
    assert json.loads(old_out) == summary


@pytest.mark.parametrize(
    "old, new",
    [
        (["--run", "R"], ["loss", "--run", "R"]),
        (["--run", "R", "--humaneval"], ["humaneval", "--run", "R"]),
        (["--humaneval", "--run", "R"], ["humaneval", "--run", "R"]),
        (["--humaneval=p.jsonl", "--run", "R", "--k=5"], ["humaneval", "--problems", "p.jsonl", "--run", "R", "--k=5"]),
        (
            ["--run", "R", "--humaneval", "p.jsonl", "--problems", "q"],
            ["humaneval", "--run", "R", "--problems", "p.jsonl"],
        ),
        (
            ["--humaneval-samples=s", "--results", "r", "--limit", "2"],
            ["humaneval", "--samples-file", "s", "--results", "r"],
        ),
        (["--run", "R", "--bogus", "1"], ["loss", "--run", "R", "--bogus", "1"]),  # for `loss` to refuse
    ],
)
def test_translate_keeps_what_the_old_mode_used(old, new):
    assert translate(old)[1] == new


def test_the_old_form_refuses_both_humaneval_options():
    code, out, err = invoke("eval", "--humaneval", "--humaneval-samples", "s.jsonl")
    assert (code, out) == (2, "") and err == "error: --humaneval and --humaneval-samples: pass one of them\n"


def test_qtune_eval_alone_lists_its_subcommands(monkeypatch, capsys):
    from qtune.cli import main

    monkeypatch.setattr(sys, "argv", ["qtune", "eval"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == 0 and out.err == ""
    assert "loss" in out.out and "humaneval" in out.out
