"""``qtune sweep`` and ``qtune report``: a grid of training runs, and the figures and report of one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtune.cli.common import app, fail, quiet_libraries
from qtune.cli.errors import writes_to
from qtune.errors import QtuneError
from qtune.rundir import SweepDir


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
        quiet_libraries()
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
        writes_to(load_sweep(config)[0].output_dir)
        out = run_sweep(config, final=final, echo=typer.echo)
    except QtuneError as e:
        fail(str(e))
    sweep_dir = SweepDir(Path(out["sweep_dir"]))
    typer.echo(f"table: {sweep_dir.table_md}, {sweep_dir.table_csv}")


@app.command()
def report(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep directory written by 'qtune sweep'.")],
) -> None:
    """Figures (PNG) and report.md for a sweep: memory per configuration (measured and estimated), full fine-tuning
    vs the best configuration, memory over time, training loss, learning rate, validation loss vs memory."""
    try:
        writes_to(sweep_dir)
        quiet_libraries()
        from qtune.study.report import write_report

        path = write_report(sweep_dir)
    except QtuneError as e:
        fail(str(e))
    typer.echo(f"report: {path}")
