"""Search efficiency: how good a model each sampler and pruner finds, and how many epochs it spends.

Every arm searches the same space, that of ``studies/lenet-fashion.toml`` (LeNet on FashionMNIST; SGD
or Adam, the learning rate, SGD's momentum, weight decay, batch size 128/256/512, no schedule or a
cosine one), read from that file at run time with its ``[study]`` table replaced (its enqueued first
trial is left out, so that every trial is the sampler's) and on a seeded subset of the real images:
N training and M validation images (``train_limit`` = N + M) and T test images. Each arm runs the
same budget, ``--trials`` trials of at most ``--epochs`` epochs, under each study seed
(``[study] seed``: the sampler's seed, the trials' seeds and the data subset):

* samplers ``random`` and ``tpe``, hpsearch's registry names with hpsearch's own arguments;
* pruners ``none``, ``median``, ``successive_halving`` and ``hyperband``, hpsearch's registry names
  with their default arguments, as a study file that names one gets them;
* ``top_k``, a baseline that is no hpsearch pruner: train every configuration for one epoch, keep
  the K with the best validation accuracy after it, and finish those. Its first phase runs the
  ``--trials`` trials with a pruner of this script that stops every trial after its first epoch; its
  trials' checkpoints are kept, and each of the K best is continued from its checkpoint, as hpsearch
  continues an interrupted trial (``hpsearch.checkpoint.continue_trial``), best first, with no pruner.
  A continuation trains epochs 2..E and its record holds all E, so its epochs trained are its
  ``epochs_run`` less its ``resumed_epoch``.

Every study is a real hpsearch study: a study file written here, ``open_study`` on an SQLite file in
a temporary folder (``--db`` keeps it) and ``run_study`` in this process, so each figure comes from
the trials' own records (``TrialRecord``). Per arm it prints, as mean ± standard deviation over the
seeds:

* best val / its test: the validation accuracy (its last epoch) of the arm's best complete trial,
  Optuna's best trial, and that trial's test accuracy;
* epochs trained: the sum over the arm's trials of the epochs each trained (``epochs_run``; a
  trial that diverged trained part of one more epoch, which is not counted), and that as a
  percentage of the unpruned arm's (same sampler, same seed);
* epochs to target: the epochs trained, trial after trial in the order they ran, until the best
  validation accuracy of the complete trials so far came within 0.3 points of the unpruned arm's
  best (same sampler, same seed); the mean over the seeds that got there, with how many did when
  not all did, or "never"; and that as a percentage of the unpruned arm's epochs trained.

Then the compute saved by hpsearch's default sampler and pruner (the defaults of ``[study]``): its
epochs to target as a fraction of the unpruned arm's epochs, and against the one-epoch top-K
baseline at equal accuracy (the lower of the two arms' best, at most the target). It draws the best
validation accuracy so far against the epochs trained, one line per arm (mean over the seeds), as a
PNG (``--plot``).

The full run is 24 trials of up to 8 epochs per arm on 3,000 + 1,000 images (2,000 test), K = 6,
seeds 0-2: about 19 minutes on 2 CPU cores shared with other jobs, with ``--threads 1``. LeNet's
operations are small, and with two threads each of them waits for both: on busy cores that made the
same trials ten times slower. The figures themselves do not depend on the threads.

    .venv/bin/python benchmarks/search.py --quick                # seconds: a tiny subset, one seed
    .venv/bin/python benchmarks/search.py --threads 1 --json search.json --plot search.png
    .venv/bin/python benchmarks/search.py --trials 32 --epochs 10 --seeds 5 --plot /tmp/search.png
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
import tomlkit
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from hpsearch.checkpoint import Checkpoints, continue_trial
from hpsearch.datasets import load_dataset, validation_size
from hpsearch.record import TrialRecord
from hpsearch.schema import StudyConfig, named
from hpsearch.search import PRUNERS
from hpsearch.spec import StudySpec, find_study_file, load_spec
from hpsearch.study import open_study, run_study
from hpsearch.train import resolve_device

BASE_STUDY = "lenet-fashion"  # the search space every arm searches
SAMPLERS = ("random", "tpe")
TOP_K = "top_k"  # the baseline arm: one epoch each, then the K best finished
PRUNER_ARMS = ("none", "median", "successive_halving", "hyperband", TOP_K)
UNPRUNED = "none"
TARGET_GAP = 0.003  # 0.3 points of accuracy below the unpruned arm's best
GOAL = 1 / 3  # the share of the unpruned arm's epochs the default pruner should reach the target in


@dataclass(frozen=True)
class Sizes:
    """What one run searches: images per split, the budget of every arm, seeds and the baseline's K."""

    train_images: int
    val_images: int
    test_images: int
    trials: int
    epochs: int
    seeds: int
    top_k: int

    @property
    def val_fraction(self) -> float:
        """hpsearch's ``val_fraction`` for exactly M validation images of the N + M."""
        total = self.train_images + self.val_images
        for fraction in (self.val_images / total, (self.val_images + 0.5) / total):
            if validation_size(total, fraction) == self.val_images:
                return fraction
        raise BenchmarkError(
            f"no val_fraction splits {total} images into {self.train_images} + {self.val_images}"
        )

    def check(self) -> str | None:
        """Why these sizes cannot be run, or None."""
        if min(self.train_images, self.val_images, self.test_images) < 1:
            return "train, validation and test images must be at least 1"
        if self.train_images + self.val_images > 60_000 or self.test_images > 10_000:
            return "FashionMNIST has 60,000 training and 10,000 test images"
        if self.trials < 2 or self.seeds < 1:
            return "at least 2 trials and 1 seed"
        if self.epochs < 2:
            return "at least 2 epochs: the baseline finishes its K best after the first"
        if not 1 <= self.top_k <= self.trials:
            return f"--top-k must be between 1 and the number of trials ({self.trials})"
        return None


