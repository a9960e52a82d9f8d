"""The flag forms of ``qtune eval`` from before its subcommands, kept for one release as deprecated aliases.

``qtune eval --run RUN [--splits S]`` is ``qtune eval loss``; ``qtune eval --run RUN --humaneval [PATH]`` is
``qtune eval humaneval --run RUN [--problems PATH]``; ``qtune eval --humaneval-samples FILE`` is
``qtune eval humaneval --samples-file FILE``. The old form prints one deprecation line on stderr, then does
what the new form does. The old command took every option in every mode and ignored those of the other modes;
they are still ignored (dropped), so an old command line keeps working unchanged. Delete this module, and
``cls=`` in :mod:`qtune.cli.eval`, in the release after.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from qtune.cli.common import fail

_FLAGS = {"--json", "--base", "--trust-remote-code"}
_VALUED = {
    "--run",
    "--splits",
    "--humaneval-samples",
    "--problems",
    "--limit",
    "--samples",
    "--k",
    "--temperature",
    "--top-p",
    "--max-new-tokens",
    "--batch-size",
    "--timeout",
    "--memory-mb",
    "--workers",
    "--results",
    "--out",
}
"""The old command's options (besides ``--humaneval``, whose value was optional): flags, and those taking a
value."""

_SANDBOX = {"--k", "--timeout", "--memory-mb", "--workers", "--json"}
_GENERATING = {"--limit", "--samples", "--base", "--temperature", "--top-p", "--max-new-tokens", "--batch-size"}
_KEPT = {
    "loss": {"--run", "--splits", "--json", "--trust-remote-code"},
    "generate": _SANDBOX | _GENERATING | {"--run", "--trust-remote-code"},
    "score": _SANDBOX | {"--problems", "--results", "--out"},
}
"""The old options each mode used; the others were ignored in that mode, and are dropped."""

WARNINGS = {
    "loss": "`qtune eval --run RUN` is deprecated; use `qtune eval loss --run RUN`",
    "generate": "`qtune eval --humaneval [PATH]` is deprecated; use `qtune eval humaneval [--problems PATH]`",
    "score": "`qtune eval --humaneval-samples FILE` is deprecated; use `qtune eval humaneval --samples-file FILE`",
}
"""The deprecation line of each old form (after ``warning: ``)."""


def _options(args: list[str]) -> list[tuple[str | None, list[str]]]:
    """``args`` as (option name or None, its tokens) items: ``--name value``, ``--name=value``, a flag, a bare
    ``--humaneval`` (its path is optional), or a token that is none of these (kept as it is, for the new
    command to accept or reject)."""
    items: list[tuple[str | None, list[str]]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        name = tok.split("=", 1)[0]
        takes_value = "=" not in tok and (
            name in _VALUED or (name == "--humaneval" and i + 1 < len(args) and not args[i + 1].startswith("-"))
        )
        if tok == "--":
            items.append((None, args[i:]))
            break
        if name in _FLAGS | _VALUED | {"--humaneval"}:
            items.append((name, args[i : i + 2] if takes_value else [tok]))
            i += 2 if takes_value else 1
        else:
            items.append((None, [tok]))
            i += 1
    return items


def _value(tokens: list[str]) -> str:
    """The value of an option's tokens (``--name value`` or ``--name=value``; "" for a bare option)."""
    return tokens[0].split("=", 1)[1] if "=" in tokens[0] else (tokens[1] if len(tokens) > 1 else "")


def translate(args: list[str]) -> tuple[str, list[str]]:
    """(mode, the new command line) for the old ``qtune eval`` arguments ``args``: ``loss``, ``generate``
    (``--humaneval``) or ``score`` (``--humaneval-samples``); the new line starts with its subcommand."""
    items = _options(args)
    names = {name for name, _ in items}
    if "--humaneval" in names and "--humaneval-samples" in names:
        fail("--humaneval and --humaneval-samples: pass one of them")
    mode = "score" if "--humaneval-samples" in names else "generate" if "--humaneval" in names else "loss"
    new = ["loss" if mode == "loss" else "humaneval"]
    for name, tokens in items:
        if name == "--humaneval":
            new += ["--problems", _value(tokens)] if _value(tokens) else []
        elif name == "--humaneval-samples":
            new += ["--samples-file", _value(tokens)] if len(tokens) > 1 or "=" in tokens[0] else ["--samples-file"]
        elif name is None or name in _KEPT[mode]:
            new += tokens
    return mode, new


class LegacyEvalGroup(TyperGroup):
    """``qtune eval``: its subcommands, and the old flag forms (an option first) translated to them with one
    deprecation line on stderr (:func:`translate`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ctx.help_option_names:
            mode, args = translate(args)
            typer.echo(f"warning: {WARNINGS[mode]}", err=True)
        return super().parse_args(ctx, args)
