"""Training speed: the seeds' training loop against hpsearch's trial loop, same models, data and work.

For each model, as seed 004 trained it on FashionMNIST (LeNet at 28×28, SGD lr 0.9, batch 256;
the 28×28 AlexNet; AlexNet at 224×224, lr 0.01, batch 128; VGG-11 with channels ÷ 4 at 224×224,
lr 0.05, batch 128; ResNet-18 at 96×96, lr 0.05, batch 256), one process runs both loops on the same
freshly initialised network (``hpsearch.models.build_model``, Xavier-uniform, same seed), with plain
SGD at the same rate and batch size:

* the seeds' loop, d2l's ``train_ch6`` (``benchmarks/seed_lenet.py``): torchvision's FashionMNIST
  over PIL images, ``Resize`` + ``ToTensor`` + ``Normalize`` (with hpsearch's mean and standard
  deviation of the images, so that both loops train on the same inputs; seed 004 itself does not
  normalise), a shuffling DataLoader with ``--workers`` processes (d2l: 4), a copy of each batch to
  the device and a host sync per batch for the running metrics, and at the end of each epoch an
  evaluation over test images through another DataLoader;
* hpsearch's loop, the real trial code: ``hpsearch.train.run_trial`` on a study file written here
  (the model's settings as fixed values), in an in-memory Optuna study, with the settings that
  ``hpsearch run`` makes (``hpsearch.backends``; the allocator's for both loops, see
  ``torch_defaults``). Its epoch times and accuracies are read from the trial's record
  (``TrialRecord``); the evaluations inside them are timed apart, so that both loops' images/s are
  over training time alone.

Both do the same work per epoch: hpsearch trains on its training split of N images and evaluates its
validation split of M images (``train_limit`` = N + M, ``val_fraction`` = M / (N + M)); the seeds' loop
trains on the same N training images and evaluates M test images, the same M that hpsearch tests on
once training ends (``test_limit`` = M), so the two test accuracies are over the same images. Per
model it prints: training images per second of training time (mean over epochs), seconds per epoch
(training and that epoch's evaluation), the ratios (above 1: hpsearch faster), the fraction of the
machine's peak each loop reaches (FLOPs per training image, counted by ``FlopCounterMode`` over one
forward and backward pass, × images/s ÷ the peak that this script measures: large bf16 matmuls on
CUDA, where hpsearch trains under bf16 autocast; on the CPU the fastest of large fp32 matmuls through
torch's BLAS and through oneDNN and a large convolution) and the test accuracy each reached after
the same epochs.

The process section times two whole processes, start-up included, for LeNet: the standalone seed
script (``benchmarks/seed_lenet.py``, over a torchvision data folder made beforehand, as the seeds'
first download left it) against ``hpsearch run`` on a one-trial study with the same settings and
split sizes, and reads that trial's test accuracy back from its SQLite file.

    .venv/bin/python benchmarks/speed.py --quick                 # all five models, small subsets
    .venv/bin/python benchmarks/speed.py --device cuda           # full: 50,000 + 10,000 images, 3 epochs
    .venv/bin/python benchmarks/speed.py --quick --json speed.json
    .venv/bin/python benchmarks/speed.py --models lenet,resnet18 --epochs 2 --train-images 20000
    .venv/bin/python benchmarks/speed.py --process --process-epochs 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
import seed_lenet
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import hpsearch.backends
import hpsearch.train
from hpsearch.checkpoint import Checkpoints
from hpsearch.datasets import DEBIAN_FASHION_MNIST, batch_slices, load_dataset, split, subset, validation_size
from hpsearch.models import build_model
from hpsearch.record import TrialRecord, study_task
from hpsearch.spec import StudySpec, load_spec
from hpsearch.study import open_study, run_study
from hpsearch.train import resolve_device, run_trial

HERE = Path(__file__).resolve().parent
DATASET = "fashion_mnist"
TRAIN_SET, TEST_SET = 60_000, 10_000
# Images per epoch (N trained, M evaluated) of the full mode and of the process section.
FULL_SIZES = (50_000, 10_000)
FULL_EPOCHS, QUICK_EPOCHS = 3, 1  # of the loops, and of the process section


@dataclass(frozen=True)
class Setup:
    """One network as the seeds trained it: input side, SGD rate, batch size; ``quick``: (N, M)."""

    model: str
    size: int
    lr: float
    batch_size: int
    quick: tuple[int, int]
    kwargs: dict[str, Any] = field(default_factory=dict)


SETUPS = {
    s.model: s
    for s in (
        Setup("lenet", 28, 0.9, 256, quick=(10_000, 2_000)),  # seed 004 §3.1.1, its first row
        # §3.2.2 gives no settings for the 28×28 AlexNet: those of the AlexNet it was made from.
        Setup("alexnet28", 28, 0.01, 128, quick=(3_000, 1_000)),
        Setup("alexnet", 224, 0.01, 128, quick=(200, 100)),  # §3.1.2
        Setup("vgg11", 224, 0.05, 128, quick=(200, 100), kwargs={"ratio": 4}),  # §3.1.3
        Setup("resnet18", 96, 0.05, 256, quick=(300, 100)),  # §3.1.4, at d2l's 96×96
    )
}

STUDY = """\
[study]
description = "speed benchmark: {model} as seed 004 trained it, nothing searched"
n_trials = 1
seed = {seed}
sampler = "random"
pruner = "none"

