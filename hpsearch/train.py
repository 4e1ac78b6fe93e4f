"""The trial: sample → build → loop over epochs (train, evaluate, report, prune) → test → record."""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import optuna
import torch
from torch import nn
from torch.func import functional_call, vmap

from hpsearch import backends, record, signals
from hpsearch.checkpoint import Checkpoints, chain_of, restore, snapshot
from hpsearch.datasets import DataConfig, Dataset, batch_slices, load_dataset, split, subset
from hpsearch.errors import HpsearchError
from hpsearch.models import build_model
from hpsearch.optim import Schedule, build_optimizer, build_scheduler
from hpsearch.record import TrialRecord, worker_id
from hpsearch.spec import StudySpec, TrialConfig
from hpsearch.task import Task

# Batches between divergence checks: each check is one host sync, so the inner loop never waits
# on the device per batch, yet a blown-up run stops within its first epoch.
CHECK_EVERY = 16

# Device types where the members of a pack train as one batched model (``_Stacked``); elsewhere
# they train side by side (``_SideBySide``).
BATCHED_ON = {"cuda"}

# Evaluation batch size where ``[train] eval_batch_size`` is unset: on the CPU larger batches fall
# out of its caches and run slower per image (``benchmarks/speed.py``); a GPU wants wide batches.
EVAL_BATCH = {"cpu": 256, "cuda": 1024}

# progress(epoch, epochs, fraction of the epoch done, validation metric once the epoch is evaluated)
Progress = Callable[[int, int, float, float | None], None]


class Diverged(Exception):
    """The training data loss became non-finite or exceeded ``train.max_loss``."""


class OutOfTime(Exception):
    """The trial has trained for longer than ``train.max_minutes``."""


def trial_seed(study_seed: int, number: int) -> int:
    """Seed of trial ``number``: distinct per trial, reproducible from the study seed."""
    return (study_seed * 1_000_003 + number) % 2**31


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise HpsearchError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise HpsearchError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HpsearchError(f"device {device!r} asked for, but CUDA is not available here; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HpsearchError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev


# A trial's final validation metric (with costs: its values, ``StudySpec.objectives``), or how it
# ended otherwise.
Outcome = float | tuple[float, ...] | BaseException
OnEnd = Callable[[optuna.Trial, Outcome], None]


def run_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    device: torch.device,
    data_dir: str | None = None,
    progress: Progress | None = None,
    checkpoints: Checkpoints | None = None,
) -> float | tuple[float, ...]:
    """Train one sampled configuration and return its final validation metric (in a multi-objective
    study, its values: that metric, then its costs).

    Reports the validation metric after every epoch (step = epoch, from 1) and raises
    ``optuna.TrialPruned`` when the pruner says so, the loss diverges or ``train.max_minutes`` runs
    out. With ``checkpoints``, every epoch ends with a checkpoint, and a trial that continues a lost
    one (``checkpoint.continue_trial``) starts from the epoch after its chain's checkpoint; the
    checkpoint is deleted when the trial ends, unless a signal ended it. Whatever happens, the
    trial's record (config, per-epoch history, how it ended) is written once, as it ends.
    """
    shown = (lambda number: progress) if progress else None
    outcome = run_pack([trial], spec, device, data_dir, shown, checkpoints)[trial.number]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_pack(
    trials: list[optuna.Trial],
    spec: StudySpec,
    device: torch.device,
    data_dir: str | None = None,
    progress: Callable[[int], Progress | None] | None = None,
    checkpoints: Checkpoints | None = None,
    on_end: OnEnd | None = None,
) -> dict[int, Outcome]:
    """Run ``trials`` as ``run_trial`` runs one, training those that can share a pack at once.

    Trials share a pack when they train the same network on the same data in the same batches
    (``_Member.pack_key``): their models are stacked and trained as one batched model
    (``torch.func.vmap``), each with its own optimizer, scheduler and random streams, so each trains
    the numbers it would train alone (networks with dropout draw other masks). Each still reports,
    is pruned and ends on its own; a member that ends leaves the pack and the others train on. The
    others (LBFGS, ``train.compile``, a continuation resuming from its checkpoint) run alone, one
    pack after another. ``on_end(trial, outcome)`` is called as each trial ends; a signal ends every
    trial not yet ended and is raised again. Returns each trial's outcome by number.
    """
    backends.prepare(device)
    outcomes: dict[int, Outcome] = {}

    def end(m: _Member, exc: BaseException | None) -> None:
        with signals.held():
            outcomes[m.trial.number] = outcome = m.close(exc)
            if on_end:
                on_end(m.trial, outcome)

    # Every asked trial is a member before a signal can land: one held while they were asked is
    # raised on entering ``live`` and must end them all, not leave them running.
    waiting = [_Member(trial, spec, device, checkpoints) for trial in trials]
    try:
        with signals.live():  # a signal stops training at once
            for m in list(waiting):
                try:
                    m.setup(data_dir)
                except Exception as exc:
                    waiting.remove(m)
                    end(m, exc)
            packs: dict[Any, list[_Member]] = {}
            for m in waiting:
                packs.setdefault(m.pack_key(), []).append(m)
            for pack in packs.values():
                if len(pack) > 1:
                    for m in pack:
                        m.rec.pack = [other.trial.number for other in pack]
                shown = progress(pack[0].trial.number) if progress else None
                _train_pack(pack, shown, end)
                waiting = [m for m in waiting if m not in pack]
    except KeyboardInterrupt as exc:
        for m in waiting:
            if m.trial.number not in outcomes:
                end(m, exc)
        raise
    return outcomes


