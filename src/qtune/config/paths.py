"""Where data and models are found: the shared data directory, the default data files, and whether a value names
a local path or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


def shared_data_dir() -> Path:
    """Directory holding the shared datasets: ``$QTUNE_DATA_DIR``, else ``shared/data`` beside the checkout
    (``../shared/data`` seen from the repository root), else the same seen from the working directory."""
    env = os.environ.get("QTUNE_DATA_DIR")
    if env:
        return Path(env)
    beside_checkout = Path(__file__).resolve().parents[4] / "shared" / "data"
    beside_cwd = Path.cwd().resolve().parent / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() or not beside_cwd.is_dir() else beside_cwd


def default_data_path() -> str:
    """CodeAlpaca 2k rows from the shared data directory (see :func:`shared_data_dir`)."""
    return str(shared_data_dir() / "codealpaca" / "code_alpaca_2k.json")


def default_humaneval_path() -> Path:
    """HumanEval's problems in the shared data directory: ``humaneval/HumanEval.jsonl.gz`` (see
    :func:`shared_data_dir`); read by ``qtune eval --humaneval`` and by ``data.decontaminate``."""
    return shared_data_dir() / "humaneval" / "HumanEval.jsonl.gz"


def is_local_path(value: str) -> bool:
    """True when ``value`` names a local file or folder rather than a hub id.

    A value is local if it exists, ends with a data/model file suffix (or another file suffix such as ``.csv``:
    hub ids have none), or starts with ``.``, ``/`` or ``~``.
    """
    suffix = Path(value).suffix.lower()
    if value.endswith(DATA_FILE_SUFFIXES + (".gguf",)) or value.startswith((".", "/", "~")):
        return True
    if suffix in (".csv", ".tsv", ".txt", ".gz", ".zip", ".bin", ".pt", ".safetensors", ".arrow", ".yaml", ".yml"):
        return True
    return Path(value).exists()
