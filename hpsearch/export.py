"""Tables of stored studies: best configurations, the best per parameter value, every trial."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from hpsearch.optim import OPTIMIZERS
from hpsearch.schema import SECTIONS
from hpsearch.storage import open_existing_storage, resolve_url

FORMATS = ("csv", "md", "json")
_COMPLETE, _PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
_MISSING = object()


class ExportError(ValueError):
    """A study, storage or parameter asked for does not exist; the message lists what does."""


def load_studies(storage_url: str | None, names: Sequence[str] | None = None) -> list[optuna.Study]:
    """The studies ``names`` (all of them when None) of a storage, which must already exist.

    A study file path stands for its name (the file's stem).
    """
    names = list(dict.fromkeys(Path(n).stem if n.endswith(".toml") else n for n in names)) if names else None
    url = resolve_url(storage_url)
    storage = open_existing_storage(url)
    known = [s.study_name for s in storage.get_all_studies()]
    if not known:
        raise ExportError(f"no studies in {url}")
    for name in names or ():
        if name not in known:
            raise ExportError(f"no study named {name!r} in {url}; studies there: {', '.join(sorted(known))}")
    return [optuna.load_study(study_name=n, storage=storage) for n in (names or known)]


def _keys(study: optuna.Study) -> tuple[str, str]:
    """Column names of the validation and test metric."""
    kind = "mse" if study.user_attrs.get("metric") == "mse" else "acc"
    return f"val_{kind}", f"test_{kind}"


def _config(trial: optuna.trial.FrozenTrial) -> dict[str, dict[str, Any]]:
    """The stored config; sampled params fill in where it is missing (a trial that failed early)."""
    cfg: dict[str, dict[str, Any]] = {}
    for pname, value in sorted(trial.params.items(), key=lambda kv: kv[0].count(".")):
        section, *rest = pname.split(".")
        table = cfg.setdefault(section, {})
        if len(rest) == 1:
            table[rest[0]] = value
        elif len(rest) == 2 and table.get("name") == rest[0]:
            table[rest[1]] = value
    for section, table in trial.user_attrs.get("config", {}).items():
        cfg.setdefault(section, {}).update(table)
    return cfg


def _optimizer_value(opt: dict[str, Any], key: str) -> Any:
    """``opt[key]``, else torch's default for that optimizer: the value the trial really used."""
    if key in opt:
        return opt[key]
    name = opt.get("name")
    if isinstance(name, str) and name in OPTIMIZERS and key in OPTIMIZERS.params(name):
        default = OPTIMIZERS.params(name)[key].default
        if isinstance(default, int | float) and not isinstance(default, bool):
            return default
    return None


def _columns(keys: tuple[str, str]) -> list[str]:
    """Seed 004's table columns, in its order, then what a search adds."""
    return ["optimizer", "lr", "momentum", "weight_decay", "batch_size", "scheduler", "epochs_run", *keys,
            "train_loss", "run_time_s", "examples_per_s", "trial"]  # fmt: skip


def _row(trial: optuna.trial.FrozenTrial, keys: tuple[str, str]) -> dict[str, Any]:
    cfg, attrs = _config(trial), trial.user_attrs
    opt = cfg.get("optimizer", {})
    values = [
        opt.get("name"), _optimizer_value(opt, "lr"), _optimizer_value(opt, "momentum"),
        _optimizer_value(opt, "weight_decay"), cfg.get("data", {}).get("batch_size"),
        cfg.get("scheduler", {}).get("name"), attrs.get("epochs_run"), trial.value, attrs.get(keys[1]),
        attrs.get("final_train_loss"), attrs.get("run_time_s"), attrs.get("examples_per_s"), trial.number,
    ]  # fmt: skip
    return dict(zip(_columns(keys), values, strict=True))


_NUMERIC = ("lr", "momentum", "weight_decay", "batch_size", "epochs_run", "val_acc", "val_mse", "test_acc",
            "test_mse", "train_loss", "run_time_s", "examples_per_s", "trial", "value", "pruned_at_epoch",
            "n_trials", "n_complete", "n_pruned")  # fmt: skip


def _frame(rows: list[dict[str, Any]], first: list[str]) -> pd.DataFrame:
    """Rows as a table whose numeric columns are numeric even when every value is missing.

    Integer columns with gaps become nullable integers, so a CSV shows a batch size as 64, not 64.0.
    """
    df = pd.DataFrame(rows, columns=list(dict.fromkeys(first + [k for r in rows for k in r])))
    for col in df.columns:
        if col in _NUMERIC:
            values = [r[col] for r in rows if r.get(col) is not None]
            ints = values and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            df[col] = pd.to_numeric(df[col]).astype("Int64" if ints else "float64")
    return df


def _ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first; ties go to the earlier trial."""
    if len(study.directions) > 1:
        raise ExportError(f"study {study.study_name!r} is multi-objective; hpsearch studies have one value")
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == _COMPLETE and t.value is not None]
    if not done:
        states = ", ".join(f"{n} {s}" for s, n in Counter(t.state.name.lower() for t in trials).items())
        raise ExportError(f"study {study.study_name!r} has no completed trial yet ({states or 'no trials'})")
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(done, key=lambda t: (sign * float(t.value or 0.0), t.number))


def best_table(study: optuna.Study, top: int | None = None) -> pd.DataFrame:
    """Completed trials best first: seed 004's columns, then every sampled parameter."""
    keys = _keys(study)
    df = _frame([{**_row(t, keys), **t.params} for t in _ranked(study)], _columns(keys))
    return df.head(top) if top else df


def _lookup(trial: optuna.trial.FrozenTrial, param: str) -> Any:
    if param in trial.params:
        return trial.params[param]
    section, _, key = param.partition(".")
    return _config(trial).get(section, {}).get(key, _MISSING)


def best_per(study: optuna.Study, param: str) -> pd.DataFrame:
    """The best completed trial for each value of ``param`` (a parameter or ``section.key``), best first."""
    ranked, keys = _ranked(study), _keys(study)
    valid = {p for t in ranked for p in t.params}
    valid |= {f"{s}.{k}" for t in ranked for s, table in _config(t).items() for k in table}
    if param not in valid:
        raise ExportError(f"unknown parameter {param!r} for --best-per; valid: {', '.join(sorted(valid))}")
    rows: dict[str, dict[str, Any]] = {}
    for t in ranked:
        value = _lookup(t, param)
        group = json.dumps(value, sort_keys=True, default=str)
        if value is not _MISSING and group not in rows:
            rows[group] = {param: value, **_row(t, keys), **t.params}
    return _frame(list(rows.values()), [param, *_columns(keys)])


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial by number, pruned and failed ones too, with why it stopped."""
    keys, rows = _keys(study), []
    for t in study.get_trials(deepcopy=False):
        attrs, steps = t.user_attrs, t.intermediate_values
        # A diverged trial reports nothing: it stopped inside the epoch it was running.
        pruned_at = (max(steps) if steps else attrs.get("epochs_run")) if t.state == _PRUNED else None
        reason = attrs.get("stop_reason") or attrs.get("fail_reason")
        head = {"trial": t.number, "state": t.state.name.lower(), "value": t.value}
        rows.append({**head, "pruned_at_epoch": pruned_at, "reason": reason, **_row(t, keys), **t.params})
    return _frame(rows, ["trial", "state", "value", "pruned_at_epoch", "reason", *_columns(keys)])


def _name(value: Any) -> Any:
    return "|".join(map(str, value.get("choices", []))) if isinstance(value, dict) else value


def studies_table(studies: Sequence[optuna.Study]) -> pd.DataFrame:
    """One row per study: its size and its best trial's columns (empty when none completed)."""
    rows = []
    for study in studies:
        trials, spec = study.get_trials(deepcopy=False), study.user_attrs.get("spec", {})
        try:
            best = _ranked(study)[0]
            cfg, row = _config(best), _row(best, _keys(study))
        except ExportError:
            cfg, row = {}, {}
        rows.append({
            "study": study.study_name,
            "model": cfg.get("model", {}).get("name", _name(spec.get("model", {}).get("name"))),
            "dataset": cfg.get("data", {}).get("name", _name(spec.get("data", {}).get("name"))),
            "n_trials": len(trials),
            "n_complete": sum(t.state == _COMPLETE for t in trials),
            "n_pruned": sum(t.state == _PRUNED for t in trials),
            **row,
        })  # fmt: skip
    return _frame(rows, ["study", "model", "dataset", "n_trials", "n_complete", "n_pruned"])


def _plain(value: Any) -> Any:
    if value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _cell(value: Any) -> str:
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(df: pd.DataFrame, fmt: str) -> str:
    """``df`` as CSV, a Markdown table or JSON records; missing values are empty / null."""
    if fmt == "csv":
        return df.to_csv(index=False, lineterminator="\n")
    if fmt == "json":
        records = [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]
        return json.dumps(records, indent=2, ensure_ascii=False) + "\n"
    if fmt == "md":
        align = ["---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns]
        lines = ["| " + " | ".join(_cell(c) for c in df.columns) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
        return "\n".join(lines) + "\n"
    raise ExportError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def write_table(df: pd.DataFrame, target: str | Path, fmt: str) -> None:
    """Write ``df`` to ``target`` (``-``: stdout), atomically: an interrupted write leaves no half file."""
    text = render(df, fmt)
    if str(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a folder")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr round-trips floats exactly and is valid TOML (1e-05, inf, nan)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise ExportError(f"cannot write {value!r} as a TOML value")


def best_toml(study: optuna.Study) -> str:
    """The best trial's configuration as study-file sections, every value fixed."""
    best = _ranked(study)[0]
    config = best.user_attrs.get("config")
    if not isinstance(config, dict):
        raise ExportError(f"trial {best.number} of study {study.study_name!r} has no stored config")
    test = best.user_attrs.get(_keys(study)[1])
    spec = study.user_attrs.get("spec", {})
    trial_seed = best.user_attrs.get("seed")
    lines = [
        f"# best trial {best.number} of study {study.study_name}: validation "
        f"{study.user_attrs.get('metric', 'value')} {best.value!r}"
        + (f", test {test!r}" if test is not None else ""),
        "# every value fixed, the same data split and the trial's own seed: run it to retrain",
        "",
        "[study]",
        f"description = {_toml(f'best trial {best.number} of {study.study_name}')}",
        "n_trials = 1",
        f"seed = {_toml(spec.get('study', {}).get('seed', 0))}",
        'pruner = "none"',
    ]
    for section in SECTIONS[1:]:  # [study] is written above
        if section in config:
            values = dict(config[section])
            if section == "train" and trial_seed is not None:
                values["seed"] = trial_seed
            items = sorted(
                ((k, v) for k, v in values.items() if v is not None), key=lambda kv: kv[0] != "name"
            )
            lines += ["", f"[{section}]", *(f"{k} = {_toml(v)}" for k, v in items)]
    return "\n".join(lines) + "\n"
