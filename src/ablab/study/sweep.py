"""Sweeps: ``[sweep]`` axes crossed with the variants, expanded into a plain study of arms.

A study with ``[sweep] batch_size = [8, 16, 32]`` and variants ``plain`` and ``bn`` trains six
arms, ``plain@batch_size=8`` ... ``bn@batch_size=32``; every other variant is compared with the
baseline *at the same sweep point* (paired seeds), so a verdict reads "at batch size 8, bn
hurts". The expansion is an ordinary :class:`~ablab.study.schema.Study` whose variants are the arms,
with explicit ``[verdicts] pairs`` and per-point ``[checks] equivalent`` groups; ``arms`` maps
each arm back to its variant and point. Everything downstream (engine, store, verdicts,
report) works on that study unchanged, and a stored run keeps the expanded form (resumable).

An axis key is, in this order of lookup:

* a ``[train]`` key: ``batch_size``, ``epochs``, ``shuffle``, ``optimizer``, ...;
* ``learning_rate`` or ``optimizer.<argument>``: an argument of the variant's optimizer;
* ``params.<name>``, or a bare name in a builder study: a builder parameter;
* ``<LayerClass>.<argument>`` (e.g. ``BatchNormalization.momentum``): that argument of every
  such layer in the variants' inline layer lists (variants without the layer are unchanged).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from ablab.errors import StudyError
from ablab.study.schema import Scalar, Study, SweepArm, TrainSpec, VariantSpec

ARM_SEPARATOR = "@"


def _fmt(value: Scalar) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # shortest round-trip form: 0.001, 1e-05 -- never two values alike
    return str(value)


def point_label(point: dict[str, Scalar]) -> str:
    """``{"batch_size": 8, "learning_rate": 0.001}`` -> ``batch_size=8,learning_rate=0.001``."""
    return ",".join(f"{axis}={_fmt(value)}" for axis, value in point.items())


def arm_name(variant: str, point: dict[str, Scalar]) -> str:
    return f"{variant}{ARM_SEPARATOR}{point_label(point)}"


def sweep_points(study: Study) -> list[dict[str, Scalar]]:
    """Every point of the sweep grid, in axis order (the last axis varies fastest)."""
    axes = list(study.sweep)
    return [
        dict(zip(axes, combo, strict=True)) for combo in itertools.product(*study.sweep.values())
    ]


def _error(study: Study, key: str, expected: str, got: str, fix: str) -> StudyError:
    return StudyError(where=study.source, key=key, expected=expected, got=got, fix=fix)


def _check_axes(study: Study) -> None:
    for axis, values in study.sweep.items():
        if not values:
            raise _error(
                study,
                f"sweep.{axis}",
                "a non-empty list of values",
                "[]",
                f"give at least one value, e.g. {axis} = [8, 16]",
            )
        if len({(type(v).__name__, v) for v in values}) != len(values):
            raise _error(
                study,
                f"sweep.{axis}",
                "distinct values",
                repr(values),
                "list each value once",
            )
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise _error(
                study, f"sweep.{axis}", "finite numbers", repr(bad), "remove inf / nan values"
            )


def _axis_kind(study: Study, axis: str) -> tuple[str, str]:
    """(kind, name): kind is "train", "optimizer", "params" or "layer:<Class>"."""
    if axis in TrainSpec.model_fields:
        return "train", axis
    if axis == "learning_rate":
        return "optimizer", axis
    head, _, rest = axis.partition(".")
    if head == "optimizer" and rest:
        return "optimizer", rest
    if head == "params" and rest:
        if study.model.builder is None:
            raise _error(
                study,
                f"sweep.{axis}",
                "a builder study (params go to [model] builder)",
                "a study with layer lists, where params would change nothing",
                "sweep a [train] key or <LayerClass>.<argument> instead",
            )
        return "params", rest
    if study.model.builder is not None and not rest:
        return "params", axis
    if rest and head[:1].isupper():
        classes = {
            str(spec.get("layer"))
            for v in study.variants
            for spec in (study.variant_layers(v) or [])
        }
        if head in classes:
            return f"layer:{head}", rest
    raise _error(
        study,
        f"sweep.{axis}",
        "a [train] key (batch_size, epochs, ...), learning_rate or optimizer.<argument>, "
        "params.<name> (a builder parameter), or <LayerClass>.<argument> of a layer in the "
        "variants' layer lists",
        repr(axis),
        "rename the axis, e.g. batch_size = [8, 16] or BatchNormalization.momentum = [0.9, 0.99]",
    )


def _apply(
    study: Study, variant: str, point: dict[str, Scalar], kinds: dict[str, tuple[str, str]]
) -> VariantSpec:
    spec = study.variants[variant]
    train = dict(spec.train)
    params = dict(spec.params)
    layers = study.variant_layers(variant)
    layers = None if layers is None else [dict(s) for s in layers]
    optimizer_args: dict[str, Any] = {}
    own_optimizer = spec.train.get("optimizer")
    own_args = dict(own_optimizer) if isinstance(own_optimizer, dict) else {}
    for axis, value in point.items():
        kind, name = kinds[axis]
        if kind == "optimizer" and name in own_args:
            raise _error(
                study,
                f"sweep.{axis}",
                f"an axis that no variant sets itself (variant {variant!r} sets its "
                f"optimizer's {name})",
                repr(own_args[name]),
                f"drop {name} from [variants.{variant}] train.optimizer, or drop the axis",
            )
        if kind.startswith("layer:"):
            cls = kind.split(":", 1)[1]
            own = [s.get(name) for s in spec.layers or [] if s.get("layer") == cls and name in s]
            if own:
                raise _error(
                    study,
                    f"sweep.{axis}",
                    f"an axis that no variant sets itself (variant {variant!r} gives its "
                    f"{cls} {name} = {own[0]!r})",
                    repr(own[0]),
                    f"drop {name} from the {cls} in [variants.{variant}] layers, or the axis",
                )
        if kind == "train":
            if name in spec.train:
                raise _error(
                    study,
                    f"sweep.{axis}",
                    f"an axis that no variant overrides (variant {variant!r} sets "
                    f"train.{name} itself)",
                    repr(spec.train[name]),
                    f"drop {name} from [variants.{variant}] train, or drop the axis",
                )
            train[name] = value
        elif kind == "optimizer":
            optimizer_args[name] = value
        elif kind == "params":
            params[name] = value
        else:  # layer:<Class>
            cls = kind.split(":", 1)[1]
            if layers is not None:
                layers = [{**s, name: value} if s.get("layer") == cls else s for s in layers]
    if optimizer_args:
        base = train.get("optimizer", study.variant_train(variant).optimizer)
        if isinstance(base, str):
            base = {"name": base}
        elif not isinstance(base, dict):
            base = base.model_dump()
        train["optimizer"] = {**base, **optimizer_args}
    update: dict[str, Any] = {"train": train, "params": params}
    if spec.layers is not None or (layers is not None and layers != study.model.layers):
        update["layers"] = layers
    return spec.model_copy(update=update)


def _check_arm_name(study: Study, name: str) -> None:
    """An arm's name is a folder name in the run directory: no path separators, no NUL,
    within file-name limits."""
    if "/" in name or "\\" in name or "\0" in name or len(name.encode()) > 200:
        raise _error(
            study,
            "sweep",
            "axis names and values that make a valid folder name (no / or \\, at most "
            "200 bytes per arm name)",
            repr(name),
            "shorten or rename the axes / values (a builder parameter can take a short "
            "label and look the long value up itself)",
        )


def expand_sweep(study: Study) -> Study:
    """The study with its sweep expanded into arms (the study itself when it has no sweep,
    or was expanded already). Raises StudyError for a bad axis or value."""
    if not study.sweep or study.arms:
        return study
    _check_axes(study)
    kinds = {axis: _axis_kind(study, axis) for axis in study.sweep}
    targets: dict[tuple[str, str], str] = {}
    for axis, target in kinds.items():
        if target in targets:
            raise _error(
                study,
                f"sweep.{axis}",
                "one axis per setting",
                f"{axis!r} and {targets[target]!r} both set {target[0]} {target[1]!r}",
                "keep one of the two axes",
            )
        targets[target] = axis
    points = sweep_points(study)
    variants: dict[str, VariantSpec] = {}
    arms: dict[str, SweepArm] = {}
    for point in points:
        for variant in study.variants:
            name = arm_name(variant, point)
            variants[name] = _apply(study, variant, point, kinds)
            arms[name] = SweepArm(variant=variant, point=point)
    if len(variants) != len(points) * len(study.variants):  # e.g. values "1" and 1
        raise _error(
            study,
            "sweep",
            "values that name distinct arms",
            f"{len(points) * len(study.variants)} arms but only {len(variants)} distinct names",
            'do not mix a value and its string form (1 and "1") in one axis',
        )
    for name in variants:
        _check_arm_name(study, name)
    baseline = str(study.baseline)
    declared = study.comparison_pairs()
    if declared:  # each pair at every point
        pairs = [(arm_name(v, p), arm_name(b, p)) for p in points for v, b in declared]
    else:  # a single variant: each point against the sweep's first point
        pairs = [(arm_name(baseline, p), arm_name(baseline, points[0])) for p in points[1:]]
    checks = study.checks.model_copy(
        update={
            "equivalent": [
                [arm_name(v, p) for v in group] for p in points for group in study.checks.equivalent
            ],
            "identity_probe": (
                [arm_name(v, p) for p in points for v in study.checks.identity_probe]
                if isinstance(study.checks.identity_probe, list)
                else study.checks.identity_probe
            ),
        }
    )
    expanded = study.model_copy(
        update={
            "variants": variants,
            "arms": arms,
            "baseline": arm_name(baseline, points[0]),
            "verdicts": study.verdicts.model_copy(update={"pairs": pairs}),
            "checks": checks,
        }
    )
    try:  # re-validate: names, pairs, groups -- and each arm's train spec
        expanded = Study.model_validate(expanded.model_dump())
    except Exception as exc:  # pragma: no cover - the expansion builds valid studies
        raise _error(study, "sweep", "a valid expanded study", str(exc), "check the axes") from exc
    for name in expanded.variants:
        try:
            expanded.variant_train(name)
        except StudyError as exc:
            field = exc.key.rsplit(".", 1)[-1]
            axis = next((a for a, k in kinds.items() if k[1] == field), ", ".join(study.sweep))
            raise _error(
                study,
                f"sweep.{axis}",
                exc.expected,
                f"{exc.got} at arm {name!r}",
                "use values that [train] accepts",
            ) from exc
    return expanded


def is_swept(study: Study) -> bool:
    return bool(study.arms)


def sweep_effects(
    study: dict[str, Any], comparisons: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The effect of each variant vs its baseline along the sweep: ``{"axes": {axis:
    values}, "metric", "rows": [{"variant", "baseline", "point", "baseline_point", "label",
    "arm", "diff_mean", "ci_low", "ci_high", "rel_diff", "verdict", "n"}]}`` (the baseline
    is at the same point, except in a one-variant sweep: the first point) from a resolved
    study (``Study.resolved()`` / study.json) and its comparisons (``Comparison.to_json()``);
    None for an unswept study.
    Rows follow the sweep grid's order, then the variants'."""
    arms = study.get("arms") or {}
    if not arms:
        return None
    rows = []
    for c in comparisons:
        arm, base = arms.get(c["variant"]), arms.get(c["baseline"])
        if arm is None or base is None:
            continue
        rows.append(
            {
                "variant": arm["variant"],
                "baseline": base["variant"],
                "point": arm["point"],
                "baseline_point": base["point"],
                "label": f"{arm['variant']} vs {base['variant']}"
                + ("" if base["point"] == arm["point"] else f"@{point_label(base['point'])}"),
                "arm": c["variant"],
                **{k: c.get(k) for k in ("diff_mean", "ci_low", "ci_high", "rel_diff", "n")},
                "verdict": c.get("verdict"),
            }
        )
    metric = comparisons[0]["metric"] if comparisons else None
    return {"axes": study.get("sweep") or {}, "metric": metric, "rows": rows}
