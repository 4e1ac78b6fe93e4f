"""The trial loop on its own: progress within and between epochs, seeds, devices."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from conftest import QUICK_STUDY, write_study
from hpsearch.spec import load_spec
from hpsearch.study import open_study, run_study
from hpsearch.train import CHECK_EVERY, resolve_device, trial_seed


def test_progress_reports_within_epochs_and_each_validation(tmp_path: Path) -> None:
    # 720 training images at batch 16 are 45 batches: two divergence checks in every epoch.
    text = QUICK_STUDY.replace("batch_size = 64", "batch_size = 16").replace("epochs = 1", "epochs = 2")
    spec = load_spec(write_study(tmp_path, "progress", text))
    study = open_study(spec, f"sqlite:///{tmp_path / 'db.sqlite'}")
    calls: list[tuple[int, int, float, float | None]] = []
    run_study(spec, study, n_trials=1, device="cpu", progress=lambda n: lambda *a: calls.append(a))
    (trial,) = study.trials
    within = [c for c in calls if c[3] is None]
    assert [(e, round(d, 3)) for e, _, d, _ in within] == [
        (e, round(k * CHECK_EVERY * 16 / 720, 3)) for e in (1, 2) for k in (1, 2)
    ]
    ends = [c for c in calls if c[3] is not None]
    assert ends == [(1, 2, 1.0, trial.intermediate_values[1]), (2, 2, 1.0, trial.intermediate_values[2])]


def test_trial_seeds_differ_per_trial_and_per_study() -> None:
    seeds = {trial_seed(s, n) for s in range(3) for n in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**31 for s in seeds)


def test_devices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="unknown device 'nonsense'; use auto, cpu, cuda or cuda:N"):
        resolve_device("nonsense")


def test_a_failed_build_still_records_what_the_trial_was(tmp_path: Path) -> None:
    text = QUICK_STUDY.replace("lr = { low = 0.0001, high = 0.003, log = true }", "lr = -1.0")
    spec = load_spec(write_study(tmp_path, "bad-lr", text))
    study = open_study(spec, f"sqlite:///{tmp_path / 'db.sqlite'}")
    run_study(spec, study, n_trials=1, device="cpu")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "Invalid learning rate" in trial.user_attrs["fail_reason"]
    assert trial.user_attrs["config"]["optimizer"]["lr"] == -1.0
