"""d2l's LeNet on FashionMNIST, trained as seed 004 trained it: a standalone script, no hpsearch.

The seeds' loop is d2l's ``train_ch6``: torchvision's ``FashionMNIST`` over PIL images with
``[transforms.Resize(size)] + [transforms.ToTensor()]`` (no Resize at the native 28×28), a shuffling
``DataLoader`` with 4 worker processes, and per epoch ``net.train()``, then for each batch
``zero_grad``, a copy of the batch to the device, forward, ``CrossEntropyLoss``, backward and an SGD
step, with an accumulator that turns the batch's loss × size and its correct count into Python floats
(a host sync per batch); at the end of each epoch ``evaluate_accuracy_gpu`` over the test images
(``net.eval()``, no grad, a float of the correct count per batch). The network starts from d2l's
Xavier-uniform initialisation.

``benchmarks/speed.py`` imports the loop from here and times it against hpsearch's, and runs this
script as a whole process (start-up included) against ``hpsearch run``. Alone:

    .venv/bin/python benchmarks/seed_lenet.py                     # 10 epochs, all of FashionMNIST
    .venv/bin/python benchmarks/seed_lenet.py --epochs 3 --train-images 50000 --device cuda
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NATIVE_SIZE = 28
# d2l asks for 4 workers whatever the machine; torch warns when that is more than its cores.
warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)


def torchvision_root(folder: Path, source: Path = DEBIAN_FASHION_MNIST) -> Path:
    """``folder`` laid out as torchvision's FashionMNIST expects it (uncompressed raw IDX files), made
    from the four ``.gz`` files in ``source``: what the seeds' ``download=True`` leaves in ./data."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    found = sorted(source.glob("*-ubyte.gz"))
    if len(found) != 4:
        raise SystemExit(f"error: {source} does not hold FashionMNIST's four .gz files")
    for gz in found:
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return folder


def fashion_mnist(
    root: Path, train: bool, size: int = NATIVE_SIZE, normalize: tuple[float, float] | None = None
) -> torchvision.datasets.FashionMNIST:
    """The seeds' dataset: PIL images, resized to ``size`` when that is not the native size; with
    ``normalize`` (mean, std), ``transforms.Normalize`` after ``ToTensor``, as d2l's later chapters
    add it."""
    trans: list[nn.Module] = [transforms.ToTensor()]
    if size != NATIVE_SIZE:
        trans.insert(0, transforms.Resize(size))
    if normalize:
        trans.append(transforms.Normalize((normalize[0],), (normalize[1],)))
    return torchvision.datasets.FashionMNIST(str(root), train=train, transform=transforms.Compose(trans))


def loader(
    data: Dataset[tuple[torch.Tensor, int]], batch_size: int, shuffle: bool, workers: int
) -> DataLoader:
    """d2l's ``data.DataLoader(dataset, batch_size, shuffle=..., num_workers=4)``."""
    return DataLoader(data, batch_size, shuffle=shuffle, num_workers=workers)


def subset(
    data: Dataset[tuple[torch.Tensor, int]], indices: Sequence[int]
) -> Subset[tuple[torch.Tensor, int]]:
    return Subset(data, list(indices))


class Accumulator:
    """d2l's running sums: every value added becomes a Python float, so a tensor's add waits for it."""

    def __init__(self, n: int) -> None:
        self.data = [0.0] * n

    def add(self, *values: float | torch.Tensor) -> None:
        self.data = [a + float(b) for a, b in zip(self.data, values, strict=True)]

    def __getitem__(self, i: int) -> float:
        return self.data[i]


def correct(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many of the batch's predictions are right (a device tensor; the accumulator syncs it)."""
    return (y_hat.argmax(dim=1).type(y.dtype) == y).type(y.dtype).sum()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def evaluate_accuracy_gpu(net: nn.Module, data_iter: Batches, device: torch.device) -> tuple[float, int]:
    """d2l's evaluation: accuracy over ``data_iter`` and how many images it held."""
    net.eval()
    metric = Accumulator(2)
    with torch.no_grad():
        for x, y in data_iter:
            x, y = x.to(device), y.to(device)
            metric.add(correct(net(x), y), y.numel())
    return metric[0] / metric[1], int(metric[1])


@dataclass
class SeedRun:
    """What one run of the seeds' loop did, per epoch: seconds of training and of evaluation, training
    images, training loss and the evaluation accuracy (the last one is the run's test accuracy)."""

    train_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    train_images: list[int] = field(default_factory=list)
    eval_images: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)


