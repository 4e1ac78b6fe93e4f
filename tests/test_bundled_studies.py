"""Every scheduler choice of every bundled study finishes a trial in the real training loop.

The bug this guards against: OneCycle was sized ``len(train) // batch_size`` batches an epoch while
the loop ran the ceiling, so when the training split was not a multiple of the batch size the
schedule ran out of steps and every onecycle trial of the AlexNet, AlexNet-28 and ResNet studies
failed in its last epoch. Each case here is a small copy of a bundled study file (same stem, same
sections, the scheduler fixed to one choice) whose training split is two batches and a ragged 3,
run through ``hpsearch run`` in process into a real SQLite file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import tomlkit
import torch
from click.testing import CliRunner
from optuna.trial import TrialState
from test_datasets import tiny_mnist, write_cifar, write_mnist
from torch import nn

from hpsearch.cli import main
from hpsearch.datasets import batch_slices, split
from hpsearch.models import MODELS, build_model
from hpsearch.optim import Schedule, build_optimizer, build_scheduler
from hpsearch.record import TrialRecord
from hpsearch.spec import load_spec

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.toml"))
ALEXNET28 = next(p for p in STUDIES if p.stem == "alexnet28-fashion")

EPOCHS = 2  # crosses an epoch boundary; onecycle's old bug hit in the last epoch
TEST_LIMIT = 20
# Datasets with no Debian package: tiny files in their real formats are written for them.
OFF_DISK = {"mnist", "cifar10"}
# Nets that need 224×224 input or are large at 96×96: seconds per batch on a 2-core CPU.
HEAVY = {"alexnet", "alexnet_small", "vgg11", "resnet18"}


# Stands in for the HEAVY nets, registered like any user's model (README, "Adding a model"). What is
# under test is the scheduler's sizing and stepping in the loop, not the network; every registered
# network is built and run forward and backward by tests/test_models.py.
@MODELS.register(input_size=None)
def tiny_any(in_channels: int, num_classes: int) -> nn.Module:
    """Average-pool to 4×4 and one linear layer, any input size (tests only)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, num_classes))


def scheduler_cases() -> Iterator[Any]:
    for path in STUDIES:
        for choice in load_spec(path).space["scheduler"].choices():
            yield pytest.param(path, choice, id=f"{path.stem}-{choice}")


def train_limit_for(n_train: int, val_fraction: float) -> int:
    """The smallest ``train_limit`` whose training part, after the validation split, is ``n_train``."""
    n = n_train
    # The training part grows by 0 or 1 per example added, so the first limit reaching it hits it.
    while len(split(n, val_fraction, seed=0)[0]) < n_train:
        n += 1
    return n


