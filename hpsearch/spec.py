"""Study files: find and load one, resolve its defaults, and turn it into each trial's typed config.

The file's format, its search-space tree and its validation live in ``hpsearch.schema``. Parameters
are named ``section.key``, or ``section.choice.key`` for those of one choice only.
"""

from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import optuna

from hpsearch.datasets import DATASETS, DataConfig
from hpsearch.objectives import Objectives
from hpsearch.schema import (
    SECTION_TABLE,
    Fit,
    FitMode,
    SectionSpace,
    SpecError,
    StudyConfig,
    TrainConfig,
    fit,
    flat_names,
    named,
    space_names,
    validate,
    walk,
)
from hpsearch.search import DEFAULT_SAMPLER, SAMPLERS, AvoidOom, build_pruner, build_sampler
from hpsearch.task import Task

__all__ = [
    "Choice",
    "SpecError",
    "StudySpec",
    "TrialConfig",
    "find_study_file",
    "list_studies",
    "load_spec",
    "space_of",
]

STUDIES_DIR = Path("studies")
_BUNDLED_STUDIES = Path(__file__).resolve().parent.parent / "studies"

# Keys of [study] that say how long and how robustly to search, and where to start, not what a
# stored trial means: free to change between runs.
_RUN_ONLY = {
    "n_trials",
    "timeout",
    "description",
    "heartbeat",
    "retries",
    "checkpoints",
    "enqueue",
    "max_fail_fraction",
}


@dataclass(frozen=True)
class Choice:
    """A registry entry picked by ``name`` and the keyword arguments it is called with."""

    name: str
    kwargs: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial runs with, every default filled in."""

    data: DataConfig
    model: Choice
    optimizer: Choice
    scheduler: Choice
    train: TrainConfig

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The configuration as plain tables, as stored on the trial and written by ``hpsearch best``."""

        def plain(obj: Any) -> dict[str, Any]:
            return {f.name: getattr(obj, f.name) for f in fields(obj)}

        return {
            "data": plain(self.data),
            "model": self.model.as_dict(),
            "optimizer": self.optimizer.as_dict(),
            "scheduler": self.scheduler.as_dict(),
            "train": plain(self.train),
        }


def space_of(raw: dict[str, Any]) -> dict[str, Any]:
    """A study file's content less the keys that only say how long to search."""
    raw = copy.deepcopy(raw)
    for key in _RUN_ONLY:
        raw.get("study", {}).pop(key, None)
    return raw


