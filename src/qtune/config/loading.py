"""Reading a run config: YAML files (a repeated key is an error), ``--set key=value`` overrides, validation
errors as one line per problem, and writing the resolved config back."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qtune.config.schema import RunConfig
from qtune.errors import QtuneError


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise QtuneError(f"--set {item!r}: expected key=value, e.g. train.max_steps=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise QtuneError(
            f"--set {item!r}: the value is not valid YAML (quote strings with brackets or colons)"
        ) from None
    return key.strip().split("."), value


RESUME_SETTABLE = ("train.learning_rate", "train.max_grad_norm")
"""Fields ``qtune train --resume RUN --set`` may change: they steer the remaining optimizer steps but change neither
the model, the data, the batch nor the length of the schedule."""


def check_resume_overrides(overrides: list[str]) -> None:
    """Raises QtuneError unless every ``key=value`` in ``overrides`` sets a field of :data:`RESUME_SETTABLE`."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_SETTABLE:
            raise QtuneError(
                f"--resume: continues the run with its saved config; --set {key} cannot change on resume "
                f"(allowed: {', '.join(RESUME_SETTABLE)}; anything else: a new run)"
            )


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.field=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise QtuneError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str, from_set: Iterable[str] = ()) -> str:
    """One line per problem: ``source: section.field: message (got value)``; a field given by ``--set`` (its
    dotted key in ``from_set``) over a config file is named ``--set section.field``, not blamed on the file."""
    lines = []
    given = set(from_set)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        # a model-level check names its own values; its input would be the whole config
        got = "" if e["type"] in ("missing",) or not e["loc"] else f" (got {e.get('input')!r})"
        if e["type"] == "extra_forbidden":
            msg, got = "unknown key", ""
        where = f"--set {loc}" if loc in given and source != "config" else f"{source}: {loc}"
        lines.append(f"{where}: {msg}{got}" if e["loc"] else f"{source}: {msg}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last one,
    which would silently drop a section or a named sweep run)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document in ``path`` (None for an empty file); ``what`` names the file in messages.

    Raises:
        QtuneError: missing file, a directory, unreadable or non-UTF-8 file, YAML syntax error or a duplicate key
            (with the line where the parser stopped).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QtuneError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise QtuneError(f"{path}: is a directory, not a {what}") from None
    except UnicodeDecodeError as e:
        raise QtuneError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise QtuneError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise QtuneError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, saved_run: bool = False
) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate.

    ``saved_run=True`` reads a finished run's ``config.yaml`` for serving, evaluating or exporting: its data file
    need not exist any more (the run keeps its prepared splits).

    Raises:
        QtuneError: unreadable file, YAML syntax error, unknown key or invalid value (all problems listed).
    """
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise QtuneError(f"{path}: expected a mapping of sections (model, quant, lora, data, train)")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data, context={"saved_run": saved_run})
    except ValidationError as e:
        given = [o.split("=", 1)[0].strip() for o in overrides or []]
        raise QtuneError(format_validation_error(e, source, given)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
