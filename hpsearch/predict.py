"""Saved networks: what ``hpsearch verify --save`` writes, and classifying image files with one.

A saved model is a folder of two files: ``model.json``, all that is needed to rebuild the network
and feed it (model name and arguments, dataset, channels, sizes, normalisation, class names, and
where it came from), and ``weights.pt``, its ``state_dict``. An image is read the way the dataset's
own images are stored (its channels, at the dataset's side, uint8) and then made into the network's
input by the dataset's own transform (``Dataset.inputs``) with the constants the file records: the
resize and normalisation of training, from the one place that defines them.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpsearch.datasets import DATASETS, Dataset
from hpsearch.errors import HpsearchError
from hpsearch.models import build_model
from hpsearch.spec import TrialConfig
from hpsearch.storage import atomic_write
from hpsearch.task import CLASSIFICATION

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.pt"
FORMAT = "hpsearch-model/1"

_CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Images classified at once: a folder of photos should not need a batch the size of the folder.
_BATCH = 256


class PredictError(HpsearchError):
    """A saved model or an image cannot be used; the message names the file and why."""


def class_names(dataset: str) -> list[str] | None:
    """The names of a dataset's classes, in label order; None where it has none (synthetic data)."""
    import torchvision

    known: dict[str, Any] = {
        "fashion_mnist": torchvision.datasets.FashionMNIST.classes,
        "mnist": torchvision.datasets.MNIST.classes,
        "cifar10": _CIFAR10,  # torchvision reads these from the dataset's files, not from its code
    }
    names = known.get(dataset)
    return list(names) if names is not None else None


def check_savable(dataset: str) -> None:
    """Raise ``PredictError`` unless networks trained on ``dataset`` can be saved to classify images."""
    facts = DATASETS.facts(dataset)
    if facts.task is not CLASSIFICATION or facts.image_size is None:
        raise PredictError(
            f"--save keeps image classifiers, and {dataset} is not an image classification dataset"
        )


@dataclass(frozen=True)
class SavedModel:
    """``model.json``: how to rebuild a saved network and turn an image into its input."""

    model: str  # the registry name
    kwargs: dict[str, Any]  # its keyword arguments (``init`` included; the weights replace it)
    dataset: str
    in_channels: int  # 1: grey-scale, 3: RGB
    num_classes: int
    image_size: int  # the side of the dataset's own images, which an image is first brought to
    input_size: int  # the side the network takes (``[data] resize``, else image_size)
    mean: list[float]  # per channel, on pixel values scaled to [0, 1]
    std: list[float]
    classes: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # study, trial, seed and its test metric
    format: str = FORMAT

    def label(self, index: int) -> str:
        """A class's name, or its index where the dataset names none."""
        return self.classes[index] if self.classes else str(index)

    def transform(self) -> Dataset:
        """The dataset's own input transform, holding only the constants it needs."""
        empty = torch.empty(0, self.in_channels, self.image_size, self.image_size, dtype=torch.uint8)
        labels = torch.empty(0, dtype=torch.long)
        mean, std = tuple(self.mean), tuple(self.std)
        return Dataset(
            self.dataset, CLASSIFICATION, empty, labels, empty, labels, self.num_classes, mean, std
        )


def save_model(
    folder: Path, model: nn.Module, cfg: TrialConfig, data: Dataset, source: dict[str, Any]
) -> Path:
    """Write ``model`` (trained with ``cfg`` on ``data``) into ``folder``, created if missing: the
    weights, then ``model.json``, each atomically. Returns the path of ``model.json``."""
    check_savable(data.name)
    side = data.image_size
    assert side is not None  # check_savable: an image dataset
    saved = SavedModel(
        model=cfg.model.name,
        kwargs=dict(cfg.model.kwargs),
        dataset=data.name,
        in_channels=data.in_channels,
        num_classes=data.num_outputs,
        image_size=side,
        input_size=cfg.data.resize or side,
        mean=list(data.mean),
        std=list(data.std),
        classes=class_names(data.name),
        source=source,
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictError(f"cannot create {folder}: {exc.strerror or exc}") from None
    weights = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights)
    atomic_write(folder / WEIGHTS_FILE, weights.getvalue())
    atomic_write(folder / MODEL_FILE, json.dumps(asdict(saved), indent=2) + "\n")
    return folder / MODEL_FILE


