"""Remedy variants for BatchNormalization diagnoses."""

from __future__ import annotations

import ablab
from ablab.study.remedies import remedy_variants, with_remedies


def test_seed_study_remedies(seed_study: ablab.Study) -> None:
    extra = remedy_variants(seed_study)
    assert sorted(extra) == sorted(
        f"{v}~{r}"
        for v in ("bn", "bn_after")
        for r in ("momentum0.9", "momentum0.5", "batch64", "epochs40")
    )  # bn's placement remedy is bn_after itself, which the study already has
    layers = extra["bn~momentum0.5"].layers
    assert [s.get("momentum") for s in layers if s["layer"] == "BatchNormalization"] == [0.5]
    study = with_remedies(seed_study)
    assert study.variant_train("bn~batch64").batch_size == 64
    assert study.variant_train("bn~epochs40").epochs == 40
    assert study.variant_train("plain").batch_size == 32 and study.baseline == "plain"


def test_placement_remedy_moves_bn_after_the_activation(seed_study: ablab.Study) -> None:
    only_bn = seed_study.model_copy(
        update={
            "variants": {"plain": seed_study.variants["plain"], "bn": seed_study.variants["bn"]}
        }
    )
    moved = remedy_variants(only_bn)["bn~bn_after_activation"].layers
    assert [s["layer"] for s in moved] == [
        "Dense",
        "Activation",
        "BatchNormalization",
        "Dense",
        "Activation",
    ]


def test_no_bn_no_remedies(seed_study: ablab.Study) -> None:
    plain = seed_study.model_copy(update={"variants": {"plain": seed_study.variants["plain"]}})
    assert remedy_variants(plain) == {} and with_remedies(plain) is plain
