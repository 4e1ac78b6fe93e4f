"""The device-resident data pipeline against torchvision's reference path, on the real FashionMNIST.

The reference is what the seed scripts ran: torchvision's ``datasets.FashionMNIST`` read from the
same four files, PIL images, ``transforms.Resize``, ``ToTensor``, ``Normalize`` with hpsearch's
mean and std, and ``RandomHorizontalFlip``. hpsearch keeps the uint8 images on the device, shuffles
and slices index tensors, and converts each batch there (``Dataset.inputs``). These tests run the
real training and evaluation loops and identify every image a model is given with the reference
image of one index, so that a batch that is lost, repeated, mislabelled or mis-scaled shows.

The training loop is run as a trial runs it (``run_trial`` on a study file, which splits the data,
sizes the batches, seeds the generator and calls ``train_epoch`` and ``evaluate``), with a model
that records what it is given and a loss that records the labels it is scored against.
"""

from __future__ import annotations

import gzip
import itertools
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets as tv_datasets
from torchvision import transforms

from hpsearch.datasets import (
    DEBIAN_FASHION_MNIST,
    DataConfig,
    Dataset,
    load_dataset,
    split,
    subset,
    validation_size,
)
from hpsearch.models import MODELS
from hpsearch.schema import TrainConfig
from hpsearch.spec import Choice, TrialConfig, load_spec
from hpsearch.task import CLASSIFICATION, Task
from hpsearch.train import LATENCY_RUNS, evaluate, run_trial

