"""Per-trial cost of hpsearch's storage back ends at 1, 4 and 16 worker processes, and their ratios to SQLite.

Each configuration (a back end and a number of workers) fills one study of trivial trials through
hpsearch's own worker loop, ``hpsearch.study.run_study``: per trial it takes the study's lock, fails
lost trials, asks Optuna for a trial, records the worker, reports each of 3 epochs, writes the trial's
record and beats a heartbeat. A trial trains LeNet for 3 one-batch epochs on 64 images of the built-in
``synthetic`` dataset, so that most of what is timed is the storage. The back ends:

* ``sqlite``: a new SQLite file per configuration (WAL mode, an ``flock`` study lock);
* ``postgresql``: a new database per configuration on the server that ``PGHOST``, ``PGPORT``,
  ``PGUSER``, ``PGPASSWORD`` and ``PGDATABASE`` name (``pg_virtualenv`` sets them), dropped at the end;
  skipped, with a note, where they are unset;
* ``grpc/sqlite`` and ``grpc/postgresql``: the same kinds of new database behind Optuna's gRPC storage
  proxy, one ``hpsearch storage-proxy`` process per configuration;
* ``in-memory``, the baseline: each worker with its own ``optuna.storages.InMemoryStorage`` study and an
  equal share of the trials, i.e. the same trials' compute, checkpoints and CPU sharing, no database.

The workers are separate processes, started once and used by every configuration. They are forked
from a server process (multiprocessing's ``forkserver``) that has imported torch, Optuna and hpsearch
and done nothing else, so sixteen of them start in seconds rather than importing torch sixteen times.
Each uses one torch thread and runs two warm-up trials in an SQLite study of its own, so that what a
process does once is not timed. For one configuration the study is created first; then N workers
open it and wait at a barrier, and the wall time runs from the barrier to the last worker's return,
each worker calling ``run_study`` until the study's ``n_trials`` are taken. Afterwards the study must
hold exactly that many COMPLETE trials and none RUNNING, which also checks that racing workers stop at
the budget; anything else is an error and a non-zero exit.

"storage ms/trial" is what the storage adds to each trial a worker runs: wall × workers ÷ trials for
the back end, less the same for the in-memory baseline at the same number of workers. With more
workers than CPU cores every worker also waits for a core; the baseline waits the same, so what is
left is the storage, contention for its locks and its server included.

    pg_virtualenv -t .venv/bin/python benchmarks/storage.py --quick
    .venv/bin/python benchmarks/storage.py --workers 1,2 --backends sqlite,grpc/sqlite --trials 100
    pg_virtualenv -t .venv/bin/python benchmarks/storage.py --json storage.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from multiprocessing.context import ForkServerProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy

MEMORY = "in-memory"
BACKENDS = ("sqlite", "postgresql", "grpc/sqlite", "grpc/postgresql")
PG_ENV = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE")
STUDY_NAME = "storage-bench"
STUDY_TOML = """\
[study]
description = "storage benchmark: trivial trials, so that the storage is what is timed"
n_trials = {n_trials}
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
train_limit = 64
test_limit = 64
batch_size = 64

[model]
name = "lenet"

[optimizer]
name = "sgd"
lr = {{ low = 0.001, high = 0.1, log = true }}

