"""``hpsearch verify`` and ``hpsearch predict`` on real stored studies, real data and real image files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from conftest import StoredStudy, run_stored, write_study
from hpsearch.cli import main
from hpsearch.datasets import load_dataset, split, subset
from hpsearch.predict import MODEL_FILE, class_names
from hpsearch.storage import open_artifacts
from hpsearch.train import retrain
from hpsearch.verify import plan, verify_seeds

# 300 of the 800 synthetic training images: 270 to train on and 30 to validate a trial, all 300 to
# retrain one; 150 of the 200 test images. Three trials, so the two best have a third behind them.
SYNTHETIC = """
[study]
n_trials = 3
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 64
train_limit = 300
test_limit = 150

[model]
name = "mnist_cnn"

[optimizer]
name = "adam"
lr = { low = 0.0005, high = 0.003, log = true }

[train]
epochs = 1
"""

# A small BatchNorm CNN on 8,000 FashionMNIST images for two epochs: above 0.8 test accuracy in a
# few seconds of training (one trial, then one retraining).
FASHION = """
[study]
n_trials = 1
seed = 0
pruner = "none"

[data]
name = "fashion_mnist"
batch_size = 64
train_limit = 8000
test_limit = 1000

[model]
name = "bn_cnn"

[optimizer]
name = "adam"
lr = 0.005

[scheduler]
name = "cosine"

[train]
epochs = 2
"""

# One configuration (a grid of one), which raises on its first batch: a study with no complete trial.
FAILING = """
[study]
sampler = "grid"
pruner = "none"

[data]
name = "synthetic"
train_limit = 100
test_limit = 50

[model]
name = "flaky"
fail_after = { choices = [1] }

[optimizer]
name = "sgd"
lr = 0.05
"""

LINE = re.compile(
    r"^\[(\d+)/(\d+)\] trial (\d+) seed (\d+): test accuracy (\S+), \S+s on (\d+) training examples$"
)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, start: str) -> None:
    """A user's mistake: exit 1, one line, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {start}"), result.output


@dataclass
class Verified:
    stored: StoredStudy
    result: Result
    rows: list[dict]
    out: Path


