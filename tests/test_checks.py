"""Checks in both directions: the real equivalences pass, injected faults are caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ablab
from ablab.analysis import checks as _checks
from ablab.analysis.checks import check_seeds, run_checks, trajectory_deviation
from ablab.cli import main
from ablab.engine.compiling import compile_programs
from tests.conftest import SEED_STUDY, TINY_STUDY, make_program
from tests.faults import GradScale

FAULTS = Path(__file__).with_name("faults.py")
DENSE = [{"layer": "Dense", "units": 8}, {"layer": "Dense", "units": 12}]


def _study(variants: dict, **checks: object) -> ablab.Study:
    return ablab.Study(
        data={"synthetic": {"shape": [100, 12], "seed": 1}},
        train={
            "optimizer": {"name": "sgd", "learning_rate": 0.05},
            "loss": "mse",
            "epochs": 3,
            "validation_split": 0.1,
            "shuffle": False,
        },
        variants=variants,
        seeds={"count": 10},
        checks=checks,
    )


def test_trajectory_deviation_by_hand() -> None:
    a = {"loss": np.array([[1.0, 1.0]]), "w": np.array([[[0.5], [0.5], [0.5]]])}
    b = {"loss": np.array([[1.0, 1.0]]), "w": np.array([[[0.5], [0.5], [0.6]]])}
    max_abs, max_rel, first, shared = trajectory_deviation(a, b, 1e-5)
    # |0.5 - 0.6| / max(0.5, 0.6, 1) = 0.1 at step 2
    assert (first, shared) == (2, 2)
    assert max_abs == pytest.approx(0.1) and max_rel == pytest.approx(0.1)


def test_check_seeds_spread_over_the_study() -> None:
    study = _study({"a": {"layers": DENSE}}).with_seeds(count=100, base=5)
    assert check_seeds(study).tolist() == [5, 55, 104]  # linspace(0, 99, 3) rounded


def test_seed_study_equivalences_pass(seed_study: ablab.Study, seed_programs: dict) -> None:
    results = _checks.equivalence_checks(
        ablab.load_study(SEED_STUDY), seed_programs
    )  # declared in the example file
    assert [r.name for r in results] == ["plain ≡ plain_identity", "bn ≡ bn_after"]
    for r in results:
        assert r.passed and r.max_abs_dev == 0.0 and r.first_bad_step is None, r


def test_a_checked_variant_compiles_one_program_whose_step_0_is_the_initial_weights() -> None:
    # the trajectory program returns the initial weights it drew: no separate init program
    # for the checks (issue #17: one compile less per checked variant)
    identity = [DENSE[0], {"layer": "Activation", "activation": "linear"}, DENSE[1]]
    study = _study({"a": {"layers": DENSE}, "b": {"layers": identity}}, equivalent=[["a", "b"]])
    programs = {v: make_program(study, v) for v in study.variants}
    (result,) = run_checks(study, programs)
    assert result.passed and result.max_abs_dev == 0.0
    for program in programs.values():
        assert set(program._compiled) == {("trajectory", 3)}
    seeds = check_seeds(study)
    traj = programs["a"].trajectories(seeds)
    tv0, _ = programs["a"].initial_weights(seeds)  # the engine's own init program
    for vid, init in zip(programs["a"].prepared.trainable_ids, tv0, strict=True):
        np.testing.assert_array_equal(traj[vid][:, 0], init)


def test_proven_twins_share_one_trajectory_program_and_a_fault_is_never_a_twin(
    monkeypatch: pytest.MonkeyPatch, no_user_objects: None
) -> None:
    """Variants whose training programs lowered to the same StableHLO (the flagship's
    plain / plain_identity) run one compiled trajectory program -- the twin's is neither
    lowered nor compiled -- each on its own data; a layer that changes training lowers to
    another program and is checked on its own trajectory."""
    identity = [DENSE[0], {"layer": "Activation", "activation": "linear"}, DENSE[1]]
    faulty = [DENSE[0], {"layer": GradScale, "scale": 1.01}, DENSE[1]]
    study = _study(
        {"a": {"layers": DENSE}, "b": {"layers": identity}, "c": {"layers": faulty}},
        equivalent=[["a", "b", "c"]],
    )
    programs = {v: make_program(study, v) for v in study.variants}
    a, b, c = programs.values()
    assert _checks.twins([a, b, c]) == {}  # nothing proven before their programs are lowered
    compile_programs([(p, "train", 4) for p in programs.values()], 2)  # as a run does
    assert _checks.twins([a, b, c]) == {b: a}
    lowered: list[str] = []
    real_lower = b.lower
    monkeypatch.setattr(b, "lower", lambda which, n: lowered.append(which) or real_lower(which, n))
    same, fault = run_checks(study, programs)
    assert lowered == []  # the twin's trajectory program: a's, adopted
    assert b._compiled[("trajectory", 3)] is a._compiled[("trajectory", 3)]
    assert same.passed and same.max_abs_dev == 0.0 and "one compiled program" in same.detail
    assert not fault.passed and "one compiled program" not in fault.detail
    alone = make_program(study, "b").trajectories(check_seeds(study))  # compiled on its own
    shared = b.trajectories(check_seeds(study))
    assert alone.keys() == shared.keys()
    for key in alone:
        np.testing.assert_array_equal(shared[key], alone[key])


def test_a_twin_needs_keras_own_objects_and_the_same_variables_beside_equal_text(
    no_user_objects: None,
) -> None:
    """Equal training StableHLO alone proves too little: a model of the user's could
    override train_step (which a probed training program re-implements, and so does not
    show), and a weight that never reaches the loss is dropped from the training program
    but recorded by the trajectory. Here every program is given the same fingerprint."""
    identity = [DENSE[0], {"layer": "Activation", "activation": "linear"}, DENSE[1]]
    users = [DENSE[0], {"layer": GradScale, "scale": 1.0}, DENSE[1]]
    no_bias = [{"layer": "Dense", "units": 8, "use_bias": False}, DENSE[1]]
    study = _study(
        {
            "a": {"layers": DENSE},
            "b": {"layers": identity},
            "users": {"layers": users},
            "no_bias": {"layers": no_bias},
            "unseen": {"layers": DENSE},
        }
    )
    programs = {v: make_program(study, v) for v in study.variants}
    for name, program in programs.items():
        if name != "unseen":  # (never compiled: nothing recorded)
            program.record_fingerprint("train", 4, "the same text")
    a = programs["a"]
    assert programs["b"].same_program_as(a)
    assert not programs["users"].same_program_as(a)  # a layer of the user's
    assert not programs["no_bias"].same_program_as(a)  # other variables
    assert not programs["unseen"].same_program_as(a)  # no fingerprint to compare
    programs["unseen"].record_fingerprint("train", 8, "the same text")
    assert not programs["unseen"].same_program_as(a)  # the same text for another seed count
    with pytest.raises(ValueError, match="not proven the same"):
        programs["users"].adopt_from(a, "trajectory", 3)


def test_a_gradient_scaling_identity_layer_is_caught() -> None:
    faulty = [DENSE[0], {"layer": GradScale, "scale": 1.01}, DENSE[1]]
    study = _study(
        {"plain": {"layers": DENSE}, "faulty": {"layers": faulty}}, equivalent=[["plain", "faulty"]]
    )
    programs = {v: make_program(study, v) for v in study.variants}
    (result,) = run_checks(study, programs)
    assert result.passed is False and result.kind == "equivalence"
    assert result.first_bad_step == 1  # the first SGD update already differs
    assert result.max_rel_dev > study.checks.tolerance


def test_a_real_difference_fails_equivalence() -> None:
    bn = [DENSE[0], {"layer": "BatchNormalization"}, DENSE[1]]
    study = _study({"plain": {"layers": DENSE}, "bn": {"layers": bn}}, equivalent=[["plain", "bn"]])
    programs = {v: make_program(study, v) for v in study.variants}
    (result,) = run_checks(study, programs)
    assert result.passed is False


def test_identity_probe_both_directions(monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study({"plain": {"layers": DENSE}}, identity_probe=True)
    programs = {"plain": make_program(study, "plain")}
    (ok,) = run_checks(study, programs)
    assert ok.kind == "identity_probe" and ok.passed and ok.max_abs_dev == 0.0
    # A broken "identity" (scales gradients) must be caught by the same probe.
    monkeypatch.setattr(_checks, "IDENTITY", {"layer": GradScale, "scale": 0.99})
    (bad,) = run_checks(study, programs)
    assert bad.passed is False and bad.first_bad_step == 1


def test_backends_agree_with_the_engine_and_a_perturbed_backend_is_caught() -> None:
    # jax's own model.fit (a "fidelity" check) is run by tests/test_custom_layers.py's checks
    bn = [DENSE[0], {"layer": "BatchNormalization"}, DENSE[1]]
    study = _study({"plain": {"layers": DENSE}, "bn": {"layers": bn}}, seeds=2)
    programs = {v: make_program(study, v) for v in study.variants}
    fault = {"path": str(FAULTS), "name": "PerturbAfter", "kwargs": {"step": 5}, "backend": "torch"}
    results = run_checks(study, programs, backends=["torch", "tensorflow"], callbacks=[fault])
    by = {r.name: r for r in results}
    assert len(results) == 4
    for variant in ("plain", "bn"):
        r = by[f"{variant} @ tensorflow model.fit"]
        assert r.passed is True, r  # an unperturbed backend agrees with the engine
        assert r.kind == "cross_backend"
        torch = by[f"{variant} @ torch model.fit"]
        assert torch.passed is False, torch  # the perturbed one is caught
        assert torch.first_bad_step == 2  # step 5 falls in epoch 2 (3 batches per epoch)


def test_cli_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(TINY_STUDY + '\n[checks]\nequivalent = [["plain", "plain"]]\n')
    assert main(["check", str(good), "--backends", "none", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (c,) = doc["checks"]
    assert set(c) >= {
        "name",
        "kind",
        "passed",
        "max_abs_dev",
        "max_rel_dev",
        "first_bad_step",
        "tolerance",
    }
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_STUDY + '\n[checks]\nequivalent = [["plain", "bn"]]\n')
    assert main(["check", str(bad), "--backends", "none"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["check", str(good), "--backends", "cuda"]) == 2


def test_run_executes_declared_checks_and_fails_on_a_failed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_STUDY + '\n[checks]\nequivalent = [["plain", "bn"]]\n')
    assert main(["run", str(bad), "--runs-dir", str(tmp_path / "r"), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["checks"][0]["passed"] is False and "check(s) failed" in captured.err
    assert doc["state"] == "complete"  # the run itself is stored


def test_an_early_stopped_history_compares_up_to_its_stop() -> None:
    """fit's History ends at the EarlyStopping epoch; the engine's repeats that epoch after it
    and says where in ``stopped_epoch``. The two agree on the epochs both ran; a seed that
    stopped elsewhere fails, naming the epochs."""
    loss = np.array([[1.0, 0.8, 0.7, 0.7], [1.0, 0.9, 0.8, 0.7]], np.float32)
    engine = {"loss": loss, "stopped_epoch": np.array([3, 0], np.int32)}
    seeds = np.array([5, 6])
    fit = {5: {"loss": [1.0, 0.8, 0.7]}, 6: {"loss": [1.0, 0.9, 0.8, 0.7]}}
    ok = _checks._compare_histories("x", "backend", 1e-5, engine, seeds, fit)
    assert ok.passed is True, ok.detail
    fit[5] = {"loss": [1.0, 0.8, 0.7, 0.7]}  # fit ran on: the engine stopped too early
    bad = _checks._compare_histories("x", "backend", 1e-5, engine, seeds, fit)
    assert bad.passed is False and "seed 5 trained [4] epochs there, 3 in the engine" in bad.detail
