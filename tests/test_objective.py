"""``[study] objective``: a trial's value is its last or its best epoch's validation metric.

Two studies of one configuration, one per objective, run by ``hpsearch run`` into one real SQLite
file: the same seed trains the same network in both, at a learning rate high enough that its
validation accuracy goes down again, so the last and the best epoch differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from conftest import run_cli, write_study
from hpsearch.cli import main
from hpsearch.record import TrialRecord
from hpsearch.spec import SpecError, load_spec
from hpsearch.study import open_study
from hpsearch.task import CLASSIFICATION, REGRESSION

# 150 synthetic examples, 30 for validation: 120 to train on, in batches of 23 (five and one of 5).
STUDY = """
[study]
n_trials = 1
seed = 0
sampler = "random"
pruner = "none"
{objective}

[data]
name = "synthetic"
batch_size = 23
train_limit = 150
val_fraction = 0.2

[model]
name = "lenet"

[optimizer]
name = "adam"
lr = 0.2

[train]
epochs = 4
"""


@dataclass
class Stored:
    folder: Path
    url: str

    def trial(self, name: str) -> optuna.trial.FrozenTrial:
        [trial] = optuna.load_study(study_name=name, storage=self.url).trials
        return trial


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    """Study ``best`` (objective = "best") and study ``last`` (no objective: the default)."""
    folder = tmp_path_factory.mktemp("objective")
    url = f"sqlite:///{folder / 'objective.db'}"
    for name, line in (("best", 'objective = "best"'), ("last", "")):
        path = write_study(folder, name, STUDY.format(objective=line))
        run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu")
    return Stored(folder, url)


def test_best_reports_the_best_epoch_and_last_the_last(stored: Stored) -> None:
    best, last = stored.trial("best"), stored.trial("last")
    assert best.state == last.state == optuna.trial.TrialState.COMPLETE
    vals = best.user_attrs["val_acc"]
    # One seed, one training: the objective changes only what the trial reports at its end.
    assert vals == last.user_attrs["val_acc"] and len(vals) == 4
    top = max(vals)
    assert top > vals[-1]  # the accuracy fell after its best epoch: the two objectives differ
    assert best.value == top and last.value == vals[-1]
    # Each epoch still reports its own value: the pruner sees the real curve.
    for trial in (best, last):
        assert trial.intermediate_values == {epoch: v for epoch, v in enumerate(vals, start=1)}
        # Both are recorded whatever the objective: the last in the per-epoch list, the best apart.
        assert trial.user_attrs["best_val"] == top
        assert trial.user_attrs["best_epoch"] == vals.index(top) + 1 < 4


def test_export_shows_the_last_and_the_best_of_every_study(stored: Stored) -> None:
    vals = stored.trial("best").user_attrs["val_acc"]
    for name in ("best", "last"):
        [row] = export(stored, "--study", name)
        assert row["val_acc"] == stored.trial(name).value  # the value the study ranks by
        assert row["val_acc_last"] == vals[-1] and row["val_acc_best"] == max(vals)
        assert row["best_epoch"] == vals.index(max(vals)) + 1
        [every] = export(stored, "--study", name, "--trials")
        assert {k: every[k] for k in row if k in every} == row
    rows = export(stored, "--all-studies")
    assert sorted(r["study"] for r in rows) == ["best", "last"]
    for r in rows:
        assert r["val_acc_last"] == vals[-1] and r["val_acc_best"] == max(vals)


def export(stored: Stored, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        run_cli("export", "--storage", stored.url, "--format", "json", *args)
    )
    return rows


def test_changing_the_objective_of_a_stored_study_is_refused(stored: Stored, tmp_path: Path) -> None:
    changed = write_study(tmp_path, "last", STUDY.format(objective='objective = "best"'))
    result = CliRunner().invoke(main, ["run", "--study", str(changed), "--storage", stored.url])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    [line] = result.output.strip().splitlines()[-1:]
    assert 'study.objective changed from "last" to "best"' in line
    assert len(optuna.load_study(study_name="last", storage=stored.url).trials) == 1
    # Writing out the default is no change.
    same = write_study(tmp_path, "last", STUDY.format(objective='objective = "last"'))
    assert open_study(load_spec(same), stored.url).study_name == "last"


def test_a_bad_objective_fails_at_load_in_one_line(tmp_path: Path) -> None:
    path = write_study(tmp_path, "mean", STUDY.format(objective='objective = "mean"'))
    with pytest.raises(SpecError, match=r"study\.objective: objective must be one of 'last', 'best'"):
        load_spec(path)
    result = CliRunner().invoke(
        main, ["run", "--study", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {path}: study.objective: ")


@pytest.mark.parametrize(
    ("task", "vals", "epoch"),
    [
        (CLASSIFICATION, [0.3, 0.7, 0.7, 0.5], 2),  # accuracy: the highest, the first of equals
        (REGRESSION, [0.3, 0.1, float("nan"), 0.2], 2),  # MSE: the lowest; a NaN is never best
        (REGRESSION, [float("inf"), 0.4], 2),
    ],
)
def test_the_task_says_which_epoch_is_best(task: Any, vals: list[float], epoch: int) -> None:
    rec = TrialRecord(val=vals)
    assert rec.best(task) == (epoch, vals[epoch - 1])
    assert rec.final_value("best", task) == vals[epoch - 1]
    last = rec.final_value("last", task)
    assert last == vals[-1] or (math.isnan(last) and math.isnan(vals[-1]))
    assert TrialRecord().best(task) is None
