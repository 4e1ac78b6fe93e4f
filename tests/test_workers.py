"""`hpsearch run --workers N`: N real processes sharing one SQLite study and its exact budget."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import QUICK_STUDY, run_cli, write_study

# A seeded sampler and a budget that eight workers race to fill.
RACE_STUDY = QUICK_STUDY.replace("n_trials = 6", "n_trials = 24").replace(
    'sampler = "random"', 'sampler = { name = "tpe", seed = 0 }'
)


def pid_of(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])


@pytest.mark.slow  # eight worker processes, each importing torch
def test_eight_workers_finish_exactly_the_budget_then_add_trials(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, "workers", RACE_STUDY)
    storage = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    out = run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu", "--workers", "8")
    children = capfd.readouterr().err  # the workers write to the inherited stderr, not the runner's
    assert out.count("best trial") == 1  # the parent's summary only
    assert "database is locked" not in out + children
    assert children.count("study workers:") == 8

    trials = optuna.load_study(study_name="workers", storage=storage).trials
    assert len(trials) == 24  # not one more: no trial was even started past the budget
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({pid_of(t) for t in trials}) > 1
    # Each worker samples from its own random stream, not the same seeded sequence.
    assert len({tuple(t.params.values()) for t in trials}) == len(trials)
    # On the CPU the workers split the cores instead of each taking all of them.
    cores = len(os.sched_getaffinity(0))
    assert {t.user_attrs["threads"] for t in trials} == {max(1, cores // 8)}

    run_cli(
        "run",
        "--study",
        str(path),
        "--storage",
        storage,
        "--device",
        "cpu",
        "--workers",
        "2",
        "--n-trials",
        "3",
    )
    more = optuna.load_study(study_name="workers", storage=storage).trials[len(trials) :]
    assert len(more) == 3 and {t.state for t in more} == {TrialState.COMPLETE}
    assert len({pid_of(t) for t in more}) == 2  # split 2 + 1
    assert {t.user_attrs["threads"] for t in more} == {max(1, cores // 2)}
    assert "database is locked" not in capfd.readouterr().err
