"""Where studies live: storage URLs, opening stored studies, artifacts, and atomic file writes.

hpsearch writes only to data it owns, and commands that only read never write:

* ``open_storage`` (for ``hpsearch run``) creates Optuna's tables only in a new or empty database or
  in one that already holds them; a database holding another program's tables is refused untouched.
* ``open_readonly`` (for ``export``, ``best``, ``report``, the dashboard) never creates a table and opens
  SQLite files through read-only connections and PostgreSQL sessions that the server keeps read-only.
* ``atomic_write`` is the one way files are written: readers see the old file or the new one, never half.

Every failure a user can fix is a ``StorageError`` whose message is one line naming the URL or path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from sqlalchemy.pool import NullPool

from hpsearch.errors import HpsearchError

DEFAULT_STORAGE = "sqlite:///hpsearch.db"
ENV_STORAGE = "HPSEARCH_STORAGE"
ENV_ARTIFACTS = "HPSEARCH_ARTIFACTS"

# Seconds an SQLite connection waits for another's lock: workers, exports and the dashboard share a file.
_SQLITE_BUSY_TIMEOUT_S = 60
# Tables that every Optuna RDB schema has; a database holding all of them is Optuna's.
_OPTUNA_TABLES = frozenset({"studies", "trials", "version_info", "alembic_version"})
# Every table Optuna makes: while another worker is still creating them, a database holds some.
_OPTUNA_SCHEMA = _OPTUNA_TABLES | {
    "study_directions",
    "study_system_attributes",
    "study_user_attributes",
    "trial_heartbeats",
    "trial_intermediate_values",
    "trial_params",
    "trial_system_attributes",
    "trial_user_attributes",
    "trial_values",
}
# libpq start-up option: every transaction of the session is read-only, enforced by the server.
_PG_READ_ONLY = {"options": "-c default_transaction_read_only=on"}


class StorageError(HpsearchError):
    """A storage or file cannot be used; the message names the URL or path, why, and what to do."""


def resolve_url(url: str | None) -> str:
    """``--storage`` if given, else ``$HPSEARCH_STORAGE``, else an SQLite file in the working dir."""
    return url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def open_storage(url: str | None = None, *, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """Open the storage behind ``url`` for writing, creating Optuna's tables if it has none.

    Before anything is written, the database is inspected read-only: one that holds tables but not
    Optuna's schema raises ``StorageError`` and is left byte for byte as it was. A new or empty SQLite
    file, or one with Optuna's schema, is switched to write-ahead logging and given a long busy
    timeout, so that readers can read while workers write without "database is locked" errors. With
    ``heartbeat`` the storage marks trials of a killed worker as failed, so a rerun resumes cleanly.
    """
    url = resolve_url(url)
    shown = _shown(url)
    sqlite = _is_sqlite(url)
    path = _sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        raise StorageError(
            f"storage {shown}: folder {path.parent} does not exist; create it or pick another --storage"
        )
    if path is not None and path.exists():
        # Read-only, and leaving no -wal/-shm behind: a refused file must stay exactly as it was.
        tables = _table_names(_sqlite_read_url(path, immutable=_brief_look_immutable(path)), shown)
    elif sqlite:  # a file still to be created, or in memory: empty
        tables = []
    else:
        tables = _table_names(url, shown)
    foreign = sorted(set(tables) - _OPTUNA_SCHEMA)
    if foreign and not _OPTUNA_TABLES.issubset(tables):
        raise StorageError(
            f"cannot use storage {shown}: it holds another program's tables ({_listed(foreign)}), "
            "not Optuna's; hpsearch leaves it untouched: pick another --storage"
        )
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": _SQLITE_BUSY_TIMEOUT_S}} if sqlite else {}
    storage = _rdb_storage(url, shown, engine_kwargs, heartbeat=heartbeat, skip_table_creation=False)
    if sqlite:
        try:
            with storage.engine.connect() as conn:
                # The mode is stored in the file: set once, it lets readers read while workers write.
                if conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal":
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        except sqlalchemy.exc.SQLAlchemyError as exc:
            storage.engine.dispose()
            raise StorageError(f"cannot open storage {shown}: {_first_line(exc)}") from exc
        # A trial commits dozens of times (each attribute, each reported epoch). In WAL mode,
        # synchronous=NORMAL syncs at checkpoints rather than at every commit: the file stays
        # consistent after any crash, and a power cut can lose only the last commits.
        sqlalchemy.event.listen(storage.engine, "connect", _sync_at_checkpoints)
        storage.engine.dispose()  # connections opened so far lack it
    return storage


def _sync_at_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def open_readonly(url: str | None = None) -> optuna.storages.RDBStorage:
    """Open the storage behind ``url`` for reading only; nothing is ever written to it.

    A missing SQLite file, an in-memory or empty database, or one without Optuna's schema raises
    ``StorageError`` and is left untouched (a missing file is never created: it is most likely a typo
    in ``--storage``). SQLite files are opened through read-only connections; a WAL-mode file that this
    process cannot write, or whose folder cannot take the ``-shm`` file SQLite needs, is opened as
    immutable, i.e. as a snapshot that a writer with more rights would not update. Reading a WAL-mode
    file that can take its ``-shm`` may leave SQLite's empty ``-wal`` and ``-shm`` files beside it; the
    database file itself is never modified. PostgreSQL sessions are read-only on the server; other
    back ends get no table creation but no server-side guard. A write attempted through the returned
    storage fails (Optuna's ``StorageInternalError``, caused by the database's refusal).
    """
    url = resolve_url(url)
    shown = _shown(url)
    engine_kwargs: dict[str, Any] = {}
    if _is_sqlite(url):
        path = _sqlite_path(url)
        if path is None:
            raise StorageError(f"no studies in {shown}: an in-memory database is empty; pass --storage")
        if not path.exists():
            raise StorageError(
                f"no studies in {shown}: {path} does not exist; pass --storage or set ${ENV_STORAGE}"
            )
        tables = _table_names(_sqlite_read_url(path, immutable=_brief_look_immutable(path)), shown)
        read_url = _sqlite_read_url(path, immutable=_reads_immutable(path))
        engine_kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_S}
    else:
        if sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql":
            engine_kwargs["connect_args"] = dict(_PG_READ_ONLY)
        tables = _table_names(url, shown, engine_kwargs)
        read_url = url
    if not _OPTUNA_TABLES.issubset(tables):
        found = f"it holds another program's tables ({_listed(tables)})" if tables else "it is empty"
        raise StorageError(
            f"no studies in {shown}: {found}, not an Optuna database; hpsearch leaves it untouched: "
            f"pass --storage or set ${ENV_STORAGE}"
        )
    return _rdb_storage(read_url, shown, engine_kwargs, heartbeat=False, skip_table_creation=True)


def stored_study_names(url: str | None = None) -> list[str]:
    """Names of the studies stored at ``url``, sorted; read through ``open_readonly``."""
    return _study_names(open_readonly(url))


def load_stored_study(name_or_path: str, url: str | None = None) -> optuna.Study:
    """The stored study ``name_or_path``, read through ``open_readonly``: the one study lookup.

    A path ending in ``.toml`` (a study file) stands for its stem. An unknown name raises
    ``StorageError`` listing the studies that are there.
    """
    name = Path(name_or_path).stem if name_or_path.endswith(".toml") else name_or_path
    storage = open_readonly(url)
    names = _study_names(storage)
    if name not in names:
        raise StorageError(
            f"no study named {name!r} in {_shown(resolve_url(url))}; "
            f"studies there: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=name, storage=storage)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace the file ``path`` with ``data`` (a ``str`` is written as UTF-8) in one step.

    The data goes to a hidden temporary file in the same folder, created with the permissions the
    umask gives any new file, is flushed to disk, then renamed over ``path``: readers see the old file
    or the new one, never a part. On any failure, interruptions included, the temporary file is
    removed and ``path`` is unchanged. A missing folder, a folder at ``path`` and operating-system
    errors (no space, no permission) raise ``StorageError`` with one line.
    """
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        raise StorageError(f"cannot write {path}: folder {path.parent} does not exist")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    created = False
    try:
        # Not mkstemp: its 0600 mode would make an export unreadable to the user's group.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        created = True
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError):
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    # The rename itself is durable only once the folder's entry is on disk; not every system allows it.
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def artifact_dir(url: str | None = None) -> Path:
    """Folder of the artifact store that goes with ``url``.

    ``$HPSEARCH_ARTIFACTS`` wins; an SQLite file ``x.db`` keeps its artifacts in ``x-artifacts/``
    beside it; other databases use ``hpsearch-artifacts/`` in the working directory.
    """
    if os.environ.get(ENV_ARTIFACTS):
        return Path(os.environ[ENV_ARTIFACTS])
    url = resolve_url(url)
    if url.startswith("sqlite"):
        path = sqlalchemy.engine.make_url(url).database
        if path and path != ":memory:":
            p = Path(path)
            return p.with_name(p.stem + "-artifacts")
    return Path("hpsearch-artifacts")


