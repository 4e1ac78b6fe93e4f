"""Optimizers and learning-rate schedulers by name, and when each scheduler steps."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import lr_scheduler

from hpsearch.registry import NoFacts, Registry

# Keyword arguments of torch's optimizers that are implementation switches, not hyperparameters.
_NOT_SEARCHED = frozenset({"foreach", "fused", "differentiable", "capturable", "maximize"})
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer], NoFacts] = Registry(
    "optimizer", fixed=("params",), hidden=_NOT_SEARCHED
)
for _name, _cls in {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "lbfgs": torch.optim.LBFGS,
}.items():
    OPTIMIZERS.register(_cls, name=_name)


def build_optimizer(name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer ``name`` over ``params``; ``betas`` may be given as a list."""
    # torch takes a rate of 0, which trains nothing and reports the initial net as a result.
    if "lr" in kwargs and not kwargs["lr"] > 0:
        raise ValueError(f"Invalid learning rate: {kwargs['lr']}; it must be positive")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    cls = OPTIMIZERS[name]
    if isinstance(cls, type) and issubclass(cls, torch.optim.LBFGS):
        # LBFGS steps a flat view of every parameter, which a channels-last weight cannot give:
        # its network keeps the plain layout (a batch in channels-last still passes through it).
        params = list(params)
        for p in params:
            if isinstance(p, torch.Tensor):
                p.data = p.data.contiguous()
    return cls(params, **kwargs)


@dataclass(frozen=True)
class Schedule:
    """What a scheduler builder knows of the run it schedules."""

    epochs: int
    steps_per_epoch: int
    mode: Literal["min", "max"]  # "max" when the validation metric is an accuracy, "min" for a loss


class Steps(enum.Enum):
    """When a scheduler steps."""

    BATCH = "after every batch"
    EPOCH = "after every epoch"
    METRIC = "after every epoch, on the validation metric"


@dataclass(frozen=True)
class SchedulerFacts:
    steps: Steps = Steps.EPOCH


Scheduler = lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau
SCHEDULERS: Registry[Callable[..., Scheduler | None], SchedulerFacts] = Registry(
    "scheduler", SchedulerFacts, fixed=("optimizer", "run")
)


@dataclass(frozen=True)
class Stepper:
    """A built scheduler and when it steps: the training loop calls both hooks and decides nothing."""

    scheduler: Scheduler | None
    steps: Steps

    def after_batch(self) -> None:
        if self.scheduler is not None and self.steps is Steps.BATCH:
            self.scheduler.step()

    def after_epoch(self, metric: float) -> None:
        if self.scheduler is None:
            return
        if self.steps is Steps.METRIC:
            self.scheduler.step(metric)  # type: ignore[arg-type]
        elif self.steps is Steps.EPOCH:
            self.scheduler.step()


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, run: Schedule, **kwargs: Any) -> Stepper:
    """Scheduler ``name`` for ``optimizer`` over ``run``, with when it steps.

    ``run.steps_per_epoch`` must be the number of batches the loop really runs
    (``len(datasets.batch_slices(...))``): a per-batch schedule is sized from it.
    """
    return Stepper(SCHEDULERS[name](optimizer, run, **kwargs), SCHEDULERS.facts(name).steps)


def _positive(key: str, value: int | None) -> None:
    # torch accepts 0 (or less) here and then divides by it, or never moves the rate.
    if value is not None and value < 1:
        raise ValueError(f"{key} must be at least 1, not {value}")


def _factor(key: str, value: float) -> None:
    # torch takes any gamma: 0 stops training, a negative one turns descent into ascent.
    if not value > 0:
        raise ValueError(f"{key} must be positive, not {value}")


def _not_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{key} must be 0 or more, not {value}")


@SCHEDULERS.register
def none(optimizer: torch.optim.Optimizer, run: Schedule) -> None:
    """Constant learning rate."""
    return None


