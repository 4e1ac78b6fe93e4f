"""The run command end to end: real FashionMNIST subset, real SQLite, read back through Optuna."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from conftest import run_cli, write_study
from hpsearch.cli import main
from hpsearch.datasets import DATASETS
from hpsearch.models import MODELS
from hpsearch.optim import OPTIMIZERS, SCHEDULERS
from hpsearch.search import PRUNERS, SAMPLERS
from hpsearch.train import trial_seed

# A grid of two known configurations on 3,000 real FashionMNIST images: Adam at lr 3e-3 learns,
# at lr 1e-6 it stays near chance and the threshold pruner stops it after epoch 1.
FASHION_STUDY = """
[study]
description = "test: LeNet on a FashionMNIST subset"
n_trials = 2
seed = 7
sampler = "grid"
pruner = { name = "threshold", lower = 0.3 }

[data]
name = "fashion_mnist"
train_limit = 3000
test_limit = 1000
batch_size = 64

[model]
name = "lenet"
init = "xavier_uniform"

[optimizer]
name = "adam"
lr = { choices = [0.000001, 0.003] }

[train]
epochs = 2
"""

# A valid study body without [study], to put under a [study] table of one's own.
QUICK_BODY = """
[data]
name = "synthetic"

[model]
name = "mnist_cnn"

[optimizer]
name = "sgd"
lr = 0.01
"""

DIVERGING_STUDY = """
[study]
n_trials = 1
pruner = "none"

[data]
name = "fashion_mnist"
train_limit = 6000
test_limit = 500
batch_size = 32

[model]
name = "lenet"

[optimizer]
name = "sgd"
lr = 10000.0

[train]
epochs = 3
"""


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and output of a CLI run that must end by ``SystemExit`` (a handled error or
    success), never by an exception escaping the command."""
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, optuna.Study]:
    folder = tmp_path_factory.mktemp("fashion")
    path = write_study(folder, "fashion-test", FASHION_STUDY)
    storage = f"sqlite:///{folder / 'hpsearch.db'}"
    out = run_cli("run", "--study", str(path), "--storage", storage, "--device", "cpu")
    assert "best trial" in out
    return path, storage, optuna.load_study(study_name="fashion-test", storage=storage)


def test_run_stores_trials_with_history_and_attributes(
    fashion: tuple[Path, str, optuna.Study],
) -> None:
    _, _, study = fashion
    trials = {t.params["optimizer.lr"]: t for t in study.trials}
    assert set(trials) == {0.000001, 0.003}
    good, bad = trials[0.003], trials[0.000001]

    assert good.state == optuna.trial.TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [1, 2]
    assert good.value == good.intermediate_values[2]
    assert good.value > 0.5
    attrs = good.user_attrs
    assert attrs["val_acc"] == [good.intermediate_values[1], good.intermediate_values[2]]
    assert len(attrs["train_loss"]) == 2 and attrs["train_loss"][1] < attrs["train_loss"][0]
    assert len(attrs["epoch_time_s"]) == 2 and all(t > 0 for t in attrs["epoch_time_s"])
    assert attrs["epochs_run"] == 2
    assert 0.5 < attrs["test_acc"] <= 1.0
    assert attrs["examples_per_s"] > 0 and attrs["run_time_s"] > 0
    assert attrs["device"] == "cpu"
    assert attrs["n_params"] == 61_706
    assert attrs["seed"] == trial_seed(7, good.number)
    # The config says what ran: the sampled lr and Adam's own defaults.
    assert attrs["config"]["optimizer"].items() >= {"name": "adam", "lr": 0.003, "eps": 1e-8}.items()
    assert attrs["config"]["data"]["batch_size"] == 64

    assert bad.state == optuna.trial.TrialState.PRUNED
    assert list(bad.intermediate_values) == [1]
    assert bad.intermediate_values[1] < 0.3
    assert bad.user_attrs["stop_reason"].startswith("pruned at epoch 1")
    assert "test_acc" not in bad.user_attrs