def open_artifacts(url: str | None = None) -> FileSystemArtifactStore:
    """The file-system artifact store for ``url``'s studies, created on first use."""
    path = artifact_dir(url)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def _shown(url: str) -> str:
    """``url`` with its password masked, for messages."""
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return url
    # Rendering re-escapes the URL (":memory:" becomes "%3Amemory%3A"): only do it to hide a password.
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__  # Optuna's own first line says only that the commit failed
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, ImportError) and exc.name and "psycopg" in exc.name:
        line += (
            "; PostgreSQL needs the postgres extra (pip install 'hpsearch[postgres]') "
            "and a postgresql+psycopg:// URL"
        )
    return line


def _listed(tables: list[str], most: int = 5) -> str:
    """At most ``most`` table names, so that a large schema still makes a one-line message."""
    more = f", and {len(tables) - most} more" if len(tables) > most else ""
    return ", ".join(tables[:most]) + more


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_path(url: str) -> Path | None:
    """The file behind an SQLite ``url``; None for in-memory databases and other back ends."""
    if not _is_sqlite(url):
        return None
    path = sqlalchemy.engine.make_url(url).database
    return Path(path) if path and path != ":memory:" else None


def _sqlite_read_url(path: Path, *, immutable: bool) -> str:
    """SQLAlchemy URL of a read-only connection to the SQLite file ``path`` (an SQLite URI filename)."""
    query = {"mode": "ro", "uri": "true"} | ({"immutable": "1"} if immutable else {})
    database = "file:" + urllib.parse.quote(os.path.abspath(path))
    return sqlalchemy.engine.URL.create("sqlite", database=database, query=query).render_as_string()


