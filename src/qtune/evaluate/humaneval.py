"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code") of a run: the prompt each
problem is asked with, the answers generated, and the run-level evaluation (:func:`evaluate_run_humaneval`).

The parts live beside it and are re-exported here: problems, samples and the scoring program in
:mod:`qtune.evaluate.problems`, code extraction from a model's answer in :mod:`qtune.evaluate.extract`, sandboxed
scoring and the unbiased pass@k estimator in :mod:`qtune.evaluate.scoring`.

A sample is (task_id, completion). The program that scores it is the problem's prompt (imports, signature,
docstring), the completion and the problem's tests (:func:`build_program`); the sandbox
(:mod:`qtune.evaluate.sandbox`) runs it, then calls ``check(entry_point)`` itself (:func:`check_call`). The sample
passes only when that call returned: its exit status and output count for nothing, so a program that ends early
(``sys.exit(0)``, ``os._exit``, ``unittest.main()``, a signal to itself, ...) or prints a fake marker is not
passed. Statuses: passed / failed (an ``AssertionError``) / timed out / error (anything else, e.g.
``program ended before check() completed (SystemExit: 0)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtune.config import default_humaneval_path
from qtune.data.templates import Template, format_prompt
from qtune.errors import QtuneError
from qtune.evaluate.extract import extract_code
from qtune.evaluate.problems import build_program, check_call, load_problems, load_samples, write_jsonl
from qtune.evaluate.sandbox import SandboxLimits
from qtune.evaluate.scoring import pass_at_k, score_samples, summary_table
from qtune.jsonio import dumps

if TYPE_CHECKING:
    from qtune.generate import GenerationSettings

__all__ = [
    "HUMANEVAL_INSTRUCTION",
    "build_program",
    "check_call",
    "default_humaneval_path",
    "evaluate_run_humaneval",
    "extract_code",
    "generate_answers",
    "generation_settings",
    "load_problems",
    "load_samples",
    "pass_at_k",
    "problem_prompt",
    "score_samples",
    "summary_table",
    "write_jsonl",
]


HUMANEVAL_INSTRUCTION = "Complete the following Python function. Write the whole function in a Python code block."
"""The instruction each problem is asked with; the problem's prompt (signature and docstring) is the input."""


def problem_prompt(problem: dict, template: Template, tokenizer=None) -> str:
    """The model's prompt for a problem: :data:`HUMANEVAL_INSTRUCTION` with the problem's code as input, in the
    run's training template (:func:`qtune.data.templates.format_prompt`)."""
    return format_prompt(HUMANEVAL_INSTRUCTION, problem["prompt"].strip("\n"), template, tokenizer)


def generation_settings(
    samples: int = 1, max_new_tokens: int = 384, temperature: float = 0.0, top_p: float = 0.95
) -> GenerationSettings:
    """The decoding settings of a HumanEval run (:class:`qtune.generate.GenerationSettings`).

    Raises:
        QtuneError: ``samples`` above 1 with greedy decoding, or a setting out of range (named as its option).
    """
    from qtune.generate import GenerationSettings, SettingsError

    if samples > 1 and temperature == 0:
        raise QtuneError(f"--samples {samples} needs --temperature above 0 (greedy decoding repeats one answer)")
    try:
        return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    except SettingsError as e:
        raise QtuneError(f"--{e.field.replace('_', '-')}: {e}") from None


def generate_answers(
    engine, problems: list[dict], settings, samples: int = 1, batch_size: int = 8, seed: int = 0, progress=None
) -> list[list[str]]:
    """``samples`` answers per problem to :func:`problem_prompt`, through the one batched generation path
    (:meth:`qtune.generate.Engine.generate_batch` of ``engine``, with ``settings`` from
    :func:`generation_settings`): sorted longest first, batches of ``batch_size`` left-padded prompts, greedy when
    the temperature is 0, the random generator seeded with ``seed`` first.

    Generation stops at the EOS token, where the answer ends (:class:`qtune.generate.AnswerEnd`: for alpaca, the
    template's section headers, which a model writes when it runs past its answer; the answer is cut before
    them) or after ``settings.max_new_tokens`` tokens; a batch ends when its last row does. Returns one list of
    answers (decoded, special tokens dropped) per problem, in order. ``progress(done, total)`` is called after
    each batch.

    Raises:
        QtuneError: ``samples`` above 1 with greedy decoding, or a problem whose prompt does not fit in the
            model's context with ``max_new_tokens`` (or ``max_new_tokens`` leaves no room for any).
    """
    import torch

    from qtune.generate import SettingsError

    if samples > 1 and settings.temperature == 0:
        raise QtuneError(f"--samples {samples} needs --temperature above 0 (greedy decoding repeats one answer)")
    try:
        budget = engine.prompt_budget(settings)
    except SettingsError as e:
        raise QtuneError(f"--max-new-tokens {settings.max_new_tokens}: {e}") from None
    inputs = [p["prompt"].strip("\n") for p in problems]
    for p, text in zip(problems, inputs, strict=True):
        n = len(engine.encode(engine.prompt(HUMANEVAL_INSTRUCTION, text)))
        if n > budget:
            raise QtuneError(
                f"{p['task_id']}: the prompt has {n} tokens; with --max-new-tokens "
                f"{settings.max_new_tokens} at most {budget} fit in the model's context of "
                f"{engine.context_length}"
            )
    torch.manual_seed(seed)
    flat = engine.generate_batch(
        [HUMANEVAL_INSTRUCTION] * (len(problems) * samples),
        settings,
        inputs=[text for text in inputs for _ in range(samples)],
        batch_size=batch_size,
        progress=progress,
    )
    return [flat[i * samples : (i + 1) * samples] for i in range(len(problems))]


def evaluate_run_humaneval(
    run_dir: str,
    path: str | Path | None = None,
    limit: int | None = None,
    samples: int = 1,
    base: bool = False,
    ks: tuple[int, ...] = (1,),
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 384,
    batch_size: int = 8,
    limits: SandboxLimits | None = None,
    workers: int = 2,
    trust_remote_code: bool = False,
    progress=None,
) -> dict:
    """Generate answers to the first ``limit`` HumanEval problems with base + adapter (or the base alone, the
    adapter disabled, with ``base``), extract the code, score it in the sandbox.

    Writes ``humaneval/{adapter|base}_samples.jsonl`` (task_id, completion, answer),
    ``..._results.jsonl`` (per-sample status) and ``....json`` (the summary) in the run directory; a file that
    cannot be written (after generating) is named in the summary's ``warning`` and the score is still returned.

    Raises:
        QtuneError: no trained adapter in ``run_dir``, ``run_dir/humaneval`` cannot be made, bad problems file,
            bad ``limit``/``samples``/``ks``, a decoding setting out of range (:func:`generation_settings`), or a
            prompt that does not fit in the context with ``max_new_tokens``.
    """
    from qtune.rundir import RunDir

    rd = RunDir(Path(run_dir)).require_adapter()
    problems = load_problems(path)
    _check_counts(limit, samples, ks)
    settings = generation_settings(samples, max_new_tokens, temperature, top_p)
    chosen = list(problems.values())[:limit]
    out = rd.root / "humaneval"
    try:  # before the model is loaded and answers generated
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise QtuneError(f"{out}: cannot write ({e.strerror or e})") from None
    model, engine, seed = _load_engine(rd.root, trust_remote_code)
    kwargs = dict(samples=samples, batch_size=batch_size, seed=seed, progress=progress)
    if base:
        with model.disable_adapter():
            answers = generate_answers(engine, chosen, settings, **kwargs)
    else:
        answers = generate_answers(engine, chosen, settings, **kwargs)
    rows = [
        {"task_id": p["task_id"], "completion": extract_code(a, p), "answer": a}
        for p, many in zip(chosen, answers, strict=True)
        for a in many
    ]
    who = "base" if base else "adapter"
    unwritten = [write_jsonl(out / f"{who}_samples.jsonl", rows)]
    summary = score_samples(problems, rows, ks, limits, workers, out / f"{who}_results.jsonl")
    unwritten.append(summary.pop("warning", None))
    summary.update(
        {"model": who, "temperature": temperature, "max_new_tokens": max_new_tokens, "samples_per_problem": samples}
    )
    try:
        (out / f"{who}.json").write_text(dumps(summary, indent=2), encoding="utf-8")
    except OSError as e:
        unwritten.append(f"{out / f'{who}.json'}: cannot write ({e.strerror or e})")
    if any(unwritten):
        summary["warning"] = "; ".join(u for u in unwritten if u)
    return summary


def _check_counts(limit: int | None, samples: int, ks: tuple[int, ...]) -> None:
    """Raises QtuneError (named as its option) for a ``limit`` or ``samples`` below 1 or a k outside 1..samples."""
    if limit is not None and limit < 1:
        raise QtuneError(f"--limit {limit}: expected at least 1")
    if samples < 1:
        raise QtuneError(f"--samples {samples}: expected at least 1")
    for k in ks:
        if not 1 <= k <= samples:
            raise QtuneError(f"--k {k}: expected 1 to --samples ({samples})")


def _load_engine(run_dir: Path, trust_remote_code: bool) -> tuple:
    """(model, :class:`qtune.generate.Engine`, the run's seed) of the trained run in ``run_dir``: base + adapter
    (:func:`qtune.model.adapters.load_trained`), dequantized for inference when it runs on the CPU."""
    from qtune.generate import Engine
    from qtune.model.adapters import load_trained
    from qtune.model.quantize import dequantize_for_inference

    model, tokenizer, cfg = load_trained(run_dir, trust_remote_code=trust_remote_code)
    if next(model.parameters()).device.type == "cpu":
        dequantize_for_inference(model)  # same weights, ~4x faster generation on CPU (measured on SmolLM2 NF4)
    engine = Engine.from_model(model, tokenizer, cfg.data.template, run_dir.name, cfg)
    return model, engine, cfg.train.seed
