"""Create or resume the Optuna study of a study file and run trials into it."""

from __future__ import annotations

import json
import random
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState

from hpsearch.datasets import load_dataset
from hpsearch.spec import SpecError, StudySpec, space_of
from hpsearch.storage import StorageError, open_storage
from hpsearch.train import Progress, resolve_device, run_trial

TrialDone = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def package_version() -> str:
    return version("hpsearch")


def open_study(spec: StudySpec, storage_url: str | None = None) -> optuna.Study:
    """Create the study named after ``spec``, or load it to resume.

    A new study stores the spec, its TOML source and the hpsearch and torch versions. An existing
    one must have been made from the same search space: a change is refused with a list of what
    changed, since Optuna cannot mix trials from different spaces in one study.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _open_shared_storage(storage_url)
    existing = {s.study_name for s in storage.get_all_studies()}
    if spec.name in existing:
        study = optuna.load_study(
            study_name=spec.name, storage=storage, sampler=spec.sampler(), pruner=spec.pruner()
        )
        stored = study.user_attrs.get("spec")
        if stored is not None:
            changes = diff(space_of(stored), spec.space())
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
            study_name=spec.name, storage=storage, direction=spec.direction,
            sampler=spec.sampler(), pruner=spec.pruner(),
        )  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it just now
        return open_study(spec, storage_url)
    # Names the objective in the dashboard ("validation accuracy" rather than "Objective 0").
    study.set_metric_names([f"validation {spec.metric}"])
    study.set_user_attr("spec", spec.raw)
    study.set_user_attr("spec_source", spec.source)
    study.set_user_attr("description", spec.description)
    study.set_user_attr("metric", spec.metric)
    study.set_user_attr("hpsearch_version", package_version())
    study.set_user_attr("torch_version", torch.__version__)
    return study


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
) -> optuna.Study:
    """Run trials of ``spec`` into ``study`` (from ``open_study``).

    ``n_trials`` runs that many more trials; without it the study is filled up to the file's
    ``n_trials``, so rerunning an interrupted study finishes it. ``progress(trial_number)`` may
    return a per-epoch progress function; ``on_trial`` is called after each trial.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fill_up = n_trials is None
    if n_trials is None:
        n_trials = max(0, (spec.n_trials or 0) - finished(study))
    # Trials left RUNNING by a killed worker would otherwise count as in progress forever.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

    # Fail fast, before any trial, when the data cannot be found.
    load_dataset(spec.raw["data"]["name"], data_dir, str(dev))

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial, spec, dev, data_dir, progress(trial.number) if progress else None)
        except (RuntimeError, ValueError, TypeError) as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:500])
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise

    callbacks = [on_trial] if on_trial else []
    if fill_up and spec.n_trials:
        # Workers sharing the study stop once finished plus in-flight trials reach the target.
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        callbacks.append(optuna.study.MaxTrialsCallback(spec.n_trials, states=states))
    if n_trials > 0:
        study.optimize(
            objective, n_trials=n_trials,
            timeout=timeout if timeout is not None else spec.study.get("timeout"),
            callbacks=callbacks, catch=(RuntimeError, ValueError, TypeError),
        )  # fmt: skip
    return study
