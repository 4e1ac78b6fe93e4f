"""Out of memory is data: a trial that runs out of device memory fails as ``oom`` with its batch size,
lets go of its memory, and the study goes on, sampling no batch size at or above it again; a run stops
only once more of its trials failed than ``[study] max_fail_fraction`` allows.

Memory runs out in a real model plug-in, registered like a user's: its forward pass raises torch's
own out-of-memory error on a batch of ``rows`` examples or more, as CUDA would. Studies run on the
real FashionMNIST subset into real SQLite files, through ``hpsearch run`` or ``run_study``.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner, Result
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from conftest import write_study
from hpsearch.cli import main
from hpsearch.models import MODELS
from hpsearch.record import OOM_BATCH_SIZE, TrialRecord
from hpsearch.search import AvoidOom
from hpsearch.spec import SpecError, load_spec
from hpsearch.study import open_study, run_study
from hpsearch.task import CLASSIFICATION

# Every network ``runs_out`` built, oldest first: whether one is still alive after its trial ended.
BUILT: list[weakref.ref[nn.Module]] = []


class RunsOut(nn.Module):
    """A linear classifier whose forward pass runs out of memory on ``rows`` examples or more."""

    def __init__(self, in_features: int, num_classes: int, rows: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows and len(x) >= self.rows:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB"
            )
        return self.net(x)


@MODELS.register(input_size=28)
def runs_out(in_channels: int, num_classes: int, *, rows: int = 0) -> nn.Module:
    """A linear classifier that runs out of memory on a batch of ``rows`` examples or more (0: never;
    tests only)."""
    model = RunsOut(in_channels * 28 * 28, num_classes, rows)
    BUILT.append(weakref.ref(model))
    return model


# 150 examples, 15 for validation: 135 to train on, which no batch size here divides. Batches of 96
# (96, 39) and of 128 (128, 7) run out of memory at 64 rows; those of 16 and 40 never reach it, and
# neither do the 15 validation and 30 test examples.
STUDY = """
[study]
n_trials = {n_trials}
seed = 0
sampler = {sampler}
pruner = "none"
{study}

[data]
name = "fashion_mnist"
batch_size = {batch_size}
train_limit = 150
test_limit = 30

[model]
name = "runs_out"
rows = 64

[optimizer]
name = "sgd"
lr = {{ low = 0.005, high = 0.03, log = true }}  # low enough that no trial diverges (pruned)

[train]
epochs = 1
"""

CHOICES = "{ choices = [16, 40, 96, 128] }"


def oom_reason(size: int) -> str:
    return f"oom: out of memory at batch size {size} (OutOfMemoryError: CUDA out of memory)"


def run(path: Path, storage: str, *args: str) -> Result:
    return CliRunner().invoke(
        main, ["run", "--study", str(path), "--storage", storage, "--device", "cpu", *args]
    )


def trials(name: str, storage: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def assert_oom(trial: FrozenTrial, size: int = 96) -> None:
    assert trial.state == TrialState.FAIL
    record = TrialRecord.of(trial, CLASSIFICATION)
    assert record.fail_reason == oom_reason(size), record.fail_reason
    assert record.oom_batch_size == trial.user_attrs[OOM_BATCH_SIZE] == size


def assert_below_ceilings(done: list[FrozenTrial]) -> None:
    """Each trial ran out of memory as ``oom`` or completed, and none after one that ran out sampled a
    batch size at or above the one it ran out at; at least one ran out."""
    ceiling = None
    for trial in sorted(done, key=lambda t: t.number):
        size = trial.params["data.batch_size"]
        assert ceiling is None or size < ceiling, f"trial {trial.number}: {size} after {ceiling} ran out"
        if trial.state == TrialState.FAIL:
            assert_oom(trial, size)
            ceiling = size
        else:
            assert trial.state == TrialState.COMPLETE
    assert ceiling is not None


# Seeded: both samplers run out of memory at 128 in trial 1; without the ceiling both draw 128 again in
# trial 2, and TPE's own (relative) proposals from trial 6 on are 96 or 128, each brought down to 40.
# Without the ceiling a study of such a TPE search never ends (it learns from no failed trial), so the
# first run is of 10 trials, ended however they end, and no failure rate stops it.
@pytest.mark.parametrize("sampler", ['"random"', '{ name = "tpe", n_startup_trials = 4 }'])
def test_a_trial_that_runs_out_of_memory_fails_and_the_study_samples_below_it(
    tmp_path: Path, sampler: str
) -> None:
    text = STUDY.format(n_trials=10, sampler=sampler, study="max_fail_fraction = 1.0", batch_size=CHOICES)
    path = write_study(tmp_path, "oom", text)
    storage = f"sqlite:///{tmp_path / 'oom.db'}"
    result = run(path, storage, "--n-trials", "10")
    assert result.exit_code == 0, result.output
    done = trials("oom", storage)
    assert len(done) == 10
    assert_below_ceilings(done)
    assert "failed:\n  " + oom_reason(128) in result.output  # the run's summary of failures
    # The same command without --n-trials goes on to the study's 10 finished trials.
    result = run(path, storage)
    assert result.exit_code == 0, result.output
    done = trials("oom", storage)
    assert sum(t.state == TrialState.COMPLETE for t in done) == 10 < len(done)
    assert_below_ceilings(done)


def ceiling_study() -> optuna.Study:
    """A study with ``AvoidOom``'s ceiling at 50: trials ran out of memory at batch sizes 50 and 80."""
    study = optuna.create_study(sampler=AvoidOom(optuna.samplers.RandomSampler(seed=0), "data.batch_size"))
    for size in (50, 80):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={OOM_BATCH_SIZE: size}))
    return study


