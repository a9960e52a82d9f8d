"""Layout of a run directory, written by training and read by evaluation, generation and serving.

A run directory is qtune's own: :func:`qtune.train.trainer.make_run_dir` marks it (``.qtune-run``) when it
creates it, and ``--overwrite`` replaces only such a directory, holding nothing but names qtune writes
(:meth:`RunDir.check_replaceable`). One process writes a run at a time (:class:`RunLock`). A run is finished
once ``train_summary.json`` exists: the final save writes it last (:func:`qtune.train.checkpoints.save_final`).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qtune.errors import QtuneError

TMP_PREFIX = ".tmp-"
"""Prefix of the temporary files and folders qtune writes before renaming them into place."""
ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter config file (``peft.utils.CONFIG_NAME``), in the adapter folder of a run and of a checkpoint."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""PEFT's adapter weights file (``peft.utils.SAFETENSORS_WEIGHTS_NAME``)."""


WRITTEN_INSIDE = {
    "adapter": tuple(
        f"adapter/{name}"
        for name in (
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "chat_template.jinja",
            "vocab.json",
            "merges.txt",
            "vocab.txt",
            "tokenizer.model",
            "spiece.model",
        )
    ),
    "data": ("data/data_card.json", "data/splits/*.json", "data/splits/*/*.arrow", "data/splits/*/*.json"),
    "checkpoints": ("checkpoints/*",),
    "humaneval": ("humaneval/*.json", "humaneval/*.jsonl"),
    "tensorboard": ("tensorboard/events.out.tfevents.*",),
}
"""What qtune writes inside the folders of a run (fnmatch patterns of paths relative to the run, ``*`` spanning
``/``): PEFT's adapter files and the tokenizer's, the data card and ``datasets``' Arrow splits, Trainer's
checkpoints, HumanEval's samples/results/summaries, TensorBoard's event files. ``--overwrite`` refuses a run whose
folders hold anything else (a user's notes put inside ``adapter/`` are kept)."""


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def marker(self) -> Path:
        """JSON written when qtune creates the run directory (format version, creation time): what
        ``--overwrite`` may replace."""
        return self.root / ".qtune-run"

    @property
    def lock(self) -> Path:
        """The writer lock's file (:class:`RunLock`): pid and start time of the process training the run."""
        return self.root / ".qtune-lock"

    @property
    def config(self) -> Path:
        """Resolved :class:`qtune.config.RunConfig` as YAML."""
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        """Prepared splits and data card (:mod:`qtune.data.prepare`)."""
        return self.root / "data"

    @property
    def adapter(self) -> Path:
        """The trained adapter in PEFT's layout (adapter_config.json, adapter_model.safetensors) + tokenizer."""
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        """Trainer checkpoints (``checkpoint-N``) that ``qtune train --resume`` continues from."""
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON record per logged step (:mod:`qtune.train.callbacks`)."""
        return self.root / "metrics.jsonl"

    @property
    def versions(self) -> Path:
        """Installed versions of the packages the run depended on, plus Python's
        (:func:`qtune.train.trainer.library_versions`)."""
        return self.root / "versions.json"

    @property
    def summary(self) -> Path:
        """Training summary: steps, wall time, final losses, peak memory. Written last: the run is finished."""
        return self.root / "train_summary.json"

    @property
    def eval(self) -> Path:
        """What ``qtune eval`` measured last: {"base": {split: {"loss", "perplexity", "tokens"}}, "adapter": ...}."""
        return self.root / "eval.json"

    @property
    def humaneval(self) -> Path:
        """HumanEval samples, per-sample results and summaries (:mod:`qtune.evaluate.humaneval`)."""
        return self.root / "humaneval"

    @property
    def val_halves(self) -> Path:
        """The adapter's validation loss on each half of the val split, as a sweep measures it
        (:func:`qtune.study.evals.write_val_halves`): a JSON list of two ``{"loss", "perplexity", "tokens"}``."""
        return self.root / "val_halves.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of the training run (:mod:`qtune.train.tensorboard`)."""
        return self.root / "tensorboard"

    @property
    def resumes(self) -> Path:
        """One JSON line per resume that changed a setting (:func:`qtune.train.checkpoints.record_resume`)."""
        return self.root / "resumes.jsonl"

    def humaneval_summary(self, who: str) -> Path:
        """The HumanEval summary (pass@k and settings) of ``who``: ``adapter`` (base + adapter) or ``base``."""
        return self.humaneval / f"{who}.json"

    def read_metrics(self) -> list[dict]:
        """The records of :attr:`metrics` (:func:`read_metrics`)."""
        return read_metrics(self.metrics)

    @classmethod
    def written_names(cls) -> frozenset[str]:
        """Names qtune writes at the top of a run directory (every path property above); temporary names
        start with ``TMP_PREFIX``."""
        probe = cls(Path("run"))
        return frozenset(getattr(probe, name).name for name, attr in vars(cls).items() if isinstance(attr, property))

    def is_finished(self) -> bool:
        """Whether training finished: ``train_summary.json``, written after the adapter and tokenizer, exists."""
        return self.summary.is_file()

    def require_config(self, consequence: str = "") -> RunDir:
        """Raises QtuneError unless this run directory holds its ``config.yaml``: the one message for a folder
        that is not a qtune run directory, with ``consequence`` (e.g. "nothing to resume") after a semicolon."""
        if not self.config.is_file():
            tail = f"; {consequence}" if consequence else ""
            raise QtuneError(f"{self.root}: not a qtune run directory (no {self.config.name}){tail}")
        return self

    def require_adapter(self) -> RunDir:
        """Raises QtuneError unless this run directory holds a config and the adapter of a finished run."""
        self.require_config()
        if not (self.adapter / ADAPTER_CONFIG).is_file():
            raise QtuneError(
                f"{self.root}: no trained adapter (expected {self.adapter}/{ADAPTER_CONFIG}); did training finish?"
            )
        if not self.is_finished():
            raise QtuneError(
                f"{self.root}: training did not finish (no {self.summary.name}); "
                f"'qtune train --resume {self.root}' completes it"
            )
        return self

    def write_marker(self) -> None:
        """Mark the directory as a qtune run (:attr:`marker`)."""
        self.marker.write_text(
            json.dumps({"version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n", encoding="utf-8"
        )

    def _foreign_inside(self) -> list[str]:
        """Paths (relative, ``/`` after a folder) inside qtune's folders of this run that qtune does not write:
        a symlink, or a name outside :data:`WRITTEN_INSIDE` (checkpoints and temporary folders are qtune's own)."""
        foreign = []
        for top in sorted(WRITTEN_INSIDE):
            base = self.root / top
            if not base.is_dir() or base.is_symlink():
                continue
            for path in sorted(base.rglob("*")):
                rel = path.relative_to(self.root).as_posix()
                if path.is_symlink() or not (
                    path.is_dir() or any(fnmatch.fnmatchcase(rel, pattern) for pattern in WRITTEN_INSIDE[top])
                ):
                    foreign.append(rel + ("/" if path.is_dir() else ""))
        return foreign

    def check_replaceable(self, inputs: Iterable[str | Path] = ()) -> None:
        """Raises QtuneError (one line) unless ``--overwrite`` may delete this existing directory's contents.

        Refused: the current or the home directory or a folder holding either (``/`` included); a folder holding
        one of ``inputs`` (files and folders the run reads: config file, data file, model); a folder without the
        :attr:`marker` (not created by qtune, or by a qtune before markers); one holding a symlink or a name qtune
        does not write (:meth:`written_names`).
        """
        root = self.root.resolve()
        refused = f"{self.root}: --overwrite refused:"
        way_out = "delete it yourself or choose another train.output_dir"
        refuse_user_places(self.root, refused, "train.output_dir")
        for item in inputs:
            path = Path(item).expanduser()
            if path.exists() and path.resolve().is_relative_to(root):
                raise QtuneError(f"{refused} it holds {path}, which this run reads; {way_out}")
        if not self.marker.is_file():
            raise QtuneError(
                f"{refused} no {self.marker.name} marker, so not a run directory qtune created (or "
                f"one from an older qtune); {way_out}"
            )
        known = self.written_names()
        foreign = sorted(
            e.name + ("/" if e.is_dir() else "")
            for e in self.root.iterdir()
            if e.is_symlink() or not (e.name in known or e.name.startswith(TMP_PREFIX))
        )
        foreign += self._foreign_inside()
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise QtuneError(f"{refused} it holds {', '.join(foreign[:5])}{more}, which qtune did not write; {way_out}")

    def clear(self) -> None:
        """Delete every entry except the lock file (held by this process while it replaces the run)."""
        for entry in self.root.iterdir():
            if entry == self.lock:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@dataclass(frozen=True)
class SweepDir:
    """Paths inside one sweep directory (``output_dir`` of a sweep file, :mod:`qtune.study`)."""

    root: Path

    @property
    def spec(self) -> Path:
        """The copy of the sweep file the sweep last ran (``reference_memory_gb`` is read back from it)."""
        return self.root / "sweep.yaml"

    @property
    def results(self) -> Path:
        """One ``<run>.json`` result record per run (:func:`qtune.study.results.collect_result`)."""
        return self.root / "results"

    def result(self, name: str) -> Path:
        """The result record of run ``name``; its existence makes a rerun skip the run."""
        return self.results / f"{name}.json"

    def result_files(self) -> list[Path]:
        """Every result record, sorted by file name."""
        return sorted(self.results.glob("*.json"))

    def run(self, name: str) -> RunDir:
        """The run directory run ``name`` trains into."""
        return RunDir(self.root / "runs" / name)

    def final_run(self, name: str) -> RunDir:
        """The run directory of the best configuration retrained by ``qtune sweep --final``."""
        return RunDir(self.root / "final" / name)

    def log(self, name: str) -> Path:
        """Output of run ``name``'s processes: training, then its evaluations."""
        return self.root / "logs" / f"{name}.log"

    def final_log(self, name: str) -> Path:
        """Output of the processes of :meth:`final_run` (retraining, test evaluation); the grid run's log stays."""
        return self.root / "logs" / "final" / f"{name}.log"

    @property
    def table_csv(self) -> Path:
        """The results table (:func:`qtune.study.tables.write_table`), one row per base evaluated alone and run."""
        return self.root / "results.csv"

    @property
    def table_md(self) -> Path:
        """The results table in Markdown, with the best run and the ranking check."""
        return self.root / "results.md"

    @property
    def final(self) -> Path:
        """Result record of the retrained best configuration, with its test-split evaluation."""
        return self.root / "final.json"

    @property
    def figures(self) -> Path:
        """The report's PNG figures (:mod:`qtune.study.figures`)."""
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        """The PNG of figure ``name`` (:data:`qtune.study.figures.FIGURES`)."""
        return self.figures / f"{name}.png"

    @property
    def report(self) -> Path:
        """``qtune report``'s Markdown (:func:`qtune.study.report.write_report`), embedding the figures."""
        return self.root / "report.md"

    def run_of(self, result: dict) -> RunDir:
        """The run directory of a result record: the ``train.output_dir`` it trained into while that still holds
        its metrics, else ``runs/<run>`` here (a sweep directory moved since)."""
        recorded = ((result.get("config") or {}).get("train") or {}).get("output_dir")
        if recorded and RunDir(Path(recorded)).metrics.is_file():
            return RunDir(Path(recorded))
        return self.run(result["run"])


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


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a process killed at any
    moment leaves either no ``path`` or the whole of it."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on its :attr:`RunDir.lock` file.

    Held from :meth:`acquire` until :meth:`release` or the end of the process; the OS drops it when the
    process dies in any way (kill -9 included), so a lock is never stale. The file holds the holder's pid and
    start time, for the message that refuses a second writer.
    """

    def __init__(self, root: str | Path):
        self.path = RunDir(Path(root)).lock
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (again: no-op), creating the lock file; the run directory must exist.

        Raises:
            QtuneError: another process holds it (the message names its pid and start time), or the file
                system cannot lock the file.
        """
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise QtuneError(f"{self.path}: cannot create the run directory's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise QtuneError(f"{self.path.parent}: in use by {holder}; wait for it to finish or stop it") from None
        except OSError as e:
            os.close(fd)
            raise QtuneError(f"{self.path}: cannot lock the run directory ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file); the file itself stays."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"qtune process {int(info['pid'])} (started {info['started']})"
        except (ValueError, KeyError, TypeError):  # the holder has not written its pid yet
            return "another qtune process"
