"""Trials outlive their workers: real ``hpsearch run`` processes killed with real signals.

Every trial of ``STUDY`` has the same configuration and seed, so every uninterrupted trial trains
the same numbers: a trial resumed from a checkpoint must reproduce them bit for bit (the training
loss of each epoch is compared with ``==``), which it does only if the model, the optimizer, the
scheduler and every random state came back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from conftest import write_study
from hpsearch.checkpoint import Checkpoints
from hpsearch.storage import write_leftovers

pytestmark = pytest.mark.slow  # real processes, each importing torch

# Dropout (torch's global random state), flips and shuffling (the trial's generator), momentum
# (the optimizer's state) and a step schedule (the scheduler's): a resume that lost any of them
# would train other numbers. About a second an epoch on one core.
STUDY = """
[study]
n_trials = 2
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 50
flip = true

[model]
name = "alexnet28"
dropout = 0.3

[optimizer]
name = "sgd"
lr = 0.003
momentum = 0.9

[scheduler]
name = "step"
step_size = 2
gamma = 0.5

[train]
epochs = 4
seed = 11
"""
INTERRUPTED = (
    "interrupted: finished trials and the running trial's checkpoint are kept; run the same command to resume"
)


def start(tmp_path: Path, storage: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "hpsearch", "run", "--study", "resume.toml", "--storage", storage]
    return subprocess.Popen(
        [*cmd, "--device", "cpu"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def trials(storage: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name="resume", storage=storage).trials


def running_after(storage: str, epochs: int, procs: list[subprocess.Popen[str]]) -> FrozenTrial:
    """The first running trial that has reported ``epochs`` epochs, so is in epoch ``epochs + 1``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a worker ended before it was signalled"
        try:
            for t in trials(storage):
                if t.state == TrialState.RUNNING and len(t.intermediate_values) == epochs:
                    return t
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"no trial reached epoch {epochs + 1} in time")


def pid(trial: FrozenTrial) -> int:
    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])


def finished(procs: list[subprocess.Popen[str]]) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        assert "Traceback" not in err, err
        errs.append(err)
    return errs


def check_resumed(all_trials: list[FrozenTrial], cut: FrozenTrial, epoch: int) -> FrozenTrial:
    """The continuation of ``cut`` resumed after ``epoch`` and trained what an uninterrupted trial did."""
    (cont,) = [t for t in all_trials if t.user_attrs.get("continues") == cut.number]
    assert cont.state == TrialState.COMPLETE
    assert cont.user_attrs["resumed_epoch"] == epoch  # it started at epoch + 1
    assert cont.user_attrs["chain"] == cut.number and cont.params == cut.params
    whole = [t for t in all_trials if t.state == TrialState.COMPLETE and "continues" not in t.user_attrs]
    assert whole, "no uninterrupted trial to compare with"
    for key in ("train_loss", "val_acc", "l1_penalty"):
        assert cont.user_attrs[key] == whole[0].user_attrs[key], key
    assert cont.intermediate_values == whole[0].intermediate_values
    assert cont.user_attrs["test_acc"] == whole[0].user_attrs["test_acc"]
    return cont


def checkpoint_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "db-artifacts" / "checkpoints" / "resume"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_worker_killed_mid_trial_costs_one_epoch_and_the_other_resumes_its_trial(tmp_path: Path) -> None:
    write_study(tmp_path, "resume", STUDY)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    procs = [start(tmp_path, storage) for _ in "ab"]
    try:
        cut = running_after(storage, 2, procs)
        os.kill(pid(cut), signal.SIGKILL)
        victim = next(p for p in procs if p.pid == pid(cut))
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        finished([p for p in procs if p is not victim])
    finally:
        for p in procs:
            p.kill()
    stored = trials(storage)
    lost = next(t for t in stored if t.number == cut.number)
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["fail_reason"].endswith("lost in epoch 3")
    check_resumed(stored, lost, 2)
    states = [t.state for t in stored]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.FAIL) == 1
    assert checkpoint_files(tmp_path) == []  # deleted as each trial ended


