"""Counted cleaning of instruction rows; every dropped row is counted under one reason (the data card).

Steps, in order: type check (each field must be text; a null ``input`` means no input), empty instruction or
output (whitespace only counts as empty), duplicates (see :func:`dedup_key`), and a character pre-filter that drops
rows certainly over the token budget without tokenizing them. Benchmark decontamination
(:mod:`qtune.data.decontaminate`) and the exact token budget (:mod:`qtune.data.tokenize`) follow in
:mod:`qtune.data.prepare`, counted here too.

Text is kept exactly as given: no strip, no Unicode normalisation. Leading indentation is part of code (an output
``"    x = 1"`` is a different answer from ``"x = 1"``), and so are trailing newlines, case and the code points a
string literal is made of. Whitespace is looked at only to decide whether a field is empty.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtune.data.load import FIELDS
from qtune.jsonio import dumps

REASONS = {
    "not_text": "a field is not text (number, list or object) or not valid Unicode (a lone surrogate escape)",
    "empty_instruction": "instruction empty, whitespace only, null or missing",
    "empty_output": "output empty, whitespace only, null or missing",
    "duplicate": "duplicate of an earlier row (line endings, trailing spaces and blank edge lines ignored)",
    "contaminated": "shares a 13-gram with a benchmark problem (data.decontaminate)",
    "over_token_budget": "prompt + output + EOS longer than max_length tokens",
}


@dataclass
class DataCard:
    """What cleaning kept and dropped, per reason; written as ``data_card.json`` and printed as a table."""

    source: str
    rows_in: int
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in REASONS})
    splits: dict[str, int] = field(default_factory=dict)
    template: str = "alpaca"
    max_length: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    decontaminated: list[str] = field(default_factory=list)
    """Benchmarks the rows were checked against (``data.decontaminate``); empty: not checked."""
    contamination: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Per benchmark, per problem id (e.g. ``HumanEval/0``): the source rows dropped for sharing an n-gram with it."""

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
        for reason, n in self.dropped.items():
            shown = n if reason != "contaminated" or self.decontaminated else "-"  # "-": not checked
            lines.append(f"  {'dropped: ' + reason:<32}{shown:>8}")
        lines.append(f"  {'rows kept':<32}{self.rows_kept:>8}")
        lines += [f"  {'split ' + name:<32}{n:>8}" for name, n in self.splits.items()]
        return "\n".join(lines)


def is_blank(value: str) -> bool:
    """True when ``value`` is empty or whitespace only: the one place where surrounding whitespace is ignored."""
    return not value.strip()


def text_key(value: str) -> str:
    """One field's text as the duplicate key sees it: Unicode NFC, CRLF and CR as LF, trailing whitespace of each
    line removed, blank lines at the start and the end removed. Leading indentation (spaces and tabs as they are),
    blank lines inside the text and case are kept, so two snippets that differ in indentation or in case (both
    change what code means: ``X`` and ``x`` are different names) stay different. NFC only makes canonically
    equivalent spellings of the same characters equal (``e`` + combining acute and ``\u00e9``). The same key
    serves all three fields: instructions and inputs hold code too."""
    lines = unicodedata.normalize("NFC", value).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [line.rstrip() for line in lines]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def dedup_key(row: dict) -> tuple[str, ...]:
    """Duplicate key of a row: :func:`text_key` of instruction, input and output. Rows with equal keys differ only
    in line endings, trailing whitespace or blank edge lines, which change neither the code nor the prose."""
    return tuple(text_key(row[f]) for f in FIELDS)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode: JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer
    (nor UTF-8) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean_rows(rows: list[dict], card: DataCard, max_chars: int | None = None) -> list[dict]:
    """Drop bad rows, counting each in ``card``; return the kept rows with their text unchanged.

    Args:
        rows: dicts from :func:`qtune.data.load.load_rows` (``row`` plus the three fields, raw values).
        card: the data card to count into (``card.rows_in`` should equal ``len(rows)``).
        max_chars: rows whose three fields together exceed this many characters are counted as
            ``over_token_budget`` without tokenizing (pass max_length x the longest token in characters).

    Returns:
        Kept rows, in source order, with ``instruction``, ``input`` (``""`` when absent) and ``output`` as str,
        each exactly as in the source.
    """
    kept, seen = [], set()
    for row in rows:
        values = {}
        for f in FIELDS:
            v = row.get(f)
            if v is None:
                v = ""
            if not isinstance(v, str) or not _encodable(v):
                break
            values[f] = v
        else:
            clean = {"row": row["row"], **values}
            if is_blank(clean["instruction"]):
                card.drop("empty_instruction", row["row"])
            elif is_blank(clean["output"]):
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
