"""The evaluations a sweep adds to a finished run's record, each in its own process (its model's memory freed
with it) that writes its figures to the run directory, where they are read back (:class:`qtune.rundir.RunDir`):

- ``qtune eval loss --run RUN --splits val`` writes ``RUN/eval.json``: the base's validation loss (adapter disabled),
- :func:`write_val_halves` writes ``RUN/val_halves.json``: the adapter's loss on each half of the val split,
- ``qtune eval humaneval --run RUN [--base]`` writes ``RUN/humaneval/{adapter,base}.json``: HumanEval pass@1.

The file a child is to write is removed before it starts, so a figure read back is always that child's.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.rundir import RunDir
from qtune.study.process import last_error, qtune_command, run_logged
from qtune.study.results import base_key, read_json
from qtune.study.spec import SweepSpec

Echo = Callable[[str], Any]


def _child(cmd: list[str], expected: Path, log: Path, timeout_s: float | None, what: str) -> Any:
    """Run ``cmd`` (output appended to ``log``) and return the JSON it wrote to ``expected``.

    Raises:
        QtuneError: the child failed (its error line), timed out, or wrote no ``expected``.
    """
    try:
        expected.unlink(missing_ok=True)
    except OSError:  # the child, writing it, reports what is wrong with the place
        pass
    child = run_logged(cmd, log, timeout_s, append=True)
    if child.timed_out:
        raise QtuneError(f"{what}: timed out after {timeout_s} s")
    if child.rc != 0:
        raise QtuneError(last_error(child.output))
    result = read_json(expected)
    if result is None:
        raise QtuneError(f"{what}: wrote no {expected} (see {log})")
    return result


def qtune_eval(rd: RunDir, splits: str, log: Path, timeout_s: float | None = None) -> dict:
    """``qtune eval loss --run RD --splits SPLITS`` in a fresh process; returns the ``eval.json`` it writes:
    {"base": {split: {"loss", "perplexity", "tokens"}}, "adapter": {...}}.

    Raises:
        QtuneError: the evaluation failed or timed out (its last error line).
    """
    args = ["eval", "loss", "--run", str(rd.root), "--splits", splits]
    return _child(qtune_command(*args), rd.eval, log, timeout_s, f"qtune {' '.join(args)}")


def humaneval_pass1(rd: RunDir, spec: SweepSpec, log: Path, base: bool = False) -> float:
    """Greedy HumanEval pass@1 of base + adapter (of the base alone with ``base``) on the first
    ``spec.humaneval_limit`` problems, by ``qtune eval humaneval`` in a fresh process (its summary file).

    Raises:
        QtuneError: the evaluation failed or timed out (its last error line).
    """
    args = ["eval", "humaneval", "--run", str(rd.root), "--limit", str(spec.humaneval_limit)]
    args += ["--max-new-tokens", str(spec.humaneval_max_new_tokens)] + (["--base"] if base else [])
    summary = _child(
        qtune_command(*args),
        rd.humaneval_summary("base" if base else "adapter"),
        log,
        spec.timeout_s,
        f"qtune {' '.join(args)}",
    )
    return summary["pass@1"]


def val_halves(run_dir: str | Path) -> list[dict]:
    """The trained adapter's validation loss on each half of the run's val split: rows ``[0, ceil(n/2))`` and
    ``[ceil(n/2), n)`` in split order, each :func:`qtune.train.validation.split_loss` (the one token-weighted
    function of every other loss column). Two halves that rank the runs alike show the ranking is not noise.

    Returns:
        [first half, second half], each {"loss", "perplexity", "tokens"}.

    Raises:
        QtuneError: the run holds no trained adapter or no prepared validation split.
    """
    from qtune.data.prepare import load_splits
    from qtune.data.tokenize import padding_collator
    from qtune.model.adapters import load_trained
    from qtune.model.load import device
    from qtune.model.quantize import compute_autocast
    from qtune.train.validation import split_loss

    rd = RunDir(Path(run_dir)).require_adapter()
    splits = load_splits(rd.data)
    if "val" not in splits or len(splits["val"]) < 2:
        raise QtuneError(f"{run_dir}: no validation split of at least 2 rows to halve")
    val = splits["val"].remove_columns([c for c in splits["val"].column_names if c == "row"])
    model, tokenizer, cfg = load_trained(rd.root)
    collate = padding_collator(tokenizer)
    with compute_autocast(cfg.quant, device()):
        return split_loss(model, val, collate, halves=True)["halves"]


def write_val_halves(run_dir: str | Path) -> Path:
    """:func:`val_halves` written to the run's ``val_halves.json`` (:attr:`qtune.rundir.RunDir.val_halves`);
    returns its path.

    Raises:
        QtuneError: see :func:`val_halves`.
    """
    rd = RunDir(Path(run_dir))
    rd.val_halves.write_text(dumps(val_halves(run_dir), indent=2), encoding="utf-8")
    return rd.val_halves


def run_val_halves(rd: RunDir, log: Path, timeout_s: float | None = None) -> list[dict]:
    """:func:`write_val_halves` in a fresh process (the model's memory is freed with it); returns the halves.

    Raises:
        QtuneError: it failed or timed out (its last error line).
    """
    code = "import sys; from qtune.study.evals import write_val_halves; write_val_halves(sys.argv[1])"
    return _child(
        [sys.executable, "-c", code, str(rd.root)], rd.val_halves, log, timeout_s, f"{rd.root}: validation halves"
    )


def result_run_dir(res: dict) -> RunDir:
    """The run directory a result record's run trained into (its config's ``train.output_dir``)."""
    return RunDir(Path(str((res.get("config") or {}).get("train", {}).get("output_dir"))))


def add_evaluations(res: dict, spec: SweepSpec, earlier: list[dict], log: Path, echo: Echo = print) -> None:
    """Add to a finished run's record the validation loss of its base alone (``base_val_loss`` over
    ``base_val_tokens`` supervised tokens, from ``qtune eval`` or reused from an earlier run with the same base)
    and perplexity (``base_val_perplexity``); with ``spec.val_halves`` the run's validation loss on each half of
    the val split (``val_halves``: two :func:`qtune.train.validation.split_loss` records, from training's final
    evaluation when ``train_summary.json`` holds them, else from one more pass; ``val_loss_half1``,
    ``val_loss_half2``); with ``spec.humaneval_limit``, greedy HumanEval pass@1 of the run and of its base unless
    ``spec.humaneval_base`` is off (``humaneval_pass@1``, ``base_humaneval_pass@1``). A failed evaluation is
    recorded in ``eval_error``; the run stays finished. The children's output is appended to ``log``."""
    rd = result_run_dir(res)
    same = [r for r in earlier if r.get("status") == "ok" and base_key(r) == base_key(res) and r["run"] != res["run"]]
    try:
        _add_base_val_loss(res, rd, same, log, spec.timeout_s)
        if spec.val_halves:
            halves = (read_json(rd.summary) or {}).get("val_halves")  # training's final pass, when it made one
            if not halves or not all(h.get("tokens") for h in halves):  # none, or a half without tokens
                echo("    validation loss of each half of the val split ...")
                halves = run_val_halves(rd, log, spec.timeout_s)
            res["val_halves"] = halves
            res["val_loss_half1"], res["val_loss_half2"] = halves[0]["loss"], halves[1]["loss"]
        if spec.humaneval_limit:
            echo(f"    HumanEval, first {spec.humaneval_limit} problems ...")
            _add_humaneval(res, rd, spec, same, log)
    except (QtuneError, KeyError, ValueError, TypeError) as e:
        res["eval_error"] = str(e)
        echo(f"    evaluation failed: {e}")


