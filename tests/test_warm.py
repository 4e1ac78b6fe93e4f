"""Warm starts: ``[[study.enqueue]]`` tables and ``hpsearch run --warm-from`` queue configurations that
run before any sampled one, through ``hpsearch run`` into real SQLite files, on synthetic data."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from conftest import run_cli, write_study
from hpsearch.cli import main

# Two tables: a whole configuration in TOML's dotted keys, and part of one in quoted keys (its
# batch size is sampled). `flaky` is the linear net of conftest.py, which with its defaults never fails.
ENQUEUE_STUDY = """
[study]
description = "test: configurations tried first"
n_trials = 3
seed = 0
sampler = "random"
pruner = "none"

[[study.enqueue]]
optimizer.name = "sgd"
optimizer.sgd.lr = 0.05
optimizer.sgd.momentum = 0.5
data.batch_size = 50

[[study.enqueue]]
"optimizer.name" = "adam"
"optimizer.adam.lr" = 0.002

[data]
name = "synthetic"
batch_size = { choices = [25, 50] }
train_limit = 200
test_limit = 50

[model]
name = "flaky"

[optimizer]
name = { choices = ["sgd", "adam"] }

[optimizer.sgd]
lr = { low = 0.001, high = 0.1, log = true }
momentum = { low = 0.0, high = 0.9 }

[optimizer.adam]
lr = { low = 0.0001, high = 0.01, log = true }