# Full: about 19 minutes on 2 shared CPU cores (one thread); quick: seconds, for CI. K = trials ÷ 4.
FULL = Sizes(train_images=3_000, val_images=1_000, test_images=2_000, trials=24, epochs=8, seeds=3, top_k=6)
QUICK = Sizes(train_images=200, val_images=100, test_images=100, trials=10, epochs=2, seeds=1, top_k=2)


class BenchmarkError(Exception):
    """A run could not be made or did not end as it must; the message says which."""


# One arm under one seed: a real hpsearch study.


def study_name(sampler: str, pruner: str, seed: int) -> str:
    return f"search-{sampler}-{pruner}-{seed}".replace("_", "-")


def study_text(sizes: Sizes, sampler: str, pruner: str, seed: int) -> str:
    """The study file of one arm: the base study's search space on this run's subset and budget."""
    doc = tomlkit.parse(_base_text())
    study = tomlkit.table()
    arm = "one epoch each, the best K finished" if pruner == TOP_K else f"pruner {pruner}"
    study["description"] = f"search benchmark: the {BASE_STUDY} space, sampler {sampler}, {arm}"
    study["n_trials"] = sizes.trials
    study["seed"] = seed
    study["sampler"] = _setting(sampler, StudyConfig().sampler)
    # The baseline prunes with a pruner of its own.
    study["pruner"] = UNPRUNED if pruner == TOP_K else _setting(pruner, StudyConfig().pruner)
    doc["study"] = study
    data = doc["data"]
    assert isinstance(data, dict)
    data["train_limit"] = sizes.train_images + sizes.val_images
    data["val_fraction"] = sizes.val_fraction
    data["test_limit"] = sizes.test_images
    train = doc.setdefault("train", tomlkit.table())
    assert isinstance(train, dict)
    train["epochs"] = sizes.epochs
    head = f"# benchmarks/search.py: studies/{BASE_STUDY}.toml with this [study], data subset and epochs.\n"
    return head + tomlkit.dumps(doc)


