"""What a study will cost, before it runs: ``hpsearch plan``.

``make_plan`` walks the study's search space, works out its pruner's schedule from Optuna's own
rules, puts real batches of the study's data through its model on the chosen device (so a model
that cannot take the data fails here, in one line), times training steps with the trial's own code,
and measures a checkpoint by serialising one. ``render`` writes the result as text.

Every setting that changes what a step costs (batch size, input size, network, its layer sizes,
optimizer) is measured, up to a bound; every other searched value is held at a typical one.
"""

from __future__ import annotations

import binascii
import io
import itertools
import math
import os
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna import pruners
from torch import nn

from hpsearch import backends
from hpsearch.checkpoint import Checkpoints, snapshot
from hpsearch.datasets import Dataset, batch_slices, load_dataset, split
from hpsearch.errors import HpsearchError
from hpsearch.optim import Schedule, build_optimizer, build_scheduler
from hpsearch.record import TrialRecord
from hpsearch.schema import Param, named
from hpsearch.search import PRUNERS
from hpsearch.spec import StudySpec, TrialConfig
from hpsearch.storage import resolve_url
from hpsearch.train import EVAL_BATCH, _build, _layout, _step, evaluate, resolve_device

__all__ = ["Bracket", "Measurement", "Plan", "PlanError", "PrunerPlan", "SpaceEntry", "make_plan", "render"]


class PlanError(HpsearchError):
    """The study cannot train as written on this machine: its model refuses its data, say."""


# Input sides tried on a model that refuses a batch, to say which size it does take.
_PROBE_SIDES = (28, 32, 64, 96, 128, 224)
# Model keys that change the starting weights, not the work of a step.
_COST_FREE_MODEL_KEYS = frozenset({"init", "init_value"})


@dataclass(frozen=True)
class SpaceEntry:
    """One parameter of the study file, as the search-space walker gives it."""

    name: str  # as in trial.params: ``section.key`` or ``section.choice.key``
    value: Any  # the fixed value, or the search table ({low, high[, log, step]} or {choices})
    searched: bool
    when: str | None  # ``optimizer.name = sgd`` for a key of one choice only


@dataclass(frozen=True)
class Bracket:
    """One successive-halving bracket: where its trials are judged and how many fall in it."""

    index: int
    rungs: tuple[int, ...]  # epochs at which a trial of the bracket is judged, within the run
    trials: int  # of the study's trials, those in this bracket
    expected_epochs: float  # per trial, if the pruner keeps its share at every rung


@dataclass(frozen=True)
class PrunerPlan:
    """The pruner's schedule as Optuna's rules give it for this study's epochs."""

    name: str
    kind: str  # none, hyperband, halving, percentile, threshold, patient or other
    args: dict[str, Any]  # every argument, Optuna's defaults filled in
    epochs: int
    checks: tuple[int, ...] = ()  # epochs at which it may stop a trial (percentile, threshold)
    brackets: tuple[Bracket, ...] = ()  # hyperband's brackets; successive halving's one
    min_resource: int | None = None  # successive halving's first rung, "auto" resolved
    max_resource: int | None = None  # what hyperband sizes its brackets from
    startup_trials: int = 0  # trials that run in full before it can prune any
    keep: float | None = None  # the share of trials it lets go on at a check
    earliest: int | None = None  # the first epoch at which it can stop a trial; None: never
    wrapped: PrunerPlan | None = None  # patient's inner pruner
    # Per trial number: expected epochs and the chance of finishing (and being tested), or None
    # where the schedule alone does not say (the threshold, patience).
    expected: tuple[tuple[float, float], ...] | None = None


@dataclass(frozen=True)
class Measurement:
    """One setting of the values that change a step's cost, measured on the device."""

    setting: dict[str, Any]  # those values; empty when nothing searched changes the cost
    weight: float  # the share of the study's trials expected to train this way
    input_shape: tuple[int, ...]  # one training batch as the model gets it
    batch_size: int  # examples per training batch in a trial
    timed_batch: int  # examples per timed batch: fewer than batch_size under max_batch
    batches_per_epoch: int
    epochs: int
    setup_s: float  # building the model, the optimizer and the schedule
    step_s: float  # one training step at batch_size, input preparation included
    val_s: float  # the validation pass after each epoch
    test_s: float  # the test pass at the end of a trial that finishes
    checkpoint_bytes: int  # one checkpoint as written: model, optimizer, schedule, random states
    checkpoint_s: float  # serialising it, after every epoch but the last

    @property
    def epoch_s(self) -> float:
        return self.batches_per_epoch * self.step_s + self.val_s + self.checkpoint_s

    def trial_s(self, epochs: float | None = None, finished: float = 1.0) -> float:
        """A trial that trains ``epochs`` epochs (all of them by default) and is tested if it finishes."""
        return (
            self.setup_s + (self.epochs if epochs is None else epochs) * self.epoch_s + finished * self.test_s
        )