def _add_base_val_loss(res: dict, rd: RunDir, same: list[dict], log: Path, timeout_s: float | None) -> None:
    # only a figure recorded with its token count is today's token-weighted one (see remeasure_val_loss)
    prev = next((r for r in same if r.get("base_val_tokens") is not None), None)
    if prev:
        res["base_val_loss"], res["base_val_tokens"] = prev["base_val_loss"], prev["base_val_tokens"]
        res["base_val_perplexity"] = prev.get("base_val_perplexity", math.exp(min(prev["base_val_loss"], 50.0)))
        return
    base = qtune_eval(rd, "val", log, timeout_s)["base"]["val"]
    res["base_val_loss"], res["base_val_tokens"] = base["loss"], base["tokens"]
    res["base_val_perplexity"] = base["perplexity"]


def _add_humaneval(res: dict, rd: RunDir, spec: SweepSpec, same: list[dict], log: Path) -> None:
    res["humaneval_limit"] = spec.humaneval_limit
    res["humaneval_pass@1"] = humaneval_pass1(rd, spec, log)
    prev = next(
        (
            r
            for r in same
            if r.get("base_humaneval_pass@1") is not None and r.get("humaneval_limit") == spec.humaneval_limit
        ),
        None,
    )
    if prev:
        res["base_humaneval_pass@1"] = prev["base_humaneval_pass@1"]
    elif spec.humaneval_base:
        res["base_humaneval_pass@1"] = humaneval_pass1(rd, spec, log, base=True)


def remeasure_val_loss(res: dict, log: Path, timeout_s: float | None = None, echo: Echo = print) -> None:
    """Replace a result's validation figures with ``qtune eval``'s for its saved adapter (in place).

    Results written before qtune had one validation loss hold no ``val_tokens``: their ``val_loss`` was a mean of
    per-batch means (it moved with the eval batch size) and their ``base_val_loss`` a batched figure. A sweep that
    ranks them with today's runs must rank one quantity, so they are measured again; when that fails (the run
    directory is gone) the old figures are dropped and the error kept in ``eval_error``.
    """
    try:
        ev = qtune_eval(result_run_dir(res), "val", log, timeout_s)
        adapter, base = ev["adapter"]["val"], ev["base"]["val"]
    except (QtuneError, KeyError, ValueError, TypeError) as e:
        res |= {
            "val_loss": None,
            "val_perplexity": None,
            "base_val_loss": None,
            "base_val_perplexity": None,
            "eval_error": str(e),
        }
        echo(f"    evaluation failed: {e}")
        return
    res |= {
        "val_loss": adapter["loss"],
        "val_perplexity": adapter["perplexity"],
        "val_tokens": adapter["tokens"],
        "base_val_loss": base["loss"],
        "base_val_tokens": base["tokens"],
        "base_val_perplexity": base["perplexity"],
    }
