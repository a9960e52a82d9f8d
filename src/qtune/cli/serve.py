"""``qtune generate``, ``chat``, ``serve`` and ``export``: use a trained run (answer, chat, serve over HTTP,
merge and export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qtune.cli.common import QuantOpt, RunOpt, app, fail, quiet_libraries
from qtune.cli.errors import writes_to
from qtune.config import SIXTEEN_BIT
from qtune.errors import QtuneError
from qtune.serve.export_check import DEFAULT_CHECK_ROWS, DEFAULT_MAX_DRIFT


def _generation_settings(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float):
    """The decoding settings of the flags; raises QtuneError for a value out of range."""
    from qtune.generate import GenerationSettings

    try:
        return GenerationSettings(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty
        )
    except ValueError as e:
        raise QtuneError(str(e)) from None


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
        quiet_libraries()
        from qtune.generate import Engine, GenerationSettings

        settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        answer = Engine(str(run)).answer(prompt, input, settings)
    except (QtuneError, ValueError) as e:
        fail(str(e))
    typer.echo(answer)


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
        quiet_libraries()
        from qtune.generate import Engine
        from qtune.serve.chat import chat_in_terminal

        engine = Engine(str(run), quant)
        engine.prompt_budget(settings)
    except (QtuneError, ValueError) as e:
        fail(str(e))
    chat_in_terminal(engine, settings, system)


def _credentials(auth: str | None) -> tuple[str, str] | None:
    """``--auth USER:PASS`` as (user, password); raises QtuneError for another form."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise QtuneError(f"--auth {auth!r}: expected USER:PASS")
    return user, password


def _check_port(host: str, port: int) -> None:
    """Raises QtuneError unless ``host:port`` can be bound now (before the model loads, which takes a while)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as e:
            reason = f"cannot listen on {host}:{port} ({e.strerror})"
            raise QtuneError(f"{reason}; choose another --port or --host") from None


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
    try:
        credentials = _credentials(auth)
        settings = _generation_settings(max_new_tokens, temperature, top_p, repetition_penalty)
        _check_port(host, port)
        quiet_libraries()
        from qtune.generate import Engine
        from qtune.serve.api import create_app, run_server

        engine = Engine(str(run), quant)
        engine.prompt_budget(settings)
        server_app = create_app(engine, credentials, settings, concurrency)
    except (QtuneError, ValueError) as e:
        fail(str(e))
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
        writes_to(merged, gguf)
        quiet_libraries()
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
        fail(str(e))
    if check and result is None:
        typer.echo(f"warning: {run} holds no prepared validation split; the export was not checked")
    elif result is not None:
        typer.echo(result.table())
        if not result.ok:
            worst = max(result.drift, key=lambda name: abs(result.drift[name]))
            fail(
                f"export drift {result.drift[worst]:+.5f} nats ({worst}) exceeds --max-drift {max_drift}: the "
                "export does not compute what the trained adapter does; the files are kept for inspection"
            )
