"""hpsearch export and hpsearch best over real studies run through the CLI into real SQLite files."""

from __future__ import annotations

import io
import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import tomllib
from click.testing import CliRunner, Result

from conftest import StoredStudy, run_cli, write_study
from hpsearch.cli import main
from hpsearch.spec import load_spec

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
FIXED = ["optimizer", "lr", "momentum", "weight_decay", "batch_size", "scheduler", "epochs_run", "val_acc",
         "test_acc", "train_loss", "run_time_s", "examples_per_s", "trial"]  # fmt: skip

# Every trial completes (no pruner), two per optimizer, so --best-per has groups to pick from;
# SGD carries a conditional momentum and a step scheduler, so those columns hold values.
PAIR_STUDY = """
[study]
n_trials = 4
seed = 1
sampler = "grid"
pruner = "none"

[data]
name = "synthetic"
batch_size = 32
train_limit = 320

[model]
name = "mnist_cnn"

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { choices = [0.001, 0.003] }

[optimizer.sgd]
momentum = 0.9

[scheduler]
name = "step"
step_size = 1

[train]
epochs = 2
"""
# Regression (minimize MSE); torch refuses the negative rate, so one trial fails.
TOY_STUDY = """
[study]
n_trials = 3
sampler = "grid"
pruner = "none"

[data]
name = "toy_regression"
batch_size = 100

[model]
name = "mlp"

[optimizer]
name = "adam"
lr = { choices = [0.01, 0.1, -1.0] }

[train]
epochs = 3
"""


@dataclass
class Storage:
    url: str
    folder: Path

    def study(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.url)


@pytest.fixture(scope="module")
def storage(synthetic_study: StoredStudy, tmp_path_factory: pytest.TempPathFactory) -> Storage:
    """A copy of the fixture's storage plus two more studies; the shared fixture stays untouched."""
    folder = tmp_path_factory.mktemp("export")
    source = synthetic_study.storage.removeprefix("sqlite:///")
    with sqlite3.connect(source) as src, sqlite3.connect(folder / "hpsearch.db") as dst:
        src.backup(dst)  # the backup API also copies what still sits in the WAL file
    url = f"sqlite:///{folder / 'hpsearch.db'}"
    for name, text in (("pair", PAIR_STUDY), ("toy", TOY_STUDY)):
        run_cli("run", "--study", str(write_study(folder, name, text)), "--storage", url, "--device", "cpu")
    return Storage(url, folder)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def export_csv(storage: Storage, *args: str) -> pd.DataFrame:
    result = invoke("export", "--storage", storage.url, *args)
    assert result.exit_code == 0, result.output
    return pd.read_csv(io.StringIO(result.stdout))


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    done = study.get_trials(states=(COMPLETE,))
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(done, key=lambda t: (sign * t.value, t.number))


def assert_row_is_trial(row: pd.Series, trial: optuna.trial.FrozenTrial, val: str = "val_acc") -> None:
    cfg, attrs = trial.user_attrs["config"], trial.user_attrs
    test = val.replace("val_", "test_")
    assert row["trial"] == trial.number
    assert row["optimizer"] == cfg["optimizer"]["name"]
    assert row["lr"] == cfg["optimizer"]["lr"]
    assert row["batch_size"] == cfg["data"]["batch_size"]
    assert row["scheduler"] == cfg["scheduler"]["name"]
    assert row[val] == trial.value
    assert row[test] == attrs[test]
    assert row["train_loss"] == attrs["final_train_loss"]
    assert row["run_time_s"] == attrs["run_time_s"]
    assert row["epochs_run"] == attrs["epochs_run"]
    for name, value in trial.params.items():
        assert row[name] == value