@SCHEDULERS.register
def step(
    optimizer: torch.optim.Optimizer, run: Schedule, step_size: int = 4, gamma: float = 0.5
) -> Scheduler:
    """Multiply the rate by gamma every step_size epochs (StepLR; seed 003's 4 and 0.5)."""
    _positive("step_size", step_size)
    _factor("gamma", gamma)
    return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


@SCHEDULERS.register
def multistep(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    milestones: list[int] | None = None,
    gamma: float = 0.5,
) -> Scheduler:
    """Multiply the rate by gamma at each milestone epoch (default: at 1/2 and 3/4 of the run)."""
    for mark in milestones or ():
        _positive("each milestone", mark)
    _factor("gamma", gamma)
    marks = milestones or [max(1, run.epochs // 2), max(1, 3 * run.epochs // 4)]
    return lr_scheduler.MultiStepLR(optimizer, milestones=sorted(set(marks)), gamma=gamma)


@SCHEDULERS.register
def exponential(optimizer: torch.optim.Optimizer, run: Schedule, gamma: float = 0.9) -> Scheduler:
    """Multiply the rate by gamma every epoch (ExponentialLR)."""
    _factor("gamma", gamma)
    return lr_scheduler.ExponentialLR(optimizer, gamma=gamma)


@SCHEDULERS.register
def cosine(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    T_max: int | None = None,  # torch's own argument name
    eta_min: float = 0.0,
) -> Scheduler:
    """Cosine annealing to eta_min over T_max epochs (default: the whole run)."""
    _positive("T_max", T_max)
    _not_negative("eta_min", eta_min)
    return lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=run.epochs if T_max is None else T_max, eta_min=eta_min
    )


@SCHEDULERS.register(steps=Steps.METRIC)
def plateau(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    factor: float = 0.1,
    patience: int = 2,
    threshold: float = 1e-4,
    min_lr: float = 0.0,
) -> Scheduler:
    """Cut the rate by factor when the validation metric stalls for patience epochs."""
    _not_negative("patience", patience)
    _not_negative("min_lr", min_lr)
    return lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode=run.mode,
        factor=factor,
        patience=patience,
        threshold=threshold,
        min_lr=min_lr,
    )


@SCHEDULERS.register(steps=Steps.BATCH)
def onecycle(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    max_lr: float | None = None,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    cycle_momentum: bool = True,
) -> Scheduler:
    """One-cycle policy stepped every batch; max_lr defaults to the optimizer's lr."""
    if max_lr is not None and not max_lr > 0:
        raise ValueError(f"max_lr must be positive, not {max_lr}")
    peak = optimizer.param_groups[0]["lr"] if max_lr is None else max_lr
    # Momentum is cycled against the rate only where the optimizer has one (not Adagrad, LBFGS).
    group = optimizer.param_groups[0]
    cycle = cycle_momentum and ("betas" in group or group.get("momentum", 0) > 0)
    return lr_scheduler.OneCycleLR(
        optimizer,
        cycle_momentum=cycle,
        max_lr=peak,
        epochs=run.epochs,
        steps_per_epoch=run.steps_per_epoch,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


@SCHEDULERS.register
def warmup(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    warmup_epochs: int = 2,
    start_factor: float = 0.1,
) -> Scheduler:
    """Linear warm-up from start_factor·lr to lr over warmup_epochs, then constant."""
    _positive("warmup_epochs", warmup_epochs)
    return lr_scheduler.LinearLR(
        optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_epochs
    )


@SCHEDULERS.register
def polynomial(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    power: float = 1.0,
    total_iters: int | None = None,
) -> Scheduler:
    """Polynomial decay to zero over total_iters epochs (default: the whole run)."""
    _positive("total_iters", total_iters)
    _not_negative("power", power)
    return lr_scheduler.PolynomialLR(
        optimizer, total_iters=run.epochs if total_iters is None else total_iters, power=power
    )
