"""``qtune data``: dataset engineering (prepare the splits and the data card, count benchmark overlap)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qtune.cli.common import ConfigOpt, RemoteCodeOpt, SetOpt, app, fail, quiet_libraries, remote_code
from qtune.cli.errors import writes_to
from qtune.errors import QtuneError

data_app = typer.Typer(no_args_is_help=True, help="Dataset engineering.")
app.add_typer(data_app, name="data")

DataOpt = Annotated[str, typer.Option(help="A .json/.jsonl/.parquet file or a hub dataset id.")]
ColumnsOpt = Annotated[str | None, typer.Option(help="Column mapping, e.g. instruction=prompt,output=completion.")]


def _column_pairs(columns: str) -> dict[str, str]:
    """``--columns instruction=prompt,output=completion`` as a dict (the keys are checked by the config).

    Raises:
        QtuneError: an item is not a ``field=column`` pair.
    """
    pairs = [c.split("=", 1) for c in columns.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise QtuneError(f"--columns {columns!r}: expected field=column pairs separated by commas")
    return {k.strip(): v.strip() for k, v in pairs}


@data_app.command("prepare")
def data_prepare(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output directory for the Arrow splits and the data card.")],
    model: Annotated[str | None, typer.Option(help="Model whose tokenizer (and chat template) to use.")] = None,
    template: Annotated[str | None, typer.Option(help="alpaca (default) or chat.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Token budget per sample.")] = None,
    columns: ColumnsOpt = None,
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
        remote_code(cfg, trust_remote_code)
        writes_to(out)
        quiet_libraries()
        from qtune.data.prepare import prepare_dataset
        from qtune.model.load import check_max_length, load_tokenizer, resolve_model

        path = resolve_model(cfg.model, require_weights=False)  # the config and tokenizer are all it reads
        check_max_length(path, cfg.model, cfg.data.max_length)
        _, card = prepare_dataset(cfg.data, load_tokenizer(path, cfg.model), out)
    except QtuneError as e:
        fail(str(e))
    typer.echo(card.table())
    typer.echo(f"saved: {out}")


@data_app.command("overlap")
def data_overlap(
    data: DataOpt,
    benchmark: Annotated[str, typer.Option(help="Benchmark whose problems to look for: humaneval.")] = "humaneval",
    columns: ColumnsOpt = None,
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
        fail(str(e))
    typer.echo(overlap.summary())