def test_best_table_csv_matches_the_stored_trials(storage: Storage) -> None:
    study = storage.study("pair")
    df = export_csv(storage, "--study", "pair")

    assert list(df.columns[: len(FIXED)]) == FIXED
    assert list(df.columns[len(FIXED) :]) == ["optimizer.name", "optimizer.lr"]
    expected = ranked(study)
    assert len(expected) >= 2 and list(df["trial"]) == [t.number for t in expected]
    assert df["val_acc"].iloc[0] == study.best_value
    for (_, row), trial in zip(df.iterrows(), expected, strict=True):
        assert_row_is_trial(row, trial)
    # Fixed and conditional values come from the config: momentum only where SGD ran.
    sgd = df["optimizer"] == "sgd"
    assert (df.loc[sgd, "momentum"] == 0.9).all() and df.loc[~sgd, "momentum"].isna().all()
    assert (df["scheduler"] == "step").all()
    for col in FIXED:
        if col not in ("optimizer", "scheduler"):
            assert pd.api.types.is_numeric_dtype(df[col]), col


def test_fixture_study_best_row(storage: Storage, synthetic_study: StoredStudy) -> None:
    study = synthetic_study.load()
    df = export_csv(storage, "--study", synthetic_study.name)
    assert len(df) == len(study.get_trials(states=(COMPLETE,)))
    assert_row_is_trial(df.iloc[0], study.best_trial)
    # Adam takes no momentum: the column is empty, yet numeric.
    assert df["momentum"].isna().all() and df["momentum"].dtype == float


def test_top_keeps_the_best_k(storage: Storage) -> None:
    full = export_csv(storage, "--study", "pair")
    top = export_csv(storage, "--study", "pair", "--top", "2")
    assert len(top) == 2
    pd.testing.assert_frame_equal(top, full.head(2))


def test_minimized_metric_ranks_lowest_first(storage: Storage) -> None:
    study = storage.study("toy")
    df = export_csv(storage, "--study", "toy")
    assert "val_mse" in df.columns and "val_acc" not in df.columns
    assert list(df["val_mse"]) == sorted(df["val_mse"])
    assert_row_is_trial(df.iloc[0], study.best_trial, "val_mse")


def test_best_per_optimizer_is_each_groups_best(storage: Storage) -> None:
    study = storage.study("pair")
    df = export_csv(storage, "--study", "pair", "--best-per", "optimizer.name")

    assert df.columns[0] == "optimizer.name" and list(df.columns).count("optimizer.name") == 1
    done = study.get_trials(states=(COMPLETE,))
    groups = {t.params["optimizer.name"] for t in done}
    assert sorted(df["optimizer.name"]) == sorted(groups) == ["adam", "sgd"]
    for _, row in df.iterrows():
        members = [t for t in done if t.params["optimizer.name"] == row["optimizer.name"]]
        best = max(members, key=lambda t: (t.value, -t.number))
        assert_row_is_trial(row, best)
    assert list(df["val_acc"]) == sorted(df["val_acc"], reverse=True)


def test_best_per_a_fixed_config_key(storage: Storage) -> None:
    df = export_csv(storage, "--study", "pair", "--best-per", "data.batch_size")
    assert list(df["data.batch_size"]) == [32]
    assert df["trial"].iloc[0] == storage.study("pair").best_trial.number


def test_trials_lists_every_trial_with_reasons(storage: Storage, synthetic_study: StoredStudy) -> None:
    study = synthetic_study.load()
    df = export_csv(storage, "--study", synthetic_study.name, "--trials")

    trials = study.get_trials()
    assert list(df["trial"]) == [t.number for t in trials]
    assert list(df["state"]) == [t.state.name.lower() for t in trials]
    pruned = df[df["state"] == "pruned"]
    assert len(pruned) == sum(t.state == PRUNED for t in trials) > 0
    assert pruned["pruned_at_epoch"].notna().all() and pruned["reason"].notna().all()
    diverged = pruned[pruned["reason"].str.startswith("diverged")]
    stopped = pruned[pruned["reason"].str.startswith("pruned at epoch")]
    assert len(diverged) > 0 and len(stopped) > 0 and len(diverged) + len(stopped) == len(pruned)
    for _, row in stopped.iterrows():
        trial = trials[int(row["trial"])]
        assert row["pruned_at_epoch"] == max(trial.intermediate_values)
        assert row["value"] == trial.value
    complete = df[df["state"] == "complete"]
    assert complete["reason"].isna().all() and complete["pruned_at_epoch"].isna().all()
    assert pd.api.types.is_numeric_dtype(df["pruned_at_epoch"])


