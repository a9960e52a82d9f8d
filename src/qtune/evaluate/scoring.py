"""Scoring HumanEval samples: each one run in the sandbox (:func:`score_samples`), the unbiased pass@k estimator
(:func:`pass_at_k`) and a text table of the score (:func:`summary_table`)."""

from __future__ import annotations

from pathlib import Path

from qtune.errors import QtuneError
from qtune.evaluate.problems import build_program, check_call, write_jsonl
from qtune.evaluate.sandbox import SandboxLimits, run_programs


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed (Chen et al. 2021, eq. 1):
    ``1 - C(n-c, k) / C(n, k)``, the probability that at least one of k samples drawn without replacement from
    the n passes. Computed as ``1 - prod_{i=0}^{k-1} (n-c-i)/(n-i)`` so no large binomials appear.

    Raises:
        ValueError: not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(k):
        fail *= (n - c - i) / (n - i)
    return 1.0 - fail


def score_samples(
    problems: dict[str, dict],
    samples: list[dict],
    ks: tuple[int, ...] = (1,),
    limits: SandboxLimits | None = None,
    workers: int = 2,
    results_path: str | Path | None = None,
) -> dict:
    """Run every sample in the sandbox and compute pass@k per problem, averaged over the problems sampled.

    A sample passes only when ``check(entry_point)``, called by the sandbox after the program
    (:func:`build_program`), returned. Each problem's pass@k uses its own n (samples) and c (passed); a k above a
    problem's n is not reported. Per-sample results (task_id, completion, status passed / failed / timed out /
    error, error (why it did not pass), seconds) are written to ``results_path`` as JSONL, in the order of
    ``samples``; when that write fails the score is still returned, with a ``warning``.

    Returns:
        {"pass@k": mean over problems for each k, "problems": P, "samples": N, "counts": {status: N}}, and with
        ``results_path``: "results" (the path, or None when it could not be written) and, then, "warning".

    Raises:
        QtuneError: a k below 1 or above the fewest samples any problem has.
    """
    per_task: dict[str, list[int]] = {}
    for s in samples:
        per_task.setdefault(s["task_id"], [])
    fewest = min(sum(1 for s in samples if s["task_id"] == t) for t in per_task)
    for k in ks:
        if not 1 <= k <= fewest:
            raise QtuneError(f"--k {k}: expected 1 to {fewest} (the fewest samples of any problem)")
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    checks = [check_call(problems[s["task_id"]]) for s in samples]
    results = run_programs(programs, limits, workers, checks=checks)
    counts: dict[str, int] = {}
    rows = []
    for s, r in zip(samples, results, strict=True):
        per_task[s["task_id"]].append(r.status == "passed")
        counts[r.status] = counts.get(r.status, 0) + 1
        rows.append(
            {
                "task_id": s["task_id"],
                "completion": s["completion"],
                "status": r.status,
                "passed": r.status == "passed",
                "error": r.error,
                "seconds": r.seconds,
            }
        )
    summary: dict = {}
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in per_task.values()]
        summary[f"pass@{k}"] = sum(vals) / len(vals)
    summary.update(
        {
            "problems": len(per_task),
            "samples": len(samples),
            "counts": {st: counts.get(st, 0) for st in ("passed", "failed", "timed out", "error")},
        }
    )
    if results_path:
        problem = write_jsonl(results_path, rows)
        summary["results"] = None if problem else str(results_path)
        if problem:
            summary["warning"] = problem
    return summary


def summary_table(summary: dict) -> str:
    """A short text table of a :func:`score_samples` summary."""
    lines = [f"{'problems':<12} {summary['problems']:>8}", f"{'samples':<12} {summary['samples']:>8}"]
    for status, n in summary["counts"].items():
        lines.append(f"{status:<12} {n:>8}")
    for key, value in summary.items():
        if key.startswith("pass@"):
            lines.append(f"{key:<12} {value:>8.4f}")
    return "\n".join(lines)