@pytest.fixture(scope="module")
def quiet_artifacts() -> Iterator[None]:
    """Artifacts beside each test's SQLite file, whatever the environment says."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HPSEARCH_ARTIFACTS", raising=False)
        yield


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory, quiet_artifacts: None) -> Verified:
    folder = tmp_path_factory.mktemp("verify-synthetic")
    stored = run_stored(folder, "verify-synthetic", SYNTHETIC)
    out = folder / "verify.json"
    result = invoke(
        "verify",
        "--study",
        stored.name,
        "--storage",
        stored.storage,
        "--top",
        "2",
        "--seeds",
        "2",
        "--device",
        "cpu",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return Verified(stored, result, json.loads(out.read_text(encoding="utf-8")), out)


def test_verify_retrains_the_k_best_with_s_fresh_seeds_each(synthetic: Verified) -> None:
    study = synthetic.stored.load()
    done = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: (-(t.value or 0.0), t.number),
    )
    rows = synthetic.rows
    assert [r["trial"] for r in rows] == [t.number for t in done[:2]] and [r["rank"] for r in rows] == [1, 2]
    for row, trial in zip(rows, done, strict=False):
        # The search's own numbers, and the parameters it sampled.
        assert row["val_acc"] == trial.value and row["test_acc"] == trial.user_attrs["test_acc"]
        assert row["optimizer.lr"] == trial.params["optimizer.lr"]
        values = row["retrained_test_acc"]
        assert len(values) == len(row["seeds"]) == row["n_seeds"] == 2
        assert all(0.0 <= v <= 1.0 for v in values)
        assert row["retrained_test_acc_mean"] == pytest.approx(np.mean(values))
        assert row["retrained_test_acc_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["epochs"] == 1 and row["stopped_early"] == 0
    # The same fresh seeds for every configuration, none of them a seed the search trained with.
    seeds = rows[0]["seeds"]
    assert rows[1]["seeds"] == seeds and len(set(seeds)) == 2
    assert not set(seeds) & {t.user_attrs["seed"] for t in study.trials}


def test_verify_trains_on_training_plus_validation_and_tests_on_the_studys_test_set(
    synthetic: Verified,
) -> None:
    train, val = split(800, 0.1, 0, 300)
    assert (len(train), len(val)) == (270, 30)
    for row in synthetic.rows:
        assert row["train_examples"] == len(train) + len(val) == 300
        assert row["test_examples"] == len(subset(200, 0, 150)) == 150
    # One line per retraining on stderr, each with what it trained on.
    lines = [m for line in synthetic.result.stderr.splitlines() if (m := LINE.match(line))]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(k, 4) for k in range(1, 5)]
    assert {int(m[6]) for m in lines} == {300}
    per_seed = [(int(m[3]), int(m[4]), float(m[5])) for m in lines]
    table = [
        (r["trial"], s, v)
        for r in synthetic.rows
        for s, v in zip(r["seeds"], r["retrained_test_acc"], strict=True)
    ]
    assert per_seed == [(t, s, pytest.approx(v, abs=5e-5)) for t, s, v in table]


def test_the_verdict_applies_the_stated_rule(synthetic: Verified) -> None:
    w, r = synthetic.rows
    gap = abs(w["retrained_test_acc_mean"] - r["retrained_test_acc_mean"])
    noise = max(w["retrained_test_acc_std"], r["retrained_test_acc_std"])
    (verdict,) = [line for line in synthetic.result.stderr.splitlines() if line.startswith("winner trial")]
    assert verdict.startswith(f"winner trial {w['trial']} vs runner-up trial {r['trial']}: ")
    assert ("within noise" in verdict) == (gap < noise), verdict
    assert ("a real difference" in verdict) == (gap >= noise), verdict


def test_the_table_is_attached_to_the_study_and_a_rerun_repeats_it(synthetic: Verified) -> None:
    stored = synthetic.stored
    study = stored.load()
    store = open_artifacts(stored.storage)
    metas = {m.filename: m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(study)}
    got = synthetic.out.with_name("downloaded.json")
    optuna.artifacts.download_artifact(
        artifact_store=store, artifact_id=metas["verify.json"], file_path=str(got)
    )
    assert got.read_text(encoding="utf-8") == synthetic.out.read_text(encoding="utf-8")
    # The same seeds and the same numbers again (CPU training is deterministic), as Markdown.
    again = invoke(
        "verify",
        "--study",
        stored.name,
        "--storage",
        stored.storage,
        "--top",
        "2",
        "--seeds",
        "2",
        "--device",
        "cpu",
        "--format",
        "md",
    )
    assert again.exit_code == 0, again.output
    header, _, *body = again.stdout.splitlines()
    assert header.startswith("| rank | trial | val_acc | test_acc | retrained_test_acc_mean |")
    assert "seeds" not in header.split(" | ")  # the per-seed lists are JSON's alone
    for line, row in zip(body, synthetic.rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert int(cells[1]) == row["trial"]
        assert float(cells[4]) == pytest.approx(row["retrained_test_acc_mean"], rel=1e-5)
    names = {m.filename for m in optuna.artifacts.get_all_artifact_meta(stored.load())}
    assert {"verify.json", "verify.md"} <= names


def test_retraining_with_a_trials_own_seed_and_split_repeats_the_trial(synthetic: Verified) -> None:
    study = synthetic.stored.load()
    planned = plan(study, 1, 1)
    (config,) = planned.configs
    trial = study.trials[config.trial]
    data = load_dataset("synthetic")
    train, _ = split(800, 0.1, 0, 300)
    done = retrain(
        config.cfg,
        planned.task,
        data,
        train,
        subset(200, 0, 150),
        trial.user_attrs["seed"],
        torch.device("cpu"),
    )
    assert done.examples == 270
    assert done.test == trial.user_attrs["test_acc"]
    assert done.train_loss == pytest.approx(trial.user_attrs["train_loss"])


def test_verify_seeds_are_reproducible_and_avoid_the_ones_given() -> None:
    first = verify_seeds(0, 5, set())
    assert verify_seeds(0, 5, set()) == first and len(set(first)) == 5
    assert verify_seeds(1, 5, set()) != first
    assert verify_seeds(0, 4, {first[0], first[2]}) == [
        first[1],
        first[3],
        first[4],
        verify_seeds(0, 6, set())[5],
    ]


def test_verify_refuses_bad_input_in_one_line(synthetic: Verified, tmp_path: Path) -> None:
    storage = synthetic.stored.storage
    base = ["verify", "--storage", storage, "--device", "cpu"]
    one_line_error(invoke(*base, "--study", "nope"), "no study named 'nope'")
    one_line_error(invoke(*base, "--study", synthetic.stored.name, "--top", "0"), "--top must be at least 1")
    one_line_error(
        invoke(*base, "--study", synthetic.stored.name, "--seeds", "0"), "--seeds must be at least 1"
    )
    # A study whose only trial failed.
    path = write_study(tmp_path, "all-failed", FAILING)
    own = f"sqlite:///{tmp_path / 'failed.db'}"
    assert invoke("run", "--study", str(path), "--storage", own, "--device", "cpu").exit_code == 1
    one_line_error(
        invoke("verify", "--study", "all-failed", "--storage", own),
        "study 'all-failed' has no completed trial yet (1 fail)",
    )
    # Another program's study, complete trial and all.
    other = optuna.create_study(study_name="plain", storage=own)
    other.add_trial(optuna.trial.create_trial(value=0.5))
    one_line_error(
        invoke("verify", "--study", "plain", "--storage", own), "study 'plain' was not made by hpsearch"
    )


@dataclass
class Saved:
    folder: Path
    rows: list[dict]
    tmp: Path


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory, quiet_artifacts: None) -> Saved:
    folder = tmp_path_factory.mktemp("verify-fashion")
    stored = run_stored(folder, "verify-fashion", FASHION)
    out, saved = folder / "verify.json", folder / "model"
    result = invoke(
        "verify",
        "--study",
        stored.name,
        "--storage",
        stored.storage,
        "--top",
        "1",
        "--seeds",
        "1",
        "--device",
        "cpu",
        "--save",
        str(saved),
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    return Saved(saved, json.loads(out.read_text(encoding="utf-8")), folder)


def write_png(path: Path, pixels: np.ndarray, mode: str = "L") -> Path:
    image = Image.fromarray(pixels)
    (image if mode == "L" else image.convert(mode)).save(path)
    return path


def classes_of(result: Result) -> dict[str, int]:
    """file → predicted index, from predict's table."""
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["file", "class", "index", "probability"]
    found = {}
    for row in rows:
        file, rest = row.split("  ", 1)
        *_, index, prob = rest.split()
        assert 0.0 <= float(prob) <= 1.0
        found[file] = int(index)
    return found


