"""The ``qtune`` command line: a thin layer over functions a user can call from Python.

Problems a user can fix (QtuneError) print as one line each on stderr and exit with status 2; see :func:`main`
for the other ways a command ends.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand

from qtune.config import QUANT_FORMATS, SIXTEEN_BIT, QuantConfig, TrainConfig
from qtune.data.split import SPLITS
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.model.memory import Device, Strategy
from qtune.rundir import RunDir
from qtune.serve.export_check import DEFAULT_CHECK_ROWS, DEFAULT_MAX_DRIFT

_default_showwarning = warnings.showwarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize a LLaMA-family model, fine-tune LoRA adapters on it, evaluate and generate.",
)
data_app = typer.Typer(no_args_is_help=True, help="Dataset engineering.")
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config; defaults when omitted.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config field: section.field=value (repeatable).")
]
RunOpt = Annotated[Path, typer.Option("--run", help="Run directory written by 'qtune train'.")]
RemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow the model's own Python code from its hub repository to run (off unless given).",
    ),
]


def _fail(message: str) -> NoReturn:
    """Print ``message`` as ``error: ...`` lines on stderr and exit with status 2."""
    for line in message.splitlines():
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def _remote_code(cfg, allowed: bool) -> None:
    """Remote model code runs only with --trust-remote-code, whatever the config file says."""
    if cfg.model.trust_remote_code and not allowed:
        raise QtuneError("model.trust_remote_code: true also needs the --trust-remote-code flag on the command line")
    cfg.model.trust_remote_code = allowed


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from qtune.errors import QtuneWarning

    if issubclass(category, QtuneWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _quiet_libraries() -> None:
    """Keep the terminal to qtune's own output: library progress bars and advisory warnings off."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import that its optional CPU kernel (fetched from the HF hub) is unavailable.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.showwarning = _show_warning
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _column_pairs(columns: str) -> dict[str, str]:
    """``--columns instruction=prompt,output=completion`` as a dict (the keys are checked by the config)."""
    pairs = [c.split("=", 1) for c in columns.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise QtuneError(f"--columns {columns!r}: expected field=column pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


@data_app.command("prepare")
def data_prepare(
    data: Annotated[str, typer.Option(help="A .json/.jsonl/.parquet file or a hub dataset id.")],
    out: Annotated[Path, typer.Option(help="Output directory for the Arrow splits and the data card.")],
    model: Annotated[str | None, typer.Option(help="Model whose tokenizer (and chat template) to use.")] = None,
    template: Annotated[str | None, typer.Option(help="alpaca (default) or chat.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Token budget per sample.")] = None,
    columns: Annotated[
        str | None, typer.Option(help="Column mapping, e.g. instruction=prompt,output=completion.")
    ] = None,
    decontaminate: Annotated[
        list[str] | None,
        typer.Option(help="Drop rows sharing a 13-gram with this benchmark's problems (humaneval); repeatable."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Clean, format, tokenize and split instruction data; print and save the data card."""
    from qtune.config import load_config

    overrides = list(set_ or []) + [f"data.path={json.dumps(data)}"]
    if decontaminate:
        overrides.append(f"data.decontaminate={json.dumps(decontaminate)}")
    if model:
        overrides.append(f"model.name={json.dumps(model)}")
    if template:
        overrides.append(f"data.template={template}")
    if max_length is not None:  # 0 or a negative value reaches the config's check (one error line)
        overrides.append(f"data.max_length={max_length}")
    try:
        if columns:
            overrides.append("data.columns=" + json.dumps(_column_pairs(columns)))
        cfg = load_config(config, overrides)
        _remote_code(cfg, trust_remote_code)
        _writes_to(out)
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


@data_app.command("overlap")
def data_overlap(
    data: Annotated[str, typer.Option(help="A .json/.jsonl/.parquet file or a hub dataset id.")],
    benchmark: Annotated[str, typer.Option(help="Benchmark whose problems to look for: humaneval.")] = "humaneval",
    columns: Annotated[
        str | None, typer.Option(help="Column mapping, e.g. instruction=prompt,output=completion.")
    ] = None,
) -> None:
    """Count the rows that share a 13-gram with a benchmark's problems (nothing is dropped or written)."""
    from qtune.config import load_config
    from qtune.data.decontaminate import find_overlap
    from qtune.data.load import load_rows

    overrides = [f"data.path={json.dumps(data)}", f"data.decontaminate={json.dumps([benchmark])}"]
    try:
        if columns:
            overrides.append("data.columns=" + json.dumps(_column_pairs(columns)))
        cfg = load_config(None, overrides).data  # the same checks of the path, columns and benchmark as prepare
        rows, _ = load_rows(cfg.path, cfg.columns)
        overlap = find_overlap(rows, benchmark)
    except QtuneError as e:
        _fail(str(e))
    typer.echo(overlap.summary())


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an existing run directory that qtune wrote (never one "
            "holding other files, the config or data file, or the current directory)."
        ),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue an interrupted run from its last good checkpoint, with its saved config and data; --set may "
            "change train.learning_rate and train.max_grad_norm (recorded in the run's config.yaml and resumes.jsonl)."
        ),
    ] = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Fine-tune LoRA adapters on a (quantized) base model; prints the run directory."""
    from qtune.config import check_require_cuda, load_config

    try:
        if resume is not None:
            from qtune.config import check_resume_overrides

            if config is not None or overwrite:
                raise QtuneError("--resume: continues the run with its saved config; drop --config and --overwrite")
            check_resume_overrides(set_ or [])
            cfg = load_config(RunDir(resume).require_config("nothing to resume").config, set_)
            cfg.train.output_dir = str(resume)
        else:
            cfg = load_config(config, set_)
        check_require_cuda(cfg)  # before the libraries load: a GPU-sized config refuses at once on a CPU
        _remote_code(cfg, trust_remote_code)
        _writes_to(cfg.train.output_dir)
        _quiet_libraries()
        from qtune.train.trainer import train as run_training

        summary = run_training(
            cfg, overwrite=overwrite, resume=resume is not None, protect=(config,) if config is not None else ()
        )
    except QtuneError as e:
        _fail(str(e))
    if "process_index" in summary:  # a non-main rank of a distributed run: the main process reports
        return
    typer.echo(dumps(summary, indent=2))
    typer.echo(f"run directory: {summary['run_dir']}")


class _OptionalValueCommand(TyperCommand):
    """``--humaneval`` takes an optional PATH: a bare ``--humaneval`` (last, or before another option) means the
    default problems file, passed on as an empty string."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        fixed = []
        for i, a in enumerate(args):
            fixed.append(a)
            if a == "--humaneval" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("")
        return super().parse_args(ctx, fixed)


@app.command("eval", cls=_OptionalValueCommand)
def eval_(
    run: Annotated[Path | None, typer.Option("--run", help="Run directory written by 'qtune train'.")] = None,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to evaluate.")] = "val,test",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    humaneval: Annotated[
        str | None,
        typer.Option(
            "--humaneval",
            metavar="[PATH]",
            help="HumanEval pass@k of the run's model instead of loss: generate, extract code, run it in the sandbox. "
            "PATH: the problems (.jsonl or .jsonl.gz); default ../shared/data/humaneval/HumanEval.jsonl.gz.",
        ),
    ] = None,
    humaneval_samples: Annotated[
        Path | None,
        typer.Option(
            "--humaneval-samples", help="Score an existing samples file (JSONL of task_id, completion); no --run."
        ),
    ] = None,
    problems: Annotated[
        Path | None,
        typer.Option(
            "--problems", help="HumanEval problems for --humaneval-samples (default: the shared HumanEval file)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="--humaneval: only the first N problems.")] = None,
    samples: Annotated[int, typer.Option(help="--humaneval: answers generated per problem.")] = 1,
    k: Annotated[list[int] | None, typer.Option("--k", help="pass@k to report (repeatable); pass@1 always.")] = None,
    base: Annotated[bool, typer.Option("--base", help="--humaneval: the base model (adapter disabled).")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="--humaneval: 0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="--humaneval: nucleus sampling mass.")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="--humaneval: most tokens per answer.")] = 384,
    batch_size: Annotated[int, typer.Option(min=1, help="--humaneval: prompts generated at once.")] = 8,
    timeout: Annotated[float, typer.Option(min=0.1, help="Sandbox: wall-clock seconds per program.")] = 10.0,
    memory_mb: Annotated[int, typer.Option(min=16, help="Sandbox: address space per process, MiB.")] = 1024,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Sandbox: programs run at once.")] = 2,
    results: Annotated[
        Path | None,
        typer.Option(
            help="--humaneval-samples: per-sample results JSONL (default: --out/STEM_results.jsonl, STEM the "
            "samples file's name without .jsonl)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="--humaneval-samples: directory for the per-sample results (default: the current one)."
        ),
    ] = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Validation and test loss / perplexity of the base and of base + adapter (same quantization); or
    HumanEval pass@k (--humaneval, --humaneval-samples)."""
    if humaneval is not None or humaneval_samples is not None:
        _eval_humaneval(
            run,
            humaneval,
            humaneval_samples,
            problems,
            limit,
            samples,
            k,
            base,
            temperature,
            top_p,
            max_new_tokens,
            batch_size,
            timeout,
            memory_mb,
            workers,
            results,
            json_out,
            trust_remote_code,
            out,
        )
        return
    try:
        if run is None:
            raise QtuneError("eval: pass --run DIR (or --humaneval-samples FILE)")
        _writes_to(RunDir(run).eval)
        _quiet_libraries()
        from qtune.evaluate.perplexity import evaluate_run

        names = tuple(x.strip() for x in splits.split(",") if x.strip())
        if not names or set(names) - set(SPLITS):
            raise QtuneError(f"--splits {splits!r}: expected a comma-separated subset of {', '.join(SPLITS)}")
        result = evaluate_run(str(run), names, trust_remote_code=trust_remote_code)
    except QtuneError as e:
        _fail(str(e))
    if json_out:
        typer.echo(dumps(result))
        return
    typer.echo(f"{'split':<6} {'model':<8} {'loss':>8} {'perplexity':>11} {'tokens':>8}")
    for split in result["base"]:
        for who in ("base", "adapter"):
            r = result[who][split]
            typer.echo(f"{split:<6} {who:<8} {r['loss']:>8.4f} {r['perplexity']:>11.3f} {r['tokens']:>8}")
    typer.echo(f"saved: {RunDir(run).eval}")


def _eval_humaneval(
    run,
    humaneval,
    humaneval_samples,
    problems,
    limit,
    samples,
    k,
    base,
    temperature,
    top_p,
    max_new_tokens,
    batch_size,
    timeout,
    memory_mb,
    workers,
    results,
    json_out,
    trust_remote_code=False,
    out_dir=None,
) -> None:
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
            stem = humaneval_samples.name.removesuffix(".gz").removesuffix(".jsonl")
            out = results or (out_dir or Path(".")) / f"{stem}_results.jsonl"
            _writes_to(out)
            summary = he.score_samples(table, rows, ks, limits, workers, out)
        else:
            if run is None:
                raise QtuneError("--humaneval: pass --run DIR (the model to generate with)")
            _writes_to(Path(run) / "humaneval")
            _quiet_libraries()
            summary = he.evaluate_run_humaneval(
                str(run),
                humaneval or None,
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
        _fail(str(e))
    if summary.get("warning"):  # the score stands; only a results file is missing
        typer.echo(f"warning: {summary['warning']}", err=True)
    if json_out:
        typer.echo(dumps(summary))
        return
    typer.echo(he.summary_table(summary))
    if summary.get("results"):
        typer.echo(f"results: {summary['results']}")


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
        from qtune.generate import Engine, GenerationSettings

        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        answer = Engine(str(run)).answer(prompt, input, settings)
    except (QtuneError, ValueError) as e:
        _fail(str(e))
    typer.echo(answer)


_ESTIMATE_FLAGS = {
    "model.name": "model",
    "quant.quant": "quant",
    "quant.double_quant": "double-quant",
    "quant.compute_dtype": "compute-dtype",
    "quant.skip_modules": "skip-modules",
    "lora.r": "r",
    "lora.target_modules": "target-modules",
    "lora.use_dora": "dora",
    "lora.lora_dropout": "lora-dropout",
    "train.optim": "optim",
    "train.batch_size": "batch-size",
    "train.gradient_checkpointing": "gradient-checkpointing",
    "train.upcast_frozen": "upcast-frozen",
}
"""Config field -> ``qtune estimate`` flag: each flag is a shorthand for ``--set FIELD=VALUE``."""


def _estimate_config(config: Path | None, set_: list[str] | None, flags: dict, trust_remote_code: bool):
    """The RunConfig ``qtune estimate`` counts: ``--config`` and ``--set`` read as ``qtune train`` reads them, then
    the flags given (``flags``: config field -> value). Each flag is first checked alone against the config types,
    so a bad value is reported under its flag's name (``--quant: Input should be 'none', ... (got 'nf5')``).
    Without ``--config`` the data file need not exist (the flag form reads no data)."""
    from pydantic import ValidationError

    from qtune.config import RunConfig, load_config

    nested: dict = {}
    for key, value in flags.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    try:
        RunConfig.model_validate(nested, context={"saved_run": True})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"][:2])
            where = f"--{_ESTIMATE_FLAGS[key]}: " if key in _ESTIMATE_FLAGS else ""
            got = f" (got {e['input']!r})" if e["loc"] else ""
            lines.append(f"{where}{e['msg'].removeprefix('Value error, ')}{got}")
        raise QtuneError("\n".join(dict.fromkeys(lines))) from None
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items()]
    cfg = load_config(config, [*(set_ or []), *overrides], saved_run=config is None)
    _remote_code(cfg, trust_remote_code)
    return cfg


def _estimate_inputs(
    cfg, from_file: bool, full_ft: bool, seq_len, device, world_size: int, strategy: Strategy, logit_fraction
):
    """(counts, shape) for ``cfg``: with a config file the data is prepared as ``qtune train`` would (longest
    training sample, supervised share; what ``qtune sweep`` records for the run) unless ``--seq-len`` and
    ``--logit-fraction`` both replace it; the flag form takes ``data.max_length`` and every position."""
    from dataclasses import replace

    from qtune.model.memory import prepared_split_stats, run_config_inputs

    if strategy == "fsdp" and world_size < 2:
        raise QtuneError("--strategy fsdp shards over GPUs: pass --world-size 2 or more")
    longest, share = None, None
    if from_file and (seq_len is None or logit_fraction is None):
        try:
            longest, share = prepared_split_stats(cfg)
        except QtuneError as e:
            raise QtuneError(
                f"{e} (the estimate reads the training split for its longest sample and supervised "
                "share; give --seq-len and --logit-fraction to estimate without it)"
            ) from None
    counts, shape = run_config_inputs(cfg, seq_len or longest, device, share, world_size, strategy)
    if full_ft:
        shape = replace(shape, r=0)
    if logit_fraction is not None:
        shape = replace(shape, logit_fraction=logit_fraction)
    return counts, shape


def _echo_estimate(est, fitted: dict | None, json_out: bool) -> None:
    if json_out:
        typer.echo(dumps(est.to_dict() | ({"fit": fitted} if fitted else {})))
        return
    typer.echo(est.table())
    s = est.shape
    typer.echo(
        f"inputs: {s.device}, {s.world_size} x {s.strategy}, batch {s.batch_size} x seq_len {s.seq_len}, "
        f"quant {s.quant}, r {s.r}, optim {s.optim}, logits at {s.logit_fraction:.3g} of the positions"
    )
    typer.echo(f"trainable parameters: {est.trainable_params:,} of {est.total_params:,}")
    if fitted:
        typer.echo(
            f"largest batch at {fitted['seq_len']} tokens: {fitted['max_batch_size']} "
            f"(budget {fitted['budget_gib']} GiB)"
        )
        for row in fitted["table"]:
            typer.echo(f"  seq_len {row['seq_len']:>6}: batch {row['max_batch_size']:>5}  ({row['tokens']:,} tokens)")


def _choices(section, name: str) -> str:
    """Help of a flag setting a Literal field of a config section: the field and its values, read from the type."""
    from typing import get_args

    from qtune.config import RunConfig

    key = next(k for k, f in RunConfig.model_fields.items() if f.default_factory is section)
    return f"{key}.{name}: {', '.join(get_args(section.model_fields[name].annotation))}."


def _names(value: str | None):
    """A comma-separated flag value as a list of names (None when the flag was not given)."""
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def estimate(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="YAML run config: estimate the run "
            "'qtune train' would launch with it (its data is prepared for the "
            "longest sample and the supervised share).",
        ),
    ] = None,
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(help="model.name: hub id, model directory (a config.json alone is enough), .gguf or alias."),
    ] = None,
    quant: Annotated[str | None, typer.Option(help=_choices(QuantConfig, "quant"))] = None,
    double_quant: Annotated[
        bool | None, typer.Option("--double-quant/--no-double-quant", help="quant.double_quant.")
    ] = None,
    r: Annotated[int | None, typer.Option("--r", min=0, help="lora.r; 0 = full fine-tuning (estimate only).")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help="lora.target_modules: all-linear or comma-separated names.")
    ] = None,
    dora: Annotated[bool | None, typer.Option("--dora/--no-dora", help="lora.use_dora.")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="lora.lora_dropout.")] = None,
    optim: Annotated[str | None, typer.Option(help=_choices(TrainConfig, "optim"))] = None,
    batch_size: Annotated[int | None, typer.Option(help="train.batch_size (sequences per micro-batch).")] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="train.gradient_checkpointing."),
    ] = None,
    compute_dtype: Annotated[str | None, typer.Option(help=_choices(QuantConfig, "compute_dtype"))] = None,
    upcast_frozen: Annotated[
        bool | None,
        typer.Option(
            "--upcast-frozen/--no-upcast-frozen",
            help="train.upcast_frozen (PEFT's fp32 upcast on a quantized base, the stock recipe).",
        ),
    ] = None,
    skip_modules: Annotated[str | None, typer.Option(help="quant.skip_modules, comma-separated.")] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens per sequence (default: the longest training sample with --config, else data.max_length).",
        ),
    ] = None,
    device: Annotated[
        Device | None,
        typer.Option(help="Peak allocated on cuda or peak RSS on cpu (default: where 'qtune train' would run here)."),
    ] = None,
    world_size: Annotated[int, typer.Option(min=1, help="Data-parallel GPUs; the estimate is per GPU.")] = 1,
    strategy: Annotated[Strategy, typer.Option(help="Data parallelism with --world-size > 1.")] = "ddp",
    logit_fraction: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of positions whose logits are computed (default: the supervised share with --config, else 1).",
        ),
    ] = None,
    fit_gib: Annotated[
        float | None, typer.Option("--fit", min=0.0, help="Also answer the largest batch that fits GIB.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object; peak_gib is the predicted peak.")] = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Predict peak training memory, term by term, from the model's config alone (no weights): of the run a
    config describes (--config, --set), or of qtune's defaults changed by the flags (each flag sets the config
    field its help names)."""
    flags = {
        "model.name": model,
        "quant.quant": quant,
        "quant.double_quant": double_quant,
        "quant.compute_dtype": compute_dtype,
        "quant.skip_modules": _names(skip_modules),
        "lora.r": r or None,
        "lora.use_dora": dora,
        "lora.lora_dropout": lora_dropout,
        "lora.target_modules": target_modules if target_modules in (None, "all-linear") else _names(target_modules),
        "train.optim": optim,
        "train.batch_size": batch_size,
        "train.gradient_checkpointing": gradient_checkpointing,
        "train.upcast_frozen": upcast_frozen,
    }
    try:
        _quiet_libraries()
        from qtune.model.memory import estimate as run_estimate
        from qtune.model.memory import fit

        cfg = _estimate_config(config, set_, {k: v for k, v in flags.items() if v is not None}, trust_remote_code)
        counts, shape = _estimate_inputs(
            cfg, config is not None, r == 0, seq_len, device, world_size, strategy, logit_fraction
        )
        est = run_estimate(counts, shape)
        fitted = None
        if fit_gib is not None:
            fitted = fit(counts, shape, fit_gib, getattr(counts.config, "max_position_embeddings", None))
    except QtuneError as e:
        _fail(str(e))
    _echo_estimate(est, fitted, json_out)


@app.command()
def sweep(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="Sweep file (YAML): base config, set, axes, output_dir.")
    ],
    final: Annotated[
        bool, typer.Option("--final", help="Retrain the best configuration and evaluate it once on test.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the expanded grid and each run's memory estimate; train nothing, write nothing."
        ),
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(
            help="--dry-run: estimate for cuda or cpu (default: cuda for a "
            "train.require_cuda config or when a GPU is visible)."
        ),
    ] = None,
) -> None:
    """Grid of quantization x LoRA rank (x lr, batch, variant): one training process per run, resumable."""
    try:
        _quiet_libraries()
        from qtune.study.dryrun import format_plan, plan
        from qtune.study.runner import run_sweep
        from qtune.study.spec import load_sweep

        if dry_run:
            if final:
                raise QtuneError("--dry-run trains nothing; drop --final")
            typer.echo(format_plan(plan(config, device)))
            return
        if device is not None:
            raise QtuneError("--device applies to --dry-run only (a run's device is the machine's: CUDA when visible)")
        _writes_to(load_sweep(config)[0].output_dir)
        out = run_sweep(config, final=final, echo=typer.echo)
    except QtuneError as e:
        _fail(str(e))
    typer.echo(f"table: {out['sweep_dir']}/results.md, {out['sweep_dir']}/results.csv")


@app.command()
def report(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep directory written by 'qtune sweep'.")],
) -> None:
    """Figures (PNG) and report.md for a sweep: memory per configuration (measured and estimated), full fine-tuning
    vs the best configuration, memory over time, training loss, learning rate, validation loss vs memory."""
    try:
        _writes_to(sweep_dir)
        _quiet_libraries()
        from qtune.study.report import write_report

        path = write_report(sweep_dir)
    except QtuneError as e:
        _fail(str(e))
    typer.echo(f"report: {path}")


QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help=f"Base weights for serving: {', '.join(QUANT_FORMATS)} (none: fp32); default: the run's own.",
    ),
]


def _generation_settings(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float):
    from qtune.generate import GenerationSettings

    try:
        return GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty
        )
    except ValueError as e:
        raise QtuneError(str(e)) from None


@app.command()
def chat(
    run: RunOpt,
    quant: QuantOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt; default: the template's own.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="1 for none.")] = 1.0,
) -> None:
    """Chat in the terminal with base + adapter (or a merged model); the conversation is kept across turns."""
    try:
        settings = _generation_settings(max_new_tokens, temperature, top_p, repetition_penalty)
        _quiet_libraries()
        from qtune.generate import Engine
        from qtune.serve.session import ChatSession

        engine = Engine(str(run), quant)
        engine.prompt_budget(settings)
    except (QtuneError, ValueError) as e:
        _fail(str(e))
    session = ChatSession(engine, system)
    typer.echo(
        f"qtune chat: {engine.name} ({engine.template} template, context {engine.context_length} tokens). "
        "/new starts over, /exit or Ctrl-D quits."
    )
    while True:
        try:
            line = input("you> ")
        except EOFError:
            typer.echo()
            break
        command = line.strip()
        if not command:
            typer.echo("(empty message ignored: type a question)")
            continue
        if command in ("/exit", "/quit"):
            break
        if command in ("/new", "/reset"):
            session.reset()
            typer.echo("(new conversation)")
            continue
        try:
            reply = session.ask(line, settings)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            continue
        if reply.notice:
            typer.echo(f"({reply.notice})")
        typer.echo("assistant> ", nl=False)
        for piece in reply:
            typer.echo(piece, nl=False)
        typer.echo()


@app.command()
def serve(
    run: RunOpt,
    host: Annotated[
        str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 7860,
    auth: Annotated[str | None, typer.Option(help="Require USER:PASS for the web app and the API.")] = None,
    quant: QuantOpt = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Web requests generating at once; more wait in a queue.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Default most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="Default temperature; 0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Default nucleus sampling mass.")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="Default repetition penalty.")] = 1.0,
) -> None:
    """Serve the Gradio chat app at / and an OpenAI-compatible API at /v1 on one port."""
    import socket

    try:
        credentials = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise QtuneError(f"--auth {auth!r}: expected USER:PASS")
            credentials = (user, password)
        settings = _generation_settings(max_new_tokens, temperature, top_p, repetition_penalty)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
            except OSError as e:
                raise QtuneError(
                    f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host"
                ) from None
        _quiet_libraries()
        from qtune.generate import Engine
        from qtune.serve.api import create_app, run_server

        engine = Engine(str(run), quant)
        engine.prompt_budget(settings)
        server_app = create_app(engine, credentials, settings, concurrency)
    except (QtuneError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"web app: http://{host}:{port}/   OpenAI API: http://{host}:{port}/v1   (Ctrl-C stops)")
    run_server(server_app, engine, host, port)


