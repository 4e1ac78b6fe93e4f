"""Learning-rate schedulers on the real training loop, with batches that do not divide the data.

Every study here is a study file in ``tmp_path``, loaded with ``load_spec``, opened with
``open_study`` and run by ``run_study`` into a real SQLite file (one per module, each test with a
study of its own: creating Optuna's tables costs a second on this disk). The learning rate of every
optimizer step the loop takes is read with torch's own global post-step hook (nothing of hpsearch
is replaced): it shows how many batches the loop ran and at which rate each one trained.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from torch.optim.optimizer import register_optimizer_step_post_hook

from hpsearch.datasets import batch_slices
from hpsearch.optim import SCHEDULERS, Schedule, build_optimizer, build_scheduler
from hpsearch.record import TrialRecord
from hpsearch.spec import StudySpec, load_spec
from hpsearch.study import RunSummary, open_study, run_study

BATCH = 64


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('scheduling') / 'db.sqlite'}"


def study_file(
    tmp_path: Path,
    name: str,
    *,
    dataset: str,
    model: str,
    train_limit: int,
    optimizer: str,
    scheduler: str,
    epochs: int,
    extra: str = "",
    test_limit: int = 0,
) -> StudySpec:
    """A grid study file written to ``tmp_path`` and loaded as ``hpsearch run`` loads it."""
    text = f"""
[study]
sampler = "grid"
pruner = "none"

[data]
name = "{dataset}"
batch_size = {BATCH}
val_fraction = 0.1
train_limit = {train_limit}
test_limit = {test_limit}

[model]
name = "{model}"

[optimizer]
name = {optimizer}

[scheduler]
name = {scheduler}

[train]
epochs = {epochs}
{extra}
"""
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return load_spec(path)


@contextmanager
def lr_per_step() -> Iterator[list[float]]:
    """The learning rate of every optimizer step taken inside the block, in order."""
    lrs: list[float] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
    )
    try:
        yield lrs
    finally:
        handle.remove()


def run(spec: StudySpec, storage: str) -> tuple[optuna.Study, RunSummary, dict[int, list[float]]]:
    """Create the study of ``spec`` and run every trial it queued; each trial's per-step rates."""
    study = open_study(spec, storage)
    per_trial: dict[int, list[float]] = {}
    with lr_per_step() as lrs:

        def done(_: optuna.Study, trial: FrozenTrial) -> None:
            per_trial[trial.number] = lrs[:]
            lrs.clear()

        summary = run_study(spec, study, device="cpu", on_trial=done)
    return study, summary, per_trial


def assert_all_complete(study: optuna.Study, summary: RunSummary, n: int) -> None:
    assert summary.failure_lines() == [] and summary.states == {"complete": n}, summary
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * n


def replay(
    trial: FrozenTrial, spec: StudySpec, batches: int, metrics: list[float] | None = None
) -> list[float]:
    """The rate of each batch when a stepper built from the trial's stored config is driven by the
    contract the loop promises: after_batch() after each of ``batches`` batches, then
    after_epoch(the epoch's validation metric, or ``metrics``)."""
    cfg = trial.user_attrs["config"]
    rec = TrialRecord.of(trial, spec.task)
    epochs = cfg["train"]["epochs"]
    opt = build_optimizer(**cfg["optimizer"], params=[torch.zeros(1, requires_grad=True)])
    mode = "max" if spec.direction == "maximize" else "min"
    stepper = build_scheduler(**cfg["scheduler"], optimizer=opt, run=Schedule(epochs, batches, mode))
    lrs: list[float] = []
    for value in metrics if metrics is not None else rec.val:
        for _ in range(batches):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            stepper.after_batch()
        stepper.after_epoch(value)
    assert len(lrs) == epochs * batches
    return lrs


def approx(values: list[float]) -> Any:
    return pytest.approx(values, rel=1e-9, abs=1e-15)