[data]
name = "{dataset}"
batch_size = {batch_size}
resize = {resize}
train_limit = {train_limit}
val_fraction = {val_fraction!r}
test_limit = {test_limit}

[model]
name = "{model}"
init = "xavier_uniform"
{model_kwargs}
[optimizer]
name = "sgd"
lr = {lr!r}

[train]
epochs = {epochs}
seed = {seed}
compile = {compile}
"""


class BenchmarkError(Exception):
    """A run could not be made or did not end as it must; the message says which."""


@dataclass(frozen=True)
class Work:
    """Images per epoch: N trained, M evaluated (and M tested at the end)."""

    train: int
    eval: int

    @property
    def val_fraction(self) -> float:
        """hpsearch's ``val_fraction`` for a validation split of exactly M of the N + M images."""
        total = self.train + self.eval
        for fraction in (self.eval / total, (self.eval + 0.5) / total):
            if validation_size(total, fraction) == self.eval:
                return fraction
        raise BenchmarkError(f"no val_fraction splits {total} images into {self.train} + {self.eval}")

    def study(self, setup: Setup, epochs: int, seed: int, compile: bool = False) -> str:
        """The study file of one trial of ``setup`` doing this work per epoch (through
        ``torch.compile`` with ``compile``)."""
        return STUDY.format(
            compile=str(compile).lower(),
            model=setup.model,
            dataset=DATASET,
            seed=seed,
            batch_size=setup.batch_size,
            resize=0 if setup.size == seed_lenet.NATIVE_SIZE else setup.size,
            train_limit=self.train + self.eval,
            val_fraction=self.val_fraction,
            test_limit=self.eval,
            model_kwargs="".join(f"{k} = {v!r}\n" for k, v in setup.kwargs.items()),
            lr=setup.lr,
            epochs=epochs,
        )

    def check(self, batch_size: int) -> str | None:
        """Why these sizes cannot be compared, or None."""
        if self.train < 1 or self.eval < 1:
            return "train and eval images must be at least 1"
        if self.train + self.eval > TRAIN_SET:
            return f"train + eval images ({self.train} + {self.eval}) exceed the {TRAIN_SET} training images"
        if self.eval > TEST_SET:
            return f"eval images ({self.eval}) exceed the {TEST_SET} test images"
        if self.train > 1 and self.train % batch_size == 1:
            return (
                f"{self.train} training images leave a last batch of one at batch size {batch_size}, which "
                "hpsearch drops (BatchNorm cannot train on it): pick another number"
            )
        return None


# Shared by the sections: the device, its peak, the data.


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    dtype: str
    by: str  # the kernel that was fastest
    each: dict[str, float]  # FLOP/s of each kernel timed

    def describe(self) -> str:
        others = ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in self.each.items() if k != self.by)
        return f"{self.flops / 1e9:,.1f} GFLOP/s ({self.dtype}, {self.by}{'; ' + others if others else ''})"


def _best_rate(kernel: Callable[[], object], flops: float, device: torch.device, reps: int) -> float:
    """FLOP/s of ``kernel`` (``flops`` a call), the best of 3 timings of ``reps`` calls after one
    untimed call."""
    kernel()  # algorithms chosen, memory touched
    best = 0.0
    for _ in range(3):
        seed_lenet.sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            kernel()
        seed_lenet.sync(device)
        best = max(best, reps * flops / (time.perf_counter() - start))
    return best


def measure_peak(device: torch.device) -> Peak:
    """The device's dense throughput, each kernel's best of 3: bf16 matmuls on CUDA, as hpsearch
    trains there. fp32 on the CPU, where torch has two libraries: ``torch.matmul``'s BLAS (MKL, which
    on some CPUs reaches half of what they can) and oneDNN, which the convolutions use: its matmul
    and a large convolution are timed too, and the fastest of the three counts."""
    if device.type == "cuda":
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        rate = _best_rate(lambda: torch.matmul(a, b), 2 * n**3, device, 50)
        return Peak(rate, "bfloat16", f"{n}² matmul", {f"{n}² matmul": rate})
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    each = {f"{n}² matmul": _best_rate(lambda: torch.matmul(a, b, out=c), 2 * n**3, device, 1)}
    with contextlib.suppress(AttributeError, RuntimeError):  # a torch built without oneDNN
        a_dnn, b_dnn = a.to_mkldnn(), b.to_mkldnn()

        def dnn_matmul() -> object:
            return torch._C._nn.mkldnn_linear(a_dnn, b_dnn, None)

        each[f"{n}² oneDNN matmul"] = _best_rate(dnn_matmul, 2 * n**3, device, 1)
    # AlexNet's second convolution at batch 16: 96 → 256 channels, 5×5, on 26×26.
    x, w = torch.randn(16, 96, 26, 26), torch.randn(256, 96, 5, 5)
    conv_flops = 2 * 16 * 26 * 26 * 256 * 96 * 5 * 5
    each["5×5 convolution"] = _best_rate(lambda: F.conv2d(x, w, padding=2), conv_flops, device, 1)
    by = max(each, key=lambda k: each[k])
    return Peak(each[by], "float32", by, each)