@app.command()
def export(
    run: RunOpt,
    merged: Annotated[Path | None, typer.Option(help="Write base + adapter merged (16-bit safetensors) here.")] = None,
    gguf: Annotated[Path | None, typer.Option(help="Write base + adapter merged as one fp16 GGUF file here.")] = None,
    dtype: Annotated[str, typer.Option(help=f"Merged safetensors weights: {' or '.join(SIXTEEN_BIT)}.")] = "fp16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    check: Annotated[
        bool, typer.Option(help="Re-score validation rows with the trained model and each export; fail on drift.")
    ] = True,
    max_drift: Annotated[
        float, typer.Option(help="Largest accepted loss drift of an export, nats per token.")
    ] = DEFAULT_MAX_DRIFT,
    check_rows: Annotated[int, typer.Option(help="Validation rows the check scores.", min=1)] = DEFAULT_CHECK_ROWS,
) -> None:
    """Export a trained run: the adapter merged into a 16-bit copy of the base (safetensors and/or GGUF), then
    checked: the validation loss of each export against the adapter's (see qtune.serve.export_check)."""
    try:
        if merged is None and gguf is None:
            raise QtuneError("nothing to export: pass --merged OUT and/or --gguf OUT.gguf")
        if not max_drift >= 0:
            raise QtuneError(f"--max-drift {max_drift}: expected a number >= 0")
        _writes_to(merged, gguf)
        _quiet_libraries()
        from qtune.serve.export import export_gguf, export_merged
        from qtune.serve.export_check import check_export

        outs = []
        if merged is not None:
            outs.append(export_merged(run, merged, dtype, overwrite))
        if gguf is not None:
            outs.append(export_gguf(run, gguf, overwrite))
        for out in outs:
            typer.echo(f"saved: {out}")
        result = check_export(run, merged, gguf, check_rows, max_drift) if check else None
    except QtuneError as e:
        _fail(str(e))
    if check and result is None:
        typer.echo(f"warning: {run} holds no prepared validation split; the export was not checked")
    elif result is not None:
        typer.echo(result.table())
        if not result.ok:
            worst = max(result.drift, key=lambda name: abs(result.drift[name]))
            _fail(
                f"export drift {result.drift[worst]:+.5f} nats ({worst}) exceeds --max-drift {max_drift}: the "
                "export does not compute what the trained adapter does; the files are kept for inspection"
            )


