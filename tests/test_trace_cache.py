"""Traced programs kept between runs (ablab.engine.trace_cache): a second build of the same
program loads its trace instead of tracing, to the same bits; anything the trace depends on
changes the key; the user's code is never kept; off with the compilation cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ablab
from ablab.engine import trace_cache
from ablab.engine.build import build_program
from ablab.engine.program import VariantProgram
from tests.conftest import TINY_STUDY

SEEDS = np.arange(4, dtype=np.uint32)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder of the test's own; the traces go to <it>/<versions>/traces."""
    monkeypatch.setenv("ABLAB_COMPILATION_CACHE", str(tmp_path / "cache"))
    folder = trace_cache.trace_dir()
    assert folder is not None
    return folder


def _study(tmp_path: Path, text: str = TINY_STUDY) -> ablab.Study:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return ablab.load_study(path)


def _no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced although the trace is stored")

    monkeypatch.setattr(VariantProgram, "_all_seeds", refuse)


def test_a_stored_trace_is_loaded_instead_of_traced_and_gives_the_same_bits(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed study's warm run traced 12 programs again (~3 s of 14 s, issue #17)."""
    study = _study(tmp_path)
    first = build_program(study, "bn", probes=True).run(SEEDS)
    direct = build_program(study, "bn", probes=True)
    direct._exportable = False  # plain jax.jit tracing, as before the trace cache
    traced = direct.run(SEEDS)
    stored = sorted(cache.glob("*.jaxexport"))
    assert len(stored) == 1  # the probed train program of 4 seeds

    _no_tracing(monkeypatch)
    again = build_program(study, "bn", probes=True).run(SEEDS)
    for got in (again, traced):  # History, step probes and epoch probes, bit for bit
        for ours, theirs in zip(first, got, strict=True):
            assert ours is not None and theirs is not None
            assert ours.keys() == theirs.keys()
            for name in ours:
                np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert sorted(cache.glob("*.jaxexport")) == stored  # nothing new written


def test_what_the_trace_depends_on_changes_its_key(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study(tmp_path)
    base = build_program(study, "plain", probes=False)._trace_key("train", 4)
    assert base is not None
    assert base == build_program(study, "plain", probes=False)._trace_key("train", 4)
    variants = {
        "seeds": build_program(study, "plain", probes=False)._trace_key("train", 5),
        "program": build_program(study, "plain", probes=False)._trace_key("trajectory", 4),
        "probes": build_program(study, "plain", probes=True)._trace_key("train", 4),
        "epochs": build_program(
            _study(tmp_path, TINY_STUDY.replace("epochs = 3", "epochs = 4")), "plain", probes=False
        )._trace_key("train", 4),
        "units": build_program(
            _study(
                tmp_path,
                TINY_STUDY.replace(
                    'units = 8 }, { layer = "Dense"', 'units = 9 }, { layer = "Dense"'
                ),
            ),
            "plain",
            probes=False,
        )._trace_key("train", 4),
        "optimizer": build_program(
            _study(tmp_path, TINY_STUDY.replace('optimizer = "adam"', 'optimizer = "sgd"')),
            "plain",
            probes=False,
        )._trace_key("train", 4),
        "rows": build_program(
            _study(tmp_path, TINY_STUDY.replace("shape = [100, 12]", "shape = [90, 12]")),
            "plain",
            probes=False,
        )._trace_key("train", 4),
    }
    monkeypatch.setenv("ABLAB_LOWERINGS", "0")
    variants["lowerings"] = build_program(study, "plain", probes=False)._trace_key("train", 4)
    assert None not in variants.values()
    assert len({base, *variants.values()}) == len(variants) + 1, variants


USER_LAYER = """
import keras


class Doubling(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x
"""


def test_the_users_code_is_traced_every_time(tmp_path: Path, cache: Path) -> None:
    """A custom layer's Python code can change without its config changing: no kept trace."""
    (tmp_path / "layers.py").write_text(USER_LAYER)
    study = _study(
        tmp_path,
        TINY_STUDY.replace(
            '[{ layer = "Dense", units = 8 }, { layer = "BatchNormalization" },',
            '[{ layer = "Dense", units = 8 }, { layer = "layers.py:Doubling" },',
        ),
    )
    program = build_program(study, "bn", probes=False)
    assert program._trace_key("train", 4) is None
    program.run(SEEDS)
    assert not list(cache.glob("*.jaxexport"))


def test_no_trace_is_kept_with_the_compilation_cache_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ABLAB_COMPILATION_CACHE", "0")
    assert trace_cache.trace_dir() is None
    build_program(_study(tmp_path), "plain", probes=False).run(SEEDS)
    assert not list(tmp_path.rglob("*.jaxexport"))


def test_a_damaged_trace_is_traced_again_and_replaced(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _study(tmp_path)
    first = build_program(study, "plain", probes=False).train(SEEDS)
    (path,) = cache.glob("*.jaxexport")
    path.write_bytes(b"not a program")
    again = build_program(study, "plain", probes=False).train(SEEDS)
    np.testing.assert_array_equal(first["val_loss"], again["val_loss"])
    assert path.read_bytes() != b"not a program"  # replaced by the fresh trace
    _no_tracing(monkeypatch)  # and that one loads
    build_program(study, "plain", probes=False).train(SEEDS)