@functools.cache
def _base_text() -> str:
    """The base study file, read once: every arm of a run searches the same space."""
    return find_study_file(BASE_STUDY).read_text(encoding="utf-8")


class _AfterFirstEpoch(optuna.pruners.BasePruner):
    """The baseline's first phase: every trial stops once its first epoch is reported."""

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return trial.last_step is not None and trial.last_step >= 1


class _KeptCheckpoints(Checkpoints):
    """Checkpoints that outlive their trial, so that the baseline's K best can be continued."""

    def delete(self, chain: int) -> None:
        pass


@dataclass
class TrialRow:
    """One trial as the arm's figures use it, from its record."""

    number: int
    state: str
    epochs_run: int
    resumed_epoch: int | None
    val: list[float]
    test: float | None
    reason: str | None  # why it stopped early (pruned, diverged) or failed
    params: dict[str, Any]

    @property
    def trained(self) -> int:
        """Epochs this trial trained itself (a continuation's first epochs were its earlier trial's)."""
        return self.epochs_run - (self.resumed_epoch or 0)

    @property
    def value(self) -> float | None:
        """The validation accuracy the study ranks it by: a complete trial's last epoch."""
        return self.val[-1] if self.state == "COMPLETE" and self.val else None


@dataclass
class SeedRun:
    """One arm under one seed: its trials in the order they ran, and what they add up to."""

    sampler: str
    pruner: str
    seed: int
    study: str  # the study's name in the storage
    wall_s: float
    trials: list[TrialRow]
    epochs: int = 0  # epochs trained, all trials
    best_trial: int | None = None
    best_val: float | None = None
    best_test: float | None = None
    # (epochs trained so far, best complete validation accuracy so far) after each trial
    curve: list[tuple[int, float | None]] = field(default_factory=list)
    target: float | None = None  # the unpruned arm's best less TARGET_GAP (same sampler and seed)
    epochs_to_target: int | None = None
    unpruned_epochs: int | None = None

    def __post_init__(self) -> None:
        self.epochs = sum(t.trained for t in self.trials)
        done = 0
        best: TrialRow | None = None
        for t in self.trials:
            done += t.trained
            if t.value is not None and (best is None or t.value > (best.value or 0.0)):
                best = t
            self.curve.append((done, None if best is None else best.value))
        if best is not None:
            self.best_trial, self.best_val, self.best_test = best.number, best.value, best.test

    def epochs_to(self, level: float) -> int | None:
        """Epochs trained until the best complete validation accuracy so far reached ``level``."""
        return next((e for e, b in self.curve if b is not None and b >= level - 1e-12), None)