def train_ch6(
    net: nn.Module,
    train_iter: Batches,
    test_iter: Batches,
    num_epochs: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    verbose: bool = False,
) -> SeedRun:
    """d2l's ``train_ch6`` on an initialised ``net`` already on ``device``, timed per epoch.

    The timings only add a device sync at the start and end of each part; the loop syncs with the
    host on every batch anyway.
    """
    loss_fn = nn.CrossEntropyLoss()
    run = SeedRun()
    for epoch in range(num_epochs):
        metric = Accumulator(3)  # loss × images, correct, images
        sync(device)
        t0 = time.perf_counter()
        net.train()
        for x, y in train_iter:
            optimizer.zero_grad()
            x, y = x.to(device), y.to(device)
            y_hat = net(x)
            loss = loss_fn(y_hat, y)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                metric.add(loss * x.shape[0], correct(y_hat, y), x.shape[0])
        sync(device)
        t1 = time.perf_counter()
        acc, seen = evaluate_accuracy_gpu(net, test_iter, device)
        sync(device)
        run.train_s.append(t1 - t0)
        run.eval_s.append(time.perf_counter() - t1)
        run.train_images.append(int(metric[2]))
        run.eval_images.append(seen)
        run.train_loss.append(metric[0] / metric[2])
        run.test_acc.append(acc)
        if verbose:
            loss_avg, train_acc = metric[0] / metric[2], metric[1] / metric[2]
            print(
                f"epoch {epoch + 1}: loss {loss_avg:.3f}, train acc {train_acc:.3f}, test acc {acc:.3f}, "
                f"{metric[2] / (t1 - t0):.0f} examples/s",
                flush=True,
            )
    return run


def lenet() -> nn.Sequential:
    """d2l's LeNet: sigmoids and average pooling, 28×28 input."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def xavier(module: nn.Module) -> None:
    """d2l's ``init_weights``, applied by ``train_ch6`` before training."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)


def first(n: int, total: int, seed: int) -> list[int]:
    """A seeded random ``n`` of ``range(total)`` (all of them, in order, when ``n`` is 0)."""
    if not n:
        return list(range(total))
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--epochs", type=int, default=10)
    add("--lr", type=float, default=0.9)
    add("--batch-size", type=int, default=256)
    add("--train-images", type=int, default=0, help="a seeded subset (default 0: all 60,000)")
    add("--eval-images", type=int, default=0, help="a seeded subset of the test set (default 0: all)")
    add("--workers", type=int, default=4, help="DataLoader worker processes (d2l: 4)")
    add("--device", default="auto", help="auto (CUDA when present, as d2l's try_gpu), cpu, cuda")
    add("--seed", type=int, default=0)
    add("--root", type=Path, help="torchvision's data folder (default: made from the Debian files)")
    add(
        "--normalize",
        type=float,
        nargs=2,
        metavar=("MEAN", "STD"),
        help="add transforms.Normalize(MEAN, STD) (seed 004 trains on unnormalised images)",
    )
    add("--json", type=Path, metavar="PATH", help="also write the per-epoch figures to PATH")
    add("-q", "--quiet", action="store_true", help="print the final test accuracy only")
    args = parser.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or torchvision_root(Path(tmp))
        norm = (args.normalize[0], args.normalize[1]) if args.normalize else None
        train, test = fashion_mnist(root, True, normalize=norm), fashion_mnist(root, False, normalize=norm)
        train_idx = first(args.train_images, len(train), args.seed)
        test_idx = first(args.eval_images, len(test), args.seed + 1)
        train_iter = loader(subset(train, train_idx), args.batch_size, True, args.workers)
        test_iter = loader(subset(test, test_idx), args.batch_size, False, args.workers)
        net = lenet()
        net.apply(xavier)
        net.to(device)
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
        if not args.quiet:
            print(f"training on {device}")
        run = train_ch6(net, train_iter, test_iter, args.epochs, optimizer, device, verbose=not args.quiet)
    if args.json:
        args.json.write_text(json.dumps(asdict(run), indent=2) + "\n")
    print(f"test acc {run.test_acc[-1]:.4f} ({run.eval_images[-1]} images)")


if __name__ == "__main__":
    main()
