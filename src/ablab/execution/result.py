"""What a run produced: :class:`RunResult`, the object ``ablab.run`` returns (its figures and
report are drawn lazily by ``ablab.output``: the one place this layer reaches up)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ablab.analysis.checks import CheckResult
from ablab.analysis.document import RunDocument, build_document
from ablab.analysis.dynamics import training_dynamics
from ablab.analysis.explain import diverged_baselines
from ablab.stats.verdicts import Comparison, paired_curve, resolve_metric
from ablab.store.records import VariantHistory
from ablab.store.rundir import RunDir
from ablab.study.schema import Study

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ablab.output.report import ReportData


@dataclass
class RunResult:
    """What a run produced. ``histories[variant].values[name]`` is (seeds, epochs)."""

    run_id: str
    run_dir: Path
    study: Study
    state: str
    wall_s: float
    runs_per_s: float
    summary: dict[str, dict[str, Any]]
    histories: dict[str, VariantHistory]
    comparisons: list[Comparison] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    explain: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per variant: "optimum" (analytic baseline and gaps, or None), "bn" (diagnoses)."""
    divergence: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per variant with a diverged seed: ``ablab.analysis.explain.divergence_summary``."""
    compile_s: dict[str, float] = field(default_factory=dict)
    """Seconds compiling each variant's programs (near 0 where the compilation cache had them;
    overlapping, as variants compile concurrently)."""
    compile_wall_s: float | None = None
    """Seconds the compile phase took (all variants), within ``wall_s``."""
    train_s: float | None = None
    """Seconds training the cells (the compiled programs running), within ``wall_s``."""
    executor: dict[str, Any] = field(default_factory=dict)
    """Where the cells trained: ``{"name": "local", "workers": 2}`` or ``{"name": "ray"}``."""
    _report: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def diverged_baselines(self) -> list[str]:
        """One sentence per baseline that diverged on every seed -- no variant can be judged
        against it, so ``ablab run`` exits 1 -- or [] (``ablab.analysis.explain``)."""
        return diverged_baselines(self.divergence)

    def report_data(self) -> ReportData:
        """The stored run's report data (figures, HTML), computed once from the run folder."""
        from ablab.output.report import ReportData

        if self._report is None:
            self._report = ReportData.from_run(RunDir(self.run_dir))
        return self._report

    def plot(self, kind: str | None = None) -> Figure:
        """A matplotlib Figure: by default the overview (headline metric per epoch, final
        distribution over seeds, forest plot of the paired differences); ``kind`` names one
        of the report's figures (``ablab.output.report.FIGURES``: curves, paired, distributions,
        forest, weights, bn, optimum, checks)."""
        return self.report_data().plot(kind)

    def write_report(self, path: str | Path | None = None) -> Path:
        """Write the self-contained HTML report (default ``<run_dir>/report.html``)."""
        from ablab.output.report import write_report

        return write_report(RunDir(self.run_dir), Path(path) if path is not None else None)

    def _repr_html_(self) -> str:
        from ablab.output.report import summary_html

        return summary_html(self.to_json())

    @property
    def history(self) -> pa.Table:
        """Every stored history row (variant, seed, epoch, ...) as an Arrow table."""
        return RunDir(self.run_dir).history()

    def curve(self, variant: str, metric: str | None = None) -> dict[str, np.ndarray]:
        """Per-epoch paired difference of ``variant`` vs the baseline with a 95 % bootstrap band
        (``{"epoch", "diff_mean", "ci_low", "ci_high"}``); metric defaults to the verdicts'."""
        spec = self.study.verdicts
        metric = metric or resolve_metric(spec, self.histories, self.study.resolved())
        # its own baseline: the [verdicts] pair (a sweep's: the baseline at the same point)
        base = next((b for v, b in spec.pairs if v == variant), str(self.study.baseline))
        return paired_curve(
            self.histories,
            variant,
            base,
            metric,
            np.random.default_rng(spec.random_seed),
            confidence=spec.confidence,
        )

    @property
    def probes(self) -> pa.Table:
        """Every stored probe row (variant, seed, kind, step, epoch, probe, value)."""
        return RunDir(self.run_dir).probes()

    def to_json(self) -> RunDocument:
        """The ``ablab run --json`` document (``ablab.analysis.document.RunDocument``): the
        run's results, with its metadata (creation time, environment, cells) from its folder."""
        folder = RunDir(self.run_dir)
        meta = folder.read_json("study.json") if (folder.path / "study.json").exists() else {}
        status = folder.read_json("status.json") if (folder.path / "status.json").exists() else {}
        rows = [c.to_json() for c in self.comparisons]
        spec = self.study.verdicts
        return build_document(
            run_id=self.run_id,
            run_dir=str(self.run_dir),
            study=self.study.resolved(),
            state=self.state,
            variants=self.summary,
            comparisons=rows,
            checks=[c.to_json() for c in self.checks],
            explain=self.explain,
            wall_s=self.wall_s,
            runs_per_s=self.runs_per_s,
            train_s=self.train_s,
            compile_s=self.compile_wall_s,
            executor=self.executor,
            created_at=meta.get("created_at"),
            environment=meta.get("environment"),
            cells_done=status.get("cells_done"),
            cells_total=status.get("cells_total"),
            divergence=self.divergence,
            dynamics=training_dynamics(
                self.histories,
                rows,
                metric=rows[0]["metric"] if rows else spec.metric,
                higher_is_better=spec.higher_is_better,
                confidence=spec.confidence,
            ),
        )


def stored_result(run_dir: RunDir) -> RunResult:
    """A stored run as a :class:`RunResult` (``ablab.open_run``): what ``ablab.run`` returned
    for it -- summary, comparisons and divergence recomputed from its intact cells (as
    ``ablab show`` does), checks, explanations and timings as the run stored them (none for
    a run that never finished: its ``state`` says so)."""
    from dataclasses import fields

    from ablab.analysis.document import load_finished_run
    from ablab.errors import InputError

    document, histories = load_finished_run(run_dir, "open")
    doc: dict[str, Any] = dict(document)  # read as plain JSON below
    try:
        study = Study.model_validate(doc["study"])
    except Exception as exc:
        raise InputError(
            where=str(run_dir.path),
            key="study.json",
            expected="the stored study, loadable by this ablab version",
            got=f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
            fix="open it with the ablab version that made the run (`ablab show` reads any run)",
        ) from exc
    names = {f.name for f in fields(Comparison)}
    check_names = {f.name for f in fields(CheckResult)}
    saved = doc["compile_s"]
    return RunResult(
        run_id=doc["run_id"],
        run_dir=run_dir.path,
        study=study,
        state=doc["state"],
        wall_s=doc["wall_s"] or 0.0,
        runs_per_s=doc["runs_per_s"] or 0.0,
        summary=dict(doc["variants"]),
        histories=histories,
        comparisons=[
            Comparison(**{k: v for k, v in c.items() if k in names}) for c in doc["comparisons"]
        ],
        checks=[
            CheckResult(**{k: v for k, v in c.items() if k in check_names}) for c in doc["checks"]
        ],
        explain=dict(doc["explain"]),
        divergence=dict(doc["divergence"]),
        compile_wall_s=saved,
        train_s=doc["train_s"],
        executor=dict(doc["executor"] or {}),
    )
