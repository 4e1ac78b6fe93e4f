"""Multi-objective studies: ``[study] objectives`` adds costs to the metric, Optuna keeps a Pareto
front, and export, report and the dashboard's names show it.

One real study on a FashionMNIST subset, run by ``hpsearch run`` into a real SQLite file: LeNet and
seed 000's BatchNorm CNN at three widths, searched by NSGA-II for validation accuracy and parameter
count, so the front trades one against the other.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from optuna.study import StudyDirection
from optuna.trial import TrialState

from conftest import StoredStudy, run_cli, run_stored, write_study
from hpsearch.cli import main
from hpsearch.datasets import DATASETS
from hpsearch.models import build_model
from hpsearch.record import TrialRecord
from hpsearch.task import CLASSIFICATION

# 700 images, 70 for validation: 630 to train on, in batches of 64 (nine and one of 54).
STUDY = """
[study]
n_trials = 8
seed = 0
objectives = [{objectives}]
sampler = {{ name = "nsga2", population_size = 4 }}
{extra}

[data]
name = "fashion_mnist"
train_limit = 700
test_limit = 100
batch_size = 64

[model]
name = {{ choices = ["lenet", "bn_cnn"] }}

[model.bn_cnn]
hidden = {{ choices = [3, 37, 150] }}

[optimizer]
name = "adam"
lr = {{ low = 1e-3, high = 1e-2, log = true }}

[train]
epochs = 2
"""


def study_text(objectives: str = '"accuracy", "params"', extra: str = "") -> str:
    return STUDY.format(objectives=objectives, extra=extra)


@pytest.fixture(scope="module")
def front_study(tmp_path_factory: pytest.TempPathFactory) -> StoredStudy:
    return run_stored(tmp_path_factory.mktemp("front"), "front", study_text())


def dominated(a: list[float], b: list[float]) -> bool:
    """Whether values ``a`` (accuracy up, parameters down) are dominated by ``b``."""
    return b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1])


def test_each_trial_reports_its_metric_and_its_cost(front_study: StoredStudy) -> None:
    study = front_study.load()
    assert study.directions == [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]
    assert study.metric_names == ["validation accuracy", "parameters"]  # the dashboard's names
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 8
    models = set()
    for t in complete:
        rec = TrialRecord.of(t, CLASSIFICATION)
        cfg = rec.config["model"]
        models.add((cfg["name"], cfg.get("hidden")))
        net = build_model(**cfg, in_channels=1, num_classes=10)
        assert t.values == [rec.val[-1], sum(p.numel() for p in net.parameters())]
        assert len(rec.val) == 2
        assert t.intermediate_values == {}  # Optuna takes none in a multi-objective study
    assert len(models) > 1


def test_export_is_the_pareto_front(front_study: StoredStudy) -> None:
    study = front_study.load()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    values = {t.number: t.values for t in complete}
    expected = {n for n, v in values.items() if not any(dominated(v, w) for w in values.values())}
    assert 1 <= len(expected) < len(values)  # the study trades one objective against the other

    out = run_cli("export", "--study", front_study.name, "--storage", front_study.storage, "-o", "-")
    table = pd.read_csv(io.StringIO(out))
    assert set(table["trial"]) == expected
    assert list(table["val_acc"]) == sorted(table["val_acc"], reverse=True)
    for _, row in table.iterrows():
        assert [row["val_acc"], row["n_params"]] == values[row["trial"]]

    everything = pd.read_csv(
        io.StringIO(
            run_cli("export", "--study", front_study.name, "--storage", front_study.storage, "--trials")
        )
    )
    assert set(everything["trial"]) == set(values) and "n_params" in everything.columns


def test_report_draws_the_front(front_study: StoredStudy, tmp_path: Path) -> None:
    run_cli(
        "report", "--study", front_study.name, "--storage", front_study.storage, "--output", str(tmp_path)
    )
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "on the Pareto front" in md and "![Pareto front](front.png)" in md


def test_latency_and_epoch_time_objectives(tmp_path: Path) -> None:
    text = study_text('"accuracy", "epoch_time", "latency"').replace("n_trials = 8", "n_trials = 2")
    stored = run_stored(tmp_path, "costs", text)
    study = stored.load()
    assert study.metric_names == ["validation accuracy", "seconds per epoch", "latency (ms per image)"]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        rec = TrialRecord.of(t, CLASSIFICATION)
        assert rec.latency_ms is not None and rec.latency_ms > 0
        assert t.values == [rec.val[-1], sum(rec.epoch_time_s) / len(rec.epoch_time_s), rec.latency_ms]


@pytest.mark.parametrize(
    ("objectives", "extra", "where", "says"),
    [
        ('"accuracy", "params"', 'pruner = "median"', "study.pruner", "Optuna's pruners judge one value"),
        ('"accuracy", "params"', 'sampler = "cmaes"', "study.sampler", "cmaes optimises one objective"),
        ('"accuracy", "flops"', "", "study.objectives", "unknown objective 'flops'"),
        ('"params", "accuracy"', "", "study.objectives", "the first objective must be the task's metric"),
        ('"accuracy", "params", "params"', "", "study.objectives", "listed twice"),
        ('"mse", "params"', "", "study.objectives", "'accuracy'"),
    ],
)
def test_a_wrong_objective_setting_is_one_line(
    tmp_path: Path, objectives: str, extra: str, where: str, says: str
) -> None:
    text = study_text(objectives, extra)
    if "sampler =" in extra:  # the file's own sampler line is replaced
        text = text.replace('sampler = { name = "nsga2", population_size = 4 }\n', "")
    path = write_study(tmp_path, "bad", text)
    result = CliRunner().invoke(
        main, ["run", "--study", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    line = result.output.strip()
    assert "\n" not in line and f"{where}:" in line and says in line, line
    assert not (tmp_path / "x.db").exists()


def test_changing_the_objectives_is_refused_on_resume(tmp_path: Path) -> None:
    one = study_text().replace("n_trials = 8", "n_trials = 1")
    stored = run_stored(tmp_path, "front", one)
    write_study(tmp_path, "front", one.replace('"accuracy", "params"', '"accuracy", "latency"'))
    result = CliRunner().invoke(main, ["run", "--study", str(stored.path), "--storage", stored.storage])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "study.objectives changed" in result.output
    assert len(stored.load().trials) == 1


def test_a_single_objective_study_is_unchanged(tmp_path: Path) -> None:
    text = study_text('"accuracy"').replace("n_trials = 8", "n_trials = 2")
    text = text.replace('sampler = { name = "nsga2", population_size = 4 }', 'sampler = "random"')
    study = run_stored(tmp_path, "one", text).load()
    assert study.directions == [StudyDirection.MAXIMIZE]
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        rec = TrialRecord.of(t, CLASSIFICATION)
        assert t.intermediate_values == dict(enumerate(rec.val, start=1))
        assert rec.latency_ms is not None and math.isfinite(rec.latency_ms)
    assert optuna.load_study(study_name="one", storage=f"sqlite:///{tmp_path}/hpsearch.db").metric_names == [
        DATASETS.facts("fashion_mnist").task.metric_label
    ]