[train]
epochs = 3
"""
# What every worker needs, imported once by the process that the workers are forked from.
PRELOAD = [
    "torch",
    "torch._dynamo",  # imported by the first optimizer step: seconds
    "optuna",
    "optuna.storages._rdb.storage",
    "alembic.command",  # these four: by Optuna's first RDB storage of a process
    "alembic.migration",
    "alembic.script",
    "sqlalchemy.orm",
    "psycopg",
    "hpsearch.checkpoint",
    "hpsearch.dashboard",  # by the creation of a study
    "hpsearch.spec",
    "hpsearch.storage",
    "hpsearch.study",
]
# Trials per configuration: by default; with --quick, this many per worker and at least QUICK_MIN.
FULL_TRIALS, QUICK_PER_WORKER, QUICK_MIN = 160, 2, 16
# Seconds a proxy may take to start (it imports torch), and a configuration to run.
PROXY_START_S = 120
CONFIG_LIMIT_S = 900


@dataclass(frozen=True)
class Job:
    """Work for one worker. ``run``: fill the study of ``spec`` at ``url`` (with the others of its
    configuration), or run ``share`` trials in a study of its own in memory where ``url`` is None;
    ``create``: create that study; ``count``: its trials by state."""

    kind: str
    spec: str
    url: str | None
    workers: int = 1
    share: int | None = None


@dataclass
class Result:
    backend: str
    workers: int
    trials: int
    wall_s: float
    trials_per_s: float = 0.0
    storage_ms_per_trial: float | None = None
    vs_sqlite: float | None = None
    states: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trials_per_s = self.trials / self.wall_s

    @property
    def per_worker_trial_s(self) -> float:
        """Seconds a worker spends per trial it runs."""
        return self.wall_s * self.workers / self.trials


class BenchmarkError(Exception):
    """A configuration could not be run or did not end as it must; the message says which."""


# Worker processes: every function here runs in one.


def _worker(
    index: int, warm_spec: str, jobs: Queue[Job | None], results: Queue[Any], barriers: dict[int, Barrier]
) -> None:
    """Warm up, then do each job sent until None; every job is answered with one message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the parent, which stops the workers
    import torch

    from hpsearch.checkpoint import Checkpoints
    from hpsearch.spec import load_spec
    from hpsearch.study import open_study, run_study

    torch.set_num_threads(1)
    _quiet()
    # Two trials in an SQLite file of its own: the data is loaded, and what a process does once (the
    # first optimizer step, Optuna's first RDB storage and ORM queries) is not part of any timing.
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(warm_spec)
        study = open_study(spec, f"sqlite:///{tmp}/warm-up.db")
        _quiet()
        run_study(spec, study, device="cpu", checkpoints=Checkpoints(Path(tmp)), n_trials=2)
        _close(study._storage)
    results.put(("ready", index, None))
    tasks = {"run": _run, "create": _create, "count": _count}
    while (job := jobs.get()) is not None:
        try:
            results.put(("done", index, tasks[job.kind](job, barriers[job.workers])))
        except Exception as exc:
            results.put(("error", index, f"{type(exc).__name__}: {exc}"))


def _quiet() -> None:
    """No warnings that Optuna's heartbeat and storage proxy are experimental: they are what is timed."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)


def _in_memory(spec: Any) -> Any:
    import optuna

    return optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        study_name=spec.name,
        direction=spec.direction,
        sampler=spec.sampler(),
        pruner=spec.pruner(),
    )


def _run(job: Job, barrier: Barrier) -> dict[str, int]:
    """Open the study, wait for the configuration's other workers, and run ``run_study``."""
    from hpsearch.checkpoint import Checkpoints
    from hpsearch.spec import load_spec
    from hpsearch.study import open_study, run_study

    try:
        spec = load_spec(job.spec)
        study = _in_memory(spec) if job.url is None else open_study(spec, job.url)
        _quiet()  # open_study sets Optuna's verbosity
    except BaseException:
        barrier.abort()  # the others, and the parent, stop waiting
        raise
    try:
        barrier.wait()
        # The study's folder; in memory, every worker has a study, with trial numbers, of its own.
        folder = Path(job.spec).parent / "checkpoints"
        checkpoints = Checkpoints(folder if job.url is not None else folder / str(os.getpid()))
        summary = run_study(spec, study, n_trials=job.share, device="cpu", checkpoints=checkpoints)
        return dict(summary.states)
    finally:
        _close(study._storage)


def _create(job: Job, _: Barrier) -> None:
    """Create the study before the workers open it: table creation is not part of what is timed."""
    from hpsearch.spec import load_spec
    from hpsearch.study import open_study

    assert job.url is not None
    _close(open_study(load_spec(job.spec), job.url)._storage)


