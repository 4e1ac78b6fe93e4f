"""Forks: `hpsearch fork` makes a new study from an edited study file and copies into it the finished
trials of a stored study that fit the new space, leaving the stored study as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from conftest import StoredStudy, run_cli, run_stored, write_study
from hpsearch.cli import main
from hpsearch.spec import load_spec

# Every configuration is queued, so the test knows each trial: 0, 3 and 4 complete, 1 is pruned
# after its first epoch (SGD at lr 1e-5 learns nothing), 2 fails in its second batch (`flaky`).
QUEUE = """
[[study.enqueue]]
optimizer = { name = "adam", lr = 0.01 }
model.fail_after = 0
[[study.enqueue]]
optimizer = { name = "sgd", lr = 0.00001 }
model.fail_after = 0
[[study.enqueue]]
optimizer = { name = "adam", lr = 0.002 }
model.fail_after = 2
[[study.enqueue]]
optimizer = { name = "adam", lr = 0.001 }
model.fail_after = 0
[[study.enqueue]]
optimizer = { name = "sgd", lr = 0.008 }
model.fail_after = 0
"""
# The space, for the source and for the files it is forked to (which need no queued configurations).
SPACE = """
[study]
n_trials = 4
seed = 0
sampler = "random"
pruner = { name = "threshold", lower = 0.3 }

[data]
name = "synthetic"
batch_size = 50
train_limit = 200
test_limit = 50

[model]
name = "flaky"
fail_after = { choices = [0, 2] }

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { low = 0.00001, high = 0.01, log = true }
weight_decay = 0.0001

