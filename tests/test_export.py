"""hpsearch export and hpsearch best over real studies run through the CLI into real SQLite files."""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from conftest import StoredStudy, foreign_database, quiet_copy, run_cli, snapshot, write_study
from hpsearch.cli import main
from hpsearch.spec import load_spec

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
FIXED = [
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "scheduler",
    "epochs_run",
    "val_acc",
    "val_acc_last",
    "val_acc_best",
    "best_epoch",
    "test_acc",
    "train_loss",
    "run_time_s",
    "examples_per_s",
    "trial",
]

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
# Regression (minimize MSE). The two trials whose model is told to fail on its first training batch
# (conftest's flaky_regression, registered like a user's model) end FAIL with an IndexError.
TOY_STUDY = """
[study]
sampler = "grid"
pruner = "none"

[data]
name = "toy_regression"
batch_size = 100

[model]
name = "flaky_regression"
fail_after = { choices = [0, 1] }

[optimizer]
name = { choices = ["adam", "lbfgs"] }

[optimizer.adam]
lr = 0.01

[optimizer.lbfgs]
lr = 0.5

[train]
epochs = 3
"""
# One trial that trains epoch 1 at a thousandth of its rate (warm-up), then diverges in epoch 2 at
# the full rate.
LATE_DIVERGENCE_STUDY = """
[study]
n_trials = 1
pruner = "none"

[data]
name = "toy_regression"
batch_size = 100

[model]
name = "mlp"

[optimizer]
name = "sgd"
lr = 10.0

[scheduler]
name = "warmup"
warmup_epochs = 1
start_factor = 0.001

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
    # The backup API also copies what still sits in the WAL file.
    url = quiet_copy(synthetic_study.storage, folder / "hpsearch.db", "wal")
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
    # Adam takes no momentum: its cells are empty, yet the column is numeric. SGD's stored config
    # holds the builder's own default, 0.
    adam = df["optimizer"] == "adam"
    assert adam.any() and df.loc[adam, "momentum"].isna().all() and df["momentum"].dtype == float
    assert (df.loc[df["optimizer"] == "sgd", "momentum"] == 0).all()


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
        assert row["pruned_at_epoch"] == max(trial.intermediate_values) == trial.user_attrs["stop_epoch"]
        assert row["reason"].startswith(f"pruned at epoch {int(row['pruned_at_epoch'])}:")
        assert row["value"] == trial.value
    for _, row in diverged.iterrows():
        trial = trials[int(row["trial"])]
        # It stopped inside the epoch it was training: one past the last one it finished.
        assert row["pruned_at_epoch"] == trial.user_attrs["stop_epoch"] == len(trial.intermediate_values) + 1
        assert row["reason"].startswith(f"diverged in epoch {int(row['pruned_at_epoch'])}:")
    complete = df[df["state"] == "complete"]
    assert complete["reason"].isna().all() and complete["pruned_at_epoch"].isna().all()
    assert pd.api.types.is_numeric_dtype(df["pruned_at_epoch"])


def test_trials_shows_a_failed_trial(storage: Storage) -> None:
    df = export_csv(storage, "--study", "toy", "--trials")
    failed = df[df["state"] == "fail"].sort_values("optimizer")
    assert len(failed) == 2
    assert all(r.startswith("IndexError: ") for r in failed["reason"])
    # They failed in their first step, after their config was stored: the rate shows, no epoch or value.
    assert list(failed["optimizer"]) == ["adam", "lbfgs"] and list(failed["lr"]) == [0.01, 0.5]
    assert (failed["epochs_run"] == 0).all() and failed["value"].isna().all()
    assert failed["pruned_at_epoch"].isna().all()


def test_trials_shows_the_epoch_a_trial_diverged_in(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late.db'}"
    path = write_study(tmp_path, "late", LATE_DIVERGENCE_STUDY)
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu")
    [trial] = optuna.load_study(study_name="late", storage=url).get_trials()
    result = invoke("export", "--storage", url, "--study", "late", "--trials", "--format", "json")
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)

    assert trial.state == PRUNED and list(trial.intermediate_values) == [1]
    assert row["state"] == "pruned" and row["epochs_run"] == 1
    # Epoch 1 finished and was evaluated; the loss blew up in epoch 2, at its last batch at the latest.
    assert row["pruned_at_epoch"] == 2
    assert row["reason"].startswith("diverged in epoch 2: training loss reached ")
    assert "(limit 1e+04) by batch " in row["reason"]
    assert row["value"] == row["val_mse"] == trial.intermediate_values[1]
    # The last finished epoch's data loss; SGD's stored config holds its builder's defaults.
    assert row["train_loss"] == trial.user_attrs["train_loss"][-1] < 1e4
    assert row["momentum"] == 0 and trial.user_attrs["config"]["optimizer"]["dampening"] == 0
    assert trial.user_attrs["l1_penalty"] == [0.0]


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
    assert isinstance(result.exception, SystemExit)
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
    for args in (
        [],
        ["--study", "pair", "--all-studies"],
        ["--study", "pair", "--study", "toy", "--top", "1"],
        ["--study", "pair", "--trials", "--best-per", "optimizer.name"],
    ):
        result = invoke("export", "--storage", storage.url, *args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), args


def test_best_prints_a_study_file_of_the_best_trial(storage: Storage, tmp_path: Path) -> None:
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
    assert spec.sample(trial).as_dict() == expected and trial.params == {}


@pytest.mark.slow  # retrains the trial
def test_the_study_file_best_prints_retrains_the_trial(storage: Storage, tmp_path: Path) -> None:
    best = storage.study("pair").best_trial
    result = invoke("best", "--storage", storage.url, "--study", "pair")
    assert result.exit_code == 0, result.output
    path = write_study(tmp_path, "pair-best", result.stdout)
    expected = {**best.user_attrs["config"]}
    expected["train"] = {**expected["train"], "seed": best.user_attrs["seed"]}

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
    config = {
        "data": {"name": "synthetic", "batch_size": 64, "flip": True},
        "model": {"name": "mnist_cnn"},
        "optimizer": {"name": "sgd", "lr": 0.1 + 0.2, "momentum": 1e-05, "dampening": 1 / 3},
        "train": {"epochs": 1},
    }
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"config": config}))
    text = invoke("best", "--storage", url, "--study", "floats").stdout
    spec = load_spec(write_study(tmp_path, "floats", text))
    # load_spec writes the defaults in; every value given comes back bit for bit.
    for section, table in config.items():
        assert {k: spec.raw[section][k] for k in table} == table, section


def test_best_is_valid_toml_whatever_the_study_name(tmp_path: Path) -> None:
    # A study made by another program may be named anything; the name lands in a comment and a string.
    name = 'two\nlines [data] = "x" # \\'
    url = f"sqlite:///{tmp_path / 'h.db'}"
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    config = {
        "data": {"name": "synthetic", "batch_size": 64},
        "model": {"name": "mnist_cnn"},
        "optimizer": {"name": "adam", "lr": 0.003, "betas": [0.9, 0.999]},
        "train": {"epochs": 1},
    }
    study.add_trial(optuna.trial.create_trial(value=0.75, user_attrs={"config": config, "seed": 7}))
    result = invoke("best", "--storage", url, "--study", name)
    assert result.exit_code == 0, result.output
    sections = tomllib.loads(result.stdout)
    assert sections["study"]["description"] == f"best trial 0 of {name}"
    assert sections["train"] == {"epochs": 1, "seed": 7}
    spec = load_spec(write_study(tmp_path, "renamed", result.stdout))
    assert spec.n_trials == 1 and spec.param_names() == []
    for section, table in config.items():
        assert {k: spec.raw[section][k] for k in table} == table, section


def test_best_of_a_study_file_made_elsewhere_notes_it(storage: Storage, tmp_path: Path) -> None:
    stored = invoke("best", "--storage", storage.url, "--study", "pair")
    assert stored.exit_code == 0 and stored.stderr == "", stored.output
    # The file the study was made from: no note.
    same = invoke("best", "--storage", storage.url, "--study", str(storage.folder / "pair.toml"))
    assert same.exit_code == 0 and same.stdout == stored.stdout and same.stderr == "", same.output

    # Another file of the same name: the stored study's best trial, and a note naming both.
    (tmp_path / "other").mkdir()
    other = write_study(tmp_path / "other", "pair", PAIR_STUDY.replace("0.003", "0.01"))
    result = invoke("best", "--storage", storage.url, "--study", str(other))
    assert result.exit_code == 0, result.output
    assert result.stdout == stored.stdout
    [note] = result.stderr.splitlines()
    assert note.startswith("note: ") and "'pair'" in note and str(other) in note


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_export_and_best_only_read(storage: Storage, tmp_path: Path, journal: str) -> None:
    url = quiet_copy(storage.url, tmp_path / "studies.db", journal)
    before = snapshot(tmp_path)
    for args in (
        ["export", "--study", "pair", "-o", str(tmp_path / "best.csv")],
        ["export", "--study", "toy", "--trials"],
        ["export", "--study", "pair", "--best-per", "optimizer.name"],
        ["export", "--all-studies"],
        ["best", "--study", "pair"],
    ):
        result = invoke(*args, "--storage", url)
        assert result.exit_code == 0, (args, result.output)
    # The database is byte for byte what it was, and the one file asked for is the only new one.
    after = snapshot(tmp_path)
    assert after.pop("best.csv") and after == before


# Linux capabilities that let root ignore file permissions (linux/capability.h), and prctl's request
# to drop one for good from a process and whatever it runs.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _permissions_apply() -> None:
    """In a child about to run the command: make file permissions apply, also to root.

    CI containers run as root, and root reads and writes past permission bits through two
    capabilities; dropped from the bounding set before the command starts, the command has neither.
    """
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop root's file-permission override")


@pytest.mark.slow  # a fresh interpreter imports torch: several seconds
@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_export_reads_a_write_protected_study(storage: Storage, tmp_path: Path, journal: str) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    db = folder / "studies.db"
    url = quiet_copy(storage.url, db, journal)
    expected = export_csv(storage, "--study", "pair")
    before = snapshot(folder)
    db.chmod(0o444)
    folder.chmod(0o555)
    hpsearch = [sys.executable, "-m", "hpsearch"]
    probe = [sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"]
    try:
        # The set-up holds: the command's process could write nothing there.
        denied = subprocess.run(probe, preexec_fn=_permissions_apply, capture_output=True, text=True)
        done = subprocess.run(
            [*hpsearch, "export", "--storage", url, "--study", "pair"],
            preexec_fn=_permissions_apply,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stderr
    assert done.returncode == 0, done.stderr
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(done.stdout)), expected)
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "args",
    [["export", "--study", "pair"], ["export", "--all-studies"], ["best", "--study", "pair"]],
    ids=["export", "export-all", "best"],
)
def test_foreign_database_is_refused_untouched(tmp_path: Path, args: list[str]) -> None:
    url = foreign_database(tmp_path / "bank.db")
    before = snapshot(tmp_path)
    result = invoke(*args, "--storage", url)
    assert_one_line_error(result, "accounts", str(tmp_path / "bank.db"))
    assert snapshot(tmp_path) == before
