"""Layout of a run directory, written by training and read by evaluation, generation and serving.

A run directory is qtune's own: :func:`qtune.train.trainer.make_run_dir` marks it (``.qtune-run``) when it
creates it, and ``--overwrite`` replaces only such a directory, holding nothing but names qtune writes
(:meth:`RunDir.check_replaceable`). One process writes a run at a time (:class:`RunLock`). A run is finished
once ``train_summary.json`` exists: the final save writes it last (:func:`qtune.train.checkpoints.save_final`).

The package, by concern: :mod:`~qtune.rundir.run` (:class:`RunDir`, the paths of a run),
:mod:`~qtune.rundir.sweep` (:class:`SweepDir`, the paths of a sweep), :mod:`~qtune.rundir.lock`
(:class:`RunLock`) and :mod:`~qtune.rundir.files` (reading metrics, atomic writes); every name is importable from
``qtune.rundir``.
"""

from __future__ import annotations

from qtune.rundir.files import TMP_PREFIX, build_dir_once, read_metrics, refuse_user_places, write_atomic
from qtune.rundir.lock import RunLock
from qtune.rundir.run import ADAPTER_CONFIG, ADAPTER_WEIGHTS, WRITTEN_INSIDE, RunDir
from qtune.rundir.sweep import SweepDir

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "TMP_PREFIX",
    "WRITTEN_INSIDE",
    "RunDir",
    "RunLock",
    "SweepDir",
    "build_dir_once",
    "read_metrics",
    "refuse_user_places",
    "write_atomic",
]
