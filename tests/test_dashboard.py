"""The dashboard as users run it: a real server over a real SQLite study, seen by Chromium."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import optuna
import optuna_dashboard
import pytest
from click.testing import CliRunner

from conftest import foreign_database, quiet_copy, run_cli, snapshot, write_study
from hpsearch.cli import main
from hpsearch.dashboard import spawn, spec_note, write_spec_note
from hpsearch.storage import open_storage

CHROMIUM = Path("/usr/bin/chromium")
STUDY = "fmnist-cnn-sweep"
LIVE = "fmnist-cnn-live"
SPEC_SOURCE = """\
name = "fmnist-cnn-sweep"
description = "Small CNN on FashionMNIST: optimizer and learning rate"

[search.optimizer]
name = ["sgd", "adam"]
lr = { low = 1e-4, high = 1e-1, log = true }
"""
DESCRIPTION = "Small CNN on FashionMNIST: optimizer and learning rate"
WRITER = """\
import sys, optuna
from hpsearch.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=sys.argv[2], storage=open_storage(sys.argv[1]))
print("ready", flush=True)
for i in range(int(sys.argv[3])):
    trial = study.ask()
    trial.suggest_categorical("optimizer.name", ["sgd", "adam"])
    trial.suggest_float("optimizer.lr", 1e-4, 1e-1, log=True)
    for epoch in (1, 2, 3):
        trial.report(0.5 + 0.1 * epoch, epoch)
    study.tell(trial, 0.8)
"""

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Dashboard:
    base: str
    url: str
    study_id: int
    live_id: int


def add_spec_attrs(study: optuna.Study, name: str) -> None:
    study.set_user_attr("spec", {"name": name, "search": {"optimizer": {"name": ["sgd", "adam"]}}})
    study.set_user_attr("spec_source", SPEC_SOURCE.replace(STUDY, name))
    study.set_user_attr("description", DESCRIPTION)
    study.set_user_attr("hpsearch_version", "0.1.0")
    study.set_user_attr("torch_version", "2.x")


def build_study(url: str) -> tuple[int, int]:
    storage = open_storage(url)
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    add_spec_attrs(study, STUDY)
    write_spec_note(study, DESCRIPTION, SPEC_SOURCE)  # as `hpsearch run` does when it creates a study
    for i, (opt, lr) in enumerate([("sgd", 0.05), ("adam", 1e-3), ("sgd", 1e-4), ("adam", 3e-3)]):
        study.enqueue_trial({"optimizer.name": opt, "optimizer.lr": lr})
        trial = study.ask()
        assert trial.suggest_categorical("optimizer.name", ["sgd", "adam"]) == opt
        assert trial.suggest_float("optimizer.lr", 1e-4, 1e-1, log=True) == lr
        accs = [0.6 + 0.05 * i + 0.02 * e for e in range(3)]
        for epoch, acc in enumerate(accs if i != 2 else accs[:2], start=1):
            trial.report(acc, epoch)
        if i == 2:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, accs[-1])
    live = optuna.create_study(study_name=LIVE, storage=storage, direction="maximize")
    add_spec_attrs(live, LIVE)
    return study._study_id, live._study_id


def get_json(url: str) -> tuple[int, Any]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    url = f"sqlite:///{tmp_path_factory.mktemp('dash') / 'studies.db'}"
    study_id, live_id = build_study(url)
    port = free_port()
    proc = spawn(url, port=port)
    try:
        yield Dashboard(f"http://127.0.0.1:{port}", url, study_id, live_id)
    finally:
        stop(proc)


# A study file whose text holds a run of three backticks: the note's code fence must be longer.
NOTE_STUDY = """
[study]
description = "note test: a ``` run in the description"
n_trials = 1
pruner = "none"

[data]
name = "toy_regression"
batch_size = 128

[model]
name = "mlp"

[optimizer]
name = "adam"
lr = 0.01