def test_study_records_spec_and_versions(fashion: tuple[Path, str, optuna.Study]) -> None:
    path, _, study = fashion
    attrs = study.user_attrs
    assert attrs["spec_source"] == path.read_text()
    assert attrs["spec"]["optimizer"]["lr"] == {"choices": [0.000001, 0.003]}
    assert attrs["hpsearch_version"] and attrs["torch_version"]
    assert attrs["metric"] == "accuracy"
    assert study.metric_names == ["validation accuracy"]


@pytest.mark.slow  # two fresh interpreters
def test_optuna_cli_reads_the_study_without_hpsearch(
    fashion: tuple[Path, str, optuna.Study],
) -> None:
    _, storage, study = fashion
    optuna_cli = Path(sys.executable).with_name("optuna")
    common = ["--study-name", "fashion-test", "--storage", storage, "-f", "json"]
    trials = subprocess.run([optuna_cli, "trials", *common], capture_output=True, text=True, check=True)
    assert len(json.loads(trials.stdout)) == 2
    best = subprocess.run([optuna_cli, "best-trial", *common], capture_output=True, text=True, check=True)
    # The study names its objective, so Optuna prints the value under that name.
    assert json.loads(best.stdout)["value"] == {"validation accuracy": pytest.approx(study.best_value)}


def test_resume_adds_trials_and_fills_up_to_n_trials(tmp_path: Path) -> None:
    text = FASHION_STUDY.replace('sampler = "grid"', 'sampler = "random"').replace(
        "n_trials = 2", "n_trials = 3"
    )
    text = text.replace("train_limit = 3000", "train_limit = 600").replace("epochs = 2", "epochs = 1")
    path = write_study(tmp_path, "resume", text)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    run_cli("run", "--study", str(path), "--storage", storage, "--n-trials", "1")
    run_cli("run", "--study", str(path), "--storage", storage, "--n-trials", "1")
    assert len(optuna.load_study(study_name="resume", storage=storage).trials) == 2
    run_cli("run", "--study", str(path), "--storage", storage)  # fills up to n_trials = 3
    assert len(optuna.load_study(study_name="resume", storage=storage).trials) == 3
    out = run_cli("run", "--study", str(path), "--storage", storage)  # already full: adds nothing
    assert "nothing to run: 3 finished trials reach n_trials = 3; --n-trials N runs N more" in out
    assert len(optuna.load_study(study_name="resume", storage=storage).trials) == 3


def test_changed_search_space_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    text = FASHION_STUDY.replace("train_limit = 3000", "train_limit = 600").replace(
        "epochs = 2", "epochs = 1"
    )
    path = write_study(tmp_path, "changed", text.replace("n_trials = 2", "n_trials = 1"))
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    run_cli("run", "--study", str(path), "--storage", storage)
    path.write_text(text.replace("[0.000001, 0.003]", "[0.000001, 0.01]").replace('"adam"', '"sgd"'))
    code, out = invoke("run", "--study", str(path), "--storage", storage, "--n-trials", "1")
    assert code != 0
    assert len(out.strip().splitlines()) == 1
    assert "different search space" in out
    assert "optimizer.lr.choices changed from [1e-06, 0.003] to [1e-06, 0.01]" in out
    assert 'optimizer.name changed from "adam" to "sgd"' in out
    study = optuna.load_study(study_name="changed", storage=storage)
    # The grid queued both configurations; one ran, the other still waits, nothing else changed.
    assert len(study.trials) == 2 and study.trials[0].state.is_finished()
    assert study.trials[1].state == optuna.trial.TrialState.WAITING


