"""What a trial learns to do: classification or regression, and all that follows from it.

A task owns its loss, its metric and the direction that metric is optimised in, the names under
which a trial records it, the level a model that learnt nothing reaches, and the training loss past
which a run has diverged. Nothing else in the package branches on the task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class Task:
    """One kind of learning problem."""

    name: str
    metric: str  # the validation and test metric: "accuracy" or "mse"
    direction: Literal["maximize", "minimize"]

    @property
    def metric_label(self) -> str:
        """The objective's name in the dashboard and Optuna's CLI."""
        return f"validation {self.metric}"

    @property
    def val_key(self) -> str:
        """The trial attribute holding the per-epoch validation metric (``val_acc``, ``val_mse``)."""
        return f"val_{self._short}"

    @property
    def test_key(self) -> str:
        """The trial attribute holding the test metric of a finished trial."""
        return f"test_{self._short}"

    @property
    def _short(self) -> str:
        return "acc" if self.metric == "accuracy" else self.metric

    def loss(self, label_smoothing: float = 0.0) -> nn.Module:
        """The loss a trial minimises. ``label_smoothing`` (classification only; ValueError for any
        other task) moves that share of each target's weight evenly onto all the classes."""
        if self is CLASSIFICATION:
            return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        if label_smoothing:
            raise ValueError(
                f"label smoothing applies to classes; a {self.name} task's loss is the mean squared error"
            )
        return nn.MSELoss()

    def best(self, values: Sequence[float]) -> int | None:
        """The index of the best of ``values`` in the metric's direction, the first of equal ones;
        None when none is a number."""
        numbers = [i for i, v in enumerate(values) if not math.isnan(v)]
        if not numbers:
            return None
        sign = 1 if self.direction == "maximize" else -1
        return max(numbers, key=lambda i: (sign * values[i], -i))

    def score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The metric summed over a batch (divide by the example count for the mean), on the device."""
        if self is CLASSIFICATION:
            return (out.argmax(1) == y).sum()
        return ((out.float() - y) ** 2).sum() / y.shape[1]

    def chance(self, num_outputs: int) -> float | None:
        """The accuracy of a guess, or None where no such level exists (regression)."""
        return 1.0 / num_outputs if self is CLASSIFICATION else None

    def max_loss(self, num_outputs: int) -> float:
        """A training loss past which the run has diverged.

        Cross-entropy starts near ln(classes) for an untrained net; ten times that is far past any
        run that learns. For regression the targets' scale is unknown, so the limit is generous.
        """
        return 10 * math.log(num_outputs) if self is CLASSIFICATION else 1e4


CLASSIFICATION = Task("classification", "accuracy", "maximize")
REGRESSION = Task("regression", "mse", "minimize")
TASKS = {t.name: t for t in (CLASSIFICATION, REGRESSION)}