# Sizes: val_fraction 0.1 keeps floor(limit / 10) for validation; the rest trains in batches of 64.
# (dataset, model, train_limit, training examples, batches the loop runs per epoch)
TOY_631 = ("toy_regression", "mlp", 701, 631, 10)  # 631 = 9·64 + 55
TOY_833 = ("toy_regression", "mlp", 925, 833, 13)  # 833 = 13·64 + 1: the batch of one is dropped
TOY_900 = ("toy_regression", "mlp", 0, 900, 15)  # 900 = 14·64 + 4
SYN_129 = ("synthetic", "lenet", 143, 129, 2)  # 129 = 2·64 + 1
SYN_631 = ("synthetic", "mnist_cnn", 701, 631, 10)
SYN_705 = ("synthetic", "mnist_cnn", 783, 705, 11)  # 705 = 11·64 + 1

SIZES = [
    pytest.param(*TOY_631, id="toy-631"),
    pytest.param(*TOY_833, id="toy-833-drop-1"),
    pytest.param(*TOY_900, id="toy-900", marks=pytest.mark.slow),
    pytest.param(*SYN_129, id="synthetic-129-drop-1", marks=pytest.mark.slow),
    pytest.param(*SYN_631, id="synthetic-631", marks=pytest.mark.slow),
    pytest.param(*SYN_705, id="synthetic-705-drop-1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("dataset", "model", "limit", "n", "batches"), SIZES)
def test_onecycle_completes_and_ends_at_its_final_rate(
    tmp_path: Path, storage: str, dataset: str, model: str, limit: int, n: int, batches: int
) -> None:
    # Sized n // batch_size steps per epoch, the cycle ran out in the last epoch wherever the batch
    # size does not divide n ("Tried to step 37 times" for 631 examples over 4 epochs) and the trial
    # failed; sized one step too many, it would end short of its final rate.
    assert len(batch_slices(n, BATCH)) == batches
    epochs, lr = 4, 0.05
    spec = study_file(
        tmp_path,
        f"onecycle-{dataset}-{n}",
        dataset=dataset,
        model=model,
        train_limit=limit,
        test_limit=50,
        optimizer='"sgd"\nlr = 0.05\nmomentum = 0.9',
        scheduler='"onecycle"',
        epochs=epochs,
    )
    study, summary, per_trial = run(spec, storage)
    assert_all_complete(study, summary, 1)
    rec = TrialRecord.of(study.trials[0], spec.task)
    assert rec.epochs_run == len(rec.train_loss) == epochs and rec.test is not None
    lrs = per_trial[0]
    # One scheduler step per batch the loop really ran, and the whole cycle used.
    assert len(lrs) == epochs * batches
    assert lrs[0] == pytest.approx(lr / 25)
    assert lr / 2 < max(lrs) <= lr * (1 + 1e-9)  # the peak is the optimizer's lr (max_lr's default)
    assert lrs[-1] == pytest.approx(lr / 25 / 1e4, rel=1e-6)  # max_lr / div_factor / final_div_factor
    assert lrs == approx(replay(study.trials[0], spec, batches))


@pytest.mark.parametrize(
    ("dataset", "model", "limit", "n", "batches", "optimizers"),
    [
        # The fast set runs every scheduler with SGD (momentum, so onecycle cycles it too); the
        # slow set crosses them with SGD and Adam, on each kind of size.
        pytest.param(*TOY_631, ["sgd"], id="toy-631-sgd"),
        pytest.param(*TOY_631, ["sgd", "adam"], id="toy-631", marks=pytest.mark.slow),
        pytest.param(*TOY_833, ["sgd", "adam"], id="toy-833-drop-1", marks=pytest.mark.slow),
        pytest.param(*SYN_129, ["sgd", "adam"], id="synthetic-129-drop-1", marks=pytest.mark.slow),
    ],
)
def test_every_scheduler_completes_from_a_grid(
    tmp_path: Path,
    storage: str,
    dataset: str,
    model: str,
    limit: int,
    n: int,
    batches: int,
    optimizers: list[str],
) -> None:
    spec = study_file(
        tmp_path,
        f"every-scheduler-{dataset}-{n}-{'-'.join(optimizers)}",
        dataset=dataset,
        model=model,
        train_limit=limit,
        test_limit=50,
        optimizer=f"{{ choices = {optimizers} }}\nlr = 0.01\n\n[optimizer.sgd]\nmomentum = 0.5",
        scheduler=f"{{ choices = {SCHEDULERS.names()} }}",
        epochs=3,
        # step moves every epoch and plateau as soon as the metric stalls, so both act in 3 epochs.
        extra="[scheduler.step]\nstep_size = 1\n\n[scheduler.plateau]\npatience = 0\n",
    )
    pairs = {(o, s) for o in optimizers for s in SCHEDULERS.names()}
    assert spec.n_trials == len(pairs)
    study, summary, per_trial = run(spec, storage)
    assert_all_complete(study, summary, len(pairs))
    configs = {t.number: t.user_attrs["config"] for t in study.trials}
    assert {(c["optimizer"]["name"], c["scheduler"]["name"]) for c in configs.values()} == pairs
    for trial in study.trials:
        name = configs[trial.number]["scheduler"]["name"]
        lrs = per_trial[trial.number]
        assert len(trial.user_attrs["train_loss"]) == 3, name
        # The loop stepped each scheduler when it promised to, sized from the batches it really ran.
        assert lrs == approx(replay(trial, spec, batches)), name
        if name == "none":
            assert set(lrs) == {0.01}
        elif name != "plateau":  # plateau moves only if the metric stalls
            assert len(set(lrs)) > 1, (name, lrs)


def test_step_changes_the_rate_between_epochs_only(tmp_path: Path, storage: str) -> None:
    # A step schedule that all but stops training after the first epoch, against no schedule, both
    # from one seed. Stepped per epoch, the first epoch trains exactly as without a schedule, and
    # the weights then hardly move: the later epochs' training loss stays where it was.
    spec = study_file(
        tmp_path,
        "step-vs-none",
        dataset="toy_regression",
        model="mlp",
        train_limit=701,
        optimizer='"sgd"\nlr = 0.1',
        scheduler='{ choices = ["none", "step"] }',
        epochs=3,
        extra="seed = 5\n\n[scheduler.step]\nstep_size = 1\ngamma = 1e-6\n",
    )
    study, summary, per_trial = run(spec, storage)
    assert_all_complete(study, summary, 2)
    by_name = {t.params["scheduler.name"]: t for t in study.trials}
    none, step = (TrialRecord.of(by_name[k], spec.task).train_loss for k in ("none", "step"))
    assert step[0] == pytest.approx(none[0], rel=1e-9)
    assert step[2] == pytest.approx(step[1], rel=1e-4)
    assert none[2] < 0.9 * none[1]  # without the decay the loss goes on falling
    lrs = per_trial[by_name["step"].number]
    assert lrs == approx([0.1] * 10 + [0.1 * 1e-6] * 10 + [0.1 * 1e-12] * 10)


def test_plateau_steps_on_the_validation_metric(tmp_path: Path, storage: str) -> None:
    # Accuracy on 14 validation images rises, then stays at its best: the plateau scheduler cuts the
    # rate only after an epoch without a better accuracy. A loop that stepped it on the training
    # loss (falling, so never better in "max" mode) would cut it after every epoch.
    spec = study_file(
        tmp_path,
        "plateau-on-val",
        dataset="synthetic",
        model="mnist_cnn",
        train_limit=143,
        test_limit=20,
        optimizer='"adam"\nlr = 0.003',
        scheduler='"plateau"',
        epochs=5,
        extra="seed = 3\n\n[scheduler.plateau]\npatience = 0\nfactor = 0.5\n",
    )
    assert spec.direction == "maximize"
    study, summary, per_trial = run(spec, storage)
    assert_all_complete(study, summary, 1)
    trial = study.trials[0]
    rec = TrialRecord.of(trial, spec.task)
    lrs = per_trial[0]
    on_val = replay(trial, spec, batches=2)
    on_loss = replay(trial, spec, batches=2, metrics=rec.train_loss)
    assert lrs == approx(on_val)
    # The run is one that tells the two apart: after epoch 1 the accuracy both rose and stalled.
    per_epoch = lrs[::2]
    cuts = [after < before for before, after in itertools.pairwise(per_epoch)]
    assert any(cuts) and not all(cuts), (rec.val, per_epoch)
    assert on_val != on_loss