def test_trials_shows_a_failed_trial(storage: Storage) -> None:
    df = export_csv(storage, "--study", "toy", "--trials")
    failed = df[df["state"] == "fail"]
    assert len(failed) == 1
    assert failed["reason"].iloc[0].startswith("ValueError") and "learning rate" in failed["reason"].iloc[0]
    # It failed before its config was stored; the sampled rate still shows.
    assert failed["lr"].iloc[0] == -1.0 and math.isnan(failed["value"].iloc[0])


def test_several_studies_one_row_each(storage: Storage, synthetic_study: StoredStudy) -> None:
    names = [synthetic_study.name, "pair", "toy"]
    df = export_csv(storage, "--all-studies")
    assert sorted(df["study"]) == sorted(names)
    assert list(df.columns[:6]) == ["study", "model", "dataset", "n_trials", "n_complete", "n_pruned"]
    for _, row in df.iterrows():
        study = storage.study(row["study"])
        trials = study.get_trials()
        assert row["n_trials"] == len(trials)
        assert row["n_complete"] == sum(t.state == COMPLETE for t in trials)
        assert row["n_pruned"] == sum(t.state == PRUNED for t in trials)
        assert row["trial"] == study.best_trial.number
        assert row["lr"] == study.best_trial.user_attrs["config"]["optimizer"]["lr"]
        assert row["model"] == study.user_attrs["spec"]["model"]["name"]
    toy = df.set_index("study").loc["toy"]
    assert toy["val_mse"] == storage.study("toy").best_value and math.isnan(toy["val_acc"])
    picked = export_csv(storage, "--study", "pair", "--study", "toy")
    assert list(picked["study"]) == ["pair", "toy"]


def test_formats_read_back(storage: Storage, tmp_path: Path) -> None:
    study = storage.study("pair")
    best = study.best_trial
    out = tmp_path / "best.json"
    result = invoke("export", "--storage", storage.url, "--study", "pair", "-o", str(out))
    assert result.exit_code == 0, result.output
    records: list[dict[str, Any]] = json.loads(out.read_text())
    assert [r["trial"] for r in records] == [t.number for t in ranked(study)]
    assert records[0]["val_acc"] == best.value and records[0]["lr"] == best.params["optimizer.lr"]
    assert records[0]["run_time_s"] == best.user_attrs["run_time_s"]  # no rounding
    assert any(r["momentum"] is None for r in records)  # missing is null, not NaN

    md = tmp_path / "best.md"
    assert invoke("export", "--storage", storage.url, "--study", "pair", "-o", str(md)).exit_code == 0
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| optimizer | lr | momentum |") and lines[1].startswith("| --- | ---: |")
    assert len(lines) == 2 + len(records)
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first[0] == best.params["optimizer.name"] and float(first[1]) == best.params["optimizer.lr"]

    forced = tmp_path / "table.txt"
    args = ["export", "--storage", storage.url, "--study", "pair", "-o", str(forced), "--format", "md"]
    assert invoke(*args).exit_code == 0 and forced.read_text() == md.read_text()
    csv = tmp_path / "table.out"  # unknown extension: csv
    assert invoke("export", "--storage", storage.url, "--study", "pair", "-o", str(csv)).exit_code == 0
    assert pd.read_csv(csv)["trial"].tolist() == [r["trial"] for r in records]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.md", "table.out", "table.txt"]


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0]


def test_unknown_study_leaves_existing_output_intact(storage: Storage, tmp_path: Path) -> None:
    out = tmp_path / "best.csv"
    out.write_text("precious\n")
    result = invoke("export", "--storage", storage.url, "--study", "nope", "-o", str(out))
    assert_one_line_error(result, "'nope'", "pair", "toy")
    assert out.read_text() == "precious\n" and [p.name for p in tmp_path.iterdir()] == ["best.csv"]
    # A good export then replaces it whole (a new file renamed over it: a new inode), leaving no
    # temporary file behind.
    inode = out.stat().st_ino
    assert invoke("export", "--storage", storage.url, "--study", "pair", "-o", str(out)).exit_code == 0
    assert out.stat().st_ino != inode
    assert pd.read_csv(out)["trial"].iloc[0] == storage.study("pair").best_trial.number
    assert [p.name for p in tmp_path.iterdir()] == ["best.csv"]