def resolve(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every section-level default written in, so a stored spec says what ran."""
    out = copy.deepcopy(raw)
    facts = DATASETS.facts(out["data"]["name"])
    for title, cls in (("data", DataConfig), ("train", TrainConfig)):
        table = out.setdefault(title, {})
        for f in fields(cls):
            if f.default is not MISSING and f.default is not None:
                table.setdefault(f.name, f.default)
    out["train"].setdefault("max_loss", facts.task.max_loss(facts.outputs))
    out.setdefault("scheduler", {}).setdefault("name", "none")
    out["model"].setdefault("init", "default")
    study = out.setdefault("study", {})
    study.setdefault("seed", 0)
    study.setdefault("direction", facts.task.direction)
    study.setdefault("objective", StudyConfig.objective)
    goals = Objectives.named(facts.task, study.get("objectives") or [facts.task.metric])
    study["objectives"] = goals.names
    study["sampler"] = named(study.get("sampler", DEFAULT_SAMPLER))
    study["pruner"] = named(study.get("pruner", goals.default_pruner))
    return out


def _scalar_defaults(section: str, name: str) -> dict[str, Any]:
    """The builder's own defaults that a study file could have written: what the trial really used."""
    out: dict[str, Any] = {}
    for key, p in SECTION_TABLE[section].keys(name).items():
        d = p.default
        if isinstance(d, bool | int | float | str) or (isinstance(d, list | tuple) and d):
            out[key] = list(d) if isinstance(d, tuple) else d
    return out


@dataclass
class StudySpec:
    """A validated study file, defaults resolved. ``raw`` is that content; ``name`` the file's stem."""

    name: str
    path: Path
    source: str
    raw: dict[str, Any]
    task: Task = field(init=False)

    def __post_init__(self) -> None:
        self.task = DATASETS.facts(self.raw["data"]["name"]).task

    @cached_property
    def study(self) -> StudyConfig:
        return StudyConfig(**self.raw.get("study", {}))

    @cached_property
    def space(self) -> dict[str, SectionSpace]:
        """The search-space tree: sampling, the grid and the export columns walk it."""
        return walk(self.raw)

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return self.task.direction

    @cached_property
    def objectives(self) -> Objectives:
        """What a finished trial reports: the task's metric, then the file's costs."""
        return Objectives.named(self.task, self.study.objectives or [self.task.metric], self.study.objective)

    @property
    def seed(self) -> int:
        return self.study.seed

    @property
    def n_trials(self) -> int | None:
        if self.study.n_trials is None and self.enumerates:
            return len(self.grid())
        return self.study.n_trials

    @property
    def description(self) -> str:
        return self.study.description

    @property
    def enumerates(self) -> bool:
        """True for a grid study: its configurations are queued when it is created."""
        return SAMPLERS.facts(named(self.study.sampler)["name"]).enumerates

    def check_data(self, train_size: int, test_size: int) -> None:
        """Raise ``SpecError`` unless ``[data]`` fits the dataset as found (files may be a subset)."""
        data = self.raw["data"]
        fixed = {f.name: data[f.name] for f in fields(DataConfig) if f.metadata.get("searchable") is False}
        try:
            DataConfig(name=data["name"], **fixed).check_sizes(train_size, test_size)
        except ValueError as exc:
            raise SpecError(
                f"{self.path}: data: {exc} in the {self.raw['data']['name']} files found"
            ) from None

    def space_key(self) -> dict[str, Any]:
        """Everything that defines what a trial means: compared when a study is resumed."""
        return space_of(self.raw)

    def param_names(self) -> list[str]:
        """Every searched parameter, in file order."""
        return space_names(self.space)

    def fit(self, values: dict[str, Any], mode: FitMode, ran: dict[str, Any] | None = None) -> Fit:
        """Where a configuration lies in this study's space (``schema.fit``)."""
        return fit(self.space, values, mode, ran)

    def first_trials(self) -> list[dict[str, Any]]:
        """The ``[[study.enqueue]]`` configurations as trial params, to be tried before any sampled one."""
        return [self.fit(flat_names(entry), "entry").params for entry in self.study.enqueue]

    def sampler(self) -> optuna.samplers.BaseSampler:
        """The file's sampler; where it samples the batch size, kept below the batch sizes that ran
        out of memory (``AvoidOom``). The grid's configurations are all queued, so it is not."""
        table = named(self.study.sampler)
        kwargs = {k: v for k, v in table.items() if k != "name"}
        if "seed" in SAMPLERS.params(table["name"]):
            kwargs.setdefault("seed", self.seed)
        sampler = build_sampler(table["name"], **kwargs)
        sizes = [p.name for p in self.space["data"].every_param() if p.key == "batch_size" and p.searched]
        return AvoidOom(sampler, sizes[0]) if sizes and not self.enumerates else sampler

    def pruner(self) -> optuna.pruners.BasePruner:
        table = named(self.study.pruner)
        return build_pruner(table["name"], **{k: v for k, v in table.items() if k != "name"})

    def grid(self) -> list[dict[str, Any]]:
        """Every configuration of the search space, as trial params, each once.

        Per section, the union over each choice of ``name`` of the product of that choice's own
        keys; then the product over sections. Only choices are enumerated (the grid allows no range).
        """
        per_section: list[list[dict[str, Any]]] = []
        for s in self.space.values():
            points: list[dict[str, Any]] = []
            for choice in s.choices():
                head = {s.name.name: choice} if s.name is not None and s.name.searched else {}
                searched = [p for p in s.params(choice) if p.searched]
                for values in itertools.product(*(p.candidates() for p in searched)):
                    points.append({**head, **{p.name: v for p, v in zip(searched, values, strict=True)}})
            per_section.append(points)
        return [
            {k: v for part in combo for k, v in part.items()} for combo in itertools.product(*per_section)
        ]

    def sample(self, trial: optuna.trial.BaseTrial) -> TrialConfig:
        """The trial's full configuration: defaults, fixed values and suggested values."""
        picked: dict[str, tuple[Any, dict[str, Any]]] = {}
        for title, s in self.space.items():
            choice = s.name.suggest(trial) if s.name is not None else None
            picked[title] = (choice, {p.key: p.suggest(trial) for p in s.params(choice)})

        def pick(title: str) -> Choice:
            choice, kwargs = picked[title]
            return Choice(choice, {**_scalar_defaults(title, choice), **kwargs})

        data_name, data_kwargs = picked["data"]
        return TrialConfig(
            data=DataConfig(name=data_name, **data_kwargs),
            model=pick("model"),
            optimizer=pick("optimizer"),
            scheduler=pick("scheduler"),
            train=TrainConfig(**picked["train"][1]),
        )


def find_study_file(name_or_path: str) -> Path:
    """A path to a ``.toml`` file, or a study name looked up in ``./studies`` then the bundled set."""
    given = Path(name_or_path)
    if given.is_dir():
        raise SpecError(f"{given} is a directory, not a study file; pass a .toml file or a study name")
    if given.suffix == ".toml" or given.exists() or "/" in name_or_path:
        if not given.is_file():
            raise SpecError(f"study file {given} does not exist")
        return given
    for folder in (STUDIES_DIR, _BUNDLED_STUDIES):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for p in list_studies()})
    raise SpecError(
        f"no study named {name_or_path!r}: no studies/{name_or_path}.toml; "
        f"known studies: {', '.join(known) or 'none'} (or pass a path to a .toml file)"
    )