def _count(job: Job, _: Barrier) -> dict[str, int]:
    """The stored study's trials by state, read from the database itself, read-only."""
    import optuna

    from hpsearch.storage import open_readonly

    assert job.url is not None
    storage = open_readonly(job.url)
    try:
        states: dict[str, int] = {}
        for t in optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials(deepcopy=False):
            state = t.state.name.lower()
            states[state] = states.get(state, 0) + 1
        return states
    finally:
        _close(storage)


def _close(storage: Any) -> None:
    """Give back a storage's database connections or proxy channel."""
    backend = getattr(storage, "_backend", storage)
    engine = getattr(backend, "engine", None)
    if engine is not None:
        engine.dispose()
    elif hasattr(backend, "close"):
        backend.close()


class Pool:
    """``size`` worker processes, started once. ``run`` times a configuration on the first N of them;
    ``ask`` has the first one do a job that is not timed."""

    def __init__(self, size: int, counts: list[int], warm_spec: Path) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", *PRELOAD])
        self.results: Queue[Any] = ctx.Queue()
        self.barriers = {n: ctx.Barrier(n + 1) for n in {1, *counts}}
        self.jobs: list[Queue[Job | None]] = [ctx.Queue() for _ in range(size)]
        self.procs: list[ForkServerProcess] = [
            ctx.Process(
                target=_worker,
                args=(i, str(warm_spec), self.jobs[i], self.results, self.barriers),
                daemon=True,
            )
            for i in range(size)
        ]
        for p in self.procs:
            p.start()

    def wait(self) -> None:
        """Return once every worker has warmed up."""
        for _ in self.procs:
            self._next("starting")

    def ask(self, job: Job) -> Any:
        self.jobs[0].put(job)
        kind, _, payload = self._next(f"doing {job.kind}")
        if kind == "error":
            raise BenchmarkError(f"{job.kind} {job.spec}: {payload}")
        return payload

    def run(self, jobs: list[Job]) -> tuple[float, dict[str, int]]:
        """Wall seconds from the barrier to the last worker's return, and the trials run by state."""
        for i, job in enumerate(jobs):
            self.jobs[i].put(job)
        errors: list[str] = []
        try:
            self.barriers[len(jobs)].wait(timeout=CONFIG_LIMIT_S)
        except threading.BrokenBarrierError:
            errors.append("not every worker could open the study")
        start = time.perf_counter()
        states: dict[str, int] = {}
        for _ in jobs:
            kind, index, payload = self._next("running trials")
            if kind == "error":
                errors.append(f"worker {index}: {payload}")
            else:
                for state, k in payload.items():
                    states[state] = states.get(state, 0) + k
        wall = time.perf_counter() - start
        if errors:
            raise BenchmarkError("; ".join(errors))
        return wall, states

    def _next(self, doing: str) -> tuple[str, int, Any]:
        deadline = time.monotonic() + CONFIG_LIMIT_S
        while time.monotonic() < deadline:
            try:
                message: tuple[str, int, Any] = self.results.get(timeout=1.0)
                return message
            except queue.Empty:
                dead = [i for i, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    raise BenchmarkError(f"worker {dead[0]} died while {doing}") from None
        raise BenchmarkError(f"no word from the workers in {CONFIG_LIMIT_S} s while {doing}")

    def close(self, finished: bool = True) -> None:
        """Let the workers end; stop them at once where the run did not finish (an error, a Ctrl-C)."""
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            if finished:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# Databases and proxies.


def postgres_url() -> str | None:
    """The URL of the PostgreSQL server that the environment names (``pg_virtualenv`` sets it), or None."""
    env = {k: os.environ.get(k) or None for k in PG_ENV}
    host = env["PGHOST"]
    if not (host and env["PGUSER"] and env["PGDATABASE"]):
        return None
    on_socket = host.startswith("/")  # a folder holding the server's Unix socket
    return sqlalchemy.engine.URL.create(
        "postgresql+psycopg",
        username=env["PGUSER"],
        password=env["PGPASSWORD"],
        host=None if on_socket else host,
        port=int(env["PGPORT"]) if env["PGPORT"] and not on_socket else None,
        database=env["PGDATABASE"],
        query={"host": host, "port": env["PGPORT"] or "5432"} if on_socket else {},
    ).render_as_string(hide_password=False)


class Postgres:
    """New databases on the server at ``url``, all dropped by ``drop_all``; only those made here are."""

    def __init__(self, url: str) -> None:
        self.url = sqlalchemy.engine.make_url(url)
        self.admin = sqlalchemy.create_engine(
            self.url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.NullPool
        )
        self.made: list[str] = []
        with self.admin.connect() as conn:
            self.server_version = str(conn.exec_driver_sql("SHOW server_version").scalar())

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"hpsearch_bench_{secrets.token_hex(4)}"
        try:
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise BenchmarkError(f"cannot create a database (the role needs CREATEDB): {exc}") from None
        self.made.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.admin.connect() as conn:
            while self.made:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.made.pop()}" WITH (FORCE)')
        self.admin.dispose()