_WRITE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}
_OUTPUTS: list[Path] = []
"""Where the running command writes (see :func:`_writes_to`); main() names it when a write fails."""


def _writes_to(*paths) -> None:
    """Record the files or folders the running command writes, so that a failed write that names no file (a full
    disk fails in ``write()``, not ``open()``) or that is not an OSError (torch, safetensors) names one."""
    _OUTPUTS.extend(Path(p) for p in paths if p not in (None, ""))


def _unwritable(path: Path) -> str | None:
    """Why nothing can be written at ``path`` (read-only file system, or under 1 MiB free), else None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if st.f_bavail * st.f_frsize < 2**20:
        return os.strerror(errno.ENOSPC)
    return None


def _os_failure(e: BaseException) -> str | None:
    """One line for an exception that is an operating-system failure (see :func:`main`), else None."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):  # an OSError a library raised "from"
        cause = cause.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        # write() on a full disk names no file: name the output that is full (not stdout, say)
        path = cause.filename or next((out for out in _OUTPUTS if _unwritable(out)), None)
        writing = cause.errno in _WRITE_ERRNOS
        what = f"cannot write ({cause.strerror})" if writing else cause.strerror
        return f"{path}: {what}" if path else what
    for out in _OUTPUTS:
        reason = _unwritable(out)
        if reason:
            return f"{out}: cannot write ({reason})"
    if isinstance(cause, OSError):  # no errno: a library's own message (its first line)
        return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return None


