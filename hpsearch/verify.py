"""Is the winner real or luck? A stored study's best configurations, retrained with fresh seeds.

The K best complete trials of a study are each retrained from scratch S times, with seeds the
search never used, on the whole training set the study used (its training and validation split
together: the validation split has chosen the configurations and has nothing left to judge), for
the trial's epochs, with the trial's own training code (``train.retrain``), and tested on the
study's test set as its trials were. Their spread over seeds says how much of the search's ranking
is luck. The stored study is only read; the CLI attaches the table to it as an artifact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial

from hpsearch.datasets import DataConfig, load_dataset, split, subset
from hpsearch.errors import HpsearchError
from hpsearch.export import best_table, param_columns
from hpsearch.objectives import first_value
from hpsearch.predict import check_savable, save_model
from hpsearch.record import SPEC, TrialRecord, study_task
from hpsearch.schema import TrainConfig
from hpsearch.spec import Choice, TrialConfig
from hpsearch.task import Task
from hpsearch.train import Progress, Retrained, retrain, trial_seed


class VerifyError(HpsearchError):
    """A verification cannot run: bad counts, a study hpsearch did not make, an unusable trial."""


@dataclass
class Verified:
    """One configuration: what the search measured, and what its retrainings reached."""

    rank: int  # its place in the search, by validation metric
    trial: int
    params: dict[str, Any]
    cfg: TrialConfig
    val: float  # the search's validation metric (the trial's value)
    test: float | None  # the search's test metric
    tests: list[float] = field(default_factory=list)  # the retrained test metric, per seed
    stopped: list[str] = field(default_factory=list)  # why retrainings stopped early, if any did
    train_examples: int = 0
    test_examples: int = 0

    @property
    def mean(self) -> float:
        return float(np.mean(self.tests)) if self.tests else float("nan")

    @property
    def std(self) -> float:
        """The sample standard deviation over seeds (n − 1); NaN for fewer than two."""
        return float(np.std(self.tests, ddof=1)) if len(self.tests) > 1 else float("nan")


@dataclass
class Verification:
    """A study's best configurations and their retrainings, in the search's order."""

    study: str
    study_seed: int  # drew the study's split and test subset, so it draws the retrainings' too
    task: Task
    complete: int  # the study's complete trials, of which ``configs`` are the best
    seeds: list[int]  # the same for every configuration
    configs: list[Verified]
    columns: list[str]  # the study's searched parameters
    saved: Path | None = None  # the model.json of ``--save``
    saved_from: tuple[int, int] | None = None  # its trial and seed

    def order(self, value: float) -> float:
        """Sort key, lower is better; a non-finite value (a diverged retraining) is worst."""
        if not np.isfinite(value):
            return float("inf")
        return -value if self.task.direction == "maximize" else value

    def best(self) -> Verified:
        """The configuration with the best retrained mean (the search's order breaks ties)."""
        return min(self.configs, key=lambda v: (self.order(v.mean), v.rank))

    def table(self, per_seed: bool = False) -> pd.DataFrame:
        """One row per configuration; ``per_seed`` adds the seeds and each one's test metric."""
        test_key = self.task.test_key
        retrained = f"retrained_{test_key}"
        rows = []
        for v in self.configs:
            row: dict[str, Any] = {
                "rank": v.rank,
                "trial": v.trial,
                self.task.val_key: v.val,
                test_key: v.test,
                f"{retrained}_mean": v.mean,
                f"{retrained}_std": v.std,
                "n_seeds": len(v.tests),
                "epochs": v.cfg.train.epochs,
                "train_examples": v.train_examples,
                "test_examples": v.test_examples,
                "stopped_early": len(v.stopped),
            }
            if per_seed:
                row["seeds"] = self.seeds[: len(v.tests)]
                row[retrained] = list(v.tests)
            rows.append({**row, **{c: v.params.get(c) for c in self.columns}})
        return pd.DataFrame(rows)

    def verdict(self) -> str:
        """One line: is the search's winner within noise of its runner-up after retraining?

        The rule: within noise when their retrained means differ by less than the larger of their
        two standard deviations over seeds.
        """
        metric = self.task.metric
        if len(self.configs) < 2:
            return "one configuration retrained: no runner-up to compare it with (use --top 2 or more)"
        w, r = self.configs[0], self.configs[1]
        head = (
            f"winner trial {w.trial} vs runner-up trial {r.trial}: retrained test {metric} "
            f"{_pm(w.mean, w.std)} vs {_pm(r.mean, r.std)}"
        )
        if len(self.seeds) < 2:
            return f"{head}; one seed each gives no spread to judge noise by (use --seeds 2 or more)"
        if not all(np.isfinite(x) for x in (w.mean, r.mean, w.std, r.std)):
            return f"{head}; a retraining diverged, so there is no spread to judge noise by"
        gap, noise = abs(w.mean - r.mean), max(w.std, r.std)
        if gap < noise:
            return (
                f"{head}: within noise (the means differ by {gap:.4f}, less than the larger std {noise:.4f})"
            )
        ahead = "the winner" if self.order(w.mean) <= self.order(r.mean) else "the runner-up"
        return (
            f"{head}: a real difference, {ahead} ahead (the means differ by {gap:.4f}, "
            f"more than the larger std {noise:.4f})"
        )


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}" if np.isfinite(std) else f"{mean:.4f}"