class Proxy:
    """``hpsearch storage-proxy`` in front of ``db_url`` on a free port of 127.0.0.1. The database URL
    goes through the environment, as ``hpsearch run`` passes it, so that ``ps`` shows no password."""

    _ports: ClassVar[set[int]] = set()

    def __init__(self, db_url: str, log: Path) -> None:
        self.db_url, self.log = db_url, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stopping = False

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process; ``wait`` until it serves."""
        while (port := _free_port()) in Proxy._ports:
            pass
        Proxy._ports.add(port)
        self.port, self.stopping = port, False
        script = Path(sys.executable).with_name("hpsearch")
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "hpsearch"]
        cmd += ["storage-proxy", "--host", "127.0.0.1", "--port", str(port)]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                cmd,
                env={**os.environ, "HPSEARCH_STORAGE": self.db_url},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def wait(self, tries: int = 3) -> None:
        """Return once the proxy listens (it says "serving"); start it again on another port if its
        port was taken meanwhile."""
        assert self.proc is not None
        deadline = time.monotonic() + PROXY_START_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(line.startswith("serving") for line in self.log.read_text().splitlines()):
                return
            time.sleep(0.05)
        self.stop()
        said = self.log.read_text().strip()
        if tries > 1 and "pick another --port" in said:
            self.start()
            return self.wait(tries - 1)
        raise BenchmarkError(f"the storage proxy for {self.log.parent.name} did not start: {said[-500:]}")

    def stop(self, wait: bool = True) -> None:
        """SIGTERM, as a user stops it; with ``wait``, until it has ended."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if not self.stopping:
            self.proc.send_signal(signal.SIGTERM)
            self.stopping = True
        if wait:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Configurations.


