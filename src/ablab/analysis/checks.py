"""Invariance checks: what must be equal is compared, so a framework bug is flagged, not believed.

Kinds:

* ``equivalence`` -- variants declared equivalent (``[checks] equivalent``), from identical
  initial weights (paired seeds), must follow the same per-step trajectory: the running
  loss after every batch and every shared trainable weight (matched by stable id).
* ``identity_probe`` -- a variant with ``Activation('linear')`` inserted after every layer
  must follow the variant's own trajectory (the seed question's TF 1.14 bug was this).
* ``fidelity`` -- plain ``model.fit`` on the JAX backend, same initial weights and data
  order, must reproduce the engine's per-epoch history.
* ``cross_backend`` -- the same with ``KERAS_BACKEND=torch`` / ``tensorflow``.

Trajectory deviation (equivalence, identity probe): per element ``|a - b| / max(|a|, |b|, 1)``
-- relative for values above 1, absolute below -- maximised over seeds and weights; a check
passes when the maximum is within ``tolerance``; ``first_bad_step`` is the first optimizer
step (0 = the initial weights) where it is exceeded. Backend deviation: per epoch
``|backend - engine| / max(|engine|, 1)`` over every History name (a non-finite value counts
as infinite); ``first_bad_step`` is then the first epoch (1-based) over tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ablab.analysis.backends import BACKENDS, available, run_backends
from ablab.engine.build import build_program
from ablab.engine.compiling import Job, compile_programs
from ablab.engine.program import STOPPED_EPOCH, VariantProgram
from ablab.engine.reference import worker_problem
from ablab.engine.sizing import default_workers
from ablab.errors import InputError
from ablab.study.loading import load_study
from ablab.study.schema import Study
from ablab.study.sweep import expand_sweep

IDENTITY = {"layer": "Activation", "activation": "linear"}


@dataclass
class CheckResult:
    """One check. ``passed`` is None when it could not run (``detail`` says why)."""

    name: str
    kind: str
    passed: bool | None
    max_abs_dev: float | None
    max_rel_dev: float | None
    first_bad_step: int | None
    tolerance: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def skipped(cls, name: str, kind: str, tolerance: float, why: str) -> CheckResult:
        """A check that could not run (``passed`` None); ``why`` is shown as its detail."""
        return cls(name, kind, None, None, None, None, tolerance, why)

    @classmethod
    def failed(cls, name: str, kind: str, tolerance: float, why: str) -> CheckResult:
        """A check that failed without deviations to report (an error, a shape mismatch)."""
        return cls(name, kind, False, None, None, None, tolerance, why)


def check_seeds(study: Study) -> np.ndarray:
    """The K seeds checks train: spread evenly over the study's seeds (first and last included)."""
    k = min(study.checks.seeds, study.seeds.count)
    picks = np.linspace(0, study.seeds.count - 1, k).round().astype(np.int64)
    return (study.seeds.base + np.unique(picks)).astype(np.uint32)


def trajectory_deviation(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], tolerance: float
) -> tuple[float, float, int | None, int]:
    """Compare two ``VariantProgram.trajectories`` on their shared keys.

    Returns (max abs dev, max rel dev, first bad step or None, number of shared tensors).
    """
    shared = [k for k in a if k in b]
    steps = a["loss"].shape[1]
    per_step_rel = np.zeros(steps + 1)
    max_abs = 0.0
    for key in shared:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        if x.shape != y.shape:
            per_step_rel[:] = np.inf
            continue
        diff = np.abs(x - y)
        rel = diff / np.maximum(np.maximum(np.abs(x), np.abs(y)), 1.0)
        # NaN in one arm only is a failure; NaN in both arms is agreement
        rel = np.where(np.isnan(x) & np.isnan(y), 0.0, np.nan_to_num(rel, nan=np.inf))
        axes = tuple(i for i in range(rel.ndim) if i != 1)
        step_rel = np.max(rel, axis=axes) if rel.size else np.zeros(rel.shape[1])
        if key == "loss":  # loss after step j+1 (no step-0 value)
            per_step_rel[1:] = np.maximum(per_step_rel[1:], step_rel)
        else:
            per_step_rel = np.maximum(per_step_rel, step_rel)
        max_abs = max(max_abs, float(diff.max()) if diff.size else 0.0)
    bad = np.flatnonzero(~(per_step_rel <= tolerance))
    first = int(bad[0]) if bad.size else None
    return max_abs, float(np.max(per_step_rel)), first, len(shared)


