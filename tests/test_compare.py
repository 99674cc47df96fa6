"""`ablab.compare` / `ablab compare FILE`: verdicts for per-seed results made anywhere, with the
rule and output of `ablab run`, and the bad-input contract (exit 2, the column / row and the
fix, nothing written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import ablab
from ablab.cli import main
from ablab.stats.verdicts import Comparison
from ablab.stats.verdicts import compare as compare_histories
from ablab.store.records import VariantHistory
from ablab.store.results import read_results

SPEC = ablab.VerdictSpec(n_resamples=999)


def _values(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.2, n)
    return {
        "plain": base,
        "bn": base - 0.05 + rng.normal(0.0, 0.02, n),
        "same": base + rng.normal(0.0, 0.001, n),
    }


def _long(values: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"variant": name, "seed": seed, "val_loss": float(v)}
            for name, arr in values.items()
            for seed, v in enumerate(arr)
        ]
    )


def test_same_rule_and_output_as_a_run() -> None:
    values = _values()
    hists = {
        k: VariantHistory(np.arange(v.size), {"val_loss": v[:, None]}) for k, v in values.items()
    }
    from_run = [c.to_json() for c in compare_histories(hists, "plain", SPEC)]
    from_dict = ablab.compare(values, metric="val_loss", spec=SPEC)
    from_frame = ablab.compare(_long(values), metric="val_loss", spec=SPEC)
    from_arrow = ablab.compare(pa.Table.from_pandas(_long(values)), spec=SPEC)
    for result in (from_dict, from_frame, from_arrow):
        assert [c.to_json() for c in result.comparisons] == from_run
    verdicts = {c.variant: c.verdict for c in from_dict.comparisons}
    assert verdicts == {"bn": "helps", "same": "equivalent"}
    assert from_dict.summary["bn"]["final_val_loss"]["mean"] == pytest.approx(values["bn"].mean())


def test_unpaired_input_is_detected_and_said() -> None:
    rng = np.random.default_rng(1)
    result = ablab.compare(
        {"a": rng.normal(1.0, 0.1, 30), "b": rng.normal(0.9, 0.1, 45)}, lower_is_better=True
    )
    (c,) = result.comparisons
    assert not c.paired and c.n == 45 and c.n_baseline == 30
    assert any("unpaired" in note for note in result.notes)
    # paired input analysed unpaired on request loses power: a larger p for the same data
    values = _values()
    paired = ablab.compare(values, metric="val_loss", spec=SPEC).comparisons[0]
    unpaired = ablab.compare(values, metric="val_loss", spec=SPEC, paired=False).comparisons[0]
    assert paired.p_value < unpaired.p_value


def test_the_spec_is_honoured_and_keywords_override_it() -> None:
    values = _values()
    strict = ablab.VerdictSpec(n_resamples=99, alpha=0.01, pairs=[("bn", "plain")])
    (c,) = ablab.compare(values, spec=strict, lower_is_better=True).comparisons
    assert c.variant == "bn" and c.n_min == 8  # alpha 0.01: 2^(1-n) < 0.01 from n = 8
    (c,) = ablab.compare(values, spec=strict, alpha=0.05, lower_is_better=True).comparisons
    assert c.n_min == 6


def test_the_direction_must_be_known_or_is_said_to_be_guessed() -> None:
    accuracy = {"a": np.linspace(0.90, 0.97, 8), "b": np.linspace(0.80, 0.87, 8)}
    with pytest.raises(ablab.InputError, match="lower_is_better"):
        ablab.compare(accuracy)  # a bare mapping says nothing about its direction
    (c,) = ablab.compare(accuracy, lower_is_better=False).comparisons
    assert c.verdict == "hurts"
    frame = _long(_values()).rename(columns={"val_loss": "score"})
    result = ablab.compare(frame, spec=SPEC)
    assert any("guessed from the name 'score'" in note for note in result.notes)


def test_arms_sharing_few_seeds_are_compared_unpaired() -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "variant": ["a"] * 30 + ["b"] * 30,
            "seed": list(range(30)) + list(range(28, 58)),  # 2 shared seed ids
            "val_loss": np.r_[rng.normal(1.0, 0.1, 30), rng.normal(0.7, 0.1, 30)],
        }
    )
    (c,) = ablab.compare(frame, spec=SPEC).comparisons
    assert not c.paired and c.verdict == "helps"


def test_mixed_type_columns_are_bad_input() -> None:
    frame = pd.DataFrame({"variant": ["a", "a", "b", "b"], "seed": [1, "2", 1, "2"]})
    frame["val_loss"] = [1.0, 2.0, 1.0, 2.0]
    with pytest.raises(ablab.InputError, match="one type"):
        ablab.compare(frame)


def test_direction_override_and_explicit_pairs() -> None:
    values = _values()
    result = ablab.compare(values, lower_is_better=False, pairs=[("bn", "plain")], spec=SPEC)
    (c,) = result.comparisons
    assert c.verdict == "hurts" and not c.lower_is_better


def test_cli_csv_and_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = _long(_values())
    frame.loc[frame.index[-1], "val_loss"] = np.nan  # a diverged seed
    frame.to_csv(tmp_path / "r.csv", index=False, na_rep="nan")
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "r.parquet")
    for name in ("r.csv", "r.parquet"):
        assert main(["compare", str(tmp_path / name), "--metric", "val_loss", "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert set(doc["comparisons"][0]) == set(Comparison.__dataclass_fields__)
        by = {c["variant"]: c for c in doc["comparisons"]}
        assert by["bn"]["verdict"] == "helps" and by["same"]["diverged"] == 1
        assert doc["variants"]["same"]["diverged"] == 1
    assert main(["compare", str(tmp_path / "r.csv")]) == 0  # the only metric column
    out = capsys.readouterr().out
    assert "helps" in out and "margin ±" in out and "baseline SD" in out


def _bad(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "args", "needles"),
    [
        ("variant,run,val_loss\na,0,1\na,1,2\nb,0,1\nb,1,2\n", [], ["[seed]", "add or rename"]),
        ("variant,seed,val_loss\na,0,1\na,1,2\nb,0,1\n", [], ["at least 2 seeds", "'b'"]),
        (
            "variant,seed,val_loss\na,0,1\na,1,2\na,1,3\nb,0,1\nb,1,2\n",
            [],
            ["rows 2 and 3", "duplicate"],
        ),
        (
            "variant,seed,val_loss\na,0,1\na,1,blue\nb,0,1\nb,1,2\n",
            [],
            ["[val_loss, row 2]", "'blue'"],
        ),
        ("variant,seed,val_loss\na,0,1\n,1,1\nb,0,1\nb,1,2\n", [], ["[variant, row 2]", "empty"]),
        ("variant,seed,loss,acc\na,0,1,1\na,1,2,1\n", [], ["[metric]", "--metric"]),
        (
            "variant,seed,val_loss\na,0,1\na,1,2\nb,0,1\nb,1,2\n",
            ["--baseline", "c"],
            ["'c'", "one of ['a', 'b']"],
        ),
        ("variant,seed,val_loss\na,0,1\na,1,2\nb,0,1\nb,1,2\n", ["--alpha", "2"], ["alpha"]),
    ],
)
def test_bad_results_exit_2_and_name_the_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    args: list[str],
    needles: list[str],
) -> None:
    path = _bad(tmp_path, text)
    before = sorted(os.listdir(tmp_path))
    assert main(["compare", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert "how to fix" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_empty_metric_cells_are_divergence_as_pandas_writes_nan(tmp_path: Path) -> None:
    frame = _long(_values())
    frame.loc[frame["variant"] == "bn", "val_loss"] = np.nan  # every bn seed diverged
    frame.to_csv(tmp_path / "r.csv", index=False)  # pandas: NaN -> empty cell
    result = ablab.compare(read_results(tmp_path / "r.csv"), spec=SPEC)
    by = {c.variant: c for c in result.comparisons}
    assert by["bn"].diverged == 40 and by["bn"].verdict == "hurts"
    assert "every seed" in by["bn"].reason


def test_bad_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "missing.csv")]) == 2
    (tmp_path / "r.txt").write_text("x")
    assert main(["compare", str(tmp_path / "r.txt")]) == 2
    (tmp_path / "r.parquet").write_bytes(b"PAR1 truncated")
    assert main(["compare", str(tmp_path / "r.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("how to fix") == 3 and "Traceback" not in err


def test_bad_mappings_raise_input_errors() -> None:
    with pytest.raises(ablab.InputError, match="at least 2 seeds"):
        ablab.compare({"a": [1.0], "b": [1.0, 2.0]})
    with pytest.raises(ablab.InputError, match="1-D"):
        ablab.compare({"a": np.ones((3, 2)), "b": np.ones(3)})
    with pytest.raises(ablab.InputError, match="at least two variants"):
        ablab.compare({"a": [1.0, 2.0]})
