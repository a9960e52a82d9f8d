"""What every ``qtune`` command shares: the typer app, the options several commands take, and the helpers that
print a problem as one line, keep library output quiet and gate a model's remote code."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from qtune.config import QUANT_FORMATS
from qtune.errors import QtuneError

_default_showwarning = warnings.showwarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Quantize a LLaMA-family model, fine-tune LoRA adapters on it, evaluate and generate.",
)

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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quant",
        help=f"Base weights for serving: {', '.join(QUANT_FORMATS)} (none: fp32); default: the run's own.",
    ),
]


def fail(message: str) -> NoReturn:
    """Print ``message`` as ``error: ...`` lines on stderr and exit with status 2."""
    for line in message.splitlines():
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def remote_code(cfg, allowed: bool) -> None:
    """Remote model code runs only with --trust-remote-code, whatever the config file says.

    Raises:
        QtuneError: the config asks for remote code and the flag was not given.
    """
    if cfg.model.trust_remote_code and not allowed:
        raise QtuneError("model.trust_remote_code: true also needs the --trust-remote-code flag on the command line")
    cfg.model.trust_remote_code = allowed


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from qtune.errors import QtuneWarning

    if issubclass(category, QtuneWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def quiet_libraries() -> None:
    """Keep the terminal to qtune's own output: library progress bars and advisory warnings off."""
    import logging

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
