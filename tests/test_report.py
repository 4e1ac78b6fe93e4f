"""``hpsearch report`` on real stored studies: files, figures, the table and the attached artifacts."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import optuna
import pytest
from click.testing import CliRunner, Result
from optuna.trial import TrialState

from conftest import StoredStudy, foreign_database, quiet_copy, run_stored, snapshot
from hpsearch.cli import main
from hpsearch.report import REPORT_ATTR, ReportError, attach, make_report
from hpsearch.storage import load_stored_study, open_artifacts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("learning_curves.png", "accuracy_vs_lr.png", "history.png", "importances.png")

# Every trial completes and the learning rate is a per-optimizer parameter (optimizer.sgd.lr),
# so the importances figure is drawn and the table's lr must come from the merged config. 300
# training examples (not a multiple of 64) keep the six trials to a few seconds.
CONDITIONAL_STUDY = """
[study]
description = "conditional lr per optimizer, no pruning"
n_trials = 6
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 64
train_limit = 300

[model]
name = "mnist_cnn"

[optimizer]
name = { choices = ["sgd", "adam"] }

[optimizer.sgd]
lr = { low = 0.001, high = 0.1, log = true }
momentum = { low = 0.0, high = 0.9 }

[optimizer.adam]
lr = { low = 0.0001, high = 0.003, log = true }

