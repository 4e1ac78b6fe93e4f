"""Datasets held in memory as tensors: found on disk, read from their real formats, split, batched.

Images stay uint8 on the training device; each batch is an index slice that is converted to float,
resized and normalised on the device (no DataLoader, no PIL), so small datasets cost one copy.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpsearch.errors import HpsearchError
from hpsearch.registry import Registry
from hpsearch.task import CLASSIFICATION, REGRESSION, Task

ENV_DATA_DIR = "HPSEARCH_DATA_DIR"
ENV_CACHE = "HPSEARCH_CACHE"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataNotFound(HpsearchError):
    """No copy of a dataset could be found or fetched; the message names every option tried."""


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one dataset.

    Images are uint8 ``(N, C, H, W)``; regression inputs are float32 ``(N, F)``. ``num_outputs`` is
    the number of classes, or the size of the regression target.
    """

    name: str
    task: Task
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_outputs: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int | None:
        return int(self.train_x.shape[-1]) if self.train_x.dim() == 4 else None

    def to(self, device: torch.device | str) -> Dataset:
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def inputs(
        self,
        x: torch.Tensor,
        resize: int | None = None,
        flip: bool = False,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
    ) -> torch.Tensor:
        """Turn a batch of stored examples into model inputs, on the batch's device.

        Training augments images after resizing them, drawing from ``generator``: ``crop_padding``
        crops each from its copy padded with that many zeros (black) a side, at a random place —
        a shift by up to ± that many pixels each way — and ``flip`` mirrors about half of them.
        """
        if x.dtype != torch.uint8:
            return x
        out = x.float().div_(255.0)
        if resize and resize != out.shape[-1]:
            # Bilinear, as torchvision's Resize filters a PIL image. PIL widens the filter to shrink,
            # so that every source pixel under an output pixel counts, as the antialiased kernel does;
            # to enlarge, its filter is the plain bilinear one, which is also the faster.
            shrink = resize < out.shape[-1]
            out = F.interpolate(
                out, size=(resize, resize), mode="bilinear", align_corners=False, antialias=shrink
            )
        if crop_padding:
            out = _random_crop(out, crop_padding, generator)
        if flip:
            mask = torch.rand(out.shape[0], device=out.device, generator=generator) < 0.5
            out = torch.where(mask[:, None, None, None], out.flip(-1), out)
        mean, std = _stats(self.mean, self.std, str(out.device))
        return out.sub_(mean).div_(std)