def flops_per_image(setup: Setup) -> float:
    """FLOPs of one training image: one forward and backward pass of a batch ÷ its size, on the meta
    device (shapes only, nothing computed)."""
    with torch.device("meta"):
        net = build_model(setup.model, 1, 10, **setup.kwargs)
        x = torch.empty(setup.batch_size, 1, setup.size, setup.size)
        y = torch.zeros(setup.batch_size, dtype=torch.long)
    net.train()
    counter = FlopCounterMode(display=False)
    with counter:
        nn.CrossEntropyLoss()(net(x), y).backward()
    return counter.get_total_flops() / setup.batch_size


@contextlib.contextmanager
def torch_defaults(device: torch.device) -> Iterator[None]:
    """torch's own CUDA settings, for the seeds' loop: the hpsearch loop's trial sets cuDNN autotuning
    and TF32 for the whole process (``hpsearch.backends.prepare``). The allocator setting it makes
    cannot be taken back, so ``main`` makes it before either loop runs: both loops train under it, the
    per-epoch figures compare the loops alone, and the process section shows what it adds."""
    saved = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = saved


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    tmp: Path
    root: Path  # torchvision's FashionMNIST folder, made once from the Debian files
    peak: Peak
    normalize: tuple[float, float]  # hpsearch's mean and std of the images, given to the seeds' loop too


# Section: both loops in one process.


@dataclass
class LoopFigures:
    """One loop's run of one model. Images are per epoch; per-epoch lists are in epoch order."""

    train_images: int
    eval_images: int
    test_images: int
    epochs: int
    images_per_s: float  # training images per second of training, mean over epochs
    s_per_epoch: float  # training and that epoch's evaluation, mean over epochs
    train_s: list[float]
    eval_s: list[float]
    eval_acc: list[float]  # the seeds' test images, hpsearch's validation split
    test_acc: float | None
    fraction_of_peak: float = 0.0
    record_images_per_s: float | None = None  # hpsearch: its record's examples_per_s
    stopped: str | None = None  # why hpsearch's trial ended early, if it did

    @classmethod
    def of(cls, images: list[int], train_s: list[float], eval_s: list[float], **kw: Any) -> LoopFigures:
        return cls(
            train_images=images[-1],
            epochs=len(train_s),
            images_per_s=statistics.fmean(n / t for n, t in zip(images, train_s, strict=True)),
            s_per_epoch=statistics.fmean(t + e for t, e in zip(train_s, eval_s, strict=True)),
            train_s=train_s,
            eval_s=eval_s,
            **kw,
        )


@dataclass
class ModelResult:
    model: str
    kwargs: dict[str, Any]
    input_size: int
    batch_size: int
    lr: float
    gflop_per_image: float
    seed: LoopFigures
    hpsearch: LoopFigures
    images_per_s_ratio: float = 0.0  # hpsearch ÷ seed
    s_per_epoch_ratio: float = 0.0  # seed ÷ hpsearch

    def __post_init__(self) -> None:
        self.images_per_s_ratio = self.hpsearch.images_per_s / self.seed.images_per_s
        self.s_per_epoch_ratio = self.seed.s_per_epoch / self.hpsearch.s_per_epoch


def write_spec(folder: Path, name: str, text: str) -> StudySpec:
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return load_spec(path)


def seed_loop(
    ctx: Context,
    setup: Setup,
    train_idx: list[int],
    test_idx: list[int],
    epochs: int,
    workers: int | None = None,
) -> LoopFigures:
    """The seeds' loop on ``setup`` over these training and test images (``--workers`` DataLoader
    workers unless ``workers`` says otherwise)."""
    torch.manual_seed(ctx.args.seed)  # as run_trial seeds before it builds the network
    net = build_model(setup.model, 1, 10, init="xavier_uniform", **setup.kwargs).to(ctx.device)
    train = seed_lenet.fashion_mnist(ctx.root, True, setup.size, ctx.normalize)
    test = seed_lenet.fashion_mnist(ctx.root, False, setup.size, ctx.normalize)
    workers = ctx.args.workers if workers is None else workers
    train_iter = seed_lenet.loader(seed_lenet.subset(train, train_idx), setup.batch_size, True, workers)
    test_iter = seed_lenet.loader(seed_lenet.subset(test, test_idx), setup.batch_size, False, workers)
    optimizer = torch.optim.SGD(net.parameters(), lr=setup.lr)
    with torch_defaults(ctx.device):
        run = seed_lenet.train_ch6(net, train_iter, test_iter, epochs, optimizer, ctx.device)
    return LoopFigures.of(
        run.train_images,
        run.train_s,
        run.eval_s,
        eval_images=run.eval_images[-1],
        test_images=run.eval_images[-1],
        eval_acc=run.test_acc,
        test_acc=run.test_acc[-1],
    )


