"""What a study file may contain, and the check that it does.

A section's keys are the keyword arguments of one builder. A value is fixed, or a search table that
uses Optuna's argument names: ``{low, high[, log, step]}`` (ints give an int range) or
``{choices = [...]}``. A sub-table named after a choice of ``name`` holds the keys that exist only
for that choice. Every mistake is reported as a ``SpecError`` naming the file, the key and the
valid values.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hpsearch.datasets import DATASETS
from hpsearch.models import INITS, MODELS, input_size
from hpsearch.models import task as model_task
from hpsearch.optim import OPTIMIZERS, SCHEDULERS, optimizer_params
from hpsearch.registry import Registry
from hpsearch.search import PRUNERS, SAMPLERS

SECTIONS = ("study", "data", "model", "optimizer", "scheduler", "train")
STUDY_KEYS: dict[str, Any] = {
    "description": str, "direction": str, "n_trials": int, "timeout": float, "seed": int,
    "sampler": dict, "pruner": dict,
}  # fmt: skip
DATA_DEFAULTS: dict[str, Any] = {
    "name": None, "batch_size": 128, "val_fraction": 0.1, "resize": 0, "flip": False,
    "train_limit": 0, "test_limit": 0,
}  # fmt: skip
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "l1": 0.0,
    "max_loss": 0.0,
    "eval_batch_size": 1024,
    "seed": None,  # None: derived from the study seed and the trial number
}
MODEL_DEFAULTS: dict[str, Any] = {"init": "default", "init_value": 0.0}
# Keys that count things: a float there (batch_size = 1.5) is a mistake, not a value to round.
_COUNTS = {"batch_size", "epochs", "train_limit", "test_limit", "eval_batch_size", "seed"}
SEARCH_KEYS = {"low", "high", "log", "step", "choices"}


class SpecError(Exception):
    """A study file is wrong; the message names the file, the key and the valid values."""


def is_search(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= SEARCH_KEYS


def is_conditional(value: Any) -> bool:
    return isinstance(value, dict) and not is_search(value)


def named(value: Any) -> dict[str, Any]:
    return {"name": value} if isinstance(value, str) else dict(value)


def validate(path: Path, raw: dict[str, Any]) -> None:
    """Check a parsed study file; raise ``SpecError`` at the first mistake."""
    _Validator(path).check(raw)


class _Validator:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> SpecError:
        return SpecError(f"{self.path}: {where}: {message}")

    def check(self, raw: dict[str, Any]) -> None:
        for section, table in raw.items():
            if section not in SECTIONS:
                raise self.fail(f"[{section}]", f"unknown section; valid: {', '.join(SECTIONS)}")
            if not isinstance(table, dict):
                raise self.fail(section, "must be a table ([section] header)")
        for section in ("data", "model", "optimizer"):
            if "name" not in raw.get(section, {}):
                raise self.fail(f"{section}.name", f"missing; set [{section}] name = ...")
        self.check_study(raw.get("study", {}))
        data = raw["data"]
        if not isinstance(data["name"], str):
            raise self.fail("data.name", f"must be one dataset name; valid: {_valid(DATASETS)}")
        if data["name"] not in DATASETS:
            raise self.fail("data.name", f"unknown dataset {data['name']!r}; valid: {_valid(DATASETS)}")
        self.check_section("data", data, DATASETS, lambda _: set(DATA_DEFAULTS), DATA_DEFAULTS)
        self.check_section("train", raw.get("train", {}), None, lambda _: set(TRAIN_DEFAULTS),
                           TRAIN_DEFAULTS)  # fmt: skip
        self.check_section("model", raw["model"], MODELS,
                           lambda m: set(MODELS.params(m)) | set(MODEL_DEFAULTS))  # fmt: skip
        self.check_section("optimizer", raw["optimizer"], OPTIMIZERS, optimizer_params)
        self.check_section("scheduler", raw.get("scheduler", {}), SCHEDULERS,
                           lambda s: set(SCHEDULERS.params(s)))  # fmt: skip
        self.check_fit(raw)
        if named(raw.get("study", {}).get("sampler", "tpe"))["name"] == "grid":
            self.check_grid(raw)

    def check_study(self, study: dict[str, Any]) -> None:
        for key, value in study.items():
            if key not in STUDY_KEYS:
                raise self.fail(f"study.{key}", f"unknown key; valid: {', '.join(STUDY_KEYS)}")
            want = STUDY_KEYS[key]
            if want is dict and isinstance(value, str):
                value = {"name": value}
            if not _is_type(value, want):
                raise self.fail(f"study.{key}", f"must be {_type_name(want)}, not {value!r}")
        if study.get("direction", "maximize") not in ("maximize", "minimize"):
            raise self.fail("study.direction", "must be 'maximize' or 'minimize'")
        if study.get("n_trials", 1) < 1:
            raise self.fail("study.n_trials", "must be at least 1")
        self.check_builder("study.sampler", named(study.get("sampler", "tpe")), SAMPLERS)
        self.check_builder("study.pruner", named(study.get("pruner", "median")), PRUNERS)

    def check_builder(self, where: str, table: dict[str, Any], registry: Registry[Any]) -> None:
        name = table.get("name")
        if not isinstance(name, str) or name not in registry:
            raise self.fail(f"{where}.name", f"unknown {registry.kind} {name!r}; valid: {_valid(registry)}")
        allowed = set(registry.params(name))
        nested = registry.meta[name].get("nested")
        for key, value in table.items():
            if key == "name":
                continue
            if key == nested:
                if not isinstance(value, dict):
                    raise self.fail(f"{where}.{key}", 'must be a table like {name = "median"}')
                self.check_builder(f"{where}.{key}", value, registry)
            elif key not in allowed:
                valid = sorted(allowed | ({nested} if nested else set()))
                raise self.fail(
                    f"{where}.{key}",
                    f"not an argument of {registry.kind} {name}; valid: {', '.join(valid)}",
                )
        required = [k for k, p in registry.params(name).items() if p.default is p.empty and k not in table]
        if required:
            raise self.fail(f"{where}.{required[0]}", f"missing; {registry.kind} {name} requires "
                            f"{', '.join(required)}")  # fmt: skip

    def check_section(
        self,
        section: str,
        table: dict[str, Any],
        registry: Registry[Any] | None,
        keys_of: Any,
        defaults: dict[str, Any] | None = None,
    ) -> None:
        name = table.get("name", "none" if section == "scheduler" else None)
        if isinstance(name, dict):
            self.check_search(f"{section}.name", name, None)
            if "choices" not in name:
                raise self.fail(f"{section}.name", "a name can only be searched with {choices = [...]}")
            names = list(name["choices"])
        else:
            names = [name]
        if registry is not None:
            for n in names:
                if not isinstance(n, str) or n not in registry:
                    raise self.fail(
                        f"{section}.name",
                        f"unknown {registry.kind} {n!r}; valid: {_valid(registry)}",
                    )
        for key, value in table.items():
            where = f"{section}.{key}"
            if key == "name":
                continue
            if is_conditional(value):
                if registry is None or key not in registry:
                    raise self.fail(where, "a table must be {low, high[, log, step]}, {choices = [...]}"
                                    " or a sub-table named after a choice of name")  # fmt: skip
                if key not in names:
                    raise self.fail(where, f"a table for {key!r}, which {section}.name does not offer"
                                    f" (offered: {', '.join(map(str, names))})")  # fmt: skip
                for sub, v in value.items():
                    self.check_key(f"{section}.{key}.{sub}", sub, v, [key], registry, keys_of, defaults)
                continue
            missing = [n for n in names if key not in keys_of(n)]
            if missing:
                valid = sorted(set.intersection(*(set(keys_of(n)) for n in names)))
                hint = (
                    f"; put it in [{section}.<name>] for the choices that take it" if len(names) > 1 else ""
                )
                raise self.fail(where, f"unknown key for {', '.join(map(str, missing))}; valid: "
                                f"{', '.join(valid)}{hint}")  # fmt: skip
            self.check_key(where, key, value, names, registry, keys_of, defaults)

    def check_key(self, where: str, key: str, value: Any, names: list[Any],
                  registry: Registry[Any] | None, keys_of: Any,
                  defaults: dict[str, Any] | None) -> None:  # fmt: skip
        if registry is not None and key not in keys_of(names[0]):
            raise self.fail(where, f"unknown key; valid: {', '.join(sorted(keys_of(names[0])))}")
        default = (defaults or {}).get(key, MODEL_DEFAULTS.get(key))
        if default is None and registry is not None and key in registry.params(names[0]):
            default = registry.params(names[0])[key].default
        if is_search(value):
            self.check_search(where, value, default)
            given = value.get("choices") or [value[k] for k in ("low", "high", "step") if k in value]
        elif isinstance(value, dict):
            raise self.fail(where, "a table must be {low, high[, log, step]} or {choices = [...]}")
        else:
            self.check_value(where, value, default)
            given = [value]
        if key in _COUNTS and not all(isinstance(v, int) for v in given):
            raise self.fail(where, f"{key} counts things and must be an integer, not {value!r}")
        for v in given if key == "init" else ():
            if v not in INITS:
                raise self.fail(where, f"unknown init {v!r}; valid: {', '.join(INITS)}")

    def check_value(self, where: str, value: Any, default: Any) -> None:
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int | float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            expected = type(default).__name__
            raise self.fail(where, f"{value!r} has the wrong type; expected a {expected} like {default!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(where, "must be a finite number")

    def check_search(self, where: str, table: dict[str, Any], default: Any) -> None:
        if "choices" in table:
            if set(table) != {"choices"}:
                raise self.fail(where, "{choices = [...]} takes no other keys")
            choices = table["choices"]
            if not isinstance(choices, list) or not choices:
                raise self.fail(where, "choices must be a non-empty list")
            for c in choices:
                if not isinstance(c, str | int | float | bool):
                    raise self.fail(where, f"choice {c!r}: choices must be strings, numbers or booleans")
                if default is not None:
                    self.check_value(where, c, default)
            return
        if "low" not in table or "high" not in table:
            raise self.fail(where, "a range needs low and high, e.g. {low = 1e-4, high = 0.1, log = true}")
        low, high = table["low"], table["high"]
        for k in ("low", "high", "step"):
            v = table.get(k, 1)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise self.fail(f"{where}.{k}", f"must be a number, not {v!r}")
        if isinstance(default, bool | str):
            raise self.fail(where, f"a {type(default).__name__} cannot be a range; use {{choices = [...]}}")
        if low > high:
            raise self.fail(where, f"low ({low}) is greater than high ({high})")
        if not isinstance(table.get("log", False), bool):
            raise self.fail(f"{where}.log", "must be true or false")
        if table.get("log") and low <= 0:
            raise self.fail(where, f"a log range needs low > 0 (got {low})")
        if table.get("log") and "step" in table:
            raise self.fail(where, "a range cannot have both log and step")
        if "step" in table and table["step"] <= 0:
            raise self.fail(f"{where}.step", "must be positive")

    def check_fit(self, raw: dict[str, Any]) -> None:
        data = raw["data"]
        dtask = DATASETS.meta[data["name"]]["task"]
        direction = raw.get("study", {}).get("direction")
        expected = "maximize" if dtask == "classification" else "minimize"
        if direction and direction != expected:
            metric = "validation accuracy" if dtask == "classification" else "validation MSE"
            raise self.fail("study.direction", f"the metric is {metric}; direction must be {expected!r}")
        name = raw["model"]["name"]
        native = DATASETS.meta[data["name"]].get("image_size")
        resize = data.get("resize")
        sizes = (
            [r or native for r in resize["choices"]]
            if is_search(resize) and "choices" in resize
            else [resize or native]
        )
        for m in name["choices"] if is_search(name) else [name]:
            if model_task(m) != dtask:
                raise self.fail(
                    "model.name",
                    f"{m} is a {model_task(m)} model but {data['name']} is a {dtask} dataset",
                )
            need = input_size(m)
            size = next((z for z in sizes if isinstance(z, int) and z != need), None)
            if need and size is not None:
                raise self.fail(
                    "data.resize",
                    f"model {m} needs {need}×{need} input but the data is {size}×{size}; "
                    f"set [data] resize = {need}",
                )

    def check_grid(self, raw: dict[str, Any]) -> None:
        for section, table in raw.items():
            for key, value in table.items() if section != "study" else ():
                subs = value.items() if is_conditional(value) else [(None, value)]
                for sub, v in subs:
                    if is_search(v) and "choices" not in v:
                        where = ".".join(p for p in (section, key, sub) if p)
                        raise self.fail(where, "the grid sampler needs {choices = [...]}, not a range")


def _valid(registry: Registry[Any]) -> str:
    return ", ".join(registry.names())


def _is_type(value: Any, want: Any) -> bool:
    if want is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, want)


def _type_name(want: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", dict: "a table"}[want]
