"""``benchmarks/search.py --quick`` end to end, as a subprocess, so that the benchmark keeps working.

Its figures are checked against the studies it leaves in its SQLite file (``--db``) and against each
other, never for which arm wins: what every arm must print, that each seed's epochs are the sum of
its trials' own, and that pruning trains fewer epochs than not pruning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.record import TrialRecord, study_task
from hpsearch.search import DEFAULT_PRUNER, DEFAULT_SAMPLER

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SAMPLERS = ("random", "tpe")
PRUNERS = ("none", "median", "successive_halving", "hyperband", "top_k")


@pytest.mark.slow
def test_quick_run(tmp_path: Path) -> None:
    out, png, db = tmp_path / "search.json", tmp_path / "search.png", tmp_path / "search.db"
    # One torch thread, as each test worker trains with (conftest): two would fight over both cores.
    cmd = [sys.executable, str(BENCHMARKS / "search.py"), "--quick", "--threads", "1"]
    cmd += ["--json", str(out), "--plot", str(png), "--db", str(db)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())

    for dist in ("python", "torch", "optuna", "hpsearch"):
        assert record["versions"][dist]
    assert record["machine"]["cores"] >= 1 and record["machine"]["device_name"]
    assert record["machine"]["torch_threads"] == 1
    assert record["defaults"] == {"sampler": DEFAULT_SAMPLER, "pruner": DEFAULT_PRUNER}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The table: one row per arm, in the order the arms are named.
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows[1:]] == [
        (s, p) for s in SAMPLERS for p in PRUNERS
    ]
    assert f"- default {DEFAULT_SAMPLER} × {DEFAULT_PRUNER} (hpsearch's [study] defaults):" in done.stdout
    assert "- fewest epochs to target of all arms:" in done.stdout

    sizes = record["sizes"]
    n, epochs, k = sizes["trials"], sizes["epochs"], sizes["top_k"]
    runs = record["runs"]
    assert sorted((r["sampler"], r["pruner"], r["seed"]) for r in runs) == sorted(
        (s, p, seed) for s in SAMPLERS for p in PRUNERS for seed in range(sizes["seeds"])
    )
    storage = f"sqlite:///{db}"
    for run in runs:
        trials = run["trials"]
        # Every trial as its stored record has it.
        study = optuna.load_study(study_name=run["study"], storage=storage)
        task = study_task(study)
        stored = {t.number: TrialRecord.of(t, task) for t in study.trials}
        assert [t["number"] for t in trials] == sorted(stored)
        for t in trials:
            assert t["epochs_run"] == stored[t["number"]].epochs_run == len(t["val"])
            assert t["resumed_epoch"] == stored[t["number"]].resumed_epoch
        if run["pruner"] == "top_k":
            # The baseline: every configuration one epoch, then its K best continued from there.
            first, continued = trials[:n], trials[n:]
            assert all(t["state"] == "PRUNED" and t["epochs_run"] <= 1 for t in first)
            assert len(continued) == k
            assert all(t["resumed_epoch"] == 1 and t["epochs_run"] == epochs for t in continued)
            by_number = {t["number"]: t for t in first}
            kept = [study.trials[t["number"]].user_attrs["continues"] for t in continued]
            firsts = sorted((t["val"][0] for t in first if t["val"]), reverse=True)
            assert [by_number[number]["val"][0] for number in kept] == firsts[:k]
            assert run["epochs"] == sum(t["epochs_run"] for t in trials) - k
        else:
            assert len(trials) == n and all(t["resumed_epoch"] is None for t in trials)
            assert all(t["epochs_run"] <= epochs for t in trials)
            assert run["epochs"] == sum(t["epochs_run"] for t in trials)
        assert run["curve"][-1][0] == run["epochs"]
        complete = [t for t in trials if t["state"] == "COMPLETE"]
        assert len(complete) == sum(t.state == TrialState.COMPLETE for t in study.trials)
        if complete:
            assert run["best_val"] == max(t["val"][-1] for t in complete) == study.best_value
            assert run["best_test"] == stored[study.best_trial.number].test

    unpruned = {(r["sampler"], r["seed"]): r for r in runs if r["pruner"] == "none"}
    for run in runs:
        base = unpruned[(run["sampler"], run["seed"])]
        assert run["unpruned_epochs"] == base["epochs"]
        if run["pruner"] != "none":
            assert run["epochs"] < base["epochs"], run["study"]


@pytest.mark.parametrize(
    ("pruners", "says"),
    [
        ("median,top_k", "--pruners must include 'none'"),
        ("none,bohb", "unknown pruner arm 'bohb'"),
    ],
)
def test_pruner_arms_are_checked_before_anything_runs(tmp_path: Path, pruners: str, says: str) -> None:
    cmd = [sys.executable, str(BENCHMARKS / "search.py"), "--quick", "--pruners", pruners]
    cmd += ["--db", str(tmp_path / "search.db")]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == f"search.py: {says}; arms: {', '.join(PRUNERS)}"
    assert not (tmp_path / "search.db").exists()