@dataclass(frozen=True)
class Plan:
    """What ``hpsearch plan`` found: the search space, the pruner, the measurements and the estimates."""

    study: str
    path: Path
    description: str
    sampler: str
    space: tuple[SpaceEntry, ...]
    grid_size: int | None  # the grid sampler's configurations; None for other samplers
    pruner: PrunerPlan
    device: str
    threads: int | None  # CPU threads each worker trains with; None on a GPU
    dataset: str
    n_train: int
    n_val: int
    n_test: int
    measurements: tuple[Measurement, ...]
    n_settings: int  # settings that differ in cost; ``measurements`` holds those measured
    steps: int  # timed steps per measurement, after one warm-up step
    n_trials: int | None  # None: the study runs until stopped (or its timeout)
    workers: int
    epochs: int
    epochs_searched: bool  # train.epochs is searched: the estimates use its largest value
    timeout: float | None  # the study's own timeout, seconds
    compiles: bool  # train.compile: the compile time is not in the estimates
    checkpoint_folder: Path
    free_bytes: int | None  # free disk space where the checkpoints go, if that can be found
    # On the CPU: the machine's 1-minute load average after measuring, and its cores; other work
    # running beside the measurement slows it as it would slow the study.
    load: tuple[float, int] | None = None

    @property
    def searched(self) -> list[str]:
        return [e.name for e in self.space if e.searched]

    def _mean(self, value: Callable[[Measurement], float]) -> float:
        total = sum(m.weight for m in self.measurements)
        return sum(m.weight * value(m) for m in self.measurements) / total

    @property
    def trial_s(self) -> float:
        """A trial that is not pruned, averaged over the settings by their share of trials."""
        return self._mean(lambda m: m.trial_s())

    @property
    def study_s(self) -> float | None:
        """The study with no trial pruned: an upper bound. None without a number of trials."""
        if self.n_trials is None:
            return None
        return self.n_trials * self.trial_s / self.workers

    @property
    def expected_study_s(self) -> float | None:
        """The study with the pruner's schedule, where its schedule gives an expected figure."""
        if self.n_trials is None or self.pruner.expected is None:
            return None
        # Each measurement's trial is linear in the epochs and the chance of a test: average those first.
        epochs = sum(e for e, _ in self.pruner.expected)
        tested = sum(f for _, f in self.pruner.expected)
        n = len(self.pruner.expected)
        total = self._mean(lambda m: n * m.setup_s + epochs * m.epoch_s + tested * m.test_s)
        return total / self.workers

    @property
    def checkpoint_bytes(self) -> int:
        return max(m.checkpoint_bytes for m in self.measurements)

    @property
    def checkpoints_at_once(self) -> int:
        """One per running trial, while it runs; a one-epoch trial writes none."""
        return self.workers if self.epochs > 1 else 0


def make_plan(
    spec: StudySpec,
    *,
    device: str | None = "auto",
    data_dir: str | None = None,
    workers: int | None = None,
    n_trials: int | None = None,
    steps: int = 5,
    max_settings: int = 12,
    max_batch: int | None = None,
    storage: str | None = None,
) -> Plan:
    """Measure what ``spec`` will cost on ``device``.

    ``workers`` defaults as ``hpsearch run``'s does (one per visible GPU, else 1); on the CPU the
    measurement trains with the share of the cores each worker would get. ``n_trials`` replaces the
    file's. Each setting is timed over ``steps`` steps after a warm-up step; at most ``max_settings``
    settings are measured, spread over all of them; ``max_batch`` times smaller batches and scales
    the time up to the batch size (quicker, less exact). ``storage`` only says where checkpoints go.
    Raises ``PlanError`` when the model refuses a batch of the data, naming what to change.
    """
    if steps < 1 or max_settings < 1 or (max_batch is not None and max_batch < 1):
        raise PlanError("steps, max_settings and max_batch must be at least 1")
    dev = resolve_device(device)
    gpus = torch.cuda.device_count() if dev.type == "cuda" and dev.index is None else 0
    workers = workers or max(1, gpus)
    data_cfg = spec.raw["data"]
    data = load_dataset(data_cfg["name"], data_dir, str(dev))
    spec.check_data(len(data.train_y), len(data.test_y))
    train_idx, val_idx = split(
        len(data.train_y), data_cfg["val_fraction"], spec.seed, data_cfg["train_limit"], str(dev)
    )
    n_test = data_cfg["test_limit"] or len(data.test_y)

    typical = {p.name: _typical(p) for s in spec.space.values() for p in s.every_param() if p.searched}
    settings = _settings(spec)
    chosen = [settings[i] for i in _spread(len(settings), max_settings)]
    measurements = []
    evals: dict[str, float] = {}  # seconds per evaluated example, by network and input size
    with _device_settings(dev, workers):
        threads = torch.get_num_threads() if dev.type == "cpu" else None
        for setting, weight in chosen:
            trial = optuna.trial.FixedTrial({**typical, **setting})
            bench = _Bench(spec, spec.sample(trial), data, train_idx, val_idx, n_test, dev)
            measurements.append(bench.measure(trial.params, setting, weight, steps, max_batch, evals))

    n = spec.n_trials if n_trials is None else n_trials
    epochs = max(m.epochs for m in measurements)
    checkpoints = Checkpoints.of(spec.name, spec.study.checkpoints, resolve_url(storage))
    return Plan(
        study=spec.name,
        path=spec.path,
        description=spec.description,
        sampler=named(spec.study.sampler)["name"],
        space=tuple(_space(spec)),
        grid_size=len(spec.grid()) if spec.enumerates else None,
        pruner=_pruner_plan(spec, named(spec.study.pruner), epochs, n or 0, workers),
        device=str(dev),
        threads=threads,
        dataset=data.name,
        n_train=len(train_idx),
        n_val=len(val_idx),
        n_test=n_test,
        measurements=tuple(measurements),
        n_settings=len(settings),
        steps=steps,
        n_trials=n,
        workers=workers,
        epochs=epochs,
        epochs_searched="train.epochs" in typical,
        timeout=spec.study.timeout,
        compiles=bool(spec.raw["train"].get("compile")),
        checkpoint_folder=checkpoints.folder,
        free_bytes=_free_bytes(checkpoints.folder),
        load=(os.getloadavg()[0], len(os.sched_getaffinity(0))) if dev.type == "cpu" else None,
    )


