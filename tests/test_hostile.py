"""Hostile input: malformed study files, CLI values and storages.

Every case must end with one clear line, a non-zero exit through ``SystemExit`` (click's handled
exit, never a stray exception), and leave the stored study that shares its name exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from conftest import foreign_database, run_cli, write_study
from hpsearch.cli import main

# The study every case is aimed at: a real one, stored with trials, whose name the bad files reuse.
GOOD = """
[study]
n_trials = 2
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 64
train_limit = 301
test_limit = 50

[model]
name = "mnist_cnn"

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { low = 0.001, high = 0.01, log = true }

[train]
epochs = 1
"""


def edit(old: str, new: str) -> Callable[[str], str]:
    def apply(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return apply


def add(section: str, line: str) -> Callable[[str], str]:
    """Put ``line`` under ``[section]`` (creating the section at the end if the file has none)."""

    def apply(text: str) -> str:
        header = f"[{section}]\n"
        return (
            text.replace(header, header + line + "\n", 1) if header in text else text + header + line + "\n"
        )

    return apply


LR = "lr = { low = 0.001, high = 0.01, log = true }"
OPT = 'name = { choices = ["sgd", "adam"] }'

# case → (how the good file is edited, a fragment the one error line must contain)
STUDY_FILES: dict[str, tuple[Callable[[str], str], str]] = {
    "val_fraction_zero": (add("data", "val_fraction = 0.0"), "val_fraction must be between 0 and 1"),
    "val_fraction_one": (add("data", "val_fraction = 1.0"), "val_fraction must be between 0 and 1"),
    "val_fraction_above_one": (add("data", "val_fraction = 1.5"), "val_fraction must be between 0 and 1"),
    "negative_batch_size": (edit("batch_size = 64", "batch_size = -64"), "batch_size must be at least 1"),
    "zero_batch_size": (edit("batch_size = 64", "batch_size = 0"), "batch_size must be at least 1"),
    "negative_eval_batch_size": (add("train", "eval_batch_size = -1"), "eval_batch_size must be at least 1"),
    "negative_train_limit": (edit("train_limit = 301", "train_limit = -5"), "train_limit must be at least 0"),
    "negative_test_limit": (edit("test_limit = 50", "test_limit = -1"), "test_limit must be at least 0"),
    "test_limit_past_the_data": (edit("test_limit = 50", "test_limit = 20000"), "more than the 200 test"),
    "train_limit_past_the_data": (edit("train_limit = 301", "train_limit = 90000"), "more than the 800"),
    "no_validation_left": (add("data", "val_fraction = 0.001"), "leaves 0 for validation"),
    "zero_epochs": (edit("epochs = 1", "epochs = 0"), "epochs must be at least 1"),
    "zero_timeout": (add("study", "timeout = 0"), "timeout must be positive"),
    "zero_n_trials": (edit("n_trials = 2", "n_trials = 0"), "n_trials must be at least 1"),
    "betas_too_short": (edit(OPT, 'name = "adam"\nbetas = [0.9]'), "needs 2 values, not 1"),
    "betas_too_long": (edit(OPT, 'name = "adam"\nbetas = [0.9, 0.99, 0.999]'), "needs 2 values, not 3"),
    "zero_step_size": (add("scheduler", 'name = "step"\nstep_size = 0'), "step_size must be at least 1"),
    "float_step_size": (add("scheduler", 'name = "step"\nstep_size = 2.5'), "must be an integer"),
    "negative_lr": (edit(LR, "lr = -0.1"), "Invalid learning rate"),
    "zero_lr": (edit(LR, "lr = 0.0"), "Invalid learning rate"),
    "lr_range_below_zero": (edit(LR, "lr = { low = -1.0, high = 0.1 }"), "optimizer.lr = -1.0"),
    "nan_lr": (edit(LR, "lr = nan"), "must be a finite number"),
    "lr_as_text": (edit(LR, 'lr = "fast"'), "wrong type"),
    "negative_momentum": (edit(OPT, 'name = "sgd"\nmomentum = -0.5'), "Invalid momentum"),
    "nesterov_without_momentum": (edit(OPT, 'name = "sgd"\nnesterov = true'), "Nesterov momentum requires"),
    "dropout_one": (edit('"mnist_cnn"', '"alexnet28"\ndropout = 1.0'), "dropout must be in [0, 1)"),
    "dropout_negative": (edit('"mnist_cnn"', '"alexnet28"\ndropout = -0.1'), "dropout must be in [0, 1)"),
    "dropout_int_bounds_reach_one": (
        edit('"mnist_cnn"', '"alexnet28"\ndropout = { low = 0, high = 1 }'),
        "dropout must be in [0, 1)",
    ),
    "zero_hidden": (edit('"mnist_cnn"', '"bn_cnn"\nhidden = 0'), "hidden must be at least 1"),
    "negative_l1": (add("train", "l1 = -0.1"), "l1 must be 0 or more"),
    "zero_max_loss": (add("train", "max_loss = 0.0"), "max_loss must be positive"),
    "zero_max_lr": (add("scheduler", 'name = "onecycle"\nmax_lr = 0.0'), "max_lr must be positive"),
    "zero_t_max": (add("scheduler", 'name = "cosine"\nT_max = 0'), "T_max must be at least 1"),
    "zero_milestone": (add("scheduler", 'name = "multistep"\nmilestones = [0, 3]'), "milestone must be"),
    "negative_resize": (add("data", "resize = -1"), "resize must be at least 0"),
    "flip_as_text": (add("data", 'flip = "yes"'), "wrong type; expected true or false"),
    "key_in_both_tables": (add("optimizer.sgd", "lr = 0.1"), "also set in [optimizer]"),
    "searched_val_fraction": (add("data", "val_fraction = { low = 0.1, high = 0.2 }"), "cannot be searched"),
    "searched_train_limit": (edit("train_limit = 301", "train_limit = { choices = [100, 300] }"), "cannot"),
    "step_does_not_divide": (edit(LR, "lr = { low = 0.1, high = 1.0, step = 0.4 }"), "does not divide"),
    "unknown_train_key": (
        add("train", "epoch = 3"),
        "train.epoch: unknown key; valid: clip_grad_norm, compile, epochs",
    ),
    "unknown_section": (add("training", "epochs = 3"), "unknown section"),
    "unknown_model": (edit('"mnist_cnn"', '"mnist_cnnn"'), "unknown model 'mnist_cnnn'"),
    "regression_model": (edit('"mnist_cnn"', '"mlp"'), "mlp is a regression model"),
    "wrong_direction": (add("study", 'direction = "minimize"'), "direction must be 'maximize'"),
    "grid_with_a_range": (edit('sampler = "random"', 'sampler = "grid"'), "grid sampler needs {choices"),
    "invalid_toml": (add("optimizer", "momentum = = 0.9"), "not valid TOML"),
    "sampler_bad_argument": (
        edit('sampler = "random"', 'sampler = { name = "tpe", n_startup = 3 }'),
        "n_startup",
    ),
}
# Two configurations in the grid, three trials asked for.
STUDY_FILES["grid_too_small"] = (
    lambda t: (
        t.replace('sampler = "random"', 'sampler = "grid"')
        .replace(LR, "lr = 0.01")
        .replace("n_trials = 2", "n_trials = 3")
    ),
    "the grid has 2 configurations, fewer than n_trials = 3",
)


@dataclass
class Stored:
    folder: Path
    storage: str
    trials: list[Any]

    def snapshot(self) -> list[Any]:
        study = optuna.load_study(study_name="target", storage=self.storage)
        return [(t.number, t.state, t.value, t.params, t.user_attrs) for t in study.trials]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    folder = tmp_path_factory.mktemp("hostile")
    storage = f"sqlite:///{folder / 'hpsearch.db'}"
    run_cli(
        "run", "--study", str(write_study(folder, "target", GOOD)), "--storage", storage, "--device", "cpu"
    )
    s = Stored(folder, storage, [])
    s.trials = s.snapshot()
    assert len(s.trials) == 2
    return s


def refused(args: list[str], fragment: str) -> str:
    """Run the CLI; assert a handled non-zero exit whose message is one line holding ``fragment``."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    error = [line for line in lines if line.startswith("Error:")]
    assert len(error) == 1, result.output
    assert fragment in error[0], result.output
    return error[0]


