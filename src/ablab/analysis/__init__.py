"""Analysis of trained variants beyond the verdicts: checks that catch framework bugs, the
"why", and the document of a stored run.

Owns: equivalence / identity-probe / backend checks (``checks``, ``backends``), explanations
-- analytic optimum, BatchNormalization diagnosis (``explain``) -- and the run document that
``ablab show`` / ``ablab report`` read (``document``).
May import: every lower layer (errors, study, store, stats, engine).
"""