def run_arm(
    sizes: Sizes, sampler: str, pruner: str, seed: int, folder: Path, url: str, device: str
) -> SeedRun:
    path = folder / f"{study_name(sampler, pruner, seed)}.toml"
    path.write_text(study_text(sizes, sampler, pruner, seed), encoding="utf-8")
    spec = load_spec(path)
    study = open_study(spec, url)
    checkpoints = Checkpoints(folder / "checkpoints" / spec.name)
    start = time.perf_counter()
    if pruner == TOP_K:
        _top_k(spec, study, sizes, device, _KeptCheckpoints(checkpoints.folder))
    else:
        summary = run_study(spec, study, n_trials=sizes.trials, device=device, checkpoints=checkpoints)
        if summary.ran != sizes.trials:
            raise BenchmarkError(f"{spec.name}: {summary.ran} of {sizes.trials} trials ran")
    wall = time.perf_counter() - start
    rows = [_row(t, spec) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
    failed = [r for r in rows if r.state == "FAIL"]
    if failed:
        raise BenchmarkError(f"{spec.name}: trial {failed[0].number} failed: {failed[0].reason}")
    return SeedRun(sampler, pruner, seed, spec.name, wall, rows)


def _top_k(spec: StudySpec, study: optuna.Study, sizes: Sizes, device: str, checkpoints: Checkpoints) -> None:
    """Every configuration one epoch, then the K best continued from their checkpoints to the end."""
    study.pruner = _AfterFirstEpoch()
    run_study(spec, study, n_trials=sizes.trials, device=device, checkpoints=checkpoints)
    first = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED]
    scored = [(TrialRecord.of(t, spec.task).val, t) for t in first]
    # Best first; a trial that diverged in its first epoch has no accuracy and is never kept.
    ranked = sorted(((val[0], t) for val, t in scored if val), key=lambda vt: (-vt[0], vt[1].number))
    kept = [t for _, t in ranked[: sizes.top_k]]
    for trial in kept:
        continue_trial(study, trial, crashed=False, max_retries=spec.study.retries)
    study.pruner = optuna.pruners.NopPruner()
    run_study(spec, study, n_trials=len(kept), device=device, checkpoints=checkpoints)
    continued = [t for t in study.get_trials(deepcopy=False) if t.number >= sizes.trials]
    resumed = [TrialRecord.of(t, spec.task).resumed_epoch for t in continued]
    if len(continued) != len(kept) or any(r != 1 for r in resumed):
        raise BenchmarkError(
            f"{spec.name}: the {len(kept)} best configurations were not all continued from their first "
            f"epoch (resumed at {resumed})"
        )


def _row(t: FrozenTrial, spec: StudySpec) -> TrialRow:
    rec = TrialRecord.of(t, spec.task)
    return TrialRow(
        number=t.number,
        state=t.state.name,
        epochs_run=rec.epochs_run,
        resumed_epoch=rec.resumed_epoch,
        val=rec.val,
        test=None if rec.test is None else float(rec.test),
        reason=rec.reason,
        params=dict(t.params),
    )


# Across seeds: each arm against the unpruned arm of its sampler.


@dataclass
class ArmSummary:
    """One arm over the seeds: means, standard deviations and how many seeds reached the target."""

    sampler: str
    pruner: str
    seeds: int
    best_val: list[float]
    best_test: list[float]
    epochs: list[int]
    epochs_share: list[float]  # of the unpruned arm's epochs, per seed
    to_target: list[int]  # per seed that reached the target
    to_target_share: list[float]
    wall_s: list[float]

    @property
    def label(self) -> str:
        return f"{self.sampler} × {self.pruner}"

    @property
    def reached(self) -> int:
        return len(self.to_target)

    def rank_key(self) -> tuple[int, float]:
        """Arms that reached the target under more seeds first, then fewer epochs (share) to it."""
        share = statistics.fmean(self.to_target_share) if self.to_target_share else math.inf
        return (self.seeds - self.reached, share)


def summarise(runs: list[SeedRun]) -> list[ArmSummary]:
    """Set each run's target from its unpruned run, and sum up every arm."""
    unpruned = {(r.sampler, r.seed): r for r in runs if r.pruner == UNPRUNED}
    for r in runs:
        base = unpruned[(r.sampler, r.seed)]
        r.unpruned_epochs = base.epochs
        r.target = None if base.best_val is None else base.best_val - TARGET_GAP
        r.epochs_to_target = None if r.target is None else r.epochs_to(r.target)
    out = []
    for sampler in SAMPLERS:
        for pruner in PRUNER_ARMS:
            mine = [r for r in runs if (r.sampler, r.pruner) == (sampler, pruner)]
            if not mine:
                continue
            reached = [r for r in mine if r.epochs_to_target is not None]
            out.append(
                ArmSummary(
                    sampler=sampler,
                    pruner=pruner,
                    seeds=len(mine),
                    best_val=[r.best_val for r in mine if r.best_val is not None],
                    best_test=[r.best_test for r in mine if r.best_test is not None],
                    epochs=[r.epochs for r in mine],
                    epochs_share=[r.epochs / r.unpruned_epochs for r in mine if r.unpruned_epochs],
                    to_target=[r.epochs_to_target for r in reached if r.epochs_to_target is not None],
                    to_target_share=[
                        r.epochs_to_target / r.unpruned_epochs
                        for r in reached
                        if r.epochs_to_target is not None and r.unpruned_epochs
                    ],
                    wall_s=[r.wall_s for r in mine],
                )
            )
    return out