@contextlib.contextmanager
def evaluations_timed() -> Iterator[list[float]]:
    """The seconds of each call of ``hpsearch.train.evaluate`` inside, in order. A trial's record keeps
    each epoch's training and evaluation as one time; this tells the two apart."""
    original = hpsearch.train.evaluate
    seconds: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> float:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:  # evaluate returns a Python float: the device is done
            seconds.append(time.perf_counter() - start)

    hpsearch.train.evaluate = timed
    try:
        yield seconds
    finally:
        hpsearch.train.evaluate = original


def hpsearch_loop(ctx: Context, spec: StudySpec) -> LoopFigures:
    """One trial of ``spec`` through ``run_trial``, in an in-memory study; figures from its record."""
    study = optuna.create_study(direction=spec.direction, sampler=spec.sampler(), pruner=spec.pruner())
    trial = study.ask()
    stopped = None
    try:
        with evaluations_timed() as evals:
            value = run_trial(trial, spec, ctx.device)
        study.tell(trial, value)
    except optuna.TrialPruned as exc:  # diverged: report what it did
        stopped = str(exc)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    rec = TrialRecord.of(study.trials[-1], spec.task)
    if not rec.epoch_time_s or rec.examples_per_s is None:
        raise BenchmarkError(f"{spec.name}: the trial trained no epoch ({stopped})")
    # The images it trained and evaluated: the split run_trial makes, batched as it batches.
    cfg = spec.raw["data"]
    n_train, n_test = dataset_sizes(ctx)
    train_idx, val_idx = split(n_train, cfg["val_fraction"], spec.seed, cfg["train_limit"])
    trained = sum(s.stop - s.start for s in batch_slices(len(train_idx), cfg["batch_size"]))
    # Each epoch's time less its evaluation (the calls come in order: one per epoch, then the test).
    epochs = len(rec.epoch_time_s)
    if len(evals) < epochs:
        raise BenchmarkError(f"{spec.name}: {epochs} epochs recorded but {len(evals)} evaluations timed")
    train_s = [e - v for e, v in zip(rec.epoch_time_s, evals, strict=False)]
    return LoopFigures.of(
        [trained] * epochs,
        train_s,
        evals[:epochs],
        eval_images=len(val_idx),
        test_images=len(subset(n_test, spec.seed, cfg["test_limit"])),
        eval_acc=rec.val,
        test_acc=None if rec.test is None else float(rec.test),
        record_images_per_s=float(rec.examples_per_s),
        stopped=stopped,
    )


def dataset_sizes(ctx: Context) -> tuple[int, int]:
    """Training and test images of the copy hpsearch loaded (``run_trial`` splits those)."""
    data = load_dataset(DATASET, None, str(ctx.device))
    return len(data.train_y), len(data.test_y)


def warm_up(ctx: Context) -> None:
    """One tiny run of each loop, untimed: what a process does once (lazy imports, the first optimizer
    step, the data's first load) is not charged to the first model timed."""
    setup, work = SETUPS["lenet"], Work(100, 50)
    spec = write_spec(ctx.tmp, "warm-up", work.study(setup, 1, ctx.args.seed))
    hpsearch_loop(ctx, spec)
    # DataLoader workers start afresh every epoch: nothing of theirs to warm up.
    seed_loop(ctx, setup, list(range(work.train)), list(range(work.eval)), 1, workers=0)


def run_model(ctx: Context, setup: Setup, work: Work, epochs: int) -> ModelResult:
    spec = write_spec(ctx.tmp, f"speed-{setup.model}", work.study(setup, epochs, ctx.args.seed))
    cfg = spec.raw["data"]
    n_train, n_test = dataset_sizes(ctx)
    train_idx, _ = split(n_train, cfg["val_fraction"], spec.seed, cfg["train_limit"])
    test_idx = subset(n_test, spec.seed, cfg["test_limit"])
    seed = seed_loop(ctx, setup, train_idx.tolist(), test_idx.tolist(), epochs)
    ours = hpsearch_loop(ctx, spec)
    flops = flops_per_image(setup)
    for figures in (seed, ours):
        figures.fraction_of_peak = flops * figures.images_per_s / ctx.peak.flops
    return ModelResult(
        setup.model, setup.kwargs, setup.size, setup.batch_size, setup.lr, flops / 1e9, seed, ours
    )