# The search space: what is listed, and the settings that are measured.


def _space(spec: StudySpec) -> Iterator[SpaceEntry]:
    for title, s in spec.space.items():
        if s.name is not None:
            yield SpaceEntry(s.name.name, s.name.value, s.name.searched, None)
        for p in s.common:
            yield SpaceEntry(p.name, p.value, p.searched, None)
        for choice, params in s.branches.items():
            for p in params:
                yield SpaceEntry(p.name, p.value, p.searched, f"{title}.name = {choice}")


def _changes_cost(p: Param) -> bool:
    """Whether a searched value changes what a training step costs: the batch, the input size, the
    network and its layer sizes (not its dropout rate or starting weights), the optimizer."""
    if not p.searched:
        return False
    if p.section == "data":
        return p.key in ("batch_size", "resize")
    if p.section == "model":
        return p.key == "name" or (p.key not in _COST_FREE_MODEL_KEYS and p.kind is not float)
    return p.section == "optimizer" and p.key == "name"


def _cost_values(p: Param) -> list[Any]:
    """The values measured: every choice, or both ends of a range."""
    if "choices" in p.value:
        return list(p.value["choices"])
    return sorted({p.value["low"], p.value["high"]})


def _typical(p: Param) -> Any:
    """The value a searched parameter is held at while others are measured: the first choice, or
    the middle of its range (geometric for a log range, on the step grid for a stepped one). The
    number of epochs is held at its largest, so the estimates are upper bounds."""
    v = p.value
    if p.name == "train.epochs":
        return max(_cost_values(p))
    if "choices" in v:
        return v["choices"][0]
    low, high = v["low"], v["high"]
    middle = math.sqrt(low * high) if v.get("log") else (low + high) / 2
    step = v.get("step", None if p.is_float_range else 1)
    if step:
        middle = low + round((middle - low) / step) * step
    return float(middle) if p.is_float_range else int(middle)


def _settings(spec: StudySpec) -> list[tuple[dict[str, Any], float]]:
    """Every combination of the values that change a step's cost, with the share of trials
    expected to train with it: each choice equally likely, or, for a grid, its share of the grid."""
    per_section: list[list[tuple[dict[str, Any], float]]] = []
    for s in spec.space.values():
        name_varies = s.name is not None and _changes_cost(s.name)
        choices = s.choices() if name_varies else s.choices()[:1]
        points = []
        for choice in choices:
            head = {s.name.name: choice} if name_varies and s.name is not None else {}
            varying = [p for p in s.params(choice) if _changes_cost(p)]
            values = [_cost_values(p) for p in varying]
            share = 1 / len(choices) / math.prod(len(v) for v in values)
            for combo in itertools.product(*values):
                points.append(({**head, **{p.name: v for p, v in zip(varying, combo, strict=True)}}, share))
        per_section.append(points)
    settings = [
        ({k: v for part, _ in combo for k, v in part.items()}, math.prod(w for _, w in combo))
        for combo in itertools.product(*per_section)
    ]
    if spec.enumerates:
        grid = spec.grid()
        settings = [
            (s, sum(all(g.get(k) == v for k, v in s.items()) for g in grid) / len(grid)) for s, _ in settings
        ]
    return settings