@dataclass
class Config:
    """One back end at one number of workers: its study file, new database and proxy, in ``folder``."""

    backend: str
    workers: int
    trials: int
    folder: Path
    db_url: str | None = None  # None: in memory
    proxy: Proxy | None = None

    @property
    def spec(self) -> Path:
        return self.folder / f"{STUDY_NAME}.toml"

    @property
    def url(self) -> str | None:
        """What the workers open."""
        return self.proxy.url if self.proxy is not None else self.db_url

    def prepare(self, pg: Postgres | None) -> None:
        """Write the study file and make the database; start the proxy (``proxy.wait`` for it)."""
        self.folder.mkdir(parents=True)
        self.spec.write_text(STUDY_TOML.format(n_trials=self.trials))
        if self.backend == MEMORY:
            return
        if self.backend.endswith("postgresql"):
            assert pg is not None
            self.db_url = pg.new_database()
        else:
            self.db_url = f"sqlite:///{self.folder / 'study.db'}"
        if self.backend.startswith("grpc/"):
            self.proxy = Proxy(self.db_url, self.folder / "proxy.log")
            self.proxy.start()

    def run(self, pool: Pool) -> Result:
        """Fill the study with ``workers`` workers, timed; check that it holds exactly its trials."""
        n, trials, spec = self.workers, self.trials, str(self.spec)
        if self.url is None:
            shares = [trials // n + (i < trials % n) for i in range(n)]
            wall, states = pool.run([Job("run", spec, None, n, share) for share in shares])
        else:
            pool.ask(Job("create", spec, self.url))
            wall, _ = pool.run([Job("run", spec, self.url, n)] * n)
            states = pool.ask(Job("count", spec, self.db_url))  # as stored
        if states.get("complete", 0) != trials or states.get("running", 0):
            raise BenchmarkError(
                f"{self.backend}, {n} workers: the study holds trials {states}, not exactly {trials} complete"
            )
        return Result(self.backend, n, trials, wall, states=states)


# The table and the record.


def score(results: list[Result]) -> None:
    """Fill in each result's storage ms per trial and its ratio to SQLite at the same number of workers."""
    base = {r.workers: r for r in results if r.backend == MEMORY}
    sqlite_runs = {r.workers: r for r in results if r.backend == "sqlite"}
    for r in results:
        if r.backend != MEMORY and r.workers in base:
            r.storage_ms_per_trial = 1000 * (r.per_worker_trial_s - base[r.workers].per_worker_trial_s)
        if r.workers in sqlite_runs:
            r.vs_sqlite = r.wall_s / sqlite_runs[r.workers].wall_s


def table(results: list[Result]) -> str:
    head = f"{'back end':<16} {'workers':>7} {'trials':>6} {'wall s':>7} {'trials/s':>8} "
    head += f"{'storage ms/trial':>16} {'vs sqlite':>9}"
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate((MEMORY, *BACKENDS))}
    for r in sorted(results, key=lambda r: (order[r.backend], r.workers)):
        ms = "-" if r.storage_ms_per_trial is None else f"{r.storage_ms_per_trial:.1f}"
        ratio = "-" if r.vs_sqlite is None else f"{r.vs_sqlite:.2f}x"
        lines.append(
            f"{r.backend:<16} {r.workers:>7} {r.trials:>6} {r.wall_s:>7.2f} {r.trials_per_s:>8.1f} "
            f"{ms:>16} {ratio:>9}"
        )
    return "\n".join(lines)


