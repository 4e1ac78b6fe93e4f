"""Budgets, lost trials and time limits in ``run_study``, in process, on real SQLite files.

A worker on another machine is played by a trial this test starts itself through Optuna and
leaves running, with the worker attribute a real one would write and (or not) a heartbeat; a dead
worker of this machine is a process that has really ended.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import write_study
from hpsearch.checkpoint import Checkpoints
from hpsearch.spec import SpecError, load_spec
from hpsearch.study import finished, open_study, run_study

STUDY = """
[study]
n_trials = {n_trials}
sampler = "random"
pruner = "none"
retries = {retries}
heartbeat = {{ interval = 1, grace = 2 }}

[data]
name = "synthetic"
batch_size = 64
train_limit = 301

[model]
name = "sleepy"

[optimizer]
name = "sgd"
lr = {{ low = 0.001, high = 0.1, log = true }}

[train]
epochs = 2
"""


def setup(tmp_path: Path, n_trials: int = 2, retries: int = 3) -> tuple[optuna.Study, Checkpoints, str]:
    path = write_study(tmp_path, "budget", STUDY.format(n_trials=n_trials, retries=retries))
    spec = load_spec(str(path))
    study = open_study(spec, f"sqlite:///{tmp_path / 'db.sqlite'}")
    return study, Checkpoints(tmp_path / "checkpoints"), str(path)


# The trials played by this test are asked for outside Optuna's optimize loop, which Optuna notes.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def elsewhere(study: optuna.Study, epochs: int, beat: bool = True) -> optuna.Trial:
    """A trial running on another machine, ``epochs`` epochs in, its heartbeat just recorded."""
    trial = study.ask()
    trial.suggest_float("optimizer.lr", 0.001, 0.1, log=True)
    trial.set_user_attr("worker", "another-host:4242")
    for epoch in range(1, epochs + 1):
        trial.report(0.5, epoch)
    if beat:
        study._storage.record_heartbeat(trial._trial_id)
    return trial


def run(path: str, study: optuna.Study, checkpoints: Checkpoints) -> None:
    run_study(load_spec(path), study, device="cpu", checkpoints=checkpoints)


def test_a_trial_running_elsewhere_counts_towards_the_budget_while_it_beats(tmp_path: Path) -> None:
    study, checkpoints, path = setup(tmp_path, n_trials=1)
    remote = elsewhere(study, 1)
    run(path, study, checkpoints)  # the budget of one is taken by the live remote trial
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    assert study.trials[0].number == remote.number


def test_a_stale_trial_is_failed_and_continued_so_the_budget_fills(tmp_path: Path) -> None:
    study, checkpoints, path = setup(tmp_path, n_trials=2)
    remote = elsewhere(study, 1)
    time.sleep(3.5)  # past the grace of 2 s (SQLite's clock counts whole seconds): taken for dead
    run(path, study, checkpoints)
    trials = study.trials
    lost = trials[remote.number]
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["fail_reason"] == "worker another-host:4242 lost in epoch 2"
    (cont,) = [t for t in trials if t.user_attrs.get("continues") == remote.number]
    assert cont.state == TrialState.COMPLETE and cont.params == lost.params
    # No checkpoint was left on this machine: it trained again from epoch 1.
    assert "resumed_epoch" not in cont.user_attrs and len(cont.user_attrs["val_acc"]) == 2
    assert finished(study) == 2 and len(trials) == 3


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_chain_past_its_retries_is_given_up_and_its_checkpoint_deleted(tmp_path: Path) -> None:
    study, checkpoints, path = setup(tmp_path, n_trials=1, retries=0)
    orphan = elsewhere(study, 1, beat=False)
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid()}")
    checkpoints.save(orphan.number, {"epoch": 1})
    run(path, study, checkpoints)
    lost, fresh = study.trials
    assert lost.state == TrialState.FAIL and "lost in epoch 2" in lost.user_attrs["fail_reason"]
    assert "continues" not in fresh.user_attrs and fresh.state == TrialState.COMPLETE
    assert not checkpoints.path(orphan.number).exists()


def test_a_chain_within_its_retries_is_continued_and_ends_without_a_checkpoint(tmp_path: Path) -> None:
    study, checkpoints, path = setup(tmp_path, n_trials=1, retries=1)
    orphan = elsewhere(study, 1, beat=False)
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid()}")
    run(path, study, checkpoints)
    lost, cont = study.trials
    assert cont.user_attrs["continues"] == lost.number and cont.user_attrs["retries"] == 1
    assert cont.state == TrialState.COMPLETE and not checkpoints.folder.joinpath("trial-0.pt").exists()


SLOW_GRID = """
[study]
sampler = "grid"
pruner = "none"

[data]
name = "synthetic"
batch_size = 10
train_limit = 301

[model]
name = "sleepy"
delay = { choices = [0.0, 0.2] }

[optimizer]
name = "sgd"
lr = 0.01

[train]
epochs = 2
max_minutes = 0.05
"""


def test_a_trial_past_its_time_limit_stops_and_the_study_goes_on(tmp_path: Path) -> None:
    path = write_study(tmp_path, "slow", SLOW_GRID)
    spec = load_spec(str(path))
    study = open_study(spec, f"sqlite:///{tmp_path / 'db.sqlite'}")
    summary = run_study(spec, study, device="cpu", checkpoints=Checkpoints(tmp_path / "ckpt"))
    assert summary.ran == 2
    by_delay = {t.params["model.delay"]: t for t in study.trials}
    fast, slow = by_delay[0.0], by_delay[0.2]
    assert fast.state == TrialState.COMPLETE and fast.user_attrs["epochs_run"] == 2
    # 3 s allowed, 0.2 s a batch, 28 batches an epoch: the check after 16 batches stops it.
    assert slow.state == TrialState.PRUNED
    assert slow.user_attrs["stop_reason"] == "time limit of 0.05 min reached in epoch 1"
    assert 3 < slow.user_attrs["run_time_s"] < 6


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("heartbeat = 10", "study.heartbeat: must be a table like {interval = 10, grace = 60}, not 10"),
        ("heartbeat = { interval = 0 }", "interval must be a whole number of seconds, at least 1, not 0"),
        ("heartbeat = { interval = 60 }", "grace must be a whole number of seconds longer than interval"),
        ("heartbeat = { beat = 3 }", "unknown key 'beat' in heartbeat; valid: interval, grace"),
        ("retries = -1", "retries must be 0 or more, not -1"),
    ],
)
def test_bad_robustness_settings_are_one_line(tmp_path: Path, line: str, message: str) -> None:
    text = STUDY.format(n_trials=1, retries=0).replace("heartbeat = { interval = 1, grace = 2 }", line)
    text = text.replace("retries = 0\n", "") if line.startswith("retries") else text
    path = write_study(tmp_path, "bad", text)
    with pytest.raises(SpecError) as err:
        load_spec(str(path))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_workers_record_the_threads_they_train_with(tmp_path: Path) -> None:
    study, checkpoints, path = setup(tmp_path, n_trials=1)
    run(path, study, checkpoints)
    assert study.trials[0].user_attrs["threads"] == torch.get_num_threads()
