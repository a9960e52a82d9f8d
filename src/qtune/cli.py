"""The ``qtune`` command line: a thin layer over functions a user can call from Python.

Problems a user can fix (QtuneError) print as one line each on stderr and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from qtune.errors import QtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize a LLaMA-family model, fine-tune LoRA adapters on it, evaluate and generate.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset engineering.")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config; defaults when omitted.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: section.field=value (repeatable).")]
RunOpt = Annotated[Path, typer.Option("--run", help="Run directory written by 'qtune train'.")]


def _fail(message: str) -> None:
    for line in message.splitlines():
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _quiet_libraries() -> None:
    """Keep the terminal to qtune's own output: library progress bars and advisory warnings off."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import that its optional CPU kernel (fetched from the HF hub) is unavailable.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@data_app.command("prepare")
def data_prepare(
    data: Annotated[str, typer.Option(help="A .json/.jsonl/.parquet file or a hub dataset id.")],
    out: Annotated[Path, typer.Option(help="Output directory for the Arrow splits and the data card.")],
    model: Annotated[Optional[str], typer.Option(help="Model whose tokenizer (and chat template) to use.")] = None,
    template: Annotated[Optional[str], typer.Option(help="alpaca (default) or chat.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Token budget per sample.")] = None,
    columns: Annotated[Optional[str], typer.Option(help="Column mapping, e.g. instruction=prompt,output=completion.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Clean, format, tokenize and split instruction data; print and save the data card."""
    from qtune.config import load_config

    overrides = list(set_ or []) + [f"data.path={json.dumps(data)}"]
    if model:
        overrides.append(f"model.name={json.dumps(model)}")
    if template:
        overrides.append(f"data.template={template}")
    if max_length:
        overrides.append(f"data.max_length={max_length}")
    try:
        if columns:
            pairs = [c.split("=", 1) for c in columns.split(",")]
            if any(len(p) != 2 for p in pairs):
                raise QtuneError(f"--columns {columns!r}: expected field=column pairs separated by commas")
            overrides.append("data.columns=" + json.dumps({k.strip(): v.strip() for k, v in pairs}))
        cfg = load_config(config, overrides)
        _quiet_libraries()
        from qtune.data.prepare import prepare_dataset
        from qtune.model.load import check_max_length, load_tokenizer, resolve_model

        path = resolve_model(cfg.model)
        check_max_length(path, cfg.model, cfg.data.max_length)
        _, card = prepare_dataset(cfg.data, load_tokenizer(path, cfg.model), out)
    except QtuneError as e:
        _fail(str(e))
    typer.echo(card.table())
    typer.echo(f"saved: {out}")


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
) -> None:
    """Fine-tune LoRA adapters on a (quantized) base model; prints the run directory."""
    from qtune.config import load_config

    try:
        cfg = load_config(config, set_)
        _quiet_libraries()
        from qtune.train.trainer import train as run_training

        summary = run_training(cfg, overwrite=overwrite)
    except QtuneError as e:
        _fail(str(e))
    if "process_index" in summary:  # a non-main rank of a distributed run: the main process reports
        return
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"run directory: {summary['run_dir']}")


class _OptionalValueCommand(TyperCommand):
    """``--humaneval`` takes an optional PATH: a bare ``--humaneval`` (last, or before another option) means the
    default problems file, passed on as an empty string."""

    def parse_args(self, ctx, args):
        fixed = []
        for i, a in enumerate(args):
            fixed.append(a)
            if a == "--humaneval" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("")
        return super().parse_args(ctx, fixed)


@app.command("eval", cls=_OptionalValueCommand)
def eval_(
    run: Annotated[Optional[Path], typer.Option("--run", help="Run directory written by 'qtune train'.")] = None,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to evaluate.")] = "val,test",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    humaneval: Annotated[Optional[str], typer.Option(
        "--humaneval", metavar="[PATH]",
        help="HumanEval pass@k of the run's model instead of loss: generate, extract code, run it in the sandbox. "
        "PATH: the problems (.jsonl or .jsonl.gz); default ../shared/data/humaneval/HumanEval.jsonl.gz.")] = None,
    humaneval_samples: Annotated[Optional[Path], typer.Option(
        "--humaneval-samples", help="Score an existing samples file (JSONL of task_id, completion); no --run.")] = None,
    problems: Annotated[Optional[Path], typer.Option(
        "--problems", help="HumanEval problems for --humaneval-samples (default: the shared HumanEval file).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="--humaneval: only the first N problems.")] = None,
    samples: Annotated[int, typer.Option(help="--humaneval: answers generated per problem.")] = 1,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="pass@k to report (repeatable); pass@1 always.")] = None,
    base: Annotated[bool, typer.Option("--base", help="--humaneval: the base model (adapter disabled).")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="--humaneval: 0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="--humaneval: nucleus sampling mass.")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="--humaneval: most tokens per answer.")] = 384,
    batch_size: Annotated[int, typer.Option(min=1, help="--humaneval: prompts generated at once.")] = 8,
    timeout: Annotated[float, typer.Option(min=0.1, help="Sandbox: wall-clock seconds per program.")] = 10.0,
    memory_mb: Annotated[int, typer.Option(min=16, help="Sandbox: address space per process, MiB.")] = 1024,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Sandbox: programs run at once.")] = 2,
    results: Annotated[Optional[Path], typer.Option(
        help="--humaneval-samples: per-sample results JSONL (default: SAMPLES with _results.jsonl).")] = None,
) -> None:
    """Validation and test loss / perplexity of the base and of base + adapter (same quantization); or
    HumanEval pass@k (--humaneval, --humaneval-samples)."""
    if humaneval is not None or humaneval_samples is not None:
        _eval_humaneval(run, humaneval, humaneval_samples, problems, limit, samples, k, base, temperature, top_p,
                        max_new_tokens, batch_size, timeout, memory_mb, workers, results, json_out)
        return
    try:
        if run is None:
            raise QtuneError("eval: pass --run DIR (or --humaneval-samples FILE)")
        _quiet_libraries()
        from qtune.evaluate.perplexity import evaluate_run

        names = tuple(x.strip() for x in splits.split(",") if x.strip())
        if not names or set(names) - {"train", "val", "test"}:
            raise QtuneError(f"--splits {splits!r}: expected a comma-separated subset of train, val, test")
        result = evaluate_run(str(run), names)
    except QtuneError as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{'split':<6} {'model':<8} {'loss':>8} {'perplexity':>11} {'tokens':>8}")
    for split in result["base"]:
        for who in ("base", "adapter"):
            r = result[who][split]
            typer.echo(f"{split:<6} {who:<8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['tokens']:>8}")
    typer.echo(f"saved: {run / 'eval.json'}")


