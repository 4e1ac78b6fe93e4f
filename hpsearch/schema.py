"""What a study file may contain, the one walk over its search space, and the check that it is right.

Each section is the keyword arguments of one callable: ``[data]`` of ``DataConfig``, ``[model]``,
``[optimizer]`` and ``[scheduler]`` of the registry entry their ``name`` picks, ``[train]`` of
``TrainConfig``. A value is fixed, or a search table in Optuna's argument names:
``{low, high[, log, step]}`` or ``{choices = [...]}``. A sub-table named after a choice of ``name``
holds the keys of that choice only. The kind of each value (bool, int, float, str, list) comes from
the callable's own signature, and every value or bound is tried on the callable itself (on dummy
parameters, a model on the meta device) when the file loads, so a study either runs or is refused
with one ``SpecError`` line that names the file, the key and the valid values.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpsearch.datasets import DATASETS, DataConfig
from hpsearch.errors import HpsearchError
from hpsearch.models import INITS, MODELS, build_model
from hpsearch.objectives import Objectives
from hpsearch.optim import OPTIMIZERS, SCHEDULERS, Schedule, build_optimizer, build_scheduler
from hpsearch.record import OBJECTIVES
from hpsearch.registry import Registry, keywords, sequence_length, value_kind
from hpsearch.search import DEFAULT_PRUNER, DEFAULT_SAMPLER, PRUNERS, SAMPLERS
from hpsearch.storage import Heartbeat

SECTIONS = ("study", "data", "model", "optimizer", "scheduler", "train")
SEARCH_KEYS = {"low", "high", "log", "step", "choices"}


class SpecError(HpsearchError):
    """A study file is wrong; the message names the file, the key and the valid values."""


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: how long and how carefully each trial trains. Construction checks the ranges."""

    epochs: int = 10
    l1: float = 0.0  # L1 penalty coefficient, added to the loss that is minimised
    max_loss: float | None = None  # a batch's data loss above it stops the trial; None: the task's limit
    eval_batch_size: int | None = None  # None: the device's default (train.EVAL_BATCH)
    seed: int | None = None  # None: derived from the study seed and the trial number
    max_minutes: float | None = None  # a trial still training after this long stops, as pruned
    compile: bool = False  # torch.compile the network; the compile time is part of the trial's first epoch
    label_smoothing: float = 0.0  # classification: this share of each target spread over all classes
    clip_grad_norm: float = 0.0  # 0: off; else the most a step's gradient norm may be (each trial's own)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, not {self.epochs}")
        if not self.l1 >= 0:
            raise ValueError(f"l1 must be 0 or more, not {self.l1}")
        if self.max_loss is not None and not self.max_loss > 0:
            raise ValueError(f"max_loss must be positive, not {self.max_loss}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be at least 1, not {self.eval_batch_size}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be 0 or more, not {self.seed}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, not {self.max_minutes}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if not self.clip_grad_norm >= 0:
            raise ValueError(f"clip_grad_norm must be 0 (off) or more, not {self.clip_grad_norm}")


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: how the search runs. ``sampler`` and ``pruner`` are a name or ``{name = ..., args}``."""

    description: str = ""
    direction: str = ""  # the task's own direction; another one is refused
    n_trials: int | None = None
    timeout: float | None = None  # seconds
    seed: int = 0
    objective: str = "last"  # a trial's value: its last or its best epoch's validation metric
    # The task's metric, then costs minimised jointly with it (``hpsearch.objectives``); one by default.
    objectives: list[str] = field(default_factory=list)
    sampler: Any = DEFAULT_SAMPLER
    pruner: Any = DEFAULT_PRUNER  # none for a multi-objective study (``Objectives.default_pruner``)
    heartbeat: Heartbeat = field(default_factory=Heartbeat)  # a table {interval, grace} in seconds
    retries: int = 3  # continuations of a trial whose worker crashed, before it is given up
    # A run whose ended trials failed in a larger share than this stops (``study.TooManyFailures``).
    max_fail_fraction: float = 0.5
    checkpoints: str | None = None  # folder; None: checkpoints/STUDY in the storage's artifact folder
    # [[study.enqueue]]: configurations (parameter name → value) tried before any sampled trial
    enqueue: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.heartbeat, dict):
            unknown = sorted(set(self.heartbeat) - {f.name for f in fields(Heartbeat)})
            if unknown:
                raise ValueError(f"unknown key {unknown[0]!r} in heartbeat; valid: interval, grace")
            object.__setattr__(self, "heartbeat", Heartbeat(**self.heartbeat))
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, not {self.retries}")
        if not 0 < self.max_fail_fraction <= 1:
            raise ValueError(f"max_fail_fraction must be in (0, 1], not {self.max_fail_fraction}")
        if self.n_trials is not None and self.n_trials < 1:
            raise ValueError(f"n_trials must be at least 1, not {self.n_trials}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be positive (seconds), not {self.timeout}")
        if self.seed < 0:
            raise ValueError(f"seed must be 0 or more, not {self.seed}")
        if self.objective not in OBJECTIVES:
            valid = ", ".join(map(repr, OBJECTIVES))
            raise ValueError(f"objective must be one of {valid}, not {self.objective!r}")


def is_search(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= SEARCH_KEYS


def is_conditional(value: Any) -> bool:
    return isinstance(value, dict) and not is_search(value)


def named(value: Any) -> dict[str, Any]:
    return {"name": value} if isinstance(value, str) else dict(value)


# The sections: the callable each one's keys are the arguments of, and how to try values on it.


@dataclass(frozen=True)
class Section:
    title: str
    registry: Registry[Any, Any] | None  # what ``name`` picks from; None: the section has no name
    keywords: Callable[[str | None], dict[str, inspect.Parameter]]
    # Build the callable on dummies with these values; raises what the callable raises.
    trial: Callable[[str | None, dict[str, Any]], object]
    default_name: str | None = None

    def keys(self, name: str | None) -> dict[str, inspect.Parameter]:
        return self.keywords(name)


def _dataclass_keywords(cls: type) -> Callable[[str | None], dict[str, inspect.Parameter]]:
    return lambda _: {k: p for k, p in keywords(cls).items() if k != "name"}


def _fixed_per_study(key: str) -> bool:
    return any(f.name == key and f.metadata.get("searchable") is False for f in fields(DataConfig))


def _try_data(name: str | None, values: dict[str, Any]) -> object:
    config = DataConfig(name=str(name), **values)
    facts = DATASETS.facts(str(name))
    config.check_sizes(facts.train_size, facts.test_size)
    if config.crop_padding:
        side = config.resize or facts.image_size
        if side is None:
            raise ValueError(f"crop_padding shifts images; {name} has none")
        if config.crop_padding >= side:
            raise ValueError(f"crop_padding must be less than the {side}-pixel image side")
    return config


def _model_keywords(name: str | None) -> dict[str, inspect.Parameter]:
    own = {k: p for k, p in keywords(build_model).items() if k not in ("name", "in_channels", "num_classes")}
    return {**MODELS.params(str(name)), **{k: p for k, p in own.items() if p.kind is p.KEYWORD_ONLY}}


def _try_model(name: str | None, values: dict[str, Any]) -> object:
    # The meta device builds the layers' shapes without allocating or initialising any memory.
    with torch.device("meta"):
        return build_model(str(name), 1, 10, **values)


def _dummy_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _try_optimizer(name: str | None, values: dict[str, Any]) -> object:
    # One real step as well: some arguments are only refused there (LBFGS's line_search_fn).
    weight = torch.ones(1, requires_grad=True)
    optimizer = build_optimizer(str(name), [weight], **values)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[arg-type]
    return optimizer


def _try_scheduler(name: str | None, values: dict[str, Any]) -> object:
    optimizer = _dummy_optimizer()
    stepper = build_scheduler(str(name), optimizer, Schedule(2, 2, "max"), **values)
    for _ in range(2):  # the whole (short) run, as the loop steps it
        for _ in range(2):
            optimizer.step()  # no gradients: moves nothing, but orders the steps as torch expects
            stepper.after_batch()
        stepper.after_epoch(0.5)
    return stepper


SECTION_TABLE: dict[str, Section] = {
    s.title: s
    for s in (
        Section("data", DATASETS, _dataclass_keywords(DataConfig), _try_data),
        Section("model", MODELS, _model_keywords, _try_model),
        Section("optimizer", OPTIMIZERS, lambda n: OPTIMIZERS.params(str(n)), _try_optimizer),
        Section("scheduler", SCHEDULERS, lambda n: SCHEDULERS.params(str(n)), _try_scheduler, "none"),
        Section("train", None, _dataclass_keywords(TrainConfig), lambda _, v: TrainConfig(**v)),
    )
}


# The search space as a tree: sections → name → the keys every choice takes and each choice's own.


@dataclass(frozen=True)
class Param:
    """One key of a study file: fixed or searched, in ``section``, for every choice or for ``choice``."""

    section: str
    key: str
    choice: str | None
    value: Any
    kind: type | None  # from the callable's signature; None where it does not say

    @property
    def name(self) -> str:
        """``section.key`` or ``section.choice.key``: the name in trial.params and export columns."""
        return ".".join(p for p in (self.section, self.choice, self.key) if p)

    @property
    def searched(self) -> bool:
        return is_search(self.value)

    def candidates(self) -> list[Any]:
        """The values to try at load: every choice, both bounds of a range, or the fixed value."""
        if not self.searched:
            return [self.value]
        if "choices" in self.value:
            return list(self.value["choices"])
        return [self._cast(self.value["low"]), self._cast(self.value["high"])]

    def _cast(self, v: Any) -> Any:
        return float(v) if self.is_float_range else v

    @property
    def is_float_range(self) -> bool:
        """A range searched as floats: the callable takes a float, or a bound is spelled as one."""
        bounds = [self.value[k] for k in ("low", "high", "step") if k in self.value]
        return self.kind is float or (self.kind is None and any(isinstance(b, float) for b in bounds))

    def distribution(self) -> BaseDistribution:
        """Optuna's distribution of a searched parameter: what ``suggest`` samples from."""
        v = self.value
        if "choices" in v:
            return CategoricalDistribution(v["choices"])
        if self.is_float_range:
            step = float(v["step"]) if "step" in v else None
            return FloatDistribution(float(v["low"]), float(v["high"]), log=v.get("log", False), step=step)
        return IntDistribution(v["low"], v["high"], log=v.get("log", False), step=v.get("step", 1))

    def suggest(self, trial: optuna.trial.BaseTrial) -> Any:
        """The trial's value: fixed, or suggested under ``name`` with Optuna's matching call."""
        if not self.searched:
            return self.value
        d = self.distribution()
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, d.choices)
        if isinstance(d, FloatDistribution):
            return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)
        assert isinstance(d, IntDistribution)
        return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)

    def take(self, value: Any) -> Any:
        """``value`` as this searched parameter holds it (the listed choice it equals, a float
        range's value as a float); ``ValueError`` saying why when it is not a value it can take."""
        d = self.distribution()
        if isinstance(d, CategoricalDistribution):
            for choice in d.choices:
                if same_value(choice, value):
                    return choice
            raise ValueError(f"is not among its choices {', '.join(map(repr, d.choices))}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"is not a number; its range is {_range_text(self.value)}")
        if isinstance(d, IntDistribution) and not isinstance(value, int):
            raise ValueError(f"is not an integer; its range is {_range_text(self.value)}")
        taken = float(value) if isinstance(d, FloatDistribution) else value
        if not d._contains(d.to_internal_repr(taken)):
            raise ValueError(f"is outside its range {_range_text(self.value)}")
        return taken


@dataclass(frozen=True)
class SectionSpace:
    """One section's tree: its ``name`` (fixed or choices), the keys all choices take, each choice's own."""

    section: Section
    name: Param | None
    common: tuple[Param, ...]
    branches: dict[str, tuple[Param, ...]]

    def choices(self) -> list[Any]:
        return [None] if self.name is None else self.name.candidates()

    def params(self, choice: Any) -> tuple[Param, ...]:
        """The keys a trial that picked ``choice`` sets, common ones first."""
        return self.common + self.branches.get(choice, ())

    def every_param(self) -> Iterator[Param]:
        if self.name is not None:
            yield self.name
        yield from self.common
        for params in self.branches.values():
            yield from params


def walk(raw: dict[str, Any]) -> dict[str, SectionSpace]:
    """The search-space tree of a structurally valid study file: sampling, the grid, the checks
    and export's columns all walk this."""
    out: dict[str, SectionSpace] = {}
    for title, section in SECTION_TABLE.items():
        table = raw.get(title, {})
        name = table.get("name", section.default_name)
        name_param = None if section.registry is None else Param(title, "name", None, name, str)
        names = name_param.candidates() if name_param else [None]
        common, branches = [], {}
        for key, value in table.items():
            if key == "name":
                continue
            if is_conditional(value) and key in names:
                kinds = section.keys(key)
                branches[key] = tuple(
                    Param(title, sub, key, v, _kind(kinds.get(sub))) for sub, v in value.items()
                )
            else:
                common.append(Param(title, key, None, value, _kind(section.keys(names[0]).get(key))))
        out[title] = SectionSpace(section, name_param, tuple(common), branches)
    return out


def _kind(param: inspect.Parameter | None) -> type | None:
    return value_kind(param) if param is not None else None


def space_names(space: dict[str, SectionSpace]) -> list[str]:
    """Every searched parameter's name, in file order: the columns of a trial's sampled values."""
    return [p.name for s in space.values() for p in s.every_param() if p.searched]


# Where a given configuration lies in a search space: [[study.enqueue]] tables, warm starts, forks.

FitMode = Literal["entry", "warm", "copy"]
_NO_VALUE = object()


@dataclass(frozen=True)
class Misfit:
    """A parameter's value that a search space cannot take, and why."""

    name: str
    value: Any  # _NO_VALUE: the configuration has none
    why: str

    @property
    def reason(self) -> str:
        """The misfit without the value: the same for configurations that miss the same way."""
        return f"{self.name} {self.why}"

    def __str__(self) -> str:
        return self.reason if self.value is _NO_VALUE else f"{self.name} = {self.value!r} {self.why}"


@dataclass(frozen=True)
class Fit:
    """A configuration placed in a search space (``fit``)."""

    params: dict[str, Any]  # searched parameter → its value, as the space holds it
    distributions: dict[str, BaseDistribution]  # searched parameter → the space's distribution
    misfits: list[Misfit]


def fit(
    space: dict[str, SectionSpace],
    values: dict[str, Any],
    mode: FitMode,
    ran: dict[str, Any] | None = None,
) -> Fit:
    """Where the configuration ``values`` (parameter name → value) lies in ``space``.

    ``ran`` is the configuration a stored trial ran with (its record's ``config``, section → keyword
    arguments): a parameter of the space missing from ``values`` takes its value from there. In every
    mode a searched value must lie inside its range or among its choices, and a choice's own
    parameter (``optimizer.sgd.lr``) needs that choice picked (``optimizer.name = "sgd"``). Beyond
    that, ``mode`` says what else does not fit:

    - ``entry`` (a ``[[study.enqueue]]`` table): a name the space lacks, and any value for a fixed
      parameter; searched parameters left out are sampled.
    - ``warm`` (a configuration of another study): a section's ``name`` fixed here at another value;
      names the space lacks and other fixed parameters are dropped, left-out ones are sampled.
    - ``copy`` (a trial forked into a new space): a name the space lacks, a fixed parameter at
      another value, and a searched parameter with no value.
    """
    by_name = {p.name: p for s in space.values() for p in s.every_param()}
    given: dict[str, Any] = {}
    misfits: list[Misfit] = []
    for name, value in values.items():
        if name in by_name:
            given[name] = value
        elif mode != "warm":
            searched = ", ".join(space_names(space)) or "none"
            misfits.append(Misfit(name, value, f"is not a parameter of this study (searched: {searched})"))
    chosen: dict[str, Any] = {}  # section → the choice of its name this configuration takes
    for title, s in space.items():
        table = (ran or {}).get(title)
        table = table if isinstance(table, dict) else {}
        if s.name is not None and s.name.name not in given and "name" in table:
            given[s.name.name] = table["name"]
        if s.name is None:
            chosen[title] = None
        else:
            chosen[title] = given.get(s.name.name, _NO_VALUE if s.name.searched else s.name.value)
        for p in s.params(chosen[title]):
            if p.name not in given and p.key in table:
                given[p.name] = table[p.key]
    params: dict[str, Any] = {}
    distributions: dict[str, BaseDistribution] = {}
    for name, value in given.items():
        p = by_name[name]
        head = space[p.section].name
        if not p.searched:
            if mode == "entry":
                why = f"is fixed at {p.value!r} in this study, not searched: leave it out"
                misfits.append(Misfit(name, value, why))
            elif (mode == "copy" or p is head) and not same_value(value, p.value):
                misfits.append(Misfit(name, value, f"is fixed at {p.value!r} in this study"))
            continue
        if p.choice is not None and head is not None and chosen[p.section] != p.choice:
            picked = chosen[p.section]
            why = f"applies only when {head.name} = {p.choice!r}"
            why += ": set that too" if picked is _NO_VALUE else f", not {picked!r}"
            misfits.append(Misfit(name, value, why))
            continue
        try:
            params[name] = p.take(value)
        except ValueError as exc:
            misfits.append(Misfit(name, value, str(exc)))
            continue
        distributions[name] = p.distribution()
    if mode == "copy":
        for title, s in space.items():
            for p in ([s.name] if s.name else []) + list(s.params(chosen[title])):
                if p.searched and p.name not in given:
                    misfits.append(Misfit(p.name, _NO_VALUE, "has no value, and this study searches it"))
    return Fit(params, distributions, misfits)


def same_value(a: Any, b: Any) -> bool:
    """Whether two study-file values are the same: numbers by value (1 and 1.0), lists and tables
    item by item, and a flag never the same as a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def flat_names(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A ``[[study.enqueue]]`` table by parameter name. TOML reads the dotted key
    ``optimizer.sgd.lr = 0.9`` as nested tables; quoted, ``"optimizer.sgd.lr" = 0.9``, as one key:
    both are ``optimizer.sgd.lr`` here. No parameter takes a table, so a table is always a level."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flat_names(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _range_text(table: dict[str, Any]) -> str:
    low, high = table["low"], table["high"]
    if table.get("log"):
        return f"{low}..{high} (log)"
    return f"{low}..{high} in steps of {table['step']}" if "step" in table else f"{low}..{high}"


# Validation.


def validate(path: Path, raw: dict[str, Any]) -> None:
    """Check a parsed study file; raise ``SpecError`` at the first mistake."""
    _Validator(path).check(raw)


class _Validator:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.path}: {where}: {message}")

    def check(self, raw: dict[str, Any]) -> None:
        for title, table in raw.items():
            if title not in SECTIONS:
                raise self.fail(f"[{title}]", f"unknown section; valid: {', '.join(SECTIONS)}")
            if not isinstance(table, dict):
                raise self.fail(title, "must be a table ([section] header)")
        for section in ("data", "model", "optimizer"):
            if "name" not in raw.get(section, {}):
                raise self.fail(f"{section}.name", f"missing; set [{section}] name = ...")
        data = raw["data"]["name"]
        if not isinstance(data, str):
            raise self.fail("data.name", f"must be one dataset name; valid: {_valid(DATASETS)}")
        if data not in DATASETS:
            raise self.fail("data.name", f"unknown dataset {data!r}; valid: {_valid(DATASETS)}")
        self.check_study(raw.get("study", {}), data)
        for title, part in SECTION_TABLE.items():
            self.check_structure(part, raw.get(title, {}))
        space = walk(raw)
        for s in space.values():
            self.check_params(s)
        for s in space.values():
            self.check_builds(s)
        self.check_fit(raw, space)
        if SAMPLERS.facts(named(raw.get("study", {}).get("sampler", DEFAULT_SAMPLER))["name"]).enumerates:
            if raw.get("study", {}).get("enqueue"):
                why = "a grid study runs every configuration of its grid; remove [[study.enqueue]]"
                raise self.fail("study.enqueue", why)
            for p in (p for s in space.values() for p in s.every_param()):
                if p.searched and "choices" not in p.value:
                    raise self.fail(p.name, "the grid sampler needs {choices = [...]}, not a range")
        self.check_enqueue(raw.get("study", {}).get("enqueue", []), space)

    def check_enqueue(self, entries: list[Any], space: dict[str, SectionSpace]) -> None:
        """Each ``[[study.enqueue]]`` table gives searched parameters values they can take."""
        for i, entry in enumerate(entries, 1):
            where = f"study.enqueue (table {i})"
            if not isinstance(entry, dict) or not entry:
                example = "optimizer.lr = 0.01"
                raise self.fail(where, f"must be a table of parameter = value lines, e.g. {example}")
            misfits = fit(space, flat_names(entry), "entry").misfits
            if misfits:
                raise self.fail(where, str(misfits[0]))

    def check_study(self, study: dict[str, Any], data: str) -> None:
        keys = keywords(StudyConfig)
        for key, value in study.items():
            if key not in keys:
                raise self.fail(f"study.{key}", f"unknown key; valid: {', '.join(keys)}")
            if key in ("sampler", "pruner"):
                if not isinstance(value, str | dict):
                    raise self.fail(
                        f"study.{key}", f'must be a name or a table like {{name = "..."}}, not {value!r}'
                    )
            elif key == "heartbeat":
                if not isinstance(value, dict):
                    example = "{interval = 10, grace = 60}"
                    raise self.fail("study.heartbeat", f"must be a table like {example}, not {value!r}")
            elif key == "enqueue" and not isinstance(value, list):
                raise self.fail("study.enqueue", "write each configuration as a [[study.enqueue]] table")
            elif key == "objectives":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise self.fail(
                        "study.objectives", f'must be a list like ["accuracy", "epoch_time"], not {value!r}'
                    )
            else:
                self.check_value(f"study.{key}", value, _kind(keys[key]))
        for key, value in study.items():  # one key at a time, so the error names the key
            try:
                StudyConfig(**{key: value})
            except ValueError as exc:
                raise self.fail(f"study.{key}", str(exc)) from None
        direction = DATASETS.facts(data).task.direction
        if study.get("direction", direction) != direction:
            metric = DATASETS.facts(data).task.metric_label
            raise self.fail("study.direction", f"the metric is {metric}; direction must be {direction!r}")
        task = DATASETS.facts(data).task
        try:
            goals = Objectives.named(task, study.get("objectives") or [task.metric])
        except ValueError as exc:
            raise self.fail("study.objectives", str(exc)) from None
        sampler = named(study.get("sampler", DEFAULT_SAMPLER))
        self.check_builder("study.sampler", sampler, SAMPLERS)
        self.check_builder("study.pruner", named(study.get("pruner", goals.default_pruner)), PRUNERS)
        if goals.multi:
            if not SAMPLERS.facts(sampler["name"]).multi_objective:
                valid = ", ".join(n for n in SAMPLERS if SAMPLERS.facts(n).multi_objective)
                raise self.fail(
                    "study.sampler",
                    f"{sampler['name']} optimises one objective; with several use one of: {valid}",
                )
            pruner = named(study.get("pruner", "none"))["name"]
            if pruner != "none":
                raise self.fail(
                    "study.pruner",
                    f"Optuna's pruners judge one value, and this study has {len(goals.names)} objectives "
                    f"({', '.join(goals.names)}): remove the pruner (every trial then trains all its epochs)",
                )

    def check_builder(self, where: str, table: dict[str, Any], registry: Registry[Any, Any]) -> None:
        name = table.get("name")
        if not isinstance(name, str) or name not in registry:
            raise self.fail(f"{where}.name", f"unknown {registry.kind} {name!r}; valid: {_valid(registry)}")
        allowed = registry.params(name)
        nested = getattr(registry.facts(name), "nested", None)
        for key, value in table.items():
            if key == "name":
                continue
            if key == nested:
                if not isinstance(value, dict):
                    raise self.fail(f"{where}.{key}", 'must be a table like {name = "median"}')
                self.check_builder(f"{where}.{key}", value, registry)
            elif key not in allowed:
                valid = sorted(set(allowed) | ({nested} if nested else set()))
                raise self.fail(
                    f"{where}.{key}", f"not an argument of {registry.kind} {name}; valid: {', '.join(valid)}"
                )
            elif not isinstance(value, dict):
                self.check_value(f"{where}.{key}", value, _kind(allowed[key]))
        required = [k for k, p in allowed.items() if p.default is p.empty and k not in table]
        if required:
            raise self.fail(
                f"{where}.{required[0]}", f"missing; {registry.kind} {name} requires {', '.join(required)}"
            )

    def check_structure(self, section: Section, table: dict[str, Any]) -> None:
        """``name`` and every key known; sub-tables only for offered choices; no key set twice."""
        title = section.title
        name = table.get("name", section.default_name)
        if section.registry is None:
            names: list[Any] = [None]
            if "name" in table:
                raise self.fail(f"{title}.name", f"unknown key; valid: {', '.join(section.keys(None))}")
        elif isinstance(name, dict):
            if set(name) != {"choices"}:
                raise self.fail(f"{title}.name", "a name can only be searched with {choices = [...]}")
            self.check_search(f"{title}.name", name, str)
            names = list(name["choices"])
        else:
            names = [name]
        if section.registry is not None:
            for n in names:
                if n not in section.registry:
                    raise self.fail(
                        f"{title}.name",
                        f"unknown {section.registry.kind} {n!r}; valid: {_valid(section.registry)}",
                    )
        for key, value in table.items():
            where = f"{title}.{key}"
            if key == "name":
                continue
            if is_conditional(value) and not (section.registry and key in section.registry):
                raise self.fail(
                    where,
                    "a table must be {low, high[, log, step]}, {choices = [...]}"
                    " or a sub-table named after a choice of name",
                )
            if is_conditional(value):
                if key not in names:
                    raise self.fail(
                        where,
                        f"a table for {key!r}, which {title}.name does not offer"
                        f" (offered: {', '.join(map(str, names))})",
                    )
                valid = section.keys(key)
                for sub in value:
                    if sub not in valid:
                        raise self.fail(f"{where}.{sub}", f"unknown key; valid: {', '.join(sorted(valid))}")
                    if sub in table:
                        raise self.fail(
                            f"{where}.{sub}",
                            f"also set in [{title}]; a key belongs either to every choice ([{title}]) "
                            f"or to one ([{where}]), not both",
                        )
                continue
            missing = [n for n in names if key not in section.keys(n)]
            if missing:
                valid_keys = sorted(set.intersection(*(set(section.keys(n)) for n in names)))
                hint = f"; put it in [{title}.<name>] for the choices that take it" if len(names) > 1 else ""
                for_ = f" for {', '.join(map(str, missing))}" if missing != [None] else ""
                raise self.fail(where, f"unknown key{for_}; valid: {', '.join(valid_keys)}{hint}")

    def check_params(self, space: SectionSpace) -> None:
        for p in space.every_param():
            if p.key == "name":
                continue
            if p.section == "data" and p.searched and _fixed_per_study(p.key):
                raise self.fail(
                    p.name,
                    f"{p.key} defines the data every trial is judged on and cannot "
                    "be searched; set one value",
                )
            if p.searched:
                self.check_search(p.name, p.value, p.kind)
            elif isinstance(p.value, dict):
                raise self.fail(p.name, "a table must be {low, high[, log, step]} or {choices = [...]}")
            else:
                self.check_value(p.name, p.value, p.kind)
            if p.key == "init":
                for v in p.candidates():
                    if v not in INITS:
                        raise self.fail(p.name, f"unknown init {v!r}; valid: {', '.join(INITS)}")
            length = sequence_length(space.section.keys(p.choice or space.choices()[0])[p.key])
            for v in p.candidates() if length else ():
                if len(v) != length:
                    raise self.fail(p.name, f"needs {length} values, not {len(v)} ({v!r})")

    def check_value(self, where: str, value: Any, kind: type | None) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(where, "must be a finite number")
        if kind is None:
            return
        if kind is int and isinstance(value, float):
            raise self.fail(
                where, f"{where.rsplit('.', 1)[-1]} counts things and must be an integer, not {value!r}"
            )
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, int | float) and not isinstance(value, bool),
            str: isinstance(value, str),
            list: isinstance(value, list),
        }[kind]
        if not ok:
            raise self.fail(where, f"{value!r} has the wrong type; expected {_KIND_NAMES[kind]}")

    def check_search(self, where: str, table: dict[str, Any], kind: type | None) -> None:
        if "choices" in table:
            if set(table) != {"choices"}:
                raise self.fail(where, "{choices = [...]} takes no other keys")
            choices = table["choices"]
            if not isinstance(choices, list) or not choices:
                raise self.fail(where, "choices must be a non-empty list")
            for c in choices:
                if not isinstance(c, str | int | float | bool):
                    raise self.fail(where, f"choice {c!r}: choices must be strings, numbers or booleans")
                self.check_value(where, c, kind)
            if len({repr(c) for c in choices}) != len(choices):
                raise self.fail(where, f"choices repeat a value: {choices!r}")
            return
        if "low" not in table or "high" not in table:
            raise self.fail(where, "a range needs low and high, e.g. {low = 1e-4, high = 0.1, log = true}")
        if kind in (bool, str, list):
            raise self.fail(where, f"{_KIND_NAMES[kind]} cannot be a range; use {{choices = [...]}}")
        for k in ("low", "high", "step"):
            v = table.get(k, 1)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.fail(f"{where}.{k}", f"must be a number, not {v!r}")
            self.check_value(f"{where}.{k}", v, None)
            if kind is int and isinstance(v, float):
                raise self.fail(
                    where, f"{where.rsplit('.', 1)[-1]} counts things and must be an integer, not {v!r}"
                )
        low, high = table["low"], table["high"]
        if low > high:
            raise self.fail(where, f"low ({low}) is greater than high ({high})")
        if not isinstance(table.get("log", False), bool):
            raise self.fail(f"{where}.log", "must be true or false")
        if table.get("log") and low <= 0:
            raise self.fail(where, f"a log range needs low > 0 (got {low})")
        if "step" in table:
            step = table["step"]
            if table.get("log"):
                raise self.fail(where, "a range cannot have both log and step")
            if step <= 0:
                raise self.fail(f"{where}.step", "must be positive")
            spans = (high - low) / step
            if abs(spans - round(spans)) > 1e-9 * max(1.0, spans):
                top = low + math.floor(spans) * step
                raise self.fail(
                    f"{where}.step",
                    f"{step} does not divide the range {low}..{high} (the "
                    f"largest value would be {top:.6g}); make high - low a multiple of step",
                )

    def check_fit(self, raw: dict[str, Any], space: dict[str, SectionSpace]) -> None:
        data = raw["data"]["name"]
        facts = DATASETS.facts(data)
        for p in space["train"].common:  # the task's loss says whether it can be smoothed
            for v in p.candidates() if p.key == "label_smoothing" else ():
                try:
                    if v:
                        facts.task.loss(label_smoothing=v)
                except ValueError as exc:
                    raise self.fail(p.name, f"{exc} ({data})") from None
        resize = space["data"].common
        sizes = next((p.candidates() for p in resize if p.key == "resize"), [0])
        for m in space["model"].choices():
            model = MODELS.facts(m)
            if model.task is not facts.task:
                raise self.fail(
                    "model.name",
                    f"{m} is a {model.task.name} model but {data} is a {facts.task.name} dataset",
                )
            need = model.input_size
            size = next((z or facts.image_size for z in sizes if (z or facts.image_size) != need), None)
            if need and size is not None:
                raise self.fail(
                    "data.resize",
                    f"model {m} needs {need}×{need} input but the data is "
                    f"{size}×{size}; set [data] resize = {need}",
                )

    def check_builds(self, space: SectionSpace) -> None:
        """Build each choice's callable with its fixed values, then with every combination of the
        searched keys' bounds and choices, so the callable's own limits (torch's "Invalid learning
        rate", "Nesterov momentum requires a momentum") are met now, not in a trial."""
        section = space.section
        for choice in space.choices():
            params = space.params(choice)
            base: dict[str, Any] = {}
            for p in (p for p in params if not p.searched):
                self.try_build(section, choice, {**base, p.key: p.value}, [p])
                base[p.key] = p.value
            self.try_build(section, choice, base, [])
            searched = [p for p in params if p.searched]
            combos: Iterable[tuple[Any, ...]] = itertools.product(*(p.candidates() for p in searched))
            if math.prod(len(p.candidates()) for p in searched) > _MAX_COMBINATIONS:
                # Too many to build each: every candidate alone, the others at their defaults.
                combos = (
                    tuple(v if q is p else _DEFAULT for q in searched)
                    for p in searched
                    for v in p.candidates()
                )
            for values in combos:
                chosen = {p.key: v for p, v in zip(searched, values, strict=True) if v is not _DEFAULT}
                self.try_build(
                    section, choice, {**base, **chosen}, [p for p in searched if p.key in chosen], chosen
                )

    def try_build(
        self,
        section: Section,
        choice: Any,
        values: dict[str, Any],
        culprits: list[Param],
        searched: dict[str, Any] | None = None,
    ) -> None:
        try:
            section.trial(choice, values)
            return
        except Exception as exc:  # whatever the callable refuses, said in its own words
            error = exc
        by_key = {p.key: p for p in culprits}
        if searched and len(searched) > 1:
            # Name only the values that matter: those whose other candidates make it build.
            def builds(key: str, other: Any) -> bool:
                try:
                    section.trial(choice, {**values, key: other})
                    return True
                except Exception:
                    return False

            relevant = {
                k: v
                for k, v in searched.items()
                if any(builds(k, o) for o in by_key[k].candidates() if o != v)
            }
            searched = relevant or searched
        if searched:
            where = " with ".join(f"{by_key[k].name} = {v!r}" for k, v in searched.items())
        else:
            where = culprits[-1].name if culprits else section.title
        of = f" ({section.title}.name = {choice!r})" if choice and section.registry is not None else ""
        raise self.fail(where, f"{_one_line(error)}{of}")


# Past this many combinations of bounds and choices in one section, each is tried alone.
_MAX_COMBINATIONS = 256
_DEFAULT = object()
_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _valid(registry: Registry[Any, Any]) -> str:
    return ", ".join(registry.names())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