def _train_pack(
    pack: list[_Member], progress: Progress | None, end: Callable[[_Member, BaseException | None], None]
) -> None:
    """Train the members of one pack epoch by epoch, ending each as it finishes or stops."""
    first = pack[0]
    live = list(pack)
    try:
        for m in live:
            m.resume()
        epochs = first.cfg.train.epochs
        for epoch in range(first.epoch + 1, epochs + 1):
            if not live:
                return
            t0 = time.perf_counter()

            def on_check(done: float, e: int = epoch) -> None:
                if progress:
                    progress(e, epochs, done, None)

            train_epoch(live, first.data, first.spec.task, first.cfg.data, first.device, on_check)
            seconds = time.perf_counter() - t0
            for m in list(live):
                try:
                    m.end_epoch(epoch, seconds)
                except Exception as exc:
                    live.remove(m)
                    end(m, exc)
            if progress and live:
                progress(epoch, epochs, 1.0, live[0].value)
        for m in list(live):
            m.test()
            live.remove(m)
            end(m, None)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # from the pack's shared work: it ends every member still training
        for m in live:
            end(m, exc)


# What a member holds on the device besides what the rest of its pack may still train with (the
# data, its configuration): what ``build`` and ``setup`` made, then what ``train_epoch`` set. Let go
# of when it runs out of memory.
_HELD = (
    "model",
    "net",
    "params",
    "optimizer",
    "stepper",
    "state",
    "g",
    "loss_fn",
    "order",
    "total",
    "penalty_total",
    "worst",
)