def test_a_rerun_right_after_a_kill_resumes_and_fills_the_budget_exactly(tmp_path: Path) -> None:
    write_study(tmp_path, "resume", STUDY)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = start(tmp_path, storage)
    try:
        cut = running_after(storage, 1, [first])
        first.kill()
        first.wait(timeout=30)
    finally:
        first.kill()
    assert checkpoint_files(tmp_path) == [f"trial-{cut.number}.pt"]
    (err,) = finished([start(tmp_path, storage)])  # at once: the dead worker's trial is not waited for
    stored = trials(storage)
    assert [t.state for t in stored].count(TrialState.COMPLETE) == 2
    check_resumed(stored, next(t for t in stored if t.number == cut.number), 1)
    assert "checkpoints: " in err and checkpoint_files(tmp_path) == []


def test_sigterm_mid_trial_keeps_its_checkpoint_and_the_rerun_resumes_it(tmp_path: Path) -> None:
    write_study(tmp_path, "resume", STUDY)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    proc = start(tmp_path, storage)
    try:
        cut = running_after(storage, 1, [proc])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == INTERRUPTED
    assert "Traceback" not in err
    stopped = next(t for t in trials(storage) if t.number == cut.number)
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["fail_reason"] == "interrupted in epoch 2"
    queued = [t for t in trials(storage) if t.state == TrialState.WAITING]
    assert [t.user_attrs["continues"] for t in queued] == [cut.number]
    assert checkpoint_files(tmp_path) == [f"trial-{cut.number}.pt"]

    finished([start(tmp_path, storage)])
    stored = trials(storage)
    check_resumed(stored, stopped, 1)
    assert [t.state for t in stored].count(TrialState.COMPLETE) == 2
    assert checkpoint_files(tmp_path) == []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def gone(pids: set[int], within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def workers_in_epoch_two(storage: str, parent: subprocess.Popen[str]) -> set[int]:
    """The pids of both workers, once each has a running trial past its first epoch."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert parent.poll() is None, "the run ended before it was signalled"
        try:
            busy = [t for t in trials(storage) if t.state == TrialState.RUNNING and t.intermediate_values]
        except KeyError:
            busy = []
        if len(busy) == 2:
            return {pid(t) for t in busy}
        time.sleep(0.05)
    raise AssertionError("the two workers did not both reach epoch 2 in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_workers_of_one_run_stop_with_it(tmp_path: Path, sig: signal.Signals) -> None:
    # Forty epochs: however far apart the two workers started, both are inside their trials when the
    # signal lands (the run is stopped long before they would end).
    write_study(tmp_path, "resume", STUDY.replace("epochs = 4", "epochs = 40"))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cmd = [sys.executable, "-m", "hpsearch", "run", "--study", "resume.toml", "--storage", storage]
    parent = subprocess.Popen(
        [*cmd, "--device", "cpu", "--workers", "2"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        children = workers_in_epoch_two(storage, parent)
        parent.send_signal(sig)
        _, err = parent.communicate(timeout=90)
    finally:
        parent.kill()
    # No worker outlives the run, even one killed outright; each ends its trial keeping its checkpoint.
    assert gone(children)
    assert "Traceback" not in err
    if sig == signal.SIGTERM:
        assert parent.returncode == 130 and err.strip().splitlines()[-1] == INTERRUPTED
    stopped = [t for t in trials(storage) if t.state == TrialState.FAIL]
    assert sorted(pid(t) for t in stopped) == sorted(children)
    assert all(t.user_attrs["fail_reason"].startswith("interrupted in epoch") for t in stopped)
    queued = [t for t in trials(storage) if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["continues"] for t in queued) == sorted(t.number for t in stopped)
    assert checkpoint_files(tmp_path) == sorted(f"trial-{t.number}.pt" for t in stopped)


def test_deleting_a_checkpoint_removes_what_a_killed_write_of_it_left(tmp_path: Path) -> None:
    # A worker killed inside ``atomic_write`` leaves its hidden temporary file beside the checkpoint.
    store = Checkpoints(tmp_path / "checkpoints")
    store.save(3, {"epoch": 1})
    store.save(31, {"epoch": 2})
    left = store.folder / ".trial-3.pt.0a1b2c3d.tmp"
    left.write_bytes(b"half a checkpoint")
    assert write_leftovers(store.path(3)) == [left]
    store.delete(3)
    assert sorted(p.name for p in store.folder.iterdir()) == ["trial-31.pt"]