def _random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Each image of ``x`` cut at its own random place from its copy padded with ``pad`` zeros a
    side (torchvision's ``RandomCrop(size, padding=pad)``), all in one gather on the device."""
    n, c, h, w = x.shape
    corner = torch.randint(0, 2 * pad + 1, (2, n, 1, 1), device=x.device, generator=generator)
    rows, cols = _positions(h, w, str(x.device))
    width = w + 2 * pad
    # Each output pixel's place in its flattened padded image; one gather over the flat pixels
    # ran 3× faster on the CPU than indexing rows and columns.
    at = (corner[0] + rows) * width + corner[1] + cols  # (n, h, w)
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)
    return padded.gather(2, at.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


@functools.lru_cache(maxsize=16)
def _positions(h: int, w: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column numbers of an image, shaped (h, 1) and (w,), made once per size and device."""
    return torch.arange(h, device=device)[:, None], torch.arange(w, device=device)


@functools.lru_cache(maxsize=16)
def _stats(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel normalisation tensors, made once per device rather than once per batch."""
    shape = (1, -1, 1, 1)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)


@dataclass(frozen=True)
class DatasetFacts:
    """What is known of a dataset before it is loaded, so a study file can be checked against it."""

    task: Task
    outputs: int  # classes, or the size of a regression target
    train_size: int  # examples in the training set (validation included) of the standard files
    test_size: int
    image_size: int | None = None  # the native square side; None for non-image data


DatasetLoader = Callable[[Path | None], Dataset]
DATASETS: Registry[DatasetLoader, DatasetFacts] = Registry("dataset", DatasetFacts, fixed=("data_dir",))
# A study file may not search these: they define the split, and so the metric a trial is judged by.
FIXED_PER_STUDY = {"searchable": False}


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: which dataset, and how it is split, batched and augmented.

    Construction checks every value's range, so a study file is refused at load, not a trial.
    """

    name: str
    batch_size: int = 128
    val_fraction: float = field(default=0.1, metadata=FIXED_PER_STUDY)
    resize: int = 0  # 0: the native size
    flip: bool = False  # random horizontal flips of training images
    crop_padding: int = 0  # 0: off; else training images shift by up to ± this many pixels, zeros filled in
    train_limit: int = field(default=0, metadata=FIXED_PER_STUDY)  # 0: all; else a seeded subset
    test_limit: int = field(default=0, metadata=FIXED_PER_STUDY)

    def __post_init__(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), not {self.val_fraction}")
        _at_least("resize", self.resize, 0)
        _at_least("crop_padding", self.crop_padding, 0)
        _at_least("train_limit", self.train_limit, 0)
        _at_least("test_limit", self.test_limit, 0)

    def check_sizes(self, train_size: int, test_size: int) -> None:
        """Raise ValueError unless the limits fit a dataset of these sizes and both splits are non-empty."""
        if self.train_limit > train_size:
            raise ValueError(
                f"train_limit {self.train_limit} is more than the {train_size} training examples"
            )
        if self.test_limit > test_size:
            raise ValueError(f"test_limit {self.test_limit} is more than the {test_size} test examples")
        n = self.train_limit or train_size
        n_val = validation_size(n, self.val_fraction)
        if n_val < 1 or n - n_val < 1:
            raise ValueError(
                f"val_fraction {self.val_fraction} of {n} examples leaves {n_val} for validation and "
                f"{n - n_val} for training; both need at least one"
            )


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{key} must be at least {low}, not {value}")


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """The batches of one epoch over ``n`` shuffled examples: the loop runs exactly these.

    A last batch of one example is dropped (BatchNorm cannot train on it) unless it is the only one;
    a per-batch schedule is sized from ``len()`` of this list.
    """
    slices = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(slices) > 1 and n % batch_size == 1:
        slices.pop()
    return slices


def cache_dir() -> Path:
    """hpsearch's own data cache: ``$HPSEARCH_CACHE`` or ``~/.cache/hpsearch``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "hpsearch")


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str | None = None, device: str = "cpu") -> Dataset:
    """Load ``name`` once per process and device; trials of one worker share the tensors."""
    root = data_dir or os.environ.get(ENV_DATA_DIR) or None
    return DATASETS[name](Path(root) if root else None).to(device)


def validation_size(n: int, val_fraction: float) -> int:
    """How many of ``n`` examples the validation split takes: the fraction, rounded down.

    The tolerance keeps float error from rounding an exact product down (100 × 0.29 is 28.999…).
    """
    return math.floor(n * val_fraction + 1e-9)


def subset(n: int, seed: int, limit: int = 0, device: str = "cpu") -> torch.Tensor:
    """A seeded random ``limit`` of the indices ``0..n-1`` (all of them, shuffled, when ``limit`` is 0)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: limit or n].to(device)


def split(
    n: int, val_fraction: float, seed: int, limit: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/validation index split of the ``n`` training examples.

    ``limit`` keeps a seeded random subset of that many examples first (quick studies); the
    test set is never part of it. Sizes are checked by ``DataConfig.check_sizes``.
    """
    perm = subset(n, seed, limit, device)
    n_val = validation_size(len(perm), val_fraction)
    return perm[n_val:], perm[:n_val]


# The real on-disk formats.

