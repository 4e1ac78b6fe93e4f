"""The trial loop: progress, seeds, what a failing trial records, and the L1 penalty kept apart."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

from conftest import QUICK_STUDY, write_study
from hpsearch.cli import main
from hpsearch.spec import load_spec
from hpsearch.study import open_study, run_study
from hpsearch.train import CHECK_EVERY, trial_seed

FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


# 301 examples, 30 for validation: 271 to train on at batch 64 are 5 batches (the last of 15).
FLAKY = """
[study]
sampler = "grid"
pruner = "none"

[data]
name = "synthetic"
train_limit = 301
test_limit = 50
batch_size = 64

[model]
name = "flaky"
fail_after = {{ choices = {fail_after} }}
error = "{error}"

[optimizer]
name = "sgd"
lr = 0.05

[train]
epochs = 3
"""


def run(
    tmp_path: Path, text: str, name: str = "flaky"
) -> tuple[int, str, BaseException | None, optuna.Study]:
    path = write_study(tmp_path, name, text)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    result = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", storage, "--device", "cpu"])
    return (
        result.exit_code,
        result.output,
        result.exception,
        optuna.load_study(study_name=name, storage=storage),
    )


def test_a_trial_that_raises_fails_alone_and_the_study_goes_on(tmp_path: Path) -> None:
    # The second configuration raises IndexError on its 7th batch: in epoch 2, after one full epoch.
    code, out, _, study = run(tmp_path, FLAKY.format(fail_after=[0, 7], error="index"))
    assert code == 0, out
    ok, bad = study.trials
    assert ok.state == COMPLETE and ok.user_attrs["epochs_run"] == 3
    assert bad.state == FAIL
    assert bad.user_attrs["fail_reason"].startswith("IndexError: ")
    # The record says what the trial really did before it failed.
    assert bad.user_attrs["epochs_run"] == 1 and len(bad.user_attrs["val_acc"]) == 1
    assert bad.user_attrs["run_time_s"] > 0
    assert bad.user_attrs["config"]["model"]["fail_after"] == 7
    line = next(line for line in out.splitlines() if line.startswith(f"trial {bad.number:>4} fail"))
    assert f" epochs 1 {bad.user_attrs['run_time_s']:.2f}s " in line and "IndexError" in line
    assert "1 trial failed:" in out and f"  {bad.user_attrs['fail_reason']} (1)" in out
    assert "best trial 0" in out


def test_a_run_whose_every_trial_failed_exits_non_zero_with_grouped_reasons(tmp_path: Path) -> None:
    code, out, exc, study = run(tmp_path, FLAKY.format(fail_after=[1, 3], error="zero"))
    assert code == 1 and isinstance(exc, SystemExit)
    assert [t.state for t in study.trials] == [FAIL, FAIL]
    lines = out.strip().splitlines()
    assert "2 trials failed:" in lines
    assert "  ZeroDivisionError: division by zero (2)" in lines
    assert lines[-1] == "Error: every trial of this run failed (2); the reasons are above"
    assert all(t.user_attrs["epochs_run"] == 0 for t in study.trials)


def test_the_l1_penalty_is_recorded_apart_and_is_no_divergence(tmp_path: Path) -> None:
    # AlexNet-28 has 3.2 million weights: at l1 = 0.001 its penalty starts near 29, above the
    # divergence limit 10·ln(10) ≈ 23 that the data loss (≈ 2.3) is held to.
    text = FLAKY.format(fail_after=[0], error="index").replace('"flaky"', '"alexnet28"')
    text = text.replace('fail_after = { choices = [0] }\nerror = "index"\n', "")
    text = text.replace("epochs = 3", "epochs = 1\nl1 = 0.001").replace(
        "train_limit = 301", "train_limit = 151"
    )
    code, out, _, study = run(tmp_path, text, "l1")
    assert code == 0, out
    (trial,) = study.trials
    assert trial.state == COMPLETE, trial.user_attrs.get("stop_reason")
    (penalty,) = trial.user_attrs["l1_penalty"]
    (loss,) = trial.user_attrs["train_loss"]
    assert penalty > 10 * math.log(10) > loss
    assert 0 < loss < 5


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
        (e, round(k * CHECK_EVERY / 45, 3)) for e in (1, 2) for k in (1, 2)
    ]
    ends = [c for c in calls if c[3] is not None]
    assert ends == [(1, 2, 1.0, trial.intermediate_values[1]), (2, 2, 1.0, trial.intermediate_values[2])]


def test_trial_seeds_differ_per_trial_and_per_study() -> None:
    seeds = {trial_seed(s, n) for s in range(3) for n in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize("limit", [0, 57])
def test_the_test_subset_is_seeded_not_the_first_images(limit: int) -> None:
    from hpsearch.datasets import subset

    a, b = subset(200, 7, limit), subset(200, 7, limit)
    assert torch.equal(a, b) and len(a) == (limit or 200)
    assert not torch.equal(a, torch.arange(len(a)))
    assert not torch.equal(a, subset(200, 8, limit))