[train]
epochs = 1
"""

FIRST = {
    "optimizer.name": "sgd",
    "optimizer.sgd.lr": 0.05,
    "optimizer.sgd.momentum": 0.5,
    "data.batch_size": 50,
}
SECOND = {"optimizer.name": "adam", "optimizer.adam.lr": 0.002}
THIRD = {"optimizer.name": "adam", "optimizer.adam.lr": 0.0005, "data.batch_size": 25}


def storage_in(folder: Path) -> str:
    return f"sqlite:///{folder / 'warm.db'}"


def queued(study: optuna.Study) -> list[int]:
    """Numbers of the trials that were taken from the queue."""
    return [t.number for t in study.trials if "fixed_params" in t.system_attrs]


def test_enqueued_configurations_run_first_with_their_values_and_only_once(tmp_path: Path) -> None:
    path = write_study(tmp_path, "enqueued", ENQUEUE_STUDY)
    storage = storage_in(tmp_path)
    out = run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu")
    study = optuna.load_study(study_name="enqueued", storage=storage)
    first, second, sampled = study.trials
    assert first.params == FIRST
    assert "trial    0 complete" in out and "optimizer.sgd.lr=0.05, optimizer.sgd.momentum=0.5" in out
    assert {k: second.params[k] for k in SECOND} == SECOND and second.params["data.batch_size"] in (25, 50)
    assert set(second.params) == {*SECOND, "data.batch_size"}
    assert queued(study) == [0, 1] and sampled.params not in (FIRST, second.params)
    assert all(t.state is TrialState.COMPLETE for t in study.trials)

    # Resuming queues nothing again: the next trial is sampled.
    out = run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu", "--n-trials", "1")
    assert "resuming: 3 finished trials stored" in out
    study = optuna.load_study(study_name="enqueued", storage=storage)
    assert len(study.trials) == 4 and queued(study) == [0, 1]
    assert study.trials[3].params not in (FIRST, study.trials[1].params)

    # A table added to the file since runs next, once.
    table = '[[study.enqueue]]\noptimizer = { name = "adam", adam = { lr = 0.0005 } }\ndata.batch_size = 25\n'
    path.write_text(ENQUEUE_STUDY.replace("[data]", table + "\n[data]"), encoding="utf-8")
    for _ in range(2):
        run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu", "--n-trials", "1")
    study = optuna.load_study(study_name="enqueued", storage=storage)
    assert queued(study) == [0, 1, 4] and study.trials[4].params == THIRD
    assert study.trials[5].params != THIRD
    assert not study.get_trials(states=(TrialState.WAITING,))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("optimizer.sgd.lr = 0.05", "optimizer.sgd.lrr = 0.05"),
            "study.enqueue (table 1): optimizer.sgd.lrr = 0.05 is not a parameter of this study (searched: "
            "data.batch_size, optimizer.name, optimizer.sgd.lr, optimizer.sgd.momentum, optimizer.adam.lr)",
        ),
        (
            ("optimizer.sgd.lr = 0.05", "optimizer.sgd.lr = 5.0"),
            "study.enqueue (table 1): optimizer.sgd.lr = 5.0 is outside its range 0.001..0.1 (log)",
        ),
        (
            ("data.batch_size = 50", "data.batch_size = 64"),
            "study.enqueue (table 1): data.batch_size = 64 is not among its choices 25, 50",
        ),
        (
            ('"optimizer.adam.lr" = 0.002', '"optimizer.adam.lr" = "fast"'),
            "study.enqueue (table 2): optimizer.adam.lr = 'fast' is not a number; "
            "its range is 0.0001..0.01 (log)",
        ),
        (
            ("data.batch_size = 50", "train.epochs = 1"),
            "study.enqueue (table 1): train.epochs = 1 is fixed at 1 in this study, "
            "not searched: leave it out",
        ),
        (
            ('optimizer.name = "sgd"\n', ""),
            "study.enqueue (table 1): optimizer.sgd.lr = 0.05 applies only when optimizer.name = 'sgd': "
            "set that too",
        ),
        (
            ('"optimizer.adam.lr" = 0.002', '"optimizer.sgd.momentum" = 0.2'),
            "study.enqueue (table 2): optimizer.sgd.momentum = 0.2 applies only when optimizer.name = 'sgd', "
            "not 'adam'",
        ),
        (
            (
                '[[study.enqueue]]\n"optimizer.name" = "adam"\n"optimizer.adam.lr" = 0.002\n',
                "[[study.enqueue]]\n",
            ),
            "study.enqueue (table 2): must be a table of parameter = value lines, e.g. optimizer.lr = 0.01",
        ),
        (
            ("[[study.enqueue]]\noptimizer.name", "[study.enqueue]\noptimizer.name"),
            "study.enqueue: write each configuration as a [[study.enqueue]] table",
        ),
    ],
    ids=[
        "unknown",
        "outside",
        "choice",
        "not-a-number",
        "fixed",
        "no-choice",
        "other-choice",
        "empty",
        "table",
    ],
)
def test_a_bad_enqueue_table_is_refused_at_load_with_one_line(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    old, new = edit
    text = ENQUEUE_STUDY
    if new.startswith("[study.enqueue]"):  # one table, not an array of them: keep only the first
        text = text.replace('[[study.enqueue]]\n"optimizer.name" = "adam"\n"optimizer.adam.lr" = 0.002\n', "")
    assert old in text
    path = write_study(tmp_path, "bad", text.replace(old, new, 1))
    storage = storage_in(tmp_path)
    result = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", storage, "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.splitlines() == [f"Error: {path}: {message}"]
    assert not (tmp_path / "warm.db").exists()  # refused before anything was stored


def test_a_grid_study_takes_no_enqueue_table(tmp_path: Path) -> None:
    text = ENQUEUE_STUDY.replace('sampler = "random"', 'sampler = "grid"')
    text = text.replace("{ low = 0.001, high = 0.1, log = true }", "{ choices = [0.05] }")
    text = text.replace("{ low = 0.0, high = 0.9 }", "{ choices = [0.5] }")
    text = text.replace("{ low = 0.0001, high = 0.01, log = true }", "{ choices = [0.002] }")
    path = write_study(tmp_path, "grid", text)
    result = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", storage_in(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines() == [
        f"Error: {path}: study.enqueue: a grid study runs every configuration of its grid; "
        "remove [[study.enqueue]]"
    ]


# The other study searches wider than the one it warms: rmsprop, batch 100 and learning rates above
# 0.04 lie outside WARMED_STUDY. Its six configurations are all queued, so the test knows each one.
OTHER_STUDY = """
[study]
n_trials = 6
seed = 0
sampler = "random"
pruner = "none"

[[study.enqueue]]
optimizer = { name = "adam", lr = 0.01 }
data.batch_size = 50
[[study.enqueue]]
optimizer = { name = "rmsprop", lr = 0.01 }
data.batch_size = 50
[[study.enqueue]]
optimizer = { name = "sgd", lr = 0.03 }
data.batch_size = 25
[[study.enqueue]]
optimizer = { name = "adam", lr = 0.03 }
data.batch_size = 100
[[study.enqueue]]
optimizer = { name = "sgd", lr = 0.045 }
data.batch_size = 50
[[study.enqueue]]
optimizer = { name = "sgd", lr = 0.02 }
data.batch_size = 50

