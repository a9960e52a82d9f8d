"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): problems, code extraction
from a model's answer, sandboxed scoring, and the unbiased pass@k estimator.

A sample is (task_id, completion). The program that scores it is the problem's prompt (imports, signature,
docstring), the completion and the problem's tests (:func:`build_program`); the sandbox
(:mod:`qtune.evaluate.sandbox`) runs it, then calls ``check(entry_point)`` itself (:func:`check_call`). The sample
passes only when that call returned: its exit status and output count for nothing, so a program that ends early
(``sys.exit(0)``, ``os._exit``, ``unittest.main()``, a signal to itself, ...) or prints a fake marker is not
passed. Statuses: passed / failed (an ``AssertionError``) / timed out / error (anything else, e.g.
``program ended before check() completed (SystemExit: 0)``).
"""

from __future__ import annotations

import ast
import functools
import re
import tokenize
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from qtune.config import default_humaneval_path
from qtune.data.load import read_jsonl
from qtune.data.templates import Template, format_prompt
from qtune.errors import QtuneError
from qtune.evaluate.sandbox import SandboxLimits, run_programs
from qtune.jsonio import dumps

if TYPE_CHECKING:
    from qtune.generate import GenerationSettings


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every line of a JSON Lines file of objects."""
    if not path.is_file():
        raise QtuneError(f"{path}: file not found")
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise QtuneError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """The HumanEval problems by task_id, in file order, from a .jsonl or .jsonl.gz file.

    Raises:
        QtuneError: missing or unreadable file, a bad line, or a problem without task_id, prompt, test or
            entry_point.
    """
    p = Path(path) if path else default_humaneval_path()
    problems = {}
    for n, row in _read_jsonl(p):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
        if missing:
            raise QtuneError(f"{p}:{n}: not a HumanEval problem (no {', '.join(missing)})")
        if not row["entry_point"].isidentifier():
            raise QtuneError(f"{p}:{n}: entry_point {row['entry_point']!r} is not a Python name")
        problems[row["task_id"]] = row
    if not problems:
        raise QtuneError(f"{p}: no problems")
    return problems


def load_samples(path: str | Path, problems: dict[str, dict]) -> list[dict]:
    """Samples {task_id, completion} from a JSONL file; several samples per task are allowed.

    Raises:
        QtuneError: missing file, bad line, a sample without a string completion, or an unknown task_id.
    """
    p = Path(path)
    samples = []
    for n, row in _read_jsonl(p):
        bad = [k for k in ("task_id", "completion") if not isinstance(row.get(k), str)]
        if bad:
            raise QtuneError(
                f"{p}:{n}: expected string fields task_id and completion ({', '.join(bad)} "
                f"{'is' if len(bad) == 1 else 'are'} missing or not a string)"
            )
        if row["task_id"] not in problems:
            raise QtuneError(f"{p}:{n}: unknown task_id {row['task_id']!r}")
        samples.append({"task_id": row["task_id"], "completion": row["completion"]})
    if not samples:
        raise QtuneError(f"{p}: no samples")
    return samples


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, eq. 1):
    ``1 - C(n-c, k) / C(n, k)``, the probability that at least one of k samples drawn without replacement from
    the n passes. Computed as ``1 - prod_{i=0}^{k-1} (n-c-i)/(n-i)`` so no large binomials appear.

    Raises:
        ValueError: not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(k):
        fail *= (n - c - i) / (n - i)
    return 1.0 - fail


def build_program(problem: dict, completion: str) -> str:
    """prompt + completion + tests: the program that scores a sample, once :func:`check_call` returns after it.

    The check call is not part of the text: the sandbox makes it itself after the program ran (see
    :func:`score_samples`), so a program cannot end early and pass.
    """
    return problem["prompt"] + completion + "\n\n" + problem["test"] + "\n"


def check_call(problem: dict) -> str:
    """The expression that tests a sample after :func:`build_program`'s program ran: ``check(entry_point)``."""
    return f"check({problem['entry_point']})"


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_TAB = 4
"""Columns a tab stands for in an answer's indentation (read this way also where tabs and spaces are mixed)."""


