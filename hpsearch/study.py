"""Create or resume the Optuna study of a study file and run trials into it."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from hpsearch import record, signals
from hpsearch.checkpoint import Checkpoints, chain_of, continue_trial
from hpsearch.datasets import load_dataset
from hpsearch.record import TrialRecord
from hpsearch.spec import SpecError, StudySpec, resolve, space_of
from hpsearch.storage import Heartbeat, StorageError, open_storage, study_lock, url_of
from hpsearch.train import Outcome, Progress, resolve_device, run_pack

TrialDone = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def package_version() -> str:
    return version("hpsearch")


def open_study(spec: StudySpec, storage_url: str | None = None) -> optuna.Study:
    """Create the study named after ``spec``, or load it to resume.

    A new study stores the resolved spec, its TOML source, its task and the hpsearch and torch
    versions; a grid study queues its configurations. An existing one must have been made from the
    same search space: a change is refused with a list of what changed, since Optuna cannot mix
    trials from different spaces in one study.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _open_shared_storage(storage_url, spec.study.heartbeat)
    existing = {s.study_name for s in storage.get_all_studies()}
    if spec.name in existing:
        study = optuna.load_study(
            study_name=spec.name, storage=storage, sampler=spec.sampler(), pruner=spec.pruner()
        )
        stored = study.user_attrs.get(record.SPEC)
        if stored is not None:
            changes = diff(space_of(_resolved(stored)), spec.space_key())
            if changes:
                raise SpecError(
                    f"study {spec.name!r} in this storage was made from a different search space "
                    f"({'; '.join(changes)}); restore {spec.path}, or copy it to a new file "
                    f"name to start a new study"
                )
        if study.direction.name.lower() != spec.direction:
            raise SpecError(f"study {spec.name!r} was created to {study.direction.name.lower()}")
        # A seeded sampler replays one sequence in every process: a rerun, or each worker joining
        # the study, would sample configurations already tried. Only the creator keeps the seed.
        study.sampler.reseed_rng()
        return study
    try:
        study = optuna.create_study(
            study_name=spec.name,
            storage=storage,
            direction=spec.direction,
            sampler=spec.sampler(),
            pruner=spec.pruner(),
        )
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return open_study(spec, storage_url)
    # Names the objective in the dashboard ("validation accuracy" rather than "Objective 0").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([spec.task.metric_label])
    for key, value in {
        record.SPEC: spec.raw,
        record.SPEC_SOURCE: spec.source,
        record.DESCRIPTION: spec.description,
        record.TASK: spec.task.name,
        record.METRIC: spec.task.metric,
        record.HPSEARCH_VERSION: package_version(),
        record.TORCH_VERSION: torch.__version__,
    }.items():
        study.set_user_attr(key, value)
    from hpsearch.dashboard import write_spec_note  # optuna-dashboard's import is only paid here

    write_spec_note(study, spec.description, spec.source)
    if spec.enumerates:
        for params in spec.grid():
            study.enqueue_trial(params)
    return study


