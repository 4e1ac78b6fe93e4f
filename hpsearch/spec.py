"""Study files: find and load one, and turn it into suggest_* calls for a trial.

The file's format and its validation live in ``hpsearch.schema``. Parameters are named
``section.key``, or ``section.choice.key`` for those of one choice only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import tomllib

from hpsearch.datasets import DATASETS
from hpsearch.schema import (
    DATA_DEFAULTS,
    MODEL_DEFAULTS,
    TRAIN_DEFAULTS,
    SpecError,
    is_conditional,
    is_search,
    named,
    validate,
)
from hpsearch.search import SAMPLERS, build_pruner, build_sampler

__all__ = [
    "Config",
    "SpecError",
    "StudySpec",
    "find_study_file",
    "is_search",
    "list_studies",
    "load_spec",
    "space_of",
]

STUDIES_DIR = Path("studies")
_BUNDLED_STUDIES = Path(__file__).resolve().parent.parent / "studies"

# Keys that change what a stored trial means; the rest of [study] only says how long to search.
_RUN_ONLY = {"n_trials", "timeout", "description"}
Config = dict[str, dict[str, Any]]


def space_of(raw: dict[str, Any]) -> dict[str, Any]:
    """A study file's content less the keys that only say how long to search."""
    raw = copy.deepcopy(raw)
    for key in _RUN_ONLY:
        raw.get("study", {}).pop(key, None)
    return raw


@dataclass
class StudySpec:
    """A validated study file. ``raw`` is the file's content; ``name`` its stem."""

    name: str
    path: Path
    source: str
    raw: dict[str, Any]
    task: str = field(init=False)

    def __post_init__(self) -> None:
        self.task = DATASETS.meta[self.raw["data"]["name"]]["task"]

    @property
    def study(self) -> dict[str, Any]:
        return dict(self.raw.get("study", {}))

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        default = "maximize" if self.task == "classification" else "minimize"
        return "minimize" if self.study.get("direction", default) == "minimize" else "maximize"

    @property
    def metric(self) -> str:
        return "accuracy" if self.task == "classification" else "mse"

    @property
    def seed(self) -> int:
        return int(self.study.get("seed", 0))

    @property
    def n_trials(self) -> int | None:
        n = self.study.get("n_trials")
        return int(n) if n is not None else None

    @property
    def description(self) -> str:
        return str(self.study.get("description", ""))

    def space(self) -> dict[str, Any]:
        """Everything that defines what a trial means: compared when a study is resumed."""
        return space_of(self.raw)

    def sampler(self) -> optuna.samplers.BaseSampler:
        table = named(self.study.get("sampler", {"name": "tpe"}))
        kwargs = {k: v for k, v in table.items() if k != "name"}
        if "seed" in SAMPLERS.params(table["name"]):
            kwargs.setdefault("seed", self.seed)
        return build_sampler(table["name"], self._grid(), **kwargs)

    def pruner(self) -> optuna.pruners.BasePruner:
        table = named(self.study.get("pruner", {"name": "median"}))
        return build_pruner(table["name"], **{k: v for k, v in table.items() if k != "name"})

    def _grid(self) -> dict[str, list[Any]]:
        grid: dict[str, list[Any]] = {}
        for section, table in self.raw.items():
            if section == "study":
                continue
            for key, value in table.items():
                if is_search(value):
                    grid[f"{section}.{key}"] = value.get("choices", [])
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if is_search(v):
                            grid[f"{section}.{key}.{sub}"] = v.get("choices", [])
        return grid

    def sample(self, trial: optuna.Trial) -> Config:
        """The trial's full configuration: defaults, fixed values and suggested values."""
        defaults = {"data": DATA_DEFAULTS, "model": MODEL_DEFAULTS, "train": TRAIN_DEFAULTS}
        config: Config = {}
        for section in ("data", "model", "optimizer", "scheduler", "train"):
            table = self.raw.get(section, {})
            out = dict(defaults.get(section, {}))
            name = table.get("name", "none" if section == "scheduler" else None)
            if is_search(name):
                name = trial.suggest_categorical(f"{section}.name", name["choices"])
            for key, value in table.items():
                if key != "name" and not is_conditional(value):
                    out[key] = _suggest(trial, f"{section}.{key}", value)
            for key, value in dict(table.get(name, {}) if name else {}).items():
                out[key] = _suggest(trial, f"{section}.{name}.{key}", value)
            if name is not None:
                out["name"] = name
            config[section] = out
        return config


def _suggest(trial: optuna.Trial, pname: str, value: Any) -> Any:
    if not is_search(value):
        return value
    if "choices" in value:
        return trial.suggest_categorical(pname, value["choices"])
    low, high, step, log = value["low"], value["high"], value.get("step"), value.get("log", False)
    if all(isinstance(v, int) for v in (low, high, step or 1)):
        return trial.suggest_int(pname, low, high, step=step or 1, log=log)
    return trial.suggest_float(pname, float(low), float(high), step=step, log=log)


def find_study_file(name_or_path: str) -> Path:
    """A path to a ``.toml`` file, or a study name looked up in ``./studies`` then the bundled set."""
    given = Path(name_or_path)
    if given.suffix == ".toml" or given.exists():
        if not given.is_file():
            raise SpecError(f"study file {given} does not exist")
        return given
    for folder in (STUDIES_DIR, _BUNDLED_STUDIES):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in (STUDIES_DIR, _BUNDLED_STUDIES) for p in d.glob("*.toml")})
    raise SpecError(
        f"no study named {name_or_path!r}: no studies/{name_or_path}.toml; "
        f"known studies: {', '.join(known) or 'none'} (or pass a path to a .toml file)"
    )


def list_studies() -> list[Path]:
    """Study files of ``./studies`` and the bundled set, by name (the local one wins)."""
    found: dict[str, Path] = {}
    for folder in (_BUNDLED_STUDIES, STUDIES_DIR):
        for p in sorted(folder.glob("*.toml")):
            found[p.stem] = p
    return [found[k] for k in sorted(found)]


def load_spec(name_or_path: str | Path) -> StudySpec:
    """Read and validate a study file; raise ``SpecError`` naming the file, key and valid values."""
    path = find_study_file(str(name_or_path))
    source = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    validate(path, raw)
    spec = StudySpec(path.stem, path, source, raw)
    # Building them once here turns the last argument mistakes (a threshold pruner with neither
    # bound, say) into load-time errors instead of failures when the study starts.
    for key, build in (("sampler", spec.sampler), ("pruner", spec.pruner)):
        try:
            build()
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{path}: study.{key}: {exc}") from None
    return spec
