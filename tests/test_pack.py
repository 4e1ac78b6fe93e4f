"""Packed trials (``run --pack K``): trained as one batched model, each still its own trial.

The reference for every packed trial is the same configuration trained alone: the same trial
number (so the same seed), its parameters fixed through Optuna's queue, in a study run with
``pack=1``. Real SQLite files, real trainings of the built-in synthetic data.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from conftest import write_study
from hpsearch import train
from hpsearch.checkpoint import Checkpoints
from hpsearch.record import TrialRecord
from hpsearch.spec import load_spec
from hpsearch.study import open_study, run_study

# Different optimizer classes, rates, momenta, weight decays and schedules share one pack: each
# member keeps its own optimizer and scheduler. 225 training examples in batches of 64 (3 full
# batches and one of 33), 25 for validation.
STUDY = """
[study]
n_trials = {n_trials}
sampler = "random"
pruner = "none"
seed = 0

[data]
name = "synthetic"
batch_size = 64
train_limit = 250
flip = true

[model]
name = "{model}"

[optimizer]
name = {{ choices = ["sgd", "adam"] }}

[optimizer.sgd]
lr = {{ low = 0.01, high = 0.2, log = true }}
momentum = {{ low = 0.0, high = 0.9 }}
weight_decay = {{ low = 1e-5, high = 1e-3, log = true }}

[optimizer.adam]
lr = {{ low = 0.0005, high = 0.01, log = true }}

[scheduler]
name = {{ choices = ["none", "step"] }}

[scheduler.step]
step_size = 1
gamma = 0.7

[train]
epochs = 2
"""

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def run(
    tmp_path: Path, name: str, text: str, pack: int, enqueue: list[dict[str, Any]] = ()
) -> list[FrozenTrial]:  # type: ignore[assignment]
    spec = load_spec(str(write_study(tmp_path, name, text)))
    study = open_study(spec, f"sqlite:///{tmp_path / (name + '.sqlite')}")
    for params in enqueue:
        study.enqueue_trial(params)
    run_study(spec, study, device="cpu", checkpoints=Checkpoints(tmp_path / name), pack=pack)
    return sorted(study.trials, key=lambda t: t.number)


def alone(tmp_path: Path, text: str, packed: list[FrozenTrial]) -> list[FrozenTrial]:
    """Each packed trial's configuration trained by itself, under the same trial number."""
    return run(tmp_path, "alone", text, pack=1, enqueue=[t.params for t in packed])


def same_training(packed: FrozenTrial, single: FrozenTrial, spec_task: Any, way: str) -> None:
    a, b = TrialRecord.of(packed, spec_task), TrialRecord.of(single, spec_task)
    assert packed.params == single.params and a.seed == b.seed
    # Side by side, each member runs the very kernels it runs alone. Batched, vmap turns the
    # members' convolutions into one grouped convolution over NCHW images, where alone they run
    # channels-last: the same sums in another order, and float rounding that two epochs of batch
    # norm and momentum carry from ~1e-7 to ~1e-4 of the loss.
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4 if way == "side-by-side" else 1e-3)
    # Accuracy over 25 validation images: a logit that moves by float rounding may flip one.
    assert a.val == pytest.approx(b.val, abs=1.5 / 25)
    assert a.test == pytest.approx(b.test, abs=1.5 / 200)