def main() -> None:
    """Console entry point. Every way a command can fail ends in one ``error:`` line on stderr:

    - a command-line usage error (unknown option, value out of range): the message and the command's --help,
      status 2;
    - a problem the user can fix (:class:`QtuneError`, printed by the command itself): status 2;
    - an operating-system error (OSError: read-only file system, disk full, permission denied, ...), or any
      failure while an output of the command lies on a read-only or full file system:
      ``error: PATH: cannot write (reason)``, status 2;
    - Ctrl-C: ``interrupted``, status 130;
    - anything else is a bug in qtune: ``error: internal error: TYPE: MESSAGE (...rerun with QTUNE_DEBUG=1...)``,
      status 1. With the environment variable ``QTUNE_DEBUG=1`` the traceback is shown instead (for a bug and
      for an OSError alike).
    """
    from typer import _click  # the click copy typer parses with; its exceptions are what reach here

    _OUTPUTS.clear()
    debug = os.environ.get("QTUNE_DEBUG", "") not in ("", "0")
    try:
        rv = app(prog_name="qtune", standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except _click.exceptions.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `qtune` or `qtune data` alone: show the help
            typer.echo(e.ctx.get_help() if e.ctx else e.format_message())
            sys.exit(0)
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        sys.exit(2)
    except _click.exceptions.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            raise
        message = _os_failure(e)
        if message is not None:
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        typer.echo(
            f"error: internal error: {type(e).__name__}: {first} (a bug in qtune; rerun with QTUNE_DEBUG=1 "
            "for the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
