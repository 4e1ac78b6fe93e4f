"""The process-wide settings trials train under (``hpsearch.backends``).

The allocator setting is the process's for good, so each case runs a real trial in a fresh process
and counts its minor page faults: memory handed back to the OS and faulted in again on the next
step is exactly what the setting stops. No timings are judged.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpsearch import backends
from hpsearch.models import build_model
from hpsearch.optim import build_optimizer

# LeNet on 5,400 FashionMNIST training images (21 batches of 256 and one of 24), two epochs.
STUDY = """
[study]
n_trials = 1
sampler = "random"
pruner = "none"

[data]
name = "fashion_mnist"
batch_size = 256
train_limit = 6000

[model]
name = "lenet"

[optimizer]
name = "sgd"
lr = 0.05

[train]
epochs = 2
"""

# Faults while one trial trains; with "glibc-defaults" the setting is never made.
TRIAL = """
import resource, sys
import optuna, torch
from hpsearch import backends, train
from hpsearch.datasets import load_dataset
from hpsearch.spec import load_spec

if sys.argv[2] == "glibc-defaults":
    backends.keep_freed_memory = lambda: False
spec = load_spec(sys.argv[1])
load_dataset("fashion_mnist", None, "cpu")
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(direction="maximize")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train.run_trial(study.ask(), spec, torch.device("cpu"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def trial_faults(tmp_path: Path, mode: str) -> int:
    study = tmp_path / "faults.toml"
    study.write_text(STUDY, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", TRIAL, str(study), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not backends.keep_freed_memory(), reason="the allocator setting is glibc's")
def test_a_trial_keeps_its_freed_memory_instead_of_faulting_it_in_every_step(tmp_path: Path) -> None:
    kept, defaults = trial_faults(tmp_path, "hpsearch"), trial_faults(tmp_path, "glibc-defaults")
    assert kept * 2 < defaults, (kept, defaults)


def test_lbfgs_steps_a_network_kept_channels_last() -> None:
    """LBFGS steps a flat view of its parameters; a channels-last weight has none, so
    ``build_optimizer`` gives LBFGS the plain layout and training works on image batches."""
    torch.manual_seed(0)
    net = build_model("lenet", 1, 10).to(memory_format=torch.channels_last)
    x = torch.randn(37, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (37,))
    optimizer = build_optimizer("lbfgs", net.parameters(), lr=1.0, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(net(x), y)
        value.backward()
        return value

    first = float(loss().detach())
    for _ in range(4):
        optimizer.step(loss)  # type: ignore[arg-type]
    assert float(loss().detach()) < first