def list_studies() -> list[Path]:
    """Study files of ``./studies`` and the bundled set, by name (the local one wins)."""
    found: dict[str, Path] = {}
    for folder in (_BUNDLED_STUDIES, STUDIES_DIR):
        for p in sorted(folder.glob("*.toml")):
            if p.is_file():
                found[p.stem] = p
    return [found[k] for k in sorted(found)]


def read_study_text(path: Path) -> str:
    """The text of a study file; a binary, non-UTF-8 or unreadable file is a ``SpecError`` naming it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: not a UTF-8 text file (byte {exc.start} is {data[exc.start]:#04x}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise SpecError(f"{path}: a binary file (it holds NUL bytes), not a TOML study file")
    return text


def load_spec(name_or_path: str | Path) -> StudySpec:
    """Read and validate a study file; raise ``SpecError`` naming the file, key and valid values."""
    path = find_study_file(str(name_or_path))
    source = read_study_text(path)
    try:
        raw = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    validate(path, raw)
    spec = StudySpec(path.stem, path, source, resolve(raw))
    # Building them once here turns the last argument mistakes (a threshold pruner with neither
    # bound, say) into load-time errors instead of failures when the study starts.
    for key, build in (("sampler", spec.sampler), ("pruner", spec.pruner)):
        try:
            build()
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{path}: study.{key}: {exc}") from None
    if spec.enumerates and spec.study.n_trials is not None and spec.study.n_trials > len(spec.grid()):
        raise SpecError(
            f"{path}: study.n_trials: the grid has {len(spec.grid())} configurations, fewer than "
            f"n_trials = {spec.study.n_trials}; lower n_trials or remove it to run each once"
        )
    return spec