[train]
epochs = 2
"""
SOURCE_STUDY = SPACE.replace("[data]", QUEUE + "\n[data]")
CHOICES = 'name = { choices = ["sgd", "adam"] }'
SAMPLER = 'sampler = "random"'


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> StoredStudy:
    stored = run_stored(tmp_path_factory.mktemp("fork"), "source", SOURCE_STUDY)
    states = [t.state for t in stored.load().trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, *[TrialState.COMPLETE] * 2]
    return stored


def contents(study: optuna.Study) -> list[Any]:
    """Everything a study holds: its attributes and each trial, whole."""
    trials = [
        (
            t.number,
            t.state,
            t.values,
            t.params,
            {k: repr(d) for k, d in t.distributions.items()},
            t.user_attrs,
            t.system_attrs,
            t.intermediate_values,
            t.datetime_start,
            t.datetime_complete,
        )
        for t in study.get_trials()
    ]
    return [study.user_attrs, study._storage.get_study_system_attrs(study._study_id), study.direction, trials]


def fork(source: StoredStudy, name: str, text: str, *drop: int) -> tuple[int, str, Path]:
    """``hpsearch fork`` of ``source`` to ``text`` written as NAME.toml: exit code, output, the file.
    Whatever it does, the source study is left exactly as it was."""
    before = contents(source.load())
    path = write_study(source.path.parent, name, text)
    args = ["fork", "--study", source.name, "--to", str(path), "--storage", source.storage]
    args += [a for n in drop for a in ("--drop", str(n))]
    result = CliRunner().invoke(main, args)
    assert contents(source.load()) == before
    if result.exit_code:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output, path


def test_a_fork_that_widens_a_choice_keeps_every_finished_trial_and_runs_on(source: StoredStudy) -> None:
    # A choice added, another sampler, and a searched value fixed at the one every finished trial had.
    wide = SPACE.replace(CHOICES, 'name = { choices = ["sgd", "adam", "rmsprop"] }')
    wide = wide.replace(SAMPLER, 'sampler = { name = "tpe", n_startup_trials = 2 }')
    wide = wide.replace("fail_after = { choices = [0, 2] }", "fail_after = 0")
    code, out, path = fork(source, "source-wide", wide)
    assert code == 0, out
    assert out.splitlines() == [
        "forked source into source-wide: copied 4 of 5 trials (3 complete, 1 pruned)",
        "left out 1:",
        "  not finished (fail): trial 2",
    ]
    old = [t for t in source.load().trials if t.state is not TrialState.FAIL]
    new = optuna.load_study(study_name="source-wide", storage=source.storage).trials
    assert len(new) == len(old) == 4
    for a, b in zip(old, new, strict=True):
        assert a.params.pop("model.fail_after") == 0
        assert (b.state, b.values, b.params) == (a.state, a.values, a.params)
        assert b.intermediate_values == a.intermediate_values and len(b.intermediate_values) in (1, 2)
        assert (
            b.user_attrs == a.user_attrs
            and b.user_attrs["config"]["optimizer"]["name"] == a.params["optimizer.name"]
        )
        assert (b.datetime_start, b.datetime_complete) == (a.datetime_start, a.datetime_complete)
        assert b.distributions["optimizer.name"] == CategoricalDistribution(["sgd", "adam", "rmsprop"])

    # The new study's sampler sees the copied trials in the new space.
    spec = load_spec(path)
    study = optuna.load_study(study_name="source-wide", storage=source.storage, sampler=spec.sampler())
    space = study.sampler.infer_relative_search_space(study, new[0])
    assert space["optimizer.name"] == CategoricalDistribution(["sgd", "adam", "rmsprop"])
    assert set(space) == {"optimizer.name", "optimizer.lr"}

    out = run_cli(
        "run", "--study", str(path), "--storage", source.storage, "--device", "cpu", "--n-trials", "1"
    )
    assert "resuming: 4 finished trials stored" in out and "trial    4 " in out
    after = optuna.load_study(study_name="source-wide", storage=source.storage).trials
    assert len(after) == 5 and after[4].state.is_finished() and "fixed_params" not in after[4].system_attrs
    assert [t.params for t in after[:4]] == [t.params for t in new]


def test_a_fork_that_narrows_a_range_leaves_out_the_trials_outside_it(source: StoredStudy) -> None:
    narrow = SPACE.replace("high = 0.01, log = true", "high = 0.005, log = true")
    code, out, _ = fork(source, "source-narrow", narrow)
    assert code == 0, out
    assert out.splitlines() == [
        "forked source into source-narrow: copied 2 of 5 trials (1 complete, 1 pruned)",
        "left out 3:",
        "  optimizer.lr is outside its range 1e-05..0.005 (log): trials 0, 4",
        "  not finished (fail): trial 2",
    ]
    new = optuna.load_study(study_name="source-narrow", storage=source.storage).trials
    old = source.load().trials
    assert [t.params for t in new] == [old[1].params, old[3].params]
    assert all(t.params["optimizer.lr"] <= 0.005 for t in new)


def test_drop_leaves_out_the_named_trials_and_the_file_queues_what_no_copy_ran(source: StoredStudy) -> None:
    code, out, _ = fork(source, "source-dropped", SOURCE_STUDY, 0, 3)
    assert code == 0, out
    assert out.splitlines() == [
        "forked source into source-dropped: copied 2 of 5 trials (1 complete, 1 pruned)",
        "left out 3:",
        "  dropped with --drop: trials 0, 3",
        "  not finished (fail): trial 2",
    ]
    old = source.load().trials
    new = optuna.load_study(study_name="source-dropped", storage=source.storage).trials
    copied, waiting = new[:2], new[2:]
    assert [(t.values, t.params) for t in copied] == [(t.values, t.params) for t in (old[1], old[4])]
    # The same file's [[study.enqueue]] tables: those of the trials not copied are queued again.
    assert all(t.state is TrialState.WAITING for t in waiting)
    assert [t.system_attrs["fixed_params"] for t in waiting] == [old[n].params for n in (0, 2, 3)]


def test_a_fork_that_changes_what_the_trials_ran_with_copies_none_and_makes_nothing(
    source: StoredStudy,
) -> None:
    names = optuna.get_all_study_names(source.storage)
    code, out, path = fork(source, "source-longer", SPACE.replace("epochs = 2", "epochs = 3"))
    assert code == 1
    assert out.splitlines() == [
        f"Error: no trial of source fits {path}, so no study was made: train.epochs is fixed at 3 in this "
        "study: trials 0, 1, 3, 4; not finished (fail): trial 2"
    ]
    # A value the file used to set, now left to the optimizer's default, is a change too.
    code, out, _ = fork(source, "source-default", SPACE.replace("weight_decay = 0.0001\n", ""))
    assert (
        code == 1
        and "optimizer.weight_decay: ran with 0.0001, the new file gives 0: trials 0, 1, 3, 4" in out
    )
    assert optuna.get_all_study_names(source.storage) == names


@pytest.mark.parametrize(
    ("source_name", "text", "drop", "message"),
    [
        ("nope", SOURCE_STUDY, (), "no study named 'nope' in {storage}; studies there: "),
        ("source", SOURCE_STUDY.replace("[model]", "[modell]"), (), "{path}: [modell]: unknown section"),
        ("source", SOURCE_STUDY, (9,), "--drop 9: study 'source' has no trial 9 (its trials: 0..4)"),
        (
            "source",
            SOURCE_STUDY.replace("seed = 0", "seed = 1"),
            (),
            "{path}: study.seed = 1, but 'source' was run with seed 0, which chose the validation split "
            "its values were measured on; set seed = 0",
        ),
        (
            "source",
            SOURCE_STUDY.replace("seed = 0", 'seed = 0\nobjective = "best"'),
            (),
            '{path}: study.objective = "best", but \'source\' was run with objective = "last": its '
            "trials' values are their last epoch's; set objective = \"last\"",
        ),
        (
            "source",
            SOURCE_STUDY.replace("seed = 0", 'seed = 0\nobjectives = ["accuracy", "params"]').replace(
                'pruner = { name = "threshold", lower = 0.3 }', 'pruner = "none"'
            ),
            (),
            "{path}: study.objectives = ['accuracy', 'params'], but 'source' was run with objectives = "
            "['accuracy']: its trials' values are those; set objectives = ['accuracy']",
        ),
        (
            "source",
            SOURCE_STUDY,
            (),
            "study 'source' exists already in {storage}; the new study is named after its file: copy "
            "{path} to a new name, or delete the old study with "
            "`optuna delete-study --study-name source --storage URL`",
        ),
    ],
    ids=[
        "unknown-source",
        "bad-file",
        "unknown-drop",
        "other-seed",
        "other-objective",
        "other-objectives",
        "target-exists",
    ],
)
def test_a_fork_that_cannot_be_made_is_refused_with_one_line(
    source: StoredStudy, source_name: str, text: str, drop: tuple[int, ...], message: str, tmp_path: Path
) -> None:
    names = optuna.get_all_study_names(source.storage)
    # The target is named after its file: "source" for the last case, a fresh name otherwise.
    target = "source" if "exists already" in message else "source-refused"
    path = write_study(tmp_path, target, text)
    args = ["fork", "--study", source_name, "--to", str(path), "--storage", source.storage]
    args += [a for n in drop for a in ("--drop", str(n))]
    before = contents(source.load())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.splitlines()
    assert line.startswith("Error: " + message.format(storage=source.storage, path=path)), line
    assert optuna.get_all_study_names(source.storage) == names
    assert contents(source.load()) == before


GRID_STUDY = """
[study]
sampler = "grid"
pruner = "none"

