"""Datasets from their real on-disk formats, found in the documented order; splits and inputs."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hpsearch import datasets
from hpsearch.datasets import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    DataConfig,
    DataNotFound,
    Dataset,
    batch_slices,
    cache_dir,
    cifar10,
    fashion_mnist,
    mnist,
    read_idx,
    split,
    subset,
    synthetic,
    toy_regression,
)
from hpsearch.errors import HpsearchError
from hpsearch.task import CLASSIFICATION, REGRESSION

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(autouse=True)
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty hpsearch cache, so nothing found there by another run interferes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("HPSEARCH_CACHE", str(cache))
    return cache


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, a type code (0x08 = uint8), the rank, big-endian dims, data."""
    assert array.dtype == np.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def tiny_mnist(seed: int, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> None:
    for stem, array in arrays.items():
        write_idx(folder / stem, array, gz)


def assert_same(ds: Dataset, arrays: dict[str, np.ndarray]) -> None:
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.long
    assert torch.equal(ds.train_x, torch.from_numpy(arrays[FILES[0]]).unsqueeze(1))
    assert torch.equal(ds.train_y, torch.from_numpy(arrays[FILES[1]]).long())
    assert torch.equal(ds.test_x, torch.from_numpy(arrays[FILES[2]]).unsqueeze(1))
    assert torch.equal(ds.test_y, torch.from_numpy(arrays[FILES[3]]).long())


# The real FashionMNIST from the Debian package.


def test_real_fashion_mnist_from_debian() -> None:
    # Not skipped when missing: CI installs dataset-fashion-mnist, and this test says so if it did not.
    assert DEBIAN_FASHION_MNIST.is_dir(), (
        f"{DEBIAN_FASHION_MNIST} missing: apt-get install dataset-fashion-mnist"
    )
    ds = fashion_mnist(None)
    assert ds.name == "fashion_mnist" and ds.task is CLASSIFICATION and ds.num_outputs == 10
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.test_x.dtype == torch.uint8
    assert ds.train_y.shape == (60000,) and ds.test_y.shape == (10000,)
    assert int(ds.train_y.min()) == 0 and int(ds.train_y.max()) == 9
    # FashionMNIST is balanced: 6000 and 1000 images of each class.
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    assert ds.in_channels == 1 and ds.image_size == 28 == DATASETS.facts("fashion_mnist").image_size
    # The mean the inputs are normalised with is the data's own.
    assert ds.train_x.float().mean().item() / 255 == pytest.approx(ds.mean[0], abs=1e-3)


# The MNIST reader on files in the real IDX format.

LAYOUTS = {"flat": ".", "torchvision": "MNIST/raw", "subfolder": "mnist"}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mnist_reader_layouts(tmp_path: Path, layout: str, gz: bool) -> None:
    data_dir = tmp_path / "data"
    arrays = tiny_mnist(seed=1)
    write_mnist(data_dir / LAYOUTS[layout], arrays, gz)
    ds = mnist(data_dir)
    assert ds.name == "mnist" and ds.mean == (0.1307,) and ds.std == (0.3081,)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert_same(ds, arrays)


def test_fashion_layout_uses_its_own_names(tmp_path: Path) -> None:
    arrays = tiny_mnist(seed=2)
    write_mnist(tmp_path / "data" / "FashionMNIST" / "raw", arrays)
    assert_same(fashion_mnist(tmp_path / "data"), arrays)
    write_mnist(tmp_path / "data2" / "fashion_mnist", arrays, gz=False)
    assert_same(fashion_mnist(tmp_path / "data2"), arrays)


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    # 0x00000803 then dims, most significant byte first, as in the files LeCun published. The
    # files the other tests write follow it, and the reader reads a header written out by hand.
    data = idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8))
    assert data[:8] == bytes([0, 0, 8, 3, 0, 0, 0, 2])
    assert idx_bytes(np.zeros(300, dtype=np.uint8))[:8] == bytes([0, 0, 8, 1, 0, 0, 1, 44])
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 8, 1, 0, 0, 1, 44]) + bytes(range(256)) + bytes(range(44)))
    out = read_idx(labels)
    assert out.shape == (300,) and out.dtype == torch.uint8
    assert out[255].item() == 255 and out[299].item() == 43


