"""storage.py on real SQLite files (and a real PostgreSQL server under pg_virtualenv).

The promise under test: hpsearch writes only to databases it owns, and reading never writes. A
database is "untouched" when its bytes, its mtime, its folder's listing, its tables and its journal
mode are all as they were.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.study import StudyDirection
from test_postgres import _pg_url

from hpsearch.storage import (
    StorageError,
    atomic_write,
    load_stored_study,
    open_readonly,
    open_storage,
    stored_study_names,
)

OPTUNA_TABLES = {"studies", "trials", "version_info", "alembic_version"}


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


def make_study_db(db: Path, names: tuple[str, ...] = ("alpha", "beta")) -> str:
    """An hpsearch-made (WAL-mode) SQLite file holding ``names``, 4 finished trials each."""
    url = f"sqlite:///{db}"
    storage = open_storage(url)
    for name in names:
        study = optuna.create_study(study_name=name, storage=storage)
        study.set_user_attr("owner", name)
        for _ in range(2):
            study.optimize(objective, n_trials=2)
    # The last connection closing checkpoints the WAL and removes -wal/-shm: the file is at rest.
    storage.engine.dispose()
    return url


@dataclass(frozen=True)
class Templates:
    """Databases made once per module and copied into each test, since creating tables is slow."""

    studies: Path  # made by hpsearch (WAL): studies alpha and beta, 4 trials each
    bare: Path  # made by hpsearch (WAL): Optuna's tables, no study
    plain: Path  # made by plain Optuna (rollback journal): study alpha, 2 trials


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    folder = tmp_path_factory.mktemp("templates")
    made = Templates(folder / "studies.db", folder / "bare.db", folder / "plain.db")
    make_study_db(made.studies)
    make_study_db(made.bare, ())
    storage = optuna.storages.RDBStorage(f"sqlite:///{made.plain}")
    optuna.create_study(study_name="alpha", storage=storage).optimize(objective, n_trials=2)
    storage.engine.dispose()
    return made


def copy_to(template: Path, db: Path) -> str:
    """The URL of a copy of ``template`` at ``db``, its folder created."""
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


@dataclass(frozen=True)
class Snapshot:
    digest: str
    mtime_ns: int
    folder: tuple[str, ...]


def snapshot(db: Path) -> Snapshot:
    return Snapshot(
        hashlib.sha256(db.read_bytes()).hexdigest(),
        db.stat().st_mtime_ns,
        tuple(sorted(os.listdir(db.parent))),
    )


def sqlite_tables(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
    return [name for (name,) in rows]


def journal_mode(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def make_foreign_db(db: Path, mode: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, account INTEGER)")
    conn.execute("INSERT INTO accounts (name) VALUES ('ada')")
    conn.commit()
    conn.close()


def assert_write_refused(storage: optuna.storages.RDBStorage, reason: str) -> None:
    """A write through ``storage`` fails in the database driver, for ``reason``."""
    with pytest.raises(optuna.exceptions.StorageInternalError) as info:
        storage.create_new_study([StudyDirection.MINIMIZE], study_name=f"w-{uuid.uuid4().hex[:8]}")
    assert isinstance(info.value.__cause__, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InternalError)
    assert reason in str(info.value.__cause__)


# --- open_storage: only new, empty or Optuna databases are written ---------------------------------


def test_open_storage_makes_a_new_file_an_optuna_database_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    make_study_db(db, ("alpha",))
    assert set(sqlite_tables(db)) >= OPTUNA_TABLES
    assert journal_mode(db) == "wal"


def test_open_storage_takes_an_empty_file_and_a_plain_optuna_database(
    tmp_path: Path, templates: Templates
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    storage = open_storage(f"sqlite:///{empty}")
    storage.engine.dispose()
    assert set(sqlite_tables(empty)) >= OPTUNA_TABLES

    plain = tmp_path / "plain.db"
    storage = open_storage(copy_to(templates.plain, plain))
    assert [s.study_name for s in storage.get_all_studies()] == ["alpha"]
    storage.engine.dispose()
    assert journal_mode(plain) == "wal"


def test_open_storage_names_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"folder .*nope does not exist; create it or pick another"):
        open_storage(f"sqlite:///{tmp_path / 'nope' / 'x.db'}")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("mode", ["delete", "wal"])
@pytest.mark.parametrize("opener", [open_storage, open_readonly], ids=["open_storage", "open_readonly"])
def test_a_foreign_sqlite_database_is_refused_untouched(
    tmp_path: Path, mode: str, opener: Callable[[str], optuna.storages.RDBStorage]
) -> None:
    db = tmp_path / "shop.db"
    make_foreign_db(db, mode)
    before = snapshot(db)
    url = f"sqlite:///{db}"
    with pytest.raises(StorageError) as info:
        opener(url)
    message = str(info.value)
    assert "\n" not in message
    assert f"{url}: it holds another program's tables (accounts, orders)" in message
    assert "hpsearch leaves it untouched" in message
    assert snapshot(db) == before  # bytes, mtime, and no -wal/-shm/-journal left beside it
    assert sqlite_tables(db) == ["accounts", "orders"]
    assert journal_mode(db) == mode


# --- open_readonly: reads, never writes ------------------------------------------------------------


def test_open_readonly_reads_a_study_and_refuses_writes(tmp_path: Path, templates: Templates) -> None:
    db = tmp_path / "studies.db"
    url = copy_to(templates.studies, db)
    before = snapshot(db)
    storage = open_readonly(url)
    assert [s.study_name for s in storage.get_all_studies()] == ["alpha", "beta"]
    study = optuna.load_study(study_name="alpha", storage=storage)
    assert len(study.trials) == 4
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert study.user_attrs == {"owner": "alpha"}
    assert study.best_trial.value == min(t.params["x"] for t in study.trials)
    assert_write_refused(storage, "attempt to write a readonly database")
    storage.engine.dispose()
    after = snapshot(db)
    assert (after.digest, after.mtime_ns) == (before.digest, before.mtime_ns)
    assert [s.study_name for s in open_storage(url).get_all_studies()] == ["alpha", "beta"]


def test_a_read_only_file_in_a_read_only_folder_is_still_read(tmp_path: Path, templates: Templates) -> None:
    folder = tmp_path / "archive"
    db = folder / "studies.db"
    url = copy_to(templates.studies, db)
    before = snapshot(db)
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        study = load_stored_study(str(tmp_path / "alpha.toml"), url)  # a study file stands for its name
        assert (study.study_name, len(study.trials)) == ("alpha", 4)
        assert stored_study_names(url) == ["alpha", "beta"]
        # As root chmod does not stop writes; the connection itself must refuse them.
        assert_write_refused(open_readonly(url), "attempt to write a readonly database")
        after = snapshot(db)
        assert (after.digest, after.mtime_ns) == (before.digest, before.mtime_ns)
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)


# Reads each URL in a process that file permissions really bind, and prints what it saw.
_READER = textwrap.dedent("""
    import json, sys, uuid
    import optuna
    from hpsearch.storage import load_stored_study, open_readonly
    seen = {}
    for url in sys.argv[1:]:
        try:
            study = load_stored_study("alpha", url)
            storage = open_readonly(url)
            try:
                storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "w-" + uuid.uuid4().hex)
                wrote = True
            except Exception:
                wrote = False
            seen[url] = {"trials": len(study.trials), "wrote": wrote}
        except Exception as exc:
            seen[url] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(seen))
