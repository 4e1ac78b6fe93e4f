"""PostgreSQL storage for real: a throw-away server from Debian's `pg_virtualenv`, see README.

The server comes from the PG* environment variables that `pg_virtualenv` sets; without them these
tests fail rather than skip, so a CI set-up that lost its database cannot pass unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy
from click.testing import CliRunner, Result
from optuna.trial import TrialState
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from conftest import QUICK_STUDY, run_cli, write_study
from hpsearch.cli import main
from hpsearch.report import make_report
from hpsearch.storage import load_stored_study

PG_VARS = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE")

# Every test here starts a run or a server session: seconds each.
pytestmark = pytest.mark.slow


def _pg_url(database: str | None = None) -> str | None:
    env = os.environ
    if not all(env.get(var) for var in PG_VARS):
        return None
    common = {
        "username": env["PGUSER"],
        "password": env.get("PGPASSWORD"),
        "database": database or env["PGDATABASE"],
    }
    if env["PGHOST"].startswith("/"):  # a socket folder: libpq takes it as the host parameter
        url = URL.create("postgresql+psycopg", query={"host": env["PGHOST"], "port": env["PGPORT"]}, **common)
    else:
        url = URL.create("postgresql+psycopg", host=env["PGHOST"], port=int(env["PGPORT"]), **common)
    return url.render_as_string(hide_password=False)


def pg_url(database: str | None = None) -> str:
    url = _pg_url(database)
    if url is None:
        missing = ", ".join(var for var in PG_VARS if not os.environ.get(var))
        pytest.fail(
            f"no PostgreSQL server: {missing} not set; run the tests under pg_virtualenv, see README",
            pytrace=False,
        )
    return url


@pytest.fixture
def study_name() -> Iterator[str]:
    """A study name of this test's own, dropped from the database afterwards."""
    name = f"pg-{uuid.uuid4().hex[:8]}"
    yield name
    url = _pg_url()
    if url is not None:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=url)


def stored_trials(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).trials


def test_eight_workers_on_two_machines_share_one_budget_exactly(tmp_path: Path, study_name: str) -> None:
    url = pg_url()
    text = QUICK_STUDY.replace("n_trials = 6", "n_trials = 24").replace(
        'sampler = "random"', 'sampler = { name = "tpe", seed = 0 }'
    )
    path = write_study(tmp_path, study_name, text)
    cmd = [sys.executable, "-m", "hpsearch", "run", "--study", str(path), "--storage", url]
    cmd += ["--device", "cpu", "--workers", "4"]
    # Started together on a new study: both race to create it, as two machines of a fleet would.
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert "Traceback" not in err and "best trial" in out

    trials = stored_trials(study_name, url)
    assert len(trials) == 24  # exactly the budget, though eight workers raced for the last places
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in trials}) > 2
    # The workers that did not create the study reseed their sampler instead of replaying the seed.
    assert len({tuple(t.params.values()) for t in trials}) == len(trials)
    attrs = optuna.load_study(study_name=study_name, storage=url).user_attrs
    assert attrs["spec_source"] == text
    assert attrs["spec"]["optimizer"]["lr"] == {"low": 0.0001, "high": 0.003, "log": True}


def test_stop_and_resume_fills_the_study_and_refuses_a_changed_space(tmp_path: Path, study_name: str) -> None:
    url = pg_url()
    path = write_study(tmp_path, study_name, QUICK_STUDY.replace("n_trials = 6", "n_trials = 4"))
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu", "--n-trials", "2")
    assert len(stored_trials(study_name, url)) == 2
    out = run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu")
    assert "resuming: 2 finished trials stored" in out
    trials = stored_trials(study_name, url)
    assert len(trials) == 4 and {t.state for t in trials} == {TrialState.COMPLETE}

    path.write_text(path.read_text().replace("high = 0.003", "high = 0.01"))
    result = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", url, "--n-trials", "1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit) and len(result.output.strip().splitlines()) == 1
    assert "different search space" in result.output
    assert "optimizer.lr.high changed from 0.003 to 0.01" in result.output
    assert len(stored_trials(study_name, url)) == 4


def test_export_reads_the_study_back(tmp_path: Path, study_name: str) -> None:
    url = pg_url()
    path = write_study(tmp_path, study_name, QUICK_STUDY)
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu", "--n-trials", "3")
    result = CliRunner().invoke(main, ["export", "--study", study_name, "--storage", url])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    complete = [t for t in stored_trials(study_name, url) if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert len(table) == len(complete)


def contents(url: str) -> dict[str, list[str]]:
    """Every table of the database at ``url`` and its rows, in a comparable form."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            names = sqlalchemy.inspect(conn).get_table_names()
            return {
                n: sorted(map(repr, conn.execute(sqlalchemy.text(f'SELECT * FROM "{n}"')))) for n in names
            }
    finally:
        engine.dispose()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_reading_commands_leave_the_database_unchanged(tmp_path: Path, study_name: str) -> None:
    url = pg_url()
    path = write_study(tmp_path, study_name, QUICK_STUDY)
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu", "--n-trials", "2")
    before = contents(url)
    assert before["trials"], "the study's trials are in the snapshot"
    for args in (
        ["export", "--study", study_name],
        ["export", "--study", study_name, "--trials"],
        ["export", "--all-studies"],
        ["best", "--study", study_name],
    ):
        result = invoke(*args, "--storage", url)
        assert result.exit_code == 0, (args, result.output)
    written = make_report(load_stored_study(study_name, url), tmp_path / "report")
    assert (tmp_path / "report" / "report.md") in written
    assert contents(url) == before


@pytest.fixture
def foreign_url() -> Iterator[str]:
    """A database of its own on the server holding another program's table, ``accounts``."""
    name = f"bank_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(pg_url(), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = pg_url(name)
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("CREATE TABLE accounts (id serial PRIMARY KEY, owner text, balance real)")
        )
        conn.execute(sqlalchemy.text("INSERT INTO accounts (owner, balance) VALUES ('ada', 12.5)"))
    engine.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_foreign_database_is_refused_untouched(foreign_url: str, tmp_path: Path) -> None:
    before = contents(foreign_url)
    assert list(before) == ["accounts"]
    for args in (
        ["export", "--study", "x"],
        ["export", "--all-studies"],
        ["best", "--study", "x"],
        ["report", "--study", "x", "-o", str(tmp_path / "out")],
    ):
        result = invoke(*args, "--storage", foreign_url)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "accounts" in lines[0], result.output
    assert contents(foreign_url) == before
    assert not (tmp_path / "out").exists()


def test_a_worker_holds_a_bounded_pool_of_connections() -> None:
    from hpsearch.storage import PG_MAX_OVERFLOW, PG_POOL_SIZE, open_storage

    storage = open_storage(pg_url())
    assert isinstance(storage, optuna.storages.RDBStorage)
    pool = storage.engine.pool
    try:
        # What the README promises a server: at most four connections per worker.
        assert (pool.size(), pool._max_overflow) == (PG_POOL_SIZE, PG_MAX_OVERFLOW) == (2, 2)
        assert pool._pre_ping
    finally:
        storage.engine.dispose()
