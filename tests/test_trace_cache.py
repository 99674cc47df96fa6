"""Traced programs kept between runs (ablab.engine.trace_cache): a second build of the same
program loads its trace instead of tracing, to the same bits; anything the trace depends on
changes the key; the user's code is never kept; off with the compilation cache."""

from __future__ import annotations

from pathlib import Path

import jax
import keras
import numpy as np
import pytest

import ablab
from ablab.engine import probes as _probes
from ablab.engine import trace_cache
from ablab.engine.build import build_program
from ablab.engine.program import VariantProgram
from tests.conftest import TINY_STUDY

SEEDS = np.arange(4, dtype=np.uint32)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_user_objects: None) -> Path:
    """A fresh cache folder of the test's own; the traces go to <it>/<versions>/traces.
    Keras' registry of custom objects is emptied meanwhile (``no_user_objects``)."""
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


CNN_STUDY = (
    TINY_STUDY.replace("shape = [100, 12]", "shape = [100, 16]")
    .replace("units = 12 }]", "units = 16 }]")
    .replace(
        '[{ layer = "Dense", units = 8 }, { layer = "BatchNormalization" },',
        '[{ layer = "Reshape", target_shape = [4, 4, 1] },\n'
        '{ layer = "Conv2D", filters = 2, kernel_size = 3, padding = "same" },\n'
        '{ layer = "BatchNormalization" }, { layer = "MaxPooling2D", pool_size = 2 },\n'
        '{ layer = "Flatten" },',
    )
)


@pytest.mark.parametrize("text", [TINY_STUDY, CNN_STUDY], ids=["dense_bn", "conv_bn_pool"])
def test_a_stored_trace_is_loaded_instead_of_traced_and_gives_the_same_bits(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """The seed study's warm run traced 12 programs again (~3 s of 14 s, issue #17). The
    stored program, loaded, gives what plain tracing gives, bit for bit (History, step and
    epoch probes), the conv / pool lowerings included."""
    study = _study(tmp_path, text)
    first = build_program(study, "bn", probes=True).run(SEEDS)
    direct = build_program(study, "bn", probes=True)
    direct._exportable = False  # plain jax.jit tracing, as before the trace cache
    traced = direct.run(SEEDS)
    stored = sorted(cache.glob("*.jaxexport"))
    assert len(stored) == 1  # the probed train program of 4 seeds

    _no_tracing(monkeypatch)
    again = build_program(study, "bn", probes=True).run(SEEDS)
    for got in (again, traced):
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
    program = build_program(study, "plain", probes=False)
    with jax.default_matmul_precision("highest"):  # any JAX setting, thread-local ones too
        variants["jax_config"] = program._trace_key("train", 4)
    bn = build_program(study, "bn", probes=True)
    probed = bn._trace_key("train", 4)
    monkeypatch.setattr(_probes, "BN_PROBE_ROWS", 5)  # the BN probe's chunked path
    variants["bn_probe_rows"] = bn._trace_key("train", 4)
    variants["bn_probed"] = probed
    monkeypatch.setattr(trace_cache.jax, "default_backend", lambda: "gpu")
    variants["backend"] = program._trace_key("train", 4)
    monkeypatch.undo()
    monkeypatch.setenv("ABLAB_COMPILATION_CACHE", str(cache.parent.parent))
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


def _twice(x: object) -> object:
    return x


def test_an_object_registered_with_keras_may_be_the_users_code(tmp_path: Path, cache: Path) -> None:
    """A plain name in a config may resolve to an object the user registered with Keras
    (``keras.saving.get_custom_objects()``): nothing is kept while the user has registered
    anything (ablab's own registrations, ``ablab>...``, do not count)."""
    study = _study(tmp_path)
    assert build_program(study, "plain", probes=False)._trace_key("train", 4) is not None
    keras.saving.get_custom_objects()["twice"] = _twice
    try:
        assert build_program(study, "plain", probes=False)._trace_key("train", 4) is None
    finally:
        del keras.saving.get_custom_objects()["twice"]


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
