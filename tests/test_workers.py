"""`hpsearch run --workers N`: N real processes sharing one SQLite study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import QUICK_STUDY, run_cli, write_study


def pid_of(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])


@pytest.mark.slow  # two worker processes, each importing torch
def test_two_workers_fill_one_sqlite_study_then_add_trials(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path, "workers", QUICK_STUDY)
    storage = f"sqlite:///{tmp_path / 'hpsearch.db'}"
    out = run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu", "--workers", "2")
    children = capfd.readouterr().err  # the workers write to the inherited stderr, not the runner's
    assert "best trial" in out
    assert out.count("best trial") == 1  # the parent's summary only
    assert "database is locked" not in out + children
    assert children.count("study workers:") == 2

    trials = optuna.load_study(study_name="workers", storage=storage).trials
    # MaxTrialsCallback lets a worker start one more trial while the other's last one finishes.
    assert 6 <= len(trials) <= 7
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({pid_of(t) for t in trials}) == 2
    # Each worker samples from its own random stream, not the same seeded sequence.
    assert len({tuple(t.params.values()) for t in trials}) == len(trials)

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
    assert "database is locked" not in capfd.readouterr().err