@pytest.fixture(params=["batched", "side-by-side"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a pack trains: as one batched model (a GPU's way, here on the CPU) and side by side."""
    monkeypatch.setattr(train, "BATCHED_ON", {"cpu"} if request.param == "batched" else set())
    return str(request.param)


@pytest.mark.parametrize("model", ["lenet", "bn_cnn"])
def test_a_pack_of_four_trains_what_four_single_trials_train(tmp_path: Path, model: str, way: str) -> None:
    text = STUDY.format(n_trials=4, model=model)
    packed = run(tmp_path, "packed", text, pack=4)
    assert [t.state for t in packed] == [TrialState.COMPLETE] * 4
    task = load_spec(str(tmp_path / "packed.toml")).task
    assert {t.params["optimizer.name"] for t in packed} == {"sgd", "adam"}
    for t in packed:
        assert TrialRecord.of(t, task).pack == [0, 1, 2, 3]
    singles = alone(tmp_path, text, packed)
    for p, s in zip(packed, singles, strict=True):
        assert TrialRecord.of(s, task).pack is None
        same_training(p, s, task, way)
    # The packed trials did train differently from one another.
    assert len({tuple(TrialRecord.of(t, task).train_loss) for t in packed}) == 4


def test_a_member_that_stops_leaves_the_others_training(tmp_path: Path, way: str) -> None:
    """Of four queued configurations one diverges in its first epoch: it ends PRUNED there, and the
    other three train on and end as they would have alone."""
    text = STUDY.format(n_trials=4, model="lenet")
    spec = load_spec(str(write_study(tmp_path, "stops", text)))
    good = {"optimizer.name": "sgd", "optimizer.sgd.momentum": 0.5, "optimizer.sgd.weight_decay": 1e-4}
    configs = [
        {**good, "optimizer.sgd.lr": 0.05, "scheduler.name": "none"},
        {**good, "optimizer.sgd.lr": 5000.0, "scheduler.name": "none"},  # outside the range: enqueued
        {**good, "optimizer.sgd.lr": 0.1, "scheduler.name": "step"},
        {"optimizer.name": "adam", "optimizer.adam.lr": 0.002, "scheduler.name": "none"},
    ]
    packed = run(tmp_path, "stops", text, pack=4, enqueue=configs)
    states = [t.state for t in packed]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE]
    blown = TrialRecord.of(packed[1], spec.task)
    assert blown.stop_reason is not None and blown.stop_reason.startswith("diverged in epoch 1")
    assert blown.epochs_run == 0
    singles = alone(tmp_path, text, packed)
    for i in (0, 2, 3):
        same_training(packed[i], singles[i], spec.task, way)


def test_configurations_that_cannot_share_a_pack_run_alone(tmp_path: Path) -> None:
    """Two batch sizes make two packs; LBFGS trains alone."""
    text = STUDY.format(n_trials=5, model="lenet").replace(
        "batch_size = 64", "batch_size = { choices = [64, 100] }"
    )
    configs = [
        {
            "data.batch_size": 64,
            "optimizer.name": "adam",
            "optimizer.adam.lr": 0.001,
            "scheduler.name": "none",
        },
        {
            "data.batch_size": 100,
            "optimizer.name": "adam",
            "optimizer.adam.lr": 0.002,
            "scheduler.name": "none",
        },
        {
            "data.batch_size": 64,
            "optimizer.name": "adam",
            "optimizer.adam.lr": 0.003,
            "scheduler.name": "none",
        },
        {
            "data.batch_size": 100,
            "optimizer.name": "adam",
            "optimizer.adam.lr": 0.004,
            "scheduler.name": "none",
        },
        {"data.batch_size": 64, "optimizer.name": "lbfgs", "scheduler.name": "none"},
    ]
    text = text.replace('choices = ["sgd", "adam"]', 'choices = ["sgd", "adam", "lbfgs"]')
    packed = run(tmp_path, "mixed", text, pack=5, enqueue=configs)
    task = load_spec(str(tmp_path / "mixed.toml")).task
    assert [TrialRecord.of(t, task).pack for t in packed] == [[0, 2], [1, 3], [0, 2], [1, 3], None]
    assert [t.state for t in packed[:4]] == [TrialState.COMPLETE] * 4
    assert packed[4].state in (TrialState.COMPLETE, TrialState.PRUNED)  # LBFGS may diverge here


@pytest.mark.slow
def test_run_pack_from_the_command_line(tmp_path: Path) -> None:
    write_study(tmp_path, "cli", STUDY.format(n_trials=6, model="lenet"))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cmd = [sys.executable, "-m", "hpsearch", "run", "--study", "cli.toml", "--storage", storage]
    done = subprocess.run(
        [*cmd, "--device", "cpu", "--pack", "4"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    trials = optuna.load_study(study_name="cli", storage=storage).trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    # Six trials in packs of at most four: the first four together, then the last two.
    assert [t.user_attrs.get("pack") for t in trials] == [[0, 1, 2, 3]] * 4 + [[4, 5]] * 2
    bad = subprocess.run([*cmd, "--pack", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "Invalid value for '--pack'" in bad.stderr
    assert "Traceback" not in bad.stderr