def _all_trajectories(
    programs: list[VariantProgram], seeds: np.ndarray
) -> tuple[dict[int, dict[str, np.ndarray]], dict[VariantProgram, VariantProgram]]:
    """``id(program) -> program.trajectories(seeds)``. Each program's trajectory program
    (it returns the initial weights too) is compiled first, up to ``default_workers()`` at
    once and each distinct one once (``ablab.engine.compiling``: the programs of variants a
    check declares equivalent are often the same program); then run, a few seeds each. A
    proven twin (:func:`twins`) is neither lowered nor compiled again: it runs its
    original's compiled program on its own data. Also returns ``twin -> original`` for
    the twins that did."""
    unique = list({id(p): p for p in programs}.values())
    proven = twins(unique)
    jobs = _trajectory_jobs(unique, len(seeds), proven)
    compile_programs(jobs, min(len(jobs), default_workers()))
    shared = {}
    for twin, original in proven.items():
        if twin.adopt_from(original, "trajectory", len(seeds)):
            shared[twin] = original
    return {id(p): p.trajectories(seeds) for p in unique}, shared


def twins(programs: list[VariantProgram]) -> dict[VariantProgram, VariantProgram]:
    """``program -> the earlier program it is proven to be`` (``VariantProgram.same_program_as``:
    identical training programs of Keras' own objects, with the same variables) for each
    program in ``programs`` that has one. The
    flagship's ``plain_identity`` is ``plain``, ``bn_after`` is ``bn``: their checks' programs
    are lowered and compiled once (~0.5-1 s of lowering each, on a cold run while the seeds
    train)."""
    out: dict[VariantProgram, VariantProgram] = {}
    originals: list[VariantProgram] = []
    for p in {id(p): p for p in programs}.values():
        original = next((o for o in originals if p.same_program_as(o)), None)
        if original is None:
            originals.append(p)
        else:
            out[p] = original
    return out


def _trajectory_jobs(
    programs: list[VariantProgram],
    n: int,
    proven: dict[VariantProgram, VariantProgram] | None = None,
) -> list[Job]:
    """The trajectory programs to compile: one per program, none for a proven twin
    (``proven``: :func:`twins` of ``programs``, worked out here when not given)."""
    unique = list({id(p): p for p in programs}.values())
    proven = twins(unique) if proven is None else proven
    return [(p, "trajectory", n) for p in unique if p not in proven]


def _equivalent_programs(study: Study, programs: dict[str, VariantProgram]) -> list[VariantProgram]:
    """The programs of every variant in the study's declared equivalence groups."""
    return [programs[v] for group in study.checks.equivalent for v in group]


def equivalence_jobs(study: Study, programs: dict[str, VariantProgram]) -> list[Job]:
    """The programs the study's declared equivalence checks will compile (``run_checks``):
    to compile ahead, while the seeds train (``ablab.engine.compiling.Prefetch``)."""
    needed = _equivalent_programs(study, programs)
    return _trajectory_jobs(needed, len(check_seeds(study)))


def _trajectory_check(
    name: str,
    kind: str,
    ta: dict[str, np.ndarray],
    tb: dict[str, np.ndarray],
    seeds: np.ndarray,
    tolerance: float,
    same_program: bool = False,
) -> CheckResult:
    if ta["loss"].shape != tb["loss"].shape:
        return CheckResult.failed(
            name,
            kind,
            tolerance,
            f"different step counts {ta['loss'].shape[1]} vs {tb['loss'].shape[1]}"
            " (batch size, epochs or rows differ)",
        )
    max_abs, max_rel, first, n_shared = trajectory_deviation(ta, tb, tolerance)
    detail = (
        f"{len(seeds)} seeds x {ta['loss'].shape[1]} steps; loss + "
        f"{n_shared - 1} shared weight tensors"
    )
    if same_program:
        detail += "; one compiled program (their training programs lower to identical StableHLO)"
    return CheckResult(name, kind, first is None, max_abs, max_rel, first, tolerance, detail)


def identity_probed(study: Study, variant: str) -> tuple[Study, str]:
    """``study`` plus a variant ``<variant>+identity``: Activation('linear') after every layer."""
    layers = study.variant_layers(variant)
    if layers is None:
        msg = f"the identity probe needs an inline layer list; variant {variant!r} uses a builder"
        raise ValueError(msg)
    probed = [x for spec in layers for x in (spec, dict(IDENTITY))]
    name = f"{variant}+identity"
    spec = study.variants[variant].model_copy(update={"layers": probed})
    return study.model_copy(update={"variants": {**study.variants, name: spec}}), name


def _no_progress(label: str) -> None:
    pass


