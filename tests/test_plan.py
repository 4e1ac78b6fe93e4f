"""``hpsearch plan``: what a study will cost, told before it runs, through the real CLI.

Every bundled study is planned on the CPU (tiny measurements: one setting, one timed step, batches
of a few examples), a model that cannot take its data fails in one line, Hyperband's brackets are
Optuna's own (observed by running Optuna's pruner), a grid's size is counted by hand, and the
checkpoint size is that of a checkpoint `hpsearch run` really wrote.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner, Result
from test_datasets import tiny_mnist, write_cifar, write_mnist
from torch import nn

from conftest import write_study
from hpsearch.cli import main
from hpsearch.models import MODELS
from hpsearch.plan import make_plan
from hpsearch.schema import named
from hpsearch.spec import load_spec

STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.toml"))
OFF_DISK = {"mnist", "cifar10"}  # no Debian package: tiny files in the real formats stand in
# One setting, one timed step, batches of 3 examples: AlexNet and VGG at 224×224 take seconds a
# step at full batch size on two CPU cores.
QUICK = ["--device", "cpu", "--steps", "1", "--max-settings", "1", "--max-batch", "3"]
# Networks that take seconds to build, step and serialise on a CPU even so (AlexNet: 47 M parameters).
HEAVY = {"alexnet", "alexnet_small", "vgg11", "resnet18"}


def bundled() -> list[object]:
    return [
        pytest.param(p, id=p.stem, marks=pytest.mark.slow)
        if set(load_spec(p).space["model"].choices()) & HEAVY
        else pytest.param(p, id=p.stem)
        for p in STUDIES
    ]


class Interrupting(nn.Module):
    """LeNet's layers, whose ``stop_at``-th training forward pass raises KeyboardInterrupt, as Ctrl-C
    landing there would: the trial ends with its checkpoint kept."""

    def __init__(self, in_channels: int, num_classes: int, stop_at: int) -> None:
        super().__init__()
        self.net = MODELS["lenet"](in_channels, num_classes)
        self.stop_at, self.calls = stop_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt
        out: torch.Tensor = self.net(x)
        return out


@MODELS.register(input_size=28)
def interrupting(in_channels: int, num_classes: int, *, stop_at: int = 0) -> nn.Module:
    """LeNet that raises KeyboardInterrupt on its ``stop_at``-th training batch (tests only)."""
    return Interrupting(in_channels, num_classes, stop_at)


# Registered as a user's model would be, without the input size it really needs (28×28), so only
# a real batch can tell that it does not take 32×32 CIFAR-10 images.
@MODELS.register(input_size=None)
def fixed28(in_channels: int, num_classes: int) -> nn.Module:
    """One conv and a linear layer sized for 28×28 input (tests only)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 28 * 28, num_classes)
    )


@MODELS.register(input_size=None)
def grey_only(in_channels: int, num_classes: int) -> nn.Module:
    """Ignores ``in_channels``: one grey channel in, any size (tests only)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, num_classes)
    )


@MODELS.register(input_size=None)
def five_classes(in_channels: int, num_classes: int) -> nn.Module:
    """Ignores ``num_classes``: five outputs, any input size (tests only)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(in_channels * 4, 5))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
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


def plan(*args: str) -> Result:
    return CliRunner().invoke(main, ["plan", *args])


def planned(*args: str) -> str:
    result = plan(*args)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


@pytest.mark.parametrize("path", bundled())
def test_every_bundled_study_is_planned(path: Path, off_disk_data: Path) -> None:
    spec = load_spec(path)
    extra = ["--data-dir", str(off_disk_data)] if spec.raw["data"]["name"] in OFF_DISK else []
    out = planned("--study", str(path), *QUICK, *extra)
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^  (\S+)\s+(searched|fixed)\s", out, re.M)}
    every = [p for s in spec.space.values() for p in s.every_param()]
    assert listed == {p.name: "searched" if p.searched else "fixed" for p in every}
    assert f"search space: {len(spec.param_names())} searched, " in out
    assert f"\npruner: {named(spec.study.pruner)['name']}" in out
    assert "one real batch on cpu" in out and ": ok" in out
    assert re.search(r"^  per trial: \d", out, re.M)
    assert re.search(r"^  study: \d+ trials? on 1 worker: at most \d", out, re.M)
    assert re.search(r"^checkpoints: [\d.]+ [kMG]?B each", out, re.M)


def test_a_model_the_study_file_cannot_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    # LeNet is registered as needing 28×28: the file is refused as it loads.
    path = write_study(tmp_path, "lenet-cifar", STUDY.format(model="lenet", batch=16))
    result = plan("--study", str(path), "--device", "cpu")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "model lenet needs 28×28" in line and "resize = 28" in line


