"""Counted cleaning of instruction rows; every dropped row is counted under one reason (the data card).

Steps, in order: type check (each field must be text; a null ``input`` means no input), Unicode NFC and strip,
empty instruction or output, duplicates (key: instruction, input and output with whitespace collapsed and
case folded), and a character pre-filter that drops rows certainly over the token budget without tokenizing them.
The exact token budget is applied after tokenization (:mod:`qtune.data.tokenize`), counted here too.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtune.data.load import FIELDS
from qtune.jsonio import dumps

REASONS = {
    "not_text": "a field is not text (number, list or object)",
    "empty_instruction": "instruction empty, whitespace only, null or missing",
    "empty_output": "output empty, whitespace only, null or missing",
    "duplicate": "duplicate of an earlier row (case and whitespace ignored)",
    "over_token_budget": "prompt + output + EOS longer than max_length tokens",
}

_WS = re.compile(r"\s+")


@dataclass
class DataCard:
    """What cleaning kept and dropped, per reason; written as ``data_card.json`` and printed as a table."""

    source: str
    rows_in: int
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    examples: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in REASONS})
    splits: dict[str, int] = field(default_factory=dict)
    template: str = "alpaca"
    max_length: int = 0
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def drop(self, reason: str, row: int) -> None:
        """Count one dropped row; keep up to five source indices per reason as examples."""
        self.dropped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

    def to_json(self) -> dict:
        return {**asdict(self), "rows_kept": self.rows_kept}

    def save(self, path: Path) -> None:
        path.write_text(dumps(self.to_json(), indent=2), encoding="utf-8")

    def table(self) -> str:
        """Plain-text table: rows in, each drop reason, rows kept, split sizes."""
        lines = [f"data card: {self.source}", f"  {'rows in':<32}{self.rows_in:>8}"]
        lines += [f"  {'dropped: ' + reason:<32}{n:>8}" for reason, n in self.dropped.items()]
        lines.append(f"  {'rows kept':<32}{self.rows_kept:>8}")
        lines += [f"  {'split ' + name:<32}{n:>8}" for name, n in self.splits.items()]
        return "\n".join(lines)


def normalize_text(value: str) -> str:
    """Unicode NFC, then strip surrounding whitespace."""
    return unicodedata.normalize("NFC", value).strip()


def dedup_key(row: dict) -> tuple[str, ...]:
    """Duplicate key: each field with runs of whitespace collapsed to one space and case folded."""
    return tuple(_WS.sub(" ", row[f]).casefold() for f in FIELDS)


def clean_rows(rows: list[dict], card: DataCard, max_chars: int | None = None) -> list[dict]:
    """Drop bad rows, counting each in ``card``; return the kept rows with normalized text fields.

    Args:
        rows: dicts from :func:`qtune.data.load.load_rows` (``row`` plus the three fields, raw values).
        card: the data card to count into (``card.rows_in`` should equal ``len(rows)``).
        max_chars: rows whose three fields together exceed this many characters are counted as
            ``over_token_budget`` without tokenizing (pass max_length x the longest token in characters).

    Returns:
        Kept rows, in source order, with ``instruction``, ``input`` (``""`` when absent) and ``output`` as str.
    """
    kept, seen = [], set()
    for row in rows:
        values = {}
        for f in FIELDS:
            v = row.get(f)
            if v is None:
                v = ""
            if not isinstance(v, str):
                break
            values[f] = normalize_text(v)
        else:
            clean = {"row": row["row"], **values}
            if not clean["instruction"]:
                card.drop("empty_instruction", row["row"])
            elif not clean["output"]:
                card.drop("empty_output", row["row"])
            elif (key := dedup_key(clean)) in seen:
                card.drop("duplicate", row["row"])
            elif max_chars is not None and sum(len(clean[f]) for f in FIELDS) > max_chars:
                seen.add(key)
                card.drop("over_token_budget", row["row"])
            else:
                seen.add(key)
                kept.append(clean)
            continue
        card.drop("not_text", row["row"])
    return kept