""")


def _unprivileged() -> list[str]:
    """Command prefix that makes file permissions bind this test's child process."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no way to read without the right to write")
    # Root without these capabilities is held to the permission bits like any user.
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps=-all"]


@pytest.mark.slow  # a child process without root's override of file modes
def test_a_process_without_write_access_reads_wal_files(tmp_path: Path, templates: Templates) -> None:
    prefix = _unprivileged()
    # A WAL file in a folder that cannot take its -shm file; a WAL file that cannot be written;
    # and one that cannot be written while a live writer still holds its trials in the WAL.
    closed_folder, locked_file, live = tmp_path / "closed", tmp_path / "locked", tmp_path / "live"
    urls = [copy_to(templates.studies, folder / "studies.db") for folder in (closed_folder, locked_file)]
    writer = open_storage(copy_to(templates.bare, live / "studies.db"))
    optuna.create_study(study_name="alpha", storage=writer).optimize(objective, n_trials=3)
    assert (live / "studies.db-wal").stat().st_size > 0
    urls.append(f"sqlite:///{live / 'studies.db'}")
    before = {folder: snapshot(folder / "studies.db") for folder in (closed_folder, locked_file)}
    closed_folder.chmod(0o555)
    (locked_file / "studies.db").chmod(0o444)
    (live / "studies.db").chmod(0o444)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-c", _READER, *urls], capture_output=True, text=True, check=True
        )
    finally:
        writer.engine.dispose()
        closed_folder.chmod(0o755)
    seen = json.loads(result.stdout)
    assert seen == {
        urls[0]: {"trials": 4, "wrote": False},
        urls[1]: {"trials": 4, "wrote": False},
        urls[2]: {"trials": 3, "wrote": False},  # the WAL's trials too: not read as an immutable file
    }
    for folder, was in before.items():
        assert snapshot(folder / "studies.db") == was  # no -wal/-shm either