[train]
epochs = 2
"""


@pytest.fixture(autouse=True)
def _default_artifact_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPSEARCH_ARTIFACTS", raising=False)


@pytest.fixture(scope="module")
def synthetic_copy(synthetic_study: StoredStudy, tmp_path_factory: pytest.TempPathFactory) -> StoredStudy:
    """The shared fixture's study in a file of this module's own: reports attach artifacts to it."""
    folder = tmp_path_factory.mktemp("report")
    url = quiet_copy(synthetic_study.storage, folder / "hpsearch.db")
    return StoredStudy(synthetic_study.name, synthetic_study.path, url)


@pytest.fixture(scope="module")
def conditional_study(tmp_path_factory: pytest.TempPathFactory) -> StoredStudy:
    return run_stored(tmp_path_factory.mktemp("conditional-study"), "conditional", CONDITIONAL_STUDY)


def report(stored: StoredStudy, out: Path) -> list[Path]:
    """Run ``hpsearch report``; the written files it lists on stdout."""
    result = invoke("report", "--study", stored.name, "--storage", stored.storage, "-o", str(out))
    assert result.exit_code == 0, result.output
    return [Path(line) for line in result.stdout.splitlines()]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width >= 600 and height >= 400, (path, pixels.shape)
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 50, f"{path.name} looks blank: {len(colours)} colours"


def final_val(trial: optuna.trial.FrozenTrial) -> float:
    return float(trial.user_attrs["val_acc"][-1])


def table_rows(md: str) -> dict[str, list[str]]:
    """The best-per-optimizer table of report.md, optimizer → cells."""
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| optimizer")]
    return {cells[0]: cells for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def best_complete(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        name = t.user_attrs["config"]["optimizer"]["name"]
        if name not in best or final_val(t) > final_val(best[name]):
            best[name] = t
    return best


@pytest.mark.slow  # draws every figure
def test_report_writes_readable_figures_and_markdown(synthetic_copy: StoredStudy, tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder"
    written = report(synthetic_copy, out)
    study = synthetic_copy.load()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    expected = [f for f in FIGURES if f != "importances.png" or len(complete) >= 2]
    assert sorted(p.name for p in written) == sorted([*expected, "report.md"])
    assert all(p.is_file() for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written), "temp files left"
    for name in expected:
        check_png(out / name)

    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith(f"# Report: {synthetic_copy.name}\n")
    assert study.user_attrs["description"] in md
    for name in expected:
        assert f"]({name})" in md
    if "importances.png" not in expected:
        assert "need at least 2 complete trials" in md
    counts = {s: sum(t.state == s for t in study.trials) for s in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned" in md
    assert f"best validation accuracy {study.best_value:.4f} (trial {study.best_trial.number})" in md

    rows = table_rows(md)
    best = best_complete(study)
    assert sorted(rows) == sorted(best)
    for name, trial in best.items():
        cfg = trial.user_attrs["config"]["optimizer"]
        assert rows[name] == [
            name,
            f"{cfg['lr']:.4g}",
            f"{final_val(trial):.4f}",
            f"{trial.user_attrs['test_acc']:.4f}",
            str(trial.user_attrs["epochs_run"]),
            f"{trial.user_attrs['run_time_s']:.1f}",
            str(trial.number),
        ]


@pytest.mark.slow  # draws every figure twice
def test_report_attaches_artifacts_once(synthetic_copy: StoredStudy, tmp_path: Path) -> None:
    store = open_artifacts(synthetic_copy.storage)
    for run in ("first", "second"):
        written = report(synthetic_copy, tmp_path / run)
        study = synthetic_copy.load()
        metas = optuna.artifacts.get_all_artifact_meta(study)
        names = [m.filename for m in metas]
        assert sorted(names) == sorted(p.name for p in written), f"{run} run: {names}"
        ids = study.user_attrs[REPORT_ATTR]
        assert {m.filename: m.artifact_id for m in metas} == ids
        for meta in metas:
            got = tmp_path / f"{run}-{meta.artifact_id}"
            optuna.artifacts.download_artifact(
                artifact_store=store, artifact_id=meta.artifact_id, file_path=str(got)
            )
            assert got.read_bytes() == (tmp_path / run / meta.filename).read_bytes(), meta.filename
        assert {m.mimetype for m in metas if m.filename.endswith(".png")} == {"image/png"}


@pytest.mark.slow  # runs six trials and draws every figure
def test_report_draws_importances_and_reads_conditional_lr(
    conditional_study: StoredStudy, tmp_path: Path
) -> None:
    written = report(conditional_study, tmp_path)
    assert sorted(p.name for p in written) == sorted([*FIGURES, "report.md"])
    for name in FIGURES:
        check_png(tmp_path / name)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    study = conditional_study.load()
    rows = table_rows(md)
    best = best_complete(study)
    assert sorted(rows) == ["adam", "sgd"] == sorted(best)
    for name, trial in best.items():
        assert rows[name][1] == f"{trial.params[f'optimizer.{name}.lr']:.4g}"
        assert rows[name][2] == f"{final_val(trial):.4f}"
        assert rows[name][6] == str(trial.number)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_unknown_study_is_one_line(synthetic_copy: StoredStudy, tmp_path: Path) -> None:
    result = invoke("report", "--study", "nope", "--storage", synthetic_copy.storage, "-o", str(tmp_path))
    line = one_line_error(result)
    assert "no study named 'nope'" in line and synthetic_copy.name in line


def test_missing_storage_file_is_one_line_and_not_created(tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    result = invoke("report", "--study", "x", "--storage", f"sqlite:///{db}", "-o", str(tmp_path / "out"))
    assert "does not exist" in one_line_error(result)
    assert not db.exists()


def test_study_without_finished_epoch_is_one_line(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    study = optuna.create_study(study_name="empty", storage=storage, direction="maximize")
    study.set_user_attr("metric", "accuracy")
    study.enqueue_trial({})  # a waiting trial: not finished
    result = invoke("report", "--study", "empty", "--storage", storage, "-o", str(tmp_path / "out"))
    assert "no trial that finished an epoch" in one_line_error(result)


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_making_the_report_only_reads_the_study(
    synthetic_study: StoredStudy, tmp_path: Path, journal: str
) -> None:
    url = quiet_copy(synthetic_study.storage, tmp_path / "studies.db", journal)
    before = snapshot(tmp_path)
    written = make_report(load_stored_study(synthetic_study.name, url), tmp_path / "out")
    assert (tmp_path / "out" / "report.md") in written and (tmp_path / "out" / "history.png") in written
    # The study file is byte for byte what it was; the report's folder is the only new entry.
    after = snapshot(tmp_path)
    assert after.pop("out") == "folder" and after == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)


def test_attach_leaves_a_study_hpsearch_did_not_make_untouched(tmp_path: Path) -> None:
    # Plain Optuna's study, in plain Optuna's file (rollback journal): hpsearch must not write to it.
    url = f"sqlite:///{tmp_path / 'theirs.db'}"
    study = optuna.create_study(study_name="theirs", storage=url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
    del study
    url = quiet_copy(url, tmp_path / "copy.db", "delete")
    (tmp_path / "theirs.db").unlink()
    page = tmp_path / "report.md"
    page.write_text("# a report\n", encoding="utf-8")
    before = snapshot(tmp_path)
    with pytest.raises(ReportError, match="'theirs' was not made by hpsearch"):
        attach("theirs", url, [page])
    assert snapshot(tmp_path) == before  # no artifact folder either
    assert not (tmp_path / "copy-artifacts").exists()


def test_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "bank.db"
    foreign_database(db)
    before = snapshot(tmp_path)
    result = invoke("report", "--study", "bank", "--storage", f"sqlite:///{db}", "-o", str(tmp_path / "out"))
    line = one_line_error(result)
    assert "accounts" in line and str(db) in line
    assert snapshot(tmp_path) == before  # no report folder, no artifacts folder either