@pytest.mark.parametrize("case", sorted(STUDY_FILES))
def test_a_malformed_study_file_is_one_line_and_stores_nothing(
    stored: Stored, tmp_path: Path, case: str
) -> None:
    change, fragment = STUDY_FILES[case]
    path = write_study(tmp_path, "target", change(GOOD))
    line = refused(["run", "--study", str(path), "--storage", stored.storage, "--device", "cpu"], fragment)
    assert line.startswith(f"Error: {path}: "), line  # the error names the file first
    assert stored.snapshot() == stored.trials


def test_the_good_file_itself_is_accepted(tmp_path: Path) -> None:
    # Every case above is one edit away from this file, so each refusal is due to that edit.
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    out = run_cli("run", "--study", str(write_study(tmp_path, "target", GOOD)), "--storage", storage,
                  "--device", "cpu", "--n-trials", "1")  # fmt: skip
    assert "best trial" in out


def _bytes_file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not_utf8": (
        lambda d: _bytes_file(d, "target.toml", GOOD.encode("latin-1") + b"# caf\xe9\n"),
        "not a UTF-8",
    ),
    "binary": (lambda d: _bytes_file(d, "target.toml", b"\x7fELF\x00\x00\x01" * 20), "binary"),
    "directory": (lambda d: (d / "target.toml").mkdir() or d / "target.toml", "is a directory"),
    "plain_directory": (lambda d: (d / "somedir").mkdir() or d / "somedir", "is a directory"),
    "missing": (lambda d: d / "nowhere.toml", "does not exist"),
    "empty": (lambda d: _bytes_file(d, "target.toml", b""), "data.name: missing"),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_a_study_path_that_is_not_a_study_file(stored: Stored, tmp_path: Path, case: str) -> None:
    make, fragment = FILES[case]
    path = make(tmp_path)
    line = refused(["run", "--study", str(path), "--storage", stored.storage], fragment)
    assert str(path) in line
    assert stored.snapshot() == stored.trials


