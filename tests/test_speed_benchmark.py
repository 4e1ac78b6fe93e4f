"""``benchmarks/speed.py`` end to end on a tiny subset, so that the benchmark keeps working.

Its figures are checked for what they must be (images trained, accuracies, ratios that are the
quotients of the timings shown), never for which loop is faster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TRAIN, EVAL = 300, 100  # 300 = 256 + 44: the last batch is a partial one


def _speed() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    return speed


def test_split_sizes_are_exact() -> None:
    """The study file's val_fraction gives hpsearch exactly N training and M validation images."""
    speed = _speed()
    from hpsearch.datasets import split

    for n, m in [(300, 100), (10_000, 2_000), (3_000, 1_000), (50_000, 10_000), (59_999, 1), (7, 3)]:
        work = speed.Work(n, m)
        train, val = split(60_000, work.val_fraction, 0, n + m)
        assert (len(train), len(val)) == (n, m)
    assert speed.Work(257, 10).check(256) is not None  # hpsearch would drop the last image
    assert speed.Work(50_001, 10_000).check(256) is not None
    assert speed.Work(300, 10_001).check(256) is not None
    assert speed.Work(300, 100).check(256) is None


@pytest.mark.slow
def test_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(BENCHMARKS / "speed.py"), "--quick", "--models", "lenet"]
    cmd += ["--train-images", str(TRAIN), "--eval-images", str(EVAL), "--epochs", "1", "--workers", "2"]
    cmd += ["--process-epochs", "1", "--process-train-images", str(TRAIN)]
    cmd += ["--process-eval-images", str(EVAL), "--json", str(out)]
    cmd += ["--packs", "1,3", "--pack-train-images", str(TRAIN), "--pack-eval-images", str(EVAL)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())

    for dist in ("python", "torch", "torchvision", "optuna"):
        assert record["versions"][dist]
    assert record["machine"]["device_name"] and record["machine"]["cores"] >= 1
    assert record["peak"]["flops"] > 0

    (lenet,) = record["loops"]
    assert lenet["model"] == "lenet" and lenet["gflop_per_image"] > 0
    for loop in (lenet["seed"], lenet["hpsearch"]):
        assert (loop["train_images"], loop["eval_images"], loop["test_images"]) == (TRAIN, EVAL, EVAL)
        assert loop["epochs"] == 1 and len(loop["train_s"]) == len(loop["eval_s"]) == 1
        assert loop["images_per_s"] == pytest.approx(TRAIN / loop["train_s"][0])
        assert loop["s_per_epoch"] == pytest.approx(loop["train_s"][0] + loop["eval_s"][0])
        assert loop["fraction_of_peak"] > 0
        assert 0 <= loop["test_acc"] <= 1 and all(0 <= a <= 1 for a in loop["eval_acc"])
    seed, ours = lenet["seed"], lenet["hpsearch"]
    assert lenet["images_per_s_ratio"] == pytest.approx(ours["images_per_s"] / seed["images_per_s"])
    assert lenet["s_per_epoch_ratio"] == pytest.approx(seed["s_per_epoch"] / ours["s_per_epoch"])

    process = record["process"]
    assert (process["epochs"], process["train_images"], process["eval_images"]) == (1, TRAIN, EVAL)
    assert process["seed_wall_s"] > 0 and process["hpsearch_wall_s"] > 0
    assert process["ratio"] == pytest.approx(process["seed_wall_s"] / process["hpsearch_wall_s"])
    assert 0 <= process["seed_test_acc"] <= 1 and 0 <= process["hpsearch_test_acc"] <= 1
    assert len(process["seed_epoch_s"]) == len(process["hpsearch_epoch_s"]) == 1

    packed = record["packed"]["rows"]
    # Three trials each way: alone, three side by side, three as one batched model.
    assert [(r["pack"], r["way"], r["trials"]) for r in packed] == [
        (1, "alone", 3),
        (3, "side by side", 3),
        (3, "batched (vmap)", 3),
    ]
    assert all(r["trials_per_hour"] == pytest.approx(3 / r["wall_s"] * 3600) for r in packed)

    assert "| lenet | 28² | 256 | 300/100 | 1 |" in done.stdout
    assert "| `hpsearch run` (one trial) |" in done.stdout