class _Member:
    """One trial's training: set up as ``run_trial`` describes, trained alone or in a pack."""

    def __init__(
        self, trial: optuna.Trial, spec: StudySpec, device: torch.device, checkpoints: Checkpoints | None
    ) -> None:
        self._begin(device)
        self.trial, self.spec, self.checkpoints = trial, spec, checkpoints
        self.rec = TrialRecord(device=str(device), worker=worker_id(), threads=torch.get_num_threads())
        self.rec.claim(trial)
        self.chain, self.earlier_s, self.keep = chain_of(trial), 0.0, False
        self.value = math.nan
        self.state: dict[str, Any] | None = None
        self.built = False  # ``setup`` has run
        self.evaluating = False  # in a validation or test pass, whose batches are the evaluation's

    def _begin(self, device: torch.device) -> None:
        """What every member starts with, a trial's or a retraining's: its device, its clock, and the
        epoch in training (``train_epoch``): the member's order, its summed loss and penalty and its
        worst batch loss, on the device; then the means. And the loss it minimises."""
        self.start = time.perf_counter()
        self.device, self.epoch = device, 0
        self.stopped: BaseException | None = None  # set when the loss diverges or time runs out
        self.order = self.total = self.penalty_total = self.worst = torch.zeros(())
        self.loss = self.penalty = math.nan
        self.loss_fn: nn.Module

    def setup(self, data_dir: str | None) -> None:
        """Sample the configuration and build everything its training needs."""
        trial, spec, device = self.trial, self.spec, self.device
        self.cfg = cfg = spec.sample(trial)
        self.rec.config = cfg.as_dict()
        # The chain's first trial number, so that a continuation draws what its first trial drew.
        seed = cfg.train.seed if cfg.train.seed is not None else trial_seed(spec.seed, self.chain)
        self.rec.seed = seed
        data = load_dataset(cfg.data.name, data_dir, str(device))
        cfg.data.check_sizes(len(data.train_y), len(data.test_y))
        train_idx, self.val_idx = split(
            len(data.train_y), cfg.data.val_fraction, spec.seed, cfg.data.train_limit, str(device)
        )
        self.test_idx = subset(len(data.test_y), spec.seed, cfg.data.test_limit, str(device))
        self.build(
            cfg, spec.task, data, train_idx, seed, "max" if spec.task.direction == "maximize" else "min"
        )
        self.rec.n_params = sum(p.numel() for p in self.model.parameters())
        if self.checkpoints and record.CONTINUES in trial.user_attrs:
            state = self.checkpoints.load(self.chain)
            self.state = state if state is not None and state["params"] == trial.params else None
        self.built = True

    def build(
        self,
        cfg: TrialConfig,
        task: Task,
        data: Dataset,
        train_idx: torch.Tensor,
        seed: int,
        mode: Literal["max", "min"],
    ) -> None:
        """Everything ``train_epoch`` needs to train ``cfg`` on the examples ``train_idx`` of ``data``:
        network, optimizer, schedule (``mode``: "max" or "min", how a schedule that steps on a metric
        reads it) and random streams, all seeded by ``seed``."""
        device = self.device
        torch.manual_seed(seed)
        self.cfg, self.data, self.train_idx = cfg, data, train_idx
        self.slices = batch_slices(len(train_idx), cfg.data.batch_size)
        self.model = model = _build(cfg.model.name, cfg.model.kwargs, data, device)
        self.net: nn.Module = torch.compile(model) if cfg.train.compile else model  # type: ignore[assignment]
        self.params = [p for p in model.parameters() if p.requires_grad]  # what L1 penalises
        self.optimizer = build_optimizer(**cfg.optimizer.as_dict(), params=model.parameters())
        run = Schedule(cfg.train.epochs, len(self.slices), mode)
        self.stepper = build_scheduler(**cfg.scheduler.as_dict(), optimizer=self.optimizer, run=run)
        self.max_loss = cfg.train.max_loss or task.max_loss(data.num_outputs)
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.deadline = self.start + cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf

    def pack_key(self) -> Any:
        """Members with equal keys train in step, as one batched model."""
        alone = (
            self.state is not None  # resumes at its own epoch
            or self.cfg.train.compile
            or isinstance(self.optimizer, torch.optim.LBFGS)  # steps re-evaluate the loss
        )
        if alone:
            return ("alone", self.trial.number)
        cfg = self.cfg
        return (cfg.model.name, repr(sorted(cfg.model.kwargs.items())), cfg.data, cfg.train.epochs)

    def resume(self) -> None:
        """Start from the chain's checkpoint when this trial continues a lost one."""
        if self.state is None:
            return
        self.rec.restore(restore(self.state, self.model, self.optimizer, self.stepper, self.g))
        self.earlier_s, self.rec.resumed_epoch = self.rec.run_time_s, self.state["epoch"]
        self.epoch = self.state["epoch"]
        # The lost trial may have died between its checkpoint and its report.
        with signals.held():
            for done, v in enumerate(self.rec.val, start=1):
                self.report(v, done)
        self.value = self.rec.val[-1]

    def out_of_time(self, epoch: int) -> OutOfTime | None:
        if time.perf_counter() > self.deadline:
            return OutOfTime(f"time limit of {self.cfg.train.max_minutes:g} min reached in epoch {epoch}")
        return None

    def end_epoch(self, epoch: int, seconds: float) -> None:
        """Evaluate, record, checkpoint and report the epoch ``train_epoch`` trained; raise how the
        trial stops if it does."""
        self.epoch = epoch
        if self.stopped is not None:
            raise self.stopped
        cfg, trial, task = self.cfg, self.trial, self.spec.task
        speed = len(self.train_idx) / seconds  # training examples per second of training
        t0 = time.perf_counter()
        self.evaluating = True
        self.value = value = evaluate(
            self.net, self.data, task, self.data.train_x, self.data.train_y, self.val_idx, cfg, self.device
        )
        self.evaluating = False
        seconds += time.perf_counter() - t0
        self.rec.add_epoch(self.loss, self.penalty, value, seconds, speed)
        self.stepper.after_epoch(value)
        with signals.held():  # not half way through writing an epoch down
            if self.checkpoints and epoch < cfg.train.epochs:
                self.rec.run_time_s = self.earlier_s + time.perf_counter() - self.start
                snap = snapshot(
                    epoch, trial.params, self.model, self.optimizer, self.stepper, self.g, self.rec.history()
                )
                self.checkpoints.save(self.chain, snap)
            self.report(value, epoch)
        if not self.spec.objectives.multi and trial.should_prune():
            self.rec.stop(epoch, f"pruned at epoch {epoch}: validation {task.metric} {value:.4f}")
            raise optuna.TrialPruned(self.rec.stop_reason)
        late = self.out_of_time(epoch)
        if late is not None:
            raise late

    def report(self, value: float, epoch: int) -> None:
        """``trial.report`` the epoch's value for the pruner. A multi-objective study has no pruner,
        and Optuna takes no intermediate values there: its record keeps every epoch's."""
        if not self.spec.objectives.multi:
            _report(self.trial, value, epoch)

    def test(self) -> None:
        data = self.data
        self.evaluating = True
        self.rec.test = evaluate(
            self.net, data, self.spec.task, data.test_x, data.test_y, self.test_idx, self.cfg, self.device
        )
        self.rec.latency_ms = latency_ms(
            self.net, data, data.test_x[self.test_idx[:1]], self.cfg, self.device
        )
        self.evaluating = False

    def close(self, exc: BaseException | None) -> Outcome:
        """Write the trial's record as it ends and say how it ended: its value, or the exception
        (``optuna.TrialPruned`` for a diverged or late trial) that ``run_trial`` raises."""
        rec, epoch = self.rec, self.epoch
        outcome: Outcome
        if exc is None:
            values = self.spec.objectives.values(rec)
            outcome = tuple(values) if len(values) > 1 else values[0]
        elif isinstance(exc, Diverged):
            rec.stop(epoch, f"diverged in epoch {epoch}: {exc}")
            outcome = optuna.TrialPruned(rec.stop_reason)
        elif isinstance(exc, OutOfTime):
            rec.stop(epoch, str(exc))
            outcome = optuna.TrialPruned(rec.stop_reason)
        elif isinstance(exc, optuna.TrialPruned):
            outcome = exc
        elif isinstance(exc, KeyboardInterrupt):
            rec.fail_reason = (
                f"interrupted in epoch {epoch + 1}" if self.built else "interrupted while starting"
            )
            self.keep = True  # the continuation resumes from it
            outcome = exc
        elif isinstance(exc, torch.OutOfMemoryError):
            self._out_of_memory(exc)
            outcome = exc
        else:
            rec.fail_reason = failure(exc)
            outcome = exc
        rec.run_time_s = self.earlier_s + time.perf_counter() - self.start
        rec.save(self.trial, self.spec.task)
        if self.checkpoints and not self.keep:
            self.checkpoints.delete(self.chain)
        return outcome

    def _out_of_memory(self, exc: torch.OutOfMemoryError) -> None:
        """Record that the trial ran out of device memory, and at which training batch size, then let
        go of what it holds so that the next trial has that memory: its own tensors, and the failing
        frames' (the traceback keeps those frames, their batches and activations, alive)."""
        first = failure(exc).split(". ")[0]  # the rest of torch's message (bytes free, tips) varies
        if self.evaluating:  # a smaller training batch would not help: no ceiling for the sampler
            size = self.cfg.train.eval_batch_size or EVAL_BATCH[self.device.type]
            self.rec.fail_reason = (
                f"oom: out of memory evaluating at batch size {size} ({first}); lower [train] eval_batch_size"
            )
        elif self.built:
            self.rec.oom_batch_size = size = self.cfg.data.batch_size
            self.rec.fail_reason = f"oom: out of memory at batch size {size} ({first})"
        else:  # the data or the network did not fit: no batch had run
            self.rec.fail_reason = f"oom: out of memory while starting ({first})"
        exc.__traceback__ = None
        for name in _HELD:
            vars(self).pop(name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _report(trial: optuna.Trial, value: float, epoch: int) -> None:
    """``trial.report``. A continuation carries its lost trial's values over, and one that could not
    resume from a checkpoint trains those epochs again: Optuna keeps the value it has."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The reported value is ignored")
        trial.report(value, epoch)


def failure(exc: BaseException) -> str:
    """An exception as the one-line reason a trial failed: its type and its first words."""
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _build(name: str, kwargs: dict[str, Any], data: Dataset, device: torch.device) -> nn.Module:
    model = build_model(name, data.in_channels, data.num_outputs, **kwargs).to(device)
    if data.train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    return model


def _layout(x: torch.Tensor) -> torch.Tensor:
    """A batch of images in channels-last, the layout ``_build`` keeps the networks in: oneDNN's
    convolutions on the CPU and the tensor cores on a GPU are fastest in it."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    # bf16 keeps fp32's range, so no loss scaling is needed; the CPU path stays in fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_epoch(
    members: list[_Member],
    data: Dataset,
    task: Task,
    data_cfg: DataConfig,
    device: torch.device,
    on_check: Callable[[float], None] | None = None,
) -> None:
    """One pass of each member over its training indices in its own order, batch by batch in step.

    Each member's mean data loss and L1 penalty end in ``member.loss``/``member.penalty``. Every
    ``CHECK_EVERY`` batches each member's loss is checked for divergence and its time limit, and
    ``on_check`` is told the fraction of the epoch done: one host sync serves all. A member that
    diverges or runs out of time stops training here, ``member.stopped`` saying why.
    """
    live = [m for m in members if m.stopped is None]
    slices = members[0].slices
    for m in live:
        m.model.train()
        m.loss_fn = task.loss(label_smoothing=m.cfg.train.label_smoothing)
        m.order = m.train_idx[torch.randperm(len(m.train_idx), generator=m.g, device=device)]
        m.total = torch.zeros((), device=device)
        m.penalty_total = torch.zeros((), device=device)
        # torch.maximum propagates NaN, so one tensor tracks both blow-ups and non-finite losses.
        m.worst = torch.zeros((), device=device)
    together = _together(live, device)
    seen = 0
    try:
        for n, s in enumerate(slices, start=1):
            xs, ys = [], []
            for m in live:
                batch = m.order[s]
                x = data.inputs(
                    data.train_x[batch], data_cfg.resize, data_cfg.flip, m.g, data_cfg.crop_padding
                )
                xs.append(x if isinstance(together, _Stacked) else _layout(x))
                ys.append(data.train_y[batch])
            losses = together.step(xs, ys, device)
            size = len(ys[0])
            seen += size
            for m, (loss, penalty) in zip(live, losses, strict=True):
                m.total += loss * size
                if penalty is not None:
                    m.penalty_total += penalty * size
                m.worst = torch.maximum(m.worst, loss)
                m.stepper.after_batch()
            within = n % CHECK_EVERY == 0  # the epoch's end is checked for time after its evaluation
            if within or n == len(slices):
                for m in live:
                    m.stopped = _diverged(float(m.worst), m.max_loss, n) or (
                        m.out_of_time(m.epoch + 1) if within else None
                    )
                if on_check and within:
                    on_check(n / len(slices))
                if any(m.stopped for m in live):
                    together.close()
                    live = [m for m in live if m.stopped is None]
                    if not live:
                        break
                    together = _together(live, device)
    finally:  # also when a step raises: a side-by-side pack gives its threads back
        together.close()
    for m in members:
        m.loss, m.penalty = float(m.total) / seen, float(m.penalty_total) / seen


