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

from hpsearch import objectives, record, signals
from hpsearch.checkpoint import Checkpoints, chain_of, continue_trial
from hpsearch.datasets import load_dataset
from hpsearch.errors import HpsearchError
from hpsearch.record import TrialRecord, study_task
from hpsearch.spec import SpecError, StudySpec, resolve, space_of
from hpsearch.storage import Heartbeat, StorageError, open_storage, shown_url, study_lock, url_of
from hpsearch.train import Outcome, Progress, resolve_device, run_pack

TrialDone = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def package_version() -> str:
    return version("hpsearch")


def open_study(spec: StudySpec, storage_url: str | None = None) -> optuna.Study:
    """Create the study named after ``spec``, or load it to resume.

    A new study stores the resolved spec, its TOML source, its task and the hpsearch and torch
    versions, and queues its grid's configurations or its ``[[study.enqueue]]`` ones. An existing one
    must have been made from the same search space: a change is refused with a list of what changed,
    since Optuna cannot mix trials from different spaces in one study. Resuming queues only the
    ``[[study.enqueue]]`` configurations the study holds no trial of (tables added to the file since):
    those queued when it was created are never queued again.
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
        stored_directions = [d.name.lower() for d in study.directions]
        if stored_directions != spec.objectives.directions:
            raise SpecError(f"study {spec.name!r} was created to {', '.join(stored_directions)}")
        # A seeded sampler replays one sequence in every process: a rerun, or each worker joining
        # the study, would sample configurations already tried. Only the creator keeps the seed.
        study.sampler.reseed_rng()
        if spec.study.enqueue:
            with study_lock(storage, spec.name):
                queue(study, spec.first_trials())
        return study
    try:
        return _create(spec, storage)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return open_study(spec, storage_url)


def create_study(spec: StudySpec, storage_url: str | None, trials: list[FrozenTrial]) -> optuna.Study:
    """A new study for ``spec`` that starts with ``trials`` (finished trials made for this space, with
    its distributions), added before anything is queued: a grid then queues only the configurations
    they leave untried. Where the storage holds a study of that name already, ``StorageError``; where
    adding the trials fails, the new study is deleted again.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _open_shared_storage(storage_url, spec.study.heartbeat)
    try:
        return _create(spec, storage, trials)
    except optuna.exceptions.DuplicatedStudyError:
        raise StorageError(
            f"study {spec.name!r} exists already in {shown_url(url_of(storage))}; the new study is named "
            f"after its file: copy {spec.path} to a new name, or delete the old study with "
            f"`optuna delete-study --study-name {spec.name} --storage URL`"
        ) from None


def _create(spec: StudySpec, storage: BaseStorage, trials: list[FrozenTrial] | None = None) -> optuna.Study:
    """Create the study of ``spec``, store what it was made from, add ``trials``, fill its queue."""
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        directions=spec.objectives.directions,
        sampler=spec.sampler(),
        pruner=spec.pruner(),
    )
    try:
        # Names the objectives in the dashboard ("validation accuracy" rather than "Objective 0").
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.objectives.labels)
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
        # Under the lock, as a worker that joins at once queues the same [[study.enqueue]] tables.
        with study_lock(storage, spec.name):
            for trial in trials or []:
                study.add_trial(trial)
            if spec.enumerates and trials:
                queue(study, spec.grid())
            elif spec.enumerates:
                for params in spec.grid():
                    study.enqueue_trial(params)
            queue(study, spec.first_trials())
    except BaseException:
        if trials:  # a fork leaves a whole study or none
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=spec.name, storage=storage)
        raise
    return study


def queue(study: optuna.Study, configs: list[dict[str, Any]]) -> list[bool]:
    """Queue each configuration (trial params) that no trial of ``study`` was queued with or ran with
    (Optuna's ``skip_if_exists``); whether each was queued. Callers hold the study's lock."""
    added = []
    for params in configs:
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(params, skip_if_exists=True)
        added.append(len(study.get_trials(deepcopy=False)) > before)
    return added


