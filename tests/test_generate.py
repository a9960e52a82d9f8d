"""The one generation path (qtune.generate): where an answer ends (stop strings, the alpaca template's section-header
lines), streamed and batched answers alike, and HumanEval generating through it exactly as its own loop did."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qtune.cli import app
from qtune.data.templates import ALPACA_HEADER, ALPACA_STOP
from qtune.errors import QtuneError
from qtune.evaluate.humaneval import generate_answers, generation_settings, problem_prompt
from qtune.generate import AnswerEnd, Engine, GenerationSettings, StreamState, _StopTrimmer

from serve_fixtures import make_tiny_run, scripted

ALPACA_END = AnswerEnd(ALPACA_STOP, ALPACA_HEADER)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    return Engine(str(make_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("generate") / "run").root))


def streamed(end: AnswerEnd, pieces: list[str]) -> list[str]:
    """What a stream shows for generated ``pieces``: one entry per push (maybe empty), then the flush."""
    trimmer = _StopTrimmer(end)
    return [trimmer.push(p) for p in pieces] + [trimmer.flush()]


def cut(end: AnswerEnd, text: str) -> str:
    """The non-streamed answer for the generated ``text``."""
    at = end.find(text)
    return text if at is None else text[:at]


# ---- where an answer ends ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer",
    [
        ("answer text\n### Answer:\nmore", "answer text\n"),  # any label, cut at the start of its line
        ("answer text\n\n### Expected Output:  \nmore", "answer text\n\n"),  # trailing spaces after the colon
        ("answer text\n### Answer:", "answer text\n"),  # generation ended right after the header
        ("### Answer:\nmore", ""),  # the answer's first line
        ("code\n### Instruction:\nmore", "code\n"),  # the template's own headers, cut as before
        ("code ### Response: more", "code "),  # ... wherever they appear
        ("x\n### Input:", "x\n"),
        ("### Example\ncode", "### Example\ncode"),  # a markdown header: no colon
        ("### Step 1: do x\ncode", "### Step 1: do x\ncode"),  # text after the colon
        ("see:\n    ### Note:\n", "see:\n    ### Note:\n"),  # not at a line start
        ("#### Note:\nx", "#### Note:\nx"),  # four hashes: not the template's form
        ("### :\nx", "### :\nx"),  # no label
        ("### " + "L" * 41 + ":\nx", "### " + "L" * 41 + ":\nx"),  # label over 40 characters
        ("### " + "L" * 40 + ":\nx", ""),
    ],
)
def test_alpaca_answer_ends_at_a_header_line_or_a_template_header(text, answer):
    assert cut(ALPACA_END, text) == answer
    assert "".join(streamed(ALPACA_END, list(text))) == answer  # one character at a time


def test_a_header_line_is_held_back_until_it_is_known_not_to_be_one():
    assert streamed(ALPACA_END, ["answer text\n", "### Ans", "wer:", "\nmore"]) == ["answer text\n", "", "", "", ""]
    # a markdown header streams once its line ends without being a header line
    assert streamed(ALPACA_END, ["x\n", "### Example", "\ncode"]) == ["x\n", "", "### Example\ncode", ""]
    # text after the colon: shown as soon as it is there
    assert streamed(ALPACA_END, ["### Step 1:", " do x", "\n"]) == ["", "### Step 1: do x", "\n", ""]
    assert streamed(ALPACA_END, ["# comment", "\n#include"]) == ["# comment", "\n#include", ""]
    # generation ended inside a line that could still have been a header: it is part of the answer
    assert streamed(ALPACA_END, ["x\n", "### Exam"]) == ["x\n", "", "### Exam"]


def test_user_stop_strings_still_cut_and_a_header_line_around_one_ends_first():
    end = AnswerEnd((*ALPACA_STOP, "STOP"), ALPACA_HEADER)
    assert cut(end, "a STOP b") == "a " and "".join(streamed(end, ["a ST", "OP b"])) == "a "
    assert streamed(end, ["a ST", "x"]) == ["a ", "STx", ""]  # a held stop-string prefix that did not complete
    end = AnswerEnd(("Ans",), ALPACA_HEADER)
    assert cut(end, "x\n### Answer:") == "x\n"  # the header line (at the end) starts before the stop string
    assert cut(end, "x\n### Answer") == "x\n### "


FRAGMENTS = [
    "answer",
    " text",
    "\n",
    "\n\n",
    "### ",
    "###",
    "#",
    " ",
    "Answer",
    "Step 1",
    ":",
    " do x",
    "Example",
    "Instruction",
    "Response:",
    "STOP",
    "ST",
    "OP",
    "\r",
    "    ",
]


@hsettings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=14), st.lists(st.integers(0, 60), max_size=6))
def test_streamed_pieces_join_to_the_batched_answer_however_the_text_is_split(fragments, splits):
    text = "".join(fragments)
    bounds = sorted({min(s, len(text)) for s in splits} | {0, len(text)})
    pieces = [text[a:b] for a, b in pairwise(bounds)]
    for end in (ALPACA_END, AnswerEnd((*ALPACA_STOP, "STOP"), ALPACA_HEADER), AnswerEnd(("STOP",), None)):
        assert "".join(streamed(end, pieces)) == cut(end, text)


# ---- the engine: streamed, non-streamed and batched answers end alike ----------------------------------------------


def tokens_until(engine, text: str, mark: str) -> int:
    """Fewest of ``text``'s tokens whose decoded text holds ``mark``: where generation stops for it."""
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    return next(k for k in range(1, len(ids) + 1) if mark in engine.tokenizer.decode(ids[:k]))


