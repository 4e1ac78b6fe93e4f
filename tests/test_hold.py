"""A signal stops training at once, but never a worker half way through its bookkeeping.

Real signals, sent to this process with ``os.kill`` at the moment under test.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import write_study
from hpsearch import record, signals
from hpsearch.checkpoint import Checkpoints
from hpsearch.record import TrialRecord
from hpsearch.spec import load_spec
from hpsearch.study import open_study, run_study

STUDY = """
[study]
n_trials = 3
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 64
train_limit = 301

[model]
name = "lenet"

[optimizer]
name = "sgd"
lr = { low = 0.001, high = 0.1, log = true }

[train]
epochs = 2
"""

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


@pytest.fixture
def as_the_cli() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as ``hpsearch run`` sets it up."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_outside_training_waits_for_the_next_check() -> None:
    with signals.guard():
        os.kill(os.getpid(), signal.SIGTERM)
        reached = True  # not interrupted: the signal is held
        with pytest.raises(KeyboardInterrupt):
            signals.check()
        signals.check()  # raised once
    assert reached


def test_a_signal_inside_training_is_raised_at_once() -> None:
    after = []
    with signals.guard(), pytest.raises(KeyboardInterrupt), signals.live():
        os.kill(os.getpid(), signal.SIGINT)
        after.append("ran on")
    assert after == []


def test_a_held_signal_stops_the_next_training_before_it_starts() -> None:
    with signals.guard():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt), signals.live():
            pytest.fail("the held signal should have been raised on entry")


def test_a_second_signal_is_not_held() -> None:
    with signals.guard(), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the second signal should have been raised at once")


def test_the_handlers_come_back_after_the_guard() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with signals.guard():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.usefixtures("as_the_cli")
def test_a_signal_while_a_trial_is_written_down_lets_it_finish(tmp_path: Path, monkeypatch: Any) -> None:
    """SIGTERM arrives as the finished trial's record is being saved: the record is saved whole,
    the trial is told COMPLETE, and then the run stops, starting no other trial."""
    spec = load_spec(str(write_study(tmp_path, "hold", STUDY)))
    study = open_study(spec, f"sqlite:///{tmp_path / 'db.sqlite'}")
    save = TrialRecord.save

    def save_while_signalled(self: TrialRecord, trial: optuna.Trial, task: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        save(self, trial, task)

    monkeypatch.setattr(TrialRecord, "save", save_while_signalled)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, study, device="cpu", checkpoints=Checkpoints(tmp_path / "checkpoints"))
    [trial] = study.trials
    assert trial.state == TrialState.COMPLETE
    rec = TrialRecord.of(trial, spec.task)
    assert rec.fail_reason is None and len(rec.val) == 2 and rec.test is not None
    assert record.EPOCHS_RUN in trial.user_attrs and record.RUN_TIME in trial.user_attrs
    assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler


@pytest.mark.usefixtures("as_the_cli")
@pytest.mark.parametrize("pack", [1, 3])
def test_a_signal_while_trials_are_asked_ends_every_one_of_them(
    tmp_path: Path, monkeypatch: Any, pack: int
) -> None:
    """SIGTERM arrives as the study hands out a trial, before any has started to train: the signal
    is raised as training would begin, and every trial asked is failed as interrupted with its
    continuation queued, none left running."""
    spec = load_spec(str(write_study(tmp_path, "asked", STUDY)))
    study = open_study(spec, f"sqlite:///{tmp_path / 'db.sqlite'}")
    ask = optuna.Study.ask

    def ask_while_signalled(self: optuna.Study, *args: Any, **kwargs: Any) -> optuna.Trial:
        trial = ask(self, *args, **kwargs)
        if trial.number == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return trial

    monkeypatch.setattr(optuna.Study, "ask", ask_while_signalled)
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, study, device="cpu", checkpoints=Checkpoints(tmp_path / "checkpoints"), pack=pack)
    monkeypatch.undo()
    trials = study.trials
    asked = [t for t in trials if record.CONTINUES not in t.user_attrs]
    assert [t.number for t in asked] == list(range(pack))
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(t.state == TrialState.FAIL for t in asked)
    assert all(t.user_attrs["fail_reason"] == "interrupted while starting" for t in asked)
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[record.CONTINUES] for t in queued) == list(range(pack))
