"""History tables <-> (seed, epoch) arrays."""

from __future__ import annotations

import numpy as np

from ablab.store.records import first_non_finite_epoch, history_table, variant_histories


def test_round_trip_and_divergence_column() -> None:
    seeds = np.array([3, 4])
    values = {
        "loss": np.array([[1.0, 0.5, 0.25], [2.0, np.nan, np.nan]]),
        "val_loss": np.array([[1.5, 0.75, 0.5], [2.5, 3.0, np.nan]]),
    }
    table = history_table("v", seeds, values)
    assert table.num_rows == 6
    assert table.column("epoch").to_pylist() == [1, 2, 3, 1, 2, 3]
    assert table.column("seed").to_pylist() == [3, 3, 3, 4, 4, 4]
    # seed 4's loss is NaN from epoch 2 (1-based): recorded on each of its rows; seed 3: null
    assert table.column("diverged_epoch").to_pylist() == [None] * 3 + [2] * 3
    back = variant_histories(table)["v"]
    np.testing.assert_array_equal(back.seeds, seeds)
    for name, arr in values.items():
        np.testing.assert_array_equal(back.values[name], arr)
    np.testing.assert_array_equal(back.diverged_epoch, [0, 2])


def test_rows_of_several_chunks_are_reassembled_in_seed_order() -> None:
    import pyarrow as pa

    a = history_table("v", np.array([2, 3]), {"loss": np.array([[2.0], [3.0]])})
    b = history_table("v", np.array([0, 1]), {"loss": np.array([[0.0], [1.0]])})
    back = variant_histories(pa.concat_tables([a, b]))["v"]
    np.testing.assert_array_equal(back.seeds, [0, 1, 2, 3])
    np.testing.assert_array_equal(back.values["loss"][:, 0], [0.0, 1.0, 2.0, 3.0])


def test_first_non_finite_epoch_by_hand() -> None:
    h = {
        "loss": np.array([[1.0, 2.0, np.nan], [1.0, 1.0, 1.0]]),
        "val_loss": np.array([[1.0, np.inf, 1.0], [1.0, 1.0, 1.0]]),
    }
    np.testing.assert_array_equal(first_non_finite_epoch(h), [1, -1])