def test_read_idx_wider_types(tmp_path: Path) -> None:
    values = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    path = tmp_path / "ints-idx2-int"
    path.write_bytes(struct.pack(">BBBBII", 0, 0, 0x0C, 2, 2, 3) + values.tobytes())
    out = read_idx(path)
    assert out.shape == (2, 3) and out.dtype == torch.int32
    assert out.tolist() == [[1, -2, 70000], [3, 4, -5]]


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "notes-idx3-ubyte"
    text.write_text("hello, this is not an IDX file\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(text)
    full = idx_bytes(np.arange(5 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(5, 28, 28))
    truncated = tmp_path / "short-idx3-ubyte"
    truncated.write_bytes(full[:-100])
    with pytest.raises(ValueError, match=r"header says \(5, 28, 28\) but holds 3820 values"):
        read_idx(truncated)
    header_only = tmp_path / "header-idx3-ubyte"
    header_only.write_bytes(full[:10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(header_only)
    cut_gz = tmp_path / "cut-idx3-ubyte.gz"
    zipped = gzip.compress(full)
    cut_gz.write_bytes(zipped[: len(zipped) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut_gz)
    not_gz = tmp_path / "plain-idx3-ubyte.gz"
    not_gz.write_bytes(full)
    with pytest.raises(ValueError, match="not gzip"):
        read_idx(not_gz)


# CIFAR-10's python pickle batches.


def write_cifar(folder: Path, sizes: list[int]) -> list[dict[bytes, object]]:
    """Batches data_batch_1..5 and test_batch as the CIFAR-10 python release has them."""
    sub = folder / "cifar-10-batches-py"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = []
    for name, n in zip([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], sizes, strict=True):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(sub / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches.append(batch)
    return batches


def test_cifar10_reader(tmp_path: Path) -> None:
    sizes = [2, 3, 2, 2, 2, 4]
    batches = write_cifar(tmp_path / "data", sizes)
    # Image 1 of batch 2, pixel row 5, column 7: R, G and B are 1024 values apart, row-major.
    data = batches[1][b"data"]
    assert isinstance(data, np.ndarray)
    data[1, 5 * 32 + 7], data[1, 1024 + 5 * 32 + 7], data[1, 2048 + 5 * 32 + 7] = 11, 22, 33
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump(batches[1], f, protocol=2)
    ds = cifar10(tmp_path / "data")
    assert ds.train_x.shape == (11, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.long
    assert ds.train_x[2 + 1, :, 5, 7].tolist() == [11, 22, 33]
    first = batches[0][b"data"]
    assert isinstance(first, np.ndarray)
    assert ds.train_x[0, 2, 31, 31] == first[0, 3071] and ds.train_x[0, 0, 0, 1] == first[0, 1]
    labels = [v for b in batches[:5] for v in b[b"labels"]]  # type: ignore[attr-defined]
    assert ds.train_y.tolist() == labels
    assert ds.test_y.tolist() == batches[5][b"labels"]
    assert ds.in_channels == 3 and ds.image_size == 32 and len(ds.mean) == 3


# Discovery order and the error when nothing is found.


def test_data_dir_wins_over_debian(tmp_path: Path) -> None:
    arrays = tiny_mnist(seed=3)
    write_mnist(tmp_path / "data", arrays)
    ds = fashion_mnist(tmp_path / "data")
    assert len(ds.train_y) == 5
    assert_same(ds, arrays)


def test_data_dir_wins_over_cache(tmp_path: Path, empty_cache: Path) -> None:
    write_mnist(empty_cache / "mnist", tiny_mnist(seed=4, n_train=7))
    arrays = tiny_mnist(seed=5)
    write_mnist(tmp_path / "data", arrays)
    assert_same(mnist(tmp_path / "data"), arrays)
    assert len(mnist(None).train_y) == 7


def test_cache_is_used_before_debian(empty_cache: Path) -> None:
    assert cache_dir() == empty_cache
    arrays = tiny_mnist(seed=6)
    write_mnist(cache_dir() / "fashion_mnist", arrays)
    ds = fashion_mnist(None)
    assert len(ds.train_y) == 5
    assert_same(ds, arrays)


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPSEARCH_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "hpsearch"


def test_fashion_not_found_names_every_option(
    tmp_path: Path, empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine without the Debian package (and no network: the download fails).
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    with pytest.raises(DataNotFound) as err:
        fashion_mnist(data_dir)
    message = str(err.value)
    for part in (
        str(data_dir),
        str(empty_cache / "fashion_mnist"),
        str(tmp_path / "no-debian"),
        "download failed",
        "--data-dir",
        "apt-get install dataset-fashion-mnist",
    ):
        assert part in message, f"{part!r} not in {message!r}"


def test_mnist_not_found(tmp_path: Path, empty_cache: Path) -> None:
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    with pytest.raises(DataNotFound) as err:
        mnist(data_dir)
    message = str(err.value)
    for part in (str(data_dir), str(empty_cache / "mnist"), "download failed", "--data-dir"):
        assert part in message, f"{part!r} not in {message!r}"
    assert "apt-get" not in message  # Debian packages FashionMNIST only


def test_cifar10_not_found(tmp_path: Path, empty_cache: Path) -> None:
    with pytest.raises(DataNotFound) as err:
        cifar10(tmp_path)
    message = str(err.value)
    for part in (str(tmp_path), str(empty_cache / "cifar10"), "download failed", "--data-dir"):
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads_or_says_where_to_put_it(tmp_path: Path, name: str) -> None:
    try:
        ds = DATASETS[name](tmp_path)
    except DataNotFound as exc:
        assert isinstance(exc, HpsearchError)  # the CLI turns it into one "Error:" line
        assert name in str(exc) and "--data-dir" in str(exc)
        return
    # The facts a study file is checked against before loading are those of the data as loaded.
    facts = DATASETS.facts(name)
    assert ds.name == name and ds.task is facts.task and ds.num_outputs == facts.outputs
    assert len(ds.train_x) == len(ds.train_y) == facts.train_size
    assert len(ds.test_x) == len(ds.test_y) == facts.test_size
    assert ds.image_size == facts.image_size
    if ds.task is CLASSIFICATION:
        assert ds.train_x.dtype == torch.uint8
        assert len(ds.mean) == len(ds.std) == ds.in_channels
        assert set(ds.train_y.unique().tolist()) <= set(range(ds.num_outputs))
    else:
        assert ds.train_y.shape == (facts.train_size, facts.outputs)


# Splits, subsets and batches.


def test_split() -> None:
    train, val = split(1000, 0.2, seed=7)
    assert len(train) == 800 and len(val) == 200
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    again = split(1000, 0.2, seed=7)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    other = split(1000, 0.2, seed=8)
    assert not torch.equal(other[1], val)
    assert len(split(1000, 0.05, seed=7)[1]) == 50


def test_split_limit() -> None:
    train, val = split(1000, 0.1, seed=0, limit=300)
    assert len(train) == 270 and len(val) == 30
    both = train.tolist() + val.tolist()
    assert len(set(both)) == 300 and all(0 <= i < 1000 for i in both)
    assert torch.equal(split(1000, 0.1, seed=0, limit=300)[1], val)
    # The limited split is the same seeded subset that subset() draws.
    assert sorted(both) == sorted(subset(1000, 0, 300).tolist())


def test_split_rounds_the_validation_set_down() -> None:
    # floor(n · fraction): DataConfig.check_sizes refuses the sizes where that leaves no example.
    assert [len(split(n, 0.1, seed=0)[1]) for n in (9, 10, 19, 20, 701, 783)] == [0, 1, 1, 2, 70, 78]
    assert len(split(10, 0.01, seed=0)[1]) == 0


def test_subset() -> None:
    first = subset(100, seed=3, limit=30)
    assert len(first) == 30 and len(set(first.tolist())) == 30
    assert all(0 <= i < 100 for i in first.tolist())
    assert torch.equal(subset(100, seed=3, limit=30), first)  # seeded
    assert not torch.equal(subset(100, seed=4, limit=30), first)  # another seed, another subset
    # limit 0 keeps every index, shuffled.
    every = subset(100, seed=3)
    assert sorted(every.tolist()) == list(range(100)) and every.tolist() != list(range(100))
    # A limit is a prefix of the seed's permutation: a larger limit keeps the smaller one's examples.
    assert torch.equal(every[:30], first)
    assert subset(100, seed=3, limit=30, device="meta").device.type == "meta"


@pytest.mark.parametrize(
    ("n", "batch_size", "sizes"),
    [
        (719, 64, [64] * 11 + [15]),  # 719 = 11·64 + 15: a short last batch is kept
        (705, 64, [64] * 11),  # 705 = 11·64 + 1: the last batch of one is dropped
        (65, 64, [64]),
        (64, 64, [64]),
        (1, 64, [1]),  # a single batch of one is the whole epoch: kept
        (1, 1, [1]),
        (3, 1, [1, 1, 1]),  # batch size 1: every batch is one example and none is dropped
        (10, 3, [3, 3, 3]),
        (11, 3, [3, 3, 3, 2]),
        (0, 8, []),
    ],
)
def test_batch_slices(n: int, batch_size: int, sizes: list[int]) -> None:
    slices = batch_slices(n, batch_size)
    assert [s.stop - s.start for s in slices] == sizes
    # Consecutive, from 0, without overlap.
    assert [s.start for s in slices] == [batch_size * i for i in range(len(slices))]
    assert all(s.step is None for s in slices)


def test_batch_slices_cover_every_example_but_a_trailing_one() -> None:
    for n in range(1, 140):
        for batch_size in (1, 2, 7, 64, 200):
            slices = batch_slices(n, batch_size)
            covered = [i for s in slices for i in range(n)[s]]
            dropped = len(slices) > 0 and n % batch_size == 1 and n > batch_size
            assert covered == list(range(n - 1 if dropped else n)), (n, batch_size)
            assert all(s.stop - s.start >= 2 for s in slices) or batch_size == 1 or n == 1


# [data]: ranges checked at construction, sizes checked against the dataset.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -64}, "batch_size"),
        ({"train_limit": -1}, "train_limit"),
        ({"test_limit": -5}, "test_limit"),
        ({"resize": -28}, "resize"),
    ],
)
def test_data_config_ranges(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataConfig(name="synthetic", **kwargs)  # type: ignore[arg-type]


def test_data_config_defaults_and_edges() -> None:
    cfg = DataConfig(name="synthetic")
    assert (cfg.batch_size, cfg.val_fraction, cfg.train_limit, cfg.test_limit) == (128, 0.1, 0, 0)
    DataConfig(name="synthetic", batch_size=1, val_fraction=0.999, train_limit=0, test_limit=0, resize=0)


def test_check_sizes() -> None:
    facts = DATASETS.facts("synthetic")
    assert (facts.train_size, facts.test_size) == (800, 200)
    DataConfig(name="synthetic", train_limit=800, test_limit=200).check_sizes(800, 200)
    with pytest.raises(ValueError, match="train_limit 801 is more than the 800 training examples"):
        DataConfig(name="synthetic", train_limit=801).check_sizes(800, 200)
    with pytest.raises(ValueError, match="test_limit 201 is more than the 200 test examples"):
        DataConfig(name="synthetic", test_limit=201).check_sizes(800, 200)
    # 10 % of 9 examples is no validation example at all; of 10, one.
    with pytest.raises(ValueError, match="leaves 0 for validation"):
        DataConfig(name="synthetic", train_limit=9).check_sizes(800, 200)
    DataConfig(name="synthetic", train_limit=10).check_sizes(800, 200)
    # Without a limit the dataset's own size counts: files holding 5 examples leave none either.
    with pytest.raises(ValueError, match="of 5 examples leaves 0"):
        DataConfig(name="synthetic").check_sizes(5, 3)
    with pytest.raises(ValueError, match="leaves 0 for validation"):
        DataConfig(name="synthetic", val_fraction=0.01).check_sizes(99, 200)
    DataConfig(name="synthetic", val_fraction=0.01).check_sizes(100, 200)


# Model inputs.


def tiny_dataset(x: torch.Tensor) -> Dataset:
    y = torch.zeros(len(x), dtype=torch.long)
    return Dataset("tiny", CLASSIFICATION, x, y, x, y, 10, (0.2860,), (0.3530,))


def test_inputs_normalise() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = tiny_dataset(x).inputs(x)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 1, 3)
    want = [(v / 255 - 0.2860) / 0.3530 for v in (0, 51, 255)]
    assert out.flatten().tolist() == pytest.approx(want, rel=1e-5)
    assert x.dtype == torch.uint8 and x.flatten().tolist() == [0, 51, 255]  # stored data untouched


def test_inputs_normalise_per_channel(tmp_path: Path) -> None:
    write_cifar(tmp_path, [1, 1, 1, 1, 1, 1])
    ds = cifar10(tmp_path)
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = ds.inputs(x)
    for c in range(3):
        assert out[0, c].unique().tolist() == pytest.approx([(1 - ds.mean[c]) / ds.std[c]], rel=1e-5)


def test_inputs_resize() -> None:
    x = torch.full((2, 1, 28, 28), 102, dtype=torch.uint8)
    out = tiny_dataset(x).inputs(x, resize=224)
    assert out.shape == (2, 1, 224, 224)
    assert torch.allclose(out, torch.full_like(out, (102 / 255 - 0.2860) / 0.3530), atol=1e-5)
    assert tiny_dataset(x).inputs(x, resize=28).shape == (2, 1, 28, 28)


def test_inputs_flip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    ds = tiny_dataset(x)
    plain = ds.inputs(x)
    out = ds.inputs(x, flip=True, generator=torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(out[i], plain[i].flip(-1))) for i in range(64)]
    kept = [bool(torch.equal(out[i], plain[i])) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image one or the other
    assert 10 < sum(flipped) < 54
    for i in range(64):
        assert torch.equal(out[i].flatten().sort().values, plain[i].flatten().sort().values)
    again = ds.inputs(x, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, out)


def test_regression_inputs_pass_through() -> None:
    ds = toy_regression(None)
    x = ds.train_x[:5]
    assert ds.inputs(x) is x
    assert ds.inputs(x, resize=224, flip=True) is x


# The generated datasets.


def test_toy_regression() -> None:
    ds = toy_regression(None)
    assert ds.task is REGRESSION and ds.num_outputs == 1
    assert ds.train_x.shape == (1000, 1) and ds.train_y.shape == (1000, 1)
    assert ds.train_x.dtype == torch.float32
    assert ds.train_x.min().item() == -1.0 and ds.train_x.max().item() == 1.0
    residual = ds.train_y - ds.train_x.pow(2)
    assert residual.std().item() == pytest.approx(0.1, abs=0.01)
    assert abs(residual.mean().item()) < 0.02
    assert ds.test_x.shape == (200, 1) and bool((ds.test_x.abs() <= 1).all())
    test_residual = ds.test_y - ds.test_x.pow(2)
    assert test_residual.std().item() == pytest.approx(0.1, abs=0.02)
    assert torch.equal(toy_regression(None).train_y, ds.train_y)  # seeded


def test_synthetic() -> None:
    ds = synthetic(None)
    assert ds.task is CLASSIFICATION and ds.num_outputs == 10
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape[1:] == (1, 28, 28)
    assert ds.train_y.bincount().tolist() == [len(ds.train_y) // 10] * 10
    assert set(ds.test_y.tolist()) == set(range(10))
    assert torch.equal(synthetic(None).train_x, ds.train_x)  # seeded
