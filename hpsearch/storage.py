"""Where studies live: storage URL resolution and the Optuna storage and artifact store behind it."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import sqlalchemy
from optuna.artifacts import FileSystemArtifactStore

DEFAULT_STORAGE = "sqlite:///hpsearch.db"
ENV_STORAGE = "HPSEARCH_STORAGE"
ENV_ARTIFACTS = "HPSEARCH_ARTIFACTS"


class StorageError(Exception):
    """The storage cannot be opened; the message says which URL and why."""


def resolve_url(url: str | None) -> str:
    """``--storage`` if given, else ``$HPSEARCH_STORAGE``, else an SQLite file in the working dir."""
    return url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE


def open_storage(url: str | None = None, *, heartbeat: bool = False) -> optuna.storages.RDBStorage:
    """Open (and create if needed) the relational storage behind ``url``.

    SQLite files are switched to write-ahead logging and given a long busy timeout, so that the
    dashboard can read while workers write without "database is locked" errors. With
    ``heartbeat`` the storage marks trials of a killed worker as failed, so a rerun resumes cleanly.
    """
    url = resolve_url(url)
    engine_kwargs: dict[str, object] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
        path = sqlalchemy.engine.make_url(url).database
        if path and path != ":memory:" and not Path(path).parent.exists():
            raise StorageError(
                f"storage {url}: folder {Path(path).parent} does not exist; create it or pick "
                "another --storage"
            )
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs,
            heartbeat_interval=30 if heartbeat else None, grace_period=90 if heartbeat else None,
        )  # fmt: skip
    except Exception as exc:  # SQLAlchemy/driver errors: the user's URL is wrong or unreachable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {_shown(url)}: {first}") from exc
    if url.startswith("sqlite"):
        with storage.engine.connect() as conn:
            # The mode is stored in the file: set it once, so a read-only copy stays readable.
            if conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal":
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return storage


def _shown(url: str) -> str:
    """``url`` with its password masked, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def open_existing_storage(url: str | None = None) -> optuna.storages.RDBStorage:
    """``open_storage`` for commands that only read: a missing SQLite file is an error.

    Opening a missing SQLite file would create an empty database and hide a typo in ``--storage``.
    """
    url = resolve_url(url)
    if url.startswith("sqlite"):
        path = sqlalchemy.engine.make_url(url).database
        if path and path != ":memory:" and not Path(path).is_file():
            raise StorageError(
                f"no studies in {url}: {path} does not exist; pass --storage or set ${ENV_STORAGE}"
            )
    return open_storage(url)


def load_stored_study(name_or_path: str, url: str | None = None) -> optuna.Study:
    """The stored study ``name_or_path`` (a study file's path stands for its stem)."""
    name = Path(name_or_path).stem if name_or_path.endswith(".toml") else name_or_path
    storage = open_existing_storage(url)
    names = sorted(s.study_name for s in storage.get_all_studies())
    if name not in names:
        raise StorageError(
            f"no study named {name!r} in {resolve_url(url)}; studies there: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=name, storage=storage)


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
