"""What a trial and a study store in Optuna, under which names, and how it is read back.

Training writes a ``TrialRecord`` once, when the trial ends however it ends; export, report and
the CLI read it with ``TrialRecord.of``. Every user-attribute name lives here, so a column, a
figure and Optuna's own CLI all mean the same thing by it.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpsearch.task import CLASSIFICATION, TASKS, Task

# Study attributes.
SPEC = "spec"  # the resolved study file, as tables
SPEC_SOURCE = "spec_source"  # the study file's text
DESCRIPTION = "description"
TASK = "task"  # the task's name: classification or regression
METRIC = "metric"  # the task's metric, also kept for studies stored before TASK existed
HPSEARCH_VERSION = "hpsearch_version"
TORCH_VERSION = "torch_version"

# Trial attributes, besides the task's per-epoch validation key and test key (``Task.val_key``).
CONFIG = "config"
SEED = "seed"
DEVICE = "device"
WORKER = "worker"
N_PARAMS = "n_params"
TRAIN_LOSS = "train_loss"  # mean data loss per epoch (the L1 penalty is not in it)
L1_PENALTY = "l1_penalty"  # mean L1 penalty term (coefficient × |weights|) per epoch
EPOCH_TIME = "epoch_time_s"
EPOCHS_RUN = "epochs_run"  # epochs trained to the end and evaluated
RUN_TIME = "run_time_s"  # the whole trial, building and testing included
EXAMPLES_PER_S = "examples_per_s"  # training examples per second of training
LATENCY = "latency_ms"  # milliseconds to classify one test example on the trial's device
FINAL_TRAIN_LOSS = "final_train_loss"
BEST_VAL = "best_val"  # the best epoch's validation metric (the task's direction decides best)
BEST_EPOCH = "best_epoch"  # that epoch, from 1; the first of equal ones
STOP_REASON = "stop_reason"  # why a pruned trial stopped (pruned, or diverged)
STOP_EPOCH = "stop_epoch"  # the epoch it stopped in
FAIL_REASON = "fail_reason"  # the exception that failed a trial, as one line
# The training batch size of a trial that ran out of device memory: later trials sample below it.
OOM_BATCH_SIZE = "oom_batch_size"
# Optuna's system attribute of a queued trial's fixed parameters: a grid's configurations.
QUEUED = "fixed_params"
THREADS = "threads"  # CPU threads the trial's process trained with
# A trial that continues one whose worker died or was stopped: the number of the trial it
# continues, the first trial of the chain (whose number names the checkpoint), how many of the
# chain's workers crashed, and the epoch whose checkpoint this trial started from.
CONTINUES = "continues"
CHAIN = "chain"
RETRIES = "retries"
RESUMED_EPOCH = "resumed_epoch"
PACK = "pack"  # the trials trained with it as one batched model (``run --pack``), itself included

# ``[study] objective``: which epoch's validation metric a finished trial reports as its value
# (``TrialRecord.final_value``); each epoch's own is reported as it ends either way.
OBJECTIVES = ("last", "best")


def worker_id() -> str:
    """This process, as a trial records it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def orphaned(trial: FrozenTrial) -> bool:
    """True for a RUNNING trial whose worker was a process on this machine that is gone, or this
    very process (which, when it asks, runs no trial)."""
    host, _, pid = str(trial.user_attrs.get(WORKER, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def study_task(study: optuna.Study) -> Task:
    """The task a stored study was made for."""
    attrs = study.user_attrs
    if attrs.get(TASK) in TASKS:
        return TASKS[attrs[TASK]]
    return next((t for t in TASKS.values() if t.metric == attrs.get(METRIC)), CLASSIFICATION)


@dataclass
class TrialRecord:
    """One trial's record: what it ran with, each epoch's numbers, and how it ended."""

    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    device: str | None = None
    worker: str | None = None
    n_params: int | None = None
    train_loss: list[float] = field(default_factory=list)
    l1_penalty: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    epoch_time_s: list[float] = field(default_factory=list)
    examples_per_s: float | None = None  # training examples per second of training
    run_time_s: float = 0.0
    test: float | None = None
    latency_ms: float | None = None
    stop_reason: str | None = None
    stop_epoch: int | None = None
    fail_reason: str | None = None
    oom_batch_size: int | None = None
    threads: int | None = None
    continues: int | None = None  # written when the continuation is queued, read back only
    resumed_epoch: int | None = None
    pack: list[int] | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.val)

    @property
    def reason(self) -> str | None:
        """Why the trial ended early, if it did."""
        return self.stop_reason or self.fail_reason

    def best(self, task: Task) -> tuple[int, float] | None:
        """The best epoch (from 1) and its validation metric; None before any epoch was evaluated."""
        i = task.best(self.val)
        return None if i is None else (i + 1, self.val[i])

    def final_value(self, objective: str, task: Task) -> float:
        """What a trial that trained every epoch reports as its value: its last epoch's validation
        metric, or with ``objective = "best"`` its best epoch's."""
        best = self.best(task)
        if objective == "best" and best is not None:
            return best[1]
        return self.val[-1]

    def add_epoch(self, loss: float, penalty: float, value: float, seconds: float, speed: float) -> None:
        """One epoch's mean data loss and penalty, validation metric, wall time and examples per second."""
        n = len(self.val)
        self.train_loss.append(loss)
        self.l1_penalty.append(penalty)
        self.val.append(value)
        self.epoch_time_s.append(seconds)
        # The mean over epochs, so one slow first epoch (warm-up) does not define the speed.
        self.examples_per_s = ((self.examples_per_s or 0.0) * n + speed) / (n + 1)

    def claim(self, trial: optuna.Trial) -> None:
        """Write the worker at once (all else is written at the end), so a trial left running by a
        process that died can be told from one still running (``orphaned``)."""
        trial.set_user_attr(WORKER, self.worker)

    def history(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record: every epoch so far and the time spent."""
        return {
            "train_loss": self.train_loss,
            "l1_penalty": self.l1_penalty,
            "val": self.val,
            "epoch_time_s": self.epoch_time_s,
            "examples_per_s": self.examples_per_s,
            "run_time_s": self.run_time_s,
        }

    def restore(self, history: dict[str, Any]) -> None:
        for key, value in history.items():
            setattr(self, key, list(value) if isinstance(value, list) else value)

    def stop(self, epoch: int, reason: str) -> None:
        self.stop_epoch, self.stop_reason = epoch, reason

    def save(self, trial: optuna.Trial, task: Task) -> None:
        """Write the record as the trial's user attributes (absent values are not written)."""
        best = self.best(task)
        attrs: dict[str, Any] = {
            CONFIG: self.config,
            SEED: self.seed,
            DEVICE: self.device,
            WORKER: self.worker,
            N_PARAMS: self.n_params,
            TRAIN_LOSS: self.train_loss,
            L1_PENALTY: self.l1_penalty,
            task.val_key: self.val,
            BEST_VAL: best[1] if best else None,
            BEST_EPOCH: best[0] if best else None,
            EPOCH_TIME: self.epoch_time_s,
            EPOCHS_RUN: self.epochs_run,
            RUN_TIME: self.run_time_s,
            EXAMPLES_PER_S: self.examples_per_s,
            FINAL_TRAIN_LOSS: self.train_loss[-1] if self.train_loss else None,
            task.test_key: self.test,
            LATENCY: self.latency_ms,
            STOP_REASON: self.stop_reason,
            STOP_EPOCH: self.stop_epoch,
            FAIL_REASON: self.fail_reason,
            OOM_BATCH_SIZE: self.oom_batch_size,
            THREADS: self.threads,
            RESUMED_EPOCH: self.resumed_epoch,
            PACK: self.pack,
        }
        for key, value in attrs.items():
            if value is not None:
                trial.set_user_attr(key, _storable(value))

    @classmethod
    def of(cls, trial: FrozenTrial, task: Task) -> TrialRecord:
        """The record of a stored trial; what it never wrote is empty or None."""
        a = trial.user_attrs
        val = [float(v) for v in a.get(task.val_key) or []]
        loss = [float(v) for v in a.get(TRAIN_LOSS) or []]
        return cls(
            config=dict(a[CONFIG]) if isinstance(a.get(CONFIG), dict) else {},
            seed=a.get(SEED),
            device=a.get(DEVICE),
            worker=a.get(WORKER),
            n_params=a.get(N_PARAMS),
            train_loss=loss,
            l1_penalty=[float(v) for v in a.get(L1_PENALTY) or []],
            val=val,
            epoch_time_s=[float(v) for v in a.get(EPOCH_TIME) or []],
            examples_per_s=a.get(EXAMPLES_PER_S),
            run_time_s=float(a.get(RUN_TIME) or 0.0),
            test=a.get(task.test_key),
            latency_ms=a.get(LATENCY),
            stop_reason=a.get(STOP_REASON),
            stop_epoch=a.get(STOP_EPOCH),
            fail_reason=a.get(FAIL_REASON),
            oom_batch_size=a.get(OOM_BATCH_SIZE),
            threads=a.get(THREADS),
            continues=a.get(CONTINUES),
            resumed_epoch=a.get(RESUMED_EPOCH),
            pack=a.get(PACK),
        )


def _storable(value: Any) -> Any:
    """JSON-safe: Optuna stores user attributes as JSON, which has no NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    return value