def _diverged(worst: float, max_loss: float, n_batches: int) -> Diverged | None:
    if not math.isfinite(worst) or worst > max_loss:
        return Diverged(f"training loss reached {worst:.4g} (limit {max_loss:.4g}) by batch {n_batches}")
    return None


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: list[nn.Parameter],
    l1: float,
    device: torch.device,
    clip_grad_norm: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on a batch: the batch's data loss and, with ``l1``, its L1 penalty term
    (neither synced). With ``clip_grad_norm``, the gradient of ``params`` (penalty included) is
    scaled down to that norm where it is longer, before the optimizer sees it."""
    first: list[torch.Tensor | None] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn(model(x), y).float()
        penalty = _l1(params, l1)
        if not first:  # LBFGS calls this several times; the first call is the loss before the step
            first[:] = [loss.detach(), None if penalty is None else penalty.detach()]
        objective = loss if penalty is None else loss + penalty
        objective.backward()
        if clip_grad_norm:  # in the closure: LBFGS steps on the gradients of each of its calls
            nn.utils.clip_grad_norm_(params, clip_grad_norm)
        return objective

    # Every torch optimizer accepts a closure; LBFGS needs one to re-evaluate the loss.
    optimizer.step(closure)  # type: ignore[arg-type]
    loss, penalty = first
    assert loss is not None
    return loss, penalty


def _member_step(
    m: _Member, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_step`` of one member: its network, optimizer and loss, its L1 penalty and clipping."""
    train = m.cfg.train
    return _step(m.net, m.optimizer, m.loss_fn, x, y, m.params, train.l1, device, train.clip_grad_norm)


