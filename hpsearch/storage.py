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
import fcntl
import os
import secrets
import socket
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import BaseStorage, GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState
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
# Connections one worker process may hold: its trial loop and its heartbeat thread use one each, and
# two more cover a brief overlap. Fleets larger than the server's max_connections ÷ 4 go through
# ``hpsearch storage-proxy``.
PG_POOL_SIZE, PG_MAX_OVERFLOW = 2, 2
# Seconds a worker waits for Optuna's gRPC storage proxy to answer before giving up.
_PROXY_WAIT_S = 15
# libpq start-up option: every transaction of the session is read-only, enforced by the server.
_PG_READ_ONLY = {"options": "-c default_transaction_read_only=on"}


class StorageError(HpsearchError):
    """A storage or file cannot be used; the message names the URL or path, why, and what to do."""


@dataclass(frozen=True)
class Heartbeat:
    """``[study] heartbeat``: how often a running trial says it is alive, and after how long without a
    word it is taken for dead, failed, and continued by the next worker from its last checkpoint.

    The beat comes from a thread, not from the training loop, so it does not depend on how long an
    epoch takes; the grace is what a dead worker's trial waits before another continues it.
    """

    interval: int = 10  # seconds
    grace: int = 60  # seconds

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be a whole number of seconds, at least 1, not {self.interval!r}")
        if isinstance(self.grace, bool) or not isinstance(self.grace, int) or self.grace <= self.interval:
            raise ValueError(
                f"grace must be a whole number of seconds longer than interval ({self.interval}), "
                f"not {self.grace!r}"
            )


def resolve_url(url: str | None) -> str:
    """``--storage`` if given, else ``$HPSEARCH_STORAGE``, else an SQLite file in the working dir."""
    return url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def open_storage(url: str | None = None, *, heartbeat: Heartbeat | None = None) -> BaseStorage:
    """Open the storage behind ``url`` for writing, creating Optuna's tables if it has none.

    Before anything is written, the database is inspected read-only: one that holds tables but not
    Optuna's schema raises ``StorageError`` and is left byte for byte as it was. A new or empty SQLite
    file, or one with Optuna's schema, is switched to write-ahead logging and given a long busy
    timeout, so that readers can read while workers write without "database is locked" errors. A
    PostgreSQL engine holds at most ``PG_POOL_SIZE + PG_MAX_OVERFLOW`` connections. ``grpc://HOST:PORT``
    is a server started by ``hpsearch storage-proxy``, which owns the database and its checks.

    With ``heartbeat``, running trials record a beat, and a trial whose beats stopped for longer than
    the grace is reported stale (``_get_stale_trial_ids``, Optuna's heartbeat protocol).
    """
    url = resolve_url(url)
    shown = shown_url(url)
    if _is_grpc(url):
        return _open_proxy(url, heartbeat)
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
    if _is_postgres(url):
        # Bounded, and checked before use: a fleet's connections add up on the server, and a worker
        # outlives the server restarts and network drops of a long search.
        engine_kwargs.update(pool_size=PG_POOL_SIZE, max_overflow=PG_MAX_OVERFLOW, pool_pre_ping=True)
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


def open_readonly(url: str | None = None) -> BaseStorage:
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
    shown = shown_url(url)
    if _is_grpc(url):  # the proxy's server decides what may be written; nothing here writes
        return _open_proxy(url, None)
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
    return _rdb_storage(read_url, shown, engine_kwargs, heartbeat=None, skip_table_creation=True)


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
            f"no study named {name!r} in {shown_url(resolve_url(url))}; "
            f"studies there: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=name, storage=storage)


_TMP_PREFIX = "."


def write_leftovers(path: Path) -> list[Path]:
    """The temporary files of ``atomic_write``s of ``path`` that never finished: a process killed
    (SIGKILL, power loss) half way through writing leaves one, which nothing else removes."""
    return sorted(path.parent.glob(f"{_TMP_PREFIX}{path.name}.*.tmp"))


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
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(4)}.tmp")
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


def shown_url(url: str) -> str:
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
        header = os.pread(_descriptor(str(path)), 20, 0)
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
    url: str,
    shown: str,
    engine_kwargs: dict[str, Any],
    *,
    heartbeat: Heartbeat | None,
    skip_table_creation: bool,
) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat.interval if heartbeat else None,
            grace_period=heartbeat.grace if heartbeat else None,
            skip_table_creation=skip_table_creation,
        )
    except Exception as exc:  # SQLAlchemy/driver errors, or Optuna's "schema too old/new" RuntimeError
        raise StorageError(f"cannot open storage {shown}: {_first_line(exc)}") from exc


def _is_grpc(url: str) -> bool:
    return url.startswith("grpc://")


def _is_postgres(url: str) -> bool:
    try:
        return sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql"
    except sqlalchemy.exc.ArgumentError:
        return False