[data]
name = "synthetic"
batch_size = 50
train_limit = 100
test_limit = 50

[model]
name = "flaky"

[optimizer]
name = "adam"
lr = { choices = [0.01, 0.003] }

[train]
epochs = 1
"""


def test_a_forked_grid_queues_only_the_configurations_no_copied_trial_ran(tmp_path: Path) -> None:
    grid = run_stored(tmp_path, "grid", GRID_STUDY)
    wider = GRID_STUDY.replace('name = "adam"', 'name = { choices = ["adam", "sgd"] }')
    wider = wider.replace("[0.01, 0.003]", "[0.01, 0.003, 0.001]")
    code, out, path = fork(grid, "grid-wider", wider)
    assert code == 0 and out.startswith("forked grid into grid-wider: copied 2 of 2 trials (2 complete)\n")
    study = optuna.load_study(study_name="grid-wider", storage=grid.storage)
    copied, waiting = study.trials[:2], study.trials[2:]
    assert [t.params for t in copied] == [
        {"optimizer.name": "adam", "optimizer.lr": lr} for lr in (0.01, 0.003)
    ]
    assert all(t.state is TrialState.WAITING for t in waiting)
    queued = sorted(
        (t.system_attrs["fixed_params"]["optimizer.name"], t.system_attrs["fixed_params"]["optimizer.lr"])
        for t in waiting
    )
    assert queued == [("adam", 0.001), ("sgd", 0.001), ("sgd", 0.003), ("sgd", 0.01)]
    assert load_spec(path).n_trials == 6  # the grid's size: the copies and the queue fill it exactly