def notes(results: list[Result], cpus: int, load: float) -> list[str]:
    out = []
    one = next((r for r in results if r.backend == MEMORY and r.workers == 1), None)
    if one is not None:
        out.append(
            f"compute per trial: {1000 * one.per_worker_trial_s:.1f} ms (in-memory storage, 1 worker, 1 "
            "thread: LeNet, 3 epochs of one 64-image batch, 2 checkpoints, validation and test)"
        )
    out += [
        "storage ms/trial = wall × workers ÷ trials (a worker's time per trial it runs), less the same "
        "for in-memory at the same number of workers (compute, and waiting for a core)",
        "vs sqlite = wall ÷ SQLite's wall at the same number of workers (above 1: slower than SQLite)",
    ]
    crowded = sorted({r.workers for r in results if r.workers > cpus})
    if crowded:
        out.append(
            f"{' and '.join(map(str, crowded))} workers on {cpus} CPU cores: those rows measure contention "
            "(for the cores, the storage's locks and its server), not parallel speed-up"
        )
    if load > cpus / 2:
        out.append(
            f"load average {load:.1f} on {cpus} cores as this started: other processes shared the CPU, so "
            "the figures vary more than on a quiet machine"
        )
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def versions(pg: Postgres | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("hpsearch", "optuna", "sqlalchemy", "torch", "psycopg", "grpcio"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    out["sqlite"] = sqlite3.sqlite_version
    if pg is not None:
        out["postgresql"] = pg.server_version
    return out


# The command.


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("worker counts must be 1 or more")
    return counts


def _backends(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown back end {unknown[0] if unknown else text!r}; valid: {', '.join(BACKENDS)}"
        )
    return [b for b in BACKENDS if b in names]


def _open_postgres(backends: list[str]) -> tuple[Postgres | None, list[str]]:
    """The server for the PostgreSQL back ends, or None and the back ends without them."""
    if not any(b.endswith("postgresql") for b in backends):
        return None, backends
    url = postgres_url()
    if url is None:
        print(
            f"note: PostgreSQL skipped: {', '.join(PG_ENV)} are unset; run under `pg_virtualenv -t` "
            "for a throw-away server",
            file=sys.stderr,
        )
        return None, [b for b in backends if not b.endswith("postgresql")]
    try:
        return Postgres(url), backends
    except sqlalchemy.exc.SQLAlchemyError as exc:
        sys.exit(f"error: cannot reach the PostgreSQL server of PGHOST and PGPORT: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_PER_WORKER} trials per worker, at least {QUICK_MIN}, instead of {FULL_TRIALS} per "
        "configuration: 16, 16 and 32 at 1, 4 and 16 workers, under 2 minutes on 2 idle cores",
    )
    parser.add_argument(
        "--trials", type=int, help=f"trials per configuration (default {FULL_TRIALS}; overrides --quick)"
    )
    parser.add_argument(
        "--workers",
        type=_counts,
        default=[1, 4, 16],
        help="worker process counts, comma-separated (default 1,4,16)",
    )
    parser.add_argument(
        "--backends",
        type=_backends,
        default=list(BACKENDS),
        help=f"back ends to time, comma-separated (default all: {','.join(BACKENDS)}); the in-memory "
        "baseline always runs",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the results, the machine and the versions to PATH",
    )
    args = parser.parse_args()
    if args.trials is not None and args.trials < max(args.workers):
        parser.error(f"--trials {args.trials} is fewer than the {max(args.workers)} workers")
    budget = {
        n: args.trials or (max(QUICK_MIN, QUICK_PER_WORKER * n) if args.quick else FULL_TRIALS)
        for n in args.workers
    }
    cpus = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    pg, backends = _open_postgres(args.backends)
    results: list[Result] = []
    pool: Pool | None = None
    configs: list[Config] = []
    finished = False
    try:
        with tempfile.TemporaryDirectory(prefix="hpsearch-storage-bench-") as tmp_name:
            tmp = Path(tmp_name)
            try:
                start = time.perf_counter()
                for n in args.workers:
                    for backend in (MEMORY, *backends):
                        configs.append(
                            Config(backend, n, budget[n], tmp / f"{backend.replace('/', '-')}-{n}")
                        )
                        configs[-1].prepare(pg)  # the proxies start while the workers do
                warm = tmp / "warm-up" / f"{STUDY_NAME}.toml"
                warm.parent.mkdir()
                warm.write_text(STUDY_TOML.format(n_trials=2))
                pool = Pool(max(args.workers), args.workers, warm)
                pool.wait()
                proxies = [c.proxy for c in configs if c.proxy is not None]
                for proxy in proxies:
                    proxy.wait()
                print(
                    f"started {max(args.workers)} worker processes and {len(proxies)} storage proxies in "
                    f"{time.perf_counter() - start:.1f} s (not timed)",
                    file=sys.stderr,
                )
                for config in configs:
                    results.append(config.run(pool))
                    print(
                        f"  {config.backend:<16} {config.workers:>2} workers: {config.trials:>3} trials in "
                        f"{results[-1].wall_s:6.2f} s",
                        file=sys.stderr,
                    )
                finished = True
            finally:
                if pool is not None:
                    pool.close(finished)
                stopping = [c.proxy for c in configs if c.proxy is not None]
                for proxy in stopping:  # idle, a proxy takes no CPU: they are all stopped here, together
                    proxy.stop(wait=False)
                for proxy in stopping:
                    proxy.stop()
                if pg is not None:
                    pg.drop_all()
    except BenchmarkError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the workers, proxies and databases of this run are gone\n")
        sys.exit(130)
    score(results)
    print(table(results))
    for line in notes(results, cpus, load):
        print(f"  {line}")
    if args.json:
        record = {
            "mode": "trials" if args.trials else "quick" if args.quick else "full",
            "workers": args.workers,
            "load_average": {"start": round(load, 2), "end_with_this_run": round(os.getloadavg()[0], 2)},
            "machine": machine(),
            "versions": versions(pg),
            "results": [{**asdict(r), "per_worker_trial_s": r.per_worker_trial_s} for r in results],
            "notes": notes(results, cpus, load),
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
