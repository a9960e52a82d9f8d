"""The data stage end to end: load -> clean -> decontaminate (if asked) -> tokenize within the budget -> split ->
save Arrow + data card."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtune.config import DataConfig
from qtune.data.clean import DataCard, clean_rows
from qtune.data.decontaminate import decontaminate
from qtune.data.load import load_rows
from qtune.data.split import split_indices
from qtune.data.templates import format_prompt
from qtune.data.tokenize import encode_example, longest_token_chars
from qtune.errors import QtuneError

if TYPE_CHECKING:
    from datasets import DatasetDict

SPLITS_DIR = "splits"
CARD_FILE = "data_card.json"


def prepare_dataset(cfg: DataConfig, tokenizer, out_dir: str | Path) -> tuple[DatasetDict, DataCard]:
    """Build tokenized train/val/test splits from ``cfg.path`` and save them under ``out_dir``.

    Returns:
        (``datasets.DatasetDict`` of train/val/test, :class:`DataCard`).

    Writes ``out_dir/splits/`` (``DatasetDict.save_to_disk``; columns input_ids, attention_mask, labels, row)
    and ``out_dir/data_card.json``.

    Raises:
        QtuneError: the source cannot be read (see :func:`qtune.data.load.load_rows`), a benchmark of
            ``cfg.decontaminate`` cannot be read, or no row survives cleaning.
    """
    from datasets import Dataset, DatasetDict  # imported here: the training path runs without it (GPU bench)

    out_dir = Path(out_dir)
    if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise QtuneError("data.template: 'chat' needs a tokenizer with a chat_template; this one has none (use alpaca)")
    if out_dir.exists() and not out_dir.is_dir():
        raise QtuneError(f"{out_dir}: exists and is not a directory; choose another output directory")
    rows, unit = load_rows(cfg.path, cfg.columns, cfg.max_rows)
    card = DataCard(source=cfg.path, rows_in=len(rows), template=cfg.template, max_length=cfg.max_length)
    kept = clean_rows(rows, card, max_chars=cfg.max_length * longest_token_chars(tokenizer))
    if cfg.decontaminate:
        kept = decontaminate(kept, card, cfg.decontaminate)

    samples = []
    for row in kept:
        prompt = format_prompt(row["instruction"], row["input"], cfg.template, tokenizer)
        enc = encode_example(prompt, row["output"], tokenizer, cfg.max_length)
        if enc is None:
            card.drop("over_token_budget", row["row"])
        else:
            samples.append({**enc, "row": row["row"]})
    if not samples:
        raise QtuneError(
            f"{cfg.path}: no usable rows left after cleaning ({card.rows_in} read; dropped {card.dropped})"
        )

    parts = split_indices(len(samples), cfg.split, cfg.seed)
    if not parts["train"]:
        raise QtuneError(
            f"{cfg.path}: {len(samples)} usable rows leave no training rows after the validation and "
            f"test splits (data.split={list(cfg.split)}); use more rows or smaller val/test fractions"
        )
    splits = DatasetDict({name: Dataset.from_list([samples[i] for i in idx]) for name, idx in parts.items() if idx})
    card.splits = {name: len(ds) for name, ds in splits.items()}
    card.tokens = {name: int(sum(len(x) for x in ds["input_ids"])) for name, ds in splits.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    splits.save_to_disk(str(out_dir / SPLITS_DIR))
    card.save(out_dir / CARD_FILE)
    return splits, card


def load_splits(data_dir: str | Path) -> DatasetDict:
    """Read splits saved by :func:`prepare_dataset` as a ``datasets.DatasetDict``.

    Raises:
        QtuneError: ``data_dir`` holds no prepared splits.
    """
    from datasets import load_from_disk

    path = Path(data_dir) / SPLITS_DIR
    if not path.is_dir():
        raise QtuneError(f"{data_dir}: no prepared data (expected {path}); run 'qtune data prepare' or 'qtune train'")
    return load_from_disk(str(path))
