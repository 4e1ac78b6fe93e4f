"""Tables of stored studies: best configurations, the best per parameter value, every trial."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import tomlkit

from hpsearch.errors import HpsearchError
from hpsearch.objectives import COSTS, Objectives, first_value, front, of_stored, ranked
from hpsearch.record import BEST_EPOCH, SPEC, SPEC_SOURCE, TrialRecord, study_task
from hpsearch.schema import SECTIONS, StudyConfig, space_names, walk
from hpsearch.spec import resolve
from hpsearch.storage import atomic_write, load_stored_study, stored_study_names
from hpsearch.task import TASKS, Task

FORMATS = ("csv", "md", "json")
_COMPLETE, _PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
_MISSING = object()


class ExportError(HpsearchError):
    """A study, storage or parameter asked for does not exist; the message lists what does."""


def load_studies(storage_url: str | None, names: Sequence[str] | None = None) -> list[optuna.Study]:
    """The studies ``names`` (all of them when None) of a storage, opened read-only.

    A study file path stands for its name (the file's stem).
    """
    if names:
        return [load_stored_study(n, storage_url) for n in dict.fromkeys(names)]
    found = stored_study_names(storage_url)
    if not found:
        raise ExportError("no studies in this storage yet; run one with `hpsearch run --study NAME`")
    return [load_stored_study(n, storage_url) for n in found]


def _keys(study: optuna.Study) -> list[str]:
    """Column names of the validation and test metric, then of the study's costs."""
    return _objective_columns(of_stored(study))


def _objective_columns(goals: Objectives) -> list[str]:
    return [*_metric_columns(goals.task), *(c.column for c in goals.costs)]


def _metric_columns(task: Task) -> list[str]:
    """The trial's value (``val_acc``: what the study ranks by, per ``[study] objective``), its last
    and its best epoch's validation metric, that epoch, and the test metric."""
    val = task.val_key
    return [val, f"{val}_last", f"{val}_best", BEST_EPOCH, task.test_key]


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


def param_columns(study: optuna.Study) -> list[str]:
    """The searched parameters, in the study file's order (from its stored spec), then any others."""
    stored = study.user_attrs.get(SPEC)
    names: list[str] = []
    if isinstance(stored, dict):
        try:
            names = space_names(walk(resolve(stored)))
        except Exception:  # a spec from an older hpsearch: fall back to the trials' own params
            names = []
    seen = {p for t in study.get_trials(deepcopy=False) for p in t.params}
    return [n for n in names if n in seen] + sorted(seen - set(names))


def _columns(keys: list[str]) -> list[str]:
    """Seed 004's table columns, in its order, then what a search adds."""
    return [
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "batch_size",
        "scheduler",
        "epochs_run",
        *keys,
        "train_loss",
        "run_time_s",
        "examples_per_s",
        "trial",
    ]


def _row(trial: optuna.trial.FrozenTrial, goals: Objectives) -> dict[str, Any]:
    task = goals.task
    cfg, rec = _config(trial), TrialRecord.of(trial, task)
    best_epoch, best = rec.best(task) or (None, None)
    opt = cfg.get("optimizer", {})
    values = [
        opt.get("name"),
        opt.get("lr"),
        opt.get("momentum"),
        opt.get("weight_decay"),
        cfg.get("data", {}).get("batch_size"),
        cfg.get("scheduler", {}).get("name"),
        rec.epochs_run,
        first_value(trial),
        rec.val[-1] if rec.val else None,
        best,
        best_epoch,
        rec.test,
        *(cost.of(rec) for cost in goals.costs),
        rec.train_loss[-1] if rec.train_loss else None,
        rec.run_time_s or None,
        rec.examples_per_s,
        trial.number,
    ]
    return dict(zip(_columns(_objective_columns(goals)), values, strict=True))


_NUMERIC = (
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "epochs_run",
    *(key for task in TASKS.values() for key in _metric_columns(task)),
    *(cost.column for cost in COSTS.values()),
    "train_loss",
    "run_time_s",
    "examples_per_s",
    "trial",
    "value",
    "pruned_at_epoch",
    "n_trials",
    "n_complete",
    "n_pruned",
)


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
    """Completed trials, best first (``objectives.ranked``: a multi-objective study's front first)."""
    done = ranked(study)
    if not done:
        trials = study.get_trials(deepcopy=False)
        states = ", ".join(f"{n} {s}" for s, n in Counter(t.state.name.lower() for t in trials).items())
        raise ExportError(f"study {study.study_name!r} has no completed trial yet ({states or 'no trials'})")
    return done


def _params(trial: optuna.trial.FrozenTrial, columns: list[str]) -> dict[str, Any]:
    return {c: trial.params.get(c) for c in columns}


def best_table(study: optuna.Study, top: int | None = None) -> pd.DataFrame:
    """Completed trials best first: seed 004's columns, then every sampled parameter. For a
    multi-objective study, its Pareto front (``objectives.front``), a column per objective."""
    goals, cols, done = of_stored(study), param_columns(study), _ranked(study)
    trials = front(study) if goals.multi else done
    df = _frame([{**_row(t, goals), **_params(t, cols)} for t in trials], _columns(_keys(study)))
    return df.head(top) if top else df


def _lookup(trial: optuna.trial.FrozenTrial, param: str) -> Any:
    if param in trial.params:
        return trial.params[param]
    section, _, key = param.partition(".")
    return _config(trial).get(section, {}).get(key, _MISSING)


def best_per(study: optuna.Study, param: str) -> pd.DataFrame:
    """The best completed trial for each value of ``param`` (a parameter or ``section.key``), best first."""
    ranked, goals, cols = _ranked(study), of_stored(study), param_columns(study)
    valid = {p for t in ranked for p in t.params}
    valid |= {f"{s}.{k}" for t in ranked for s, table in _config(t).items() for k in table}
    if param not in valid:
        raise ExportError(f"unknown parameter {param!r} for --best-per; valid: {', '.join(sorted(valid))}")
    rows: dict[str, dict[str, Any]] = {}
    for t in ranked:
        value = _lookup(t, param)
        group = json.dumps(value, sort_keys=True, default=str)
        if value is not _MISSING and group not in rows:
            rows[group] = {param: value, **_row(t, goals), **_params(t, cols)}
    return _frame(list(rows.values()), [param, *_columns(_keys(study))])


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial by number, pruned and failed ones too, with why it stopped."""
    goals, cols, rows = of_stored(study), param_columns(study), []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.of(t, goals.task)
        # The epoch it stopped in: after that epoch's validation (pruned), or inside it (diverged).
        pruned_at = rec.stop_epoch if t.state == _PRUNED else None
        head = {"trial": t.number, "state": t.state.name.lower(), "value": first_value(t)}
        rows.append(
            {**head, "pruned_at_epoch": pruned_at, "reason": rec.reason, **_row(t, goals), **_params(t, cols)}
        )
    return _frame(rows, ["trial", "state", "value", "pruned_at_epoch", "reason", *_columns(_keys(study))])


def _name(value: Any) -> Any:
    return "|".join(map(str, value.get("choices", []))) if isinstance(value, dict) else value


def studies_table(studies: Sequence[optuna.Study]) -> pd.DataFrame:
    """One row per study: its size and its best trial's columns (empty when none completed)."""
    rows = []
    for study in studies:
        trials, spec = study.get_trials(deepcopy=False), study.user_attrs.get(SPEC, {})
        try:
            best = _ranked(study)[0]
            cfg, row = _config(best), _row(best, of_stored(study))
        except ExportError:
            cfg, row = {}, {}
        rows.append(
            {
                "study": study.study_name,
                "model": cfg.get("model", {}).get("name", _name(spec.get("model", {}).get("name"))),
                "dataset": cfg.get("data", {}).get("name", _name(spec.get("data", {}).get("name"))),
                "n_trials": len(trials),
                "n_complete": sum(t.state == _COMPLETE for t in trials),
                "n_pruned": sum(t.state == _PRUNED for t in trials),
                **row,
            }
        )
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
    atomic_write(Path(target), text)


def best_toml(study: optuna.Study) -> str:
    """The best trial's configuration as a study file, every value fixed and its seed pinned."""
    best = _ranked(study)[0]
    rec, task = TrialRecord.of(best, study_task(study)), study_task(study)
    if not rec.config:
        raise ExportError(f"trial {best.number} of study {study.study_name!r} has no stored config")
    spec = study.user_attrs.get(SPEC, {})
    doc = tomlkit.document()
    test = f", test {task.metric} {rec.test!r}" if rec.test is not None else ""
    doc.add(
        tomlkit.comment(
            f"best trial {best.number} of study {study.study_name}: validation "
            f"{task.metric} {first_value(best)!r}{test}"
        )
    )
    doc.add(
        tomlkit.comment("every value fixed, the same data split and the trial's own seed: run it to retrain")
    )
    head = tomlkit.table()
    head["description"] = f"best trial {best.number} of {study.study_name}"
    head["n_trials"] = 1
    head["seed"] = spec.get("study", {}).get("seed", 0)
    head["objective"] = spec.get("study", {}).get("objective", StudyConfig.objective)
    head["pruner"] = "none"
    doc["study"] = head
    for section in SECTIONS[1:]:  # [study] is written above
        values = dict(rec.config.get(section, {}))
        if section == "train" and rec.seed is not None:
            values["seed"] = rec.seed
        table = tomlkit.table()
        for key, value in sorted(values.items(), key=lambda kv: kv[0] != "name"):
            if value is not None:
                table[key] = value
        doc[section] = table
    return tomlkit.dumps(doc)


def source_differs(study: optuna.Study, path: Path) -> bool:
    """True when ``study`` was made from a study file other than the one at ``path`` today."""
    stored = study.user_attrs.get(SPEC_SOURCE)
    try:
        return stored is not None and path.read_text(encoding="utf-8") != stored
    except (OSError, UnicodeDecodeError):
        return True
