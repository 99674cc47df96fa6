"""The HTML report: data computed from the stored run, a self-contained page, and the page
opened in a real browser (headless Chromium through Playwright)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from matplotlib.figure import Figure

import ablab
from ablab.analysis.document import run_document
from ablab.execution.env import environment
from ablab.output.formatting import timestamp
from ablab.output.report import FIGURES, ReportData, _probe_bands, write_report
from ablab.store.records import VariantHistory
from ablab.store.rundir import RunDir
from tests.conftest import ROOT

# The report study has no [sweep]: every figure but the sweep's (tests/test_sweep.py has it).
UNSWEPT = [f for f in FIGURES if f != "sweep"]

# Reference values below come from numpy on the stored tables: np.quantile's default (linear
# interpolation, Hyndman-Fan type 7) is the definition DuckDB's quantile_cont uses too.


def test_history_bands_are_quantiles_over_seeds(report_run: ablab.RunResult) -> None:
    data = report_run.report_data()
    values = report_run.histories["bn"].values["val_loss"]
    band = data.curves["val_loss"]["bn"]
    low, median, high = np.quantile(values, [0.05, 0.5, 0.95], axis=0)
    np.testing.assert_allclose(band.median, median, rtol=1e-12)
    np.testing.assert_allclose(band.low, low, rtol=1e-12)
    np.testing.assert_allclose(band.high, high, rtol=1e-12)
    np.testing.assert_array_equal(band.x, [1, 2, 3])
    cdf, xs = data.finals["plain"]
    final = report_run.histories["plain"].values["val_loss"][:, -1]
    # the empirical CDF itself: F = k / n at the k-th smallest of the 12 seeds
    np.testing.assert_array_equal(xs[1:], np.sort(final))
    np.testing.assert_allclose(cdf, np.arange(13) / 12)


def test_probe_bands_match_numpy_on_the_probe_table(report_run: ablab.RunResult) -> None:
    data = report_run.report_data()
    t = report_run.probes
    mask = pc.and_(
        pc.equal(t["variant"], "bn"),
        pc.equal(t["probe"], "dense#0/kernel_sum"),
    )
    rows = t.filter(mask).sort_by([("seed", "ascending"), ("step", "ascending")])
    steps = int(pc.max(rows["step"]).as_py())
    per_seed = rows["value"].to_numpy().reshape(-1, steps)  # (seeds, steps)
    assert per_seed.shape[0] == 12
    raw = data.weights["dense#0"]["sum"]["bn"]
    np.testing.assert_allclose(raw.median, np.quantile(per_seed, 0.5, axis=0), rtol=1e-9)
    drift = data.weights["dense#0"]["drift"]["bn"]
    moved = per_seed - per_seed[:, :1]
    np.testing.assert_allclose(drift.high, np.quantile(moved, 0.95, axis=0), atol=1e-12)
    assert drift.median[0] == 0.0
    assert set(data.weights) == {"batch_normalization#0", "dense#0", "dense#1"}


def test_bn_progress_is_drawn_against_one_minus_momentum_to_the_updates(
    report_run: ablab.RunResult,
) -> None:
    data = report_run.report_data()
    assert set(data.bn) == {"bn"}
    layer = data.bn["bn"]["layers"]["batch_normalization#0"]
    x, expected = layer["expected"]
    # 90 training rows / batch 32 = 3 updates per epoch, 3 epochs, Keras' momentum 0.99
    np.testing.assert_allclose(expected, 1 - 0.99 ** (3 * x))
    assert layer["mean"].x.tolist() == [1, 2, 3]
    assert data.bn["bn"]["val_train_mode"] is not None


def test_every_figure_has_data_and_the_page_is_self_contained(
    report_run: ablab.RunResult, tmp_path: Path
) -> None:
    data = report_run.report_data()
    assert data.available() == UNSWEPT
    path = report_run.write_report(tmp_path / "r.html")
    html = path.read_text()
    for name in UNSWEPT:
        assert f'data-plot="{name}"' in html
    # nothing is fetched: no external scripts, styles, fonts or images
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "url(http" not in html and "<script" not in html
    text = unescape(html)
    for shown in ("plain_id", "Verdicts", "plain ≡ plain_id", "keras", "jax", '"epochs": 3'):
        assert shown in text
    assert report_run.summary["bn"]["n_seeds"] == 12
    assert "This run is" not in html  # complete: no banner
    # one timestamp format: created and generated, to the second, no fraction, in UTC
    stamps = re.findall(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d[\d:.]*(?: UTC|Z|[+-]\d\d:\d\d)?", text)
    assert len(stamps) == 2 and all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", t) for t in stamps
    ), stamps


def test_report_of_an_interrupted_run_shows_what_finished(
    report_run: ablab.RunResult, tmp_path: Path
) -> None:
    copy = tmp_path / report_run.run_id
    shutil.copytree(report_run.run_dir, copy)
    run = RunDir(copy)
    run.cell_path("bn", 1).unlink()  # the second chunk of bn never finished
    (copy / "summary.json").unlink()
    run.write_status("interrupted", 5, 6)
    shutil.rmtree(copy / "probes")  # and say the probes were off
    data = ReportData.from_run(run)
    assert data.doc["variants"]["bn"]["n_seeds"] == 8
    assert "weights" not in data.available() and "bn" not in data.available()
    html = write_report(run).read_text()
    assert "This run is <strong>interrupted</strong>" in html
    assert "Probes were not recorded" in html


def test_a_run_without_finished_cells_has_no_report(
    report_run: ablab.RunResult, tmp_path: Path
) -> None:
    copy = tmp_path / "empty"
    shutil.copytree(
        report_run.run_dir, copy, ignore=shutil.ignore_patterns("*.parquet", "report.html")
    )
    with pytest.raises(ablab.InputError, match="at least one finished cell"):
        write_report(RunDir(copy))
    assert not (copy / "report.html").exists()


def test_notebook_summary_and_plots(report_run: ablab.RunResult) -> None:
    html = report_run._repr_html_()
    assert html.count("<tr>") == 1 + 3  # header + one row per variant
    verdict = next(c.verdict for c in report_run.comparisons if c.variant == "bn")
    assert f'class="verdict {verdict}"' in html
    assert "checks: 1 passed" in html
    overview = report_run.plot()
    assert isinstance(overview, Figure) and len(overview.axes) == 3
    # plain and plain_id train identically, so the dense layers' weight bands overlap: two
    # rows of small multiples each, a panel per variant (3); bn's own layer: one row of two
    assert len(report_run.plot("weights").axes) == 2 * (2 * 3) + 2
    with pytest.raises(ValueError, match="unknown figure"):
        report_run.plot("nope")
    stored = ablab.open_run(str(report_run.run_dir))
    assert "plain_id" in stored._repr_html_()
    recorded = stored.histories["plain"].values  # a panel per recorded History name
    assert len(stored.plot("curves").axes) == len(recorded) >= 2


# Data drawn inside the axes of a matplotlib SVG: lines with at least two points, filled
# bands, and filled patches (bars), but not ticks, legends, spines or the axes background --
# so a figure whose axes are empty counts 0 even though its text is drawn as paths.
_COUNT_DATA_ARTISTS = """s => {
  let n = 0;
  const kinds = ['line2d_', 'Fill', 'PolyCollection', 'patch_'];
  const sel = kinds.map(k => `g[id^=axes_] g[id^=${k}]`).join(', ');
  for (const g of s.querySelectorAll(sel)) {
    if (g.closest('[id^=xtick_], [id^=ytick_], [id^=legend_]')) continue;
    const p = g.querySelector('path');
    if (!p) continue;
    const d = p.getAttribute('d') || '', style = p.getAttribute('style') || '';
    if (g.id.startsWith('line2d_') ? d.includes('L') :
        g.id.startsWith('patch_') ? !/fill: ?(none|#ffffff)/.test(style) : d.length > 20) n++;
  }
  return n;
}"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_in_headless_chromium(report_run: ablab.RunResult) -> None:
    """Opens the report from disk in headless Chromium: no console errors, no request that
    leaves the file, every figure present with a non-empty drawing; keeps a screenshot."""
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: `make test` installs Debian's chromium")
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    path = report_run.write_report()
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on(
            "console",
            lambda m: (
                problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.resolve().as_uri(), wait_until="load")
        # the verdict table fits the 1,280 px page: every verdict cell inside the viewport,
        # the table not scrolled sideways
        edges = page.locator("table.verdicts td.verdict-cell").evaluate_all(
            "cells => cells.map(c => c.getBoundingClientRect().right)"
        )
        assert len(edges) == 2 and max(edges) <= 1280, edges
        scroll = page.locator("#verdicts .scroll").first
        assert scroll.evaluate("d => d.scrollWidth <= d.clientWidth"), "verdict table scrolls"
        sizes = {}
        for name in UNSWEPT:
            svg = page.locator(f'figure[data-plot="{name}"] svg')
            assert svg.count() == 1, name
            box = svg.bounding_box()
            assert box is not None, name
            sizes[name] = (box["width"], box["height"])
            drawn = svg.evaluate(_COUNT_DATA_ARTISTS)
            assert drawn >= (1 if name == "checks" else 3), (name, drawn)  # one check here
        page.screenshot(path=str(out / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert all(w > 300 and h > 100 for w, h in sizes.values()), sizes
    assert (out / "report.png").stat().st_size > 50_000
    (out / "report-figures.json").write_text(json.dumps(sizes, indent=2))


def _hand_made(
    values: dict[str, dict[str, np.ndarray]],
    verdicts: dict | None = None,
    state: str = "complete",
    study_extra: dict | None = None,
) -> ReportData:
    """A ReportData from hand-made histories {variant: {name: (seeds, epochs)}}: no training
    (``study_extra``: more keys of the stored study, e.g. its train settings)."""
    histories = {
        v: VariantHistory(seeds=np.arange(next(iter(h.values())).shape[0]), values=h)
        for v, h in values.items()
    }
    study = {
        "name": "hand",
        "baseline": next(iter(values)),
        "variants": {v: {} for v in values},
        "verdicts": verdicts or {"n_resamples": 200},
        **(study_extra or {}),
    }
    meta = {"run_id": "r1", "run_dir": "/nowhere", "study": study, "environment": environment()}
    status = {"state": state, "cells_done": 1, "cells_total": 2}
    saved = {} if state != "complete" else {"wall_s": 1.0, "runs_per_s": 10.0}
    return ReportData(run_document(meta, status, saved, histories), histories)


def _render_all(data: ReportData) -> str:
    for name in data.available():
        data.figure(name)
    data.overview()
    return data.html()


RNG = np.random.default_rng(0)


def test_a_run_without_validation_data_reports_its_loss() -> None:
    data = _hand_made({"a": {"loss": RNG.random((20, 4))}, "b": {"loss": RNG.random((20, 4))}})
    assert data.metric == "loss" and list(data.curves) == ["loss"]
    assert data.available() == ["curves", "paired", "distributions", "forest"]
    assert "final loss" in unescape(_render_all(data))


def test_a_single_variant_and_an_all_diverged_variant_still_report() -> None:
    single = _hand_made({"a": {"loss": RNG.random((5, 3)), "val_loss": RNG.random((5, 3))}})
    assert single.available() == ["curves", "distributions"]
    assert "No comparisons" in _render_all(single)
    nan = np.full((5, 3), np.nan)
    diverged = _hand_made(
        {
            "a": {"loss": RNG.random((5, 3)), "val_loss": RNG.random((5, 3))},
            "b": {"loss": nan, "val_loss": nan},
        }
    )
    assert diverged.doc["variants"]["b"]["diverged"] == 5
    assert "b" not in diverged.finals and "b vs a" not in diverged.paired
    html = _render_all(diverged)
    assert "<td>b</td>" in html


def test_the_figures_follow_the_verdict_metric() -> None:
    h = {
        "loss": RNG.random((30, 3)),
        "val_loss": RNG.random((30, 3)),
        "val_mae": RNG.random((30, 3)),
    }
    g = {k: v + 0.5 for k, v in h.items()}
    data = _hand_made({"a": h, "b": g}, verdicts={"metric": "val_mae", "n_resamples": 200})
    assert data.metric == "val_mae"
    assert list(data.curves) == ["val_mae", "val_loss", "loss"]
    np.testing.assert_array_equal(data.finals["b"][1][1:], np.sort(g["val_mae"][:, -1]))
    ax = data.figure("paired").axes[0]
    assert "val_mae" in ax.get_ylabel()
    np.testing.assert_allclose(data.paired["b vs a"]["diff_mean"], [0.5, 0.5, 0.5])


def test_an_interrupted_run_says_what_was_not_computed() -> None:
    data = _hand_made(
        {"a": {"loss": RNG.random((5, 3))}, "b": {"loss": RNG.random((5, 3))}},
        state="interrupted",
    )
    html = data.html()
    assert "before its analysis" in html and "before its checks" in html


def test_long_trajectories_are_thinned_but_keep_step_one(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    steps = np.arange(1, 1001, dtype=np.int32)
    seeds = 3
    table = pa.table(
        {
            "variant": ["a"] * (seeds * 1000),
            "seed": np.repeat(np.arange(seeds), 1000),
            "kind": ["step"] * (seeds * 1000),
            "step": np.tile(steps, seeds),
            "epoch": np.tile((steps - 1) // 10 + 1, seeds),
            "probe": ["dense#0/kernel_sum"] * (seeds * 1000),
            "value": np.tile(steps.astype(np.float64), seeds) + np.repeat([0.0, 1.0, 2.0], 1000),
        }
    )
    pq.write_table(table, tmp_path / "p.parquet")
    (band,) = _probe_bands([str(tmp_path / "p.parquet")], "step", "/kernel_sum").values()
    assert band.x[0] == 1 and band.x[-1] == 1000 and len(band.x) <= 401
    np.testing.assert_allclose(band.median, band.x + 1.0)  # the middle seed
    (drift,) = _probe_bands(
        [str(tmp_path / "p.parquet")], "step", "/kernel_sum", since_first=True
    ).values()
    np.testing.assert_allclose(drift.high, drift.x - 1.0)


def _diverging() -> dict[str, dict[str, np.ndarray]]:
    """a: fine; b: 2 of 5 seeds blow up (loss 1e27, then inf) while their val_loss stays
    finite but huge (1e6); c: every seed inf from epoch 1."""
    rng = np.random.default_rng(1)
    b_loss, b_val = 1.0 + rng.random((5, 3)), 1.0 + rng.random((5, 3))
    b_loss[:2, 0], b_loss[:2, 1:], b_val[:2] = 1e27, np.inf, 1e6
    c = np.full((5, 3), np.inf)
    return {
        "a": {"loss": 1.0 + rng.random((5, 3)), "val_loss": 1.0 + rng.random((5, 3))},
        "b": {"loss": b_loss, "val_loss": b_val},
        "c": {"loss": c, "val_loss": np.full((5, 3), np.nan)},
    }


def _weight_probes(path: Path) -> str:
    """Per-step kernel sums of 5 seeds of a, b and c; the diverged seeds' (b's first two, all
    of c's) run to 1e27."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    steps = np.arange(1, 7, dtype=np.int32)
    parts = []
    for variant, blown in (("a", 0), ("b", 2), ("c", 5)):
        value = 1.0 + np.tile(steps / 10.0, 5) + np.repeat(np.arange(5) / 100.0, 6)
        value[: blown * 6] = 1e27
        parts.append(
            pa.table(
                {
                    "variant": [variant] * 30,
                    "seed": np.repeat(np.arange(5, dtype=np.int64), 6),
                    "kind": ["step"] * 30,
                    "step": np.tile(steps, 5),
                    "epoch": np.tile((steps - 1) // 2 + 1, 5),
                    "probe": ["dense#0/kernel_sum"] * 30,
                    "value": value,
                }
            )
        )
    pq.write_table(pa.concat_tables(parts), path)
    return str(path)


def test_diverged_seeds_do_not_scale_the_figures_and_are_counted(tmp_path: Path) -> None:
    hand = _hand_made(_diverging())
    data = ReportData(hand.doc, hand.histories, [_weight_probes(tmp_path / "p.parquet")])
    assert data.available() == UNSWEPT[:5]  # curves ... weights (no BN, optimum or checks)
    for kind in ("curves", "paired", "distributions", "weights"):
        for ax in data.figure(kind).axes:
            for low, high in (ax.get_xlim(), ax.get_ylim()):
                assert low > -10 and high < 10, (kind, ax.get_title(), low, high)
    for ax in data.overview().axes:
        assert ax.get_xlim()[1] < 10 and ax.get_ylim()[1] < 10, ax.get_title()
    # only the seeds that never diverged are drawn: b's three, none of c's
    np.testing.assert_array_equal(
        data.finals["b"][1][1:], np.sort(data.histories["b"].values["val_loss"][2:, -1])
    )
    assert "c" not in data.finals and "c" not in data.weights["dense#0"]["sum"]
    legend = data.figure("curves").axes[0].get_legend_handles_labels()[1]
    assert legend == ["a", "b (2 of 5 seeds diverged, left out)", "c (all 5 seeds diverged)"]
    # a's and b's weight bands overlap: a panel per variant, titled with its count
    weights = [ax.get_title().split("\n")[1] for ax in data.figure("weights").axes[:3]]
    assert weights == ["a", "b (2 of 5 seeds diverged, left out)", "c (all 5 seeds diverged)"]
    forest = [t.get_text() for t in data.figure("forest").axes[0].get_yticklabels()]
    assert forest == [
        "c vs a — all seeds diverged",
        f"b vs a — {data.doc['comparisons'][0]['verdict']}",
    ]


def test_the_why_section_and_the_terminal_name_a_diverged_variant() -> None:
    import io

    from rich.console import Console

    from ablab.output.terminal import print_run

    study = {
        "train": {"optimizer": "adam"},
        "variants": {
            "a": {},
            "b": {},
            "c": {"train": {"optimizer": {"name": "sgd", "learning_rate": 1000.0}}},
        },
    }
    data = _hand_made(_diverging(), study_extra=study)
    line = (
        "c: 5 of 5 seeds diverged at epoch 1 (loss inf); learning_rate 1000 "
        "(a: 0.001, adam's default) is the likely cause"
    )
    assert data.doc["divergence"]["c"]["text"] == line
    # b's two seeds reach 1e27 at epoch 1 (finite) and overflow at epoch 2
    assert data.doc["divergence"]["b"]["text"] == "b: 2 of 5 seeds diverged at epoch 2 (loss inf)"
    why = unescape(data.html()).split('<section id="why">')[1].split("</section>")[0]
    assert line in why and "b: 2 of 5 seeds diverged" in why
    out = io.StringIO()
    print_run(Console(file=out, width=300), data.doc)
    assert line in out.getvalue()


def test_timestamps_have_one_format() -> None:
    assert timestamp("2026-12-02T10:19:09.123456") == "2026-12-02 10:19:09 UTC"  # naive = UTC
    later = dt.datetime(2026, 12, 2, 12, 19, 9, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert timestamp(later) == "2026-12-02 10:19:09 UTC"
    assert timestamp(None) == "—"


def _ordinary() -> ReportData:
    """Two ordinary (non-linear-looking) variants with accuracy recorded, 20 seeds, 6 epochs:
    a still improving, b flat."""
    rng = np.random.default_rng(3)
    epoch = np.arange(1, 7, dtype=float)

    def arm(rate: float) -> dict[str, np.ndarray]:
        loss = 1.0 - rate * epoch + rng.normal(0, 0.02, (20, 6))
        acc = 0.5 + rate * epoch + rng.normal(0, 0.02, (20, 6))
        return {"loss": loss, "accuracy": acc, "val_loss": loss + 0.1, "val_accuracy": acc - 0.1}

    return _hand_made({"a": arm(0.05), "b": arm(0.0)})


def test_the_report_plots_every_recorded_metric() -> None:
    data = _ordinary()
    assert list(data.curves) == ["val_loss", "loss", "accuracy", "val_accuracy"]
    fig = data.figure("curves")
    assert [ax.get_ylabel() for ax in fig.axes] == list(data.curves)
    band = data.curves["val_accuracy"]["b"]
    values = data.histories["b"].values["val_accuracy"]
    np.testing.assert_allclose(band.median, np.median(values, axis=0), rtol=1e-12)


def test_an_ordinary_model_has_a_why_in_the_report_and_the_terminal() -> None:
    import io

    from rich.console import Console

    from ablab.output.terminal import print_run

    data = _ordinary()
    a = data.doc["dynamics"]["a"]
    assert a["trend"]["undertrained"] and a["gap"]["median"] == pytest.approx(0.1)
    assert not data.doc["dynamics"]["b"]["trend"]["undertrained"]
    why = unescape(data.html()).split('<section id="why">')[1].split("</section>")[0]
    for shown in ("generalisation gap", "val_loss − loss", "undertrained: more epochs would "
                  "change the answer", "seed sensitivity", "× the effect"):  # fmt: skip
        assert shown in why, shown
    out = io.StringIO()
    print_run(Console(file=out, width=300), data.doc)
    printed = out.getvalue()
    assert "why (training curves, final val_loss)" in printed
    assert "a: still improving at the last epoch" in printed and "b: settled" in printed