def defaults() -> tuple[str, str]:
    """hpsearch's default sampler and pruner: what a study file that names neither gets."""
    given = StudyConfig()
    return named(given.sampler)["name"], named(given.pruner)["name"]


def _setting(name: str, default: Any) -> Any:
    """``name`` as a study file names it; for hpsearch's default, the default's own table, arguments
    included, so that the default arm is exactly what a study file that leaves it out gets."""
    if named(default)["name"] != name:
        return name
    table = tomlkit.inline_table()
    table.update(named(default))
    return table


@dataclass
class Saved:
    """The compute the default sampler and pruner save, per seed and on average."""

    sampler: str
    pruner: str
    seeds: int
    to_target: list[int]  # epochs to the target, per seed that reached it
    share: list[float]  # of the unpruned arm's epochs, per seed that reached it
    unpruned_epochs: list[int]
    # At equal accuracy with the baseline: per seed, the level (the lower of the two bests, at most
    # the target) and the epochs each arm trained until it reached it.
    levels: list[float]
    default_epochs: list[int]
    baseline_epochs: list[int]

    @property
    def ratio(self) -> float | None:
        """The default's epochs ÷ the baseline's at equal accuracy (means over the seeds)."""
        if not self.default_epochs:
            return None
        return statistics.fmean(self.default_epochs) / statistics.fmean(self.baseline_epochs)


def compute_saved(runs: list[SeedRun]) -> Saved | None:
    sampler, pruner = defaults()
    by = {(r.sampler, r.pruner, r.seed): r for r in runs}
    mine = [r for r in runs if (r.sampler, r.pruner) == (sampler, pruner)]
    if not mine:
        return None
    saved = Saved(sampler, pruner, len(mine), [], [], [], [], [], [])
    for r in mine:
        saved.unpruned_epochs.append(r.unpruned_epochs or 0)
        if r.epochs_to_target is not None and r.unpruned_epochs:
            saved.to_target.append(r.epochs_to_target)
            saved.share.append(r.epochs_to_target / r.unpruned_epochs)
        base = by.get((sampler, TOP_K, r.seed))
        if base is None or r.target is None or r.best_val is None or base.best_val is None:
            continue
        level = min(r.target, r.best_val, base.best_val)
        mine_at, base_at = r.epochs_to(level), base.epochs_to(level)
        if mine_at is not None and base_at is not None:
            saved.levels.append(level)
            saved.default_epochs.append(mine_at)
            saved.baseline_epochs.append(base_at)
    return saved


# What it prints.