def _resolved(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec with its defaults written in; one stored before defaults were resolved gains them."""
    try:
        return resolve(stored)
    except Exception:  # a spec naming a dataset this version no longer has: compare it as stored
        return stored


def _open_shared_storage(url: str | None, heartbeat: Heartbeat) -> BaseStorage:
    """``open_storage``, retried: workers that start together on a new database race to create
    Optuna's tables, and all but one fail on their first try."""
    for _ in range(2):
        try:
            return open_storage(url, heartbeat=heartbeat)
        except StorageError as exc:
            if not isinstance(exc.__cause__, sqlalchemy.exc.DBAPIError):
                raise
            time.sleep(0.5 + random.random())
    return open_storage(url, heartbeat=heartbeat)


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested tables, by dotted key."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, where + ".")
        elif a is _MISSING:
            out.append(f"{where} added ({_show(b)})")
        elif b is _MISSING:
            out.append(f"{where} removed (was {_show(a)})")
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{where} changed from {_show(a)} to {_show(b)}")
    return out


_MISSING = object()


def _show(value: Any) -> str:
    return json.dumps(value, separators=(", ", " = "))


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished(study: optuna.Study) -> int:
    """Trials that count towards the study's ``n_trials``: complete and pruned ones."""
    return len(study.get_trials(deepcopy=False, states=_FINISHED))


@dataclass
class RunSummary:
    """What one ``run_study`` call did: its trials by state, and why the failed ones failed."""

    states: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def ran(self) -> int:
        return sum(self.states.values())

    @property
    def all_failed(self) -> bool:
        return self.ran > 0 and self.states["fail"] == self.ran

    def add(self, trial: FrozenTrial, spec: StudySpec) -> None:
        self.states[trial.state.name.lower()] += 1
        if trial.state == TrialState.FAIL:
            self.failures[TrialRecord.of(trial, spec.task).fail_reason or "no reason recorded"] += 1

    def failure_lines(self) -> list[str]:
        """``N trials failed: reason (k)`` and one line per distinct reason, most frequent first."""
        n = self.states["fail"]
        if not n:
            return []
        head = f"{n} trial{'s' * (n != 1)} failed:"
        return [head, *(f"  {reason} ({k})" for reason, k in self.failures.most_common())]


class StorageFailed(StorageError):
    """The storage stopped accepting writes during a run (a full disk, a lost database)."""


def run_study(
    spec: StudySpec,
    study: optuna.Study,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    progress: Callable[[int], Progress | None] | None = None,
    on_trial: TrialDone | None = None,
    checkpoints: Checkpoints | None = None,
    pack: int = 1,
) -> RunSummary:
    """Run trials of ``spec`` into ``study`` (from ``open_study``) and say what happened.

    Without ``n_trials`` the study is filled up to the file's ``n_trials``, a total shared by every
    worker on every machine: however many race, the study ends with exactly that many finished
    (complete or pruned) trials, and rerunning an interrupted study finishes it. ``n_trials`` runs
    that many trials in this call instead. Queued trials run first: the grid's configurations, and
    the continuations of trials whose worker died (heartbeat stale, or a process of this machine
    that is gone) or was stopped, which resume from their checkpoint (``checkpoints``; by default
    ``Checkpoints.of`` the study and its storage).

    A trial that raises anything ends FAIL with its reason and the run goes on. KeyboardInterrupt
    (Ctrl-C, SIGTERM in the CLI) fails the running trial, queues its continuation, and is raised
    again. A storage that stops accepting writes raises ``StorageFailed``. ``progress(trial_number)``
    may return a per-epoch progress function; ``on_trial`` is called after each trial.

    ``pack`` trials are taken at a time and those that can train as one batched model do
    (``train.run_pack``).
    """
    if pack < 1:
        raise SpecError(f"pack must be at least 1, not {pack}")
    dev = resolve_device(device)
    if checkpoints is None:
        checkpoints = Checkpoints.of(spec.name, spec.study.checkpoints, url_of(study._storage))
    budget = spec.n_trials if n_trials is None else None
    if n_trials is None and budget is None:
        return RunSummary()
    limit = timeout if timeout is not None else spec.study.timeout
    deadline = time.monotonic() + limit if limit is not None else math.inf

    # Fail fast, before any trial, when the data cannot be found.
    load_dataset(spec.raw["data"]["name"], data_dir, str(dev))

    summary = RunSummary()
    current: list[int] = []
    try:
        # Signals stop a trial's training at once, but never a worker half way through asking for a
        # trial or telling how one ended.
        with signals.guard():
            while (n_trials is None or summary.ran < n_trials) and time.monotonic() < deadline:
                wanted = pack if n_trials is None else min(pack, n_trials - summary.ran)
                trials = _next_trials(study, spec, budget, checkpoints, wanted)
                if not trials:
                    break
                current[:] = [t.number for t in trials]

                def ended(frozen: FrozenTrial) -> None:
                    current.remove(frozen.number)
                    summary.add(frozen, spec)
                    if on_trial:
                        on_trial(study, frozen)

                _run(study, trials, spec, dev, data_dir, progress, checkpoints, ended)
                signals.check()
    except Exception as exc:
        # A trial's own errors are caught in ``_run``: what gets here comes from the storage. Optuna
        # may replace the storage's error with one of its own, so the cause is looked for along the chain.
        cause = _storage_cause(exc)
        if cause is None:
            raise
        _fail(study, current)
        raise StorageFailed(
            f"the storage stopped accepting writes ({_first_line(cause)}); finished trials are kept: "
            "free the space or fix the database, then run the same command to resume"
        ) from exc
    return summary


def _next_trials(
    study: optuna.Study, spec: StudySpec, budget: int | None, checkpoints: Checkpoints, k: int
) -> list[optuna.Trial]:
    """Up to ``k`` trials to run next; none when the study has none left for this worker.

    Under the study's lock, so that no other worker counts or starts a trial meanwhile: trials of
    dead workers are failed and continued, then queued trials are taken or new ones sampled, as long
    as the finished and running ones do not fill ``budget``.
    """
    taken: list[optuna.Trial] = []
    with study_lock(study._storage, study.study_name):
        _reap(study, spec.study.retries, checkpoints)
        for _ in range(k):
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if spec.enumerates and not any(record.QUEUED in t.system_attrs for t in waiting):
                break  # a grid runs its queued configurations, each once
            if budget is not None and _taken(study) >= budget:
                break
            with warnings.catch_warnings():
                # Optuna expects a heartbeat only under its own optimize loop; ``_run`` beats it here.
                warnings.filterwarnings("ignore", "Heartbeat of storage")
                taken.append(study.ask())
    kept = []
    for trial in taken:
        if budget is not None and not _queued(study, trial) and _taken(study, trial.number) >= budget:
            # Only without a lock (behind a storage proxy): another worker took the last place in
            # the same instant. This trial has not run; it is closed at once and not counted.
            trial.set_user_attr(record.FAIL_REASON, f"not run: the study's {budget} trials were taken")
            study.tell(trial, state=TrialState.FAIL)
        else:
            kept.append(trial)
    return kept


def _queued(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether ``trial`` was taken from the queue (a grid configuration, a continuation), which
    holds its place in the budget already."""
    frozen = study._storage.get_trial(trial._trial_id)
    return record.QUEUED in frozen.system_attrs or record.CONTINUES in frozen.user_attrs


def _reap(study: optuna.Study, retries: int, checkpoints: Checkpoints) -> None:
    """Fail the running trials whose worker is gone and queue their continuations: those of a
    process of this machine that has ended, and any whose heartbeat is stale (Optuna's heartbeat).

    Failing is a compare-and-set on the trial's state, so of several workers that find the same
    lost trial, one continues it.
    """
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    stale = set()
    if is_heartbeat_enabled(storage):
        assert isinstance(storage, BaseHeartbeat)
        stale = set(storage._get_stale_trial_ids(study._study_id))
    for trial in running:
        if trial._trial_id not in stale and not record.orphaned(trial):
            continue
        epoch = len(trial.intermediate_values) + 1
        worker = trial.user_attrs.get(record.WORKER, "?")
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(
                trial._trial_id, record.FAIL_REASON, f"worker {worker} lost in epoch {epoch}"
            )
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                lost = storage.get_trial(trial._trial_id)
                if not continue_trial(study, lost, crashed=True, max_retries=retries):
                    checkpoints.delete(chain_of(lost))


def _taken(study: optuna.Study, before: int | None = None) -> int:
    """Trials that fill the budget: finished ones and those running (numbered below ``before``)."""
    taken = study.get_trials(deepcopy=False, states=(*_FINISHED, TrialState.RUNNING))
    return len(taken) if before is None else sum(t.number < before for t in taken)


def _run(
    study: optuna.Study,
    trials: list[optuna.Trial],
    spec: StudySpec,
    dev: torch.device,
    data_dir: str | None,
    progress: Callable[[int], Progress | None] | None,
    checkpoints: Checkpoints,
    ended: Callable[[FrozenTrial], None],
) -> None:
    """Run ``trials`` with their heartbeats beating and tell the study how each ended, as it ends."""

    def tell(trial: optuna.Trial, outcome: Outcome) -> None:
        if isinstance(outcome, optuna.TrialPruned):
            _tell(study, trial, state=TrialState.PRUNED)
        elif isinstance(outcome, KeyboardInterrupt):
            frozen = study.tell(trial, state=TrialState.FAIL)
            continue_trial(study, frozen, crashed=False, max_retries=spec.study.retries)
        elif isinstance(outcome, BaseException):  # the reason is in the trial's record
            _tell(study, trial, state=TrialState.FAIL)
        else:
            _tell(study, trial, outcome)
        ended(study._storage.get_trial(trial._trial_id))

    with contextlib.ExitStack() as beating:
        for trial in trials:
            beating.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))  # type: ignore[arg-type]
        run_pack(trials, spec, dev, data_dir, progress, checkpoints, tell)


def _tell(study: optuna.Study, trial: optuna.Trial, value: float | None = None, **kw: Any) -> None:
    # Taken for lost (its heartbeat went stale) and already continued by another worker: let it be.
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, value, **kw)


def _storage_cause(exc: BaseException) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.SQLAlchemyError | OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _fail(study: optuna.Study, numbers: list[int]) -> None:
    """Mark the trial this process was running FAIL where the storage still allows it.

    Where it does not (the disk is still full), the heartbeat marks it failed once it is stale.
    """
    for number in numbers:
        try:
            if study.get_trials(deepcopy=False)[number].state == TrialState.RUNNING:
                study.tell(number, state=TrialState.FAIL)
        except Exception:  # still no space: leave it to the heartbeat
            return
