"""``qtune eval loss`` and ``qtune eval humaneval``: measure a trained run.

``loss`` is the validation/test loss and perplexity of the base and of base + adapter; ``humaneval`` is HumanEval
pass@k, of a run's model (generate, extract the code, run it in the sandbox) or of a samples file. The flag forms
of earlier releases (``qtune eval --run RUN``, ``qtune eval --humaneval``) still work for one release
(:mod:`qtune.cli.eval_legacy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtune.cli.common import JsonOpt, RemoteCodeOpt, RunOpt, app, fail, quiet_libraries
from qtune.cli.errors import writes_to
from qtune.cli.eval_legacy import LegacyEvalGroup
from qtune.data.split import SPLITS
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.rundir import RunDir

eval_app = typer.Typer(
    cls=LegacyEvalGroup,
    no_args_is_help=True,
    help="Measure a trained run: loss and perplexity (loss), or HumanEval pass@k (humaneval).",
)
app.add_typer(eval_app, name="eval")


@eval_app.command("loss")
def loss(
    run: RunOpt,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to evaluate.")] = "val,test",
    json_out: JsonOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Validation and test loss / perplexity of the base and of base + adapter (same quantization); saved in the
    run's eval.json."""
    rd = RunDir(run)
    try:
        writes_to(rd.eval)
        quiet_libraries()
        from qtune.evaluate.perplexity import evaluate_run

        names = tuple(x.strip() for x in splits.split(",") if x.strip())
        if not names or set(names) - set(SPLITS):
            raise QtuneError(f"--splits {splits!r}: expected a comma-separated subset of {', '.join(SPLITS)}")
        result = evaluate_run(str(run), names, trust_remote_code=trust_remote_code)
    except QtuneError as e:
        fail(str(e))
    if json_out:
        typer.echo(dumps(result))
        return
    typer.echo(f"{'split':<6} {'model':<8} {'loss':>8} {'perplexity':>11} {'tokens':>8}")
    for split in result["base"]:
        for who in ("base", "adapter"):
            r = result[who][split]
            typer.echo(f"{split:<6} {who:<8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['tokens']:>8}")
    typer.echo(f"saved: {rd.eval}")


HeRunOpt = Annotated[
    Path | None, typer.Option("--run", help="Run directory whose model (base + adapter) generates the answers.")
]
SamplesFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--samples-file",
        help="Score this samples file (JSONL of task_id, completion) instead of generating; no --run.",
    ),
]
ProblemsOpt = Annotated[
    Path | None,
    typer.Option(
        "--problems",
        help="The problems (.jsonl or .jsonl.gz); default ../shared/data/humaneval/HumanEval.jsonl.gz.",
    ),
]
LimitOpt = Annotated[int | None, typer.Option(help="Generating: only the first N problems.")]
SamplesOpt = Annotated[int, typer.Option(help="Generating: answers generated per problem.")]
KOpt = Annotated[list[int] | None, typer.Option("--k", help="pass@k to report (repeatable); pass@1 always.")]
BaseOpt = Annotated[bool, typer.Option("--base", help="Generating: the base model (adapter disabled).")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="Generating: 0 for greedy decoding.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Generating: nucleus sampling mass.")]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Generating: most tokens per answer.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Generating: prompts generated at once.")]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Sandbox: wall-clock seconds per program.")]
MemoryOpt = Annotated[int, typer.Option(min=16, help="Sandbox: address space per process, MiB.")]
WorkersOpt = Annotated[int, typer.Option(min=1, max=64, help="Sandbox: programs run at once.")]
ResultsOpt = Annotated[
    Path | None,
    typer.Option(
        help="--samples-file: per-sample results JSONL (default: --out/STEM_results.jsonl, STEM the samples "
        "file's name without .jsonl)."
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="--samples-file: directory for the per-sample results (default: the current one)."),
]


def _results_path(samples_file: Path, results: Path | None, out: Path | None) -> Path:
    """Where the per-sample results of a scored samples file go: ``results``, else ``STEM_results.jsonl`` in
    ``out`` (default: the current directory), STEM the samples file's name without ``.jsonl`` (or ``.jsonl.gz``)."""
    stem = samples_file.name.removesuffix(".gz").removesuffix(".jsonl")
    return results or (out or Path(".")) / f"{stem}_results.jsonl"


@eval_app.command("humaneval")
def humaneval(
    run: HeRunOpt = None,
    samples_file: SamplesFileOpt = None,
    problems: ProblemsOpt = None,
    limit: LimitOpt = None,
    samples: SamplesOpt = 1,
    k: KOpt = None,
    base: BaseOpt = False,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 0.95,
    max_new_tokens: MaxNewTokensOpt = 384,
    batch_size: BatchSizeOpt = 8,
    timeout: TimeoutOpt = 10.0,
    memory_mb: MemoryOpt = 1024,
    workers: WorkersOpt = 2,
    results: ResultsOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """HumanEval pass@k: of a run's model (--run: generate, extract the code, run it in the sandbox; the samples,
    per-sample results and summary are saved in the run's humaneval/ folder), or of a samples file
    (--samples-file)."""
    from qtune.evaluate.humaneval import evaluate_run_humaneval
    from qtune.evaluate.sandbox import SandboxLimits

    ks = tuple(sorted({1, *(k or [])}))
    try:
        limits = SandboxLimits(timeout_s=timeout, memory_mb=memory_mb)
        if samples_file is not None:
            if run is not None:
                raise QtuneError("eval humaneval: --run generates, --samples-file scores a file: pass one of them")
            path = _results_path(samples_file, results, out)
            summary = _score_file(samples_file, problems, ks, limits, workers, path)
        elif run is None:
            raise QtuneError("eval humaneval: pass --run DIR (the model to generate with) or --samples-file FILE")
        else:
            writes_to(RunDir(run).humaneval)
            quiet_libraries()
            summary = evaluate_run_humaneval(
                str(run),
                problems,
                limit,
                samples,
                base,
                ks,
                temperature,
                top_p,
                max_new_tokens,
                batch_size,
                limits,
                workers,
                trust_remote_code=trust_remote_code,
                progress=None if json_out else lambda d, n: typer.echo(f"generated {d}/{n}", err=True),
            )
    except QtuneError as e:
        fail(str(e))
    _echo_humaneval(summary, json_out)


def _score_file(samples_file: Path, problems: Path | None, ks: tuple[int, ...], limits, workers: int, path: Path):
    """The summary of scoring ``samples_file`` against ``problems`` (None: the shared HumanEval file), the
    per-sample results written to ``path``.

    Raises:
        QtuneError: a bad problems or samples file, or ``ks`` above the fewest samples of any problem.
    """
    from qtune.evaluate.humaneval import load_problems, load_samples, score_samples

    table = load_problems(problems)
    rows = load_samples(samples_file, table)
    writes_to(path)
    return score_samples(table, rows, ks, limits, workers, path)


def _echo_humaneval(summary: dict, json_out: bool) -> None:
    """Print a HumanEval summary: its warning (a results file that could not be written) on stderr, then one JSON
    object or the table and where the per-sample results are."""
    from qtune.evaluate.humaneval import summary_table

    if summary.get("warning"):  # the score stands; only a results file is missing
        typer.echo(f"warning: {summary['warning']}", err=True)
    if json_out:
        typer.echo(dumps(summary))
        return
    typer.echo(summary_table(summary))
    if summary.get("results"):
        typer.echo(f"results: {summary['results']}")
