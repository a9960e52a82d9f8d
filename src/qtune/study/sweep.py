"""Deprecated: the names of the former ``qtune.study.sweep``, kept importable for one release.

The sweep now lives in :mod:`qtune.study.spec` (sweep file, grid), :mod:`qtune.study.runner` (the child processes,
resume, ``--final``), :mod:`qtune.study.process` (child environment), :mod:`qtune.study.evals` (the evaluations of
a finished run), :mod:`qtune.study.results` (result records, estimates, best run), :mod:`qtune.study.tables`
(results.csv / results.md) and :mod:`qtune.study.dryrun` (``qtune sweep --dry-run``). Import from those: replacing
a function here (a test's monkeypatch) does not change what :func:`run_sweep` calls.
"""

from __future__ import annotations

from qtune.rundir import read_metrics
from qtune.study.dryrun import format_plan, plan
from qtune.study.evals import add_evaluations, remeasure_val_loss, run_val_halves, val_halves, write_val_halves
from qtune.study.process import MMAP_THRESHOLD, child_env, qtune_env
from qtune.study.results import (
    FULL_FINETUNING,
    base_key,
    best_run,
    collect_result,
    full_finetuning_estimates,
    load_results,
    run_estimate,
)
from qtune.study.runner import run_final, run_one, run_sweep
from qtune.study.spec import (
    AXIS_KEYS,
    QUANTIZED,
    SETUPS,
    VARIANTS,
    Run,
    SweepSpec,
    base_name,
    check_cuda,
    expand,
    load_sweep,
    run_name,
    set_args,
    setup_of,
)
from qtune.study.tables import (
    COLUMNS,
    QUANT_ORDER,
    base_rows,
    md_table,
    ranking_stability,
    stability_line,
    study_rows,
    table_rows,
    write_table,
)

__all__ = [
    "AXIS_KEYS",
    "COLUMNS",
    "FULL_FINETUNING",
    "MMAP_THRESHOLD",
    "QUANTIZED",
    "QUANT_ORDER",
    "SETUPS",
    "VARIANTS",
    "Run",
    "SweepSpec",
    "add_evaluations",
    "base_key",
    "base_name",
    "base_rows",
    "best_run",
    "check_cuda",
    "child_env",
    "collect_result",
    "expand",
    "format_plan",
    "full_finetuning_estimates",
    "load_results",
    "load_sweep",
    "md_table",
    "plan",
    "qtune_env",
    "ranking_stability",
    "read_metrics",
    "remeasure_val_loss",
    "run_estimate",
    "run_final",
    "run_name",
    "run_one",
    "run_sweep",
    "run_val_halves",
    "set_args",
    "setup_of",
    "stability_line",
    "study_rows",
    "table_rows",
    "val_halves",
    "write_table",
    "write_val_halves",
]