@pytest.mark.parametrize(
    ("model", "remedy"),
    [
        ("fixed28", "it runs at 28×28: set [data] resize = 28, or make the model take 32×32"),
        (
            "grey_only",
            "the model takes 1-channel input but cifar10 has 3 channels: "
            "build its first layer from its in_channels argument",
        ),
        (
            "five_classes",
            "its forward pass runs at this size, so check its output (num_classes = 10 for cifar10) "
            "and its backward pass",
        ),
    ],
)
def test_a_model_that_refuses_a_real_batch_fails_in_one_line(
    model: str, remedy: str, tmp_path: Path, off_disk_data: Path
) -> None:
    # Registered with no input size, so the file loads; the first real batch is what fails.
    path = write_study(tmp_path, "mismatch", STUDY.format(model=model, batch=17))
    assert load_spec(path).raw["model"]["name"] == model
    result = plan("--study", str(path), "--device", "cpu", "--data-dir", str(off_disk_data))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.output.strip().splitlines()
    assert line.startswith(
        f"Error: {path}: model {model} cannot train on cifar10 batches of shape 17×3×32×32 ("
    )
    assert line.endswith(remedy)


STUDY = """
[study]
n_trials = 3
pruner = "none"
[data]
name = "cifar10"
batch_size = {batch}
[model]
name = "{model}"
[optimizer]
name = "sgd"
lr = 0.1
"""

SEARCH = """
[study]
n_trials = {n_trials}
sampler = "random"
pruner = {pruner}
[data]
name = "synthetic"
batch_size = 64
[model]
name = "mnist_cnn"
[optimizer]
name = "sgd"
lr = {{ low = 0.001, high = 0.1, log = true }}
[train]
epochs = {epochs}
"""


def optuna_brackets(
    name: str, n_trials: int, epochs: int, min_resource: int, eta: int, max_resource: int | str
) -> tuple[dict[int, tuple[int, ...]], Counter[int]]:
    """Optuna's HyperbandPruner run on a study of this name whose trials report epochs 1..epochs, as
    hpsearch's do, each better than the last so none is pruned: the epochs at which each bracket
    judged its trials (where Optuna records a completed rung), and the trials in each bracket."""
    pruner = optuna.pruners.HyperbandPruner(min_resource, max_resource, eta)
    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
    judged: list[tuple[int, ...]] = []
    for number in range(n_trials):
        trial = study.ask()
        seen, at = 0, []
        for epoch in range(1, epochs + 1):
            trial.report(number + epoch / 100, epoch)
            assert not trial.should_prune()
            rungs = sum(
                k.startswith("completed_rung_")
                for k in study._storage.get_trial(trial._trial_id).system_attrs
            )
            at += [epoch] * (rungs - seen)
            seen = rungs
        study.tell(trial, number + 1)
        judged.append(tuple(at))
    of = [pruner._get_bracket_id(study, t) for t in study.trials]
    rungs: dict[int, tuple[int, ...]] = {}
    for number, (bracket, at) in enumerate(zip(of, judged, strict=True)):
        if number == 0 and max_resource == "auto":
            continue  # judged before the pruner knew its max_resource: nothing was recorded
        assert rungs.setdefault(bracket, at) == at, (bracket, at)
    return rungs, Counter(of)


@pytest.mark.parametrize(
    ("epochs", "min_resource", "eta", "max_resource"),
    [(10, 1, 3, "auto"), (20, 2, 3, 20), (7, 1, 2, "auto")],
)
def test_hyperband_brackets_and_rungs_are_optunas(
    epochs: int, min_resource: int, eta: int, max_resource: int | str, tmp_path: Path
) -> None:
    n_trials = 61
    explicit = "" if max_resource == "auto" else f", max_resource = {max_resource}"
    pruner = f'{{ name = "hyperband", min_resource = {min_resource}, reduction_factor = {eta}{explicit} }}'
    text = SEARCH.format(n_trials=n_trials, pruner=pruner, epochs=epochs)
    name = f"hb-{epochs}-{min_resource}-{eta}"
    out = planned("--study", str(write_study(tmp_path, name, text)), *QUICK)
    rungs_at = r"rungs? at epochs? ([\d, ]+?)|no rung within the run: never pruned"
    line = rf"bracket (\d+): (?:{rungs_at})\s+(\d+) of 61 trials"
    shown = {
        int(m.group(1)): (tuple(int(e) for e in (m.group(2) or "").split(", ") if e), int(m.group(3)))
        for m in re.finditer(line, out)
    }
    rungs, counts = optuna_brackets(name, n_trials, epochs, min_resource, eta, max_resource)
    assert sorted(shown) == sorted(rungs) == list(range(len(shown))) and len(shown) > 1
    for bracket, (at, trials) in shown.items():
        assert at == rungs[bracket] and trials == counts[bracket], bracket
    assert sum(trials for _, trials in shown.values()) == n_trials