def test_study_without_completed_trial_is_an_error(storage: Storage) -> None:
    optuna.create_study(study_name="empty", storage=storage.url)
    try:
        assert_one_line_error(invoke("export", "--storage", storage.url, "--study", "empty"), "empty")
        assert_one_line_error(invoke("best", "--storage", storage.url, "--study", "empty"), "empty")
        # Listed with its counts among several, though.
        df = export_csv(storage, "--all-studies")
        assert df.set_index("study").loc["empty", "n_trials"] == 0
    finally:
        optuna.delete_study(study_name="empty", storage=storage.url)


def test_unknown_best_per_lists_the_valid_ones(storage: Storage) -> None:
    result = invoke("export", "--storage", storage.url, "--study", "pair", "--best-per", "optimizer.nope")
    assert_one_line_error(result, "optimizer.nope", "optimizer.name", "data.batch_size")


def test_missing_storage_file_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    result = invoke("export", "--storage", f"sqlite:///{db}", "--all-studies")
    assert_one_line_error(result, "no studies", str(db))
    assert not db.exists()


def test_option_misuse_is_a_usage_error(storage: Storage) -> None:
    for args in ([], ["--study", "pair", "--all-studies"],
                 ["--study", "pair", "--study", "toy", "--top", "1"],
                 ["--study", "pair", "--trials", "--best-per", "optimizer.name"]):  # fmt: skip
        result = invoke("export", "--storage", storage.url, *args)
        assert result.exit_code == 2 and "Traceback" not in result.output, args


def test_best_prints_a_study_file_that_reruns_the_best_trial(storage: Storage, tmp_path: Path) -> None:
    study = storage.study("pair")
    best = study.best_trial
    result = invoke("best", "--storage", storage.url, "--study", "pair")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith(f"# best trial {best.number} of study pair: validation accuracy {best.value!r}")
    sections = tomllib.loads(text)
    assert set(sections) == {"study", "data", "model", "optimizer", "scheduler", "train"}
    assert not any(isinstance(v, dict) for table in sections.values() for v in table.values())
    assert sections["train"]["seed"] == best.user_attrs["seed"]

    path = write_study(tmp_path, "pair-best", text)
    spec = load_spec(path)
    trial = optuna.create_study().ask()
    expected = {**best.user_attrs["config"]}
    expected["train"] = {**expected["train"], "seed": best.user_attrs["seed"]}
    assert spec.sample(trial) == expected and trial.params == {}

    # The same split, configuration and seed: the retrained trial repeats the stored one.
    url = f"sqlite:///{tmp_path / 'rerun.db'}"
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu")
    [rerun] = optuna.load_study(study_name="pair-best", storage=url).get_trials()
    assert rerun.state == COMPLETE and rerun.user_attrs["config"] == expected
    assert rerun.user_attrs["train_loss"] == pytest.approx(best.user_attrs["train_loss"], rel=1e-4)
    assert rerun.value == pytest.approx(best.value)


def test_best_floats_round_trip_exactly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    study = optuna.create_study(study_name="floats", storage=url)
    config = {"data": {"name": "synthetic", "batch_size": 64, "flip": True},
              "model": {"name": "mnist_cnn"}, "optimizer": {"name": "sgd", "lr": 0.1 + 0.2,
              "momentum": 1e-05, "dampening": 1 / 3}, "train": {"epochs": 1}}  # fmt: skip
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"config": config}))
    text = invoke("best", "--storage", url, "--study", "floats").stdout
    spec = load_spec(write_study(tmp_path, "floats", text))
    assert {k: v for k, v in spec.raw.items() if k != "study"} == config
