"""Execution: a study becomes a run -- planned, trained cell by cell, stored, analysed, resumable.

Owns: the plan (``plan``), the run and resume pipeline (``pipeline``), the result object
(``result``), progress reporting (``progress``), executors -- local threads (``executors``) and
Ray (``ray_executor``) -- and the environment fingerprint that guards resumes (``env``).
May import: every lower layer; ``result`` reaches ``ablab.output`` lazily for figures.
"""
