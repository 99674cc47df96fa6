"""Storage: run folders of Parquet cells and versioned JSON, and the DuckDB catalog.

Owns: atomic writes and the strict JSON encoder (``io``), one run's folder (``rundir``), the
catalog and SQL over every run (``catalog``), the Arrow layout of history and probe rows
(``records``) and results files read by ``ablab compare`` (``results``).
May import: ``ablab.errors``, ``ablab.study``.
"""
