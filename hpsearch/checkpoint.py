"""Crash-safe trials: a checkpoint after every epoch, and the trial that continues a lost one.

A trial's checkpoint holds everything the rest of its run depends on: the model, the optimizer, the
scheduler, every random state, the epoch and the record so far. It is written atomically after each
epoch, one file per trial chain (``trial-N.pt``, N the number of the chain's first trial), so disk
use is bounded by the number of trials running. A trial whose worker died (its heartbeat went
stale, or its process on this machine is gone) or was stopped by a signal is failed and followed
by a *continuation*: a queued trial with the same parameters and intermediate values, linked to it,
that the next worker to ask for a trial runs from the epoch after the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from hpsearch import record
from hpsearch.optim import Stepper
from hpsearch.storage import artifact_dir, atomic_write, write_leftovers


@dataclass(frozen=True)
class Checkpoints:
    """The folder where a study's trials keep their latest checkpoint."""

    folder: Path

    @classmethod
    def of(cls, study_name: str, configured: str | None, storage_url: str | None) -> Checkpoints:
        """``[study] checkpoints`` if the study file names a folder, else ``checkpoints/STUDY``
        in the artifact folder of the storage (``artifact_dir``)."""
        if configured:
            return cls(Path(configured).expanduser())
        return cls(artifact_dir(storage_url) / "checkpoints" / study_name)

    def path(self, chain: int) -> Path:
        return self.folder / f"trial-{chain}.pt"

    def save(self, chain: int, state: dict[str, Any]) -> None:
        """Replace chain ``chain``'s checkpoint with ``state``, atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.path(chain), buffer.getvalue())

    def load(self, chain: int) -> dict[str, Any] | None:
        """Chain ``chain``'s checkpoint, or None where there is none (or it cannot be read)."""
        try:
            data = self.path(chain).read_bytes()
        except OSError:
            return None
        # Own files only: weights_only keeps a foreign file from running code when it is read.
        state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return state

    def delete(self, chain: int) -> None:
        """Remove chain ``chain``'s checkpoint, and what a worker killed while writing it left."""
        for path in (self.path(chain), *write_leftovers(self.path(chain))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def chain_of(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the first trial of ``trial``'s chain: its own unless it continues another."""
    first = trial.user_attrs.get(record.CHAIN)
    return int(first) if first is not None else trial.number


def continue_trial(study: optuna.Study, trial: FrozenTrial, *, crashed: bool, max_retries: int) -> bool:
    """Queue the continuation of the failed ``trial``; False when the chain's workers have already
    crashed ``max_retries`` times (a configuration that keeps killing its worker, say by running out
    of memory, is given up). A trial stopped by a signal is always continued."""
    retries = int(trial.user_attrs.get(record.RETRIES, 0)) + crashed
    if retries > max_retries:
        return False
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={
                record.CONTINUES: trial.number,
                record.CHAIN: chain_of(trial),
                record.RETRIES: retries,
            },
            # A grid configuration stays fixed; Optuna's own bookkeeping of the old trial does not carry.
            system_attrs={k: v for k, v in trial.system_attrs.items() if k == record.QUEUED},
            intermediate_values=trial.intermediate_values,
        )
    )
    return True


def snapshot(
    epoch: int,
    params: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stepper: Stepper,
    g: torch.Generator,
    history: dict[str, Any],
) -> dict[str, Any]:
    """A trial's state after ``epoch``: with it, the rest of the run is the one it would have been.

    The random states are torch's global one (dropout, CPU and CUDA) and the trial's generator
    (shuffling, flips), which lives on the training device.
    """
    rng = {"cpu": torch.get_rng_state(), "generator": g.get_state()}
    if g.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(g.device)
    return {
        "epoch": epoch,
        "params": params,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": stepper.scheduler.state_dict() if stepper.scheduler is not None else None,
        "rng": rng,
        "history": history,
    }


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stepper: Stepper,
    g: torch.Generator,
) -> dict[str, Any]:
    """Put a ``snapshot`` back into freshly built objects; return the record's history."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if stepper.scheduler is not None:
        stepper.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    g.set_state(state["rng"]["generator"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], g.device)
    history: dict[str, Any] = state["history"]
    return history
