"""The report of a stored run: one self-contained HTML page with tables and figures.

:class:`ReportData` computes, from a run folder alone, everything the figures show (per-epoch
quantile bands of the history, the empirical CDF of the final metric, per-epoch paired
differences with bootstrap bands, quantiles of the probes via DuckDB over the probe files,
the expected BatchNormalization progress); ``ablab.output.figures`` only draws them. The page is a
Jinja2 template with every figure inlined as SVG: it fetches nothing and opens from disk.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import duckdb
import jinja2
import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from ablab.execution.result import RunResult
from ablab.output import figures as figs
from ablab.output.figures import Band
from ablab.output.formatting import fmt, sig, timestamp
from ablab.output.terminal import why_lines
from ablab.stats.summary import QUANTILES, spread
from ablab.stats.verdicts import paired_curve
from ablab.store.io import atomic_write_bytes
from ablab.store.records import VariantHistory
from ablab.store.rundir import RunDir
from ablab.study.schema import VerdictSpec

ECDF_POINTS = 2000
"""Most steps an ECDF is drawn with (exact up to this many seeds, thinned beyond)."""
TRAJECTORY_POINTS = 400
"""Most optimizer steps a weight trajectory is drawn at (every step up to this many)."""

FIGURES = (
    "curves",
    "paired",
    "distributions",
    "forest",
    "sweep",
    "weights",
    "bn",
    "optimum",
    "checks",
)
"""Every figure a report can hold, in page order (those without data are left out)."""

CAPTIONS = {
    "curves": "Per-epoch history of every recorded metric and variant: median over seeds "
    "with the 5–95 % band; "
    "the dashed line is the analytic optimum where one exists. Seeds that diverged are left "
    "out (of this figure and the others) and counted in the legend.",
    "paired": "Per-epoch paired difference (variant − baseline) of the verdict metric over "
    "matched seeds, with its bootstrap confidence band. Below zero: lower than the baseline.",
    "distributions": "Distribution of the final verdict metric over the seeds that never "
    "diverged (empirical CDF); the legend counts the others.",
    "forest": "Mean paired difference of the final metric with its confidence interval, "
    "coloured by verdict; the shaded band is the equivalence margin. A comparison without an "
    "estimate (every seed of an arm diverged, or too few converged) is a row saying so.",
    "sweep": "The same paired difference along each sweep axis: each variant against the "
    "baseline at the same sweep point, with its confidence interval; markers coloured by "
    "verdict, zero = no effect.",
    "weights": "Sum of each layer's kernel (or first weight) after every optimizer step: "
    "median over seeds with the 5–95 % band (the seed answer's per-layer trajectories); where "
    "the variants' bands overlap, one panel per variant on a shared y axis.",
    "bn": "BatchNormalization: how far the moving mean and variance have moved towards the "
    "training set's statistics (1 = there) against the expected 1 − momentum^updates, and "
    "validation loss computed with batch statistics vs with the moving statistics.",
    "optimum": "Gap of the final training / validation MSE to the analytic optimum "
    "(PCA or reduced-rank regression) of the linear variants.",
    "checks": "Largest relative deviation found by each check against its tolerance.",
}


def _band(x: np.ndarray, values: np.ndarray) -> Band:
    """Median and 5–95 % over the rows of ``values`` (seeds, x), ignoring non-finite seeds."""
    clean = np.where(np.isfinite(values), values, np.nan)
    keep = ~np.all(np.isnan(clean), axis=0)
    x, clean = x[keep], clean[:, keep]
    if clean.size == 0:
        empty = np.zeros(0)
        return Band(empty, empty, empty, empty)
    low, median, high = spread(clean, axis=0)
    return Band(x, median, low, high)


def _paired_order(names: list[str]) -> list[str]:
    """History names with each ``val_<name>`` right after ``<name>`` (Keras records every
    training name first), the others where they were recorded."""

    def key(name: str) -> tuple[int, bool]:
        base = name.removeprefix("val_")
        return (names.index(base) if base in names else names.index(name), base != name)

    return sorted(names, key=key)


def _probe_bands(
    files: list[str],
    kind: str,
    suffix: str,
    *,
    since_first: bool = False,
    exclude: Mapping[str, np.ndarray] | None = None,
) -> dict[tuple[str, str], Band]:
    """{(variant, probe): Band over seeds along step (kind "step") or epoch (kind "epoch")} for
    the probes whose name ends with ``suffix``; aggregated by DuckDB, so runs with many seeds
    never load every probe row into memory. since_first: each seed's value minus its value at
    the first recorded step (the drift, without the spread of the initial weights).
    exclude: {variant: seed ids} left out (the diverged seeds)."""
    if not files:
        return {}
    axis = "step" if kind == "step" else "epoch"
    pairs = [(v, int(seed)) for v, seeds in (exclude or {}).items() for seed in seeds]
    excluded = pa.table(
        {
            "variant": pa.array([v for v, _ in pairs], pa.string()),
            "seed": pa.array([seed for _, seed in pairs], pa.int64()),
        }
    )
    with duckdb.connect() as con:
        con.register("excluded", excluded)
        row = con.execute(f"SELECT max({axis}) FROM read_parquet(?)", [files]).fetchone()
        last = row[0] if row else None
        every = max(1, -(-int(last or 1) // TRAJECTORY_POINTS))  # ceil: <= that many points
        value = (
            f"value - first_value(value) OVER (PARTITION BY variant, seed, probe ORDER BY {axis})"
            if since_first
            else "value"
        )
        rows = con.execute(
            f"WITH p AS (SELECT variant, probe, {axis} AS x, {value} AS value "
            "FROM read_parquet(?) r WHERE kind = ? AND suffix(probe, ?) AND NOT EXISTS "
            "(SELECT 1 FROM excluded e WHERE e.variant = r.variant AND e.seed = r.seed)) "
            f"SELECT variant, probe, x, quantile_cont(value, {list(QUANTILES)}) "
            "FROM p WHERE isfinite(value) AND (x % ? = 0 OR x = 1 OR x = ?) "
            "GROUP BY ALL ORDER BY variant, probe, x",
            [files, kind, suffix, every, last],
        ).fetchall()
    grouped: dict[tuple[str, str], list[tuple[int, list[float]]]] = {}
    for variant, probe, x, q in rows:
        grouped.setdefault((variant, probe), []).append((x, q))
    out = {}
    for key, pts in grouped.items():
        x = np.array([p[0] for p in pts], dtype=float)
        q = np.array([p[1] for p in pts], dtype=float)
        out[key] = Band(x, q[:, 1], q[:, 0], q[:, 2])
    return out


@dataclass
class ReportData:
    """Everything a report shows, computed from one stored run."""

    doc: Mapping[str, Any]
    """``ablab show RUN --json``'s document (study, environment, summary, verdicts, checks)."""
    histories: dict[str, VariantHistory]
    probe_files: list[str] = field(default_factory=list)

    @classmethod
    def from_run(cls, run_dir: RunDir) -> ReportData:
        from ablab.analysis.document import load_finished_run

        doc, histories = load_finished_run(run_dir, "report")
        return cls(doc, histories, [str(f) for f in run_dir.done_probe_files()])

    # -- computed data ---------------------------------------------------------------------
    @property
    def variants(self) -> list[str]:
        return list(self.histories)

    @cached_property
    def colors(self) -> dict[str, Any]:
        return figs.variant_colors(self.variants)

    @cached_property
    def diverged_seeds(self) -> dict[str, np.ndarray]:
        """{variant: ids of its seeds that diverged}, for the variants with any."""
        out = {v: h.seeds[h.diverged_epoch > 0] for v, h in self.histories.items()}
        return {v: seeds for v, seeds in out.items() if seeds.size}

    @property
    def diverged(self) -> dict[str, tuple[int, int]]:
        """{variant: (seeds that diverged, seeds)}: what the figures' legends count."""
        return {v: (s.size, self.histories[v].n_seeds) for v, s in self.diverged_seeds.items()}

    @cached_property
    def converged(self) -> dict[str, VariantHistory]:
        """The histories with every value of a diverged seed set to NaN: what the figures
        draw, so a seed's values before (or beside) its blow-up never set an axis."""
        out = {}
        for v, h in self.histories.items():
            bad = (h.diverged_epoch > 0)[:, None]
            values = {k: np.where(bad, np.nan, a) for k, a in h.values.items()}
            out[v] = VariantHistory(seeds=h.seeds, values=values)
        return out

    @property
    def metric(self) -> str:
        """The metric the verdicts compare (``[verdicts] metric``, else the headline one:
        val_loss with validation data, else loss)."""
        if self.doc["comparisons"]:
            return str(self.doc["comparisons"][0]["metric"])
        first = next(iter(self.doc["variants"].values()))
        return str(first["metric"])

    @cached_property
    def curves(self) -> dict[str, dict[str, Band]]:
        """{history name: {variant: per-epoch Band}} for every recorded History name -- the
        verdict metric, val_loss and loss first, then the rest in recorded order, each
        validation name after its training one -- over the seeds that never diverged."""
        recorded = list(dict.fromkeys(n for h in self.histories.values() for n in h.values))
        names = list(dict.fromkeys([self.metric, "val_loss", "loss", *_paired_order(recorded)]))
        out: dict[str, dict[str, Band]] = {}
        for name in names:
            bands = {
                v: _band(np.arange(1, h.values[name].shape[1] + 1, dtype=float), h.values[name])
                for v, h in self.converged.items()
                if name in h.values
            }
            if bands:
                out[name] = bands
        return out

    @cached_property
    def optimum_lines(self) -> dict[str, dict[str, float]]:
        """{"val_loss" | "loss": {variant: its analytic optimum's MSE}} for the curves."""
        out: dict[str, dict[str, float]] = {"val_loss": {}, "loss": {}}
        for v, e in self.doc["explain"].items():
            opt = e.get("optimum")
            if opt and v in self.histories:
                if opt.get("val_mse") is not None:
                    out["val_loss"][v] = opt["val_mse"]
                out["loss"][v] = opt["train_mse"]
        return {k: d for k, d in out.items() if d}

    @cached_property
    def verdict_spec(self) -> VerdictSpec:
        """The study's ``[verdicts]`` (confidence and bootstrap seed of the paired bands)."""
        return VerdictSpec.model_validate(self.doc["study"].get("verdicts") or {})

    @cached_property
    def paired(self) -> dict[str, dict[str, np.ndarray]]:
        """{"variant vs baseline": per-epoch paired difference with its bootstrap band, over
        the seeds that converged in both arms (as the verdict's estimates)."""
        spec = self.verdict_spec
        out = {}
        for c in self.doc["comparisons"]:
            if not c.get("paired", True) or (c.get("n_finite") or 0) < 2:
                continue  # a paired curve needs >= 2 seeds on which both arms converged
            curve = paired_curve(
                self.converged,
                c["variant"],
                c["baseline"],
                c["metric"],
                np.random.default_rng(spec.random_seed),
                confidence=spec.confidence,
            )
            out[f"{c['variant']} vs {c['baseline']}"] = curve
        return out

    @property
    def level(self) -> str:
        return f"{100 * self.verdict_spec.confidence:g}%"

    @cached_property
    def finals(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{variant: (F, x)}: the empirical CDF of the final verdict metric over the seeds that
        never diverged, F(x_k) = k / n at the sorted values, thinned to at most ECDF_POINTS
        steps."""
        out = {}
        for v, h in self.converged.items():
            if self.metric not in h.values:
                continue
            final = h.values[self.metric][:, -1]
            xs = np.sort(final[np.isfinite(final)])
            n = xs.size
            if n == 0:
                continue
            k = np.unique(np.ceil(np.linspace(0, n, min(n, ECDF_POINTS) + 1)[1:]).astype(int))
            out[v] = (
                np.concatenate([[0.0], k / n]),
                np.concatenate([[xs[0]], xs[k - 1]]),
            )
        return out

    @cached_property
    def weights(self) -> dict[str, dict[str, dict[str, Band]]]:
        """{layer: {"sum" | "drift": {variant: per-step Band}}}: the layer's weight sum, and
        its change since the first step (per seed, so the spread of the initial weights does
        not hide the trajectory); diverged seeds left out."""
        out: dict[str, dict[str, dict[str, Band]]] = {}
        for which, since_first in (("sum", False), ("drift", True)):
            bands = _probe_bands(
                self.probe_files,
                "step",
                "/kernel_sum",
                since_first=since_first,
                exclude=self.diverged_seeds,
            )
            for (variant, probe), band in bands.items():
                layer = out.setdefault(probe.removesuffix("/kernel_sum"), {})
                layer.setdefault(which, {})[variant] = band
        return {layer: out[layer] for layer in sorted(out)}

    @cached_property
    def bn(self) -> dict[str, dict[str, Any]]:
        """Per variant with BatchNormalization: moving-statistics progress per layer with the
        expected ``1 − momentum^updates``, and val loss in train vs inference mode."""
        left_out = self.diverged_seeds
        progress = _probe_bands(self.probe_files, "epoch", "_progress", exclude=left_out)
        train_mode = _probe_bands(
            self.probe_files, "epoch", "val_loss_train_mode", exclude=left_out
        )
        out: dict[str, dict[str, Any]] = {}
        for v, e in self.doc["explain"].items():
            diagnoses = e.get("bn") or []
            layers = {}
            for d in diagnoses:
                mean = progress.get((v, f"{d['layer']}/moving_mean_progress"))
                var = progress.get((v, f"{d['layer']}/moving_var_progress"))
                if mean is None or var is None:
                    continue
                epochs = self.histories[v].values["loss"].shape[1]
                x = np.arange(0, epochs + 1, dtype=float)
                expected = 1.0 - d["momentum"] ** (d["updates"] * x / epochs)
                layers[d["layer"]] = {"mean": mean, "var": var, "expected": (x, expected)}
            if layers:
                out[v] = {
                    "layers": layers,
                    "val_train_mode": train_mode.get((v, "val_loss_train_mode")),
                    "val_inference": self.curves.get("val_loss", {}).get(v),
                }
        return out

    @property
    def gaps(self) -> dict[str, dict[str, Any]]:
        return {
            v: e["optimum"]
            for v, e in self.doc["explain"].items()
            if e.get("optimum") and v in self.histories
        }

    # -- figures ---------------------------------------------------------------------------
    def available(self) -> list[str]:
        """The figures this run has data for, in page order."""
        have = {
            "curves": True,
            "paired": bool(self.paired),
            "distributions": bool(self.finals),
            "forest": bool(self.doc["comparisons"]),  # a row without an estimate says why
            "sweep": bool(
                self.doc.get("sweep")
                and any(r["diff_mean"] is not None for r in self.doc["sweep"]["rows"])
            ),
            "weights": bool(self.weights),
            "bn": bool(self.bn),
            "optimum": bool(self.gaps),
            "checks": any(c["passed"] is not None for c in self.doc["checks"]),
        }
        return [name for name in FIGURES if have[name]]

    def figure(self, kind: str) -> Figure:
        """One figure by name (see :data:`FIGURES`)."""
        if kind not in FIGURES:
            raise ValueError(f"unknown figure {kind!r}; choose from {FIGURES}")
        if kind not in self.available():
            raise ValueError(f"this run has no data for the {kind!r} figure")
        c = self.colors
        if kind == "curves":
            return figs.curves_figure(self.curves, c, self.optimum_lines, self.diverged)
        if kind == "paired":
            return figs.paired_figure(self.paired, c, self.metric, self.level)
        if kind == "distributions":
            return figs.ecdf_figure(self.finals, c, self.metric, self.diverged)
        if kind == "forest":
            return figs.forest_figure(self.doc["comparisons"])
        if kind == "sweep":
            return figs.sweep_figure(self.doc["sweep"])
        if kind == "weights":
            return figs.weights_figure(self.weights, c, self.diverged)
        if kind == "bn":
            return figs.bn_figure(self.bn, c)
        if kind == "optimum":
            return figs.optimum_figure(self.gaps, c)
        return figs.checks_figure(self.doc["checks"])

    def overview(self) -> Figure:
        """The main figures side by side: the headline metric per epoch, its final
        distribution over seeds, and the paired differences with their verdicts."""
        fig = Figure(figsize=(16.0, 3.8), layout="constrained", dpi=100)
        ax_curve, ax_ecdf, ax_forest = fig.subplots(1, 3)
        figs.draw_curves(
            ax_curve,
            self.curves[self.metric],
            self.colors,
            self.metric,
            self.optimum_lines.get(self.metric),
            self.diverged,
        )
        figs.draw_ecdf(ax_ecdf, self.finals, self.colors, self.metric, self.diverged)
        figs.draw_forest(ax_forest, self.doc["comparisons"])
        return fig

    def plot(self, kind: str | None = None) -> Figure:
        """The overview figure, or the figure named ``kind`` (see :data:`FIGURES`)."""
        return self.overview() if kind is None else self.figure(kind)

    def _repr_html_(self) -> str:
        return summary_html(self.doc)

    # -- HTML ------------------------------------------------------------------------------
    def html(self) -> str:
        """The whole self-contained report page."""
        figures = []
        for name in self.available():
            fig = self.figure(name)
            figures.append(
                {"name": name, "svg": figs.to_svg(fig, salt=name), "caption": CAPTIONS[name]}
            )
        return _template("report.html.j2").render(
            doc=self.doc,
            metric=self.metric,
            figures=figures,
            why=why_lines(self.doc),
            dynamics=self.doc.get("dynamics") or {},
            study_json=json.dumps(self.doc["study"], indent=2),
            generated=timestamp(dt.datetime.now(dt.UTC)),
            probes_off=not self.probe_files,
        )


_ENV: jinja2.Environment | None = None


def _template(name: str) -> jinja2.Template:
    global _ENV
    if _ENV is None:
        _ENV = jinja2.Environment(
            loader=jinja2.PackageLoader("ablab.output", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        _ENV.filters["sig"] = sig
        _ENV.filters["fmt"] = fmt
        _ENV.filters["timestamp"] = timestamp
    return _ENV.get_template(name)


def summary_html(doc: Mapping[str, Any]) -> str:
    """A compact HTML summary (per-variant final metric and verdict, checks) of a run
    document -- what a notebook shows for a run result."""
    return _template("summary.html.j2").render(doc=doc)


def open_run(ref: str | Path = "latest", runs_dir: str | Path | None = None) -> RunResult:
    """A stored run as the :class:`~ablab.execution.result.RunResult` ``ablab.run`` returned
    for it (``run_id``, ``summary``, ``comparisons``, ``histories``, ``plot()``,
    ``write_report()``, a summary table in a notebook); ``.report_data()`` is its
    :class:`ReportData`.

    ref: a run folder, a run id or unique prefix, or ``"latest"``, looked up in ``runs_dir``
    (default: ``$ABLAB_RUNS_DIR``, else ``./runs`` -- as the CLI's ``--runs-dir``).
    """
    from ablab.execution.result import stored_result
    from ablab.store.rundir import default_runs_dir, resolve_run

    root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    return stored_result(resolve_run(root, str(ref)))


def write_report(run_dir: RunDir, out: Path | None = None) -> Path:
    """Write ``run_dir``'s report (default ``<run>/report.html``) atomically; return its path."""
    path = out if out is not None else run_dir.path / "report.html"
    html = ReportData.from_run(run_dir).html()
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
