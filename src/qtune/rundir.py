"""Layout of a run directory, written by training and read by evaluation, generation and serving."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtune.errors import QtuneError


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

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
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON record per logged step (:mod:`qtune.train.callbacks`)."""
        return self.root / "metrics.jsonl"

    @property
    def versions(self) -> Path:
        return self.root / "versions.json"

    @property
    def summary(self) -> Path:
        """Training summary: steps, wall time, final losses, peak memory."""
        return self.root / "train_summary.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    def require_adapter(self) -> "RunDir":
        """Raises QtuneError unless this run directory holds a config and a saved adapter."""
        if not self.config.is_file():
            raise QtuneError(f"{self.root}: not a qtune run directory (no config.yaml)")
        if not (self.adapter / "adapter_config.json").is_file():
            raise QtuneError(f"{self.root}: no trained adapter (expected {self.adapter}/adapter_config.json); did training finish?")
        return self
