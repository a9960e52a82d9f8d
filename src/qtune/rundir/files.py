"""File operations on a run's files: reading ``metrics.jsonl``, atomic writes and cache builds, and refusing to
delete the places a user works in."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from qtune.errors import QtuneError

TMP_PREFIX = ".tmp-"
"""Prefix of the temporary files and folders qtune writes before renaming them into place."""


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (one JSON object per line), in file order; [] without the file.

    A line that is not a JSON object is skipped: a run killed mid-write leaves a truncated last line.
    """
    out = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def refuse_user_places(path: Path, refused: str, option: str) -> None:
    """Raises QtuneError(``refused`` + what + "choose another ``option``") when deleting ``path`` would delete
    the current directory or the home directory: it is one of them or a folder above one (``/`` included)."""
    root = path.resolve()
    places = [("the current directory", Path.cwd())]
    try:
        places.append(("the home directory", Path.home()))
    except RuntimeError:  # no home directory known: nothing to protect
        pass
    for what, place in places:
        place = place.resolve()
        if place == root:
            raise QtuneError(f"{refused} it is {what}; choose another {option}")
        if place.is_relative_to(root):
            raise QtuneError(f"{refused} it holds {what} ({place}); choose another {option}")


def build_dir_once(target: Path, build: Callable[[Path], None], complete: str = "config.json") -> Path:
    """``target``, built by ``build(tmp)`` into a temporary directory beside it and renamed into place, unless it
    is already complete (holds the file ``complete``): a cache a killed build never leaves half-written, and
    that two processes building at once both end up reading (the second one's rename loses, its copy is removed).

    Raises:
        OSError: the directory cannot be created or renamed; whatever ``build`` raises (the temporary directory
            is removed either way).
    """
    if (target / complete).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=TMP_PREFIX))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / complete).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a process killed at any
    moment leaves either no ``path`` or the whole of it."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
