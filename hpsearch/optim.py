"""Optimizers and learning-rate schedulers by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import lr_scheduler

from hpsearch.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer", fixed=("params",))
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
    OPTIMIZERS.add(_name, _cls)

# Keyword arguments of torch's optimizers that are implementation switches, not hyperparameters.
_NOT_SEARCHED = {"foreach", "fused", "differentiable", "capturable", "maximize"}


def optimizer_params(name: str) -> set[str]:
    """Hyperparameters a study file may set for optimizer ``name``."""
    return set(OPTIMIZERS.params(name)) - _NOT_SEARCHED


def build_optimizer(name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer ``name`` over ``params``; ``betas`` may be given as a list."""
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return OPTIMIZERS[name](params, **kwargs)


@dataclass(frozen=True)
class Schedule:
    """What a scheduler builder knows of the run it schedules."""

    epochs: int
    steps_per_epoch: int
    mode: Literal["min", "max"]  # "max" when the validation metric is an accuracy, "min" for a loss


Scheduler = lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau
SCHEDULERS: Registry[Callable[..., Scheduler | None]] = Registry("scheduler", fixed=("optimizer", "run"))


def build_scheduler(
    name: str, optimizer: torch.optim.Optimizer, run: Schedule, **kwargs: Any
) -> Scheduler | None:
    """Scheduler ``name`` for ``optimizer``. ``onecycle`` steps per batch, ``plateau`` on the
    validation metric, the rest once per epoch (see ``steps_per_batch``)."""
    return SCHEDULERS[name](optimizer, run, **kwargs)


def steps_per_batch(scheduler: Scheduler | None) -> bool:
    return isinstance(scheduler, lr_scheduler.OneCycleLR)


@SCHEDULERS.register
def none(optimizer: torch.optim.Optimizer, run: Schedule) -> None:
    """Constant learning rate."""
    return None


@SCHEDULERS.register
def step(
    optimizer: torch.optim.Optimizer, run: Schedule, step_size: int = 4, gamma: float = 0.5
) -> Scheduler:
    """Multiply the rate by gamma every step_size epochs (StepLR; seed 003's 4 and 0.5)."""
    return lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


@SCHEDULERS.register
def multistep(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    milestones: list[int] | None = None,
    gamma: float = 0.5,
) -> Scheduler:
    """Multiply the rate by gamma at each milestone epoch (default: at 1/2 and 3/4 of the run)."""
    marks = milestones or [max(1, run.epochs // 2), max(1, 3 * run.epochs // 4)]
    return lr_scheduler.MultiStepLR(optimizer, milestones=sorted(set(marks)), gamma=gamma)


@SCHEDULERS.register
def exponential(optimizer: torch.optim.Optimizer, run: Schedule, gamma: float = 0.9) -> Scheduler:
    """Multiply the rate by gamma every epoch (ExponentialLR)."""
    return lr_scheduler.ExponentialLR(optimizer, gamma=gamma)


@SCHEDULERS.register
def cosine(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    T_max: int | None = None,  # torch's own argument name
    eta_min: float = 0.0,
) -> Scheduler:
    """Cosine annealing to eta_min over T_max epochs (default: the whole run)."""
    return lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_max or run.epochs, eta_min=eta_min)


@SCHEDULERS.register
def plateau(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    factor: float = 0.1,
    patience: int = 2,
    threshold: float = 1e-4,
    min_lr: float = 0.0,
) -> Scheduler:
    """Cut the rate by factor when the validation metric stalls for patience epochs."""
    return lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=run.mode, factor=factor, patience=patience, threshold=threshold,
        min_lr=min_lr,
    )  # fmt: skip


@SCHEDULERS.register
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
    peak = max_lr or optimizer.param_groups[0]["lr"]
    # Momentum is cycled against the rate only where the optimizer has one (not Adagrad, LBFGS).
    group = optimizer.param_groups[0]
    cycle = cycle_momentum and ("betas" in group or group.get("momentum", 0) > 0)
    return lr_scheduler.OneCycleLR(
        optimizer,
        cycle_momentum=cycle, max_lr=peak, epochs=run.epochs, steps_per_epoch=run.steps_per_epoch,
        pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor,
    )  # fmt: skip


@SCHEDULERS.register
def warmup(
    optimizer: torch.optim.Optimizer,
    run: Schedule,
    warmup_epochs: int = 2,
    start_factor: float = 0.1,
) -> Scheduler:
    """Linear warm-up from start_factor·lr to lr over warmup_epochs, then constant."""
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
    return lr_scheduler.PolynomialLR(optimizer, total_iters=total_iters or run.epochs, power=power)
