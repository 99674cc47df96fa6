"""Remedies: variants that address a BatchNormalization diagnosis without touching activations.

For every variant with BatchNormalization in an inline layer list, ``with_remedies`` adds:

* ``<v>~momentum0.9`` and ``<v>~momentum0.5`` -- moving statistics that catch up in fewer
  updates (the diagnosis: after u updates they are only 1 - momentum**u of the way);
* ``<v>~batch<2b>`` -- twice the batch size (less noisy batch statistics; the seed answer's
  "batch sizes under 32 are a very bad idea");
* ``<v>~epochs<2e>`` -- twice the epochs (more updates for the moving statistics);
* ``<v>~bn_after_activation`` -- each BatchNormalization moved after the Activation that
  follows it (placement), when there is one and no such variant exists yet.

Each is compared with the baseline like any variant: the seed user's question "what can I
change so that BN helps?" answered with evidence.
"""

from __future__ import annotations

from typing import Any

from ablab.study.schema import Study, VariantSpec


def _is_bn(spec: dict[str, Any]) -> bool:
    return spec.get("layer") == "BatchNormalization"


def _swap_bn_after_activation(layers: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    out = [dict(s) for s in layers]
    changed = False
    i = 0
    while i < len(out) - 1:
        if _is_bn(out[i]) and out[i + 1].get("layer") == "Activation":
            out[i], out[i + 1] = out[i + 1], out[i]
            changed = True
            i += 2
        else:
            i += 1
    return out if changed else None


def remedy_variants(study: Study) -> dict[str, VariantSpec]:
    """The remedy variants for ``study`` (empty if no variant has inline BatchNormalization)."""
    out: dict[str, VariantSpec] = {}
    existing = [study.variant_layers(v) for v in study.variants]
    for name, spec in study.variants.items():
        layers = study.variant_layers(name)
        if layers is None or not any(_is_bn(s) for s in layers):
            continue
        train = study.variant_train(name)
        note = f"remedy for {name}: "
        for momentum in (0.9, 0.5):
            changed = [{**s, "momentum": momentum} if _is_bn(s) else dict(s) for s in layers]
            out[f"{name}~momentum{momentum:g}"] = spec.model_copy(
                update={"layers": changed, "description": note + f"BN momentum {momentum:g}"}
            )
        out[f"{name}~batch{2 * train.batch_size}"] = spec.model_copy(
            update={
                "layers": layers,
                "train": {**spec.train, "batch_size": 2 * train.batch_size},
                "description": note + "twice the batch size",
            }
        )
        out[f"{name}~epochs{2 * train.epochs}"] = spec.model_copy(
            update={
                "layers": layers,
                "train": {**spec.train, "epochs": 2 * train.epochs},
                "description": note + "twice the epochs",
            }
        )
        swapped = _swap_bn_after_activation(layers)
        if swapped is not None and swapped not in existing:
            out[f"{name}~bn_after_activation"] = spec.model_copy(
                update={"layers": swapped, "description": note + "BN after the activation"}
            )
    return out


def with_remedies(study: Study) -> Study:
    """``study`` plus its remedy variants (validated like any study)."""
    extra = remedy_variants(study)
    if not extra:
        return study
    data = study.model_dump()
    data["variants"] = {**data["variants"], **{k: v.model_dump() for k, v in extra.items()}}
    return Study.model_validate(data)
