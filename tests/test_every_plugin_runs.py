"""Every registered optimizer with every registered scheduler trains end to end from a study file."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from conftest import run_cli, write_study
from hpsearch.datasets import batch_slices
from hpsearch.optim import OPTIMIZERS, SCHEDULERS


# Ninety trials through the CLI into SQLite: about half a minute on two cores.
@pytest.mark.slow
def test_every_optimizer_and_scheduler_run_from_a_study_file(tmp_path: Path) -> None:
    optimizers, schedulers = OPTIMIZERS.names(), SCHEDULERS.names()
    # toy_regression keeps 900 of its 1000 points for training: 14 batches of 64 and one of 4, so a
    # per-batch schedule sized 900 // 64 runs out in the last epoch.
    assert len(batch_slices(900, 64)) == 15
    text = f"""
[study]
n_trials = {len(optimizers) * len(schedulers)}
sampler = "grid"
pruner = "none"

[data]
name = "toy_regression"
batch_size = 64

[model]
name = "mlp"

[optimizer]
name = {{ choices = {optimizers} }}
lr = 0.01

[optimizer.sgd]
momentum = 0.9
nesterov = true

[optimizer.lbfgs]
max_iter = 5

[scheduler]
name = {{ choices = {schedulers} }}

[scheduler.multistep]
milestones = [1]

[train]
epochs = 2
"""
    path = write_study(tmp_path, "every-plugin", text)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu")
    trials = optuna.load_study(study_name="every-plugin", storage=storage).trials
    pairs = {(t.params["optimizer.name"], t.params["scheduler.name"]) for t in trials}
    assert pairs == {(o, s) for o in optimizers for s in schedulers}
    assert len(trials) == len(pairs)
    complete = optuna.trial.TrialState.COMPLETE
    failed = [(t.params, t.user_attrs.get("fail_reason")) for t in trials if t.state != complete]
    assert failed == []
    for t in trials:
        assert len(t.user_attrs["train_loss"]) == len(t.user_attrs["val_mse"]) == 2, t.params
        assert t.user_attrs["test_mse"] >= 0, t.params
