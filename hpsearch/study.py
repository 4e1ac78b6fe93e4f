"""Create or resume the Optuna study of a study file and run trials into it."""

from __future__ import annotations

import json
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
from optuna.trial import TrialState

from hpsearch import record
from hpsearch.datasets import load_dataset
from hpsearch.record import TrialRecord
from hpsearch.spec import SpecError, StudySpec, resolve, space_of
from hpsearch.storage import StorageError, open_storage
from hpsearch.train import Progress, resolve_device, run_trial

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
    storage = _open_shared_storage(storage_url)
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


def _open_shared_storage(url: str | None) -> optuna.storages.RDBStorage:
    """``open_storage``, retried: workers that start together on a new database race to create
    Optuna's tables, and all but one fail on their first try."""
    for _ in range(2):
        try:
            return open_storage(url, heartbeat=True)
        except StorageError as exc:
            if not isinstance(exc.__cause__, sqlalchemy.exc.DBAPIError):
                raise
            time.sleep(0.5 + random.random())
    return open_storage(url, heartbeat=True)


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


def finished(study: optuna.Study) -> int:
    """Trials that count towards the study's ``n_trials``: complete and pruned ones."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


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
) -> RunSummary:
    """Run trials of ``spec`` into ``study`` (from ``open_study``) and say what happened.

    ``n_trials`` runs that many more trials; without it the study is filled up to the file's
    ``n_trials``, so rerunning an interrupted study finishes it. A trial that raises anything ends
    FAIL with its reason and the run goes on; only KeyboardInterrupt (Ctrl-C, SIGTERM in the CLI)
    stops it. A storage that stops accepting writes raises ``StorageFailed``.
    ``progress(trial_number)`` may return a per-epoch progress function; ``on_trial`` is called
    after each trial.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fill_up = n_trials is None
    if n_trials is None:
        n_trials = max(0, (spec.n_trials or 0) - finished(study))
    if spec.enumerates:  # a grid runs its queued configurations, each once
        n_trials = min(n_trials, len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
    # Trials left RUNNING by a killed worker would otherwise count as in progress forever: those of
    # a process of this machine that is gone are failed now, the others once their heartbeat is stale.
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if record.orphaned(trial):
            study.tell(trial.number, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

    # Fail fast, before any trial, when the data cannot be found.
    load_dataset(spec.raw["data"]["name"], data_dir, str(dev))

    summary = RunSummary()

    def done(s: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        summary.states[trial.state.name.lower()] += 1
        if trial.state == TrialState.FAIL:
            rec = TrialRecord.of(trial, spec.task)
            summary.failures[rec.fail_reason or "no reason recorded"] += 1
        if on_trial:
            on_trial(s, trial)

    callbacks: list[TrialDone] = [done]
    if fill_up and spec.n_trials:
        # Workers sharing the study stop once finished plus in-flight trials reach the target.
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        callbacks.append(optuna.study.MaxTrialsCallback(spec.n_trials, states=states))

    current: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        current[:] = [trial.number]
        return run_trial(trial, spec, dev, data_dir, progress(trial.number) if progress else None)

    if n_trials > 0:
        try:
            study.optimize(
                objective,
                n_trials=n_trials,
                timeout=timeout if timeout is not None else spec.study.timeout,
                callbacks=callbacks,
                catch=(Exception,),
            )
        except Exception as exc:
            # Only the storage can fail here: a trial's own errors are caught above. Optuna may
            # replace the storage's error with one of its own while recording the trial, so the
            # cause is looked for along the chain.
            cause = _storage_cause(exc)
            if cause is None:
                raise
            _fail(study, current)
            raise StorageFailed(
                f"the storage stopped accepting writes ({_first_line(cause)}); finished trials are kept: "
                "free the space or fix the database, then run the same command to resume"
            ) from exc
    return summary


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
