"""Shared fixtures: real studies run through the CLI into real SQLite files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hpsearch.cli import main
from hpsearch.models import MODELS
from hpsearch.task import REGRESSION

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: torch's own threads would make the two fight over both cores.
    torch.set_num_threads(1)


class Flaky(nn.Module):
    """A linear net that raises ``error`` on its ``fail_after``-th training batch (0: never).

    ``error`` is "index" (an IndexError, as a bad slice raises it) or "zero" (ZeroDivisionError):
    the kinds of bug in a user's own network that must fail its trial, not the whole run.
    """

    def __init__(self, in_features: int, num_classes: int, fail_after: int, error: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        self.fail_after, self.error, self.calls = fail_after, error, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.fail_after:
                if self.error == "zero":
                    return self.net(x) * (1 / (self.calls - self.fail_after))
                return self.net(x)[[10**9]]
        return self.net(x)


# Registered like any user's model (README, "Adding a model"); with their defaults they never fail.
@MODELS.register(input_size=28)
def flaky(in_channels: int, num_classes: int, *, fail_after: int = 0, error: str = "index") -> nn.Module:
    """A linear classifier that can be told to fail on a given training batch (tests only)."""
    return Flaky(in_channels * 28 * 28, num_classes, fail_after, error)


@MODELS.register(input_size=None, task=REGRESSION)
def flaky_regression(
    in_channels: int, num_classes: int, *, fail_after: int = 0, error: str = "index"
) -> nn.Module:
    """A linear regression that can be told to fail on a given training batch (tests only)."""
    return Flaky(in_channels, num_classes, fail_after, error)


class Sleepy(nn.Module):
    """A linear net that takes ``delay`` seconds over each training batch: a deliberately slow trial."""

    def __init__(self, in_features: int, num_classes: int, delay: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay)
        return self.net(x)


@MODELS.register(input_size=28)
def sleepy(in_channels: int, num_classes: int, *, delay: float = 0.0) -> nn.Module:
    """A linear classifier that sleeps ``delay`` seconds per training batch (tests only)."""
    return Sleepy(in_channels * 28 * 28, num_classes, delay)


# A grid over known configurations, so the fixture always holds complete, pruned (by the
# threshold pruner) and diverged trials; the synthetic data keeps it to seconds on a CPU.
SYNTHETIC_STUDY = """
[study]
description = "fixture: grid over optimizer and lr on synthetic data"
n_trials = 8
seed = 0
sampler = "grid"
pruner = { name = "threshold", lower = 0.5 }

[data]
name = "synthetic"
batch_size = 64
train_limit = 300

[model]
name = "mnist_cnn"

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { choices = [0.0001, 0.003, 0.05, 50.0] }

[train]
epochs = 3
"""


# Every configuration learns (no divergence, no pruner), so each trial should end COMPLETE.
QUICK_STUDY = """
[study]
description = "test: a quick random search on synthetic data"
n_trials = 6
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 64

[model]
name = "mnist_cnn"

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { low = 0.0001, high = 0.003, log = true }

[train]
epochs = 1
"""


@dataclass
class StoredStudy:
    """A study file and the storage its trials were run into."""

    name: str
    path: Path
    storage: str

    def load(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.storage)


def write_study(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of ``folder``: a file's SHA-256, or "folder".

    SQLite's own side files of a WAL-mode database are left out where they hold no data: a reader
    creates the shared-memory index (``-shm``) and an empty ``-wal``, and cannot remove them.
    """
    out = {}
    for p in folder.iterdir():
        if p.name.endswith("-shm") or (p.name.endswith("-wal") and p.stat().st_size == 0):
            continue
        out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return out


def quiet_copy(url: str, target: Path, journal: str = "wal") -> str:
    """A copy of an SQLite study file with no connection left open to it, in ``journal`` mode.

    "wal" is how ``hpsearch run`` leaves a file, "delete" how plain Optuna does.
    """
    source = url.removeprefix("sqlite:///")
    with (
        contextlib.closing(sqlite3.connect(source)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)
        assert dst.execute(f"PRAGMA journal_mode={journal}").fetchone() == (journal,)
    return f"sqlite:///{target}"


def foreign_database(path: Path) -> str:
    """Another program's SQLite database at ``path`` (one table, ``accounts``); its URL."""
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT, balance REAL)")
        con.execute("INSERT INTO accounts (owner, balance) VALUES ('ada', 12.5)")
        con.commit()
    return f"sqlite:///{path}"


def run_cli(*args: str) -> str:
    """Invoke ``hpsearch`` in process; fail the test with its output when it exits non-zero."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="session")
def synthetic_study(tmp_path_factory: pytest.TempPathFactory) -> StoredStudy:
    """Eight finished trials of ``SYNTHETIC_STUDY`` in a fresh SQLite file."""
    return run_stored(tmp_path_factory.mktemp("synthetic-study"), "synthetic-grid", SYNTHETIC_STUDY)


def run_stored(folder: Path, name: str, text: str) -> StoredStudy:
    """Study ``text`` written to ``folder/name.toml`` and run by `hpsearch run` into a fresh SQLite file."""
    path = write_study(folder, name, text)
    storage = f"sqlite:///{folder / 'hpsearch.db'}"
    run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu")
    return StoredStudy(name, path, storage)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: two workers take test modules in this order, and a long module taken last
    would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
