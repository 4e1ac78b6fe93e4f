"""A disk that fills up under a running study: one line, exit 1, nothing finished lost.

The study lives on a real 3 MiB tmpfs mounted for the test (root only; skipped, saying so,
elsewhere). A model registered the way a user registers one fills that disk in the middle of its
second trial, as another program writing to the same disk would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import write_study
from hpsearch.cli import main
from hpsearch.models import MODELS

COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)  # fmt: skip


class _Filler(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, filler: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))
        self.filler = filler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.filler:
            _fill(Path(self.filler))
            self.filler = ""
        return self.net(x)


def _fill(path: Path) -> None:
    """Write ``path`` until its disk has no byte left."""
    with path.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with contextlib.suppress(OSError), path.open("ab") as f:  # the last partial block
        while True:
            f.write(b"\0")
            f.flush()


@MODELS.register(input_size=28)
def disk_filler(in_channels: int, num_classes: int, *, filler: str = "") -> nn.Module:
    """A linear net that fills the disk holding ``filler`` on its first batch (tests only)."""
    return _Filler(in_channels, num_classes, filler)


STUDY = """
[study]
sampler = "grid"
pruner = "none"
retries = 0  # the lost trial would fill the disk again

[data]
name = "synthetic"
train_limit = 301
batch_size = 64

[model]
name = "disk_filler"
filler = {{ choices = ["", "{filler}"] }}

[optimizer]
name = "sgd"
lr = 0.05

[train]
epochs = 2
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_mid_run_ends_it_with_one_line(small_disk: Path, tmp_path: Path) -> None:
    filler = small_disk / "filler"
    path = write_study(tmp_path, "full", STUDY.format(filler=filler))
    storage = f"sqlite:///{small_disk / 'hpsearch.db'}"
    result = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", storage, "--device", "cpu"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.output
    assert "database or disk is full" in error[0] and "finished trials are kept" in error[0]
    assert "Should not reach" not in result.output

    filler.unlink()  # space again: the study is intact and the run resumes
    study = optuna.load_study(study_name="full", storage=storage)
    first, second = study.trials
    assert first.state == COMPLETE and first.user_attrs["epochs_run"] == 2
    assert second.params == {"model.filler": str(filler)}
    # Not even "failed" could be written then; the next run sees its worker is gone and says so.
    assert second.state == RUNNING
    again = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", storage, "--device", "cpu"])
    assert again.exit_code == 0, again.output
    first, second = optuna.load_study(study_name="full", storage=storage).trials
    assert first.state == COMPLETE and second.state == FAIL
    assert "lost in epoch 1" in second.user_attrs["fail_reason"]
