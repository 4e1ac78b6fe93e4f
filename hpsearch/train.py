"""The trial: sample → build → loop over epochs (train, evaluate, report, prune) → test → record."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import optuna
import torch
from torch import nn

from hpsearch import record, signals
from hpsearch.checkpoint import Checkpoints, chain_of, restore, snapshot
from hpsearch.datasets import DataConfig, Dataset, batch_slices, load_dataset, split, subset
from hpsearch.errors import HpsearchError
from hpsearch.models import build_model
from hpsearch.optim import Schedule, Stepper, build_optimizer, build_scheduler
from hpsearch.record import TrialRecord, worker_id
from hpsearch.spec import StudySpec, TrialConfig
from hpsearch.task import Task

# Batches between divergence checks: each check is one host sync, so the inner loop never waits
# on the device per batch, yet a blown-up run stops within its first epoch.
CHECK_EVERY = 16

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


def run_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    device: torch.device,
    data_dir: str | None = None,
    progress: Progress | None = None,
    checkpoints: Checkpoints | None = None,
) -> float:
    """Train one sampled configuration and return its final validation metric.

    Reports the validation metric after every epoch (step = epoch, from 1) and raises
    ``optuna.TrialPruned`` when the pruner says so, the loss diverges or ``train.max_minutes`` runs
    out. With ``checkpoints``, every epoch ends with a checkpoint, and a trial that continues a lost
    one (``checkpoint.continue_trial``) starts from the epoch after its chain's checkpoint; the
    checkpoint is deleted when the trial ends, unless a signal ended it. Whatever happens, the
    trial's record (config, per-epoch history, how it ended) is written once, as it ends.
    """
    start, task = time.perf_counter(), spec.task
    rec = TrialRecord(device=str(device), worker=worker_id(), threads=torch.get_num_threads())
    rec.claim(trial)
    chain, earlier_s, epoch, keep = chain_of(trial), 0.0, 0, False
    try:
        with signals.live():  # a signal stops training at once
            cfg = spec.sample(trial)
            rec.config = cfg.as_dict()
            # The chain's first trial number, so that a continuation draws what its first trial drew.
            seed = cfg.train.seed if cfg.train.seed is not None else trial_seed(spec.seed, chain)
            rec.seed = seed
            torch.manual_seed(seed)
            data = load_dataset(cfg.data.name, data_dir, str(device))
            cfg.data.check_sizes(len(data.train_y), len(data.test_y))
            train_idx, val_idx = split(
                len(data.train_y), cfg.data.val_fraction, spec.seed, cfg.data.train_limit, str(device)
            )
            test_idx = subset(len(data.test_y), spec.seed, cfg.data.test_limit, str(device))
            slices = batch_slices(len(train_idx), cfg.data.batch_size)
            model = _build(cfg.model.name, cfg.model.kwargs, data, device)
            rec.n_params = sum(p.numel() for p in model.parameters())
            optimizer = build_optimizer(**cfg.optimizer.as_dict(), params=model.parameters())
            run = Schedule(cfg.train.epochs, len(slices), "max" if task.direction == "maximize" else "min")
            stepper = build_scheduler(**cfg.scheduler.as_dict(), optimizer=optimizer, run=run)
            max_loss = cfg.train.max_loss or task.max_loss(data.num_outputs)
            g = torch.Generator(device=device).manual_seed(seed)
            deadline = start + cfg.train.max_minutes * 60 if cfg.train.max_minutes else math.inf
            value = math.nan
            state = checkpoints.load(chain) if checkpoints and record.CONTINUES in trial.user_attrs else None
            if state is not None and state["params"] == trial.params:
                rec.restore(restore(state, model, optimizer, stepper, g))
                earlier_s, rec.resumed_epoch = rec.run_time_s, state["epoch"]
                # The lost trial may have died between its checkpoint and its report.
                with signals.held():
                    for done, v in enumerate(rec.val, start=1):
                        _report(trial, v, done)
                value = rec.val[-1]
            for epoch in range(len(rec.val) + 1, cfg.train.epochs + 1):
                t0 = time.perf_counter()

                def in_time(e: int = epoch) -> None:
                    if time.perf_counter() > deadline:
                        raise OutOfTime(f"time limit of {cfg.train.max_minutes:g} min reached in epoch {e}")

                def on_check(done: float, e: int = epoch) -> None:
                    in_time(e)
                    if progress:
                        progress(e, cfg.train.epochs, done, None)

                loss, penalty = train_epoch(
                    model,
                    data,
                    task,
                    train_idx,
                    slices,
                    cfg.data,
                    cfg.train.l1,
                    optimizer,
                    stepper,
                    g,
                    device,
                    max_loss,
                    on_check,
                )
                speed = len(train_idx) / (time.perf_counter() - t0)
                value = evaluate(model, data, task, data.train_x, data.train_y, val_idx, cfg, device)
                rec.add_epoch(loss, penalty, value, time.perf_counter() - t0, speed)
                stepper.after_epoch(value)
                with signals.held():  # but not half way through writing an epoch down
                    if checkpoints and epoch < cfg.train.epochs:
                        rec.run_time_s = earlier_s + time.perf_counter() - start
                        snap = snapshot(epoch, trial.params, model, optimizer, stepper, g, rec.history())
                        checkpoints.save(chain, snap)
                    _report(trial, value, epoch)
                if progress:
                    progress(epoch, cfg.train.epochs, 1.0, value)
                if trial.should_prune():
                    rec.stop(epoch, f"pruned at epoch {epoch}: validation {task.metric} {value:.4f}")
                    raise optuna.TrialPruned(rec.stop_reason)
                in_time()
            rec.test = evaluate(model, data, task, data.test_x, data.test_y, test_idx, cfg, device)
            return value
    except Diverged as exc:
        rec.stop(epoch, f"diverged in epoch {epoch}: {exc}")
        raise optuna.TrialPruned(rec.stop_reason) from None
    except OutOfTime as exc:
        rec.stop(epoch, str(exc))
        raise optuna.TrialPruned(rec.stop_reason) from None
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        rec.fail_reason = f"interrupted in epoch {epoch}" if epoch else "interrupted while starting"
        keep = True  # the continuation resumes from it
        raise
    except Exception as exc:
        rec.fail_reason = failure(exc)
        raise
    finally:
        rec.run_time_s = earlier_s + time.perf_counter() - start
        rec.save(trial, task)
        if checkpoints and not keep:
            checkpoints.delete(chain)


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
    if device.type == "cuda" and data.train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    # bf16 keeps fp32's range, so no loss scaling is needed; the CPU path stays in fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_epoch(
    model: nn.Module,
    data: Dataset,
    task: Task,
    idx: torch.Tensor,
    slices: list[slice],
    data_cfg: DataConfig,
    l1: float,
    optimizer: torch.optim.Optimizer,
    stepper: Stepper,
    g: torch.Generator,
    device: torch.device,
    max_loss: float,
    on_check: Callable[[float], None] | None = None,
) -> tuple[float, float]:
    """One pass over ``idx`` in the batches ``slices``: the mean data loss and mean L1 penalty.

    Every ``CHECK_EVERY`` batches the data loss is checked for divergence and ``on_check`` is told
    the fraction of the epoch done: the one host sync serves both.
    """
    model.train()
    loss_fn = task.loss()
    params = [p for p in model.parameters() if p.requires_grad]
    order = idx[torch.randperm(len(idx), generator=g, device=device)]
    total = torch.zeros((), device=device)
    penalty_total = torch.zeros((), device=device)
    # torch.maximum propagates NaN, so one tensor tracks both blow-ups and non-finite losses.
    worst = torch.zeros((), device=device)
    channels_last = device.type == "cuda" and data.train_x.dim() == 4
    seen = 0
    for n, s in enumerate(slices, start=1):
        batch = order[s]
        x = data.inputs(data.train_x[batch], data_cfg.resize, data_cfg.flip, g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, penalty = _step(model, optimizer, loss_fn, x, data.train_y[batch], l1, params, device)
        total += loss * len(batch)
        if penalty is not None:
            penalty_total += penalty * len(batch)
        seen += len(batch)
        worst = torch.maximum(worst, loss)
        stepper.after_batch()
        if n % CHECK_EVERY == 0:
            _check(float(worst), max_loss, n)
            if on_check:
                on_check(n / len(slices))
    _check(float(worst), max_loss, len(slices))
    return float(total) / seen, float(penalty_total) / seen


def _check(worst: float, max_loss: float, n_batches: int) -> None:
    if not math.isfinite(worst) or worst > max_loss:
        raise Diverged(f"training loss reached {worst:.4g} (limit {max_loss:.4g}) by batch {n_batches}")


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    l1: float,
    params: list[nn.Parameter],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on a batch: the batch's data loss and, with ``l1``, its L1 penalty term
    (neither synced)."""
    first: list[torch.Tensor | None] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn(model(x), y).float()
        penalty = l1 * torch.stack([p.abs().sum() for p in params]).sum() if l1 else None
        if not first:  # LBFGS calls this several times; the first call is the loss before the step
            first[:] = [loss.detach(), None if penalty is None else penalty.detach()]
        objective = loss if penalty is None else loss + penalty
        objective.backward()
        return objective

    # Every torch optimizer accepts a closure; LBFGS needs one to re-evaluate the loss.
    optimizer.step(closure)  # type: ignore[arg-type]
    loss, penalty = first
    assert loss is not None
    return loss, penalty


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
    bs = cfg.train.eval_batch_size
    score = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(0, len(idx), bs):
        batch = idx[i : i + bs]
        with _autocast(device):
            out = model(data.inputs(xs[batch], cfg.data.resize)).float()
        score += task.score(out, ys[batch])
    return float(score) / len(idx)
