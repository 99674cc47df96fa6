"""The vectorized engine's own properties (fidelity to fit is in test_reference.py)."""

from __future__ import annotations

import numpy as np

import ablab
from ablab.engine.program import VariantProgram, epoch_permutation
from ablab.store.records import first_non_finite_epoch
from tests.conftest import make_program


def test_history_names_and_shapes(seed_programs: dict[str, VariantProgram]) -> None:
    out = seed_programs["plain"].train(np.arange(3, dtype=np.uint32))
    assert sorted(out) == ["data_loss", "loss", "val_data_loss", "val_loss"]
    assert out["loss"].shape == (3, 20) and out["loss"].dtype == np.float32
    # no regulariser: the penalty-free loss is Keras' loss itself (fit's side: test_reference)
    np.testing.assert_allclose(out["data_loss"], out["loss"], rtol=1e-6)
    np.testing.assert_allclose(out["val_data_loss"], out["val_loss"], rtol=1e-6)


def test_identity_activation_changes_nothing(seed_programs: dict[str, VariantProgram]) -> None:
    # From identical initial weights (paired seeds) V1 and V2 of the seed answer must agree.
    ids = np.arange(16, dtype=np.uint32)
    a = seed_programs["plain"].train(ids)
    b = seed_programs["plain_identity"].train(ids)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6)


def test_a_seed_gives_the_same_result_in_any_chunk(
    seed_programs: dict[str, VariantProgram],
) -> None:
    program = seed_programs["bn"]
    big = program.train(np.arange(8, dtype=np.uint32))
    small = program.train(np.array([5], dtype=np.uint32))
    np.testing.assert_allclose(big["val_loss"][5], small["val_loss"][0], rtol=1e-5)


def test_the_same_seeds_give_bit_identical_results_run_to_run(
    seed_programs: dict[str, VariantProgram],
) -> None:
    # Resuming a killed run recomputes cells: the compiled program must be deterministic.
    ids = np.arange(6, dtype=np.uint32)
    for variant in ("plain", "bn"):
        first, second = seed_programs[variant].train(ids), seed_programs[variant].train(ids)
        for name in first:
            np.testing.assert_array_equal(first[name], second[name], err_msg=f"{variant} {name}")


def test_epoch_permutation_is_a_permutation_and_differs_by_epoch_and_seed() -> None:
    p00 = np.asarray(epoch_permutation(0, 0, 90))
    assert sorted(p00.tolist()) == list(range(90))
    assert not np.array_equal(p00, np.asarray(epoch_permutation(0, 1, 90)))
    assert not np.array_equal(p00, np.asarray(epoch_permutation(1, 0, 90)))
    np.testing.assert_array_equal(p00, np.asarray(epoch_permutation(0, 0, 90)))


def test_divergence_is_recorded_not_raised() -> None:
    study = ablab.Study(
        data={"synthetic": {"shape": [50, 4], "std": 100.0}},
        train={
            "loss": "mse",
            "optimizer": {"name": "sgd", "learning_rate": 10.0},
            "epochs": 5,
            "batch_size": 10,
        },
        variants={"a": {"layers": [{"layer": "Dense", "units": 4}]}},
    )
    out = make_program(study, "a").train(np.arange(4, dtype=np.uint32))
    first = first_non_finite_epoch(out)
    assert (first >= 0).all() and (first < 5).all()