def _is_wal_file(path: Path) -> bool:
    """Whether the SQLite file ``path`` is in WAL mode, read from its header, without opening it."""
    try:
        with path.open("rb") as f:
            header = f.read(20)
    except OSError:  # not a readable file: SQLite's own open reports why
        return False
    # The file format's read and write versions (bytes 18 and 19) are 2 in WAL mode, 1 otherwise.
    return header[:16] == b"SQLite format 3\x00" and len(header) == 20 and header[18] == 2


def _wal_pending(path: Path) -> bool:
    """Whether committed data may sit in ``path``'s write-ahead log, which immutable reads ignore."""
    wal = path.with_name(path.name + "-wal")
    return wal.exists() and wal.stat().st_size > 0


def _brief_look_immutable(path: Path) -> bool:
    """Whether a one-query look at the schema of ``path`` opens it immutable.

    A read-only connection to a WAL-mode file creates the ``-wal`` and ``-shm`` files and cannot
    remove them; an immutable one needs neither, and misses nothing while the log is empty. Only a
    file no connection has open is looked at that way: an open one always has its ``-shm``, and an
    immutable read beside a writer could see a page half checkpointed.
    """
    shm = path.with_name(path.name + "-shm")
    return path.stat().st_size > 0 and _is_wal_file(path) and not _wal_pending(path) and not shm.exists()


def _reads_immutable(path: Path) -> bool:
    """Whether a lasting read-only connection to ``path`` must open it immutable.

    Only a WAL-mode file whose log is empty needs it: when the file is not writable by this process,
    or SQLite could neither find nor create the ``-shm`` file. Otherwise a plain read-only connection
    also sees what workers commit while it is open.
    """
    if not _brief_look_immutable(path):
        return False
    shm = path.with_name(path.name + "-shm")
    return not os.access(path, os.W_OK) or (not shm.exists() and not os.access(path.parent, os.W_OK))


def _table_names(url: str, shown: str, engine_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The sorted table names of the database at ``url``; reads only."""
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, **(engine_kwargs or {}))
        try:
            return sorted(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    except Exception as exc:  # SQLAlchemy/driver errors: the user's URL is wrong or unreachable
        raise StorageError(f"cannot open storage {shown}: {_first_line(exc)}") from exc


def _rdb_storage(
    url: str, shown: str, engine_kwargs: dict[str, Any], *, heartbeat: bool, skip_table_creation: bool
) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=30 if heartbeat else None,
            grace_period=90 if heartbeat else None,
            skip_table_creation=skip_table_creation,
        )
    except Exception as exc:  # SQLAlchemy/driver errors, or Optuna's "schema too old/new" RuntimeError
        raise StorageError(f"cannot open storage {shown}: {_first_line(exc)}") from exc


def _study_names(storage: optuna.storages.RDBStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())
