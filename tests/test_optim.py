"""Every registered optimizer trains a tiny model; every scheduler moves the rate as documented.

The schedules are driven through ``Stepper.after_batch()`` and ``Stepper.after_epoch(metric)``,
the two hooks the training loop calls for every scheduler alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from hpsearch.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    Schedule,
    Stepper,
    Steps,
    build_optimizer,
    build_scheduler,
)
from hpsearch.registry import UnknownName

# A learning rate per optimizer that makes ten steps on the problem below reliably useful.
LRS = {"sgd": 0.1, "adagrad": 0.1, "adadelta": 1.0, "rmsprop": 0.01, "lbfgs": 0.5}
DEFAULT_LR = 0.05
RUN = Schedule(epochs=6, steps_per_epoch=5, mode="max")
BASE_LR = 0.1


def problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g) + 0.5
    torch.manual_seed(0)
    return nn.Linear(4, 2), x, y


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_reduces_the_loss(name: str) -> None:
    model, x, y = problem()
    opt = build_optimizer(name, model.parameters(), lr=LRS.get(name, DEFAULT_LR))
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        start = nn.functional.mse_loss(model(x), y).item()
    for _ in range(10):
        # The training loop passes a closure to every optimizer and uses the loss it returns.
        loss = opt.step(closure)  # type: ignore[arg-type]
        assert isinstance(loss, torch.Tensor) and math.isfinite(loss.item())
    with torch.no_grad():
        end = nn.functional.mse_loss(model(x), y).item()
    assert end < 0.97 * start, (name, start, end)
    for old, new in zip(before, model.parameters(), strict=True):
        assert not torch.equal(old, new), name


def test_betas_may_come_as_a_list() -> None:
    # TOML has no tuples: a study file gives betas as an array.
    opt = build_optimizer("adam", nn.Linear(2, 1).parameters(), lr=0.01, betas=[0.8, 0.99])
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)


HIDDEN = {"foreach", "fused", "differentiable", "capturable", "maximize"}


def test_optimizer_params() -> None:
    sgd = set(OPTIMIZERS.params("sgd"))
    assert {"lr", "momentum", "weight_decay", "nesterov", "dampening"} <= sgd
    assert not sgd & (HIDDEN | {"params"})
    for name in OPTIMIZERS:
        params = OPTIMIZERS.params(name)
        assert "lr" in params, name
        assert not set(params) & (HIDDEN | {"params"}), name
        # Every parameter a study file may set is one the optimizer really accepts.
        opt = build_optimizer(name, [torch.zeros(1, requires_grad=True)])
        assert set(params) <= set(opt.defaults), (name, set(params) - set(opt.defaults))
    assert "weight_decay" not in OPTIMIZERS.params("lbfgs")
    assert "history_size" in OPTIMIZERS.params("lbfgs")


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownName) as err:
        build_optimizer("adamm", nn.Linear(2, 1).parameters(), lr=0.1)
    assert str(err.value) == f"unknown optimizer 'adamm'; valid: {', '.join(OPTIMIZERS.names())}"
    assert "sgd" in str(err.value) and "lbfgs" in str(err.value)
    opt = build_optimizer("sgd", nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(UnknownName) as err:
        build_scheduler("cosinus", opt, RUN)
    assert str(err.value) == f"unknown scheduler 'cosinus'; valid: {', '.join(SCHEDULERS.names())}"
    assert "cosine" in str(err.value) and "onecycle" in str(err.value)
    with pytest.raises(UnknownName, match="unknown optimizer 'nope'"):
        OPTIMIZERS.params("nope")


# Schedulers.


@dataclass
class Trace:
    """The learning rate in use during each batch and each epoch, and the stepper that moved it."""

    per_batch: list[list[float]]  # per epoch, the lr of each of its batches
    per_epoch: list[float]  # the lr at the start of each epoch, then the lr after the run
    stepper: Stepper


def run_schedule(name: str, metrics: list[float] | None = None, run: Schedule = RUN, **kwargs: Any) -> Trace:
    """Drive scheduler ``name`` as the training loop does: after_batch() after every optimizer step,
    after_epoch(validation metric) after every epoch, whatever the scheduler."""
    model = nn.Linear(4, 2)
    opt = build_optimizer("sgd", model.parameters(), lr=BASE_LR)
    stepper = build_scheduler(name, opt, run, **kwargs)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    per_batch: list[list[float]] = []
    per_epoch: list[float] = []
    for epoch in range(run.epochs):
        per_epoch.append(opt.param_groups[0]["lr"])
        per_batch.append([])
        for _ in range(run.steps_per_epoch):
            per_batch[-1].append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            stepper.after_batch()
        stepper.after_epoch((metrics or [0.5] * run.epochs)[epoch])
    per_epoch.append(opt.param_groups[0]["lr"])
    return Trace(per_batch, per_epoch, stepper)


STEPS = {"onecycle": Steps.BATCH, "plateau": Steps.METRIC}


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_builds_and_steps(name: str) -> None:
    trace = run_schedule(name)
    sched = trace.stepper.scheduler
    assert trace.stepper.steps is STEPS.get(name, Steps.EPOCH)
    assert SCHEDULERS.facts(name).steps is trace.stepper.steps
    assert (sched is None) == (name == "none")
    every = [lr for batch in trace.per_batch for lr in batch] + trace.per_epoch
    assert all(math.isfinite(lr) and lr >= 0 for lr in every)
    if trace.stepper.steps is not Steps.BATCH:
        # A per-epoch scheduler holds the rate for the whole epoch, however often after_batch is called.
        assert all(len(set(batch)) == 1 for batch in trace.per_batch), trace.per_batch
    if name == "none":
        assert trace.per_epoch == [BASE_LR] * (RUN.epochs + 1)
    elif name != "plateau":  # plateau moves only when the metric stalls for long enough
        assert len(set(every)) > 1, (name, every)


def approx(values: list[float]) -> Any:
    return pytest.approx(values, rel=1e-6, abs=1e-9)


def test_step() -> None:
    trace = run_schedule("step", step_size=2, gamma=0.5)
    assert trace.per_epoch == approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


def test_step_default_is_seed_003() -> None:
    # step_size 4, gamma 0.5 (seed 003), over 9 epochs.
    trace = run_schedule("step", run=Schedule(9, 3, "min"))
    assert trace.per_epoch == approx([0.1] * 4 + [0.05] * 4 + [0.025] * 2)


def test_multistep() -> None:
    # Default milestones: half and three quarters of the run (epochs 3 and 4 of 6).
    assert run_schedule("multistep").per_epoch == approx([0.1, 0.1, 0.1, 0.05, 0.025, 0.025, 0.025])
    trace = run_schedule("multistep", milestones=[1, 5], gamma=0.1)
    assert trace.per_epoch == approx([0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001])
    # A one-epoch run has both default milestones at 1.
    assert run_schedule("multistep", run=Schedule(1, 3, "max")).per_epoch == approx([0.1, 0.05])


def test_exponential() -> None:
    assert run_schedule("exponential", gamma=0.8).per_epoch == approx([0.1 * 0.8**e for e in range(7)])


def test_cosine() -> None:
    eta_min = 0.01
    lrs = run_schedule("cosine", eta_min=eta_min).per_epoch  # T_max defaults to the run: 6 epochs
    want = [eta_min + (BASE_LR - eta_min) * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(7)]
    assert lrs == approx(want)
    assert lrs[-1] == pytest.approx(eta_min)
    assert run_schedule("cosine", T_max=3).per_epoch[3] == pytest.approx(0.0, abs=1e-12)


def test_warmup() -> None:
    trace = run_schedule("warmup", warmup_epochs=2, start_factor=0.1)
    assert trace.per_epoch == approx([0.01, 0.055, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_polynomial() -> None:
    # Linear decay to zero over the run.
    assert run_schedule("polynomial").per_epoch == approx([0.1 * (1 - e / 6) for e in range(7)])
    trace = run_schedule("polynomial", power=2.0, total_iters=3)
    assert trace.per_epoch == approx([0.1, 0.1 * (2 / 3) ** 2, 0.1 * (1 / 3) ** 2, 0.0, 0.0, 0.0, 0.0])


def test_plateau_cuts_after_patience() -> None:
    # mode="max": an accuracy that stops rising. The first call sets the best; after it,
    # `patience` epochs without improvement are tolerated and the next one cuts the rate.
    trace = run_schedule("plateau", metrics=[0.5] * 6, patience=2, factor=0.1)
    assert trace.per_epoch == approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert run_schedule("plateau", metrics=rising, patience=1).per_epoch == approx([0.1] * 7)
    # Falling accuracy is no improvement in "max" mode.
    trace = run_schedule("plateau", metrics=rising[::-1], patience=1, factor=0.5)
    assert trace.per_epoch == approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_plateau_follows_the_run_mode() -> None:
    opt = build_optimizer("sgd", nn.Linear(2, 1).parameters(), lr=BASE_LR)
    stepper = build_scheduler("plateau", opt, Schedule(6, 5, "min"), patience=0)
    assert isinstance(stepper.scheduler, lr_scheduler.ReduceLROnPlateau)
    assert stepper.scheduler.mode == "min"
    stepper.after_epoch(1.0)
    stepper.after_epoch(0.5)  # a falling loss is an improvement
    assert opt.param_groups[0]["lr"] == BASE_LR
    for _ in range(50):  # batches never move a plateau scheduler
        stepper.after_batch()
    assert opt.param_groups[0]["lr"] == BASE_LR
    stepper.after_epoch(0.7)
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.1)


def test_onecycle_runs_every_batch_once() -> None:
    trace = run_schedule("onecycle")  # max_lr defaults to the optimizer's lr
    lrs = [lr for batch in trace.per_batch for lr in batch]
    total = RUN.epochs * RUN.steps_per_epoch
    assert len(lrs) == total
    assert lrs[0] == pytest.approx(BASE_LR / 25.0)
    assert max(lrs) == pytest.approx(BASE_LR, rel=1e-3)
    peak = lrs.index(max(lrs))
    assert 0 < peak < total // 2
    # The last batch of the run trains at the cycle's final rate: initial lr / final_div_factor.
    assert lrs[-1] == pytest.approx(BASE_LR / 25.0 / 1e4, rel=1e-3)
    # after_epoch never steps it; the cycle is exactly epochs × steps_per_epoch batches long.
    trace.stepper.after_epoch(0.5)
    with pytest.raises(ValueError, match="Tried to step"):
        trace.stepper.after_batch()
    lrs = [lr for batch in run_schedule("onecycle", max_lr=0.4, div_factor=10.0).per_batch for lr in batch]
    assert lrs[0] == pytest.approx(0.04)
    assert max(lrs) == pytest.approx(0.4, rel=1e-3)


def test_onecycle_cycles_momentum_only_where_there_is_one() -> None:
    run = Schedule(2, 4, "max")
    for name, kwargs, key in (("sgd", {"momentum": 0.9}, "momentum"), ("adam", {}, "betas")):
        opt = build_optimizer(name, nn.Linear(2, 1).parameters(), lr=0.1, **kwargs)
        stepper = build_scheduler("onecycle", opt, run)
        first = opt.param_groups[0][key]
        for _ in range(3):
            opt.step()
            stepper.after_batch()
        assert opt.param_groups[0][key] != first, name
    # Adagrad has neither momentum nor betas: torch's OneCycleLR would refuse it if asked to cycle.
    opt = build_optimizer("adagrad", nn.Linear(2, 1).parameters(), lr=0.1)
    stepper = build_scheduler("onecycle", opt, run)
    opt.step()
    stepper.after_batch()
    assert opt.param_groups[0]["lr"] > 0.1 / 25


def test_stepper_without_a_scheduler_does_nothing() -> None:
    opt = build_optimizer("sgd", nn.Linear(2, 1).parameters(), lr=BASE_LR)
    stepper = build_scheduler("none", opt, RUN)
    assert stepper.scheduler is None
    stepper.after_batch()
    stepper.after_epoch(0.1)
    assert opt.param_groups[0]["lr"] == BASE_LR


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("step", {"step_size": 0}, "step_size"),
        ("cosine", {"T_max": 0}, "T_max"),
        ("polynomial", {"total_iters": 0}, "total_iters"),
        ("warmup", {"warmup_epochs": 0}, "warmup_epochs"),
        ("multistep", {"milestones": [2, 0]}, "milestone"),
        ("onecycle", {"max_lr": 0.0}, "max_lr"),
        ("onecycle", {"max_lr": -0.1}, "max_lr"),
    ],
)
def test_scheduler_arguments_out_of_range(name: str, kwargs: dict[str, Any], key: str) -> None:
    # torch accepts each of these and then divides by zero, or never moves (or reverses) the rate.
    opt = build_optimizer("sgd", nn.Linear(2, 1).parameters(), lr=BASE_LR)
    with pytest.raises(ValueError, match=key):
        build_scheduler(name, opt, RUN, **kwargs)
