"""Starting a new run: the run directory made (or cleared) and marked, holding the run's lock; its config, the
library versions and the prepared data written; all of it removed again when the run fails before training."""

from __future__ import annotations

import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from qtune.config import RunConfig, save_config
from qtune.data.prepare import prepare_dataset
from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.rundir import RunDir, RunLock

PACKAGES = ("qtune", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gguf")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on, plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def make_run_dir(path: str | Path, overwrite: bool, lock: RunLock, inputs: tuple = ()) -> tuple[RunDir, bool]:
    """Create an empty, marked run directory (:meth:`RunDir.write_marker`) holding ``lock`` (a :class:`RunLock`
    on ``path``).

    An existing directory with entries is replaced only with ``overwrite`` and when
    :meth:`RunDir.check_replaceable` allows it (``inputs``: paths the run reads); its entries are deleted while
    the lock is held. Returns the run directory and whether qtune created the folder itself (False: it existed).

    Raises:
        QtuneError: another process writes the run (the lock is held); the path is a file; the directory is not
            empty and ``overwrite`` is False, or it may not be replaced.
    """
    rd = RunDir(Path(path))
    if rd.root.exists() and not rd.root.is_dir():
        raise QtuneError(f"{rd.root}: exists and is not a directory; choose another train.output_dir")
    if rd.lock.exists():
        lock.acquire()  # a live writer is named before anything else is said or done
    existed = rd.root.is_dir()
    if existed and any(e != rd.lock for e in rd.root.iterdir()):
        if not overwrite:
            raise QtuneError(
                f"{rd.root}: run directory exists and is not empty; pass --overwrite or choose another train.output_dir"
            )
        rd.check_replaceable(inputs)
        lock.acquire()
        rd.clear()
        existed = False  # a run qtune wrote: it goes as a whole if this one fails early
    else:
        rd.root.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    rd.write_marker()
    return rd, not existed


def discard_run(rd: RunDir, created: bool) -> None:
    """Remove what a run that failed before training wrote: the whole folder if qtune created it, else (a folder
    that was empty) its entries."""
    if created:
        shutil.rmtree(rd.root, ignore_errors=True)
    else:
        rd.clear()
        rd.lock.unlink(missing_ok=True)


def start_run(cfg: RunConfig, overwrite: bool, lock: RunLock, tokenizer, inputs: tuple) -> tuple[RunDir, Any]:
    """Make the run directory (:func:`make_run_dir`; ``inputs``: paths the run reads, never deleted), write its
    config and library versions, prepare the data (printing its card); a data error removes the directory again
    (:func:`discard_run`). Returns it and the prepared splits.

    Raises:
        QtuneError: as :func:`make_run_dir`, or the data cannot be prepared
            (:func:`qtune.data.prepare.prepare_dataset`).
    """
    rd, created = make_run_dir(cfg.train.output_dir, overwrite, lock, inputs)
    save_config(cfg, rd.config)
    rd.versions.write_text(dumps(library_versions(), indent=2), encoding="utf-8")
    try:
        splits, card = prepare_dataset(cfg.data, tokenizer, rd.data)
    except QtuneError:
        discard_run(rd, created)  # nothing trained: leave no run directory behind
        raise
    print(card.table())
    return rd, splits