def load_model(folder: Path, device: torch.device) -> tuple[SavedModel, nn.Module]:
    """The saved model in ``folder`` and its network on ``device``, ready to evaluate."""
    hint = f"save one with `hpsearch verify --study NAME --save {folder}`"
    if not folder.is_dir():
        raise PredictError(f"no saved model at {folder}: not a folder; {hint}")
    path, weights = folder / MODEL_FILE, folder / WEIGHTS_FILE
    for needed in (path, weights):
        if not needed.is_file():
            raise PredictError(f"no saved model in {folder}: {needed.name} is missing; {hint}")
    try:
        saved = SavedModel(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())
        raise PredictError(f"{path}: not a model file written by hpsearch verify --save ({reason})") from None
    try:
        net = build_model(saved.model, saved.in_channels, saved.num_classes, **saved.kwargs)
    except Exception as exc:  # an unknown name (a model registered by code not loaded here), bad arguments
        raise PredictError(f"{path}: cannot build model {saved.model!r}: {exc}") from None
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # a cut-off file, another network's weights
        reason = " ".join(str(exc).split())[:200]
        raise PredictError(f"{weights}: cannot load the weights ({reason})") from None
    return saved, net.to(device).eval()


def read_image(path: Path, saved: SavedModel, invert: bool = False) -> torch.Tensor:
    """An image file as the dataset stores its images: uint8 ``(C, S, S)`` in the model's channels
    (grey-scale for one), resized to the dataset's side; ``invert`` turns dark-on-light into
    light-on-dark (FashionMNIST and MNIST are white on black)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    side = saved.image_size
    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)  # a phone's photo is stored sideways with a tag
            img = upright.convert("L" if saved.in_channels == 1 else "RGB")
            img = img.resize((side, side), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise PredictError(f"no image file {path}") from None
    except IsADirectoryError:
        raise PredictError(f"{path} is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PredictError(f"cannot read image {path}: {reason}") from None
    pixels = np.array(img, dtype=np.uint8)  # a copy: torch takes no read-only memory
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    if saved.in_channels != pixels.shape[0]:
        raise PredictError(f"{path}: {pixels.shape[0]} channels, the model takes {saved.in_channels}")
    if invert:
        pixels = 255 - pixels
    return torch.from_numpy(np.ascontiguousarray(pixels))


@dataclass(frozen=True)
class Prediction:
    """One image's most likely classes, best first: (class index, probability)."""

    path: Path
    ranked: list[tuple[int, float]]


@torch.inference_mode()
def predict(
    folder: Path, images: list[Path], device: torch.device, top: int = 1, invert: bool = False
) -> tuple[SavedModel, list[Prediction]]:
    """Classify ``images`` with the model saved in ``folder``: each image's ``top`` classes.

    Every image is read before any is classified, so a missing or unreadable one fails the call.
    """
    saved, net = load_model(folder, device)
    pixels = [read_image(p, saved, invert) for p in images]
    transform = saved.transform()
    found: list[Prediction] = []
    k = min(top, saved.num_classes)
    for i in range(0, len(pixels), _BATCH):
        batch = torch.stack(pixels[i : i + _BATCH]).to(device)
        probs = net(transform.inputs(batch, saved.input_size)).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for j, (v, idx) in enumerate(zip(values.tolist(), indices.tolist(), strict=True)):
            found.append(Prediction(images[i + j], list(zip(idx, v, strict=True))))
    return saved, found


def render(saved: SavedModel, predictions: list[Prediction], top: int = 1) -> str:
    """Predictions as an aligned text table: file, (rank,) class, index and probability."""
    head = ["file", *(["rank"] if top > 1 else []), "class", "index", "probability"]
    rows = [
        [str(p.path), *([str(r)] if top > 1 else []), saved.label(index), str(index), f"{prob:.4f}"]
        for p in predictions
        for r, (index, prob) in enumerate(p.ranked, start=1)
    ]
    widths = [max(len(row[c]) for row in [head, *rows]) for c in range(len(head))]
    numeric = {"rank", "index", "probability"}
    lines = [
        "  ".join(
            cell.rjust(w) if name in numeric else cell.ljust(w)
            for cell, w, name in zip(row, widths, head, strict=True)
        )
        for row in [head, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"
