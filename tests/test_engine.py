"""The vectorized engine's own properties (fidelity to fit is in test_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

import ablab
from ablab.engine import xla
from ablab.engine.program import VariantProgram, epoch_permutation
from ablab.engine.sizing import choose_chunk_size, seed_chunks, workers_within_budget
from ablab.engine.xla import compiler_options
from ablab.store.records import first_non_finite_epoch
from tests.conftest import make_program


def test_history_names_and_shapes(seed_programs: dict[str, VariantProgram]) -> None:
    out = seed_programs["plain"].train(np.arange(3, dtype=np.uint32))
    assert sorted(out) == ["loss", "val_loss"]
    assert out["loss"].shape == (3, 20) and out["loss"].dtype == np.float32


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


def test_compiler_options_fall_back_when_a_flag_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert compiler_options() == xla.COMPILER_OPTIONS  # this jaxlib takes them all
    bogus = {**xla.COMPILER_OPTIONS, "xla_cpu_no_such_flag_for_ablab": True}
    monkeypatch.setattr(xla, "COMPILER_OPTIONS", bogus)
    compiler_options.cache_clear()
    try:
        assert compiler_options() == xla.BASE_COMPILER_OPTIONS
    finally:
        compiler_options.cache_clear()


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


def test_first_non_finite_epoch_by_hand() -> None:
    h = {
        "loss": np.array([[1.0, 2.0, np.nan], [1.0, 1.0, 1.0]]),
        "val_loss": np.array([[1.0, np.inf, 1.0], [1.0, 1.0, 1.0]]),
    }
    np.testing.assert_array_equal(first_non_finite_epoch(h), [1, -1])


def test_seed_chunks_cover_every_seed_once_with_equal_lengths() -> None:
    chunks = list(seed_chunks(base=10, count=7, chunk=3))
    assert [len(ids) for _, ids, _ in chunks] == [3, 3, 3]
    real = np.concatenate([ids[:n] for _, ids, n in chunks])
    np.testing.assert_array_equal(real, np.arange(10, 17))


@pytest.mark.parametrize(
    ("budget_mb", "explicit", "expected"), [(2048.0, None, 1000), (2048.0, 7, 7), (1e-3, None, 1)]
)
def test_chunk_size_choice(
    seed_programs: dict[str, VariantProgram], budget_mb: float, explicit: int | None, expected: int
) -> None:
    assert choose_chunk_size(seed_programs["bn"], 1000, budget_mb, explicit) == expected
    # 100,000 seeds at the 1,024 cap: 98 chunks of 1,021 (balanced, 58 seeds of padding)
    assert choose_chunk_size(seed_programs["bn"], 100_000, 2048.0) == 1021


def test_workers_within_budget() -> None:
    mb = 2**20
    assert workers_within_budget(2, [100 * mb, 300 * mb], 2048.0) == 2
    assert workers_within_budget(8, [300 * mb], 1000.0) == 3  # the biggest cell sets the bound
    assert workers_within_budget(4, [3000 * mb], 2048.0) == 1  # one cell over budget: one
    assert workers_within_budget(3, [], 2048.0) == 3
