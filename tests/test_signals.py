"""Ctrl-C and SIGTERM on a real ``hpsearch run`` process: one line, exit 130, finished trials kept."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import QUICK_STUDY, write_study

pytestmark = pytest.mark.slow  # each test starts an interpreter that imports torch


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hpsearch", "run", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=answer_ctrl_c,
    )


def answer_ctrl_c() -> None:
    """In the child: SIGINT as a terminal delivers it. A test run started in the background of a
    shell inherits SIGINT ignored, and Python then installs no handler for it at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def importing_torch(pid: int) -> bool:
    """Whether the process has begun loading torch's library: well inside hpsearch's imports."""
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def test_ctrl_c_while_starting_is_one_line(tmp_path: Path) -> None:
    proc = start(tmp_path, "--study", "quickstart")
    # Inside the imports, before any output, however busy the machine is.
    deadline = time.monotonic() + 30
    while not importing_torch(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["interrupted while starting; nothing was run"], err
    assert out == ""
    assert not (tmp_path / "hpsearch.db").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_the_run_keeps_finished_trials(tmp_path: Path, sig: signal.Signals) -> None:
    # Twenty 1-epoch trials: the signal comes once the first has finished, long before the last.
    text = QUICK_STUDY.replace("n_trials = 6", "n_trials = 20").replace('"mnist_cnn"', '"lenet"')
    path = write_study(tmp_path, "signals", text)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    proc = start(tmp_path, "--study", str(path), "--storage", storage, "--device", "cpu")
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the run's own account: signal once a trial has finished
        seen.append(line)
        if line.startswith("trial    0 "):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("interrupted: finished trials and the running trial's checkpoint"), err
    assert not any("Traceback" in line for line in lines), err
    trials = optuna.load_study(study_name="signals", storage=storage).trials
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 1 <= len(finished) < 20
    # The trial the signal cut short is failed and says why, not left running, and its
    # continuation is queued for the next run.
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    cut = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"].startswith("interrupted") for t in cut)
    queued = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["continues"] for t in queued] == [t.number for t in cut]