class Passes:
    """Counts the model's forward passes (one per generated token)."""

    def __init__(self, engine):
        self.n = 0
        self.hook = engine.model.get_output_embeddings().register_forward_hook(self.count)

    def count(self, module, args, out):
        self.n += 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, answer, stop_mark",
    [
        ("answer text\n### Answer:\nmore text that is never generated", "answer text\n", "### Answer:\n"),
        ("answer text\n### Instruction:\nmore", "answer text\n", "### Instruction:"),  # stops at the colon, as before
        ("### Example\ncode", "### Example\ncode", None),
        ("    ### Step 1: do x\n### Step 2: do y", "    ### Step 1: do x\n### Step 2: do y", None),
        (" word" * 200 + "\n### Answer:\nmore", " word" * 200 + "\n", "### Answer:\n"),  # past HEADER_TAIL_TOKENS
    ],
)
def test_a_model_that_writes_a_header_line_stops_there(engine, script, answer, stop_mark):
    ids = engine.encode(engine.prompt("Write a loop."))
    settings = GenerationSettings(max_new_tokens=240)
    with scripted(engine, script):
        state = StreamState()
        pieces = list(engine.stream(ids, settings, state))
        passes = Passes(engine)
        try:
            batched = engine.generate_batch(
                ["Write a loop.", "Sort a much longer list of numbers, please."], settings, batch_size=2
            )
        finally:
            passes.hook.remove()
    assert "".join(pieces) == state.text == answer and batched == [answer, answer]
    if stop_mark is None:  # ran to EOS: every token of the script and the EOS
        n = len(engine.tokenizer(script, add_special_tokens=False)["input_ids"]) + 1
    else:  # stopped at the token that completes the stop; no piece showed text of it
        n = tokens_until(engine, script, stop_mark)
        assert not any("#" in p for p in pieces)
    assert state.completion_tokens == n and passes.n == n and state.finish_reason == "stop"


def test_the_chat_template_has_no_header_stop(engine):
    chat = Engine.from_model(engine.model, engine.tokenizer, "chat", "chat")
    assert chat.stops == () and chat.header is None
    assert chat.answer_end(GenerationSettings(stop=("END",))).stops == ("END",)


# ---- HumanEval generates through the same path ---------------------------------------------------------------------

TOY = [
    {"task_id": "Toy/0", "prompt": 'def add(a, b):\n    """Sum of a and b."""\n', "entry_point": "add"},
    {
        "task_id": "Toy/1",
        "prompt": 'def rev(xs: list) -> list:\n    """xs reversed.\n    >>> rev([1, 2])\n    [2, 1]\n    """\n',
        "entry_point": "rev",
    },
    {
        "task_id": "Toy/2",
        "prompt": 'import math\n\n\ndef area(r):\n    """The area of a circle of radius r, '
        'in square units, as a float."""\n',
        "entry_point": "area",
    },
    {"task_id": "Toy/3", "prompt": "def one():\n", "entry_point": "one"},
]


def reference_generate_answers(
    model,
    tokenizer,
    prompts,
    samples=1,
    max_new_tokens=384,
    temperature=0.0,
    top_p=0.95,
    batch_size=8,
    seed=0,
    stops=(),
):
    """HumanEval's own generation loop as it was before it moved to qtune.generate, verbatim (the progress
    callback left out): the reference the one path must reproduce token for token."""
    from qtune.data.tokenize import encode_prompt

    torch.manual_seed(seed)
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    jobs = [(i, encode_prompt(p, tokenizer)) for i, p in enumerate(prompts) for _ in range(samples)]
    order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][1]))
    answers = [[] for _ in prompts]
    out_by_job = {}
    sample = temperature > 0
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            batch = [jobs[j][1] for j in order[b : b + batch_size]]
            width = max(len(x) for x in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=dev)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=dev)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                **({"stop_strings": list(stops), "tokenizer": tokenizer} if stops else {}),
            )
            for row, j in enumerate(order[b : b + batch_size]):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
                out_by_job[j] = text[: min(cuts)] if cuts else text
    for j, (i, _) in enumerate(jobs):
        answers[i].append(out_by_job[j])
    return answers