def equivalence_checks(
    study: Study,
    programs: dict[str, VariantProgram],
    done: Callable[[str], None] = _no_progress,
) -> list[CheckResult]:
    seeds = check_seeds(study)
    tol = study.checks.tolerance
    needed = _equivalent_programs(study, programs)
    traj, shared = _all_trajectories(needed, seeds)
    out = []
    for group in study.checks.equivalent:
        first = group[0]
        for other in group[1:]:
            a, b = programs[first], programs[other]
            out.append(
                _trajectory_check(
                    f"{first} ≡ {other}",
                    "equivalence",
                    traj[id(a)],
                    traj[id(b)],
                    seeds,
                    tol,
                    same_program=a is not b and shared.get(a, a) is shared.get(b, b),
                )
            )
            done(out[-1].name)
    return out


def identity_probe_checks(
    study: Study,
    programs: dict[str, VariantProgram],
    variants: list[str],
    done: Callable[[str], None] = _no_progress,
) -> list[CheckResult]:
    seeds = check_seeds(study)
    tol = study.checks.tolerance
    planned: list[tuple[str, CheckResult | tuple[VariantProgram, VariantProgram]]] = []
    for variant in variants:
        name = f"{variant} ≡ {variant} + identity after every layer"
        try:
            probed_study, probed = identity_probed(study, variant)
        except ValueError as exc:
            planned.append((name, CheckResult.skipped(name, "identity_probe", tol, str(exc))))
            continue
        planned.append((name, (programs[variant], build_program(probed_study, probed))))
    pairs = [p for _, entry in planned if isinstance(entry, tuple) for p in entry]
    traj, _ = _all_trajectories(pairs, seeds)
    out = []
    for name, entry in planned:
        if isinstance(entry, tuple):
            a, b = entry
            entry = _trajectory_check(name, "identity_probe", traj[id(a)], traj[id(b)], seeds, tol)
        out.append(entry)
        done(name)
    return out


def backend_checks(
    study: Study,
    programs: dict[str, VariantProgram],
    backends: list[str],
    callbacks: list[dict[str, Any]] | None = None,
) -> list[CheckResult]:
    """model.fit under each backend vs the engine, for the check seeds of every variant.

    Each variant's check stands on its own: a variant whose model a fresh interpreter cannot
    import is skipped, one whose worker fails (raises, dies, times out) fails with that
    cause, and neither touches the other variants' checks.
    """
    seeds = check_seeds(study)
    problems = {v: worker_problem(p.prepared.model) for v, p in programs.items()}
    shipped = {v: p for v, p in programs.items() if problems[v] is None}
    per_variant = {v: [int(s) for s in seeds] for v in shipped}
    engine = {v: p.train(seeds) for v, p in shipped.items()}
    runnable = [b for b in backends if available(b)] if shipped else []
    results = run_backends(shipped, per_variant, runnable, callbacks=callbacks) if runnable else {}
    out = []
    for backend in backends:
        kind = "fidelity" if backend == "jax" else "cross_backend"
        tol = (
            study.checks.fidelity_tolerance if backend == "jax" else study.checks.backend_tolerance
        )
        for variant in programs:
            name = f"{variant} @ {backend} model.fit"
            problem = problems[variant]
            if problem is not None:
                out.append(CheckResult.skipped(name, kind, tol, f"skipped: {problem}"))
                continue
            if backend not in results:
                why = f"skipped: {backend} is not installed (pip install 'ablab[backends]')"
                out.append(CheckResult.skipped(name, kind, tol, why))
                continue
            res = results[backend]
            keys = {s: f"{variant}/{s}" for s in per_variant[variant]}
            failed = [(s, res["errors"][k]) for s, k in keys.items() if k in res["errors"]]
            if failed:
                seed, error = failed[0]
                why = f"model.fit worker on {backend} failed (seed {seed}): {error}"
                out.append(CheckResult.failed(name, kind, tol, why))
                continue
            histories = {s: res["histories"][k] for s, k in keys.items()}
            out.append(_compare_histories(name, kind, tol, engine[variant], seeds, histories))
    return out