def test_open_readonly_keeps_each_journal_mode(tmp_path: Path, templates: Templates) -> None:
    wal = tmp_path / "wal.db"
    copy_to(templates.studies, wal)
    plain = tmp_path / "plain" / "plain.db"
    copy_to(templates.plain, plain)
    assert journal_mode(plain) == "delete"
    before = snapshot(plain)
    for db, n_trials in ((wal, 4), (plain, 2)):
        storage = open_readonly(f"sqlite:///{db}")
        assert len(optuna.load_study(study_name="alpha", storage=storage).trials) == n_trials
        storage.engine.dispose()
    assert snapshot(plain) == before  # no -wal/-shm beside a rollback-journal file
    assert journal_mode(plain) == "delete"
    assert journal_mode(wal) == "wal"


def test_a_missing_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    url = f"sqlite:///{db}"
    expected = f"no studies in {url}: {db} does not exist; pass --storage or set $HPSEARCH_STORAGE"
    for read in (open_readonly, stored_study_names, lambda u: load_stored_study("alpha", u)):
        with pytest.raises(StorageError) as info:
            read(url)
        assert str(info.value) == expected
    assert os.listdir(tmp_path) == []


def test_an_empty_file_is_not_an_optuna_database(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    db.touch()
    url = f"sqlite:///{db}"
    with pytest.raises(StorageError) as info:
        open_readonly(url)
    assert str(info.value) == (
        f"no studies in {url}: it is empty, not an Optuna database; hpsearch leaves it untouched: "
        "pass --storage or set $HPSEARCH_STORAGE"
    )
    assert db.stat().st_size == 0
    assert os.listdir(tmp_path) == ["empty.db"]


def test_an_unknown_study_name_lists_the_stored_ones(tmp_path: Path, templates: Templates) -> None:
    url = copy_to(templates.studies, tmp_path / "studies.db")
    with pytest.raises(StorageError) as info:
        load_stored_study("gamma", url)
    assert str(info.value) == f"no study named 'gamma' in {url}; studies there: alpha, beta"

    bare = copy_to(templates.bare, tmp_path / "bare.db")
    with pytest.raises(StorageError) as info:
        load_stored_study("gamma.toml", bare)
    assert str(info.value) == f"no study named 'gamma' in {bare}; studies there: none"


@pytest.mark.parametrize("opener", [open_storage, open_readonly], ids=["open_storage", "open_readonly"])
def test_an_unreachable_server_is_one_line_without_the_password(
    opener: Callable[[str], optuna.storages.RDBStorage],
) -> None:
    with pytest.raises(StorageError) as info:
        opener("postgresql+psycopg://ada:s3cret@127.0.0.1:1/db")  # nothing listens on port 1
    message = str(info.value)
    assert message.startswith("cannot open storage postgresql+psycopg://ada:***@127.0.0.1:1/db: ")
    assert "s3cret" not in message
    assert "\n" not in message


# --- atomic_write ----------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_with_default_permissions(tmp_path: Path) -> None:
    target = tmp_path / "best.csv"
    old_umask = os.umask(0o022)
    try:
        atomic_write(target, "x,y\n1,é\n")
        assert target.read_bytes() == "x,y\n1,é\n".encode()
        atomic_write(target, b"\x00\x01")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"\x00\x01"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # 0o666 less the umask, not mkstemp's 0o600
    assert os.listdir(tmp_path) == ["best.csv"]


def test_atomic_write_refuses_a_missing_folder_and_a_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "t.csv"
    with pytest.raises(StorageError) as info:
        atomic_write(missing, "x")
    assert str(info.value) == f"cannot write {missing}: folder {missing.parent} does not exist"
    with pytest.raises(StorageError) as info:
        atomic_write(tmp_path, "x")
    assert str(info.value) == f"cannot write {tmp_path}: it is a folder"
    assert os.listdir(tmp_path) == []


def test_atomic_write_failures_leave_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "t.csv"
    target.write_text("old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(StorageError) as info:
            atomic_write(target, "new")
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert os.listdir(tmp_path) == ["t.csv"]

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            atomic_write(target, "new")
    assert os.listdir(tmp_path) == ["t.csv"]
    assert target.read_text() == "old"

    too_long = tmp_path / ("n" * 250)  # fits, but its temporary file's name does not
    with pytest.raises(StorageError) as info:
        atomic_write(too_long, "new")
    assert str(info.value) == f"cannot write {too_long}: File name too long"
    assert os.listdir(tmp_path) == ["t.csv"]


# --- PostgreSQL (under pg_virtualenv) ----------------------------------------------------------------


@pytest.fixture
def pg_database() -> Iterator[str]:
    """URL of a fresh PostgreSQL database of this test's own, dropped afterwards."""
    base = _pg_url()
    if base is None:
        pytest.skip("no PostgreSQL server: PG* variables not set; run under `pg_virtualenv -t`")
    name = f"hps_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sqlalchemy.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


def pg_tables(url: str) -> list[str]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        return sorted(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_postgres_foreign_or_empty_database_is_refused_untouched(pg_database: str) -> None:
    with pytest.raises(StorageError, match=r"it is empty, not an Optuna database"):
        open_readonly(pg_database)
    assert pg_tables(pg_database) == []

    engine = sqlalchemy.create_engine(pg_database, poolclass=sqlalchemy.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE accounts (id serial PRIMARY KEY, name text)")
        conn.exec_driver_sql("INSERT INTO accounts (name) VALUES ('ada')")
    engine.dispose()
    for opener in (open_storage, open_readonly):
        with pytest.raises(StorageError, match=r"it holds another program's tables \(accounts\)"):
            opener(pg_database)
    assert pg_tables(pg_database) == ["accounts"]


def test_postgres_open_readonly_reads_and_the_server_refuses_writes(pg_database: str) -> None:
    make = open_storage(pg_database)
    study = optuna.create_study(study_name="alpha", storage=make)
    study.optimize(objective, n_trials=2)
    make.engine.dispose()

    storage = open_readonly(pg_database)
    assert len(optuna.load_study(study_name="alpha", storage=storage).trials) == 2
    assert_write_refused(storage, "read-only transaction")
    storage.engine.dispose()
    assert stored_study_names(pg_database) == ["alpha"]


def test_open_storage_takes_a_schema_another_worker_is_still_creating(tmp_path: Path) -> None:
    # Workers starting together on a new database race to create Optuna's tables: one of them may
    # look while only some exist. Those are Optuna's, not another program's, so it goes on.
    path = tmp_path / "racing.db"
    optuna.storages.RDBStorage(f"sqlite:///{path}").engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as con:
        for table in ("trial_values", "version_info", "alembic_version"):
            con.execute(f"DROP TABLE {table}")
        con.commit()
    storage = open_storage(f"sqlite:///{path}")
    optuna.create_study(study_name="after", storage=storage).optimize(lambda t: 0.0, n_trials=1)
    with contextlib.closing(sqlite3.connect(path)) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"trial_values", "version_info", "alembic_version"} <= tables