@pytest.mark.slow
@pytest.mark.parametrize("samples, temperature, batch_size", [(1, 0.0, 3), (1, 0.0, 8), (2, 0.8, 3)])
def test_humaneval_answers_equal_its_former_loop_token_for_token(engine, samples, temperature, batch_size):
    prompts = [problem_prompt(p, engine.template, engine.tokenizer) for p in TOY]
    assert [
        engine.prompt(
            "Complete the following Python function. Write the whole function in a Python code block.",
            p["prompt"].strip("\n"),
        )
        for p in TOY
    ] == prompts
    assert len({len(engine.encode(p)) for p in prompts}) == 4  # batches really are padded
    settings = generation_settings(samples, 24, temperature, 0.95)
    new = generate_answers(engine, TOY, settings, samples=samples, batch_size=batch_size, seed=3)
    old = reference_generate_answers(
        engine.model, engine.tokenizer, prompts, samples, 24, temperature, 0.95, batch_size, seed=3, stops=ALPACA_STOP
    )
    assert new == old and all(len(a) == samples and all(a) for a in new)
    if samples > 1:
        assert any(a[0] != a[1] for a in new)  # sampled: the two answers differ, in the same random order


def test_humaneval_answers_end_as_before_at_the_templates_headers_and_now_at_any_header_line(engine):
    code = "```python\ndef add(a, b):\n    return a + b\n```\n"
    prompts = [problem_prompt(p, engine.template, engine.tokenizer) for p in TOY[:2]]
    settings = generation_settings(1, 60)
    with scripted(engine, code + "\n### Instruction:\nWrite more"):
        new = generate_answers(engine, TOY[:2], settings, batch_size=2)
        old = reference_generate_answers(
            engine.model, engine.tokenizer, prompts, max_new_tokens=60, batch_size=2, stops=ALPACA_STOP
        )
    assert new == old == [[code + "\n"], [code + "\n"]]
    with scripted(engine, code + "### Explanation:\nThe function adds."):
        assert generate_answers(engine, TOY[:2], settings, batch_size=2) == [[code], [code]]


def test_humaneval_settings_and_prompts_that_do_not_fit_are_clear_errors(engine):
    with pytest.raises(QtuneError, match=r"^--samples 2 needs --temperature above 0"):
        generation_settings(2, 24, 0.0)
    with pytest.raises(QtuneError, match=r"^--temperature: temperature must be in \[0, 5\], got 6"):
        generation_settings(1, 24, 6.0)
    with pytest.raises(
        QtuneError,
        match=r"^--max-new-tokens 512: max_new_tokens must be below the model's "
        r"context of 512 tokens, got 512$",
    ):
        generate_answers(engine, TOY, generation_settings(1, 512))
    long = {"task_id": "Toy/long", "prompt": "def f():\n" + "    # x\n" * 200, "entry_point": "f"}
    n = len(engine.encode(problem_prompt(long, "alpaca", engine.tokenizer)))
    with pytest.raises(
        QtuneError,
        match=rf"^Toy/long: the prompt has {n} tokens; with --max-new-tokens 400 at "
        rf"most 112 fit in the model's context of 512$",
    ):
        generate_answers(engine, TOY + [long], generation_settings(1, 400))


@pytest.mark.parametrize(
    "option, message",
    [
        (["--temperature", "6"], "error: --temperature: temperature must be in [0, 5], got 6.0"),
        (["--top-p", "0"], "error: --top-p: top_p must be in (0, 1], got 0.0"),
        (["--samples", "2"], "error: --samples 2 needs --temperature above 0 (greedy decoding repeats one answer)"),
    ],
)
def test_cli_humaneval_settings_out_of_range_are_one_line_before_loading(
    tiny_model_dir, tmp_path, monkeypatch, option, message
):
    import json

    import qtune.model.adapters

    rd = make_tiny_run(tiny_model_dir, tmp_path / "run")
    problems = tmp_path / "toy.jsonl"
    problems.write_text("".join(json.dumps({**p, "test": "def check(c):\n    pass\n"}) + "\n" for p in TOY))
    monkeypatch.setattr(qtune.model.adapters, "load_trained", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(app, ["eval", "humaneval", "--run", str(rd.root), "--problems", str(problems), *option])
    assert result.exit_code == 2 and result.output == message + "\n", result.output


@pytest.mark.slow
def test_smollm2_humaneval_answers_equal_its_former_loop(smol_dir, tmp_path):
    """The real model (NF4, dequantized for CPU as ``qtune eval humaneval`` does) on the first HumanEval
    problems: the one path gives exactly the answers of HumanEval's former loop."""
    from qtune.evaluate.humaneval import default_humaneval_path, load_problems
    from qtune.model.quantize import dequantize_for_inference

    if not default_humaneval_path().is_file():
        pytest.skip("shared HumanEval file not present")
    problems = list(load_problems().values())[:3]
    smol = Engine(str(make_tiny_run(smol_dir, tmp_path / "run", random_adapter=False, lora={"r": 4}).root))
    assert dequantize_for_inference(smol.model) == 210  # 30 layers x 7 linears
    prompts = [problem_prompt(p, smol.template, smol.tokenizer) for p in problems]
    new = generate_answers(smol, problems, generation_settings(1, 48), batch_size=2)
    old = reference_generate_answers(
        smol.model, smol.tokenizer, prompts, max_new_tokens=48, batch_size=2, stops=ALPACA_STOP
    )
    assert new == old and len({a[0] for a in new}) == 3 and all(a[0] for a in new)  # 3 different answers
