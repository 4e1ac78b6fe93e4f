"""The trial: build → loop over epochs (train, evaluate, report, prune) → test → result."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import optuna
import torch
from torch import nn

from hpsearch.datasets import Dataset, load_dataset, split
from hpsearch.models import build_model
from hpsearch.optim import Schedule, build_optimizer, build_scheduler, steps_per_batch
from hpsearch.spec import Config, StudySpec

# Batches between divergence checks: each check is one host sync, so the inner loop never waits
# on the device per batch, yet a blown-up run stops within its first epoch.
CHECK_EVERY = 16

# progress(epoch, epochs, fraction of the epoch done, validation metric once the epoch is evaluated)
Progress = Callable[[int, int, float, float | None], None]


class Diverged(Exception):
    """Training loss became non-finite or exceeded ``train.max_loss``."""


def trial_seed(study_seed: int, number: int) -> int:
    """Seed of trial ``number``: distinct per trial, reproducible from the study seed."""
    return (study_seed * 1_000_003 + number) % 2**31


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use cpu")
    return dev


def run_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    device: torch.device,
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> float:
    """Train one sampled configuration and return its final validation metric.

    Reports the validation metric after every epoch (step = epoch, from 1) and raises
    ``optuna.TrialPruned`` when the pruner says so or the loss diverges; either way the reason
    and the per-epoch history are stored as the trial's user attributes.
    """
    cfg = spec.sample(trial)
    data_cfg, train_cfg = cfg["data"], cfg["train"]
    seed = train_cfg["seed"] if train_cfg["seed"] is not None else trial_seed(spec.seed, trial.number)
    torch.manual_seed(seed)
    # Stored first, so even a trial that fails while building says what it was.
    trial.set_user_attr("config", cfg)
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("device", str(device))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("metric", spec.metric)
    data = load_dataset(data_cfg["name"], data_dir, str(device))
    train_idx, val_idx = split(
        len(data.train_y), data_cfg["val_fraction"], spec.seed, data_cfg["train_limit"] or None,
        str(device),
    )  # fmt: skip
    test_n = data_cfg["test_limit"] or len(data.test_y)
    model = _build(cfg, data, device)
    optimizer = build_optimizer(**cfg["optimizer"], params=model.parameters())
    batch_size = int(data_cfg["batch_size"])
    steps = max(1, len(train_idx) // batch_size)
    mode: Literal["min", "max"] = "max" if spec.direction == "maximize" else "min"
    scheduler = build_scheduler(
        **cfg["scheduler"], optimizer=optimizer,
        run=Schedule(int(train_cfg["epochs"]), steps, mode),
    )  # fmt: skip
    classify = data.task == "classification"
    loss_fn: nn.Module = nn.CrossEntropyLoss() if classify else nn.MSELoss()
    max_loss = train_cfg["max_loss"] or (10 * math.log(data.num_outputs) if classify else 1e4)
    key = "val_acc" if classify else "val_mse"
    history: dict[str, list[float]] = {"train_loss": [], key: [], "epoch_time_s": []}
    trial.set_user_attr("n_params", sum(p.numel() for p in model.parameters()))
    g = torch.Generator(device=device).manual_seed(seed)
    seen, train_time, start = 0, 0.0, time.perf_counter()
    epochs = int(train_cfg["epochs"])
    value = math.nan
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        try:
            on_check = (lambda done, e=epoch: progress(e, epochs, done, None)) if progress else None
            loss = train_epoch(
                model, data, train_idx, cfg, optimizer, scheduler, loss_fn, g, device, max_loss, on_check
            )
        except Diverged as exc:
            _finish(trial, history, start, seen, train_time, epoch - 1, f"diverged in epoch {epoch}: {exc}")
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        seen += len(train_idx)
        train_time += time.perf_counter() - t0
        value = evaluate(model, data, data.train_x, data.train_y, val_idx, device, cfg)
        history["train_loss"].append(loss)
        history[key].append(value)
        history["epoch_time_s"].append(time.perf_counter() - t0)
        trial.report(value, epoch)
        if progress:
            progress(epoch, epochs, 1.0, value)
        if trial.should_prune():
            _finish(trial, history, start, seen, train_time, epoch,
                    f"pruned at epoch {epoch}: validation {spec.metric} {value:.4f}")  # fmt: skip
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        if scheduler is not None and not steps_per_batch(scheduler):
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(value)
            else:
                scheduler.step()
    test_idx = torch.arange(test_n, device=device)
    test = evaluate(model, data, data.test_x, data.test_y, test_idx, device, cfg)
    trial.set_user_attr("test_acc" if classify else "test_mse", test)
    _finish(trial, history, start, seen, train_time, epochs, None)
    return value


def _build(cfg: Config, data: Dataset, device: torch.device) -> nn.Module:
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    in_ch = data.in_channels if data.task == "classification" else int(data.train_x.shape[1])
    model = build_model(name, in_ch, data.num_outputs, **model_cfg).to(device)
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
    idx: torch.Tensor,
    cfg: Config,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_fn: nn.Module,
    g: torch.Generator,
    device: torch.device,
    max_loss: float,
    on_check: Callable[[float], None] | None = None,
) -> float:
    """One pass over the training indices; the mean training loss, synced once per epoch.

    Every ``CHECK_EVERY`` batches the loss is checked for divergence and ``on_check`` is told the
    fraction of the epoch done: the one host sync serves both.
    """
    model.train()
    bs, resize, flip = int(cfg["data"]["batch_size"]), cfg["data"]["resize"], cfg["data"]["flip"]
    l1 = float(cfg["train"]["l1"])
    params = [p for p in model.parameters() if p.requires_grad]
    order = idx[torch.randperm(len(idx), generator=g, device=device)]
    total = torch.zeros((), device=device)
    # torch.maximum propagates NaN, so one tensor tracks both blow-ups and non-finite losses.
    worst = torch.zeros((), device=device)
    per_batch = steps_per_batch(scheduler)
    channels_last = device.type == "cuda" and data.train_x.dim() == 4
    n_batches = 0
    for i in range(0, len(order), bs):
        batch = order[i : i + bs]
        if len(batch) < 2 and n_batches:  # a batch of one breaks BatchNorm; it is dropped
            break
        x = data.inputs(data.train_x[batch], resize, flip, g)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.train_y[batch]

        loss = _step(model, optimizer, loss_fn, x, y, l1, params, device)
        loss = loss.detach().float()
        total += loss * len(batch)
        worst = torch.maximum(worst, loss)
        n_batches += 1
        if per_batch:
            scheduler.step()
        if n_batches % CHECK_EVERY == 0:
            _check(float(worst), max_loss, n_batches)
            if on_check:
                on_check(min(1.0, (i + bs) / len(order)))
    _check(float(worst), max_loss, n_batches)
    return float(total) / max(1, min(len(order), n_batches * bs))


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
) -> torch.Tensor:
    """One optimizer step on a batch; returns the batch loss (not synced)."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = loss_fn(model(x), y)
        if l1:
            loss = loss + l1 * sum(p.abs().sum() for p in params)
        loss.backward()
        return loss

    # Every torch optimizer accepts a closure; LBFGS needs one to re-evaluate the loss.
    loss = optimizer.step(closure)  # type: ignore[arg-type]
    assert isinstance(loss, torch.Tensor)
    return loss


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Dataset,
    xs: torch.Tensor,
    ys: torch.Tensor,
    idx: torch.Tensor,
    device: torch.device,
    cfg: Config,
) -> float:
    """Accuracy (classification) or mean squared error (regression) over ``xs[idx]``."""
    model.eval()
    bs, resize = int(cfg["train"]["eval_batch_size"]), cfg["data"]["resize"]
    score = torch.zeros((), device=device, dtype=torch.float64)
    for i in range(0, len(idx), bs):
        batch = idx[i : i + bs]
        x = data.inputs(xs[batch], resize)
        with _autocast(device):
            out = model(x).float()
        y = ys[batch]
        if data.task == "classification":
            score += (out.argmax(1) == y).sum()
        else:
            score += ((out - y) ** 2).sum() / y.shape[1]
    return float(score) / max(1, len(idx))


def _finish(
    trial: optuna.Trial,
    history: dict[str, list[float]],
    start: float,
    seen: int,
    train_time: float,
    epochs_run: int,
    reason: str | None,
) -> None:
    for key, values in history.items():
        trial.set_user_attr(key, values)
    trial.set_user_attr("epochs_run", epochs_run)
    trial.set_user_attr("run_time_s", time.perf_counter() - start)
    if train_time:
        trial.set_user_attr("examples_per_s", seen / train_time)
    if history["train_loss"]:
        trial.set_user_attr("final_train_loss", history["train_loss"][-1])
    if reason:
        trial.set_user_attr("stop_reason", reason)