def test_diverging_configuration_stops_in_its_first_epoch(tmp_path: Path) -> None:
    path = write_study(tmp_path, "diverge", DIVERGING_STUDY)
    storage = f"sqlite:///{tmp_path / 'db.sqlite'}"
    run_cli("run", "--study", str(path), "--storage", storage)
    (trial,) = optuna.load_study(study_name="diverge", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["stop_reason"].startswith("diverged in epoch 1: training loss reached")
    assert trial.user_attrs["epochs_run"] == 0  # completed epochs
    assert trial.intermediate_values == {}
    # 6,000 images × 0.9 at batch 32 is 168 batches; the stop comes at the first check after it.
    batch = int(trial.user_attrs["stop_reason"].rsplit("batch ", 1)[1])
    assert batch < 168


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--study", "no-such-study"], "no study named 'no-such-study'"),
        (["run", "--study", "missing.toml"], "study file missing.toml does not exist"),
        (["run", "--study", "quickstart", "--storage", "sqlite:////no/such/dir/x.db"], "does not exist"),
        (["run", "--study", "quickstart", "--storage", "nosuchdb://x"], "cannot open storage nosuchdb://x"),
        (
            ["run", "--study", "cnn-mnist", "--data-dir", "{tmp}", "--storage", "sqlite:///{tmp}/x.db"],
            "mnist not found",
        ),
        pytest.param(
            ["run", "--study", "quickstart", "--storage", "postgresql+psycopg://u:secret@127.0.0.1:1/db"],
            "cannot open storage postgresql+psycopg://u:***@127.0.0.1:1/db",
            marks=pytest.mark.slow,  # loads the PostgreSQL driver
        ),
        (
            ["run", "--study", "quickstart", "--device", "cuda:7", "--storage", "sqlite:///{tmp}/x.db"],
            "CUDA is not available",
        ),
        (
            ["run", "--study", "quickstart", "--device", "gpu", "--storage", "sqlite:///{tmp}/x.db"],
            "unknown device 'gpu'",
        ),
    ],
)
def test_user_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    monkeypatch.setenv("HPSEARCH_CACHE", str(tmp_path / "cache"))
    if "cuda:7" in args and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code != 0
    assert len(out.strip().splitlines()) <= 2, out  # the study banner may precede the error line
    assert expected in out.strip().splitlines()[-1]


def test_list_shows_every_registered_name_and_study() -> None:
    out = run_cli("list")
    for registry in (MODELS, DATASETS, OPTIMIZERS, SCHEDULERS, SAMPLERS, PRUNERS):
        for name in registry.names():
            assert f"  {name} " in out
    for study in Path(__file__).parent.parent.glob("studies/*.toml"):
        assert f"  {study.stem} " in out


@pytest.mark.slow  # a fresh interpreter imports torch
def test_python_dash_m_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Usage: hpsearch" in out and "run" in out


def test_a_failed_start_leaves_no_empty_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPSEARCH_CACHE", str(tmp_path / "cache"))
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    code, _ = invoke("run", "--study", "cnn-mnist", "--data-dir", str(tmp_path), "--storage", storage)
    assert code != 0
    assert optuna.get_all_study_names(storage) == []


def test_a_missing_data_dir_is_a_usage_error() -> None:
    code, out = invoke("run", "--study", "quickstart", "--data-dir", "/nonexistent")
    assert code == 2
    assert (
        out.strip().splitlines()[-1]
        == "Error: Invalid value for '--data-dir': Directory '/nonexistent' does not exist."
    )


def test_the_dashboard_refuses_a_missing_sqlite_file(tmp_path: Path) -> None:
    code, out = invoke("dashboard", "--storage", f"sqlite:///{tmp_path / 'typo.db'}", "--port", "8799")
    assert code == 1
    assert "typo.db does not exist" in out.strip().splitlines()[-1]
    assert not (tmp_path / "typo.db").exists()


def test_list_names_a_broken_study_file_and_lists_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    studies = tmp_path / "studies"
    studies.mkdir()
    (studies / "mine.toml").write_text('[study]\ndescription = "my own"\n' + QUICK_BODY, encoding="utf-8")
    (studies / "latin.toml").write_bytes(
        '[study]\ndescription = "café"\n'.encode("latin-1") + QUICK_BODY.encode()
    )
    (studies / "folder.toml").mkdir()  # not a file: not a study
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split() == ["mine", "my", "own"] for line in lines)
    (latin,) = [line for line in lines if line.startswith("  latin ")]
    assert "(invalid: studies/latin.toml: not a UTF-8 text file" in latin
    assert not any(line.startswith("  folder ") for line in lines)
    for bundled in Path(__file__).parent.parent.glob("studies/*.toml"):
        assert f"  {bundled.stem} " in result.output