@dataclass
class WarmStart:
    """What ``warm_start`` queued from another study, and what it skipped and why."""

    source: str
    queued: list[int] = field(default_factory=list)  # trial numbers in the source study
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line of counts, then one per skipped trial."""
        n = len(self.queued) + len(self.skipped)
        if not n:
            return [f"warm start from {self.source}: it has no complete trial; nothing queued"]
        head = f"warm start from {self.source}: queued {len(self.queued)} of its {n} best trials to run first"
        if not self.skipped:
            return [head]
        return [f"{head}, skipped {len(self.skipped)}:", *(f"  trial {k}: {why}" for k, why in self.skipped)]


def warm_start(study: optuna.Study, spec: StudySpec, source: optuna.Study, top: int) -> WarmStart:
    """Queue the ``top`` best complete trials of ``source``, another stored study, to run first in
    ``study``, each with the values it ran with of ``spec``'s searched parameters (its params, else
    its recorded configuration); the others are sampled. A trial whose values do not fit ``spec``'s
    space (``StudySpec.fit``, mode ``warm``), or that ``study`` already holds, is skipped with why.
    """
    if spec.enumerates:
        raise SpecError(f"study {spec.name!r} is a grid search: it runs every configuration of its grid")
    task = study_task(source)
    best = objectives.ranked(source)
    result = WarmStart(source.study_name)
    fitting: list[tuple[int, dict[str, Any]]] = []
    for trial in best[:top]:
        placed = spec.fit(trial.params, "warm", TrialRecord.of(trial, task).config)
        if placed.misfits:
            result.skipped.append((trial.number, "; ".join(map(str, placed.misfits))))
        elif not placed.params:
            result.skipped.append((trial.number, f"it sets none of {spec.name}'s searched parameters"))
        else:
            fitting.append((trial.number, placed.params))
    with study_lock(study._storage, study.study_name):
        added = queue(study, [params for _, params in fitting])
    for (number, _), new in zip(fitting, added, strict=True):
        if new:
            result.queued.append(number)
        else:
            result.skipped.append((number, f"{spec.name} already holds a trial with these values"))
    return result


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

# Trials a run ends before ``[study] max_fail_fraction`` is judged: over fewer, one or two failures
# (a configuration the network cannot take) are already a large share, and would stop a sound study.
FAIL_LIMIT_AFTER = 5


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

    def failed_too_often(self, limit: float) -> bool:
        """Whether ``FAIL_LIMIT_AFTER`` trials or more ended and more than ``limit`` of them failed."""
        return self.ran >= FAIL_LIMIT_AFTER and self.states["fail"] / self.ran > limit

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


class TooManyFailures(HpsearchError):
    """More of a run's trials failed than ``[study] max_fail_fraction`` allows."""


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

    A trial that raises anything ends FAIL with its reason and the run goes on, until
    ``FAIL_LIMIT_AFTER`` or more trials of this call have ended and more than ``[study]
    max_fail_fraction`` of them failed: then it starts no more and raises ``TooManyFailures``, every
    trial it ran ended and stored. KeyboardInterrupt (Ctrl-C, SIGTERM in the CLI) fails the running
    trial, queues its continuation, and is raised again. A storage that stops accepting writes raises
    ``StorageFailed``. ``progress(trial_number)`` may return a per-epoch progress function;
    ``on_trial`` is called after each trial.

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
                most = spec.study.max_fail_fraction
                if summary.failed_too_often(most):
                    [(reason, k)] = summary.failures.most_common(1)
                    raise TooManyFailures(
                        f"{summary.states['fail']} of the {summary.ran} trials this run ended failed "
                        f"(most often: {reason} ({k})), more than study.max_fail_fraction = {most:g}; "
                        f"fix the cause, or raise max_fail_fraction in {spec.path}; "
                        "the finished trials are kept"
                    )
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


def _tell(
    study: optuna.Study, trial: optuna.Trial, value: float | tuple[float, ...] | None = None, **kw: Any
) -> None:
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
