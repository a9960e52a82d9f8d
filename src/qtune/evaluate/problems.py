"""HumanEval's files: the problems (:func:`load_problems`), samples to score (:func:`load_samples`), the program
that scores a sample (:func:`build_program`, :func:`check_call`) and JSON Lines output (:func:`write_jsonl`)."""

from __future__ import annotations

from pathlib import Path

from qtune.config import default_humaneval_path
from qtune.data.load import read_jsonl
from qtune.errors import QtuneError
from qtune.jsonio import dumps


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every line of a JSON Lines file of objects."""
    if not path.is_file():
        raise QtuneError(f"{path}: file not found")
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise QtuneError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """The HumanEval problems by task_id, in file order, from a .jsonl or .jsonl.gz file.

    Raises:
        QtuneError: missing or unreadable file, a bad line, or a problem without task_id, prompt, test or
            entry_point.
    """
    p = Path(path) if path else default_humaneval_path()
    problems = {}
    for n, row in _read_jsonl(p):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
        if missing:
            raise QtuneError(f"{p}:{n}: not a HumanEval problem (no {', '.join(missing)})")
        if not row["entry_point"].isidentifier():
            raise QtuneError(f"{p}:{n}: entry_point {row['entry_point']!r} is not a Python name")
        problems[row["task_id"]] = row
    if not problems:
        raise QtuneError(f"{p}: no problems")
    return problems


def load_samples(path: str | Path, problems: dict[str, dict]) -> list[dict]:
    """Samples {task_id, completion} from a JSONL file; several samples per task are allowed.

    Raises:
        QtuneError: missing file, bad line, a sample without a string completion, or an unknown task_id.
    """
    p = Path(path)
    samples = []
    for n, row in _read_jsonl(p):
        bad = [k for k in ("task_id", "completion") if not isinstance(row.get(k), str)]
        if bad:
            raise QtuneError(
                f"{p}:{n}: expected string fields task_id and completion ({', '.join(bad)} "
                f"{'is' if len(bad) == 1 else 'are'} missing or not a string)"
            )
        if row["task_id"] not in problems:
            raise QtuneError(f"{p}:{n}: unknown task_id {row['task_id']!r}")
        samples.append({"task_id": row["task_id"], "completion": row["completion"]})
    if not samples:
        raise QtuneError(f"{p}: no samples")
    return samples


def build_program(problem: dict, completion: str) -> str:
    """prompt + completion + tests: the program that scores a sample, once :func:`check_call` returns after it.

    The check call is not part of the text: the sandbox makes it itself after the program ran (see
    :func:`score_samples`), so a program cannot end early and pass.
    """
    return problem["prompt"] + completion + "\n\n" + problem["test"] + "\n"


def check_call(problem: dict) -> str:
    """The expression that tests a sample after :func:`build_program`'s program ran: ``check(entry_point)``."""
    return f"check({problem['entry_point']})"


def write_jsonl(path: str | Path, rows: list[dict]) -> str | None:
    """Write ``rows`` as JSONL to ``path`` (its directory made if missing); None when written, else why not
    (``PATH: cannot write (REASON)``), so a caller can warn and keep what it computed."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
    except OSError as e:
        return f"{path}: cannot write ({e.strerror or e})"
    return None