@pytest.mark.slow  # trains on the real FashionMNIST
def test_verify_save_keeps_the_best_network_with_its_configuration(fashion: Saved) -> None:
    (row,) = fashion.rows
    assert row["retrained_test_acc_mean"] > 0.8
    config = json.loads((fashion.folder / MODEL_FILE).read_text(encoding="utf-8"))
    assert config["model"] == "bn_cnn" and config["dataset"] == "fashion_mnist"
    assert config["classes"] == class_names("fashion_mnist") and config["classes"][9] == "Ankle boot"
    assert (config["in_channels"], config["image_size"], config["input_size"]) == (1, 28, 28)
    data = load_dataset("fashion_mnist")
    assert (tuple(config["mean"]), tuple(config["std"])) == (data.mean, data.std)
    assert config["source"]["seed"] == row["seeds"][0] and config["source"]["trial"] == row["trial"]
    assert config["source"]["retrained_test_acc"] == row["retrained_test_acc"][0]
    assert not list(fashion.folder.glob(".*"))  # written atomically: no temporary file left


@pytest.mark.slow  # trains on the real FashionMNIST
def test_predict_reads_image_files_as_training_read_the_dataset(fashion: Saved) -> None:
    # The study's own test images as PNG files: predict must score what verify measured on them.
    data = load_dataset("fashion_mnist")
    images = fashion.tmp / "test-images"
    images.mkdir()
    idx = subset(len(data.test_y), 0, 1000).tolist()
    paths = [write_png(images / f"{i}.png", data.test_x[i, 0].numpy()) for i in idx]
    found = classes_of(invoke("predict", str(fashion.folder), *map(str, paths)))
    labels = [int(data.test_y[i]) for i in idx]
    right = [found[str(p)] == y for p, y in zip(paths, labels, strict=True)]
    (row,) = fashion.rows
    assert np.mean(right) > 0.8
    assert np.mean(right) == pytest.approx(row["retrained_test_acc_mean"], abs=0.003)