def _mean_sd(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _to_target(arm: ArmSummary) -> tuple[str, str]:
    if not arm.to_target:
        return "never", "—"
    seeds = "" if arm.reached == arm.seeds else f" ({arm.reached}/{arm.seeds})"
    epochs = f"{statistics.fmean(arm.to_target):.0f}{seeds}"
    return epochs, f"{statistics.fmean(arm.to_target_share) * 100:.0f}"


def table(arms: list[ArmSummary]) -> str:
    lines = [
        "| sampler | pruner | best val acc % | its test acc % | epochs trained | % of unpruned "
        "| epochs to target | % of unpruned | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        epochs, share = _to_target(a)
        lines.append(
            f"| {a.sampler} | {a.pruner} | {_mean_sd(a.best_val, 100)} | {_mean_sd(a.best_test, 100)} | "
            f"{_mean_sd(a.epochs, digits=0)} | {_mean_sd(a.epochs_share, 100, 0)} | {epochs} | {share} | "
            f"{statistics.fmean(a.wall_s):.0f} |"
        )
    return "\n".join(lines)


def findings(arms: list[ArmSummary], saved: Saved | None, sizes: Sizes) -> list[str]:
    """The lines under the table: what the defaults save, and which arms reached the target soonest."""
    out = []
    if saved is None:
        sampler, pruner = defaults()
        out.append(f"hpsearch's defaults, sampler {sampler} and pruner {pruner}, are not among the arms")
    else:
        out += _default_lines(saved, sizes)
        mine = [a for a in arms if a.sampler == saved.sampler]
        place = _place(mine, saved.sampler, saved.pruner)
        out.append(
            f"fewest epochs to target with sampler {saved.sampler}: {_fastest(mine, by='pruner')}{place}"
        )
    out.append(f"fewest epochs to target of all arms: {_fastest(arms, by='label')}")
    return out


def _default_lines(saved: Saved, sizes: Sizes) -> list[str]:
    head = f"default {saved.sampler} × {saved.pruner} (hpsearch's [study] defaults)"
    if not saved.to_target:
        return [f"{head}: never came within 0.3 points of the unpruned best"]
    share = statistics.fmean(saved.share)
    all_seeds = len(saved.to_target) == saved.seeds
    seeds = "" if all_seeds else f" ({len(saved.to_target)}/{saved.seeds} seeds)"
    verdict = "met" if share <= GOAL and all_seeds else "not met"
    lines = [
        f"{head}: within 0.3 points of the unpruned best after {statistics.fmean(saved.to_target):.0f} "
        f"epochs{seeds}, {share * 100:.0f} % of the unpruned arm's "
        f"{statistics.fmean(saved.unpruned_epochs):.0f} (goal ≤ {GOAL * 100:.0f} %: {verdict})"
    ]
    if saved.ratio is not None:
        level, mine, theirs = (
            statistics.fmean(x) for x in (saved.levels, saved.default_epochs, saved.baseline_epochs)
        )
        lines.append(
            f"default against the one-epoch top-{sizes.top_k} baseline ({saved.sampler}) at equal accuracy "
            f"(the lower of the two arms' best, at most the target; mean {level * 100:.1f} %, "
            f"{len(saved.levels)}/{saved.seeds} seeds): {mine:.0f} epochs against {theirs:.0f}, "
            f"{saved.ratio:.2f}× the baseline's"
        )
    return lines


def _fastest(arms: list[ArmSummary], by: str) -> str:
    ranked = sorted((a for a in arms if a.to_target), key=ArmSummary.rank_key)
    if not ranked:
        return "none reached it"
    epochs, share = _to_target(ranked[0])
    return f"{getattr(ranked[0], by)}, {epochs} epochs ({share} % of unpruned)"


def _place(arms: list[ArmSummary], sampler: str, pruner: str) -> str:
    order = sorted(arms, key=ArmSummary.rank_key)
    rank = next(i for i, a in enumerate(order, 1) if (a.sampler, a.pruner) == (sampler, pruner))
    return f"; {pruner} is {_ordinal(rank)} of {len(order)}"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def plot(runs: list[SeedRun], arms: list[ArmSummary], path: Path) -> None:
    """Best validation accuracy so far against epochs trained: one panel per sampler, one line per
    arm, the mean over the seeds where every seed has a complete trial, with each seed's target."""
    fig = Figure(figsize=(11.0, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SAMPLERS), sharey=True)
    colors = dict(zip(PRUNER_ARMS, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for ax, sampler in zip(axes, SAMPLERS, strict=True):
        targets = []
        for arm in (a for a in arms if a.sampler == sampler):
            mine = [r for r in runs if (r.sampler, r.pruner) == (sampler, arm.pruner)]
            xs, ys = _mean_curve(mine)
            if xs:
                # Widest first, so that lines lying on each other all show; a dot where the budget ends.
                width = 1.2 + 0.6 * (len(PRUNER_ARMS) - PRUNER_ARMS.index(arm.pruner))
                label = f"{arm.pruner} ({statistics.fmean(arm.epochs):.0f} epochs)"
                color = colors[arm.pruner]
                ax.step(xs, [y * 100 for y in ys], where="post", color=color, linewidth=width, label=label)
                ax.plot(xs[-1], ys[-1] * 100, "o", color=color)
            targets += [r.target for r in mine if r.target is not None]
        if targets:
            ax.axhline(
                statistics.fmean(targets) * 100,
                color="grey",
                linestyle="--",
                linewidth=1,
                label="target (mean)",
            )
        ax.set(title=f"sampler {sampler}", xlabel="epochs trained (all trials so far)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    axes[0].set_ylabel("best validation accuracy so far, % (mean over seeds)")
    fig.savefig(path)


def _mean_curve(runs: list[SeedRun]) -> tuple[list[int], list[float]]:
    """The seeds' best-so-far curves on every whole epoch, averaged where all are defined; each seed's
    curve stays at its last value up to the arm's longest run."""
    end = max(r.epochs for r in runs)
    xs, ys = [], []
    for e in range(end + 1):
        values = []
        for r in runs:
            at = [b for done, b in r.curve if done <= e]
            values.append(at[-1] if at else None)
        if all(v is not None for v in values):
            xs.append(e)
            ys.append(statistics.fmean(v for v in values if v is not None))
    return xs, ys


# The machine and the record.

_START = time.perf_counter()


def progress(what: str) -> None:
    """A line on stderr: what runs next, and the seconds since the start."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {what}", file=sys.stderr, flush=True)


def machine(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "optuna", "hpsearch", "numpy", "matplotlib"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


@contextlib.contextmanager
def storage_folder(db: Path | None) -> Iterator[tuple[Path, str]]:
    """A folder for the study files and checkpoints, and the SQLite URL the studies go to."""
    with tempfile.TemporaryDirectory(prefix="hpsearch-search-") as tmp:
        folder = Path(tmp)
        path = db if db is not None else folder / "search.db"
        yield folder, f"sqlite:///{path.resolve()}"


# The command.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help=f"CI's run: {_describe(QUICK)}")
    add("--trials", type=int, help=f"trials per arm and seed (default {FULL.trials}, --quick {QUICK.trials})")
    add("--epochs", type=int, help=f"epochs per trial (default {FULL.epochs}, --quick {QUICK.epochs})")
    add("--seeds", type=int, help=f"study seeds 0..S-1 (default {FULL.seeds}, --quick {QUICK.seeds})")
    add("--top-k", type=int, help=f"K of the baseline (default {FULL.top_k}, --quick {QUICK.top_k})")
    add("--train-images", type=int, help=f"N (default {FULL.train_images:,}, --quick {QUICK.train_images})")
    add("--val-images", type=int, help=f"M (default {FULL.val_images:,}, --quick {QUICK.val_images})")
    add("--test-images", type=int, help=f"T (default {FULL.test_images:,}, --quick {QUICK.test_images})")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add(
        "--threads",
        type=int,
        help="torch's CPU threads (default torch's own: one per core, as `hpsearch run`)",
    )
    add("--json", type=Path, help="write every figure, per seed and per trial, with the versions, here")
    add("--plot", type=Path, default=Path("search-efficiency.png"), help="the PNG (default %(default)s)")
    add("--db", type=Path, help="keep the studies in this SQLite file (default: a temporary one)")
    add(
        "--pruners",
        default=",".join(PRUNER_ARMS),
        help="pruner arms, comma-separated, with `none` (it sets every target; default: %(default)s)",
    )
    return parser.parse_args(argv)


def _describe(s: Sizes) -> str:
    return (
        f"{s.trials} trials of {s.epochs} epochs per arm, {s.seeds} seed{'s' * (s.seeds != 1)}, "
        f"{s.train_images:,} + {s.val_images:,} images, {s.test_images:,} test, K = {s.top_k}"
    )


def sizes_of(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    given = {f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name, None) is not None}
    return Sizes(**{**asdict(base), **given})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args)
    why = sizes.check()
    if why:
        print(f"search.py: {why}", file=sys.stderr)
        return 2
    if args.db is not None and args.db.exists():
        print(f"search.py: {args.db} exists; name a new file", file=sys.stderr)
        return 2
    for pruner in PRUNER_ARMS:
        if pruner != TOP_K and pruner not in PRUNERS:
            print(f"search.py: hpsearch has no pruner {pruner!r}", file=sys.stderr)
            return 2
    pruners = [p.strip() for p in args.pruners.split(",") if p.strip()]
    unknown = [p for p in pruners if p not in PRUNER_ARMS]
    if unknown or UNPRUNED not in pruners:
        why = f"unknown pruner arm {unknown[0]!r}" if unknown else f"--pruners must include {UNPRUNED!r}"
        print(f"search.py: {why}; arms: {', '.join(PRUNER_ARMS)}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("search.py: --threads must be 1 or more", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = machine(device)
    arms = [(s, p) for s in SAMPLERS for p in PRUNER_ARMS if p in pruners]
    progress(f"{len(arms)} arms × {sizes.seeds} seeds: {_describe(sizes)}; {info['device_name']}")
    space = study_text(sizes, SAMPLERS[0], UNPRUNED, 0)
    # Read once before the first study, whose time would otherwise include reading the images.
    load_dataset(tomllib.loads(space)["data"]["name"], None, str(device))
    runs: list[SeedRun] = []
    with storage_folder(args.db) as (folder, url):
        for seed in range(sizes.seeds):
            for sampler, pruner in arms:
                progress(f"{sampler} × {pruner}, seed {seed} ...")
                try:
                    run = run_arm(sizes, sampler, pruner, seed, folder, url, str(device))
                except BenchmarkError as exc:
                    print(f"search.py: {exc}", file=sys.stderr)
                    return 1
                best = "no complete trial" if run.best_val is None else f"best val {run.best_val * 100:.1f} %"
                progress(f"  {best}, {run.epochs} epochs, {run.wall_s:.1f} s")
                runs.append(run)
    summary = summarise(runs)
    saved = compute_saved(runs)
    lines = findings(summary, saved, sizes)
    wall = time.perf_counter() - _START
    print(
        f"Search efficiency: LeNet on FashionMNIST ({_describe(sizes)}); {info['device_name']}, "
        f"{info['cores']} cores; {wall / 60:.1f} min in all\n"
    )
    print(table(summary))
    print()
    for line in lines:
        print(f"- {line}")
    print(flush=True)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, summary, args.plot)
    progress(f"figure: {args.plot}")
    if args.json:
        default_sampler, default_pruner = defaults()
        record = {
            "versions": versions(),
            "machine": {**info, "load_average_end": round(os.getloadavg()[0], 2)},
            "sizes": asdict(sizes),
            "target_gap": TARGET_GAP,
            "defaults": {"sampler": default_sampler, "pruner": default_pruner},
            "study_file": space,
            "wall_s": wall,
            "arms": [asdict(a) | {"label": a.label} for a in summary],
            "runs": [
                asdict(r) | {"trials": [asdict(t) | {"trained": t.trained} for t in r.trials]} for r in runs
            ],
            "saved": None if saved is None else asdict(saved) | {"ratio": saved.ratio},
            "findings": lines,
            "plot": str(args.plot),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1), encoding="utf-8")
        progress(f"figures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