def _compare_histories(
    name: str,
    kind: str,
    tol: float,
    engine: dict[str, np.ndarray],
    seeds: np.ndarray,
    other: dict[int, dict[str, list[float]]],
) -> CheckResult:
    engine = dict(engine)
    stopped = engine.pop(STOPPED_EPOCH, None)  # early stopping: (seeds,) 1-based, 0 = never
    epochs = next(iter(engine.values())).shape[1]
    per_epoch = np.zeros(epochs)
    max_abs = 0.0
    for i, seed in enumerate(seeds):
        hist = other[int(seed)]
        missing = set(engine) ^ set(hist)
        if missing:
            return CheckResult.failed(name, kind, tol, f"History names differ: {sorted(missing)}")
        ran = {len(v) for v in hist.values()}  # fit's History ends where EarlyStopping stopped
        mine = int(stopped[i]) if stopped is not None and int(stopped[i]) else epochs
        if ran != {mine}:
            why = f"seed {int(seed)} trained {sorted(ran)} epochs there, {mine} in the engine"
            return CheckResult.failed(name, kind, tol, why)
        for key, values in hist.items():
            b = np.asarray(values, dtype=np.float64)
            e = engine[key][i, :mine].astype(np.float64)
            both_nan = np.isnan(b) & np.isnan(e)  # diverged in both: they agree
            diff = np.where(both_nan, 0.0, np.nan_to_num(np.abs(b - e), nan=np.inf))
            # relative above 1, absolute below (as for trajectories); one-sided NaN fails
            rel = diff / np.maximum(np.abs(np.nan_to_num(e)), 1.0)
            per_epoch[:mine] = np.maximum(per_epoch[:mine], rel)
            max_abs = max(max_abs, float(diff.max()))
    bad = np.flatnonzero(~(per_epoch <= tol))
    first = int(bad[0]) + 1 if bad.size else None
    return CheckResult(
        name,
        kind,
        first is None,
        max_abs,
        float(per_epoch.max()),
        first,
        tol,
        f"{len(seeds)} seeds x {epochs} epochs, every History name",
    )


class CheckProgress(Protocol):
    """What ``run_checks`` tells whoever is watching (progress bars)."""

    def checks_started(self, total: int) -> None: ...
    def check_done(self, label: str) -> None: ...


def run_checks(
    study: Study,
    programs: dict[str, VariantProgram],
    *,
    backends: list[str] | None = None,
    identity_probe: bool | list[str] | None = None,
    callbacks: list[dict[str, Any]] | None = None,
    progress: object | None = None,
) -> list[CheckResult]:
    """Every check the study declares (or the overrides given) on already-built programs.

    backends: None = the study's ``[checks] backends`` (none if not declared).
    identity_probe: None = the study's ``[checks] identity_probe``.
    progress: told the number of steps (one per equivalence, per probed variant, and one for
    all backends' model.fit runs) and each step as it ends.
    """
    probe = study.checks.identity_probe if identity_probe is None else identity_probe
    probe_variants = list(programs) if probe is True else list(probe or [])
    if backends is None and study.checks.backends is not None:
        backends = list(study.checks.backends)
    # a progress object written for an older ablab may lack these: then it is not told
    done = getattr(progress, "check_done", _no_progress)
    started = getattr(progress, "checks_started", None)
    if started is not None:
        pairs = sum(len(group) - 1 for group in study.checks.equivalent)
        started(pairs + len(probe_variants) + (1 if backends else 0))
    out = equivalence_checks(study, programs, done)
    out += identity_probe_checks(study, programs, probe_variants, done)
    if backends:
        out += backend_checks(study, programs, list(backends), callbacks)
        done(f"model.fit on {', '.join(backends)}")
    return out


def all_passed(results: list[CheckResult]) -> bool:
    """No check failed (skipped ones do not count as failures)."""
    return all(r.passed is not False for r in results)


def check(
    study: Study | str | Path,
    *,
    backends: list[str] | None = None,
    identity_probe: bool | None = None,
    seeds: int | None = None,
    progress: CheckProgress | None = None,
) -> list[CheckResult]:
    """Run a study's checks (``ablab check STUDY``): its declared equivalences, identity
    probes and ``model.fit`` on each Keras backend, at every sweep point.

    ``backends``: default the study's ``[checks] backends``, else all of
    :data:`ablab.analysis.backends.BACKENDS`; ``identity_probe`` / ``seeds`` override the
    study's ``[checks]``. Raises ``ablab.InputError`` on a bad option.
    """
    spec = load_study(study) if isinstance(study, (str, Path)) else study
    where = spec.source
    spec = expand_sweep(spec)  # a swept study is checked at every point
    if seeds is not None:
        if seeds < 1:
            raise InputError(
                where=where,
                key="--seeds",
                expected="a positive seed count",
                got=repr(seeds),
                fix="pass --seeds K with K >= 1",
            )
        spec = spec.model_copy(update={"checks": spec.checks.model_copy(update={"seeds": seeds})})
    chosen: list[str]
    if backends is None:
        chosen = list(spec.checks.backends if spec.checks.backends is not None else BACKENDS)
    else:
        chosen = list(backends)
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown:
        raise InputError(
            where=where,
            key="--backends",
            expected=f"Keras backends among {list(BACKENDS)}, or 'none'",
            got=repr(unknown),
            fix="e.g. --backends jax,torch",
        )
    programs = {v: build_program(spec, v) for v in spec.variants}
    return run_checks(
        spec, programs, backends=chosen, identity_probe=identity_probe, progress=progress
    )