[data]
name = "synthetic"
batch_size = { choices = [25, 50, 100] }
train_limit = 200
test_limit = 50

[model]
name = "flaky"

[optimizer]
name = { choices = ["sgd", "adam", "rmsprop"] }
lr = { low = 0.0001, high = 0.05, log = true }

[train]
epochs = 1
"""

WARMED_STUDY = """
[study]
n_trials = 4
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = { choices = [25, 50] }
train_limit = 200
test_limit = 50

[model]
name = "flaky"

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { low = 0.001, high = 0.04, log = true }

[train]
epochs = 1
"""


def fits_warmed(params: dict[str, object]) -> bool:
    """WARMED_STUDY's space, written out by hand."""
    lr = params["optimizer.lr"]
    assert isinstance(lr, float)
    return (
        params["data.batch_size"] in (25, 50)
        and params["optimizer.name"] in ("sgd", "adam")
        and 1e-3 <= lr <= 0.04
    )


def test_warm_from_queues_the_best_trials_of_another_study_that_fit(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    run_cli(
        "run",
        "--study",
        str(write_study(tmp_path, "other", OTHER_STUDY)),
        "--storage",
        storage,
        "--device",
        "cpu",
    )
    other = optuna.load_study(study_name="other", storage=storage)
    best = sorted(other.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value, reverse=True)[:5]
    fitting = [t for t in best if fits_warmed(t.params)]
    # The premise: of the five best, some fit and some do not.
    assert 0 < len(fitting) < 5

    warmed = write_study(tmp_path, "warmed", WARMED_STUDY)
    args = [
        "run",
        "--study",
        str(warmed),
        "--storage",
        storage,
        "--device",
        "cpu",
        "--n-trials",
        str(len(fitting)),
    ]
    out = run_cli(*args, "--warm-from", "other")
    skipped = [t for t in best if t not in fitting]
    lines = out.splitlines()
    head = (
        f"warm start from other: queued {len(fitting)} of its 5 best trials to run first, "
        f"skipped {len(skipped)}:"
    )
    assert head in lines
    at = lines.index(head)
    for trial, line in zip(skipped, lines[at + 1 : at + 1 + len(skipped)], strict=True):
        assert line.startswith(f"  trial {trial.number}: "), line
        if trial.params["optimizer.name"] == "rmsprop":
            assert "optimizer.name = 'rmsprop' is not among its choices 'sgd', 'adam'" in line
        if trial.params["data.batch_size"] == 100:
            assert "data.batch_size = 100 is not among its choices 25, 50" in line
        if trial.params["optimizer.lr"] > 0.04:
            assert (
                f"optimizer.lr = {trial.params['optimizer.lr']!r} is outside its range 0.001..0.04 (log)"
                in line
            )

    study = optuna.load_study(study_name="warmed", storage=storage)
    assert [t.params for t in study.trials] == [t.params for t in fitting]
    assert queued(study) == list(range(len(fitting)))

    # Warming again from the same study queues nothing twice.
    out = run_cli(*args[:-2], "--n-trials", "1", "--warm-from", "other", "--warm-top", "2")
    assert "warm start from other: queued 0 of its 2 best trials to run first, skipped 2:" in out
    study = optuna.load_study(study_name="warmed", storage=storage)
    assert queued(study) == list(range(len(fitting))) and len(study.trials) == len(fitting) + 1


def test_warm_from_an_unknown_study_lists_the_stored_ones(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    optuna.create_study(study_name="kept", storage=storage)
    warmed = write_study(tmp_path, "warmed", WARMED_STUDY)
    result = CliRunner().invoke(
        main, ["run", "--study", str(warmed), "--storage", storage, "--warm-from", "nope"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.splitlines() == [f"Error: no study named 'nope' in {storage}; studies there: kept"]
    assert optuna.get_all_study_names(storage) == ["kept"]  # nothing made

    result = CliRunner().invoke(
        main, ["run", "--study", str(warmed), "--storage", storage, "--warm-top", "3"]
    )
    assert result.exit_code == 2 and "--warm-top goes with --warm-from OTHER_STUDY" in result.output
