"""Running a sweep: one ``qtune train`` process per run (:func:`run_one`), its evaluations, one
``results/<run>.json`` per run, the table and the best configuration (:func:`run_sweep`); ``--final`` retrains
the best one and evaluates it once on the test split (:func:`run_final`).

Each run executes in its own process, so its peak memory is its own. A rerun skips runs whose result file exists
(``retry_failed`` reruns failures). A failed run (exception, out of memory, NaN loss) is recorded with its error
and the sweep goes on. Each finished run also gets the validation loss of its base alone (the quantization-only
setup: same weights, adapter disabled), computed once per distinct base; the table shows each base as its own row
(setup "quantization only" for an 8/4-bit base, "no fine-tuning" for a 16/32-bit one) beside the trained
runs ("LoRA only" on a 16/32-bit base, "quantization + LoRA").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qtune.errors import QtuneError
from qtune.jsonio import dumps
from qtune.rundir import SweepDir, write_atomic
from qtune.study.evals import Echo, add_evaluations, qtune_eval, remeasure_val_loss
from qtune.study.process import child_env, qtune_command, run_logged
from qtune.study.results import best_run, collect_result, load_results, read_json, read_results
from qtune.study.spec import Run, SweepSpec, check_cuda, expand, load_sweep, set_args
from qtune.study.tables import write_table


def run_one(
    run: Run,
    sweep_dir: Path,
    base: Path | None,
    timeout_s: float | None = None,
    extra: list[str] | None = None,
    run_root: str = "runs",
) -> dict:
    """Train one grid point in a fresh ``python -m qtune.cli train`` process; returns its result record.

    ``run_root``: ``runs`` (the grid) or ``final`` (the retrained best run). The child's stdout and stderr go to
    ``logs/<run>.log`` in the sweep directory (``logs/final/<run>.log`` for the final run).
    """
    sweep = SweepDir(Path(sweep_dir))
    if run_root == "runs":
        rd, log = sweep.run(run.name), sweep.log(run.name)
    elif run_root == "final":
        rd, log = sweep.final_run(run.name), sweep.final_log(run.name)
    else:
        raise ValueError(f"run_root {run_root!r}: expected runs or final")
    cmd = qtune_command("train", "--overwrite")
    if base is not None:
        cmd += ["--config", str(base)]
    for s in set_args(run.overrides) + [f"train.output_dir={json.dumps(str(rd.root))}"] + list(extra or []):
        cmd += ["--set", s]
    start = time.perf_counter()
    child = run_logged(cmd, log, timeout_s)
    result = collect_result(run, rd, child.rc, time.perf_counter() - start, child.output, base)
    result["child_env"] = child_env()
    return result


def run_sweep(path: str | Path, final: bool = False, echo: Echo = print) -> dict:
    """Run (or resume) the sweep in ``path``; write results, the table and, with ``final``, the final run.

    Returns:
        {"sweep_dir", "results": [...], "best": run name or None, "final": final record or None, "notes": [...]}.

    Raises:
        QtuneError: invalid sweep file or run config, or ``train.require_cuda`` without a GPU (before anything
            trains).
    """
    spec, base = load_sweep(path)
    runs, notes = expand(spec, base)
    check_cuda(runs, path)
    sweep = SweepDir(Path(spec.output_dir))
    sweep.results.mkdir(parents=True, exist_ok=True)
    sweep.spec.write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    for note in notes:
        echo(note)
    for i, run in enumerate(runs, 1):
        _run_or_skip(sweep, spec, base, run, f"[{i}/{len(runs)}] {run.name}", echo)
    names = {r.name for r in runs}
    results = [r for r in load_results(sweep.root) if r["run"] in names]
    write_table(sweep.root, results)
    best = best_run(results)
    final_rec = None
    if best:
        echo(f"best: {best['run']} (val loss {best['val_loss']:.4f}, peak {best['peak_gib']} GiB)")
    if final and best:
        final_rec = run_final(
            sweep.root, Run(best["run"], best["overrides"], best["labels"]), base, spec.timeout_s, echo
        )
    return {
        "sweep_dir": str(sweep.root),
        "results": results,
        "best": best["run"] if best else None,
        "final": final_rec,
        "notes": notes,
    }


def _run_or_skip(sweep: SweepDir, spec: SweepSpec, base: Path | None, run: Run, head: str, echo: Echo) -> None:
    """Train and evaluate ``run`` and write its result record, unless a record from an earlier sweep stands (ok,
    or failed without ``retry_failed``); an ok record from an older qtune gets its validation loss measured again.
    ``head``: the ``[i/n] name`` the progress lines start with."""
    out = sweep.result(run.name)
    prev = read_json(out)
    prev = prev if isinstance(prev, dict) else None  # not a record: the run is redone
    if prev and prev.get("status") == "ok" and prev.get("val_loss") is not None and prev.get("val_tokens") is None:
        echo(f"{head}: val loss recorded by an older qtune, measuring it again ...")
        remeasure_val_loss(prev, sweep.log(run.name), spec.timeout_s, echo)
        write_atomic(out, json.dumps(prev, indent=2))
    if prev and (prev.get("status") == "ok" or not spec.retry_failed):
        echo(f"{head}: {prev.get('status')} earlier, skipped")
        return
    echo(f"{head}: training ...")
    res = run_one(run, sweep.root, base, spec.timeout_s)
    if res["status"] == "ok":
        add_evaluations(res, spec, read_results(sweep), sweep.log(run.name), echo)
    write_atomic(out, dumps(res, indent=2))  # a kill leaves the whole record or none
    if res["status"] != "ok":
        echo(f"{head}: FAILED: {res['error']}")
        return
    he = f", HumanEval pass@1 {res['humaneval_pass@1']}" if res.get("humaneval_pass@1") is not None else ""
    echo(
        f"{head}: ok, {res['wall_time_s']} s, peak {res['peak_gib']} GiB "
        f"(estimate {res['estimate_gib']}), val loss {res['val_loss']} (base {res.get('base_val_loss')}){he}"
    )


def run_final(sweep_dir: Path, run: Run, base: Path | None, timeout_s: float | None, echo: Echo = print) -> dict:
    """Retrain the best configuration into ``final/<run>`` and evaluate it once on the test split
    (``qtune eval loss --splits test``); writes and returns ``final.json``."""
    sweep = SweepDir(Path(sweep_dir))
    echo(f"final: retraining {run.name} ...")
    res = run_one(run, sweep.root, base, timeout_s, run_root="final")
    if res["status"] == "ok":
        try:
            res["test"] = qtune_eval(sweep.final_run(run.name), "test", sweep.final_log(run.name), timeout_s)
            t = res["test"]["adapter"].get("test")
            if t:
                base_loss = res["test"]["base"]["test"]["loss"]
                echo(f"final: test loss {t['loss']:.4f} (perplexity {t['perplexity']:.3f}); base {base_loss:.4f}")
        except QtuneError as e:
            res["status"], res["error"] = "failed", str(e)
    write_atomic(sweep.final, dumps(res, indent=2))
    return res