def derive(source: Path, choice: str, folder: Path, epochs: int = EPOCHS) -> dict[str, Any]:
    """A small copy of ``source`` in ``folder`` under the same stem, its scheduler fixed to ``choice``.

    One random trial, no pruner; the smallest batch size of the study; a training split of two
    batches and 3 examples; ``epochs`` epochs; a HEAVY net replaced by ``tiny_any``.
    """
    spec = load_spec(source)
    doc = tomlkit.parse(source.read_text(encoding="utf-8"))

    study = doc["study"]
    study["n_trials"] = 1
    sampler = tomlkit.inline_table()
    sampler.update({"name": "random", "seed": 0})
    study["sampler"] = sampler
    study["pruner"] = "none"
    study.pop("timeout", None)
    study.pop("enqueue", None)  # a warm start's values may lie outside the copy's fixed ones

    data = doc["data"]
    batch = min(v for p in spec.space["data"].every_param() if p.key == "batch_size" for v in p.candidates())
    n_train = 2 * batch + 3
    limit = train_limit_for(n_train, spec.raw["data"]["val_fraction"])
    data["batch_size"] = batch
    data["train_limit"] = limit
    data["test_limit"] = TEST_LIMIT

    choices = spec.space["scheduler"].choices()
    if "scheduler" in doc:
        table = doc["scheduler"]
        table["name"] = choice
        for other in [key for key in table if key in choices and key != choice]:
            del table[other]  # another choice's own sub-table
    else:
        assert choice == "none", choices

    models = set(spec.space["model"].choices())
    if models & HEAVY:
        assert models <= HEAVY, models
        model = tomlkit.table()
        model["name"] = "tiny_any"
        doc["model"] = model

    if "train" not in doc:
        doc["train"] = tomlkit.table()
    doc["train"]["epochs"] = epochs

    path = folder / source.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    return {
        "path": path,
        "dataset": spec.raw["data"]["name"],
        "task": spec.task,
        "batch": batch,
        "n_train": n_train,
        "limit": limit,
        "model": "tiny_any" if models & HEAVY else spec.raw["model"]["name"],
    }


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread while this module trains: its batches are small, and on a shared, loaded
    2-core machine two threads spinning against other processes made every case twice as slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def off_disk_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST as gzipped IDX files and CIFAR-10 as python pickle batches, 400 train and 60 test each."""
    folder = tmp_path_factory.mktemp("data")
    write_mnist(folder, tiny_mnist(0, n_train=400, n_test=60))
    write_cifar(folder, [80, 80, 80, 80, 80, 60])
    return folder


def run_study(case: dict[str, Any], db: Path, data_dir: Path) -> optuna.trial.FrozenTrial:
    """``hpsearch run`` on the derived study; its one stored trial."""
    storage = f"sqlite:///{db}"
    args = ["run", "--study", str(case["path"]), "--storage", storage, "--device", "cpu"]
    if case["dataset"] in OFF_DISK:
        args += ["--data-dir", str(data_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    trials = optuna.load_study(study_name=case["path"].stem, storage=storage).trials
    assert len(trials) == 1
    return trials[0]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "choice"), list(scheduler_cases()))
def test_every_scheduler_of_every_bundled_study_finishes_a_trial(
    source: Path, choice: str, tmp_path: Path, off_disk_data: Path
) -> None:
    case = derive(source, choice, tmp_path / "studies")
    batch, n_train = case["batch"], case["n_train"]
    # The premise: the loop's batch count is the ceiling, not the floor the old sizing used.
    assert n_train % batch != 0 and n_train // batch == 2
    assert len(batch_slices(n_train, batch)) == 3

    trial = run_study(case, tmp_path / "db.sqlite", off_disk_data)
    rec = TrialRecord.of(trial, case["task"])
    # The trial ran the derived file: this scheduler, this batch size and split, this net.
    assert rec.config["scheduler"]["name"] == choice
    assert rec.config["data"]["batch_size"] == batch
    assert rec.config["data"]["train_limit"] == case["limit"]
    model = case["model"]  # the network, or a search over networks (fashion-front's)
    assert rec.config["model"]["name"] in (model["choices"] if isinstance(model, dict) else [model])
    assert rec.config["train"]["epochs"] == EPOCHS
    # A sampled learning rate may legitimately diverge; a failed trial never passes. A complete
    # trial (onecycle included) trained and evaluated every epoch.
    assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED), rec.fail_reason
    if trial.state is TrialState.COMPLETE:
        assert rec.epochs_run == EPOCHS and rec.stop_reason is None and rec.test is not None
    else:
        assert rec.stop_reason is not None and rec.stop_reason.startswith("diverged"), rec.stop_reason


@pytest.mark.slow
def test_onecycle_alexnet28_finishes_every_epoch_of_a_ragged_split(
    tmp_path: Path, off_disk_data: Path
) -> None:
    # The study's own optimizer section, with SGD at lr 0.01 (inside its range) so a divergence
    # cannot stand in for the result: the real alexnet28, batch 64, 2 × 64 + 3 examples, 3 epochs.
    case = derive(ALEXNET28, "onecycle", tmp_path / "studies", epochs=3)
    assert case["batch"] == 64 and case["n_train"] == 2 * 64 + 3 and case["model"] == "alexnet28"
    doc = tomlkit.parse(case["path"].read_text(encoding="utf-8"))
    doc["optimizer"]["name"] = "sgd"
    doc["optimizer"]["lr"] = 0.01
    case["path"].write_text(tomlkit.dumps(doc), encoding="utf-8")

    trial = run_study(case, tmp_path / "db.sqlite", off_disk_data)
    rec = TrialRecord.of(trial, case["task"])
    assert trial.state is TrialState.COMPLETE, rec.reason
    assert rec.config["scheduler"]["name"] == "onecycle" and rec.config["optimizer"]["lr"] == 0.01
    assert rec.epochs_run == 3 and len(rec.train_loss) == 3 and rec.test is not None


def test_onecycle_is_sized_to_the_batches_the_loop_runs() -> None:
    # Built as run_trial builds it: 131 examples at batch 64 are 3 batches (64, 64, 3) an epoch.
    slices = batch_slices(2 * 64 + 3, 64)
    assert len(slices) == 3
    epochs, lr = 3, 0.01
    model = build_model("alexnet28", 1, 10)
    optimizer = build_optimizer("sgd", model.parameters(), lr=lr, momentum=0.9)
    stepper = build_scheduler("onecycle", optimizer, Schedule(epochs, len(slices), "max"))
    used = []
    for _ in range(epochs * len(slices)):  # the loop calls after_batch once per batch it runs
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, but keeps torch's step order
        stepper.after_batch()
    # The last batch trained at OneCycle's final rate: max_lr / div_factor / final_div_factor.
    assert used[-1] == pytest.approx(lr / 25.0 / 1e4)
    assert max(used) <= lr * (1 + 1e-9) and used[0] == pytest.approx(lr / 25.0)
    # The schedule is exactly that long: one step more is refused.
    with pytest.raises(ValueError, match="Tried to step"):
        stepper.after_batch()

    # The old sizing, 131 // 64 = 2 batches an epoch, ran out after 6 of the loop's 9 batches.
    optimizer = build_optimizer("sgd", [torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
    old = build_scheduler("onecycle", optimizer, Schedule(epochs, (2 * 64 + 3) // 64, "max"))
    for _ in range(epochs * 2):
        optimizer.step()
        old.after_batch()
    with pytest.raises(ValueError, match="Tried to step"):
        old.after_batch()
