"""The environment fingerprint (ablab.execution.env) that guards resumes and Ray workers."""

from __future__ import annotations

from pathlib import Path

import ablab
from ablab.execution.env import differing_keys, environment_fingerprint, source_root


def test_the_source_digest_covers_every_subpackage_and_the_templates() -> None:
    # a resume or a Ray worker must be refused when *any* of ablab's code differs, not only
    # the module that computes the digest
    root = source_root()
    assert root == Path(ablab.__file__).resolve().parent
    hashed = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".py", ".j2")}
    for needed in ("engine/program.py", "stats/rule.py", "output/templates/report.html.j2"):
        assert needed in hashed
    assert len(environment_fingerprint()["ablab_source"]) == 16


def test_differing_keys_names_each_difference_once_missing_keys_included() -> None:
    a = {"jax": "0.10.2", "keras": "3.15.1", "xla_flags": ""}
    b = {"jax": "0.10.3", "keras": "3.15.1", "numpy": "2.0"}
    assert differing_keys(a, b) == ["jax", "numpy", "xla_flags"]
    assert differing_keys(a, a) == []
