"""`hpsearch lr-find`: the range test on real studies, its plot, its curve and the narrowed copy."""

from __future__ import annotations

import csv
import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from conftest import write_study
from hpsearch.cli import main
from hpsearch.lrfind import LrFindError, apply, steepest, sweep_config, train_losses
from hpsearch.schema import Param
from hpsearch.spec import StudySpec, load_spec

STUDIES = Path(__file__).resolve().parent.parent / "studies"
REGRESSION = STUDIES / "optimizers-regression.toml"
LENET = STUDIES / "lenet-fashion.toml"


@dataclass
class Sweep:
    """One `hpsearch lr-find` run: what it printed and wrote."""

    result: Result
    folder: Path
    png: Path
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    applied: Path
    study_digest: str  # the study file's SHA-256 before the run

    @property
    def printed(self) -> dict[str, str]:
        lines = (line.strip() for line in self.result.stdout.splitlines())
        rows = (line.split("  ", 1) for line in lines if "  " in line)
        return {key.strip(): value.strip() for key, value in rows}


def lr_find(folder: Path, study: Path, *args: str) -> Sweep:
    """Run `hpsearch lr-find` on ``study`` into ``folder``, with the plot, the curve and --apply."""
    png, curve, applied = folder / "sweep.png", folder / "curve.csv", folder / f"{study.stem}-lr.toml"
    digest = hashlib.sha256(study.read_bytes()).hexdigest()
    outputs = ["-o", str(png), "--csv", str(curve), "--apply", str(applied)]
    result = CliRunner().invoke(main, ["lr-find", "--study", str(study), "--device", "cpu", *outputs, *args])
    assert result.exit_code == 0, result.output
    with curve.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    sweep = Sweep(
        result,
        folder,
        png,
        [float(r["lr"]) for r in rows],
        [float(r["loss"]) for r in rows],
        [float(r["smoothed"]) for r in rows],
        math.nan,
        applied,
        digest,
    )
    sweep.suggestion = float(sweep.printed["suggested lr"])
    return sweep