def _spread(n: int, k: int) -> list[int]:
    """``k`` of the indices ``0..n-1``, evenly spread, first and last included (all if ``n <= k``)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# Measuring on the device.


@contextmanager
def _device_settings(device: torch.device, workers: int) -> Iterator[None]:
    """Train as a worker of ``hpsearch run`` would: with the process settings a trial trains under,
    and on the CPU with the share of the cores each of ``workers`` gets."""
    backends.prepare(device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Bench:
    """One configuration built as a trial builds it, and timed through the trial's own step."""

    def __init__(
        self,
        spec: StudySpec,
        cfg: TrialConfig,
        data: Dataset,
        train_idx: torch.Tensor,
        val_idx: torch.Tensor,
        n_test: int,
        device: torch.device,
    ) -> None:
        self.spec, self.cfg, self.data, self.device = spec, cfg, data, device
        self.train_idx, self.val_idx, self.n_test = train_idx, val_idx, n_test

    def measure(
        self,
        params: dict[str, Any],
        setting: dict[str, Any],
        weight: float,
        steps: int,
        max_batch: int | None,
        evals: dict[str, float],
    ) -> Measurement:
        spec, cfg, data, device = self.spec, self.cfg, self.data, self.device
        n_train = len(self.train_idx)
        t0 = time.perf_counter()
        model = _build(cfg.model.name, cfg.model.kwargs, data, device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(**cfg.optimizer.as_dict(), params=model.parameters())
        slices = batch_slices(n_train, cfg.data.batch_size)
        run = Schedule(cfg.train.epochs, len(slices), "max" if spec.task.direction == "maximize" else "min")
        stepper = build_scheduler(**cfg.scheduler.as_dict(), optimizer=optimizer, run=run)
        _sync(device)
        setup_s = time.perf_counter() - t0

        batch = min(cfg.data.batch_size, n_train)  # a trial's full batch
        # Never fewer than 2: BatchNorm cannot train on one example (the loop drops such a batch).
        size = min(batch, max(2, max_batch or batch))
        g = torch.Generator(device=device).manual_seed(spec.seed)
        loss_fn = spec.task.loss()
        model.train()
        # The first step is the check: the study's real data, resized and batched as a trial does.
        x = self._inputs(0, size, g)
        try:
            loss, _ = _step(
                model, optimizer, loss_fn, x, self._targets(0, size), trainable, cfg.train.l1, device
            )
            float(loss)  # waits for the device, so that an error on it is raised here
        except Exception as exc:
            raise self._refused(model, x, exc) from None
        shape = tuple(x.shape)

        times = []
        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            x, y = self._inputs(k, size, g), self._targets(k, size)
            _step(model, optimizer, loss_fn, x, y, trainable, cfg.train.l1, device)
            if device.type == "cpu":
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
        # On CUDA the steps run ahead of the host as in the training loop, timed as a whole; on a
        # CPU shared with other work, the median step is the one least disturbed by it.
        _sync(device)
        step_s = statistics.median(times) if times else (time.perf_counter() - t0) / steps
        step_s *= batch / size

        per_example = self._eval_time(model, max_batch, evals)
        record = TrialRecord()
        for _ in range(max(1, cfg.train.epochs - 1)):  # the last checkpoint holds the longest history
            record.add_epoch(0.0, 0.0, 0.0, 0.0, 0.0)
        t0 = time.perf_counter()
        buffer = io.BytesIO()
        state = snapshot(cfg.train.epochs - 1, params, model, optimizer, stepper, g, record.history())
        torch.save(state, buffer)  # what ``Checkpoints.save`` writes
        checkpoint_s = time.perf_counter() - t0
        return Measurement(
            setting=setting,
            weight=weight,
            input_shape=(batch, *shape[1:]),
            batch_size=batch,
            timed_batch=size,
            batches_per_epoch=len(slices),
            epochs=cfg.train.epochs,
            setup_s=setup_s,
            step_s=step_s,
            val_s=per_example * len(self.val_idx),
            test_s=per_example * self.n_test,
            checkpoint_bytes=buffer.getbuffer().nbytes,
            checkpoint_s=checkpoint_s,
        )

    def _batch(self, k: int, size: int) -> torch.Tensor:
        """The ``k``-th batch of ``size`` training examples, wrapping round the training split."""
        n = len(self.train_idx)
        start = (k * size) % n
        idx = self.train_idx[start : start + size]
        return idx if len(idx) == size else torch.cat([idx, self.train_idx[: size - len(idx)]])

    def _inputs(self, k: int, size: int, g: torch.Generator) -> torch.Tensor:
        data, d = self.data, self.cfg.data
        # As the training loop feeds a trial that trains alone.
        return _layout(data.inputs(data.train_x[self._batch(k, size)], d.resize, d.flip, g))

    def _targets(self, k: int, size: int) -> torch.Tensor:
        return self.data.train_y[self._batch(k, size)]

    def _eval_time(self, model: nn.Module, max_batch: int | None, evals: dict[str, float]) -> float:
        """Seconds per evaluated example, timed once per network and input size."""
        cfg = self.cfg
        key = repr((cfg.model.name, sorted(cfg.model.kwargs.items()), cfg.data.resize))
        if key not in evals:
            n = min(
                cfg.train.eval_batch_size or EVAL_BATCH[self.device.type],
                len(self.val_idx),
                max_batch or len(self.val_idx),
            )
            idx = self.val_idx[:n]
            data, task = self.data, self.spec.task
            if self.device.type == "cuda":  # the first pass at a new batch shape autotunes cuDNN
                evaluate(model, data, task, data.train_x, data.train_y, idx, cfg, self.device)
            t0 = time.perf_counter()
            evaluate(model, data, task, data.train_x, data.train_y, idx, cfg, self.device)
            evals[key] = (time.perf_counter() - t0) / n
        return evals[key]

    def _refused(self, model: nn.Module, x: torch.Tensor, exc: Exception) -> PlanError:
        """One line: the model, the input it was given, what went wrong and what to change."""
        cfg, data = self.cfg, self.data
        shape = "×".join(map(str, x.shape))
        where = (
            f"{self.spec.path}: model {cfg.model.name} cannot train on {data.name} batches of shape {shape}"
        )
        if isinstance(exc, torch.OutOfMemoryError):
            return PlanError(f"{where}: out of memory on {self.device}; lower [data] batch_size")
        return PlanError(f"{where} ({_one_line(exc)}); {self._remedy(model, x)}")

    def _remedy(self, model: nn.Module, x: torch.Tensor) -> str:
        """What to change, found by trying the model on other input sizes and channel counts."""
        if x.dim() != 4:
            return "check that the model fits the dataset's inputs and outputs"
        channels, side = int(x.shape[1]), int(x.shape[-1])
        model.eval()
        for c in (channels, *(k for k in (1, 3) if k != channels)):
            fits = [s for s in sorted({*_PROBE_SIDES, side}) if _runs(model, c, s, self.device)]
            if fits and c != channels:
                return (
                    f"the model takes {c}-channel input but {self.data.name} has {channels} channels: "
                    "build its first layer from its in_channels argument"
                )
            if side in fits and c == channels:
                return (
                    "its forward pass runs at this size, so check its output (num_classes = "
                    f"{self.data.num_outputs} for {self.data.name}) and its backward pass"
                )
            if fits:
                sizes = ", ".join(f"{s}×{s}" for s in fits)
                return (
                    f"it runs at {sizes}: set [data] resize = {fits[0]}, or make the model take {side}×{side}"
                )
        return "it ran at none of the usual input sizes either; check the model's layer sizes"


def _runs(model: nn.Module, channels: int, side: int, device: torch.device) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, side, side, device=device))
    except Exception:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _free_bytes(folder: Path) -> int | None:
    """Free disk space where ``folder`` is or would be created."""
    for p in (folder, *folder.resolve().parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return None


# The pruner's schedule, from Optuna's own rules for each pruner.


def _pruner_args(table: dict[str, Any]) -> dict[str, Any]:
    name = table["name"]
    nested = PRUNERS.facts(name).nested
    args = {k: p.default for k, p in PRUNERS.params(name).items() if p.default is not p.empty}
    args.update({k: v for k, v in table.items() if k not in ("name", nested)})
    return args


def _pruner_plan(
    spec: StudySpec, table: dict[str, Any], epochs: int, n_trials: int, workers: int
) -> PrunerPlan:
    """The schedule of pruner ``table`` over ``epochs`` epochs and the study's first ``n_trials`` trials.

    hpsearch reports epoch ``e`` (from 1) as Optuna's step ``e``. Expected figures assume the
    pruner keeps its share of trials at each check (1/reduction_factor for successive halving,
    percentile/100 at a percentile pruner's first check); trials that run before it can prune
    (``startup_trials``) run in full.
    """
    name = table["name"]
    args = _pruner_args(table)
    builder = PRUNERS[name]
    full = ((float(epochs), 1.0),) * n_trials
    base = PrunerPlan(name, "other", args, epochs)
    if builder is pruners.NopPruner:
        return PrunerPlan(name, "none", args, epochs, expected=full)
    if builder is pruners.HyperbandPruner:
        return _hyperband(spec.name, base, n_trials, workers)
    if builder is pruners.SuccessiveHalvingPruner:
        return _halving(base, n_trials, workers)
    if isinstance(builder, type) and issubclass(builder, pruners.PercentilePruner):
        return _percentile(
            base, 50.0 if builder is pruners.MedianPruner else args["percentile"], n_trials, workers
        )
    if builder is pruners.ThresholdPruner:
        checks = _checks(epochs, args["n_warmup_steps"], args["interval_steps"])
        return PrunerPlan(
            name, "threshold", args, epochs, checks=checks, earliest=checks[0] if checks else None
        )
    if builder is pruners.PatientPruner:
        nested = table.get(PRUNERS.facts(name).nested or "")
        if nested is None:  # early stopping: its patience alone decides
            alone = args["patience"] + 2
            if alone > epochs:
                return PrunerPlan(name, "patient", args, epochs, expected=full)
            return PrunerPlan(name, "patient", args, epochs, earliest=alone)
        inner = _pruner_plan(spec, named(nested), epochs, n_trials, workers)
        # It needs patience + 2 reported epochs to compare, and prunes only where its inner pruner agrees.
        earliest = max(args["patience"] + 2, inner.earliest or 0)
        inner_never = inner.kind != "other" and inner.earliest is None
        if inner_never or earliest > epochs:
            return PrunerPlan(name, "patient", args, epochs, wrapped=inner, expected=full)
        return PrunerPlan(name, "patient", args, epochs, earliest=earliest, wrapped=inner)
    return base


def _rungs(min_resource: int, eta: int, rate: int, epochs: int) -> tuple[int, ...]:
    """Successive halving's rungs: step min_resource × eta^(rate + k), for k = 0, 1, ..., within the run."""
    out = []
    k = 0
    while (step := min_resource * eta ** (rate + k)) <= epochs:
        out.append(step)
        k += 1
    return tuple(out)


def _survival(rungs: tuple[int, ...], keep: float, epochs: int) -> tuple[float, float]:
    """Expected epochs of a trial judged at ``rungs`` and kept with chance ``keep`` at each, and
    its chance of finishing."""
    trained, alive, last = 0.0, 1.0, 0
    for rung in rungs:
        trained += alive * (rung - last)
        alive *= keep
        last = rung
    return trained + alive * (epochs - last), alive


def _hyperband(study: str, base: PrunerPlan, n_trials: int, workers: int) -> PrunerPlan:
    args, epochs = base.args, base.epochs
    r, eta = args["min_resource"], args["reduction_factor"]
    auto = args["max_resource"] == "auto"
    # "auto": the last step of the first trial to complete, plus 1; until one completes none is pruned.
    max_resource = epochs + 1 if auto else args["max_resource"]
    n_brackets = math.floor(math.log(max_resource / r, eta)) + 1
    budgets = [
        math.ceil(n_brackets * eta ** (n_brackets - 1 - b) / (n_brackets - b)) for b in range(n_brackets)
    ]

    def bracket_of(number: int) -> int:
        # Optuna's assignment: a hash of the study name and the trial number, over the budgets.
        n = binascii.crc32(f"{study}_{number}".encode()) % sum(budgets)
        for b, budget in enumerate(budgets):
            n -= budget
            if n < 0:
                return b
        raise AssertionError("unreachable: the budgets sum to the modulus")

    of = [bracket_of(i) for i in range(n_trials)]
    counts = Counter(of)
    rungs = [_rungs(r, eta, b, epochs) for b in range(n_brackets)]
    fates = [_survival(rs, 1 / eta, epochs) for rs in rungs]
    startup = min(workers, n_trials) if auto else 0
    brackets = tuple(Bracket(b, rungs[b], counts.get(b, 0), fates[b][0]) for b in range(n_brackets))
    expected = tuple((float(epochs), 1.0) if i < startup else fates[b] for i, b in enumerate(of))
    earliest = min((rs[0] for rs in rungs if rs), default=None)
    return PrunerPlan(
        base.name,
        "hyperband",
        args,
        epochs,
        brackets=brackets,
        max_resource=max_resource,
        startup_trials=startup,
        keep=1 / eta,
        earliest=earliest,
        expected=expected,
    )


def _halving(base: PrunerPlan, n_trials: int, workers: int) -> PrunerPlan:
    args, epochs = base.args, base.epochs
    auto = args["min_resource"] == "auto"
    # "auto": Optuna's estimate from the first trial to complete, its last step // 100, at least 1.
    r = max(epochs // 100, 1) if auto else args["min_resource"]
    eta, rate = args["reduction_factor"], args["min_early_stopping_rate"]
    rungs = _rungs(r, eta, rate, epochs)
    fate = _survival(rungs, 1 / eta, epochs)
    startup = min(workers, n_trials) if auto else 0
    expected = tuple((float(epochs), 1.0) if i < startup else fate for i in range(n_trials))
    return PrunerPlan(
        base.name,
        "halving",
        args,
        epochs,
        brackets=(Bracket(rate, rungs, n_trials, fate[0]),),
        min_resource=r,
        startup_trials=startup,
        keep=1 / eta,
        earliest=rungs[0] if rungs else None,
        expected=expected,
    )


def _checks(epochs: int, warmup: int, interval: int) -> tuple[int, ...]:
    """Epochs at which a pruner with Optuna's warm-up and interval rules judges a trial: from
    ``warmup`` on, each epoch that is the first one reported in its interval. hpsearch reports every
    epoch from 1, so those are ``warmup + k × interval``, and epoch 1 itself (nothing came before it)."""
    return tuple(e for e in range(1, epochs + 1) if e >= warmup and (e == 1 or (e - warmup) % interval == 0))


def _percentile(base: PrunerPlan, percentile: float, n_trials: int, workers: int) -> PrunerPlan:
    args, epochs = base.args, base.epochs
    checks = _checks(epochs, args["n_warmup_steps"], args["interval_steps"])
    keep = percentile / 100
    # It compares with completed trials only: none is pruned before n_startup_trials (at least one)
    # have completed, and the trials running beside those run in full too.
    startup = min(max(args["n_startup_trials"], 1) + workers - 1, n_trials)
    fate = ((1 - keep) * checks[0] + keep * epochs, keep) if checks else (float(epochs), 1.0)
    expected = tuple((float(epochs), 1.0) if i < startup else fate for i in range(n_trials))
    return PrunerPlan(
        base.name,
        "percentile",
        args,
        epochs,
        checks=checks,
        startup_trials=startup,
        keep=keep,
        earliest=checks[0] if checks else None,
        expected=expected,
    )


# Rendering.


def render(plan: Plan) -> str:
    """The plan as text: search space, pruner, measurements, estimated time, checkpoints."""
    head = f"study {plan.study} ({plan.path})" + (f": {plan.description}" if plan.description else "")
    parts = [
        [head],
        _render_space(plan),
        _render_pruner(plan.pruner, plan.n_trials),
        _render_measurements(plan),
        _render_time(plan),
        _render_checkpoints(plan),
    ]
    return "\n\n".join("\n".join(p) for p in parts)


def _render_space(plan: Plan) -> list[str]:
    searched = len(plan.searched)
    lines = [f"search space: {searched} searched, {len(plan.space) - searched} fixed; sampler {plan.sampler}"]
    width = max(len(e.name) for e in plan.space)
    for e in plan.space:
        kind = "searched" if e.searched else "fixed"
        when = f"   (only when {e.when})" if e.when else ""
        lines.append(f"  {e.name:<{width}}  {kind:<8}  {_shown(e.value)}{when}")
    if plan.grid_size is not None:
        lines.append(f"grid: {plan.grid_size} configurations, each run once")
    return lines


def _shown(value: Any) -> str:
    """A fixed value, or a search table in words."""
    if not isinstance(value, dict):
        return _value(value)
    if "choices" in value:
        return "one of " + ", ".join(_value(c) for c in value["choices"])
    text = f"{_value(value['low'])} to {_value(value['high'])}"
    if value.get("log"):
        text += ", log scale"
    if "step" in value:
        text += f", step {_value(value['step'])}"
    return text


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _epochs(steps: tuple[int, ...], what: str = "epoch") -> str:
    """``epochs 1, 3, 9``; with ``what = "rung"``, ``rungs at epochs 1, 3, 9``."""
    if not steps:
        return f"no {what} within the run" + (": never pruned" if what == "rung" else "")
    if what == "epoch":
        return ("epoch " if len(steps) == 1 else "epochs ") + ", ".join(map(str, steps))
    return (f"{what} at " if len(steps) == 1 else f"{what}s at ") + _epochs(steps)


def _render_pruner(p: PrunerPlan, n_trials: int | None) -> list[str]:
    args = ", ".join(f"{k} {_value(v)}" for k, v in p.args.items() if v is not None)
    lines = [f"pruner: {p.name}" + (f" ({args})" if args else "")]
    if p.kind == "none":
        lines.append("  never stops a trial early: every trial trains all its epochs")
    elif p.kind in ("hyperband", "halving"):
        lines += _render_halving(p, n_trials)
    elif p.kind == "percentile":
        kept = "as good as the median" if p.keep == 0.5 else f"among the best {_percent(p.keep)}"
        lines.append(
            f"  judges a trial at {_epochs(p.checks)}: it goes on only if its best validation value "
            f"so far is {kept} of the completed trials' at that epoch"
        )
        startup = max(p.args["n_startup_trials"], 1)
        warmup = p.args["n_warmup_steps"]
        lines.append(
            f"  prunes nothing until {startup} trial{'s' if startup > 1 else ''} have completed "
            "(n_startup_trials)" + (f", nor before epoch {warmup} (n_warmup_steps)" if warmup else "")
        )
    elif p.kind == "threshold":
        bounds = " or ".join(
            f"{'below' if k == 'lower' else 'above'} {_value(p.args[k])}"
            for k in ("lower", "upper")
            if p.args.get(k) is not None
        )
        lines.append(f"  at {_epochs(p.checks)}: stops a trial whose validation value is {bounds} (or NaN)")
    elif p.kind == "patient" and p.wrapped is None:
        lines.append(
            f"  stops a trial whose best of its last {p.args['patience'] + 1} epochs is worse than its best "
            f"before them by more than {_value(p.args['min_delta'])} (early stopping; no wrapped pruner)"
        )
        if p.earliest is None:
            lines.append("  so it never stops a trial early")
        else:
            lines.append(f"  so the first epoch it can stop a trial at is {p.earliest}")
    elif p.kind == "patient" and p.wrapped is not None:
        lines.append(
            f"  waits for {p.args['patience']} epochs without an improvement of more than "
            f"{_value(p.args['min_delta'])}, then asks its wrapped pruner, which decides:"
        )
        lines += ["  " + line for line in _render_pruner(p.wrapped, n_trials)]
        if p.earliest is None:
            lines.append("  so it never stops a trial early")
        else:
            lines.append(f"  so the first epoch it can stop a trial at is {p.earliest}")
    else:
        lines.append("  no schedule is known for this pruner: the estimates below are upper bounds only")
    return lines


def _render_halving(p: PrunerPlan, n_trials: int | None) -> list[str]:
    eta = p.args["reduction_factor"]
    lines = []
    if p.kind == "hyperband":
        n = len(p.brackets)
        if p.args["max_resource"] == "auto":
            lines.append(
                f"  max_resource auto: {p.max_resource} (the last epoch, {p.epochs}, plus 1) once the "
                "first trial completes; no trial is pruned before that"
            )
        lines.append(
            f"  {n} bracket{'s' if n > 1 else ''} (floor(log_{eta}({p.max_resource} / "
            f"{p.args['min_resource']})) + 1); a trial's bracket follows from the study name and its number"
        )
    elif p.args["min_resource"] == "auto":
        lines.append(
            f"  min_resource auto: {p.min_resource} once the first trial completes (its last epoch // 100, "
            "at least 1); no trial is pruned before that"
        )
    lines.append(
        f"  at each rung a trial goes on only if it is among the best 1/{eta} of the trials"
        + (" of its bracket" if p.kind == "hyperband" else "")
        + " that reached it"
    )
    if p.kind == "halving":
        (b,) = p.brackets
        lines.append(
            f"  {_epochs(b.rungs, 'rung')} (min_resource × reduction_factor^(min_early_stopping_rate + k)): "
            f"≈ {b.expected_epochs:.1f} of {p.epochs} epochs a trial"
        )
        return lines
    width = max(len(_epochs(b.rungs, "rung")) for b in p.brackets)
    for b in p.brackets:
        share = f"{b.trials} of {n_trials} trials, " if n_trials else ""
        lines.append(
            f"    bracket {b.index}: {_epochs(b.rungs, 'rung'):<{width}}  {share}"
            f"≈ {b.expected_epochs:.1f} of {p.epochs} epochs each"
        )
    return lines


def _render_measurements(plan: Plan) -> list[str]:
    ms = plan.measurements
    first = ms[0]
    threads = f", {plan.threads} CPU thread{'s' if plan.threads != 1 else ''}" if plan.threads else ""
    lines = [
        f"data: {plan.dataset}, {plan.n_train:,} training, {plan.n_val:,} validation and {plan.n_test:,} "
        "test examples",
        f"one real batch on {plan.device}{threads}: {'×'.join(map(str, first.input_shape))} through "
        f"the model, forward and backward: ok"
        + (f" (and for the other {len(ms) - 1} settings)" if len(ms) > 1 else ""),
    ]
    scaled = [m for m in ms if m.timed_batch < m.batch_size]
    how = f"1 warm-up and {plan.steps} timed training step{'s' if plan.steps > 1 else ''}"
    if scaled:
        how += f", on batches of {scaled[0].timed_batch} scaled up to the batch size"
    if plan.n_settings == 1:
        lines.append(f"measured ({how}):")
    else:
        measured = f"{len(ms)} of the {plan.n_settings}" if len(ms) < plan.n_settings else f"all {len(ms)}"
        lines.append(f"measured {measured} settings that change a step's cost ({how} each):")
    keys = sorted({k for m in ms for k in m.setting}, key=lambda k: [e.name for e in plan.space].index(k))
    columns = [*keys, "step", "batches/epoch", "epoch", "trial", "checkpoint"]
    rows = [
        [
            *(_value(m.setting.get(k, "-")) for k in keys),
            _duration(m.step_s),
            f"{m.batches_per_epoch:,}",
            _duration(m.epoch_s),
            _duration(m.trial_s()),
            _size(m.checkpoint_bytes),
        ]
        for m in ms
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    for row in (columns, *rows):
        lines.append(
            "  "
            + "  ".join(
                cell.ljust(w) if i < len(keys) else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return lines


def _render_time(plan: Plan) -> list[str]:
    ms = plan.measurements
    lo, hi = min(m.trial_s() for m in ms), max(m.trial_s() for m in ms)
    spread = f" ({_duration(lo)} to {_duration(hi)} by setting)" if len(ms) > 1 else ""
    m = ms[0]
    lines = [
        f"estimated time on {plan.device}:",
        f"  per trial: {_duration(plan.trial_s)}{spread}: {plan.epochs} epochs × (batches × step time + "
        f"validation of {plan.n_val:,}), then a test of {plan.n_test:,}"
        + (
            f": {m.epochs} × ({m.batches_per_epoch:,} × {_duration(m.step_s)} + {_duration(m.val_s)}) "
            f"+ {_duration(m.test_s)}"
            if len(ms) == 1
            else ""
        ),
    ]
    if plan.epochs_searched:
        lines.append(f"  train.epochs is searched: every figure assumes its largest value, {plan.epochs}")
    if plan.compiles:
        lines.append(
            "  train.compile: the time torch.compile takes in each trial's first epoch is not included"
        )
    if plan.study_s is None:
        lines.append(
            "  study: the file sets no n_trials, so it runs until stopped; --n-trials N estimates N trials"
        )
        return lines
    on = f"{plan.workers} worker{'s' if plan.workers > 1 else ''}"
    trials = f"{plan.n_trials} trial{'s' if plan.n_trials != 1 else ''}"
    lines.append(f"  study: {trials} on {on}: at most {_duration(plan.study_s)} (no trial pruned)")
    expected = plan.expected_study_s
    if plan.pruner.kind == "none" or (expected is not None and expected >= plan.study_s * 0.999):
        lines.append("  the pruner stops no trial early, so that is the expected time too")
    elif expected is not None:
        p = plan.pruner
        if p.kind == "percentile":
            how = (
                f"it stops {_percent(1 - (p.keep or 0))} of the trials at its first check and the rest finish"
            )
        else:
            how = f"it keeps 1/{p.args['reduction_factor']} of the trials at each rung"
        lines.append(f"  with {p.name} pruning, about {_duration(expected)}, if {how}")
    else:
        lines.append(
            f"  {plan.pruner.name} pruning can only shorten that; its schedule alone gives no expected time"
        )
    if plan.workers > 1:
        shared = "the CPU cores" if plan.threads else "a GPU, unless each has its own"
        lines.append(f"  (the workers share {shared}; the measurement gave each its share: a best case)")
    if plan.timeout is not None:
        lines.append(f"  the study's timeout stops it from starting trials after {_duration(plan.timeout)}")
    if plan.load is not None and plan.load[0] > plan.load[1]:
        lines.append(
            f"  the CPU was busy while measuring (load {plan.load[0]:.1f} on {plan.load[1]} cores): the "
            "times are what this load costs; measure again when it is quieter for the machine's own pace"
        )
    return lines


def _percent(share: float | None) -> str:
    return f"{(share or 0) * 100:g} %"


def _render_checkpoints(plan: Plan) -> list[str]:
    size = plan.checkpoint_bytes
    where = f"in {plan.checkpoint_folder}"
    if plan.free_bytes is not None:
        where += f" ({_size(plan.free_bytes)} free there)"
    if plan.checkpoints_at_once == 0:
        return [
            "checkpoints: none; a trial writes one after every epoch but its last, and these have one epoch"
        ]
    n = plan.checkpoints_at_once
    return [
        f"checkpoints: {_size(size)} each (model, optimizer and scheduler state, random states and the "
        "record so far, as serialised; the largest setting)",
        f"  one per running trial, deleted when it ends: {n} at once with {n} worker{'s' if n > 1 else ''}, "
        f"{_size(n * size)} {where}",
    ]


def _duration(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 100:
        return f"{s:.3g} s"
    if s < 2 * 3600:
        return f"{s / 60:.3g} min"
    if s < 2 * 86400:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.3g} days"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
