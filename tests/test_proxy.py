"""`hpsearch storage-proxy`: Optuna's gRPC storage proxy in front of a real SQLite file, real
worker processes reaching it over loopback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from conftest import QUICK_STUDY, run_cli, write_study
from hpsearch.cli import main

pytestmark = pytest.mark.slow  # a proxy process and worker processes, each importing torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_proxy(storage: str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpsearch", "storage-proxy", "--storage", storage, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # written once the port is bound
    assert line.startswith("serving "), line + proc.stderr.read()
    assert f"workers pass --storage grpc://127.0.0.1:{port}" in line
    return proc


def test_two_workers_share_a_budget_through_the_proxy(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    port = free_port()
    proxy = start_proxy(db, port)
    try:
        path = write_study(tmp_path, "proxied", QUICK_STUDY)
        grpc = f"grpc://127.0.0.1:{port}"
        out = run_cli("run", "--study", str(path), "--storage", grpc, "--device", "cpu", "--workers", "2")
        assert "best trial" in out
        # Read back through the proxy as well as from the file itself.
        table = run_cli("export", "--study", "proxied", "--storage", grpc, "--top", "10").strip().splitlines()
        assert table[0].startswith("optimizer,lr,") and len(table) == 1 + 6
        trials = optuna.load_study(study_name="proxied", storage=db).trials
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == 6
        # Without a lock behind the proxy, a trial started past the budget in a race is closed unrun.
        assert all(t.user_attrs["fail_reason"].startswith("not run") for t in trials if t not in done)
        assert len({t.user_attrs["worker"] for t in done}) == 2
        # Busy port: one line, no traceback.
        busy = CliRunner().invoke(main, ["storage-proxy", "--storage", db, "--port", str(port)])
        assert busy.exit_code == 1 and isinstance(busy.exception, SystemExit)
        assert f"Error: cannot serve on 127.0.0.1:{port}" in busy.output
        assert "pick another --port" in busy.output
    finally:
        proxy.send_signal(signal.SIGTERM)
        _, err = proxy.communicate(timeout=30)
    assert proxy.returncode == 0, err
    assert err.strip().splitlines() == [f"storage proxy on 127.0.0.1:{port} stopped"]


def test_a_malformed_proxy_url_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", "--study", "x", "--storage", "grpc://no-port"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "a storage proxy URL is grpc://HOST:PORT" in result.output
