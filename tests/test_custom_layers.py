"""A study's own layer classes (``layer = "layers.py:Class"``) under every ``model.fit`` path:
the fidelity and cross-backend workers (fresh interpreters that never import ablab) load the
user's files before deserializing, the reference engine clones with them, and one variant
whose worker fails (raises, dies) leaves the other variants' checks standing.

One check run (jax + torch workers, one launch each) serves several tests: a worker costs
~7 s (jax) to ~14 s (torch) of CPU just importing Keras."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import ablab
from ablab.analysis import backends
from ablab.analysis.checks import CheckResult, check_seeds, run_checks
from ablab.engine.program import VariantProgram
from ablab.engine.reference import reference_history
from tests.conftest import make_program, require_extra

LAYERS = '''
import sys

import keras
from keras import ops


def scaled_tanh(x):
    """A custom activation: deserializing it needs this file as well."""
    return ops.tanh(x) * 0.9


class Scaled(keras.layers.Layer):
    """A dense layer with its own weights and an extra constructor argument (``gain``)."""

    def __init__(self, units, gain=1.0, activation=scaled_tanh, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.gain = gain
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel"
        )
        self.bias = self.add_weight(shape=(self.units,), initializer="ones", name="bias")

    def call(self, x):
        return self.activation(ops.matmul(x, self.kernel) * self.gain + self.bias)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "gain": self.gain,
            "activation": keras.activations.serialize(self.activation),
        }


class FailsInWorker(keras.layers.Layer):
    """The identity in ablab's process; raises under model.fit in the worker (no ablab)."""

    def call(self, x):
        if "ablab" not in sys.modules:
            raise RuntimeError("FailsInWorker refuses to run in the model.fit worker")
        return x