def verify_seeds(study_seed: int, count: int, used: set[int]) -> list[int]:
    """``count`` seeds for retraining: reproducible from the study seed, distinct from each other and
    from every seed in ``used`` (those the study's trials trained with)."""
    rng = random.Random(f"hpsearch verify {study_seed}")  # a str seeds the same stream in every process
    seeds: list[int] = []
    while len(seeds) < count:
        seed = rng.randrange(2**31)
        if seed not in used and seed not in seeds:
            seeds.append(seed)
    return seeds


def plan(study: optuna.Study, top: int, seeds: int) -> Verification:
    """The ``top`` best complete trials of a stored ``study`` and the ``seeds`` seeds to retrain them
    with; nothing is trained yet (``run`` does it)."""
    if top < 1:
        raise VerifyError(f"--top must be at least 1, not {top}")
    if seeds < 1:
        raise VerifyError(f"--seeds must be at least 1, not {seeds}")
    ranked = best_table(study)  # raises for a study with no complete trial
    stored = study.user_attrs.get(SPEC)
    if not isinstance(stored, dict):
        raise VerifyError(
            f"study {study.study_name!r} was not made by hpsearch (it stores no study file); "
            "verify retrains hpsearch studies"
        )
    study_seed = int(stored.get("study", {}).get("seed", 0))
    task = study_task(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    used = {trial_seed(study_seed, n) for n in trials}
    used |= {s for t in trials.values() if (s := TrialRecord.of(t, task).seed) is not None}
    columns = param_columns(study)
    configs = []
    for rank, number in enumerate(ranked["trial"].head(top).tolist(), start=1):
        t = trials[int(number)]
        configs.append(
            Verified(
                rank=rank,
                trial=t.number,
                params=dict(t.params),
                cfg=_config(t, task, study.study_name),
                val=v if (v := first_value(t)) is not None else math.nan,  # complete: it has one
                test=TrialRecord.of(t, task).test,
            )
        )
    return Verification(
        study=study.study_name,
        study_seed=study_seed,
        task=task,
        complete=len(ranked),
        seeds=verify_seeds(study_seed, seeds, used),
        configs=configs,
        columns=columns,
    )


def _config(trial: FrozenTrial, task: Task, study_name: str) -> TrialConfig:
    """The configuration a trial ran with, as it stored it (every default filled in)."""
    cfg = TrialRecord.of(trial, task).config

    def choice(section: str) -> Choice:
        table = dict(cfg[section])
        return Choice(str(table.pop("name")), table)

    try:
        return TrialConfig(
            data=DataConfig(**cfg["data"]),
            model=choice("model"),
            optimizer=choice("optimizer"),
            scheduler=choice("scheduler"),
            train=TrainConfig(**cfg["train"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VerifyError(
            f"trial {trial.number} of study {study_name!r} has no configuration this hpsearch can "
            f"retrain ({type(exc).__name__}: {exc})"
        ) from None


# on_run(configuration, seed's index, what its retraining reached)
OnRun = Callable[[Verified, int, Retrained], None]


def run(
    v: Verification,
    device: torch.device,
    data_dir: str | None = None,
    save: Path | None = None,
    on_run: OnRun | None = None,
    progress: Callable[[int], Progress | None] | None = None,
) -> Verification:
    """Retrain every configuration of ``v`` with each of its seeds and test it, filling in ``v``.

    Each retraining trains on the study's training and validation examples (its ``train_limit``
    subset, or all of them) and is tested on its test examples (its ``test_limit`` subset), both
    drawn with the study seed as its trials drew them. With ``save``, the network of the best seed
    of the configuration with the best retrained mean is saved there (``predict.save_model``).
    ``progress(trial number)`` gives a trial-style progress callback for each retraining.
    """
    if save is not None:
        for c in v.configs:  # before anything trains
            check_savable(c.cfg.data.name)
        if save.exists() and not save.is_dir():
            raise VerifyError(f"--save {save}: a file is there, not a folder")
    kept: tuple[float, Verified, int, torch.nn.Module] | None = None
    for c in v.configs:
        cfg = c.cfg
        data = load_dataset(cfg.data.name, data_dir, str(device))
        try:
            cfg.data.check_sizes(len(data.train_y), len(data.test_y))
        except ValueError as exc:
            raise VerifyError(f"trial {c.trial}: data: {exc} in the {cfg.data.name} files found") from None
        train, val = split(
            len(data.train_y), cfg.data.val_fraction, v.study_seed, cfg.data.train_limit, str(device)
        )
        train_idx = torch.cat([train, val])
        test_idx = subset(len(data.test_y), v.study_seed, cfg.data.test_limit, str(device))
        c.train_examples, c.test_examples = len(train_idx), len(test_idx)
        best_seed: tuple[float, int, torch.nn.Module] | None = None
        for k, seed in enumerate(v.seeds):
            done = retrain(
                cfg, v.task, data, train_idx, test_idx, seed, device, progress(c.trial) if progress else None
            )
            c.tests.append(done.test)
            if done.stopped:
                c.stopped.append(done.stopped)
            if on_run:
                on_run(c, k, done)
            if save is not None and (best_seed is None or v.order(done.test) < best_seed[0]):
                best_seed = (v.order(done.test), seed, done.model)
        if best_seed is not None and (kept is None or v.order(c.mean) < kept[0]):
            kept = (v.order(c.mean), c, best_seed[1], best_seed[2])
    if save is not None and kept is not None:
        _, c, seed, model = kept
        test_key = v.task.test_key
        source = {
            "study": v.study,
            "trial": c.trial,
            "seed": seed,
            f"retrained_{test_key}": c.tests[v.seeds.index(seed)],
            f"retrained_{test_key}_mean": c.mean,
            "train_examples": c.train_examples,
            "epochs": c.cfg.train.epochs,
        }
        data = load_dataset(c.cfg.data.name, data_dir, str(device))
        v.saved = save_model(save, model, c.cfg, data, source)
        v.saved_from = (c.trial, seed)
    return v


def verify(
    study: optuna.Study,
    top: int,
    seeds: int,
    device: torch.device,
    data_dir: str | None = None,
    save: Path | None = None,
) -> Verification:
    """``plan`` then ``run``: the ``top`` best configurations of ``study``, each retrained ``seeds`` times."""
    return run(plan(study, top, seeds), device, data_dir, save)