def extract_code(answer: str, problem: dict) -> str:
    """The completion to append to the problem's prompt, taken from a model's free-form answer.

    - A fenced block (```python ... ```, also an unclosed one): the first that defines the entry point, else
      the first Python (or untagged) block; the fence and the prose around it are dropped.
    - An answer that re-states the function (``def entry_point(``): the code from the first line of imports
      before it on, appended after the prompt as a new definition that replaces the prompt's stub, at the
      indentation of the prompt's ``def``. Top-level lines after it that are neither definitions, imports,
      assignments nor comments (prose, example calls such as ``print(f(3))``) end the code.
    - Otherwise raw code: a function body, placed at the indentation of the prompt's body (read from the
      prompt, not assumed). Prose or top-level code after an indented body (a statement starting at column 0;
      comments, continuation lines and lines inside strings do not count) is cut. When the body's first line
      is not indented but later ones are, the first line is read as having lost its indentation if the body
      does not parse otherwise; an unindented body that does not parse is cut before the last column-0
      statement that makes it parse (prose after it).

    Both kinds of code are re-indented by their structure, whatever the answer's indentation (2, 3, 4 or 8
    spaces, tabs, counted as 4 columns, or a mix): each logical line's block depth is kept and written with
    the prompt's indentation unit; continuation lines (inside brackets, after a backslash) move with their
    statement; lines inside multi-line strings are left exactly as they are.
    """
    entry = problem["entry_point"]
    def_indent, body_indent = _prompt_indents(problem["prompt"], entry)
    nested = body_indent.startswith(def_indent) and body_indent != def_indent
    unit = body_indent[len(def_indent) :] if nested else "    "  # the prompt's indentation step
    code = answer
    blocks = _FENCE.findall(answer)
    if blocks:
        python = [body for lang, body in blocks if lang.lower() in ("", "python", "py", "python3")] or [
            b for _, b in blocks
        ]
        code = next((b for b in python if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", b, re.M)), python[0])
    code = code.replace("\r\n", "\n")
    m = re.search(rf"^([ \t]*)def\s+{re.escape(entry)}\s*\(", code, re.M)
    if m:
        lines = code.splitlines()
        start = code[: m.start()].count("\n")
        # keep the imports and helpers written above the function, drop the prose
        above = [line for line in lines[:start] if not line.strip() or _looks_like_code(line)]
        block = _Lines(above + lines[start:])
        top = block.widths[block.code[0]] if block.code else 0
        cut = next(
            (
                i
                for i in block.code
                if block.widths[i] <= top
                and not _looks_like_code(block.lines[i].lstrip())
                and not block.lines[i].lstrip().startswith((")", "]", "}", "if __name__"))
            ),
            len(block.lines),
        )
        return "\n" + block.render(def_indent, unit, cut=cut).strip("\n") + "\n"
    body = _Lines(code.strip("\n").splitlines())
    if not body.code:
        return body_indent + "pass\n"
    first = body.code[0]
    zeros = [i for i in body.code[1:] if body.widths[i] == 0]  # column-0 lines after the first: prose, if indented
    cut = zeros[0] if zeros else len(body.lines)
    candidates = [(body.widths[first], cut if body.widths[first] else len(body.lines))]
    later = [body.widths[i] for i in body.code[1:] if i < cut]
    if later and 0 < min(later) != body.widths[first]:
        candidates.append((min(later), cut))  # the first line lost (or gained) its indentation
    if not body.widths[first]:
        candidates += [(0, z) for z in reversed(zeros)]
    completions = [
        body.render(body_indent, unit, cut=c, first_width=w).strip("\n").rstrip() + "\n" for w, c in candidates
    ]
    return next((c for c in completions if _parses(problem["prompt"] + c)), completions[0])


class _Lines:
    """An answer's code lines with each line's kind and indentation width (columns, tabs as :data:`_TAB`).

    Kinds: ``code`` (starts a logical line), ``comment`` (a comment alone), ``blank``, ``cont`` (continues a
    logical line: inside brackets or after a backslash), ``verbatim`` (begins inside a multi-line string). They
    come from :mod:`tokenize` run on the lines with their indentation removed, so any indentation tokenizes;
    where the tokenizer stops (an unclosed string or bracket), the remaining lines count as code.
    """

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.widths = [len(_lead(line).expandtabs(_TAB)) for line in lines]
        kinds: list[str | None] = [None if line.strip() else "blank" for line in lines]
        feed = iter([line.lstrip(" \t") + "\n" for line in lines])
        at_start = True  # the next token begins a logical line
        try:
            for tok in tokenize.generate_tokens(lambda: next(feed, "")):
                if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
                    at_start = at_start or tok.type == tokenize.NEWLINE
                    continue
                row = tok.start[0] - 1
                if row < len(lines) and kinds[row] is None:
                    kinds[row] = ("comment" if tok.type == tokenize.COMMENT else "code") if at_start else "cont"
                for r in range(tok.start[0], min(tok.end[0], len(lines))):
                    kinds[r] = "verbatim"  # rows after the first of a multi-line string
                at_start = at_start and tok.type == tokenize.COMMENT
        except (tokenize.TokenError, SyntaxError):
            pass
        self.kinds = [k or "code" for k in kinds]
        self.code = [i for i, k in enumerate(self.kinds) if k == "code"]

    def render(self, base: str, unit: str, cut: int | None = None, first_width: int | None = None) -> str:
        """The lines before ``cut``, re-indented: a code line at block depth d starts with ``base + unit * d``.

        Depth follows the widths as Python's tokenizer does: deeper opens a block, shallower closes blocks back to
        the nearest open one at or below it (one between two open widths joins the outer one; one shallower than
        the first line becomes the outermost width); ``first_width`` replaces the first code line's width.
        """
        out: list[str] = []
        stack: list[int] = []  # widths of the open blocks
        shift = 0  # columns the current logical line moved, applied to its continuation lines
        for i, (line, kind, width) in enumerate(zip(self.lines[:cut], self.kinds, self.widths, strict=False)):
            text = line.lstrip(" \t")
            if kind in ("blank", "verbatim"):
                out.append(line if kind == "verbatim" else "")
                continue
            if kind == "cont":
                out.append(" " * max(0, width + shift) + text)
                continue
            if kind == "code":
                if first_width is not None and i == self.code[0]:
                    width = first_width
                if not stack or width > stack[-1]:
                    stack.append(width)
                while len(stack) > 1 and stack[-1] > width:
                    stack.pop()
                stack[-1] = min(stack[-1], width)  # shallower than the first line: the outermost block's width
                depth = len(stack) - 1
            else:  # a comment: the depth of the deepest open block it reaches, opening none
                depth = max(0, sum(1 for w in stack if w <= width) - 1)
            indent = base + unit * depth
            if kind == "code":
                shift = len(indent.expandtabs(_TAB)) - width
            out.append(indent + text)
        return "\n".join(out)


@functools.lru_cache(maxsize=256)
def _prompt_indents(prompt: str, entry: str) -> tuple[str, str]:
    """(indentation of the entry point's ``def`` line, indentation of its body) in the prompt.

    From the syntax tree: the last definition of ``entry`` and its first body line (the docstring). A prompt
    that does not parse (no body yet): the ``def`` line's indentation, and the last non-empty line's when it is
    deeper (else one level of four spaces below the ``def``).
    """
    lines = prompt.splitlines()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(prompt)
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        defs = []
    if defs:
        d = max(defs, key=lambda n: n.lineno)
        head, first = lines[d.lineno - 1], lines[d.body[0].lineno - 1]
        if d.body[0].lineno > d.lineno:
            return _lead(head), _lead(first)
        return _lead(head), _lead(head) + "    "
    heads = [line for line in lines if re.match(rf"[ \t]*(async\s+)?def\s+{re.escape(entry)}\s*\(", line)]
    head = _lead(heads[-1]) if heads else ""
    last = next((line for line in reversed(lines) if line.strip()), "")
    if not last.rstrip().endswith(":") and len(_lead(last).expandtabs(_TAB)) > len(head.expandtabs(_TAB)):
        return head, _lead(last)
    return head, head + "    "


def _lead(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _parses(source: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


_CODE_START = re.compile(r"^(import |from \S+ import |def |class |@|#|[A-Za-z_][A-Za-z0-9_]*\s*=|\s)")


def _looks_like_code(line: str) -> bool:
    return bool(_CODE_START.match(line))


def write_jsonl(path: str | Path, rows: list[dict]) -> str | None:
    """Write ``rows`` as JSONL to ``path`` (its directory made if missing); None when written, else why not
    (``PATH: cannot write (REASON)``), so a caller can warn and keep what it computed."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
    except OSError as e:
        return f"{path}: cannot write ({e.strerror or e})"
    return None


def score_samples(
    problems: dict[str, dict],
    samples: list[dict],
    ks: tuple[int, ...] = (1,),
    limits: SandboxLimits | None = None,
    workers: int = 2,
    results_path: str | Path | None = None,
) -> dict:
    """Run every sample in the sandbox and compute pass@k per problem, averaged over the problems sampled.

    A sample passes only when ``check(entry_point)``, called by the sandbox after the program
    (:func:`build_program`), returned. Each problem's pass@k uses its own n (samples) and c (passed); a k above a
    problem's n is not reported. Per-sample results (task_id, completion, status passed / failed / timed out /
    error, error (why it did not pass), seconds) are written to ``results_path`` as JSONL, in the order of
    ``samples``; when that write fails the score is still returned, with a ``warning``.

    Returns:
        {"pass@k": mean over problems for each k, "problems": P, "samples": N, "counts": {status: N}}, and with
        ``results_path``: "results" (the path, or None when it could not be written) and, then, "warning".

    Raises:
        QtuneError: a k below 1 or above the fewest samples any problem has.
    """
    per_task: dict[str, list[int]] = {}
    for s in samples:
        per_task.setdefault(s["task_id"], [])
    fewest = min(sum(1 for s in samples if s["task_id"] == t) for t in per_task)
    for k in ks:
        if not 1 <= k <= fewest:
            raise QtuneError(f"--k {k}: expected 1 to {fewest} (the fewest samples of any problem)")
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    checks = [check_call(problems[s["task_id"]]) for s in samples]
    results = run_programs(programs, limits, workers, checks=checks)
    counts: dict[str, int] = {}
    rows = []
    for s, r in zip(samples, results, strict=True):
        per_task[s["task_id"]].append(r.status == "passed")
        counts[r.status] = counts.get(r.status, 0) + 1
        rows.append(
            {
                "task_id": s["task_id"],
                "completion": s["completion"],
                "status": r.status,
                "passed": r.status == "passed",
                "error": r.error,
                "seconds": r.seconds,
            }
        )
    summary: dict = {}
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
        summary[f"pass@{k}"] = sum(vals) / len(vals)
    summary.update(
        {
            "problems": len(per_task),
            "samples": len(samples),
            "counts": {st: counts.get(st, 0) for st in ("passed", "failed", "timed out", "error")},
        }
    )
    if results_path:
        problem = write_jsonl(results_path, rows)
        summary["results"] = None if problem else str(results_path)
        if problem:
            summary["warning"] = problem
    return summary


def summary_table(summary: dict) -> str:
    """A short text table of a :func:`score_samples` summary."""
    lines = [f"{'problems':<12} {summary['problems']:>8}", f"{'samples':<12} {summary['samples']:>8}"]
    for status, n in summary["counts"].items():
        lines.append(f"{status:<12} {n:>8}")
    for key, value in summary.items():
        if key.startswith("pass@"):
            lines.append(f"{key:<12} {value:>8.4f}")
    return "\n".join(lines)


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
    from qtune.generate import Engine
    from qtune.model.adapters import load_trained
    from qtune.model.quantize import dequantize_for_inference
    from qtune.rundir import RunDir

    rd = RunDir(Path(run_dir)).require_adapter()
    problems = load_problems(path)
    if limit is not None and limit < 1:
        raise QtuneError(f"--limit {limit}: expected at least 1")
    if samples < 1:
        raise QtuneError(f"--samples {samples}: expected at least 1")
    for k in ks:
        if not 1 <= k <= samples:
            raise QtuneError(f"--k {k}: expected 1 to --samples ({samples})")
    settings = generation_settings(samples, max_new_tokens, temperature, top_p)
    chosen = list(problems.values())[:limit]
    out = rd.root / "humaneval"
    try:  # before the model is loaded and answers generated
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise QtuneError(f"{out}: cannot write ({e.strerror or e})") from None
    model, tokenizer, cfg = load_trained(rd.root, trust_remote_code=trust_remote_code)
    if next(model.parameters()).device.type == "cpu":
        dequantize_for_inference(model)  # same weights, ~4x faster generation on CPU (measured on SmolLM2 NF4)
    engine = Engine.from_model(model, tokenizer, cfg.data.template, rd.root.name, cfg)
    kwargs = dict(samples=samples, batch_size=batch_size, seed=cfg.train.seed, progress=progress)
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
