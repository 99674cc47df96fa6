"""Terminal output with rich: summary tables, run lists, query results, progress bars."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ablab.output.formatting import fmt, sig, timestamp


def summary_table(
    variants: dict[str, dict[str, Any]], baseline: str | None, metric: str | None = None
) -> Table:
    """One row per variant: seeds, diverged, final ``metric`` mean / median / 5-95 % range
    (default: the summary's headline metric; a variant without it shows dashes)."""
    if metric is None:
        metric = next(iter(variants.values()))["metric"] if variants else "val_loss"
    table = Table(title=f"final {metric} over seeds", title_justify="left")
    table.add_column("variant")
    table.add_column("seeds", justify="right")
    table.add_column("diverged", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("median", justify="right")
    table.add_column("5–95 %", justify="right")
    empty = {"mean": None, "median": None, "q05": None, "q95": None}
    for name, s in variants.items():
        d = (s.get("finals") or {}).get(metric) or s.get(f"final_{metric}") or empty
        label = f"{name} (baseline)" if name == baseline else name
        table.add_row(
            label,
            str(s["n_seeds"]),
            str(s["diverged"]),
            fmt(d["mean"]),
            fmt(d["median"]),
            f"{fmt(d['q05'])} – {fmt(d['q95'])}",
        )
    return table


_VERDICT_STYLE = {"helps": "green", "hurts": "red", "equivalent": "cyan", "inconclusive": "yellow"}


def _margin_title(comparisons: list[dict[str, Any]]) -> str:
    """ "margin ±0.0195 = 0.1 × baseline SD (0.195)", or, when the baselines differ, "margins
    per baseline (0.1 × baseline SD)" -- the rule without any one baseline's numbers."""
    first = comparisons[0]
    margins = {round(c["margin"], 6) for c in comparisons if c["margin"] is not None}
    if len(margins) > 1:
        rules = {str(c.get("margin_rule") or "as set").split(" (")[0] for c in comparisons}
        return f"margins per baseline ({', '.join(sorted(rules))})"
    rule = first.get("margin_rule")
    return f"margin ±{fmt(first['margin'])}" + (f" = {rule}" if rule else "")


def comparison_table(comparisons: list[dict[str, Any]]) -> Table:
    """One row per variant vs the baseline: effect with CI, P(better), Cliff's delta, p,
    divergence (when any), verdict and seeds needed."""
    first = comparisons[0]
    better = "lower" if first["lower_is_better"] else "higher"
    baselines = sorted({c["baseline"] for c in comparisons})
    against = f"vs {baselines[0]}" if len(baselines) == 1 else "each variant vs its own baseline"
    pairing = "paired seeds" if all(c.get("paired", True) for c in comparisons) else "unpaired"
    table = Table(
        title=f"{against} on final {first['metric']} ({better} is better; {pairing}; "
        f"{_margin_title(comparisons)})",
        title_justify="left",
    )
    level = f"{100 * first.get('confidence', 0.95):g}%"
    diverging = any(c.get("diverged") or c.get("baseline_diverged") for c in comparisons)
    columns = ["variant", "n", f"Δ mean [{level} CI]", "Δ %", "P(better)", "Cliff δ", "p (Holm)"]
    columns += ["diverged (var / base)"] if diverging else []
    columns += ["verdict", "seeds needed"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("variant", "verdict") else "right")
    for c in comparisons:
        if c["diff_mean"] is None:
            effect = "—"
        elif c["ci_low"] is None:
            effect = f"{c['diff_mean']:+.4f}"
        else:
            effect = f"{c['diff_mean']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
        rel = "—" if c.get("rel_diff") is None else f"{100 * c['rel_diff']:+.1f}"
        prob = "—" if c["prob_better"] is None else f"{c['prob_better']:.2f}"
        delta = "—" if c.get("cliffs_delta") is None else f"{c['cliffs_delta']:+.2f}"
        style = _VERDICT_STYLE.get(c["verdict"], "")
        needed = "—" if c["seeds_needed"] is None else f"{c['seeds_needed']:,}"
        label = c["variant"] if len(baselines) == 1 else f"{c['variant']} vs {c['baseline']}"
        cells = [label, str(c["n"]), effect, rel, prob, delta, sig(c["p_adjusted"])]
        if diverging:
            div = f"{c.get('diverged', 0)} / {c.get('baseline_diverged', 0)}"
            p_div = c.get("p_diverged_adjusted")
            cells.append(div + (f" (p {sig(p_div)})" if p_div is not None and p_div < 1 else ""))
        verdict = c["verdict"] + (f" ({c['stability']})" if c.get("stability") else "")
        cells += [f"[{style}]{escape(verdict)}[/{style}]", needed]
        table.add_row(*cells)
    return table


def print_reasons(console: Console, comparisons: list[dict[str, Any]]) -> None:
    """Why each verdict, in words, and why a seed count is missing where it is."""
    for c in comparisons:
        label = (
            c["variant"]
            if c["baseline"] == comparisons[0]["baseline"]
            else (f"{c['variant']} vs {c['baseline']}")
        )
        line = f"  {escape(label)}: {c['verdict']} — {escape(c.get('reason') or '')}"
        if c["seeds_needed"] is None and c.get("seeds_needed_reason"):
            line += f"; seeds needed: none ({escape(c['seeds_needed_reason'])})"
        console.print(line, style="dim", soft_wrap=True)


def checks_table(checks: list[dict[str, Any]]) -> Table:
    """One row per check: kind, name, pass/fail, deviations against the tolerance."""
    table = Table(title="checks", title_justify="left")
    for col in (
        "check",
        "kind",
        "result",
        "max abs dev",
        "max rel dev",
        "tolerance",
        "first bad step",
        "note",
    ):
        table.add_column(
            col,
            justify="right" if "dev" in col or col in ("tolerance", "first bad step") else "left",
        )
    for c in checks:
        result = {
            True: "[green]pass[/green]",
            False: "[bold red]FAIL[/bold red]",
            None: "[yellow]skipped[/yellow]",
        }[c["passed"]]
        first = "—" if c["first_bad_step"] is None else str(c["first_bad_step"])
        table.add_row(
            c["name"],
            c["kind"],
            result,
            sig(c["max_abs_dev"]),
            sig(c["max_rel_dev"]),
            f"{c['tolerance']:.0e}",
            first,
            "" if c["passed"] else escape(c["detail"]),
        )
    return table


def explain_lines(explain: dict[str, dict[str, Any]]) -> list[str]:
    """Analytic optimum gaps and BatchNormalization diagnoses, one sentence per finding."""
    lines = []
    for variant, e in explain.items():
        opt = e.get("optimum")
        if opt:
            gap = opt.get("val_gap") or opt.get("train_gap") or {}
            which = "val" if opt.get("val_gap") else "train"
            if gap.get("median") is not None:
                lines.append(
                    f"{variant}: linear, rank ≤ {opt['rank']}: the optimum ({opt['kind']}) has "
                    f"train MSE {opt['train_mse']:.4f}, val MSE {fmt(opt['val_mse'])}; median "
                    f"final {which} gap {gap['median']:+.4f} ({gap['q05']:+.4f} … "
                    f"{gap['q95']:+.4f})"
                )
        for d in e.get("bn") or []:
            lines.append(f"{variant}: {d['text']}")
    return lines


def why_lines(doc: Mapping[str, Any]) -> list[str]:
    """The "why" of a run document, one sentence per finding: the variants with diverged
    seeds (how many, when, and the likely cause), then the analytic optimum gaps and the
    BatchNormalization diagnoses."""
    divergence = [d["text"] for d in (doc.get("divergence") or {}).values()]
    return divergence + explain_lines(doc.get("explain") or {})


def print_why(console: Console, doc: Mapping[str, Any]) -> None:
    """:func:`why_lines`, under a "why" heading (nothing when there is nothing to say)."""
    lines = why_lines(doc)
    if lines:
        console.print("[bold]why[/bold]")
        for line in lines:
            console.print(f"  • {escape(line)}", soft_wrap=True)


def dynamics_lines(doc: Mapping[str, Any]) -> list[str]:
    """The training-curve "why" of every variant (``ablab.analysis.dynamics``): generalisation
    gap, trend at the last epoch, seed sensitivity; one "variant: finding" line each."""
    return [
        f"{variant}: {sentence}"
        for variant, d in (doc.get("dynamics") or {}).items()
        for sentence in d.get("text") or []
    ]


def print_dynamics(console: Console, doc: Mapping[str, Any]) -> None:
    """:func:`dynamics_lines` under a "why (training curves)" heading, when there are any."""
    lines = dynamics_lines(doc)
    if lines:
        metric = next(iter(doc["dynamics"].values()))["metric"]
        console.print(f"[bold]why (training curves, final {escape(metric)})[/bold]")
        for line in lines:
            console.print(f"  • {escape(line)}", soft_wrap=True)


def sweep_table(sweep: dict[str, Any]) -> Table:
    """The effect along the sweep: one row per (variant, sweep point) vs the baseline at the
    same point, one column per axis."""
    axes = list(sweep["axes"])
    table = Table(
        title=f"sweep: effect on final {sweep['metric']} vs the baseline at each point",
        title_justify="left",
    )
    table.add_column("variant")
    for axis in axes:
        table.add_column(axis, justify="right")
    for col in ("Δ mean [CI]", "Δ %", "verdict"):
        table.add_column(col, justify="left" if col == "verdict" else "right")
    rows = sorted(sweep["rows"], key=lambda r: r["variant"])  # stable: grid order per variant
    for r in rows:
        effect = (
            "—"
            if r["diff_mean"] is None
            else f"{r['diff_mean']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        )
        rel = "—" if r.get("rel_diff") is None else f"{100 * r['rel_diff']:+.1f}"
        table.add_row(
            escape(r["label"]),
            *(str(r["point"].get(a, "")) for a in axes),
            effect,
            rel,
            f"[{_VERDICT_STYLE.get(r['verdict'], '')}]{r['verdict']}[/]",
        )
    return table


def recorded_metrics(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every History name the summaries hold final values of, in first-seen order."""
    names: dict[str, None] = {}
    for s in variants.values():
        names.update(dict.fromkeys(s.get("finals") or {}))
    return list(names)


def print_summaries(console: Console, doc: Mapping[str, Any], all_metrics: bool = False) -> None:
    """The final values of the verdict metric (``all_metrics``: one table per recorded
    metric, the verdict metric first), then why the verdict metric is not val_loss."""
    metric = doc.get("verdict_metric")
    names = [metric] if metric else [None]
    if all_metrics:
        names += [n for n in recorded_metrics(doc["variants"]) if n != metric]
    for name in names:
        console.print(summary_table(doc["variants"], doc.get("baseline"), name))
    if doc.get("metric_note"):
        console.print(f"note: {escape(doc['metric_note'])}", soft_wrap=True)


def print_comparisons(console: Console, doc: Mapping[str, Any]) -> None:
    """The comparison table (its footer: the verdict metric's warning), each verdict's
    reason and the rule."""
    table = comparison_table(doc["comparisons"])
    if doc.get("metric_warning"):
        table.caption = f"[yellow]warning: {escape(doc['metric_warning'])}[/yellow]"
        table.caption_justify = "left"
    console.print(table)
    print_reasons(console, doc["comparisons"])
    console.print(f"verdict rule: {doc['verdict_rule']}", style="dim")


def print_compare(console: Console, doc: Mapping[str, Any]) -> None:
    """``ablab compare``: the summary and comparison tables of ``ablab run``, and notes."""
    console.print(summary_table(doc["variants"], doc["baseline"], doc.get("metric")))
    print_comparisons(console, doc)
    for note in doc.get("notes", []):
        console.print(f"note: {escape(note)}", soft_wrap=True)


def print_run(console: Console, doc: Mapping[str, Any], all_metrics: bool = False) -> None:
    """The summary ``ablab run`` prints: tables (``all_metrics``: the final values of every
    recorded metric), wall time, throughput, where it is stored."""
    print_summaries(console, doc, all_metrics)
    if doc.get("comparisons"):
        print_comparisons(console, doc)
    if doc.get("sweep") and doc["sweep"]["rows"]:
        console.print(sweep_table(doc["sweep"]))
    if doc.get("checks"):
        console.print(checks_table(doc["checks"]))
    print_why(console, doc)
    print_dynamics(console, doc)
    n_runs = sum(v["n_seeds"] for v in doc["variants"].values())
    if doc.get("wall_s") is not None:
        parts = []
        if doc.get("compile_s") is not None:
            parts.append(f"compile {doc['compile_s']:.1f} s")
        if doc.get("train_s"):
            trained = doc["runs_per_s"] * doc["wall_s"]  # this session's seeds (a resume: fewer)
            parts.append(
                f"training {doc['train_s']:.2f} s = {trained / doc['train_s']:,.0f} runs/s"
            )
        console.print(
            f"{n_runs} runs in {doc['wall_s']:.2f} s from the start "
            f"({doc['runs_per_s']:.0f} runs/s end to end"
            + (f"; {', '.join(parts)}" if parts else "")
            + ")",
            soft_wrap=True,
        )
    console.print(f"stored in {doc['run_dir']}  (run id {doc['run_id']})")


def print_show(console: Console, doc: Mapping[str, Any], all_metrics: bool = False) -> None:
    """``ablab show RUN`` (``all_metrics``: a final-value table per recorded metric)."""
    env = doc["environment"]["versions"]
    created = timestamp(doc["created_at"])
    console.print(f"[bold]{doc['name']}[/bold]  run {doc['run_id']}  created {created}")
    console.print(
        f"state: {doc['state']} ({doc['cells_done']}/{doc['cells_total']} cells)  "
        f"keras {env.get('keras')}  jax {env.get('jax')}  python {env.get('python')}"
    )
    if doc["variants"]:
        print_run(console, doc, all_metrics)
    else:
        console.print("no finished cells")
    if doc.get("resumable"):
        console.print(
            f"this run is {doc['state']}: finish it with `ablab run --resume {doc['run_id']}`",
            style="yellow",
        )


def runs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="runs", title_justify="left")
    table.add_column("run_id", no_wrap=True)
    for col in ("state", "variants", "seeds", "cells", "wall_s", "runs/s"):
        table.add_column(col, justify="left" if col == "state" else "right")
    for r in rows:
        table.add_row(
            r["run_id"],
            r["state"] or "",
            str(len(r["variants"] or [])),
            str(r["seeds"]),
            f"{r['cells_done']}/{r['cells_total']}",
            fmt(r["wall_s"], 2),
            fmt(r["runs_per_s"], 0),
        )
    return table


def query_table(columns: list[str], rows: list[tuple[Any, ...]], limit: int = 200) -> Table:
    table = Table()
    for c in columns:
        table.add_column(c)
    for row in rows[:limit]:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more rows not shown (use --json for all)"
    return table


class RichProgress:
    """Progress bars for a run (one per variant: compile, then its seed chunks; one for the
    checks); a :class:`ablab.execution.pipeline.Progress` and an
    :class:`ablab.analysis.checks.CheckProgress`."""

    def __init__(self, console: Console) -> None:
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.__exit__(*exc)  # type: ignore[arg-type]

    def variant_started(self, variant: str, chunks: int, chunk_size: int) -> None:
        self._tasks[variant] = self._bars.add_task(
            f"{variant:<16}", total=chunks, note=f"compiling ({chunk_size} seeds/chunk)"
        )

    def compiled(self, variant: str, seconds: float) -> None:
        note = f"compiled in {seconds:.1f} s" if seconds else "model.fit per seed"
        self._bars.update(self._tasks[variant], note=note)

    def chunk_done(self, variant: str, chunk: int, seeds: int) -> None:
        self._bars.advance(self._tasks[variant])

    def checks_started(self, total: int) -> None:
        self._tasks["checks"] = self._bars.add_task(f"{'checks':<16}", total=total, note="")

    def check_done(self, label: str) -> None:
        self._bars.update(self._tasks["checks"], advance=1, note=label)
