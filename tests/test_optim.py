"""Every registered optimizer trains a tiny model; every scheduler moves the rate as documented."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from hpsearch.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    Schedule,
    build_optimizer,
    build_scheduler,
    optimizer_params,
    steps_per_batch,
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


def test_optimizer_params() -> None:
    sgd = optimizer_params("sgd")
    assert {"lr", "momentum", "weight_decay", "nesterov", "dampening"} <= sgd
    assert not sgd & {"foreach", "fused", "differentiable", "maximize", "params"}
    for name in OPTIMIZERS:
        params = optimizer_params(name)
        assert "lr" in params, name
        assert not params & {"foreach", "fused", "differentiable", "capturable", "maximize", "params"}
    assert "weight_decay" not in optimizer_params("lbfgs")
    assert "history_size" in optimizer_params("lbfgs")


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
        optimizer_params("nope")


# Schedulers.


def run_schedule(name: str, metrics: list[float] | None = None, **kwargs: Any) -> tuple[list[float], Any]:
    """Drive scheduler ``name`` as the training loop does; the lr in use during each epoch.

    For ``onecycle`` the list holds the lr of every batch instead.
    """
    model = nn.Linear(4, 2)
    opt = build_optimizer("sgd", model.parameters(), lr=BASE_LR)
    sched = build_scheduler(name, opt, RUN, **kwargs)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    lrs: list[float] = []
    for epoch in range(RUN.epochs):
        if not steps_per_batch(sched):
            lrs.append(opt.param_groups[0]["lr"])
        for _ in range(RUN.steps_per_epoch):
            if steps_per_batch(sched):
                lrs.append(opt.param_groups[0]["lr"])
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if steps_per_batch(sched):
                sched.step()
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step((metrics or [0.5] * RUN.epochs)[epoch])
        elif sched is not None and not steps_per_batch(sched):
            sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    return lrs, sched


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_builds_and_steps(name: str) -> None:
    lrs, sched = run_schedule(name)
    assert steps_per_batch(sched) == (name == "onecycle")
    assert (sched is None) == (name == "none")
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs)
    expected_len = RUN.epochs * RUN.steps_per_epoch + 1 if name == "onecycle" else RUN.epochs + 1
    assert len(lrs) == expected_len
    if name == "none":
        assert lrs == [BASE_LR] * len(lrs)
    elif name != "plateau":  # plateau moves only when the metric stalls for long enough
        assert len(set(lrs)) > 1, (name, lrs)


def approx(values: list[float]) -> Any:
    return pytest.approx(values, rel=1e-6, abs=1e-9)


def test_step() -> None:
    lrs, _ = run_schedule("step", step_size=2, gamma=0.5)
    assert lrs == approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


def test_multistep() -> None:
    # Default milestones: half and three quarters of the run (epochs 3 and 4 of 6).
    lrs, _ = run_schedule("multistep")
    assert lrs == approx([0.1, 0.1, 0.1, 0.05, 0.025, 0.025, 0.025])
    lrs, _ = run_schedule("multistep", milestones=[1, 5], gamma=0.1)
    assert lrs == approx([0.1, 0.01, 0.01, 0.01, 0.01, 0.001, 0.001])


def test_exponential() -> None:
    lrs, _ = run_schedule("exponential", gamma=0.8)
    assert lrs == approx([0.1 * 0.8**e for e in range(7)])


def test_cosine() -> None:
    eta_min = 0.01
    lrs, _ = run_schedule("cosine", eta_min=eta_min)  # T_max defaults to the run: 6 epochs
    want = [eta_min + (BASE_LR - eta_min) * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(7)]
    assert lrs == approx(want)
    assert lrs[-1] == pytest.approx(eta_min)
    lrs, _ = run_schedule("cosine", T_max=3)
    assert lrs[3] == pytest.approx(0.0, abs=1e-12)


def test_warmup() -> None:
    lrs, _ = run_schedule("warmup", warmup_epochs=2, start_factor=0.1)
    assert lrs == approx([0.01, 0.055, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_polynomial() -> None:
    lrs, _ = run_schedule("polynomial")  # linear decay to zero over the run
    assert lrs == approx([0.1 * (1 - e / 6) for e in range(7)])
    lrs, _ = run_schedule("polynomial", power=2.0, total_iters=3)
    assert lrs == approx([0.1, 0.1 * (2 / 3) ** 2, 0.1 * (1 / 3) ** 2, 0.0, 0.0, 0.0, 0.0])


def test_plateau_cuts_after_patience() -> None:
    # mode="max": an accuracy that stops rising. The first call sets the best; after it,
    # `patience` epochs without improvement are tolerated and the next one cuts the rate.
    lrs, _ = run_schedule("plateau", metrics=[0.5, 0.5, 0.5, 0.5, 0.5, 0.5], patience=2, factor=0.1)
    assert lrs == approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    lrs, _ = run_schedule("plateau", metrics=rising, patience=1)
    assert lrs == approx([0.1] * 7)
    # Falling accuracy is no improvement in "max" mode.
    lrs, _ = run_schedule("plateau", metrics=rising[::-1], patience=1, factor=0.5)
    assert lrs == approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_plateau_follows_the_run_mode() -> None:
    opt = build_optimizer("sgd", nn.Linear(2, 1).parameters(), lr=BASE_LR)
    sched = build_scheduler("plateau", opt, Schedule(6, 5, "min"), patience=0)
    assert isinstance(sched, lr_scheduler.ReduceLROnPlateau) and sched.mode == "min"
    sched.step(1.0)
    sched.step(0.5)  # a falling loss is an improvement
    assert opt.param_groups[0]["lr"] == BASE_LR
    sched.step(0.7)
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.1)


def test_onecycle_runs_every_batch_once() -> None:
    lrs, sched = run_schedule("onecycle")  # max_lr defaults to the optimizer's lr
    total = RUN.epochs * RUN.steps_per_epoch
    assert len(lrs) == total + 1
    assert lrs[0] == pytest.approx(BASE_LR / 25.0)
    assert max(lrs) == pytest.approx(BASE_LR, rel=1e-3)
    peak = lrs.index(max(lrs))
    assert 0 < peak < total // 2
    assert lrs[total - 1] == pytest.approx(BASE_LR / 25.0 / 1e4, rel=1e-3)
    # The cycle is exactly epochs × steps_per_epoch batches long.
    with pytest.raises(ValueError, match="Tried to step"):
        sched.step()
    lrs, _ = run_schedule("onecycle", max_lr=0.4, div_factor=10.0)
    assert lrs[0] == pytest.approx(0.04)
    assert max(lrs) == pytest.approx(0.4, rel=1e-3)