def loop_work(args: argparse.Namespace, setup: Setup) -> Work:
    """The images per epoch of ``setup`` in the loops section: the mode's, or the flags'."""
    n, m = setup.quick if args.quick else FULL_SIZES
    return Work(
        n if args.train_images is None else args.train_images,
        m if args.eval_images is None else args.eval_images,
    )


def loops_section(ctx: Context) -> list[dict[str, Any]]:
    args = ctx.args
    epochs = args.epochs
    progress("warming up")
    warm_up(ctx)
    results = []
    for name in args.models:
        setup = SETUPS[name]
        work = loop_work(args, setup)
        progress(f"{name}: {work.train} + {work.eval} images, {plural(epochs, 'epoch')}")
        results.append(run_model(ctx, setup, work, epochs))
    print(loops_table(results))
    print()
    for line in LOOP_NOTES:
        print(f"- {line}")
    for r in results:
        h = r.hpsearch
        if h.stopped:
            print(f"- {r.model}: hpsearch's trial ended early: {h.stopped}")
        if h.record_images_per_s and abs(h.record_images_per_s / h.images_per_s - 1) > 0.05:
            print(
                f"- {r.model}: the trial's record says {h.record_images_per_s:,.0f} images/s "
                f"(examples_per_s), not the {h.images_per_s:,.0f} of its training time alone"
            )
    print(flush=True)
    return [asdict(r) for r in results]


LOOP_NOTES = (
    "images/s: training images per second of training time, mean over epochs; s/epoch: training "
    "plus that epoch's evaluation; × = hpsearch's speed ÷ the seeds' (above 1: hpsearch faster)",
    "% peak: FLOPs per training image (forward + backward) × images/s ÷ the measured peak",
    "test acc: the same test images for both, after the same epochs; train/eval: images per epoch",
)


