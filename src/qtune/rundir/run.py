"""The paths inside one run directory (:class:`RunDir`), what qtune writes there, and the checks before
``--overwrite`` replaces one."""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qtune.errors import QtuneError
from qtune.rundir.files import TMP_PREFIX, read_metrics, refuse_user_places

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
