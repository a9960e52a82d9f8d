"""``qtune train``: fine-tune LoRA adapters, or resume an interrupted run."""

from __future__ import annotations

import logging
import os
import sys
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
    if "process_index" not in summary:  # the main process reports; the other ranks of a distributed run do not
        typer.echo(dumps(summary, indent=2))
        typer.echo(f"run directory: {summary['run_dir']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _end_distributed_worker()


def _end_distributed_worker() -> None:
    """End a torchrun worker after a successful run with status 0, skipping the interpreter's finalization.

    By then every rank has passed the final barrier, the process group is destroyed and every output file is
    closed. What finalization would still do is free the gloo process group the DDP model keeps a reference to;
    a rank was seen aborting after its training had finished ("terminate called without an active exception",
    SIGABRT; tests/test_distributed.py in two of the CI runs of the full suite, never in 18 runs alone), and
    torchrun then failed the whole launch.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