def serve_proxy(url: str | None, host: str, port: int, ready: Callable[[], None] | None = None) -> None:
    """Serve the database behind ``url`` to workers on ``host:port`` through Optuna's gRPC storage
    proxy, until interrupted. The workers then hold no database connection of their own: one
    process here holds them all. ``ready`` is called once the port is bound."""
    # grpc logs a failed bind itself, on top of the error raised; the one line below says it.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from optuna.storages._grpc.server import make_server  # grpcio is only imported by the proxy

    url = resolve_url(url)
    if _is_grpc(url):
        raise StorageError(f"storage {url} is already a proxy; give the proxy the database's own URL")
    storage = optuna.storages.get_storage(open_storage(url))  # Optuna's in-process cache in front
    # grpc binds with SO_REUSEPORT, so a second proxy on a busy port would share it silently.
    try:
        with socket.create_server((host, port)):
            pass
        server = make_server(storage, host, port)
    except (OSError, RuntimeError) as exc:  # the address is taken, or not this machine's
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise StorageError(f"cannot serve on {host}:{port}: {reason}; pick another --port or --host") from exc
    server.start()
    try:
        if ready:
            ready()
        server.wait_for_termination()
    finally:
        server.stop(grace=None)


def _unwrapped(storage: BaseStorage) -> BaseStorage:
    """The storage itself: Optuna wraps a study's RDB storage in an in-process cache."""
    backend: BaseStorage = getattr(storage, "_backend", storage)
    return backend


def url_of(storage: BaseStorage) -> str:
    """The URL a storage opened here was opened from (the password included)."""
    backend = _unwrapped(storage)
    if isinstance(backend, optuna.storages.RDBStorage):
        return backend.engine.url.render_as_string(hide_password=False)
    if isinstance(backend, GrpcStorageProxy):
        return f"grpc://{backend._host}:{backend._port}"
    raise StorageError(f"hpsearch does not run studies in a {type(backend).__name__}")


@contextlib.contextmanager
def study_lock(storage: BaseStorage, study_name: str) -> Iterator[None]:
    """Hold a lock on ``study_name`` that every hpsearch worker of the storage takes before it starts
    a trial, so that counting the study's trials and starting one happen as one step for the fleet:
    the budget is met exactly, never passed. An SQLite file is locked with ``flock`` (workers on one
    machine), PostgreSQL with an advisory lock (any number of machines); both are released by the
    operating system or the server when a worker dies. Behind a storage proxy there is no lock: a
    trial started past the budget in the same instant as another is closed at once (see ``study``).
    """
    backend = _unwrapped(storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        yield
        return
    url = backend.engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        fd = _descriptor(str(url.database))
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    elif url.get_backend_name() == "postgresql":
        key = (0x6870 << 32) | zlib.crc32(study_name.encode())  # "hp", then the study
        with backend.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    else:
        yield


_DESCRIPTORS: dict[str, int] = {}


def _descriptor(path: str) -> int:
    """A read-only descriptor of the SQLite file ``path``, opened once and kept for the life of the
    process, for reading its header and for ``flock``.

    Closing any descriptor of a file drops every POSIX lock the process holds on it, those of its
    SQLite connections included: another process would then take the database for unused and
    remove its write-ahead log from under them. So a descriptor of a database file is never closed
    while its file is there; one whose file was replaced is closed, no connection being left on it.
    """
    key = os.path.realpath(path)
    fd = _DESCRIPTORS.get(key)
    if fd is not None and os.fstat(fd).st_ino != os.stat(key).st_ino:
        os.close(fd)
        fd = None
    if fd is None:
        fd = _DESCRIPTORS[key] = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    return fd


def proxy_address(url: str) -> tuple[str, int]:
    """Host and port of a ``grpc://HOST:PORT`` URL."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise StorageError(
            f"storage {url}: a storage proxy URL is grpc://HOST:PORT, e.g. grpc://localhost:13000"
        )
    return parsed.hostname, port


def _open_proxy(url: str, heartbeat: Heartbeat | None) -> BaseStorage:
    host, port = proxy_address(url)
    storage = (
        _ProxyWithHeartbeat(host, port, heartbeat) if heartbeat else GrpcStorageProxy(host=host, port=port)
    )
    try:
        storage.wait_server_ready(timeout=_PROXY_WAIT_S)
    except Exception as exc:  # grpc's FutureTimeoutError, or a connection refused
        storage.close()
        raise StorageError(
            f"no storage proxy answers at {host}:{port} ({type(exc).__name__}); start one there with "
            f"`hpsearch storage-proxy --storage URL --host {host} --port {port}`"
        ) from exc
    return storage


# The trial system attribute that carries a beat through the storage proxy, whose protocol has none.
_BEAT = "hpsearch:heartbeat"


class _ProxyWithHeartbeat(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's storage proxy with Optuna's heartbeat protocol: each beat is the worker's clock time
    stored on the trial, so the machines of a fleet must agree on the time to within the grace
    (any NTP-synchronised clock does)."""

    def __init__(self, host: str, port: int, heartbeat: Heartbeat) -> None:
        super().__init__(host=host, port=port)
        self._beat = heartbeat

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, _BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        # As in Optuna's own storages, a trial that never beat is not taken for dead.
        return [
            t._trial_id
            for t in running
            if _BEAT in t.system_attrs and now - float(t.system_attrs[_BEAT]) > self._beat.grace
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self._beat.interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None  # hpsearch fails and continues stale trials itself


def _study_names(storage: BaseStorage) -> list[str]:
    return sorted(s.study_name for s in storage.get_all_studies())