[train]
epochs = 1
"""


@dataclass
class NoteStudy:
    name: str
    url: str
    source: str


@pytest.fixture(scope="module")
def note_study(tmp_path_factory: pytest.TempPathFactory) -> NoteStudy:
    """NOTE_STUDY run by `hpsearch run` into a fresh SQLite file."""
    folder = tmp_path_factory.mktemp("note")
    path = write_study(folder, "noted", NOTE_STUDY)
    url = f"sqlite:///{folder / 'hpsearch.db'}"
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu")
    return NoteStudy("noted", url, NOTE_STUDY)


def test_hpsearch_run_shows_the_study_file_as_the_note(note_study: NoteStudy) -> None:
    study = optuna.load_study(study_name=note_study.name, storage=note_study.url)
    note = optuna_dashboard.get_note(study)
    description = "note test: a ``` run in the description"
    assert note == spec_note(note_study.name, description, note_study.source)
    assert note.startswith(f"# {note_study.name}\n\n{description}\n\n````toml\n")
    assert note.endswith(f"{NOTE_STUDY.strip()}\n````\n")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.slow  # starts a dashboard process
@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_serving_leaves_the_study_file_unchanged(note_study: NoteStudy, tmp_path: Path, journal: str) -> None:
    url = quiet_copy(note_study.url, tmp_path / "studies.db", journal)
    before = snapshot(tmp_path)
    port = free_port()
    proc = spawn(url, port=port)  # returns once GET /api/meta answers
    try:
        base = f"http://127.0.0.1:{port}"
        assert get_json(f"{base}/api/meta")[0] == 200
        _, listing = get_json(f"{base}/api/studies")
        [summary] = listing["study_summaries"]
        _, detail = get_json(f"{base}/api/studies/{summary['study_id']}")
        assert detail["note"]["body"] == optuna_dashboard.get_note(
            optuna.load_study(study_name=note_study.name, storage=note_study.url)
        )
    finally:
        stop(proc)
    assert snapshot(tmp_path) == before


def test_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "bank.db"
    foreign_database(db)
    before = snapshot(tmp_path)
    # The port is taken, so a dashboard that got past the storage would fail to bind, not serve forever.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = CliRunner().invoke(main, ["dashboard", "--storage", f"sqlite:///{db}", "--port", port])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "accounts" in lines[0] and str(db) in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.slow  # starts a dashboard process
def test_api_lists_study_trials_and_note(dashboard: Dashboard) -> None:
    status, listing = get_json(f"{dashboard.base}/api/studies")
    assert status == 200
    names = {s["study_name"]: s["study_id"] for s in listing["study_summaries"]}
    assert names[STUDY] == dashboard.study_id

    status, detail = get_json(f"{dashboard.base}/api/studies/{dashboard.study_id}")
    assert status == 200
    stored = open_storage(dashboard.url).get_all_trials(dashboard.study_id)
    assert len(detail["trials"]) == len(stored) == 4
    for got, want in zip(sorted(detail["trials"], key=lambda t: t["number"]), stored, strict=True):
        assert got["number"] == want.number
        assert got["state"] == want.state.name.capitalize()
        assert {p["name"]: p["param_external_value"] for p in got["params"]} == {
            k: str(v) for k, v in want.params.items()
        }
        assert got["intermediate_values"] == [
            {"step": s, "value": v} for s, v in sorted(want.intermediate_values.items())
        ]
    assert [t["state"] for t in detail["trials"]].count("Pruned") == 1
    assert len(detail["trials"][0]["intermediate_values"]) == 3

    assert detail["note"]["body"] == spec_note(STUDY, DESCRIPTION, SPEC_SOURCE)
    assert SPEC_SOURCE.strip() in detail["note"]["body"]


def run_chromium(args: list[str], timeout: float = 40) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing; CI must install Debian's chromium"
    # Its own session, so that on timeout the whole browser (zygote, renderers) is killed.
    proc = subprocess.Popen(
        [str(CHROMIUM), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def chromium_flags(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--virtual-time-budget=10000",
    ]


@pytest.mark.slow  # Chromium renders the page twice
def test_chromium_renders_study_page(dashboard: Dashboard, tmp_path: Path) -> None:
    page = f"{dashboard.base}/dashboard/studies/{dashboard.study_id}"
    shot = tmp_path / "shot.png"
    done = run_chromium([*chromium_flags(tmp_path / "p1"), f"--screenshot={shot}", page])
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert shot.is_file()
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1280)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    differs = np.abs(pixels - background).max(axis=2) > 0.1
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert differs.mean() > 0.03, f"only {differs.mean():.1%} of the page differs from background"
    # Plotly's first trace colour (#636efa) fills the importance bar; a page whose study failed to
    # load draws the same frame and empty axes but none of it.
    plotted = (np.abs(pixels * 255 - [99, 110, 250]).max(axis=2) < 12).mean()
    assert plotted > 0.01, f"no plotted data on the page ({plotted:.2%} trace-coloured pixels)"

    dom = run_chromium([*chromium_flags(tmp_path / "p2"), "--dump-dom", page])
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    html = dom.stdout.decode()
    assert STUDY in html
    assert "optimizer.lr" in html


@pytest.mark.slow  # a writer process adds 30 trials while the dashboard answers
def test_api_answers_while_a_worker_writes(dashboard: Dashboard) -> None:
    n_new = 30
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, dashboard.url, LIVE, str(n_new)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        statuses: list[int] = []
        during = 0
        for i in range(40):
            path = "/api/studies" if i % 4 == 0 else f"/api/studies/{dashboard.live_id}"
            statuses.append(get_json(dashboard.base + path)[0])
            during += writer.poll() is None
        _, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert statuses == [200] * 40
    assert writer.returncode == 0, err
    assert "database is locked" not in err
    assert during >= 5, f"only {during} requests overlapped the writer"

    deadline = time.monotonic() + 15  # the dashboard caches trial lists for 2 s
    while True:
        _, detail = get_json(f"{dashboard.base}/api/studies/{dashboard.live_id}")
        complete = [t for t in detail["trials"] if t["state"] == "Complete"]
        if len(complete) == n_new or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(complete) == n_new
    assert all(len(t["intermediate_values"]) == 3 for t in complete)


@pytest.mark.slow  # starts a dashboard process
def test_spawn_raises_when_the_dashboard_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with status 1"):
        spawn(f"sqlite:///{tmp_path / 'missing' / 'x.db'}", port=free_port(), timeout=20)