def test_the_ceiling_keeps_a_range_on_its_steps_and_keeps_what_has_nothing_below_it() -> None:
    study = ceiling_study()
    sizes = [study.ask().suggest_int("data.batch_size", 10, 101, step=7) for _ in range(30)]
    # 10, 17, ..., 45 lie below the ceiling; the draws above it all become 45.
    assert set(sizes) <= {10, 17, 24, 31, 38, 45} and sizes.count(45) > 5, sizes
    # No choice lies below it: the sampler's own draws stand (and those trials run out again).
    study = ceiling_study()
    assert {study.ask().suggest_categorical("data.batch_size", [64, 128]) for _ in range(10)} == {64, 128}
    # Other parameters are the sampler's own.
    assert max(study.ask().suggest_int("data.crop_padding", 0, 100) for _ in range(10)) > 50


def test_a_trial_that_ran_out_of_memory_lets_go_of_its_network_at_once(tmp_path: Path) -> None:
    text = STUDY.format(n_trials=2, sampler='"random"', study="", batch_size=96)
    spec = load_spec(write_study(tmp_path, "freed", text))
    study = open_study(spec, f"sqlite:///{tmp_path / 'freed.db'}")
    alive: list[bool] = []

    def ended(_: optuna.Study, trial: FrozenTrial) -> None:
        # While the run goes on, and still holds the trial: its network, the last one built, is gone.
        assert_oom(trial)
        gc.collect()
        alive.append(BUILT[-1]() is not None)

    summary = run_study(spec, study, n_trials=2, device="cpu", on_trial=ended)
    assert summary.states["fail"] == 2
    assert alive == [False, False]


def test_a_run_stops_once_more_trials_failed_than_max_fail_fraction(tmp_path: Path) -> None:
    text = STUDY.format(n_trials=20, sampler='"random"', study="", batch_size=96)
    path = write_study(tmp_path, "always-oom", text)
    storage = f"sqlite:///{tmp_path / 'always.db'}"
    result = run(path, storage, "--n-trials", "20")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error == [
        f"Error: 5 of the 5 trials this run ended failed (most often: {oom_reason(96)} (5)), more than "
        f"study.max_fail_fraction = 0.5; fix the cause, or raise max_fail_fraction in {path}; "
        "the finished trials are kept"
    ]
    stored = trials("always-oom", storage)
    assert len(stored) == 5
    for trial in stored:
        assert_oom(trial)

    # A run-only key: raised to 1, the study resumes and runs every trial asked for.
    path.write_text(text.replace('pruner = "none"', 'pruner = "none"\nmax_fail_fraction = 1.0'))
    result = run(path, storage, "--n-trials", "6")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert (
        result.output.splitlines()[-1] == "Error: every trial of this run failed (6); the reasons are above"
    )
    stored = trials("always-oom", storage)
    assert len(stored) == 11
    assert {t.state for t in stored} == {TrialState.FAIL}


@pytest.mark.parametrize(
    ("value", "why"),
    [("0", "must be in (0, 1], not 0"), ("1.5", "not 1.5"), ('"x"', "'x' has the wrong type")],
)
def test_max_fail_fraction_is_checked_at_load(tmp_path: Path, value: str, why: str) -> None:
    text = STUDY.format(n_trials=2, sampler='"random"', study=f"max_fail_fraction = {value}", batch_size=96)
    path = write_study(tmp_path, "bad-fraction", text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: study.max_fail_fraction: ") and why in message, message
    assert "\n" not in message


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Torch on two threads, so that a pack trained side by side has a thread count to give back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_running_out_of_memory_in_a_pack_ends_every_member(tmp_path: Path, two_threads: None) -> None:
    text = STUDY.format(n_trials=2, sampler='"random"', study="", batch_size=96)
    path = write_study(tmp_path, "pack-oom", text)
    storage = f"sqlite:///{tmp_path / 'pack.db'}"
    result = run(path, storage, "--pack", "2", "--n-trials", "2")
    assert result.exit_code == 1, result.output
    assert (
        result.output.splitlines()[-1] == "Error: every trial of this run failed (2); the reasons are above"
    )
    stored = trials("pack-oom", storage)
    assert len(stored) == 2
    for trial in stored:
        assert_oom(trial)
        assert trial.user_attrs["pack"] == [0, 1]
    assert torch.get_num_threads() == 2  # the side-by-side steps gave their threads back


def test_running_out_in_evaluation_names_the_evaluation_batch_and_sets_no_ceiling(tmp_path: Path) -> None:
    # 1,000 examples, 100 for validation: the training batches (16, 40) fit, and the one validation
    # batch of 100 (at [train] eval_batch_size = 100) runs out at 64 rows.
    text = STUDY.format(n_trials=3, sampler='"random"', study="", batch_size="{ choices = [16, 40] }")
    text = text.replace("train_limit = 150", "train_limit = 1000").replace(
        "epochs = 1", "epochs = 1\neval_batch_size = 100"
    )
    path = write_study(tmp_path, "eval-oom", text)
    storage = f"sqlite:///{tmp_path / 'eval.db'}"
    result = run(path, storage, "--n-trials", "3")
    assert result.exit_code == 1, result.output  # every trial of the run failed
    done = trials("eval-oom", storage)
    assert len(done) == 3 and all(t.state == TrialState.FAIL for t in done)
    for t in done:
        record = TrialRecord.of(t, CLASSIFICATION)
        assert record.fail_reason == (
            "oom: out of memory evaluating at batch size 100 (OutOfMemoryError: CUDA out of memory); "
            "lower [train] eval_batch_size"
        )
        assert record.oom_batch_size is None and OOM_BATCH_SIZE not in t.user_attrs