# case → (arguments, with {good} for the good study file, {storage} for the stored study and
# {foreign} for another program's database; the fragment of the error line)
COMMANDS: dict[str, tuple[list[str], str]] = {
    "zero_n_trials": (
        ["run", "--study", "{good}", "--storage", "{storage}", "--n-trials", "0"],
        "--n-trials",
    ),
    "negative_timeout": (
        ["run", "--study", "{good}", "--storage", "{storage}", "--timeout", "-1"],
        "--timeout",
    ),
    "zero_timeout": (
        ["run", "--study", "{good}", "--storage", "{storage}", "--timeout", "0"],
        "--timeout",
    ),
    "zero_workers": (["run", "--study", "{good}", "--storage", "{storage}", "--workers", "0"], "--workers"),
    "unknown_device": (
        ["run", "--study", "{good}", "--storage", "{storage}", "--device", "gpu"],
        "unknown device",
    ),
    "device_index_text": (
        ["run", "--study", "{good}", "--storage", "{storage}", "--device", "cuda:x"],
        "device",
    ),
    "unknown_study_name": (["run", "--study", "no-such-study", "--storage", "{storage}"], "no study named"),
    "missing_data_dir": (["run", "--study", "{good}", "--data-dir", "/nonexistent"], "--data-dir"),
    "storage_folder_missing": (
        ["run", "--study", "{good}", "--storage", "sqlite:////no/such/dir/x.db"],
        "does not",
    ),
    "storage_scheme_unknown": (
        ["run", "--study", "{good}", "--storage", "nosuchdb://x"],
        "cannot open storage",
    ),
    "storage_driver_missing": (
        ["export", "--study", "target", "--storage", "postgresql+psycopg2://u:pw@127.0.0.1:9/x"],
        "No module named 'psycopg2'; PostgreSQL needs the postgres extra",
    ),
    "storage_foreign_tables": (["run", "--study", "{good}", "--storage", "{foreign}"], "accounts"),
    "export_foreign_tables": (["export", "--study", "target", "--storage", "{foreign}"], "accounts"),
    "best_foreign_tables": (["best", "--study", "target", "--storage", "{foreign}"], "accounts"),
    "export_unknown_study": (
        ["export", "--study", "nope", "--storage", "{storage}"],
        "no study named 'nope'",
    ),
    "export_missing_file": (
        ["export", "--study", "x", "--storage", "sqlite:///{tmp}/typo.db"],
        "does not exist",
    ),
    "export_unknown_best_per": (
        ["export", "--study", "target", "--storage", "{storage}", "--best-per", "optimizer.nope"],
        "unknown parameter 'optimizer.nope'",
    ),
    "export_into_missing_folder": (
        ["export", "--study", "target", "--storage", "{storage}", "-o", "{tmp}/no/such/out.csv"],
        "does not exist",
    ),
    "export_onto_a_folder": (
        ["export", "--study", "target", "--storage", "{storage}", "-o", "{tmp}"],
        "folder",
    ),
    "export_both_selectors": (
        ["export", "--study", "target", "--all-studies", "--storage", "{storage}"],
        "either",
    ),
    "best_unknown_study": (["best", "--study", "nope", "--storage", "{storage}"], "no study named 'nope'"),
    "report_unknown_study": (
        ["report", "--study", "nope", "--storage", "{storage}", "-o", "{tmp}/r"],
        "no study",
    ),
    "dashboard_missing_file": (
        ["dashboard", "--storage", "sqlite:///{tmp}/typo.db", "--port", "8799"],
        "typo.db",
    ),
    "dashboard_bad_port": (["dashboard", "--storage", "{storage}", "--port", "70000"], "--port"),
}


@pytest.mark.parametrize("case", sorted(COMMANDS))
def test_a_bad_command_line_is_one_line(stored: Stored, tmp_path: Path, case: str) -> None:
    args, fragment = COMMANDS[case]
    good = write_study(tmp_path, "target", GOOD)
    foreign = foreign_database(tmp_path / "accounts.db")
    before = (tmp_path / "accounts.db").read_bytes()
    values = {"{good}": str(good), "{storage}": stored.storage, "{foreign}": foreign, "{tmp}": str(tmp_path)}
    filled = []
    for a in args:
        for k, v in values.items():
            a = a.replace(k, v)
        filled.append(a)
    refused(filled, fragment)
    assert (tmp_path / "accounts.db").read_bytes() == before
    assert not (tmp_path / "typo.db").exists()
    assert stored.snapshot() == stored.trials


def test_there_are_at_least_forty_kinds() -> None:
    assert len(STUDY_FILES) + len(FILES) + len(COMMANDS) >= 40
