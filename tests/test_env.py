"""The environment fingerprint (ablab.execution.env) that guards resumes and Ray workers."""

from __future__ import annotations

from pathlib import Path

import pytest

import ablab
from ablab._source import source_root
from ablab.execution.env import cpu_model, differing_keys, environment, environment_fingerprint


def test_the_source_digest_covers_every_subpackage_and_the_templates() -> None:
    # a resume or a Ray worker must be refused when *any* of ablab's code differs, not only
    # the module that computes the digest
    root = source_root()
    assert root == Path(ablab.__file__).resolve().parent
    kinds = (".py", ".j2", ".cc")
    hashed = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in kinds}
    needed = ("engine/program.py", "stats/rule.py", "output/templates/report.html.j2")
    for name in (*needed, "engine/small_products.cc"):
        assert name in hashed
    assert len(environment_fingerprint()["ablab_source"]) == 16


def test_the_fingerprint_records_the_lowerings_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lowerings sum in their own float32 order (and ``small`` runs only where its C++
    kernel builds): a resume or a Ray worker with others would not compute the same bits."""
    from ablab.engine import small_products

    monkeypatch.setenv("ABLAB_LOWERINGS", "conv,pool")
    fp = environment_fingerprint()
    assert (fp["lowerings"], fp["small_products"]) == ("conv,pool", "off")
    monkeypatch.setenv("ABLAB_LOWERINGS", "0")
    assert environment_fingerprint()["lowerings"] == ""
    monkeypatch.setattr(small_products, "available", lambda: True)
    monkeypatch.setattr(small_products, "numerics", lambda: "mul-add")
    monkeypatch.setenv("ABLAB_LOWERINGS", "dense,small")
    fp = environment_fingerprint()  # and how its kernel rounds: fused multiply-adds or not
    assert (fp["lowerings"], fp["small_products"]) == ("dense,small", "mul-add")


def test_differing_keys_names_each_difference_once_missing_keys_included() -> None:
    a = {"jax": "0.10.2", "keras": "3.15.1", "xla_flags": ""}
    b = {"jax": "0.10.3", "keras": "3.15.1", "numpy": "2.0"}
    assert differing_keys(a, b) == ["jax", "numpy", "xla_flags"]
    assert differing_keys(a, a) == []


def test_the_data_digest_covers_sample_weights_and_validation_rows(tmp_path: Path) -> None:
    import hashlib

    import numpy as np

    from ablab.execution.env import data_digest, study_data_digest

    x, y = np.arange(8, dtype=np.float32).reshape(4, 2), np.ones((4, 1), np.float32)
    old = hashlib.sha256()  # the digest runs stored before weights counted have
    for a in (x, y):
        old.update(f"{a.dtype.str}{a.shape}".encode())
        old.update(a.data)
    assert data_digest(x, y) == old.hexdigest()[:24]  # stored plain runs still resume

    def study(weights: str, val_target: str) -> ablab.Study:
        for name, col in (("train.csv", weights), ("val.csv", val_target)):
            rows = ["a,t,w"] + [f"{i},{i % 2},{col}" for i in range(6)]
            (tmp_path / name).write_text("\n".join(rows) + "\n")
        val = {"path": str(tmp_path / "val.csv"), "target": "t", "sample_weight": "w"}
        data = {"path": str(tmp_path / "train.csv"), "target": "t", "sample_weight": "w"}
        return ablab.Study(
            data={**data, "validation": val},
            train={"loss": "mse"},
            variants={"a": {"layers": [{"layer": "Dense", "units": 1}]}},
            source="<test>",
        )

    from ablab.engine.data import load_dataset

    digests = set()
    for weights, val_w in (("1", "1"), ("2", "1"), ("1", "2")):
        s = study(weights, val_w)
        digests.add(study_data_digest(s, load_dataset(s)))
    assert len(digests) == 3  # a changed sample_weight or validation source is noticed


def test_the_cpu_model_comes_from_cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks and the run document name the CPU: Linux's first non-empty ``model name``
    line, else ``platform.processor()``, else None."""
    import platform

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "processor\t: 1\nmodel name\t: another\n"
    )
    assert cpu_model(str(info)) == "Intel(R) Xeon(R) Processor"
    monkeypatch.setattr(platform, "processor", lambda: "x86_64")
    assert cpu_model(str(tmp_path / "missing")) == "x86_64"
    info.write_text("processor\t: 0\nmodel name\t:\n")  # listed empty: the fallback
    assert cpu_model(str(info)) == "x86_64"
    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n")  # ARM
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert cpu_model(str(info)) is None
    assert "cpu_model" in environment()
