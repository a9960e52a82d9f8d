"""The paths inside one sweep directory (:class:`SweepDir`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtune.rundir.files import TMP_PREFIX
from qtune.rundir.run import RunDir


@dataclass(frozen=True)
class SweepDir:
    """Paths inside one sweep directory (``output_dir`` of a sweep file, :mod:`qtune.study`)."""

    root: Path

    @property
    def spec(self) -> Path:
        """The copy of the sweep file the sweep last ran (``reference_memory_gb`` is read back from it)."""
        return self.root / "sweep.yaml"

    @property
    def results(self) -> Path:
        """One ``<run>.json`` result record per run (:func:`qtune.study.results.collect_result`)."""
        return self.root / "results"

    def result(self, name: str) -> Path:
        """The result record of run ``name``; its existence makes a rerun skip the run."""
        return self.results / f"{name}.json"

    def result_files(self) -> list[Path]:
        """Every result record, sorted by file name (not a half-written one's temporary file)."""
        return sorted(f for f in self.results.glob("*.json") if not f.name.startswith(TMP_PREFIX))

    def run(self, name: str) -> RunDir:
        """The run directory run ``name`` trains into."""
        return RunDir(self.root / "runs" / name)

    def final_run(self, name: str) -> RunDir:
        """The run directory of the best configuration retrained by ``qtune sweep --final``."""
        return RunDir(self.root / "final" / name)

    def log(self, name: str) -> Path:
        """Output of run ``name``'s processes: training, then its evaluations."""
        return self.root / "logs" / f"{name}.log"

    def final_log(self, name: str) -> Path:
        """Output of the processes of :meth:`final_run` (retraining, test evaluation); the grid run's log stays."""
        return self.root / "logs" / "final" / f"{name}.log"

    @property
    def table_csv(self) -> Path:
        """The results table (:func:`qtune.study.tables.write_table`), one row per base evaluated alone and run."""
        return self.root / "results.csv"

    @property
    def table_md(self) -> Path:
        """The results table in Markdown, with the best run and the ranking check."""
        return self.root / "results.md"

    @property
    def final(self) -> Path:
        """Result record of the retrained best configuration, with its test-split evaluation."""
        return self.root / "final.json"

    @property
    def figures(self) -> Path:
        """The report's PNG figures (:mod:`qtune.study.figures`)."""
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        """The PNG of figure ``name`` (:data:`qtune.study.figures.FIGURES`)."""
        return self.figures / f"{name}.png"

    @property
    def report(self) -> Path:
        """``qtune report``'s Markdown (:func:`qtune.study.report.write_report`), embedding the figures."""
        return self.root / "report.md"

    def run_of(self, result: dict) -> RunDir:
        """The run directory of a result record: the ``train.output_dir`` it trained into while that still holds
        its metrics, else ``runs/<run>`` here (a sweep directory moved since)."""
        recorded = ((result.get("config") or {}).get("train") or {}).get("output_dir")
        if recorded and RunDir(Path(recorded)).metrics.is_file():
            return RunDir(Path(recorded))
        return self.run(result["run"])
