"""Fork a stored study: a new study, made from an edited study file, that starts with the old
study's finished trials which lie inside the new search space.

Optuna cannot change a study's categorical choices or delete a trial from it; a fork can do both.
The old study is only read (``load_stored_study`` opens it read-only) and stays as it was.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState

from hpsearch import objectives, record
from hpsearch.errors import HpsearchError
from hpsearch.record import TrialRecord, study_task
from hpsearch.schema import StudyConfig, same_value
from hpsearch.spec import StudySpec
from hpsearch.storage import load_stored_study, resolve_url, shown_url, stored_study_names
from hpsearch.study import create_study
from hpsearch.task import Task

# A copied trial's system attribute: the study and trial number it was copied from.
FORKED_FROM = "hpsearch:forked_from"
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class ForkError(HpsearchError):
    """A fork cannot be made as asked; the message says why and what to do."""


@dataclass
class Fork:
    """What ``fork_study`` copied, and which trials it left out and why."""

    source: str
    target: str
    copied: dict[str, int] = field(default_factory=dict)  # state → how many
    left_out: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # why → trials

    def lines(self) -> list[str]:
        """A line of counts, then one per reason a trial was left out, most frequent first."""
        n = sum(self.copied.values())
        states = ", ".join(f"{self.copied[s]} {s}" for s in ("complete", "pruned") if s in self.copied)
        total = n + sum(len(v) for v in self.left_out.values())
        head = f"forked {self.source} into {self.target}: copied {n} of {total} trials"
        out = [head + (f" ({states})" if n else "")]
        if self.left_out:
            out.append(f"left out {total - n}:")
        for why, numbers in sorted(self.left_out.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(map(str, numbers))
            out.append(f"  {why}: trial{'s' * (len(numbers) != 1)} {shown}")
        return out


def fork_study(
    source_name: str, spec: StudySpec, storage_url: str | None = None, drop: Collection[int] = ()
) -> Fork:
    """Create the study of ``spec`` in ``storage_url`` with the finished (complete and pruned)
    trials of the stored study ``source_name`` that lie inside ``spec``'s space, less ``drop``
    (trial numbers of the source).

    A trial lies inside when each of its parameters is searched in the new space with its value in
    the new range or choices, or is fixed there at that value, every parameter the new space
    searches has a value (from its params, else from the configuration it recorded), and the new
    file gives the whole configuration it ran with, defaults included: a fork that changes what the
    old trials meant (their epochs, a fixed learning rate, the data) leaves them out. Each copy keeps
    its state, value, per-epoch reports, record (user attributes) and times, with the new space's
    distributions. Refused with ``HpsearchError``: an unknown source, a target that exists, a
    ``drop`` the source lacks, a study seed other than the source's (it chose the validation split
    the values were measured on) or another objective (it chose which epoch's value a trial has),
    and a fork that would copy no trial (it says why each was left out).
    """
    source = load_stored_study(source_name, storage_url)
    if spec.name in stored_study_names(storage_url):
        raise ForkError(
            f"study {spec.name!r} exists already in {shown_url(resolve_url(storage_url))}; the new "
            f"study is named after its file: copy {spec.path} to a new name, or delete the old study "
            f"with `optuna delete-study --study-name {spec.name} --storage URL`"
        )
    trials = source.get_trials(deepcopy=False)
    unknown = sorted(set(drop) - {t.number for t in trials})
    if unknown:
        last = f"0..{len(trials) - 1}" if trials else "none"
        raise ForkError(
            f"--drop {unknown[0]}: study {source.study_name!r} has no trial {unknown[0]} (its trials: {last})"
        )
    seed = source.user_attrs.get(record.SPEC, {}).get("study", {}).get("seed", 0)
    if seed != spec.seed:
        raise ForkError(
            f"{spec.path}: study.seed = {spec.seed}, but {source.study_name!r} was run with seed {seed}, "
            f"which chose the validation split its values were measured on; set seed = {seed}"
        )
    ran_for = source.user_attrs.get(record.SPEC, {}).get("study", {}).get("objective", StudyConfig.objective)
    if ran_for != spec.study.objective:
        raise ForkError(
            f'{spec.path}: study.objective = "{spec.study.objective}", but {source.study_name!r} was run '
            f"with objective = \"{ran_for}\": its trials' values are their {ran_for} epoch's; "
            f'set objective = "{ran_for}"'
        )
    ran_with = objectives.of_stored(source).names
    if ran_with != spec.objectives.names:
        raise ForkError(
            f"{spec.path}: study.objectives = {spec.objectives.names}, but {source.study_name!r} was run "
            f"with objectives = {ran_with}: its trials' values are those; set objectives = {ran_with}"
        )
    result = Fork(source.study_name, spec.name)
    task = study_task(source)
    copies: list[FrozenTrial] = []
    for trial in trials:
        if trial.number in drop:
            result.left_out["dropped with --drop"].append(trial.number)
            continue
        if trial.state not in _FINISHED:
            result.left_out[f"not finished ({trial.state.name.lower()})"].append(trial.number)
            continue
        copy, why = _copy(trial, spec, task, source.study_name)
        if copy is None:
            result.left_out[why].append(trial.number)
        else:
            copies.append(copy)
            state = trial.state.name.lower()
            result.copied[state] = result.copied.get(state, 0) + 1
    if not copies:
        why = "; ".join(line.strip() for line in result.lines()[2:]) or f"{source.study_name} has no trial"
        raise ForkError(f"no trial of {source.study_name} fits {spec.path}, so no study was made: {why}")
    create_study(spec, storage_url, copies)
    return result


def _copy(trial: FrozenTrial, spec: StudySpec, task: Task, source: str) -> tuple[FrozenTrial | None, str]:
    """``trial`` as a trial of ``spec``'s space, or None and why it does not lie inside it."""
    ran = TrialRecord.of(trial, task).config
    if not ran:
        return None, "no recorded configuration to compare with the new file"
    placed = spec.fit(trial.params, "copy", ran)
    if placed.misfits:
        return None, placed.misfits[0].reason
    named = {p.name for s in spec.space.values() for p in s.every_param()}
    change = next(_changes(ran, spec.sample(FixedTrial(placed.params)).as_dict(), named), None)
    if change is not None:
        name, before, after = change
        return None, f"{name}: ran with {before}, the new file gives {after}"
    copy = optuna.trial.create_trial(
        state=trial.state,
        values=trial.values,
        params=placed.params,
        distributions=placed.distributions,
        user_attrs=trial.user_attrs,
        system_attrs={FORKED_FROM: {"study": source, "number": trial.number}},
        intermediate_values=trial.intermediate_values,
    )
    copy.datetime_start, copy.datetime_complete = trial.datetime_start, trial.datetime_complete
    return copy, ""


def _changes(ran: dict[str, Any], now: dict[str, Any], named: set[str]) -> Iterator[tuple[str, str, str]]:
    """Where the configuration a trial ran with and the one the new file gives it differ, as
    ``section.key``, the value it ran with and the new one (``unset`` for None or no value).

    A key only the new configuration has is a difference only where the new file names it
    (``named``: its parameters' names): otherwise it is an argument a newer builder added, which the
    trial ran with at its default.
    """
    for section in [*ran, *(k for k in now if k not in ran)]:
        a, b = ran.get(section), now.get(section)
        if not isinstance(a, dict) or not isinstance(b, dict):
            if not same_value(a, b):
                yield section, _show(a), _show(b)
            continue
        choice = b.get("name")
        for key in [*a, *(k for k in b if k not in a)]:
            x, y = a.get(key, _UNSET), b.get(key, _UNSET)
            if x is _UNSET and not {f"{section}.{key}", f"{section}.{choice}.{key}"} & named:
                continue
            if not same_value(x, y) and not (_UNSET in (x, y) and None in (x, y)):
                yield f"{section}.{key}", _show(x), _show(y)


_UNSET = object()


def _show(value: Any) -> str:
    return "unset" if value is _UNSET or value is None else repr(value)