def _eval_humaneval(run, humaneval, humaneval_samples, problems, limit, samples, k, base, temperature, top_p,
                    max_new_tokens, batch_size, timeout, memory_mb, workers, results, json_out) -> None:
    from qtune.evaluate import humaneval as he
    from qtune.evaluate.sandbox import SandboxLimits

    ks = tuple(sorted({1, *(k or [])}))
    try:
        if humaneval is not None and humaneval_samples is not None:
            raise QtuneError("--humaneval and --humaneval-samples: pass one of them")
        limits = SandboxLimits(timeout_s=timeout, memory_mb=memory_mb)
        if humaneval_samples is not None:
            table = he.load_problems(problems)
            rows = he.load_samples(humaneval_samples, table)
            out = results or humaneval_samples.with_name(humaneval_samples.name.removesuffix(".jsonl") + "_results.jsonl")
            summary = he.score_samples(table, rows, ks, limits, workers, out)
        else:
            if run is None:
                raise QtuneError("--humaneval: pass --run DIR (the model to generate with)")
            _quiet_libraries()
            summary = he.evaluate_run_humaneval(
                str(run), humaneval or None, limit, samples, base, ks, temperature, top_p, max_new_tokens,
                batch_size, limits, workers,
                progress=None if json_out else lambda d, n: typer.echo(f"generated {d}/{n}", err=True))
            out = Path(run) / "humaneval" / f"{'base' if base else 'adapter'}_results.jsonl"
    except QtuneError as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(summary))
        return
    typer.echo(he.summary_table(summary))
    typer.echo(f"results: {out}")


@app.command()
def generate(
    run: RunOpt,
    prompt: Annotated[str, typer.Argument(help="The instruction to answer.")],
    input: Annotated[str, typer.Option("--input", help="Optional input/context for the instruction.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
) -> None:
    """Answer an instruction with base + adapter, in the template the adapter was trained with."""
    try:
        _quiet_libraries()
        from qtune.serve.engine import Engine, GenerationSettings

        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        answer = Engine(str(run)).answer(prompt, input, settings)
    except (QtuneError, ValueError) as e:
        _fail(str(e))
    typer.echo(answer)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