@pytest.fixture(scope="module")
def regression(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    return lr_find(tmp_path_factory.mktemp("regression"), REGRESSION)


@pytest.fixture(scope="module")
def lenet(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    # Adam: sigmoid LeNet under plain SGD learns next to nothing in 100 batches at any rate.
    return lr_find(tmp_path_factory.mktemp("lenet"), LENET, "--optimizer", "adam")


def check_curve(sweep: Sweep) -> None:
    """The suggestion lies where the recorded loss falls fastest, judged from the curve alone."""
    lrs, losses, smoothed = sweep.lrs, sweep.losses, sweep.smoothed
    # The smoothed loss is the bias-corrected moving average of the recorded losses.
    avg, expected = 0.0, []
    for k, loss in enumerate(losses, start=1):
        avg = 0.9 * avg + 0.1 * loss
        expected.append(avg / (1 - 0.9**k))
    np.testing.assert_allclose(smoothed, expected, rtol=1e-9)
    # Rates rise exponentially from the default start; the sweep stopped early only at divergence.
    ratios = np.diff(np.log(lrs))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)
    assert lrs[0] == pytest.approx(1e-6)
    assert len(lrs) == 100 or smoothed[-1] > 4 * min(smoothed)
    k = int(np.argmin([abs(math.log(lr / sweep.suggestion)) for lr in lrs]))
    assert lrs[k] == pytest.approx(sweep.suggestion, rel=0.01)
    best = int(np.argmin(smoothed))
    assert sweep.suggestion < lrs[best]
    # The smoothed loss falls across a window around the suggestion ...
    w = 4
    assert smoothed[k - w] > smoothed[k] > smoothed[min(k + w, best)]
    # ... and of lines fitted to 0.7-decade windows before the minimum, the steepest is within half a
    # decade of it.
    x = np.log10(lrs)
    span = round(0.7 / (x[1] - x[0]))
    slopes = {
        i: np.polyfit(x[i - span // 2 : i + span // 2 + 1], smoothed[i - span // 2 : i + span // 2 + 1], 1)[0]
        for i in range(span // 2 + 10, best - span // 2)
    }
    fastest = min(slopes, key=lambda i: slopes[i])
    assert abs(x[fastest] - x[k]) <= 0.5, (lrs[fastest], sweep.suggestion)
    # Past the flat start: by the window's end the loss has made a tenth of its whole fall at least.
    assert smoothed[min(k + w, best)] < smoothed[10] - 0.1 * (smoothed[10] - smoothed[best])


def final_loss(study: Path, optimizer: str, lr: float, steps: int) -> float:
    """The mean loss of the last 5 of ``steps`` batches trained from fresh weights at a constant ``lr``."""
    spec = load_spec(study)
    cfg, _ = sweep_config(spec, optimizer)
    tail = list(train_losses(spec, cfg, [lr] * steps, torch.device("cpu")))[-5:]
    return math.fsum(v if math.isfinite(v) else math.inf for v in tail) / len(tail)


def test_regression_suggestion_is_where_the_loss_falls_fastest(regression: Sweep) -> None:
    check_curve(regression)
    assert "with sgd" in regression.result.stdout  # the study's first optimizer choice


@pytest.mark.slow  # trains on real FashionMNIST
def test_lenet_suggestion_is_where_the_loss_falls_fastest(lenet: Sweep) -> None:
    check_curve(lenet)
    assert "with adam" in lenet.result.stdout
    check_png(lenet.png)


def fall(sweep: Sweep) -> float:
    return 1 - min(sweep.smoothed) / float(np.median(sweep.losses[:10]))


def test_a_clear_fall_gets_no_note(regression: Sweep) -> None:
    assert fall(regression) > 0.5
    assert "note:" not in regression.result.stderr


@pytest.mark.slow
def test_a_curve_that_barely_falls_is_called_out(tmp_path: Path) -> None:
    # Sigmoid LeNet under SGD in 40 batches: the loss only settles towards chance level.
    quickstart = lr_find(tmp_path, STUDIES / "quickstart.toml", "--steps", "40")
    assert fall(quickstart) < 0.1
    (note,) = [line for line in quickstart.result.stderr.splitlines() if line.startswith("note:")]
    assert f"{fall(quickstart):.0%}" in note


def test_steepest_skips_the_noisy_start_and_looks_only_before_the_minimum() -> None:
    x = np.linspace(-6, 1, 100)
    # Falls fastest at lr 1e-2 (-4 per decade), is lowest at lr 1, then rises and falls faster again.
    bump = np.where(x <= 0.5, 10 * x, 5 - 6 * (x - 0.5))
    curve = 2.0 - np.tanh(2 * (x + 2)) + np.where(x > 0, bump, 0)
    curve[3] += 3.0  # one wild early batch: a steeper fall just after it
    lrs, values = list(10**x), list(curve)
    found = steepest(lrs, values, skip=10, half=5)
    assert found is not None and abs(math.log10(found) + 2) < 0.05
    assert steepest(lrs, values, skip=0, half=5) < 1e-5  # the start would have won
    assert steepest(lrs, list(np.linspace(1.0, 2.0, 100)), skip=10, half=5) is None  # never falls


def test_regression_training_at_the_suggestion_beats_100_times_it(regression: Sweep) -> None:
    s = regression.suggestion
    at = final_loss(REGRESSION, "sgd", s, 30)
    assert at < final_loss(REGRESSION, "sgd", 100 * s, 30)
    assert at < final_loss(REGRESSION, "sgd", s / 100, 30)  # and it learns, unlike a far smaller rate


@pytest.mark.slow
def test_lenet_training_at_the_suggestion_beats_100_times_it(lenet: Sweep) -> None:
    s = lenet.suggestion
    assert final_loss(LENET, "adam", s, 20) < final_loss(LENET, "adam", 100 * s, 20)


def test_the_summary_names_the_steps_the_range_and_both_rates(regression: Sweep) -> None:
    printed = regression.printed
    steps = len(regression.lrs)
    assert printed["steps run"].startswith(f"{steps} of 100")
    low, high = (float(v) for v in printed["lr swept"].split(" … "))
    assert low == pytest.approx(regression.lrs[0], rel=0.01)
    assert high == pytest.approx(regression.lrs[-1], rel=0.01)
    best = regression.lrs[int(np.argmin(regression.smoothed))]
    assert float(printed["minimum loss"].rsplit(" ", 1)[1]) == pytest.approx(best, rel=0.01)


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 2000 and 400 <= height <= 1500
    assert len(data) > 20_000  # two curves, axes and a legend, not a blank canvas


def test_the_plot_is_a_png_of_sensible_size(regression: Sweep) -> None:
    check_png(regression.png)


def test_the_default_plot_goes_to_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["lr-find", "--study", str(REGRESSION), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lr-find-optimizers-regression-sgd.png").stat().st_size > 20_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr-find-optimizers-regression-sgd.png"]


def check_narrowed(sweep: Sweep, study: Path, key: str) -> dict[str, Any]:
    """The copy --apply wrote loads, its ``key`` range holds the suggestion and is narrower than the
    study file's; the study file is unchanged. Returns the copy's parameters by name."""
    assert hashlib.sha256(study.read_bytes()).hexdigest() == sweep.study_digest
    before = {p.name: p.value for p in _params(load_spec(study))}
    after = {p.name: p.value for p in _params(load_spec(sweep.applied))}
    new, old = after[key], before.get(key, before.get("optimizer.lr"))
    assert new["log"] and new["low"] < sweep.suggestion < new["high"]
    assert new["high"] / new["low"] < old["high"] / old["low"]
    assert f"wrote {sweep.applied}" in sweep.result.stdout
    return after


def test_apply_narrows_a_shared_lr_for_that_optimizer_alone(regression: Sweep) -> None:
    copy = check_narrowed(regression, REGRESSION, "optimizer.sgd.lr")
    assert copy["optimizer.adam.lr"] == {"low": 1e-3, "high": 0.5, "log": True}
    assert "optimizer.lr" not in copy


@pytest.mark.slow
def test_apply_narrows_the_lr_of_an_optimizers_sub_table(lenet: Sweep) -> None:
    copy = check_narrowed(lenet, LENET, "optimizer.adam.lr")
    assert copy["optimizer.sgd.lr"] == {"low": 0.01, "high": 3.0, "log": True}
    # Comments and layout stay: the copy differs from the file in the lr line alone.
    old_lines = LENET.read_text(encoding="utf-8").splitlines()
    new_lines = lenet.applied.read_text(encoding="utf-8").splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][1].startswith("lr = { low = ")


def _params(spec: StudySpec) -> list[Param]:
    return [p for s in spec.space.values() for p in s.every_param()]


def test_the_study_file_itself_is_never_written(tmp_path: Path) -> None:
    study = write_study(tmp_path, "toy", REGRESSION.read_text(encoding="utf-8"))
    digest = hashlib.sha256(study.read_bytes()).hexdigest()
    for args in (["--apply", str(study)], ["--apply", str(study), "--force"]):
        result = CliRunner().invoke(
            main, ["lr-find", "--study", str(study), "-o", str(tmp_path / "p.png"), *args]
        )
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert len(result.output.strip().splitlines()) == 1
    assert hashlib.sha256(study.read_bytes()).hexdigest() == digest
    assert not (tmp_path / "p.png").exists()  # refused before the sweep


def test_an_existing_copy_is_replaced_only_with_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "optimizers-regression-lr.toml"
    target.write_text("# mine\n", encoding="utf-8")
    args = ["lr-find", "--study", str(REGRESSION), "--device", "cpu", "--apply"]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit), refused.output
    assert target.read_text(encoding="utf-8") == "# mine\n"
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "optimizer.sgd.lr" in load_spec(target).param_names()


def test_a_fixed_or_unwritten_lr_cannot_be_narrowed(tmp_path: Path) -> None:
    head = '[data]\nname = "toy_regression"\n[model]\nname = "mlp"\n[optimizer]\n'
    fixed = write_study(tmp_path, "fixed", head + 'name = "sgd"\nlr = 0.05\n')
    unwritten = write_study(tmp_path, "unwritten", head + 'name = "adam"\n')  # torch's default rate
    for study in (fixed, unwritten):
        args = ["lr-find", "--study", str(study), "--apply", str(tmp_path / "out.toml")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "out.toml").exists()


def test_apply_handles_each_form_an_lr_takes(tmp_path: Path) -> None:
    # One optimizer, its lr a plain range in [optimizer] with a comment: narrowed in place.
    head = '[data]\nname = "toy_regression"\n[model]\nname = "mlp"\n[optimizer]\nname = "adam"\n'
    single = write_study(tmp_path, "single", head + "lr = { low = 1e-5, high = 1.0 }  # linear on purpose\n")
    done = apply(load_spec(single), "adam", 0.02, tmp_path / "single-lr.toml")
    (lr,) = [p for p in _params(load_spec(done.path)) if p.name == "optimizer.lr"]
    assert lr.value == {"low": 0.002, "high": 0.06, "log": True}
    assert "# linear on purpose; hpsearch lr-find suggested 0.02" in done.path.read_text(encoding="utf-8")
    # A suggestion near the edge of the old range stays inside it.
    done = apply(load_spec(single), "adam", 0.5, tmp_path / "edge-lr.toml")
    assert {p.name: p.value for p in _params(load_spec(done.path))}["optimizer.lr"]["high"] == 1.0
    # Choices of a grid: those near the suggestion are kept, and n_trials follows the smaller grid.
    grid = load_spec(STUDIES / "lenet-fashion-grid.toml")
    done = apply(grid, "sgd", 0.5, tmp_path / "grid-lr.toml")
    narrowed = load_spec(done.path)
    values = {p.name: p.value for p in _params(narrowed)}
    assert values["optimizer.sgd.lr"] == {"choices": [0.9, 1.5]}
    assert values["optimizer.adam.lr"] == {"choices": [0.01, 0.9, 1.5, 3.0]}
    assert narrowed.n_trials == len(narrowed.grid()) == 3 * (2 + 4)
    with pytest.raises(LrFindError, match="none of"):
        apply(grid, "sgd", 1e-4, tmp_path / "none-lr.toml")


def test_apply_keeps_the_enqueued_configurations_valid(tmp_path: Path) -> None:
    head, rest = REGRESSION.read_text(encoding="utf-8").split("[data]")
    enqueue = (
        '[[study.enqueue]]\noptimizer.name = "adam"\noptimizer.lr = 0.003\n\n'  # renamed: lr is split
        '[[study.enqueue]]\noptimizer.name = "sgd"\noptimizer.lr = 0.4\n\n'  # outside: dropped
        "[[study.enqueue]]\noptimizer.lr = 0.3\n\n"  # any optimizer's lr: no longer a parameter
    )
    study = write_study(tmp_path, "queued", f"{head}{enqueue}[data]{rest}")
    done = apply(load_spec(study), "sgd", 0.02, tmp_path / "queued-lr.toml")
    assert done.note.count(" = ") == 2 and "optimizer.sgd.lr = 0.4" in done.note
    assert load_spec(done.path).first_trials() == [{"optimizer.name": "adam", "optimizer.adam.lr": 0.003}]


def test_an_unknown_optimizer_fails_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["lr-find", "--study", str(LENET), "--optimizer", "rmsprop", "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    (line,) = result.output.strip().splitlines()
    assert "sgd, adam" in line
    assert not (tmp_path / "x.png").exists()


def test_a_sweep_where_the_loss_never_falls_says_so(tmp_path: Path) -> None:
    png = tmp_path / "flat.png"
    args = ["--start", "1e-9", "--end", "1e-8", "--steps", "30", "-o", str(png)]
    result = CliRunner().invoke(main, ["lr-find", "--study", str(REGRESSION), "--device", "cpu", *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "suggested lr   none" in result.stdout
    assert png.stat().st_size > 20_000  # the plot shows why


@pytest.mark.parametrize(
    "args",
    [
        ["--start", "1", "--end", "0.1"],
        ["--start", "0"],
        ["--steps", "2"],
        ["--device", "tpu"],
        ["--csv", "TMP/no-such-folder/curve.csv"],
    ],
)
def test_bad_sweep_options_fail_cleanly(tmp_path: Path, args: list[str]) -> None:
    png = tmp_path / "p.png"
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    result = CliRunner().invoke(main, ["lr-find", "--study", str(REGRESSION), "-o", str(png), *args])
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
    assert not png.exists()
