"""Records: per (variant, seed, epoch) rows as Arrow tables, and back to (seed, epoch) arrays.

Table ``history`` columns: ``variant`` (string), ``seed`` (int64, the global seed id),
``epoch`` (int32, 1-based like Keras' "Epoch 1/20"), ``diverged_epoch`` (int32, the
1-based first epoch with a non-finite value for that seed, null if none), with early
stopping ``stopped_epoch`` (int32, the 1-based epoch the seed stopped at, null if it ran
every epoch; its later rows repeat that epoch's values), then one float64 column per
History name (``loss``, metrics, ``val_loss``, ``val_<metric>``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_COLUMNS = ("variant", "seed", "epoch", "diverged_epoch", "stopped_epoch")
STOPPED_EPOCH = "stopped_epoch"
"""The engine's per-seed early-stopping epoch among a History's arrays: (seeds,), 0 = none."""


def first_non_finite_epoch(history: dict[str, np.ndarray]) -> np.ndarray:
    """Per seed, the first epoch (0-based) whose loss or any metric is non-finite; -1 if none.

    history: ``{name: (seeds, epochs)}``. Returns (seeds,) int.
    """
    stacked = np.stack(list(history.values()), axis=0)  # (names, seeds, epochs)
    bad = ~np.isfinite(stacked).all(axis=0)  # (seeds, epochs)
    first = np.argmax(bad, axis=1)
    return np.where(bad.any(axis=1), first, -1)


@dataclass
class VariantHistory:
    """One variant's history: ``values[name]`` is (seeds, epochs), rows ordered as ``seeds``."""

    seeds: np.ndarray
    values: dict[str, np.ndarray]

    @property
    def diverged_epoch(self) -> np.ndarray:
        """(seeds,) 1-based first non-finite epoch, 0 where the seed never diverged."""
        return first_non_finite_epoch(self.values) + 1

    @property
    def n_seeds(self) -> int:
        return int(self.seeds.shape[0])


def history_table(variant: str, seeds: np.ndarray, values: dict[str, np.ndarray]) -> pa.Table:
    """Rows (seed, epoch) of one chunk. seeds: (S,); values: {name: (S, E)}, and with early
    stopping ``stopped_epoch``: (S,)."""
    values = dict(values)
    stopped = values.pop(STOPPED_EPOCH, None)
    n_seeds, n_epochs = next(iter(values.values())).shape
    div = first_non_finite_epoch(values) + 1  # 0 = never
    cols: dict[str, pa.Array] = {
        "variant": pa.array([variant] * (n_seeds * n_epochs), pa.string()),
        "seed": pa.array(np.repeat(seeds.astype(np.int64), n_epochs)),
        "epoch": pa.array(np.tile(np.arange(1, n_epochs + 1, dtype=np.int32), n_seeds)),
        "diverged_epoch": pa.array(
            np.repeat(div.astype(np.int32), n_epochs), mask=np.repeat(div == 0, n_epochs)
        ),
    }
    if stopped is not None:
        stop = np.asarray(stopped).astype(np.int32).reshape(-1)
        cols[STOPPED_EPOCH] = pa.array(
            np.repeat(stop, n_epochs), mask=np.repeat(stop == 0, n_epochs)
        )
    for name, arr in values.items():
        cols[name] = pa.array(np.asarray(arr, dtype=np.float64).reshape(-1))
    return pa.table(cols)


def _grid(
    seeds: np.ndarray, row_seeds: np.ndarray, row_epochs: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Long rows (seed, 1-based epoch, value) as a (seeds, epochs) array over the sorted
    ``seeds``; NaN where a row is missing."""
    out = np.full((len(seeds), int(row_epochs.max())), np.nan)
    out[np.searchsorted(seeds, row_seeds), row_epochs - 1] = values
    return out


def variant_histories(table: pa.Table) -> dict[str, VariantHistory]:
    """Invert :func:`history_table` over a whole run: {variant: VariantHistory}, seeds sorted."""
    out: dict[str, VariantHistory] = {}
    if table.num_rows == 0:
        return out
    names = [c for c in table.column_names if c not in (*KEY_COLUMNS, "run_id")]
    variants = table.column("variant")
    seeds_all = table.column("seed").to_numpy()
    epochs_all = table.column("epoch").to_numpy()
    # Arrow compute, not a numpy array of Python strings (one per row: too big at 100k seeds).
    for variant in pc.unique(variants).to_pylist():  # first-seen order
        mask = pc.equal(variants, variant).to_numpy(zero_copy_only=False)
        seeds = np.unique(seeds_all[mask])
        values = {
            name: _grid(
                seeds,
                seeds_all[mask],
                epochs_all[mask],
                table.column(name).to_numpy(zero_copy_only=False)[mask],
            )
            for name in names
        }
        out[str(variant)] = VariantHistory(seeds=seeds, values=values)
    return out


def probe_table(
    variant: str,
    seeds: np.ndarray,
    step_probes: dict[str, np.ndarray],
    epoch_probes: dict[str, np.ndarray],
    steps_per_epoch: int,
) -> pa.Table:
    """Long table of probes: ``variant, seed, kind ("step"|"epoch"), step, epoch, probe, value``.

    step_probes: {name: (seeds, steps)}, step 1 = after the first optimizer step;
    epoch_probes: {name: (seeds, epochs)}, recorded at the end of each epoch (its last step).
    """
    parts = []
    for kind, probes in (("step", step_probes), ("epoch", epoch_probes)):
        for name, arr in probes.items():
            n_seeds, n = arr.shape
            index = np.arange(1, n + 1, dtype=np.int32)
            if kind == "step":
                step, epoch = index, (index - 1) // steps_per_epoch + 1
            else:
                step, epoch = index * steps_per_epoch, index
            parts.append(
                pa.table(
                    {
                        "variant": pa.array([variant] * (n_seeds * n), pa.string()),
                        "seed": pa.array(np.repeat(seeds.astype(np.int64), n)),
                        "kind": pa.array([kind] * (n_seeds * n), pa.string()),
                        "step": pa.array(np.tile(step.astype(np.int32), n_seeds)),
                        "epoch": pa.array(np.tile(epoch.astype(np.int32), n_seeds)),
                        "probe": pa.array([name] * (n_seeds * n), pa.string()),
                        "value": pa.array(np.asarray(arr, dtype=np.float64).reshape(-1)),
                    }
                )
            )
    return pa.concat_tables(parts)


def epoch_probe_arrays(table: pa.Table) -> dict[str, dict[str, np.ndarray]]:
    """Invert the per-epoch part of :func:`probe_table` over a run: ``{variant: {probe:
    (seeds, epochs)}}``, seeds sorted (the seeds that were probed; NaN where a row is missing)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if table.num_rows == 0:
        return out
    table = table.filter(pc.equal(table.column("kind"), "epoch"))
    if table.num_rows == 0:
        return out
    variants = table.column("variant").cast(pa.string()).to_numpy(zero_copy_only=False)
    probes = table.column("probe").cast(pa.string()).to_numpy(zero_copy_only=False)
    seeds_all = table.column("seed").to_numpy()
    epochs_all = table.column("epoch").to_numpy()
    values_all = table.column("value").to_numpy()
    for variant in dict.fromkeys(variants):
        in_variant = variants == variant
        seeds = np.unique(seeds_all[in_variant])
        arrays: dict[str, np.ndarray] = {}
        for name in dict.fromkeys(probes[in_variant]):
            mask = in_variant & (probes == name)
            arrays[str(name)] = _grid(seeds, seeds_all[mask], epochs_all[mask], values_all[mask])
        out[str(variant)] = arrays
    return out