'''

STUDY = """
name = "custom"
[data]
synthetic = { kind = "normal", shape = [48, 6], seed = 1 }
[train]
optimizer = "adam"
loss = "mse"
epochs = 2
batch_size = 16
validation_split = 0.25
shuffle = false
[variants.custom]
layers = [{ layer = "layers.py:Scaled", units = 4, gain = 0.5 }, { layer = "Dense", units = 6 }]
[variants.fails]
layers = [{ layer = "Dense", units = 4 }, { layer = "layers.py:FailsInWorker" },
          { layer = "Dense", units = 6 }]
[variants.plain]
layers = [{ layer = "Dense", units = 4 }, { layer = "Dense", units = 6 }]
[seeds]
count = 2
[checks]
seeds = 2
"""


Checked = tuple[ablab.Study, dict[str, VariantProgram], dict[str, CheckResult]]


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Checked:
    """The study (plain, custom, fails, local) and its model.fit checks on jax and torch."""

    class LocalIdentity(keras.layers.Layer):  # defined in a function: no worker imports it
        def call(self, x: keras.KerasTensor) -> keras.KerasTensor:
            return x

    root = tmp_path_factory.mktemp("custom")
    (root / "layers.py").write_text(LAYERS)
    (root / "custom.toml").write_text(STUDY)
    study = ablab.load_study(root / "custom.toml")
    layers = [*(study.variant_layers("plain") or []), {"layer": LocalIdentity}]
    local = study.variants["plain"].model_copy(update={"layers": layers})
    study = study.model_copy(update={"variants": {**study.variants, "local": local}})
    programs = {v: make_program(study, v) for v in study.variants}
    results = run_checks(study, programs, backends=["jax", "torch"])
    return study, programs, {r.name: r for r in results}


def _torch(results: dict[str, CheckResult], name: str) -> CheckResult:
    """``results[name]``; a torch check skipped for want of torch skips the test (fails it
    under CI): require_extra imports torch only then, not here where the worker did."""
    r = results[name]
    if r.passed is None and "not installed" in r.detail:
        require_extra("torch", "backends")
    return r


@pytest.mark.parametrize("variant", ["custom", "plain"])
def test_custom_layer_from_a_file_passes_fidelity(checked: Checked, variant: str) -> None:
    r = checked[2][f"{variant} @ jax model.fit"]
    assert r.passed is True, r.detail
    assert r.kind == "fidelity"  # the engine's own backend: fit fidelity, not a cross-check
    assert r.max_rel_dev is not None and r.max_rel_dev < 1e-5, r


@pytest.mark.parametrize("variant", ["custom", "plain"])
def test_custom_layer_from_a_file_passes_on_torch(checked: Checked, variant: str) -> None:
    r = _torch(checked[2], f"{variant} @ torch model.fit")
    assert r.passed is True, r.detail
    assert r.kind == "cross_backend"
    assert r.max_rel_dev is not None and r.max_rel_dev < 1e-5, r


def test_a_variant_whose_worker_raises_fails_alone(checked: Checked) -> None:
    results = checked[2]
    assert len(results) == 8  # 4 variants x 2 backends
    for backend in ("jax", "torch"):
        fails = _torch(results, f"fails @ {backend} model.fit")
        assert fails.passed is False
        assert f"model.fit worker on {backend} failed" in fails.detail
        assert "RuntimeError:" in fails.detail
        assert "FailsInWorker refuses to run in the model.fit worker" in fails.detail
        assert results[f"plain @ {backend} model.fit"].passed is True  # run after it


def test_a_class_no_worker_can_import_skips_its_variant(checked: Checked) -> None:
    for backend in ("jax", "torch"):
        r = checked[2][f"local @ {backend} model.fit"]
        assert r.passed is None, r
        assert "LocalIdentity" in r.detail and 'layer = "file.py:LocalIdentity"' in r.detail


def test_reference_engine_runs_a_custom_layer_with_a_custom_activation(checked: Checked) -> None:
    study, programs, _ = checked
    program = programs["custom"]
    engine = program.train(check_seeds(study))  # the check's seeds: compiled already
    ref = reference_history(program, int(check_seeds(study)[0]))
    assert set(ref) == set(engine)
    for name, expected in ref.items():
        np.testing.assert_allclose(engine[name][0], expected, rtol=1e-5, err_msg=name)


FAKE_WORKER = """
import json, os, sys, time
from pathlib import Path

job_dir, keys = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
result = {"histories": {}, "errors": {}, "running": None}
out = job_dir / f"result-{os.environ['KERAS_BACKEND']}.json"
for key in keys:
    result["running"] = key
    out.write_text(json.dumps(result))
    if key.startswith("crashes/"):
        print("fake worker: segfault", file=sys.stderr)
        os._exit(7)
    if key.startswith("hangs/"):
        time.sleep(60)
    result["histories"][key] = {"loss": [1.0]}
    result["running"] = None
    out.write_text(json.dumps(result))
"""


def test_a_worker_that_dies_is_blamed_on_its_entry_and_a_fresh_one_runs_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    monkeypatch.setattr(backends, "WORKER", fake)
    monkeypatch.setattr(backends, "write_job", lambda *args: None)
    programs: Any = dict.fromkeys(["a", "crashes", "b"])
    out = backends.run_backends(programs, {v: [0, 1] for v in programs}, ["jax"])["jax"]
    assert sorted(out["histories"]) == ["a/0", "a/1", "b/0", "b/1"]  # b: by a fresh worker
    assert out["errors"] == {
        "crashes/0": "worker exit 7: fake worker: segfault",
        "crashes/1": "not run: crashes/0 failed",
    }
    programs = dict.fromkeys(["hangs", "b"])
    out = backends.run_backends(programs, {"hangs": [0], "b": [0]}, ["jax"], timeout_s=1.5)
    assert out["jax"] == {
        "histories": {},
        "errors": {
            "hangs/0": "timed out after 2 s",
            "b/0": "not run: timed out after 2 s on hangs/0",
        },
    }