@pytest.mark.slow  # trains on the real FashionMNIST
def test_predict_names_the_top_classes_inverts_and_converts_colour(fashion: Saved) -> None:
    data = load_dataset("fashion_mnist")
    folder = fashion.tmp / "top"
    folder.mkdir()
    pixels = [data.test_x[i, 0].numpy() for i in range(6)]
    plain = [write_png(folder / f"{i}.png", p) for i, p in enumerate(pixels)]
    dark = [write_png(folder / f"{i}-on-white.png", 255 - p) for i, p in enumerate(pixels)]
    rgb = [write_png(folder / f"{i}-rgb.png", p, "RGB") for i, p in enumerate(pixels)]
    base = classes_of(invoke("predict", str(fashion.folder), *map(str, plain)))
    assert classes_of(invoke("predict", str(fashion.folder), "--invert", *map(str, dark))) == {
        str(d): base[str(p)] for d, p in zip(dark, plain, strict=True)
    }
    assert classes_of(invoke("predict", str(fashion.folder), *map(str, rgb))) == {
        str(c): base[str(p)] for c, p in zip(rgb, plain, strict=True)
    }
    result = invoke("predict", str(fashion.folder), "--top", "3", str(plain[0]), str(plain[1]))
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["file", "rank", "class", "index", "probability"]
    assert len(rows) == 6
    names = class_names("fashion_mnist")
    assert names is not None
    for path, group in zip(plain[:2], (rows[:3], rows[3:]), strict=True):
        probs = []
        for rank, line in enumerate(group, start=1):
            assert line.startswith(str(path))
            index, prob = int(line.split()[-2]), float(line.split()[-1])
            assert f" {rank}  {names[index]} " in line
            probs.append(prob)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-4
        assert int(group[0].split()[-2]) == base[str(path)]


@pytest.mark.slow  # trains on the real FashionMNIST
def test_predict_refuses_a_bad_image_or_folder_in_one_line(fashion: Saved, tmp_path: Path) -> None:
    good = write_png(tmp_path / "good.png", np.zeros((28, 28), dtype=np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    one_line_error(invoke("predict", str(fashion.folder), str(good), str(bad)), f"cannot read image {bad}")
    missing = tmp_path / "missing.png"
    one_line_error(invoke("predict", str(fashion.folder), str(missing)), f"no image file {missing}")
    one_line_error(invoke("predict", str(tmp_path / "no-model"), str(good)), "no saved model at")
    one_line_error(invoke("predict", str(tmp_path), str(good)), f"no saved model in {tmp_path}: model.json")
    (tmp_path / MODEL_FILE).write_text("{not json", encoding="utf-8")
    (tmp_path / "weights.pt").write_bytes(b"")
    one_line_error(invoke("predict", str(tmp_path), str(good)), f"{tmp_path / MODEL_FILE}: not a model file")
