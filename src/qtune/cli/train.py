"""``qtune train``: fine-tune LoRA adapters, or resume an interrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtune.cli.common import ConfigOpt, RemoteCodeOpt, SetOpt, app, fail, quiet_libraries, remote_code
from qtune.cli.errors import writes_to
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.rundir import RunDir


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
        remote_code(cfg, trust_remote_code)
        writes_to(cfg.train.output_dir)
        quiet_libraries()
        from qtune.train.trainer import train as run_training

        summary = run_training(
            cfg, overwrite=overwrite, resume=resume is not None, protect=(config,) if config is not None else ()
        )
    except QtuneError as e:
        fail(str(e))
    if "process_index" in summary:  # a non-main rank of a distributed run: the main process reports
        return
    typer.echo(dumps(summary, indent=2))
    typer.echo(f"run directory: {summary['run_dir']}")