def loops_table(results: list[ModelResult]) -> str:
    head = (
        "| model | input | batch | train/eval | epochs | GFLOP/img | seed img/s | hpsearch img/s | × "
        "| seed s/epoch | hpsearch s/epoch | × | seed % peak | hpsearch % peak | seed test acc "
        "| hpsearch test acc |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s, h = r.seed, r.hpsearch
        name = r.model + "".join(f" {k}={v}" for k, v in r.kwargs.items())
        cells = [
            name,
            f"{r.input_size}²",
            str(r.batch_size),
            f"{s.train_images}/{s.eval_images}",
            str(s.epochs),
            f"{r.gflop_per_image:.3g}",
            f"{s.images_per_s:,.0f}",
            f"{h.images_per_s:,.0f}",
            f"{r.images_per_s_ratio:.2f}",
            f"{s.s_per_epoch:.2f}",
            f"{h.s_per_epoch:.2f}",
            f"{r.s_per_epoch_ratio:.2f}",
            f"{100 * s.fraction_of_peak:.1f}",
            f"{100 * h.fraction_of_peak:.1f}",
            _acc(s.test_acc),
            _acc(h.test_acc),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# Section: whole processes, start-up included.


@dataclass
class ProcessResult:
    epochs: int
    train_images: int
    eval_images: int
    batch_size: int
    lr: float
    workers: int
    seed_wall_s: float
    hpsearch_wall_s: float
    seed_test_acc: float
    hpsearch_test_acc: float | None
    seed_epoch_s: list[float]
    hpsearch_epoch_s: list[float]
    hpsearch_trial_s: float  # the trial's run_time_s: set-up, epochs and test, no start-up
    seed_command: list[str]
    hpsearch_command: list[str]
    ratio: float = 0.0  # seed wall ÷ hpsearch wall

    def __post_init__(self) -> None:
        self.ratio = self.seed_wall_s / self.hpsearch_wall_s


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Wall seconds of ``cmd`` as a new process; a failure is an error carrying its output's end."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        raise BenchmarkError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")
    return wall


def process_section(ctx: Context) -> dict[str, Any]:
    args, setup = ctx.args, SETUPS["lenet"]
    work = Work(args.process_train_images, args.process_eval_images)
    folder = ctx.tmp / "process"
    folder.mkdir()
    study = folder / "speed-process.toml"
    study.write_text(work.study(setup, args.process_epochs, args.seed), encoding="utf-8")
    seed_json = folder / "seed.json"
    seed_cmd = [
        sys.executable,
        str(HERE / "seed_lenet.py"),
        f"--epochs={args.process_epochs}",
        f"--lr={setup.lr}",
        f"--batch-size={setup.batch_size}",
        f"--train-images={work.train}",
        f"--eval-images={work.eval}",
        f"--workers={args.workers}",
        f"--device={ctx.device}",
        f"--seed={args.seed}",
        f"--root={ctx.root}",
        "--normalize",
        *(str(v) for v in ctx.normalize),
        f"--json={seed_json}",
        "--quiet",
    ]
    storage = f"sqlite:///{folder / 'db.sqlite'}"
    run_cmd = [sys.executable, "-m", "hpsearch", "run", "--study", str(study), "--storage", storage]
    run_cmd += ["--device", str(ctx.device)]
    # Its own storage and artifacts here, whatever the environment names.
    env = {k: v for k, v in os.environ.items() if k not in ("HPSEARCH_STORAGE", "HPSEARCH_ARTIFACTS")}
    progress(f"processes: {work.train} + {work.eval} images, {plural(args.process_epochs, 'epoch')}")
    seed_wall = timed(seed_cmd, folder, env)
    run_wall = timed(run_cmd, folder, env)
    seed_run = json.loads(seed_json.read_text())
    stored = optuna.load_study(study_name=study.stem, storage=storage)
    trials = stored.get_trials(deepcopy=False)
    if len(trials) != 1 or trials[0].state != optuna.trial.TrialState.COMPLETE:
        raise BenchmarkError(f"hpsearch run left {[t.state.name for t in trials]}, not one COMPLETE trial")
    rec = TrialRecord.of(trials[0], study_task(stored))
    result = ProcessResult(
        epochs=args.process_epochs,
        train_images=work.train,
        eval_images=work.eval,
        batch_size=setup.batch_size,
        lr=setup.lr,
        workers=args.workers,
        seed_wall_s=seed_wall,
        hpsearch_wall_s=run_wall,
        seed_test_acc=seed_run["test_acc"][-1],
        hpsearch_test_acc=None if rec.test is None else float(rec.test),
        seed_epoch_s=[t + e for t, e in zip(seed_run["train_s"], seed_run["eval_s"], strict=True)],
        hpsearch_epoch_s=rec.epoch_time_s,
        hpsearch_trial_s=rec.run_time_s,
        seed_command=seed_cmd,
        hpsearch_command=run_cmd,
    )
    print(process_table(result))
    print()
    print(
        f"- LeNet, SGD lr {setup.lr}, batch {setup.batch_size}, {plural(result.epochs, 'epoch')} of "
        f"{work.train} training and {work.eval} evaluation images; wall: the whole process, start-up, "
        "data loading and (hpsearch) its SQLite study and checkpoints included; × = seed wall ÷ hpsearch "
        "wall"
    )
    print(flush=True)
    return asdict(result)


def process_table(r: ProcessResult) -> str:
    epochs = " + ".join(f"{s:.1f}" for s in r.seed_epoch_s)
    ours = " + ".join(f"{s:.1f}" for s in r.hpsearch_epoch_s)
    return "\n".join(
        [
            "| process | wall s | of which epochs, s | test acc |",
            "|---|---:|---:|---:|",
            f"| seed script (`benchmarks/seed_lenet.py`) | {r.seed_wall_s:.1f} | {epochs} | "
            f"{_acc(r.seed_test_acc)} |",
            f"| `hpsearch run` (one trial) | {r.hpsearch_wall_s:.1f} | {ours} | "
            f"{_acc(r.hpsearch_test_acc)} |",
            f"| × (seed ÷ hpsearch) | {r.ratio:.2f} | | |",
        ]
    )


# torch.compile: what [train] compile = true costs and saves, per model.


@dataclass
class CompileResult:
    model: str
    epochs: int
    train_images: int
    eager_s: list[float]  # each epoch's training time, eager
    compiled_s: list[float]  # the same compiled: the first epoch holds the compilation
    overhead_s: float = 0.0  # compiled first epoch less a compiled steady epoch
    steady_ratio: float = 0.0  # eager ÷ compiled, epochs after the first
    break_even_epochs: float | None = None  # epochs before the compilation has paid for itself

    def __post_init__(self) -> None:
        eager = statistics.fmean(self.eager_s[1:])
        compiled = statistics.fmean(self.compiled_s[1:])
        self.overhead_s = self.compiled_s[0] - compiled
        self.steady_ratio = eager / compiled
        saved = eager - compiled
        self.break_even_epochs = self.overhead_s / saved if saved > 0 else None


def compile_section(ctx: Context) -> list[dict[str, Any]]:
    args = ctx.args
    results = []
    for name in args.compile:
        setup = SETUPS[name]
        work = loop_work(args, setup)
        progress(
            f"{name} eager and compiled: {work.train} + {work.eval} images, {args.compile_epochs} epochs"
        )
        runs = []
        for compiled in (False, True):
            text = work.study(setup, args.compile_epochs, args.seed, compile=compiled)
            spec = write_spec(ctx.tmp, f"speed-{name}-{'compiled' if compiled else 'eager'}", text)
            runs.append(hpsearch_loop(ctx, spec).train_s)
        results.append(CompileResult(name, args.compile_epochs, work.train, *runs))
    lines = [
        "| model | train images | eager s/epoch | compiled, first epoch s | compiled s/epoch after | × after "
        "| compile cost s | pays after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        pays = "never" if r.break_even_epochs is None else f"{r.break_even_epochs:,.0f} epochs"
        eager, compiled = statistics.fmean(r.eager_s[1:]), statistics.fmean(r.compiled_s[1:])
        lines.append(
            f"| {r.model} | {r.train_images} | {eager:.2f} | {r.compiled_s[0]:.1f} | {compiled:.2f} | "
            f"{r.steady_ratio:.2f} | {r.overhead_s:.1f} | {pays} |"
        )
    print("\n".join(lines))
    print()
    print(
        "- training time per epoch of one trial, eager and with [train] compile = true; s/epoch: mean over "
        "the epochs after the first; compile cost: the compiled first epoch less a later one; pays after: "
        "the epochs of training at this size before the compiled trial is ahead (a trial compiles anew)"
    )
    print(flush=True)
    return [asdict(r) for r in results]


# Packed trials: trials per hour of a LeNet study run with --pack K.


def pack_section(ctx: Context) -> dict[str, Any]:
    """The same many-trial LeNet study (its learning rate searched) run through ``run_study`` with
    ``pack`` = each K, into an SQLite file as ``hpsearch run`` would. On the CPU, packs of K > 1
    also train as one batched model (``train.BATCHED_ON``), a GPU's way, to show which way pays."""
    args, setup = ctx.args, SETUPS["lenet"]
    work = Work(args.pack_train_images, args.pack_eval_images)
    n = max(args.packs)
    text = work.study(setup, 1, args.seed)
    text = text.replace("n_trials = 1", f"n_trials = {n}").replace(
        f"lr = {setup.lr!r}", "lr = { low = 0.05, high = 0.9, log = true }"
    )
    (ctx.tmp / "pack").mkdir()
    spec = write_spec(ctx.tmp / "pack", "speed-pack", text)
    ways = [(k, ctx.device.type in hpsearch.train.BATCHED_ON) for k in args.packs]
    if ctx.device.type not in hpsearch.train.BATCHED_ON:
        ways += [(k, True) for k in args.packs if k > 1]
    rows = []
    for k, batched in ways:
        before = set(hpsearch.train.BATCHED_ON)
        hpsearch.train.BATCHED_ON = before | {ctx.device.type} if batched else before - {ctx.device.type}
        try:
            db = ctx.tmp / "pack" / f"pack-{k}-{'batched' if batched else 'own'}.sqlite"
            study = open_study(spec, f"sqlite:///{db}")
            progress(f"{n} LeNet trials, pack {k}{' batched' if batched and k > 1 else ''}")
            seed_lenet.sync(ctx.device)
            start = time.perf_counter()
            saved = Checkpoints(db.with_suffix(""))
            run_study(spec, study, device=str(ctx.device), pack=k, checkpoints=saved)
            seed_lenet.sync(ctx.device)
            wall = time.perf_counter() - start
        finally:
            hpsearch.train.BATCHED_ON = before
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) != n:
            raise BenchmarkError(f"pack {k}: {len(done)} of {n} trials completed")
        way = "alone" if k == 1 else ("batched (vmap)" if batched else "side by side")
        rows.append({"pack": k, "way": way, "trials": n, "wall_s": wall, "trials_per_hour": n / wall * 3600})
    base = rows[0]["trials_per_hour"]
    for row in rows:
        row["ratio"] = row["trials_per_hour"] / base
    lines = ["| K | how | trials | wall s | trials/hour | × K = 1 |", "|---:|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['pack']} | {r['way']} | {r['trials']} | {r['wall_s']:.1f} | "
        f"{r['trials_per_hour']:,.0f} | {r['ratio']:.2f} |"
        for r in rows
    ]
    print("\n".join(lines) + "\n", flush=True)
    return {"train_images": work.train, "eval_images": work.eval, "rows": rows}


# The sections, in the order they run. Each prints its table and returns its part of the JSON record.


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    wanted: Callable[[argparse.Namespace], bool]
    run: Callable[[Context], Any]


SECTIONS = (
    Section("loops", "Training loops, one process", lambda a: not a.process, loops_section),
    Section(
        "process",
        "Whole processes, LeNet",
        lambda a: a.process or (not a.no_process and "lenet" in a.models),
        process_section,
    ),
    Section("packed", "Packed trials, LeNet", lambda a: bool(a.packs), pack_section),
    Section("compile", "torch.compile", lambda a: bool(a.compile), compile_section),
)


# The machine and the record.

_START = time.perf_counter()


def progress(what: str) -> None:
    """A line on stderr: what runs next, and the seconds since the start."""
    print(f"[{time.perf_counter() - _START:6.1f} s] {what} ...", file=sys.stderr, flush=True)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "optuna", "hpsearch"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


# The command.


def _packs(text: str) -> list[int]:
    try:
        packs = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of pack sizes: {text!r}") from None
    if any(k < 1 for k in packs):
        raise argparse.ArgumentTypeError("pack sizes must be 1 or more")
    return packs


def _compiled_models(text: str) -> list[str]:
    return _models(text) if text.strip() else []


def _models(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model {unknown[0] if unknown else text!r}; valid: {', '.join(SETUPS)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help=f"{QUICK_EPOCHS} epoch of small subsets: "
        + ", ".join(f"{s.model} {s.quick[0]} + {s.quick[1]}" for s in SETUPS.values())
        + " images (a few minutes on 2 CPU cores)",
    )
    add(
        "--models",
        type=_models,
        default=list(SETUPS),
        help=f"comma-separated (default all: {','.join(SETUPS)})",
    )
    add(
        "--epochs", type=int, help=f"epochs of each loop (default {FULL_EPOCHS}; {QUICK_EPOCHS} with --quick)"
    )
    add(
        "--train-images",
        type=int,
        help=f"N, training images per epoch (default {FULL_SIZES[0]}, or --quick's)",
    )
    add(
        "--eval-images",
        type=int,
        help=f"M, evaluation images per epoch (default {FULL_SIZES[1]}, or --quick's)",
    )
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add("--workers", type=int, default=4, help="DataLoader worker processes of the seeds' loop (d2l: 4)")
    add("--seed", type=int, default=0, help="seeds the split, the networks' initialisation and the shuffles")
    add("--process", action="store_true", help="run only the whole-process section")
    add("--no-process", action="store_true", help="skip the whole-process section")
    add(
        "--packs",
        type=_packs,
        default=[1, 4, 16],
        help="pack sizes K of the packed-trials section, comma-separated (default 1,4,16; empty: skip it)",
    )
    add("--pack-train-images", type=int, default=2000, help="training images per packed trial")
    add("--pack-eval-images", type=int, default=500, help="validation images per packed trial")
    add("--process-epochs", type=int, help=f"(default {FULL_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    add("--process-train-images", type=int, default=FULL_SIZES[0], help=f"(default {FULL_SIZES[0]})")
    add("--process-eval-images", type=int, default=FULL_SIZES[1], help=f"(default {FULL_SIZES[1]})")
    add(
        "--compile",
        type=_compiled_models,
        default=[],
        metavar="MODELS",
        help="also time these models' trials eager and with [train] compile = true, comma-separated "
        "(default: none; compiling takes minutes on a CPU)",
    )
    add("--compile-epochs", type=int, default=3, help="epochs of each compile run (default 3; at least 2)")
    add(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write every figure, the machine and the versions to PATH",
    )
    args = parser.parse_args(argv)
    if args.compile and args.compile_epochs < 2:
        parser.error("--compile-epochs must be at least 2: the first epoch holds the compilation")
    if args.process and args.no_process:
        parser.error("--process and --no-process exclude each other")
    default_epochs = QUICK_EPOCHS if args.quick else FULL_EPOCHS
    args.epochs = default_epochs if args.epochs is None else args.epochs
    args.process_epochs = default_epochs if args.process_epochs is None else args.process_epochs
    for flag in ("epochs", "process_epochs", "workers"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "workers" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'workers' else 1}")
    if not args.process:
        for name in args.models:
            setup = SETUPS[name]
            problem = loop_work(args, setup).check(setup.batch_size)
            if problem:
                parser.error(f"{name}: {problem}")
    if args.process or (not args.no_process and "lenet" in args.models):
        problem = Work(args.process_train_images, args.process_eval_images).check(SETUPS["lenet"].batch_size)
        if problem:
            parser.error(f"process section: {problem}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    data = load_dataset(DATASET, None, str(device))  # hpsearch loads it once per process, before any trial
    hpsearch.backends.keep_freed_memory()  # for both loops: see torch_defaults
    record: dict[str, Any] = {"machine": machine(device), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="hpsearch-speed-") as tmp:
        root = seed_lenet.torchvision_root(Path(tmp) / "torchvision", DEBIAN_FASHION_MNIST)
        progress("measuring the peak")
        peak = measure_peak(device)
        record["peak"] = asdict(peak)
        ctx = Context(args, device, Path(tmp), root, peak, (data.mean[0], data.std[0]))
        m = record["machine"]
        print(
            f"device: {m['device_name']} ({device}); {m['cores']} cores, {m['torch_threads']} torch threads"
        )
        print("versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
        print(f"peak: {peak.describe()}")
        if m["load_average"] > m["cores"] / 2:
            print(f"note: load average {m['load_average']} on {m['cores']} cores: other processes share them")
        print(flush=True)
        for section in SECTIONS:
            if section.wanted(args):
                print(f"## {section.title}\n")
                record[section.key] = section.run(ctx)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as exc:
        sys.exit(f"error: {exc}")