@pytest.mark.parametrize(
    ("table", "pruner"),
    [
        (
            '{ name = "median", n_startup_trials = 1, n_warmup_steps = 2, interval_steps = 3 }',
            optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2, interval_steps=3),
        ),
        (
            '{ name = "percentile", percentile = 25.0, n_startup_trials = 1, interval_steps = 4 }',
            optuna.pruners.PercentilePruner(25.0, n_startup_trials=1, interval_steps=4),
        ),
        (
            '{ name = "threshold", lower = 0.5, n_warmup_steps = 3, interval_steps = 2 }',
            optuna.pruners.ThresholdPruner(lower=0.5, n_warmup_steps=3, interval_steps=2),
        ),
    ],
    ids=["median", "percentile", "threshold"],
)
def test_the_epochs_a_pruner_judges_at_are_optunas(
    table: str, pruner: optuna.pruners.BasePruner, tmp_path: Path
) -> None:
    epochs = 11
    text = SEARCH.format(n_trials=9, pruner=table, epochs=epochs)
    out = planned("--study", str(write_study(tmp_path, "judged", text)), *QUICK)
    m = re.search(r"^  (?:judges a trial )?at epochs? ([\d, ]+): ", out, re.M)
    assert m is not None, out
    shown = [int(e) for e in m.group(1).split(", ")]
    # Optuna's pruner on a trial that is always worse than a completed one and below the threshold:
    # it would stop it at every epoch it judges.
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.add_trial(
        optuna.create_trial(value=0.9, intermediate_values=dict.fromkeys(range(1, epochs + 1), 0.9))
    )
    trial = study.ask()
    judged = []
    for epoch in range(1, epochs + 1):
        trial.report(0.1, epoch)
        if trial.should_prune():
            judged.append(epoch)
    assert shown == judged and judged


def test_patient_without_a_wrapped_pruner_stops_on_its_patience_where_the_plan_says(tmp_path: Path) -> None:
    epochs = 7
    text = SEARCH.format(n_trials=4, pruner='{ name = "patient", patience = 2 }', epochs=epochs)
    path = write_study(tmp_path, "patient", text)
    out = planned("--study", str(path), *QUICK)
    m = re.search(r"^  so the first epoch it can stop a trial at is (\d+)$", out, re.M)
    assert m is not None and "early stopping" in out, out
    # The study's own pruner on a trial that gets worse every epoch: it stops it there.
    study = optuna.create_study(direction="maximize", pruner=load_spec(path).pruner())
    trial = study.ask()
    stopped = None
    for epoch in range(1, epochs + 1):
        trial.report(0.5 - 0.01 * epoch, epoch)
        if trial.should_prune():
            stopped = epoch
            break
    assert stopped == int(m.group(1)) == 4


def test_the_grid_size_is_every_configuration_once(tmp_path: Path) -> None:
    text = textwrap.dedent("""
        [study]
        sampler = "grid"
        pruner = "none"
        [data]
        name = "synthetic"
        batch_size = { choices = [32, 64, 100] }
        [model]
        name = "mnist_cnn"
        [optimizer]
        name = { choices = ["sgd", "adam"] }
        lr = { choices = [0.1, 0.01] }
        [optimizer.sgd]
        momentum = { choices = [0.0, 0.5, 0.9] }
        [scheduler]
        name = { choices = ["none", "step"] }
        [scheduler.step]
        step_size = { choices = [2, 3] }
        [train]
        epochs = 2
    """)
    out = planned("--study", str(write_study(tmp_path, "grid", text)), *QUICK, "--workers", "3")
    # 3 batch sizes × (SGD: 2 rates × 3 momenta + Adam: 2 rates) × (none + step with 2 sizes)
    assert 3 * (2 * 3 + 2) * (1 + 2) == 72
    assert "\ngrid: 72 configurations, each run once\n" in out
    assert "study: 72 trials on 3 workers: at most" in out  # no n_trials: every configuration once


def test_the_checkpoint_size_is_that_of_a_checkpoint_run_writes(tmp_path: Path) -> None:
    # 720 training examples in batches of 300: 300, 300 and 120. The fourth training batch, the
    # first of epoch 2, is interrupted, after epoch 1's checkpoint was written.
    folder = tmp_path / "checkpoints"
    text = textwrap.dedent(f"""
        [study]
        n_trials = 1
        sampler = "random"
        pruner = "none"
        checkpoints = "{folder}"
        [data]
        name = "synthetic"
        batch_size = 300
        [model]
        name = "interrupting"
        stop_at = 4
        [optimizer]
        name = "adam"
        lr = 0.001
        [train]
        epochs = 3
    """)
    path = write_study(tmp_path, "ckpt", text)
    run = CliRunner().invoke(
        main,
        ["run", "--study", str(path), "--storage", f"sqlite:///{tmp_path / 'db.sqlite'}", "--device", "cpu"],
    )
    assert run.exit_code == 130, run.output
    written = (folder / "trial-0.pt").stat().st_size
    assert written > 100_000  # LeNet's weights and Adam's two moments, as floats

    # The plan's warm-up and two timed steps stay short of the interrupting batch.
    out = planned("--study", str(path), "--device", "cpu", "--steps", "2")
    m = re.search(r"^checkpoints: ([\d.]+) (kB|MB) each", out, re.M)
    assert m is not None, out
    shown = float(m.group(1)) * {"kB": 1e3, "MB": 1e6}[m.group(2)]
    assert abs(shown - written) <= 0.01 * written, (shown, written)
    assert "1 at once with 1 worker" in out
    measured = make_plan(load_spec(path), device="cpu", steps=2).checkpoint_bytes
    assert abs(measured - written) <= 1_000, (measured, written)  # the record's history may differ
