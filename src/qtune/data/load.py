"""Read instruction rows from a .json array, .jsonl, .parquet file or a hub dataset id.

Rows come back as dicts with the raw values of ``instruction``, ``input`` and ``output`` (after column mapping)
plus ``row``, the 0-based index in the source (for .jsonl, the 1-based line number), so that every later message
can point at the source. Type checks and cleaning happen in :mod:`qtune.data.clean`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from qtune.config import is_local_path
from qtune.errors import QtuneError

FIELDS = ("instruction", "input", "output")
REQUIRED = ("instruction", "output")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise QtuneError(f"{path}: cannot read file ({getattr(e, 'strerror', None) or e})") from None
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted and removed
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise QtuneError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None


def _read_json(path: Path) -> list[tuple[int, object]]:
    text = _read_text(path)
    if not text.strip():
        raise QtuneError(f"{path}: file is empty; expected a JSON array of objects")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QtuneError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise QtuneError(f"{path}: JSON nested too deeply; expected an array of flat objects") from None
    except ValueError as e:  # an integer literal over Python's digit limit (sys.get_int_max_str_digits)
        raise QtuneError(f"{path}: invalid JSON: {str(e).split(';')[0]}") from None
    if isinstance(data, dict):
        raise QtuneError(
            f"{path}: top level is an object; expected a JSON array of rows (use .jsonl for one object per line)"
        )
    if not isinstance(data, list):
        raise QtuneError(f"{path}: top level is {type(data).__name__}; expected a JSON array of rows")
    if not data:
        raise QtuneError(f"{path}: file is empty (an empty JSON array); expected a JSON array of objects")
    return list(enumerate(data))


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(1-based line number, parsed value) for every non-blank line of a JSON Lines file (``.gz`` too; a UTF-8
    byte-order mark is accepted); an empty file gives [].

    Raises:
        QtuneError: unreadable or non-UTF-8 file, or a line that is not JSON (file:line:column).
    """
    text = _read_text(path)
    items = []
    # split on \n only: str.splitlines() also breaks at U+2028/U+0085, which JSON strings may hold raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise QtuneError(f"{path}:{lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise QtuneError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
        except ValueError as e:  # an integer literal over Python's digit limit (sys.get_int_max_str_digits)
            raise QtuneError(f"{path}:{lineno}: invalid JSON: {str(e).split(';')[0]}") from None
    return items


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    items = read_jsonl(path)
    if not items:
        raise QtuneError(f"{path}: file is empty; expected one JSON object per line")
    return items


def _read_parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise QtuneError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return list(enumerate(table.to_pylist()))


def _read_hub(dataset_id: str, split: str = "train") -> list[tuple[int, object]]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, gated: all reach the user as one line
        raise QtuneError(
            f"{dataset_id}: could not load hub dataset ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return list(enumerate(ds))


def load_rows(
    source: str, columns: dict[str, str] | None = None, max_rows: int | None = None
) -> tuple[list[dict], str]:
    """Load rows and map column names onto ``instruction``, ``input``, ``output``.

    Args:
        source: path to a .json/.jsonl/.parquet file, or a hub dataset id.
        columns: qtune field -> source column, for files that name their columns differently.
        max_rows: keep only the first N rows.

    Returns:
        (rows, unit): rows as dicts with keys ``row``, ``instruction``, ``input``, ``output`` (a key whose
        column is absent in that row maps to None); ``unit`` is "line" for .jsonl and "row" otherwise.

    Raises:
        QtuneError: unreadable or malformed file (with line/row), a row that is not an object, or required
        columns absent from every row (the message lists expected and found columns).
    """
    columns = {f: f for f in FIELDS} | (columns or {})
    unit = "row"
    if is_local_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise QtuneError(f"{source}: data file not found")
        suffix = path.suffix.lower()
        if suffix == ".json":
            items = _read_json(path)
        elif suffix == ".jsonl":
            items, unit = _read_jsonl(path), "line"
        elif suffix == ".parquet":
            items = _read_parquet(path)
        else:
            raise QtuneError(f"{source}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet")
    else:
        items = _read_hub(source)
    if max_rows is not None:
        items = items[:max_rows]

    found: set[str] = set()
    objects: list[tuple[int, dict]] = []
    for idx, item in items:
        if not isinstance(item, dict):
            raise QtuneError(
                f"{source}: {unit} {idx}: expected an object with {', '.join(FIELDS)}, got {type(item).__name__}"
            )
        found.update(item)
        objects.append((idx, item))
    missing = [f for f in REQUIRED if columns[f] not in found]
    if missing:
        wanted = ", ".join(f"{f} (column {columns[f]!r})" for f in missing)
        raise QtuneError(
            f"{source}: no column for {wanted}; expected columns {sorted(set(columns.values()))}, "
            f"found {sorted(found)}; map them with --columns instruction=NAME,output=NAME"
        )
    rows = [{"row": idx, **{f: item.get(columns[f]) for f in FIELDS}} for idx, item in objects]
    return rows, unit
