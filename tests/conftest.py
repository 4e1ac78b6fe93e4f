"""Shared fixtures: real studies run through the CLI into real SQLite files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from hpsearch.cli import main

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


def run_cli(*args: str) -> str:
    """Invoke ``hpsearch`` in process; fail the test with its output when it exits non-zero."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="session")
def synthetic_study(tmp_path_factory: pytest.TempPathFactory) -> StoredStudy:
    """Eight finished trials of ``SYNTHETIC_STUDY`` in a fresh SQLite file."""
    folder = tmp_path_factory.mktemp("synthetic-study")
    path = write_study(folder, "synthetic-grid", SYNTHETIC_STUDY)
    storage = f"sqlite:///{folder / 'hpsearch.db'}"
    run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu")
    return StoredStudy("synthetic-grid", path, storage)
