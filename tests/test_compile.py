"""``[train] compile = true``: the trial trains through ``torch.compile``.

Inductor's code generation takes tens of seconds on two cores, so these tests compile with
dynamo's ``eager`` backend: the network is still captured into graphs by ``torch.compile`` (which
the graph counter shows), and the numbers must be those of the uncompiled trial.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch._dynamo
from optuna.trial import TrialState

from conftest import write_study
from hpsearch.checkpoint import Checkpoints
from hpsearch.record import TrialRecord
from hpsearch.spec import load_spec
from hpsearch.study import open_study, run_study

STUDY = """
[study]
n_trials = 1
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 64
train_limit = 250

[model]
name = "lenet"

[optimizer]
name = "sgd"
lr = 0.05
momentum = 0.9

[train]
epochs = 2
compile = {compile}
"""

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def one_trial(tmp_path: Path, compile: bool) -> TrialRecord:
    name = f"compile-{compile}".lower()
    spec = load_spec(str(write_study(tmp_path, name, STUDY.format(compile=str(compile).lower()))))
    study = open_study(spec, f"sqlite:///{tmp_path / (name + '.sqlite')}")
    run_study(spec, study, device="cpu", checkpoints=Checkpoints(tmp_path / name))
    [trial] = study.trials
    assert trial.state == TrialState.COMPLETE
    return TrialRecord.of(trial, spec.task)


def test_a_compiled_trial_trains_the_numbers_of_an_uncompiled_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = one_trial(tmp_path, compile=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled = one_trial(tmp_path, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did go through dynamo
    assert compiled.config["train"]["compile"] is True
    assert compiled.train_loss == pytest.approx(plain.train_loss, rel=1e-6)
    assert compiled.val == plain.val and compiled.test == plain.test
    torch._dynamo.reset()