_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (the MNIST family's format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a cut-off download, say
        raise ValueError(f"{path} is truncated or not gzip data: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} values")
    return torch.from_numpy(arr.reshape(shape).astype(arr.dtype.newbyteorder("="), copy=True))


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_MNIST_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_family(
    name: str,
    tv_class: str,
    data_dir: Path | None,
    extra: tuple[Path, ...],
    mean: float,
    std: float,
) -> Dataset:
    """Find a MNIST-format dataset in the documented order and read it."""
    folders = [d for d in (data_dir, cache_dir() / name, *extra) if d is not None]
    looked: list[str] = []
    for folder in folders:
        for sub in (folder, folder / tv_class / "raw", folder / name):
            files = [_find_idx(sub, s) for s in (*_MNIST_FILES, *_MNIST_TEST)]
            if all(files):
                xs, ys, tx, ty = (read_idx(f) for f in files if f)
                return Dataset(
                    name,
                    CLASSIFICATION,
                    xs.unsqueeze(1),
                    ys.long(),
                    tx.unsqueeze(1),
                    ty.long(),
                    10,
                    (mean,),
                    (std,),
                )
        looked.append(str(folder))
    try:
        import torchvision

        target = cache_dir() / name
        getattr(torchvision.datasets, tv_class)(str(target), train=True, download=True)
        getattr(torchvision.datasets, tv_class)(str(target), train=False, download=True)
        return _mnist_family(name, tv_class, None, (), mean, std)
    except Exception as exc:  # network or mirror failures: report them with the other options
        reason = _one_line(exc)
    env = "set" if data_dir else "not set"
    raise DataNotFound(
        f"{name} not found: looked in {', '.join(looked)} (--data-dir/{ENV_DATA_DIR} {env}); "
        f"download failed ({reason}). Put {_MNIST_FILES[0]}.gz and the other three files in a "
        f"folder and pass --data-dir, or run with internet access"
        + ("; on Debian: apt-get install dataset-fashion-mnist" if name == "fashion_mnist" else "")
    )


@DATASETS.register(task=CLASSIFICATION, outputs=10, train_size=60_000, test_size=10_000, image_size=28)
def fashion_mnist(data_dir: Path | None) -> Dataset:
    """FashionMNIST, 28×28 grey clothing images, 10 classes (seed 004)."""
    return _mnist_family("fashion_mnist", "FashionMNIST", data_dir, (DEBIAN_FASHION_MNIST,), 0.2860, 0.3530)


@DATASETS.register(task=CLASSIFICATION, outputs=10, train_size=60_000, test_size=10_000, image_size=28)
def mnist(data_dir: Path | None) -> Dataset:
    """MNIST, 28×28 grey handwritten digits, 10 classes (seeds 000, 002)."""
    return _mnist_family("mnist", "MNIST", data_dir, (), 0.1307, 0.3081)


def _one_line(exc: Exception) -> str:
    """An exception as one short line: torchvision's download errors span several."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.copy()), torch.tensor(batch[b"labels"], dtype=torch.long)


@DATASETS.register(task=CLASSIFICATION, outputs=10, train_size=50_000, test_size=10_000, image_size=32)
def cifar10(data_dir: Path | None) -> Dataset:
    """CIFAR-10, 32×32 colour images, 10 classes, from the python pickle batches (seed 001)."""
    folders = [d for d in (data_dir, cache_dir() / "cifar10") if d is not None]
    for folder in folders:
        sub = folder / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        if all((sub / n).is_file() for n in names):
            parts = [_read_cifar_batch(sub / n) for n in names]
            return Dataset(
                "cifar10",
                CLASSIFICATION,
                torch.cat([p[0] for p in parts[:5]]),
                torch.cat([p[1] for p in parts[:5]]),
                parts[5][0],
                parts[5][1],
                10,
                (0.4914, 0.4822, 0.4465),
                (0.2470, 0.2435, 0.2616),
            )
    try:
        import torchvision

        target = cache_dir() / "cifar10"
        torchvision.datasets.CIFAR10(str(target), train=True, download=True)
        return cifar10(None)
    except Exception as exc:  # network or mirror failures
        reason = _one_line(exc)
    raise DataNotFound(
        f"cifar10 not found: looked for cifar-10-batches-py/ in {', '.join(map(str, folders))} "
        f"(--data-dir/{ENV_DATA_DIR} {'set' if data_dir else 'not set'}); download failed "
        f"({reason}). Unpack cifar-10-python.tar.gz into a folder and pass --data-dir"
    )


@DATASETS.register(task=REGRESSION, outputs=1, train_size=1000, test_size=200)
def toy_regression(data_dir: Path | None) -> Dataset:
    """Seed 003's toy regression: 1000 points x in [-1, 1], y = x² + 0.1·N(0, 1)."""
    g = torch.Generator().manual_seed(3)
    x = torch.linspace(-1, 1, 1000).unsqueeze(1)
    y = x.pow(2) + 0.1 * torch.randn(x.shape, generator=g)
    tx = torch.rand(200, 1, generator=g) * 2 - 1
    ty = tx.pow(2) + 0.1 * torch.randn(tx.shape, generator=g)
    return Dataset("toy_regression", REGRESSION, x, y, tx, ty, 1)


@DATASETS.register(task=CLASSIFICATION, outputs=10, train_size=800, test_size=200, image_size=28)
def synthetic(data_dir: Path | None) -> Dataset:
    """Small learnable 28×28 grey images, 10 classes, made on the fly: for tests and smoke runs."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 1, 28, 28, generator=g) * 255

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        noise = torch.randn(n, 1, 28, 28, generator=g) * 60
        return (templates[y] + noise).clamp(0, 255).to(torch.uint8), y

    (xs, ys), (tx, ty) = make(800), make(200)
    return Dataset("synthetic", CLASSIFICATION, xs, ys, tx, ty, 10, (0.5,), (0.3,))
