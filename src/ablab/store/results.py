"""Results files for ``ablab compare FILE``: a long table (variant, seed, metric) read from
CSV or Parquet, with the one bad-input message form."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ablab.errors import InputError


def read_results(path: str | Path) -> pa.Table:
    """A long results table from a .csv or .parquet file (``ablab compare FILE``).

    CSV: ``nan``, ``inf`` and empty cells are read as floats (an empty metric, which is how
    pandas writes NaN, counts as diverged).
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(
            where=where,
            key="(file)",
            expected="an existing .csv or .parquet file",
            got="no such file",
            fix="check the path",
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            from pyarrow import csv

            return csv.read_csv(
                path, convert_options=csv.ConvertOptions(null_values=[""], strings_can_be_null=True)
            )
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(
            where=where,
            key="(file)",
            expected=f"a readable {suffix[1:]} file",
            got=str(exc).splitlines()[0],
            fix="check that the file is complete and in that format",
        ) from exc
    raise InputError(
        where=where,
        key="(file)",
        expected="a .csv or .parquet file",
        got=f"{suffix or 'no'} extension",
        fix="export the results as CSV or Parquet (long format: variant, seed, metric)",
    )
