"""Seed-style training loop vs hpsearch's, same model, data, batch size and device; prints the ratio.

The seed loop is d2l's ``train_ch6`` as the seeds ran it: torchvision's FashionMNIST over PIL
images, ``transforms.Resize`` + ``ToTensor`` in a DataLoader, a copy to the device per batch and a
host sync per batch for the running metrics. hpsearch's loop keeps the uint8 images on the device
and slices batches (``hpsearch.train.train_epoch``). Both train the same freshly initialised model
for the same number of examples.

    python benchmarks/loader.py --model lenet --batches 100
    python benchmarks/loader.py --model alexnet --resize 224 --batches 20 --device cuda
"""

from __future__ import annotations

import argparse
import gzip
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from hpsearch.datasets import DEBIAN_FASHION_MNIST, DataConfig, batch_slices, load_dataset
from hpsearch.models import build_model
from hpsearch.optim import Stepper, Steps
from hpsearch.task import CLASSIFICATION
from hpsearch.train import resolve_device, train_epoch


def _torchvision_root(tmp: Path) -> Path:
    """torchvision's FashionMNIST layout (uncompressed raw files) made from the Debian copy."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in DEBIAN_FASHION_MNIST.glob("*.gz"):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seed_loop(model: nn.Module, root: Path, args: argparse.Namespace, device: torch.device) -> float:
    """d2l's train_ch6 inner loop; returns examples per second."""
    trans = [transforms.ToTensor()]
    if args.resize:
        trans.insert(0, transforms.Resize(args.resize))
    data = torchvision.datasets.FashionMNIST(str(root), train=True, transform=transforms.Compose(trans))
    subset = Subset(data, range(args.batches * args.batch_size))
    loader = DataLoader(subset, args.batch_size, shuffle=True, num_workers=args.workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    metric = [0.0, 0.0, 0.0]
    _sync(device)
    start = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        x, y = x.to(device), y.to(device)
        y_hat = model(x)
        loss = loss_fn(y_hat, y)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # d2l's Accumulator: float() of each term syncs with the host
            metric[0] += float(loss * x.shape[0])
            metric[1] += float((y_hat.argmax(1) == y).sum())
            metric[2] += x.shape[0]
    _sync(device)
    return metric[2] / (time.perf_counter() - start)


def hpsearch_loop(model: nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """hpsearch's epoch over the same number of examples; returns examples per second."""
    data = load_dataset("fashion_mnist", None, str(device))
    n = args.batches * args.batch_size
    idx = torch.arange(n, device=device)
    data_cfg = DataConfig("fashion_mnist", batch_size=args.batch_size, resize=args.resize)
    slices = batch_slices(n, args.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepper = Stepper(None, Steps.EPOCH)
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda" and data.train_x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
    _sync(device)
    start = time.perf_counter()
    train_epoch(
        model, data, CLASSIFICATION, idx, slices, data_cfg, 0.0, optimizer, stepper, g, device, math.inf
    )
    _sync(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--resize", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best is kept")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    load_dataset("fashion_mnist", None, str(device))  # loading once per process is part of the design
    with tempfile.TemporaryDirectory() as tmp:
        root = _torchvision_root(Path(tmp))
        seed, ours = 0.0, 0.0
        for _ in range(args.repeats):
            torch.manual_seed(0)
            seed = max(seed, seed_loop(build_model(args.model, 1, 10).to(device), root, args, device))
            torch.manual_seed(0)
            ours = max(ours, hpsearch_loop(build_model(args.model, 1, 10).to(device), args, device))
    what = f"{args.model}, resize {args.resize or 28}, batch {args.batch_size}, {args.batches} batches"
    print(f"device {device}; {what}")
    print(f"seed loop (DataLoader, {args.workers} workers): {seed:10.0f} examples/s")
    print(f"hpsearch loop (tensors on device):  {ours:10.0f} examples/s")
    print(f"ratio hpsearch / seed: {ours / seed:.2f}x")


if __name__ == "__main__":
    main()