SEED = 0
# 334 examples, 33 of them (10 %, rounded down) for validation: 301 to train on, which batches of
# 64 cover as 64, 64, 64, 64 and 45.
LIMIT, VAL_FRACTION, BATCH = 334, 0.1, 64
N_TRAIN = LIMIT - validation_size(LIMIT, VAL_FRACTION)
BATCH_SIZES = [BATCH] * (N_TRAIN // BATCH) + [N_TRAIN % BATCH]
N_TEST = 301  # test images scored at the end, in evaluation batches of 64: the last one 45
CPU = torch.device("cpu")

# Identical inputs: the same float32 arithmetic on the same bytes, so far below one grey level.
SAME = 1e-6


@dataclass(frozen=True)
class Reference:
    """torchvision's FashionMNIST training and test sets, as a seed script opened them."""

    train: tv_datasets.FashionMNIST
    test: tv_datasets.FashionMNIST


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    """hpsearch's copy, loaded once per process as a trial loads it, from the Debian files."""
    assert DEBIAN_FASHION_MNIST.is_dir(), (
        f"{DEBIAN_FASHION_MNIST} missing: apt-get install dataset-fashion-mnist"
    )
    return load_dataset("fashion_mnist", str(DEBIAN_FASHION_MNIST), "cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """torchvision's reader over the same four files, unpacked into the layout it expects."""
    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in sorted(DEBIAN_FASHION_MNIST.glob("*.gz")):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return Reference(
        tv_datasets.FashionMNIST(str(root), train=True), tv_datasets.FashionMNIST(str(root), train=False)
    )


@pytest.fixture(scope="module")
def train_idx() -> torch.Tensor:
    """The training indices of a quick study (``train_limit = 334``), split as a trial splits them."""
    idx, _ = split(60_000, VAL_FRACTION, SEED, LIMIT)
    assert len(idx) == N_TRAIN == 301
    return idx


def reference_inputs(
    data: Dataset,
    images: tv_datasets.FashionMNIST,
    idx: torch.Tensor,
    size: int | None = None,
    mirror: bool = False,
) -> torch.Tensor:
    """The seed scripts' model inputs for ``idx``: PIL image → [Resize] → [flip] → ToTensor → Normalize."""
    steps: list[Callable[[Any], Any]] = [transforms.Resize(size)] if size else []
    if mirror:
        steps.append(transforms.RandomHorizontalFlip(p=1.0))
    steps += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    pipeline = transforms.Compose(steps)
    return torch.stack([pipeline(images[i][0]) for i in idx.tolist()])


class Catalogue:
    """Reference images, in which an image a model was given is looked up by its values.

    An image is identified with the one reference image it lies within ``tolerance`` of at every
    pixel. The references are checked to differ pairwise by more than twice that somewhere, so no
    image can match two of them.
    """

    def __init__(self, images: torch.Tensor, tolerance: float) -> None:
        self.flat = images.flatten(1).double()
        self.tolerance = tolerance
        dim = self.flat.shape[1]
        # The largest absolute difference of two images is at least their distance / sqrt(dim).
        apart = torch.cdist(self.flat, self.flat).fill_diagonal_(math.inf)
        assert float(apart.min()) / math.sqrt(dim) > 2 * tolerance, "two reference images too alike"
        # Candidates are found by a few random projections, then checked at every pixel.
        g = torch.Generator().manual_seed(0)
        self.projection = torch.randn(dim, 16, generator=g, dtype=torch.float64)
        self.keys = self.flat @ self.projection

    def __len__(self) -> int:
        return len(self.flat)

    def find(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """The position of each image of ``batches``, in order."""
        flat = torch.cat(batches).flatten(1).double()
        positions = torch.cdist(flat @ self.projection, self.keys).argmin(1)
        worst = (flat - self.flat[positions]).abs().amax(1)
        assert float(worst.max()) <= self.tolerance, f"an image matching none, off by {worst.max():.4g}"
        return positions

    def each_once(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """``find``, checking that the batches hold every reference image exactly once."""
        positions = self.find(batches)
        assert sorted(positions.tolist()) == list(range(len(self))), "an image lost or given twice"
        return positions


class Recorder(nn.Module):
    """Runs ``net``, keeping a copy of each batch it is given and whether it was training."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, x.detach().clone()))
        return self.net(x)

    def batches(self, training: bool) -> list[torch.Tensor]:
        return [x for t, x in self.calls if t is training]


BUILT: list[Recorder] = []


# Registered like any user's model, so that a study file can name it; any input size will do.
@MODELS.register(input_size=None)
def pipeline_recorder(in_channels: int, num_classes: int) -> nn.Module:
    """A small classifier that keeps a copy of every batch it is given (tests only)."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, num_classes))
    BUILT.append(Recorder(net))
    return BUILT[-1]


class LabelRecorder(nn.Module):
    """Cross-entropy that keeps a copy of the labels of each batch it scores."""

    def __init__(self, labels: list[torch.Tensor]) -> None:
        super().__init__()
        self.labels = labels

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.labels.append(y.detach().clone())
        return F.cross_entropy(out, y)


STUDY = """
[study]
seed = {seed}
pruner = "none"

[data]
name = "fashion_mnist"
batch_size = {batch}
val_fraction = {val_fraction}
train_limit = {limit}
test_limit = {n_test}
resize = {resize}
flip = {flip}

[model]
name = "pipeline_recorder"

[optimizer]
name = "sgd"
lr = 0.01

[train]
epochs = 2
seed = {train_seed}
eval_batch_size = {batch}
"""


@dataclass
class Epoch:
    """What one training epoch gave the model: each batch's inputs and labels, in order."""

    inputs: list[torch.Tensor]
    labels: list[torch.Tensor]


@dataclass
class Run:
    """What a two-epoch trial gave its model: the training epochs, the validation passes after
    each, and the test pass at the end."""

    epochs: list[Epoch]
    val: list[list[torch.Tensor]]
    test: list[torch.Tensor]
    latency: list[torch.Tensor]  # the batches of one that ``latency_ms`` timed


def run_recorded(
    folder: Path, monkeypatch: pytest.MonkeyPatch, resize: int = 0, flip: bool = False, train_seed: int = 1
) -> Run:
    """Run one trial of a two-epoch study on FashionMNIST and return what its model was given."""
    labels: list[torch.Tensor] = []

    def recording_loss(task: Task, label_smoothing: float = 0.0) -> nn.Module:
        assert task is CLASSIFICATION and label_smoothing == 0.0
        return LabelRecorder(labels)

    monkeypatch.setattr(Task, "loss", recording_loss)
    BUILT.clear()
    text = STUDY.format(
        seed=SEED,
        batch=BATCH,
        val_fraction=VAL_FRACTION,
        limit=LIMIT,
        n_test=N_TEST,
        resize=resize,
        flip=str(flip).lower(),
        train_seed=train_seed,
    )
    path = folder / f"pipeline-{resize}-{flip}-{train_seed}.toml"
    path.write_text(text, encoding="utf-8")
    spec = load_spec(path)
    trial = optuna.create_study(direction=spec.direction).ask()
    run_trial(trial, spec, CPU, str(DEBIAN_FASHION_MNIST))
    model = BUILT.pop()  # validating the study file builds one too: the trial's is the last
    BUILT.clear()
    # The model's calls in order: an epoch's batches, its validation pass; again; then the test pass
    # and the latency's passes of one test example.
    runs = [(t, [x for _, x in group]) for t, group in itertools.groupby(model.calls, key=lambda c: c[0])]
    assert [t for t, _ in runs] == [True, False, True, False]
    (_, first), (_, val), (_, second), (_, rest) = runs
    assert len(labels) == len(first) + len(second)
    return Run(
        [Epoch(first, labels[: len(first)]), Epoch(second, labels[len(first) :])],
        [val, rest[: len(val)]],
        rest[len(val) : -2 * LATENCY_RUNS],
        rest[-2 * LATENCY_RUNS :],
    )


# 1. Every training index once per epoch, with its label, through the real loop.


@pytest.mark.parametrize("resize", [0, 45], ids=["native", "resize45"])
def test_each_epoch_feeds_every_training_index_once_with_its_label(
    fashion: Dataset,
    reference: Reference,
    train_idx: torch.Tensor,
    resize: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = run_recorded(tmp_path, monkeypatch, resize=resize)
    side = resize or 28
    # Resized images match their reference to one grey level (see the resize test), not exactly.
    tolerance = one_level(fashion) + 1e-5 if resize else SAME
    ref = Catalogue(reference_inputs(fashion, reference.train, train_idx, resize or None), tolerance)
    ref_labels = reference.train.targets[train_idx]
    orders = []
    for epoch in run.epochs:
        assert [len(x) for x in epoch.inputs] == BATCH_SIZES == [64, 64, 64, 64, 45]
        for x, y in zip(epoch.inputs, epoch.labels, strict=True):
            assert x.dtype == torch.float32 and x.shape == (len(x), 1, side, side)
            assert y.dtype == torch.long and y.shape == (len(x),)
        # Each of the 301 training images exactly once: none lost to the short last batch, none twice.
        positions = ref.each_once(epoch.inputs)
        # The label the loss was given is the image's own.
        assert torch.equal(torch.cat(epoch.labels), ref_labels[positions])
        orders.append(train_idx[positions])
    # Shuffled, and afresh each epoch.
    assert not torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], train_idx) and not torch.equal(orders[0], train_idx.sort().values)
    # Each validation pass scores the 33 held-out images, each once, and the test pass its 301.
    _, val_idx = split(60_000, VAL_FRACTION, SEED, LIMIT)
    ref_val = Catalogue(reference_inputs(fashion, reference.train, val_idx, resize or None), tolerance)
    for passed in run.val:
        ref_val.each_once(passed)
    test_idx = subset(10_000, SEED, N_TEST)
    assert [len(x) for x in run.test] == [64, 64, 64, 64, 45]
    ref_test = Catalogue(reference_inputs(fashion, reference.test, test_idx, resize or None), tolerance)
    ref_test.each_once(run.test)
    # The latency is timed on the first test example, prepared as the test pass prepares it.
    assert all(torch.equal(x, run.test[0][:1]) for x in run.latency)


# 2. Normalisation.


def test_stored_images_and_labels_are_torchvisions(fashion: Dataset, reference: Reference) -> None:
    assert torch.equal(fashion.train_x[:, 0], reference.train.data)
    assert torch.equal(fashion.train_y, reference.train.targets)
    assert torch.equal(fashion.test_x[:, 0], reference.test.data)
    assert torch.equal(fashion.test_y, reference.test.targets)


@pytest.mark.parametrize("part", ["train", "test"])
def test_normalisation_equals_totensor_and_normalize(
    fashion: Dataset, reference: Reference, train_idx: torch.Tensor, part: str
) -> None:
    idx = train_idx if part == "train" else subset(10_000, SEED, N_TEST)
    xs, images = (fashion.train_x, reference.train) if part == "train" else (fashion.test_x, reference.test)
    ours = fashion.inputs(xs[idx])
    want = reference_inputs(fashion, images, idx)
    assert ours.dtype == torch.float32 and ours.shape == want.shape == (301, 1, 28, 28)
    assert float((ours - want).abs().max()) <= SAME
    # The inputs are centred and scaled: a unit-free check that mean and std were applied at all.
    assert abs(float(ours.mean())) < 0.1 and abs(float(ours.std()) - 1) < 0.1


# 3. Resize.


def one_level(data: Dataset) -> float:
    """One grey level (1/255) in normalised units."""
    return 1 / 255 / data.std[0]


# Largest mean absolute difference per size, in normalised units, that the device path may show:
# PIL resizes 8-bit images and rounds its result to 8 bits, so the two differ by up to one grey
# level (≈ 0.0111) per pixel and by about a fifth of one on average (0.0020–0.0023 measured here).
RESIZE_MEAN_TOLERANCE = 0.0025


@pytest.mark.parametrize("size", [224, 96, 45, 20, 14])
def test_resize_matches_torchvision_resize(
    fashion: Dataset, reference: Reference, train_idx: torch.Tensor, size: int
) -> None:
    # torchvision resizes a PIL image with PIL's bilinear filter, which antialiases: when shrinking,
    # every source pixel under an output pixel counts, not just the four nearest.
    resize = transforms.Resize(size)
    assert resize.interpolation is transforms.InterpolationMode.BILINEAR and resize.antialias
    idx = train_idx[:64]
    ours = fashion.inputs(fashion.train_x[idx], resize=size)
    want = reference_inputs(fashion, reference.train, idx, size)
    assert ours.dtype == torch.float32 and ours.shape == want.shape == (64, 1, size, size)
    diff = (ours - want).abs()
    assert float(diff.max()) <= one_level(fashion) + 1e-5, f"max {diff.max():.5f}"
    assert float(diff.mean()) <= RESIZE_MEAN_TOLERANCE, f"mean {diff.mean():.5f}"


# 4. Flips.


def mirror_catalogue(fashion: Dataset, reference: Reference, idx: torch.Tensor) -> Catalogue:
    """The reference inputs of ``idx``, then their mirrors (torchvision's flip of each)."""
    plain = reference_inputs(fashion, reference.train, idx)
    mirrored = reference_inputs(fashion, reference.train, idx, mirror=True)
    return Catalogue(torch.cat([plain, mirrored]), SAME)


def flips(catalogue: Catalogue, idx: torch.Tensor, run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per training epoch of ``run``: the indices in the order the model was given them, and which
    of ``idx`` (by position) it was given mirrored.

    Each image must be exactly its source image or exactly its mirror (``mirror_catalogue``).
    """
    out = []
    for epoch in run.epochs:
        positions = catalogue.find(epoch.inputs)
        seen = positions % len(idx)
        assert sorted(seen.tolist()) == list(range(len(idx)))
        flipped = torch.zeros(len(idx), dtype=torch.bool)
        flipped[seen] = positions >= len(idx)
        out.append((idx[seen], flipped))
    return out


def test_flips_mirror_about_half_the_images_reproducibly(
    fashion: Dataset,
    reference: Reference,
    train_idx: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No training image is its own mirror, so kept and flipped images can be told apart.
    x = fashion.train_x[train_idx]
    assert not (x == x.flip(-1)).flatten(1).all(1).any()
    catalogue = mirror_catalogue(fashion, reference, train_idx)
    epochs = flips(catalogue, train_idx, run_recorded(tmp_path, monkeypatch, flip=True))
    for _, flipped in epochs:
        # Binomial(301, 1/2) is 150.5 ± 8.7: outside 100..201 is a 5.8-sigma event.
        assert 100 <= int(flipped.sum()) <= 201
    # Each image is flipped or not afresh each epoch, not once for good.
    assert not torch.equal(epochs[0][1], epochs[1][1])
    # The trial's seed decides the order and the flips: the same seed, the same epochs.
    again = flips(catalogue, train_idx, run_recorded(tmp_path, monkeypatch, flip=True))
    for (order, flipped), (order2, flipped2) in zip(epochs, again, strict=True):
        assert torch.equal(order, order2) and torch.equal(flipped, flipped2)
    other = flips(catalogue, train_idx, run_recorded(tmp_path, monkeypatch, flip=True, train_seed=2))
    assert not torch.equal(epochs[0][1], other[0][1])


def test_no_flips_unless_asked(
    fashion: Dataset,
    reference: Reference,
    train_idx: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalogue = mirror_catalogue(fashion, reference, train_idx)
    for _, flipped in flips(catalogue, train_idx, run_recorded(tmp_path, monkeypatch)):
        assert not flipped.any()


def test_flips_are_drawn_from_the_generator_given(fashion: Dataset, train_idx: torch.Tensor) -> None:
    # The trial's generator alone decides the flips (a checkpoint restores it), not torch's global
    # one; and it moves on, so each batch draws anew.
    x = fashion.train_x[train_idx]
    g = torch.Generator().manual_seed(5)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = fashion.inputs(x, flip=True, generator=g)
        second = fashion.inputs(x, flip=True, generator=g)
        torch.manual_seed(1)
        again = fashion.inputs(x, flip=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


# 5. Evaluation.


def class_means(fashion: Dataset, reference: Reference, idx: torch.Tensor) -> Recorder:
    """A nearest-class-mean classifier fitted on the reference inputs of ``idx``: far from chance,
    so a lost or repeated image changes its accuracy."""
    x = reference_inputs(fashion, reference.train, idx).flatten(1)
    y = reference.train.targets[idx]
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    linear = nn.Linear(28 * 28, 10)
    with torch.no_grad():
        linear.weight.copy_(means)
        linear.bias.copy_(-0.5 * means.pow(2).sum(1))
    return Recorder(nn.Sequential(nn.Flatten(), linear))


@pytest.mark.parametrize("eval_batch", [64, 301, 1024])
def test_evaluate_scores_each_test_index_once(
    fashion: Dataset, reference: Reference, train_idx: torch.Tensor, eval_batch: int
) -> None:
    model = class_means(fashion, reference, train_idx)
    test_idx = subset(10_000, SEED, N_TEST)
    # evaluate reads the evaluation batch size and the resize; the rest only completes the config.
    cfg = TrialConfig(
        data=DataConfig("fashion_mnist", batch_size=BATCH),
        model=Choice("linear", {}),
        optimizer=Choice("sgd", {"lr": 0.01}),
        scheduler=Choice("none", {}),
        train=TrainConfig(eval_batch_size=eval_batch),
    )
    accuracy = evaluate(model, fashion, CLASSIFICATION, fashion.test_x, fashion.test_y, test_idx, cfg, CPU)
    batches = model.batches(training=False)
    assert [len(x) for x in batches] == [min(eval_batch, N_TEST - i) for i in range(0, N_TEST, eval_batch)]
    ref = reference_inputs(fashion, reference.test, test_idx)
    Catalogue(ref, SAME).each_once(batches)
    # The same model, one reference image at a time.
    labels = reference.test.targets[test_idx]
    with torch.no_grad():
        right = sum(int(model.net(ref[i : i + 1]).argmax(1).item() == labels[i]) for i in range(N_TEST))
    assert right > 150  # well above chance (30 of 301)
    assert accuracy == right / N_TEST


# 6. The train/validation split.


@pytest.mark.parametrize(
    ("n", "fraction", "limit", "n_val"),
    [(60_000, 0.1, 0, 6000), (60_000, 0.1, LIMIT, 33), (100, 0.29, 0, 29), (800, 0.5, 301, 150)],
)
def test_split_partitions_the_pool(n: int, fraction: float, limit: int, n_val: int) -> None:
    train, val = split(n, fraction, SEED, limit)
    pool = subset(n, SEED, limit)
    assert len(val) == n_val == validation_size(limit or n, fraction) and len(train) == (limit or n) - n_val
    both = torch.cat([train, val])
    # Disjoint, and together exactly the pool (all n when there is no limit), each index once.
    assert both.unique().numel() == len(both)
    assert torch.equal(both.sort().values, pool.sort().values)
    if not limit:
        assert torch.equal(both.sort().values, torch.arange(n))
    assert not torch.isin(train, val).any()
    # The same for the same seed, another for another.
    again = split(n, fraction, SEED, limit)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(split(n, fraction, SEED + 1, limit)[1], val)