def _l1(params: list[nn.Parameter], l1: float) -> torch.Tensor | None:
    return l1 * torch.stack([p.abs().sum() for p in params]).sum() if l1 else None


def _together(members: list[_Member], device: torch.device) -> _Alone | _Stacked | _SideBySide:
    """How the live members of a pack take their steps: one alone as always; several as one batched
    model on a GPU; side by side on the CPU cores, where grouped convolutions (what ``vmap`` makes of
    a batch of convolutions) are slower than separate ones (``benchmarks/speed.py`` measures both)."""
    if len(members) == 1:
        return _Alone(members[0])
    if device.type in BATCHED_ON:
        return _Stacked(members)
    return _SideBySide(members)


class _Alone:
    """One member's steps: exactly a trial trained by itself."""

    def __init__(self, member: _Member) -> None:
        self.m = member

    def step(
        self, xs: list[torch.Tensor], ys: list[torch.Tensor], device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [_member_step(self.m, xs[0], ys[0], device)]

    def close(self) -> None:
        pass


class _SideBySide:
    """The members' own steps run at once, one thread per core, each step on one core's share of
    torch's threads (torch's kernels let go of Python's lock while they compute)."""

    def __init__(self, members: list[_Member]) -> None:
        self.members = members
        cores = torch.get_num_threads()
        lanes = min(len(members), cores)
        self.pool = ThreadPoolExecutor(lanes, thread_name_prefix="pack")
        self.threads = cores
        torch.set_num_threads(max(1, cores // lanes))

    def step(
        self, xs: list[torch.Tensor], ys: list[torch.Tensor], device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        def one(k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            return _member_step(self.members[k], xs[k], ys[k], device)

        return list(self.pool.map(one, range(len(self.members))))

    def close(self) -> None:
        self.pool.shutdown()
        torch.set_num_threads(self.threads)


class _Stacked:
    """The members of a pack as one batched model: their parameters stacked along a new first
    dimension at every step (so each member's optimizer keeps stepping its own parameters) and the
    network applied to each member's batch with ``torch.func.vmap``."""

    def __init__(self, members: list[_Member]) -> None:
        self.members = members
        self.base = copy.deepcopy(members[0].model).to("meta")
        self.names = [name for name, p in members[0].model.named_parameters() if p.requires_grad]
        self.buffer_names = [name for name, _ in members[0].model.named_buffers()]
        # Each member's own tensors, stepped in place by its optimizer: stacked afresh every step.
        self.own = [dict(m.model.named_parameters()) for m in members]
        self.own_buffers = [dict(m.model.named_buffers()) for m in members]

        def output(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
            return functional_call(self.base, (params, buffers), (x,))

        shared = members[0].loss_fn

        def loss_of(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            x: torch.Tensor,
            y: torch.Tensor,
        ) -> torch.Tensor:
            return shared(output(params, buffers, x), y).float()

        # Members that minimise one loss (the same label smoothing) have it applied inside the one
        # batched call; otherwise the batched network's outputs go to each member's own loss.
        one_loss = len({m.cfg.train.label_smoothing for m in members}) == 1
        self.losses = vmap(loss_of, randomness="different") if one_loss else None
        self.outputs = vmap(output, randomness="different")

    def _losses(
        self,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Each member's loss on its own batch, the network applied to all of them at once."""
        x, y = torch.stack(xs), torch.stack(ys)
        if self.losses is not None:
            return self.losses(params, buffers, x, y)
        out = self.outputs(params, buffers, x)
        return torch.stack([m.loss_fn(out[k], y[k]).float() for k, m in enumerate(self.members)])

    def step(
        self, xs: list[torch.Tensor], ys: list[torch.Tensor], device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        members = self.members
        own, own_buffers = self.own, self.own_buffers
        params = {n: torch.stack([p[n] for p in own]) for n in self.names}
        buffers = {n: torch.stack([b[n] for b in own_buffers]) for n in self.buffer_names}
        for m in members:
            m.optimizer.zero_grad(set_to_none=True)
        self.base.train()
        with _autocast(device):
            losses = self._losses(xs, ys, params, buffers)
        penalties = [_l1(m.params, m.cfg.train.l1) for m in members]
        objective = losses.sum() + sum(p for p in penalties if p is not None)
        objective.backward()
        with torch.no_grad():
            for n in self.buffer_names:  # batch norm's running statistics, updated in the stacked copy
                for k, b in enumerate(own_buffers):
                    b[n].copy_(buffers[n][k])
        for m in members:
            if m.cfg.train.clip_grad_norm:  # each member's own gradient, on its own parameters
                nn.utils.clip_grad_norm_(m.params, m.cfg.train.clip_grad_norm)
            m.optimizer.step()
        detached = losses.detach()
        return [(detached[k], None if p is None else p.detach()) for k, p in enumerate(penalties)]

    def close(self) -> None:
        pass


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Dataset,
    task: Task,
    xs: torch.Tensor,
    ys: torch.Tensor,
    idx: torch.Tensor,
    cfg: TrialConfig,
    device: torch.device,
) -> float:
    """The task's metric (accuracy, mean squared error) over ``xs[idx]``."""
    model.eval()
    bs = cfg.train.eval_batch_size or EVAL_BATCH[device.type]
    score = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(0, len(idx), bs):
        batch = idx[i : i + bs]
        with _autocast(device):
            out = model(_layout(data.inputs(xs[batch], cfg.data.resize))).float()
        score += task.score(out, ys[batch])
    return float(score) / len(idx)


# Forward passes timed for ``latency_ms``, after as many untimed ones to warm caches and kernels.
LATENCY_RUNS = 10


@torch.inference_mode()
def latency_ms(
    model: nn.Module, data: Dataset, x: torch.Tensor, cfg: TrialConfig, device: torch.device
) -> float:
    """Milliseconds to classify one example ``x`` (a batch of one, prepared as in evaluation) on
    ``device``, as a deployed model answers a request: the median of ``LATENCY_RUNS`` timed passes."""
    model.eval()
    times = []
    for run in range(2 * LATENCY_RUNS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with _autocast(device):
            model(_layout(data.inputs(x, cfg.data.resize)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if run >= LATENCY_RUNS:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


# Retraining one configuration outside a study (``hpsearch verify``): the trial's own building and
# epoch loop, on the training examples it is given, with no validation split and no record.


@dataclass(frozen=True)
class Retrained:
    """A configuration ``retrain`` trained: its test metric, its network, and how the training went."""

    test: float  # the task's metric on the test examples
    model: nn.Module
    examples: int  # training examples per epoch
    train_loss: list[float]  # mean data loss of each epoch trained to the end
    seconds: float
    stopped: str | None = None  # why training stopped early (diverged, out of time); None if it did not


def retrain(
    cfg: TrialConfig,
    task: Task,
    data: Dataset,
    train_idx: torch.Tensor,
    test_idx: torch.Tensor,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
) -> Retrained:
    """Train ``cfg`` from fresh weights on the training examples ``train_idx`` of ``data`` for its
    epochs, and test it on the test examples ``test_idx``.

    The network, optimizer and schedule are built as a trial builds them, every random stream seeded
    by ``seed``, and trained by the trial's epoch loop (``train_epoch``). There is no validation
    split: a schedule that steps on the validation metric steps on the epoch's training loss, and
    nothing is reported, pruned, checkpointed or recorded. A run that diverges or passes
    ``train.max_minutes`` stops there and is tested as it is, ``stopped`` saying why.
    """
    backends.prepare(device)
    start = time.perf_counter()
    run = _Retraining(cfg, task, data, train_idx, seed, device)
    epochs, losses = cfg.train.epochs, list[float]()
    for epoch in range(1, epochs + 1):

        def on_check(done: float, e: int = epoch) -> None:
            if progress:
                progress(e, epochs, done, None)

        train_epoch([run], data, task, cfg.data, device, on_check)
        if run.stopped is None and epoch < epochs:
            run.stopped = run.out_of_time(epoch)
        if run.stopped is not None:
            break
        run.epoch = epoch
        losses.append(run.loss)
        run.stepper.after_epoch(run.loss)
        if progress:
            progress(epoch, epochs, 1.0, None)
    test = evaluate(run.net, data, task, data.test_x, data.test_y, test_idx, cfg, device)
    stopped = None if run.stopped is None else str(run.stopped)
    return Retrained(test, run.model, len(train_idx), losses, time.perf_counter() - start, stopped)


class _Retraining(_Member):
    """What ``train_epoch`` keeps of a member, built as ``_Member.setup`` builds a trial's, but from a
    given configuration, seed and training indices: no trial, no split, no record."""

    def __init__(
        self,
        cfg: TrialConfig,
        task: Task,
        data: Dataset,
        train_idx: torch.Tensor,
        seed: int,
        device: torch.device,
    ) -> None:
        self._begin(device)
        # "min": with no validation metric, a schedule that steps on one steps on the training loss.
        self.build(cfg, task, data, train_idx, seed, "min")
