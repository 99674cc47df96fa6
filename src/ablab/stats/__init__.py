"""Statistics: from per-seed final values to verdicts (pure: arrays in, numbers out, no I/O).

Owns: point estimates (``estimators``), bootstrap intervals (``intervals``), hypothesis tests
and Holm (``hypothesis``), the verdict rule, vectorized over replicates (``rule``), seed
planning by simulating the rule (``planning``), comparisons of a study's variants
(``verdicts``), per-variant summaries (``summary``) and ``ablab.compare`` for results made
anywhere (``compare``).
May import: ``ablab.errors``, ``ablab.study``, ``ablab.store`` (record layouts only).
"""
