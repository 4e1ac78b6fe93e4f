"""A study's objectives: the values a finished trial reports, which way each is better, and how a
study's complete trials rank by them.

A study has one objective, its task's validation metric, unless its file lists more:
``[study] objectives = ["accuracy", "epoch_time"]`` puts the metric first and then costs that are
minimised jointly with it. With more than one, Optuna keeps a Pareto front, the trials that no other
trial beats on every objective at once; "the best" trial of such a study is the front's best in the
first objective (the metric), which is always on the front.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpsearch.record import SPEC, TrialRecord, study_task
from hpsearch.search import DEFAULT_PRUNER
from hpsearch.task import Task


@dataclass(frozen=True)
class Cost:
    """What a trial pays for its metric: minimised beside it in a multi-objective study."""

    name: str  # as a study file writes it
    label: str  # the objective's name in the dashboard, units included
    column: str  # its column in exported tables
    of: Callable[[TrialRecord], float | None]  # its value, from the record of a finished trial


def _mean_epoch(rec: TrialRecord) -> float | None:
    return statistics.fmean(rec.epoch_time_s) if rec.epoch_time_s else None


COSTS: dict[str, Cost] = {
    c.name: c
    for c in (
        # Training and validating one epoch, in seconds: the mean over the epochs run.
        Cost("epoch_time", "seconds per epoch", "epoch_time_s", _mean_epoch),
        Cost("params", "parameters", "n_params", lambda rec: rec.n_params),
        # One image through the trained network on the trial's device, as a deployed model sees it.
        Cost("latency", "latency (ms per image)", "latency_ms", lambda rec: rec.latency_ms),
    )
}


@dataclass(frozen=True)
class Objectives:
    """The objectives of one study: its task's metric (the value a trial reports per ``[study]
    objective``, ``"last"`` or ``"best"`` epoch), then its costs."""

    task: Task
    costs: tuple[Cost, ...] = ()
    epoch: str = "last"

    @classmethod
    def named(cls, task: Task, names: Sequence[str], epoch: str = "last") -> Objectives:
        """The objectives a study file names. ValueError (its message says what to write) unless the
        first is the task's metric and each other a distinct cost."""
        if not names or names[0] != task.metric:
            raise ValueError(
                f"the first objective must be the task's metric {task.metric!r}, then any of "
                f"{', '.join(map(repr, COSTS))}; got {list(names)!r}"
            )
        costs = []
        for name in names[1:]:
            if name not in COSTS:
                valid = ", ".join(map(repr, COSTS))
                raise ValueError(f"unknown objective {name!r} after {task.metric!r}; valid: {valid}")
            if COSTS[name] in costs:
                raise ValueError(f"objective {name!r} is listed twice")
            costs.append(COSTS[name])
        return cls(task, tuple(costs), epoch)

    @property
    def multi(self) -> bool:
        return bool(self.costs)

    @property
    def default_pruner(self) -> str:
        """The pruner of a study file that names none: Optuna's pruners judge a single value."""
        return "none" if self.multi else DEFAULT_PRUNER

    @property
    def names(self) -> list[str]:
        return [self.task.metric, *(c.name for c in self.costs)]

    @property
    def directions(self) -> list[Literal["maximize", "minimize"]]:
        return [self.task.direction, *(["minimize"] * len(self.costs))]  # type: ignore[list-item]

    @property
    def labels(self) -> list[str]:
        """The objectives' names in the dashboard and Optuna's CLI."""
        return [self.task.metric_label, *(c.label for c in self.costs)]

    def values(self, rec: TrialRecord) -> list[float]:
        """A finished trial's values, in order. ValueError if a cost was not recorded."""
        out = [rec.final_value(self.epoch, self.task)]
        for cost in self.costs:
            value = cost.of(rec)
            if value is None:
                raise ValueError(f"the trial recorded no {cost.name}")
            out.append(float(value))
        return out


def of_stored(study: optuna.Study) -> Objectives:
    """The objectives of a stored study, from the study file it keeps (one, for a study made before
    hpsearch had more, or by another program)."""
    task = study_task(study)
    table: Any = study.user_attrs.get(SPEC, {})
    head = table.get("study", {}) if isinstance(table, dict) else {}
    names = head.get("objectives") or [task.metric]
    try:
        return Objectives.named(task, names, head.get("objective", "last"))
    except ValueError:
        return Objectives(task)


def first_value(trial: FrozenTrial) -> float | None:
    """The trial's value in the first objective (the metric); None where it has none."""
    return trial.values[0] if trial.values else None


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """The study's complete trials, best first: by value; for several objectives the Pareto front
    first, each part by the first objective. Ties go to the earlier trial."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    sign = -1.0 if study.directions[0] == StudyDirection.MAXIMIZE else 1.0
    on_front = {t.number for t in study.best_trials} if len(study.directions) > 1 else set()
    return sorted(
        done, key=lambda t: (bool(on_front) and t.number not in on_front, sign * t.values[0], t.number)
    )


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of a multi-objective study (every complete trial no other beats on all its
    objectives at once), by the first objective; a single-objective study's best trial."""
    best = ranked(study)
    if len(study.directions) == 1:
        return best[:1]
    on_front = {t.number for t in study.best_trials}
    return [t for t in best if t.number in on_front]
