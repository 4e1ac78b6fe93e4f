"""Seed 004's first row (LeNet, SGD lr 0.9, batch 256, 10 epochs) lands where d2l says it does."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from conftest import run_cli

STUDY = Path(__file__).parent.parent / "studies" / "lenet-fashion-baseline.toml"


@pytest.mark.slow
def test_lenet_sgd_baseline_reaches_the_published_accuracy(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'baseline.db'}"
    run_cli("run", "--study", str(STUDY), "--storage", storage, "--device", "cpu")
    (trial,) = optuna.load_study(study_name=STUDY.stem, storage=storage).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["epochs_run"] == 10
    # d2l and the seed report 0.78–0.86 for this configuration; a broken loop lands at 0.10.
    assert 0.78 <= trial.user_attrs["test_acc"] <= 0.88
