"""The ``hpsearch`` command: a thin shell over the package's functions."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import optuna
import torch

from hpsearch import objectives
from hpsearch.datasets import DATASETS, load_dataset
from hpsearch.errors import HpsearchError
from hpsearch.models import MODELS
from hpsearch.optim import OPTIMIZERS, SCHEDULERS
from hpsearch.record import TrialRecord, study_task
from hpsearch.search import PRUNERS, SAMPLERS
from hpsearch.spec import SpecError, StudySpec, list_studies, load_spec
from hpsearch.storage import ENV_STORAGE, resolve_url
from hpsearch.train import Progress, resolve_device


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose ``HpsearchError`` (a user's mistake) ends it with one line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HpsearchError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def interruptible(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C or SIGTERM, also while starting up, ends the command with one line and exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM (a scheduler, `kill`, a container stopping) takes the same path as Ctrl-C.
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            clear = "\n" if sys.stderr.isatty() else ""  # past a progress line
            click.echo(
                f"{clear}interrupted: finished trials and the running trial's checkpoint are kept; "
                "run the same command to resume",
                err=True,
            )
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


storage_option = click.option(
    "--storage",
    envvar=ENV_STORAGE,
    default=None,
    metavar="URL",
    help=f"Optuna storage URL (default: ${ENV_STORAGE}, else sqlite:///hpsearch.db here). "
    "PostgreSQL: postgresql+psycopg://user:pass@host/db.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to train: auto (CUDA when present), cpu, cuda or cuda:N.",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, exists=True),
    envvar="HPSEARCH_DATA_DIR",
    default=None,
    help="Folder holding the dataset files (default: $HPSEARCH_DATA_DIR, "
    "the cache, /usr/share/datasets, then a download).",
)
TABLE_FORMATS = {".md": "md", ".markdown": "md", ".json": "json"}  # by the output's extension; else csv


def table_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output FILE`` and ``-f/--format``, for a command that writes a table (``table_format``)."""
    fn = click.option(
        "-f",
        "--format",
        "fmt",
        type=click.Choice(["csv", "md", "json"]),
        default=None,
        help="Table format (default: from the output's extension, else csv).",
    )(fn)
    return click.option(
        "-o",
        "--output",
        default="-",
        show_default=True,
        metavar="FILE",
        help="File to write the table to (atomically); - is stdout.",
    )(fn)


def table_format(fmt: str | None, output: str) -> str:
    """The format ``-f`` names, else the one ``-o``'s extension implies, else csv."""
    return fmt or TABLE_FORMATS.get(Path(output).suffix.lower(), "csv")


study_option = click.option(
    "--study",
    "study_name",
    required=True,
    metavar="NAME|PATH",
    help="Study name (studies/NAME.toml) or path to a study file.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpsearch")
def main() -> None:
    """Hyperparameter search for image classifiers, built on Optuna.

    \b
    hpsearch list                              what can be searched, and the bundled studies
    hpsearch plan --study quickstart           what a study will cost, before running it
    hpsearch run --study quickstart            run (or resume) a study
    hpsearch export --study quickstart         best configurations as a CSV table
    hpsearch best --study quickstart           the best trial as a runnable study file
    hpsearch fork --study quickstart --to NEW.toml  a new study from an edited file, with the trials that fit
    hpsearch report --study quickstart -o DIR  figures comparing the optimizers
    hpsearch lr-find --study quickstart        a learning rate from a range test, as a plot
    hpsearch verify --study quickstart         retrain the best with fresh seeds: real or luck?
    hpsearch predict DIR photo.png             classify images with a model verify --save kept
    hpsearch dashboard                         browse studies in optuna-dashboard
    """
    # Optuna flags features such as the heartbeat and grouped TPE as experimental on every use;
    # they are deliberate choices here, so the warnings are only noise for a user.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@main.command()
@study_option
@storage_option
@click.option(
    "--n-trials",
    type=click.IntRange(min=1),
    default=None,
    help="Run this many more trials (default: fill the study up to its n_trials).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop starting new trials after this many seconds.",
)
@device_option
@data_dir_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes sharing the study (default: one per visible GPU, else 1); --n-trials is "
    "split between them. With several GPUs each worker gets its own; on the CPU they share the cores.",
)
@click.option(
    "--pack",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train up to K trials at once as one batched model, where they share the network, data and "
    "batch size (each still its own trial, with its own optimizer settings, reports and pruning). "
    "Pays on a GPU with small networks; see the README's speed section for when.",
)
@click.option(
    "--warm-from",
    metavar="OTHER_STUDY",
    default=None,
    help="Run the best complete trials of another study in the same storage first: those whose values "
    "fit this study's space, with the values of its searched parameters (the rest are sampled).",
)
@click.option(
    "--warm-top",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="How many of OTHER_STUDY's best trials --warm-from considers (default: 5).",
)
@interruptible
@user_errors
def run(
    study_name: str,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    device: str,
    data_dir: str | None,
    workers: int | None,
    pack: int,
    warm_from: str | None,
    warm_top: int | None,
) -> None:
    """Run or resume a study: sample, train, report each epoch, prune.

    Every trial writes a checkpoint after each epoch. Stopping (Ctrl-C, SIGTERM) keeps it, and
    running the same command again resumes the study, that trial from its last epoch; a trial
    whose worker was killed is continued the same way by the next worker. The study's n_trials is
    the total of every worker on every machine. With --workers N, N processes share the one study:
    one per GPU, or several small nets on one GPU or on the CPU cores. On several machines, run
    `hpsearch run` on each against one PostgreSQL --storage URL, or a grpc:// URL served by
    `hpsearch storage-proxy`. The study file's [[study.enqueue]] configurations run first, and with
    --warm-from the best configurations of another stored study. Examples:

    \b
        hpsearch run --study lenet-fashion --n-trials 20 --device cuda
        hpsearch run --study quickstart --workers 2
        hpsearch run --study lenet-fashion --pack 8 --device cuda
        hpsearch run --study alexnet-fashion --storage grpc://head-node:13000
        hpsearch run --study lenet-fashion --warm-from quickstart --warm-top 3
    """
    from hpsearch.checkpoint import Checkpoints
    from hpsearch.study import finished, open_study, run_study, warm_start

    spec = load_spec(study_name)
    if warm_top is not None and warm_from is None:
        raise click.UsageError("--warm-top goes with --warm-from OTHER_STUDY")
    # The other study, the device and the data are checked first, so a mistake there leaves no
    # empty study behind.
    warm_source = _warm_source(spec, warm_from, storage) if warm_from else None
    dev = resolve_device(device)
    gpus = torch.cuda.device_count() if dev.type == "cuda" and dev.index is None else 0
    workers = workers or max(1, gpus)
    data = load_dataset(spec.raw["data"]["name"], data_dir, str(dev) if workers == 1 else "cpu")
    spec.check_data(len(data.train_y), len(data.test_y))
    study = open_study(spec, storage)
    checkpoints = Checkpoints.of(spec.name, spec.study.checkpoints, resolve_url(storage))
    done = finished(study)
    click.echo(f"study {spec.name}: {spec.description}".rstrip(": "), err=True)
    if done:
        click.echo(f"resuming: {done} finished trials stored", err=True)
    if warm_source is not None:
        for line in warm_start(study, spec, warm_source, warm_top or 5).lines():
            click.echo(line, err=True)
    # Each trial's line already says why it failed; Optuna's own log would repeat it as a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    click.echo(f"checkpoints: {checkpoints.folder}", err=True)
    if workers > 1:
        pins = [f"cuda:{i % gpus}" for i in range(workers)] if gpus > 1 else [device] * workers
        _run_workers(pins, study_name, resolve_url(storage), n_trials, timeout, data_dir, pack)
        _best_summary(study)
        return
    summary = run_study(
        spec,
        study,
        n_trials=n_trials,
        timeout=timeout,
        device=device,
        data_dir=data_dir,
        progress=_epoch_bar,
        on_trial=_trial_line,
        checkpoints=checkpoints,
        pack=pack,
    )
    if not summary.ran:
        click.echo(
            "nothing to run: every configuration of the grid has been taken"
            if spec.enumerates
            else f"nothing to run: {finished(study)} finished trials reach n_trials = {spec.n_trials}; "
            "--n-trials N runs N more",
            err=True,
        )
    for line in summary.failure_lines():
        click.echo(line, err=True)
    _best_summary(study)
    if summary.all_failed:
        raise click.ClickException(f"every trial of this run failed ({summary.ran}); the reasons are above")


def _warm_source(spec: StudySpec, name: str, storage: str | None) -> optuna.Study:
    """The stored study ``--warm-from`` names, read-only; refused for a grid study, which runs
    exactly its grid."""
    from hpsearch.storage import load_stored_study

    if spec.enumerates:
        raise click.UsageError(
            f"--warm-from: {spec.name} is a grid search and runs every configuration of its grid already"
        )
    return load_stored_study(name, storage)


def _run_workers(
    devices: list[str],
    study_name: str,
    storage: str,
    n_trials: int | None,
    timeout: float | None,
    data_dir: str | None,
    pack: int = 1,
) -> None:
    """Run one child ``hpsearch run`` process per entry of ``devices`` on one study, each on its
    device; fail if any of them fails.

    On the CPU the children split the cores between them rather than each starting a thread per
    core. A signal to this process is passed on once, and each child ends its trial keeping its
    checkpoint; should this process be killed outright, the operating system stops the children.
    """
    workers = len(devices)
    cmd = [
        sys.executable,
        "-m",
        "hpsearch",
        "run",
        "--study",
        study_name,
        "--workers",
        "1",
        "--pack",
        str(pack),
    ]
    cmd += ["--timeout", str(timeout)] if timeout is not None else []
    cmd += ["--data-dir", data_dir] if data_dir else []
    shares: list[list[str]] = [[]] * workers
    if n_trials is not None:
        counts = [n_trials // workers + (i < n_trials % workers) for i in range(workers)]
        shares = [["--n-trials", str(k)] for k in counts]
    # The URL goes through the environment: on the command line `ps` would show its password.
    env = {**os.environ, ENV_STORAGE: storage}
    cores = len(os.sched_getaffinity(0))
    if resolve_device(devices[0]).type == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    # Children get their own session, so a terminal's Ctrl-C reaches only this process, which
    # forwards it once. Their stdout (each one's best trial) would repeat the summary below.
    procs = [
        subprocess.Popen(
            [*cmd, "--device", dev, *share],
            env=env,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        for dev, share in zip(devices, shares, strict=True)
        if share != ["--n-trials", "0"]
    ]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
        raise
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [str(code) for code in codes if code]
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(procs)} workers failed (exit status {', '.join(failed)})"
        )


def _stop_with_parent() -> None:
    """In a child, before it runs: be sent SIGTERM when the parent dies (Linux), so that no worker
    outlives a ``hpsearch run`` that was killed with SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _epoch_bar(number: int) -> Progress | None:
    """A progress line per trial, redrawn as batches and epochs finish (on a terminal only)."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(epoch: int, epochs: int, done: float, value: float | None) -> None:
        now = time.monotonic()
        if value is None and now - last[0] < 0.25:  # a redraw per check would flicker
            return
        last[0] = now
        width = 20
        filled = int(width * (epoch - 1 + done) / epochs)
        bar = "#" * filled + "-" * (width - filled)
        val = f" val {value:.4f}" if value is not None else ""
        click.echo(f"\rtrial {number:>4} [{bar}] epoch {epoch}/{epochs}{val}\x1b[K", err=True, nl=False)

    return show


def _trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    rec = TrialRecord.of(trial, study_task(study))
    state = trial.state.name.lower()
    value = " ".join(f"{v:.4g}" if abs(v) >= 1e4 else f"{v:.4f}" for v in trial.values or []) or "-"
    epochs, why = rec.epochs_run, rec.reason or ""
    secs = f"{rec.run_time_s:.2f}" if rec.run_time_s < 10 else f"{rec.run_time_s:.0f}"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    # On a terminal, clear the progress line this one replaces.
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    click.echo(
        f"{clear}trial {trial.number:>4} {state:<8} value {value} epochs {epochs} "
        f"{secs}s  {params}" + (f"  ({why})" if why and state != "complete" else ""),
        err=True,
    )


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _best_summary(study: optuna.Study) -> None:
    done = objectives.ranked(study)
    if not done:
        click.echo("no finished trial yet", err=True)
        return
    best = done[0]
    if len(study.directions) > 1:
        n = len(objectives.front(study))
        click.echo(
            f"{n} trial{'s' * (n != 1)} on the Pareto front (`hpsearch export` lists them); "
            "the best in the metric:"
        )
    click.echo(f"best trial {best.number}: value {objectives.first_value(best):.4f}")
    for key, value in best.params.items():
        click.echo(f"  {key} = {_fmt(value)}")
    task = study_task(study)
    test = TrialRecord.of(best, task).test
    if test is not None:
        click.echo(f"  test {task.metric}: {test:.4f}")


@main.command()
@study_option
@device_option
@data_dir_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes the study would run with (default as `run`: one per visible GPU, else 1). "
    "The study's time is divided by it; on the CPU each step is timed with one worker's share of the cores.",
)
@click.option(
    "--n-trials",
    type=click.IntRange(min=1),
    default=None,
    help="Estimate for this many trials instead of the file's n_trials.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Training steps timed per setting, after one warm-up step.",
)
@click.option(
    "--max-settings",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="Measure at most this many of the settings that change a step's cost (batch size, input "
    "size, model, optimizer), spread over all of them.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Time batches of at most N examples and scale the step time up to the batch size: a quick, "
    "rougher look at a large network on a slow device.",
)
@storage_option
@user_errors
def plan(
    study_name: str,
    device: str,
    data_dir: str | None,
    workers: int | None,
    n_trials: int | None,
    steps: int,
    max_settings: int,
    max_batch: int | None,
    storage: str | None,
) -> None:
    """Say what a study will cost before running it, measured on this machine.

    Prints the search space (every parameter, searched or fixed; the grid's size for a grid), the
    pruner's schedule (Hyperband's brackets and the epochs of their rungs, a median pruner's
    warm-up...), then puts one real batch of the study's data through the model, forward and
    backward, on --device: a model that cannot take the data (a fixed input size, the wrong number
    of channels) fails here, in one line that says what to change. It times a few training steps
    with the study's optimizer for each batch size, model and optimizer the study searches, and
    estimates the time of a trial and of the whole study (an upper bound: pruned trials stop early;
    where the pruner's schedule allows, the expected time with pruning too), and the disk that
    checkpoints take. Nothing is stored; --storage only says where checkpoints would go. Examples:

    \b
        hpsearch plan --study lenet-fashion --device cpu
        hpsearch plan --study alexnet-fashion --device cuda --workers 4
        hpsearch plan --study vgg-fashion --device cpu --max-batch 8 --max-settings 3
    """
    from hpsearch.plan import make_plan, render

    spec = load_spec(study_name)
    found = make_plan(
        spec,
        device=device,
        data_dir=data_dir,
        workers=workers,
        n_trials=n_trials,
        steps=steps,
        max_settings=max_settings,
        max_batch=max_batch,
        storage=storage,
    )
    click.echo(render(found))


@main.command(name="storage-proxy")
@storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(1, 65535), default=13000, show_default=True)
@interruptible
@user_errors
def storage_proxy(storage: str | None, host: str, port: int) -> None:
    """Serve a study database to many workers through Optuna's gRPC storage proxy.

    This one process holds the database connections; workers on any machine pass
    --storage grpc://HOST:PORT and hold none, so a fleet of hundreds does not exhaust the
    database's connections. Runs until stopped (Ctrl-C, SIGTERM). Example:

    \b
        hpsearch storage-proxy --storage postgresql+psycopg://u:p@db/hpsearch --host 0.0.0.0
        hpsearch run --study alexnet-fashion --storage grpc://this-host:13000   # on each worker
    """
    from hpsearch.storage import serve_proxy, shown_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study the workers create

    def ready() -> None:
        click.echo(
            f"serving {shown_url(resolve_url(storage))} on {host}:{port}; "
            f"workers pass --storage grpc://{host}:{port}",
            err=True,
        )

    try:
        serve_proxy(storage, host, port, ready)
    except KeyboardInterrupt:  # how a server is stopped: Ctrl-C, or SIGTERM from a supervisor
        click.echo(f"storage proxy on {host}:{port} stopped", err=True)


@main.command(name="list")
def list_() -> None:
    """List the models, datasets, optimizers, schedulers, samplers, pruners and studies.

    Every name shown can be used in a study file. Example:

    \b
        hpsearch list
    """
    for title, registry in (
        ("models", MODELS),
        ("datasets", DATASETS),
        ("optimizers", OPTIMIZERS),
        ("schedulers", SCHEDULERS),
        ("samplers", SAMPLERS),
        ("pruners", PRUNERS),
    ):
        click.echo(f"{title}:")
        for name in registry.names():
            click.echo(f"  {name:<22} {registry.doc(name)}".rstrip())
    click.echo("studies:")
    for path in list_studies():
        try:
            desc = load_spec(path).description
        except SpecError as exc:
            desc = f"(invalid: {exc})"
        click.echo(f"  {path.stem:<22} {desc}".rstrip())


@main.command()
@storage_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 to share on the network).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@user_errors
def dashboard(storage: str | None, host: str, port: int) -> None:
    """Open optuna-dashboard on the studies' storage (the same one `run` uses).

    Each study's file is shown as its note; figures from `hpsearch report` appear as artifacts.
    Workers may keep writing while it runs. Example:

    \b
        hpsearch dashboard --port 8080   # then browse http://127.0.0.1:8080
    """
    from hpsearch.dashboard import serve
    from hpsearch.storage import open_readonly

    open_readonly(storage)  # a storage it cannot show is refused before the banner
    click.echo(f"dashboard on http://{host}:{port} (Ctrl-C to stop)", err=True)
    serve(storage, host=host, port=port)


@main.command()
@study_option
@storage_option
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    metavar="DIR",
    type=click.Path(file_okay=False, writable=True),
    help="Folder for the figures and report.md (created if missing).",
)
@user_errors
def report(study_name: str, storage: str | None, out_dir: str) -> None:
    """Write figures comparing the optimizers, and report.md, for a stored study.

    Learning curves, final validation metric against learning rate, optimization history,
    parameter importances and, for a multi-objective study, the Pareto front, as PNGs; they are
    also attached to the study as artifacts, so the dashboard shows them. Re-running replaces
    them. Example:

    \b
        hpsearch report --study quickstart -o reports/quickstart
    """

    from hpsearch.report import ReportError, attach, make_report
    from hpsearch.storage import StorageError, load_stored_study

    study = load_stored_study(study_name, storage)
    files = make_report(study, Path(out_dir))
    for path in files:
        click.echo(str(path))
    try:
        attach(study.study_name, storage, files)
    except (StorageError, ReportError) as exc:
        click.echo(f"not attached to the study: {exc}", err=True)
    else:
        click.echo(f"attached to study {study.study_name} as artifacts", err=True)


@main.command()
@click.option(
    "--study",
    "studies",
    multiple=True,
    metavar="NAME",
    help="Stored study name; repeat for several (a study file path means its name).",
)
@click.option("--all-studies", is_flag=True, help="Every study in the storage.")
@storage_option
@table_options
@click.option("--top", type=click.IntRange(min=1), default=None, help="Only the K best trials.")
@click.option(
    "--best-per",
    metavar="PARAM",
    default=None,
    help="The best trial per value of PARAM, e.g. optimizer.name or data.batch_size.",
)
@click.option(
    "--trials",
    "every_trial",
    is_flag=True,
    help="Every trial, pruned and failed ones too, with why it stopped.",
)
@user_errors
def export(
    studies: tuple[str, ...],
    all_studies: bool,
    storage: str | None,
    output: str,
    fmt: str | None,
    top: int | None,
    best_per: str | None,
    every_trial: bool,
) -> None:
    """Export a study's best configurations as a CSV, Markdown or JSON table.

    One study: its completed trials, best first, with optimizer, lr, momentum, weight decay,
    batch size, scheduler, epochs, validation and test metric, final training loss, run time and
    throughput, then every sampled parameter. A multi-objective study (``[study] objectives``):
    its Pareto front, best metric first, a column per objective. Several studies: one row per
    study with its best trial. Examples:

    \b
        hpsearch export --study quickstart --top 5 -o best.csv
        hpsearch export --study fashion-front --format md
        hpsearch export --study quickstart --best-per optimizer.name --format md
        hpsearch export --study quickstart --trials -o trials.json
        hpsearch export --all-studies -o studies.md
    """
    from hpsearch.export import best_per as best_per_table
    from hpsearch.export import best_table, load_studies, studies_table, trials_table, write_table

    if bool(studies) == all_studies:
        raise click.UsageError("give either --study NAME (repeatable) or --all-studies")
    several = all_studies or len(studies) > 1
    if several and (top or best_per or every_trial):
        raise click.UsageError("--top, --best-per and --trials take a single --study")
    if every_trial and (top or best_per):
        raise click.UsageError("--trials lists every trial; it takes no --top or --best-per")
    found = load_studies(storage, None if all_studies else studies)
    if several:
        table = studies_table(found)
    elif every_trial:
        table = trials_table(found[0])
    elif best_per:
        table = best_per_table(found[0], best_per).head(top)
    else:
        table = best_table(found[0], top)
    write_table(table, output, table_format(fmt, output))
    if output != "-":
        click.echo(f"wrote {len(table)} rows to {output}", err=True)


@main.command()
@click.option("--study", "study_name", required=True, metavar="NAME", help="Stored study name.")
@storage_option
@user_errors
def best(study_name: str, storage: str | None) -> None:
    """Print the best trial's configuration as a study file, every value fixed.

    A one-trial [study] with the original study seed (the same data split), then the [data],
    [model], [optimizer], [scheduler] and [train] sections of the best completed trial with no
    search tables and the trial's own seed: running it repeats the trial; edit it to train longer
    or to seed another study. Example:

    \b
        hpsearch best --study quickstart > quickstart-best.toml
        hpsearch run --study quickstart-best.toml
    """

    from hpsearch.export import best_toml, source_differs
    from hpsearch.storage import load_stored_study

    study = load_stored_study(study_name, storage)
    if study_name.endswith(".toml") and source_differs(study, Path(study_name)):
        click.echo(
            f"note: stored study {study.study_name!r} was made from a different file than "
            f"{study_name}; this is its best trial",
            err=True,
        )
    click.echo(best_toml(study), nl=False)


@main.command()
@click.option(
    "--study", "study_name", required=True, metavar="NAME", help="Stored study to fork (left as it is)."
)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="NEW.toml",
    help="The edited study file; the new study is named after its stem.",
)
@click.option(
    "--drop",
    type=click.IntRange(min=0),
    multiple=True,
    metavar="N",
    help="Leave out trial N of NAME (repeat for several).",
)
@storage_option
@user_errors
def fork(study_name: str, target: str, drop: tuple[int, ...], storage: str | None) -> None:
    """Start a new study from an edited study file with the trials of a stored one that fit it.

    Optuna cannot change a study's choices or delete a bad trial. Copy the study file, edit it
    (add a choice, narrow a range), and fork: the new study, in the same storage, starts with
    every complete and pruned trial of NAME that lies inside the new space and was not dropped,
    with its values, per-epoch reports and record; `hpsearch run` then continues it. It says how
    many trials it copied and why it left the others out. NAME itself is only read. Example:

    \b
        cp studies/quickstart.toml quickstart-rmsprop.toml   # add "rmsprop" to optimizer.name
        hpsearch fork --study quickstart --to quickstart-rmsprop.toml --drop 3
        hpsearch run --study quickstart-rmsprop.toml
    """
    from hpsearch.fork import fork_study

    spec = load_spec(target)
    for line in fork_study(study_name, spec, storage, drop).lines():
        click.echo(line)


@main.command(name="lr-find")
@study_option
@click.option(
    "--optimizer",
    default=None,
    metavar="NAME",
    help="One of the study's optimizers (default: its fixed optimizer, or its first choice).",
)
@click.option("--steps", type=click.IntRange(min=3), default=100, show_default=True, help="Rates to try.")
@click.option(
    "--start", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True, help="First lr."
)
@click.option(
    "--end", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="Last lr."
)
@click.option(
    "-o",
    "--out",
    metavar="PATH",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="The plot (PNG; default: lr-find-STUDY-OPTIMIZER.png here).",
)
@click.option(
    "--csv",
    "csv_path",
    metavar="PATH",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write every step's lr, loss and smoothed loss as CSV.",
)
@click.option(
    "--apply",
    "apply_to",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Also write a copy of the study file with this optimizer's lr search narrowed around the "
    "suggestion (default: STEM-lr.toml here); the study file itself is never changed.",
)
@click.option("--force", is_flag=True, help="Let --apply replace an existing file.")
@device_option
@data_dir_option
@user_errors
def lr_find(
    study_name: str,
    optimizer: str | None,
    steps: int,
    start: float,
    end: float,
    out: str | None,
    csv_path: str | None,
    apply_to: str | None,
    force: bool,
    device: str,
    data_dir: str | None,
) -> None:
    """Find a learning rate: the range test, on the study's network, data and optimizer.

    Trains the network from fresh weights, one batch per rate, raising the rate exponentially
    from --start to --end and stopping once the smoothed loss passes 4 times its best. The
    suggested rate is where the smoothed loss falls fastest (before its minimum): a good rate to
    train at, and the centre of a narrower lr range to search. Other searched values take the
    middle of their range (or their first choice), as printed. Writes a plot of loss against lr;
    --apply also writes a copy of the study file with that optimizer's lr range narrowed to
    suggestion/10 … suggestion×3. Examples:

    \b
        hpsearch lr-find --study lenet-fashion --optimizer adam
        hpsearch lr-find --study optimizers-regression --apply   # writes optimizers-regression-lr.toml
        hpsearch run --study optimizers-regression-lr.toml
    """

    from hpsearch import lrfind

    spec = load_spec(study_name)
    name = lrfind.pick_optimizer(spec, optimizer)
    target = None if apply_to is None else lrfind.apply_target(spec, apply_to)
    if target is not None:  # before the sweep: a file it cannot write is known now
        lrfind.check_apply(spec, name, target, force)
    plot_path = Path(out) if out else Path(f"lr-find-{spec.name}-{name}.png")
    for path in (plot_path, Path(csv_path) if csv_path else None, target):
        if path is not None and not path.parent.is_dir():
            raise click.ClickException(f"cannot write {path}: folder {path.parent} does not exist")
    dev = resolve_device(device)
    shown = _sweep_bar(steps) if sys.stderr.isatty() else None
    result = lrfind.lr_find(
        spec, name, steps=steps, start=start, end=end, device=dev, data_dir=data_dir, progress=shown
    )
    if shown:
        click.echo("\r\x1b[K", err=True, nl=False)
    lrfind.plot(result, plot_path)
    if csv_path:
        lrfind.write_curve(result, Path(csv_path))
    settings = ", ".join(f"{k}={_fmt(v)}" for k, v in result.settings.items())
    click.echo(f"lr range test of {spec.name} with {name}" + (f" ({settings})" if settings else ""))
    stopped = f" (stopped: {result.stop_reason})" if result.stop_reason else ""
    click.echo(f"  steps run      {result.steps} of {result.planned}{stopped}")
    click.echo(f"  lr swept       {result.lrs[0]:.3g} … {result.lrs[-1]:.3g}")
    click.echo(
        f"  minimum loss   {result.smoothed[result.best]:.4g} (smoothed) at lr {result.min_loss_lr:.3g}"
    )
    suggested = f"{result.suggestion:.3g}" if result.suggestion is not None else "none"
    click.echo(f"  suggested lr   {suggested}")
    click.echo(f"  plot           {plot_path}")
    if csv_path:
        click.echo(f"  curve          {csv_path}")
    if result.suggestion is not None and result.fall < lrfind.SMALL_FALL:
        click.echo(
            f"note: the smoothed loss fell only {result.fall:.0%} below where it began: the network has "
            "barely started to learn, so the suggestion says little; read the plot, or try more --steps",
            err=True,
        )
    if result.suggestion is None:
        raise click.ClickException(
            f"the smoothed loss never fell between lr {result.lrs[0]:.3g} and {result.lrs[-1]:.3g}, so "
            "there is no suggestion; see the plot, and try a lower --start or more --steps"
        )
    if target is not None:
        done = lrfind.apply(spec, name, result.suggestion, target, force)
        click.echo(f"wrote {done.path}: {done.key} = {done.after} (was {done.before})")
        if done.note:
            click.echo(f"  {done.note}")


def _sweep_bar(steps: int) -> Callable[[int, float, float], None]:
    """A progress line for the range test, redrawn as steps finish (on a terminal only)."""
    last = [0.0]

    def show(step: int, lr: float, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] < 0.25:
            return
        last[0] = now
        click.echo(f"\rstep {step}/{steps}  lr {lr:.3g}  smoothed loss {loss:.4g}\x1b[K", err=True, nl=False)

    return show


@main.command()
@click.option("--study", "study_name", required=True, metavar="NAME", help="Stored study name.")
@storage_option
@click.option(
    "--top", type=int, default=3, show_default=True, metavar="K", help="Retrain the K best complete trials."
)
@click.option(
    "--seeds",
    type=int,
    default=3,
    show_default=True,
    metavar="S",
    help="Retrain each configuration this many times, each with its own fresh seed.",
)
@device_option
@data_dir_option
@table_options
@click.option(
    "--save",
    metavar="DIR",
    default=None,
    help="Keep the best retrained network here (the best seed of the configuration with the best "
    "retrained mean) with its configuration, for `hpsearch predict DIR IMAGE...`.",
)
@user_errors
def verify(
    study_name: str,
    storage: str | None,
    top: int,
    seeds: int,
    device: str,
    data_dir: str | None,
    output: str,
    fmt: str | None,
    save: str | None,
) -> None:
    """Retrain a study's best configurations with fresh seeds: is the winner real, or luck?

    A search picks the configuration whose one run scored best on the validation split, and a
    lucky seed can put a configuration first. verify takes the K best complete trials and
    retrains each from scratch S times, with seeds the search never used (the same seeds for
    every configuration, reproducible from the study seed), on all the training data the study used
    (its training and validation split together; train_limit still applies), for the trial's
    epochs, and tests each on the study's test set (test_limit too) as its trials were tested.

    The table (one row per configuration, in the search's order) gives the trial, the search's
    validation and test metric, the retrained test metric's mean and sample std (n - 1) over
    seeds, the training and test example counts and the parameters; json adds each seed and its
    value. It goes to stdout or -o FILE, and is attached to the study as an artifact
    (verify.csv, .md or .json) for the dashboard. A line per retraining goes to stderr, then
    the verdict: the winner is within noise of the runner-up when their retrained means differ
    by less than the larger of their two stds. Examples:

    \b
        hpsearch verify --study quickstart --top 3 --seeds 5
        hpsearch verify --study quickstart --top 2 --seeds 3 -o verify.md
        hpsearch verify --study quickstart --top 1 --seeds 1 --save models/quickstart
        hpsearch predict models/quickstart shirt.png
    """
    import tempfile

    from hpsearch import verify as verifying
    from hpsearch.export import render, write_table
    from hpsearch.report import ReportError, attach
    from hpsearch.storage import StorageError, atomic_write, load_stored_study

    study = load_stored_study(study_name, storage)
    planned = verifying.plan(study, top, seeds)
    if output != "-" and not Path(output).parent.is_dir():
        raise click.ClickException(f"cannot write {output}: folder {Path(output).parent} does not exist")
    dev = resolve_device(device)
    fmt = table_format(fmt, output)
    n, metric, s = len(planned.configs), planned.task.metric, len(planned.seeds)
    which = (
        f"the {n} best of {planned.complete} complete trials"
        if n < planned.complete
        else (f"all {n} complete trials" if n > 1 else "its one complete trial")
    )
    click.echo(
        f"study {planned.study}: retraining {which} {'once' if s == 1 else f'{s} times'} "
        f"(seed{'s' if s > 1 else ''} {', '.join(map(str, planned.seeds))}) on training + validation data",
        err=True,
    )
    total, count = n * len(planned.seeds), [0]

    def on_run(c: verifying.Verified, k: int, done: Any) -> None:
        count[0] += 1
        clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # the progress line this one replaces
        stopped = f"  (stopped early: {done.stopped})" if done.stopped else ""
        click.echo(
            f"{clear}[{count[0]}/{total}] trial {c.trial} seed {planned.seeds[k]}: test {metric} "
            f"{done.test:.4f}, {done.seconds:.1f}s on {done.examples} training examples{stopped}",
            err=True,
        )

    verifying.run(planned, dev, data_dir, Path(save) if save else None, on_run, _epoch_bar)
    table = planned.table(per_seed=fmt == "json")
    write_table(table, output, fmt)
    if output != "-":
        click.echo(f"wrote {len(table)} rows to {output}", err=True)
    click.echo(planned.verdict(), err=True)
    if planned.saved is not None and planned.saved_from is not None:
        trial, seed = planned.saved_from
        click.echo(
            f"saved trial {trial}, seed {seed} to {planned.saved.parent}; classify images with "
            f"`hpsearch predict {planned.saved.parent} IMAGE...`",
            err=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / f"verify.{fmt}"
        atomic_write(artifact, render(table, fmt))
        try:
            attach(planned.study, storage, [artifact])
        except (StorageError, ReportError) as exc:
            click.echo(f"not attached to the study: {exc}", err=True)
        else:
            click.echo(f"attached to study {planned.study} as {artifact.name}", err=True)


@main.command()
@click.argument("model_dir", metavar="DIR")
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Show each image's N most likely classes, best first.",
)
@click.option(
    "--invert",
    is_flag=True,
    help="Swap light and dark first: for a dark object on a light background, when the model "
    "learnt light on dark (FashionMNIST, MNIST).",
)
@click.option(
    "--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto (CUDA when present)."
)
@user_errors
def predict(model_dir: str, images: tuple[str, ...], top: int, invert: bool, device: str) -> None:
    """Classify image files with a network saved by `hpsearch verify --save DIR`.

    Each image (PNG, JPEG, anything PIL reads) is converted to the network's channels (grey-scale
    for FashionMNIST and MNIST), squeezed to the square side of the dataset's own images (28×28),
    then resized and normalised exactly as in training, with the constants saved in DIR/model.json.
    Prints one row per image: the file, the class (its name and index) and its probability;
    --top N prints N rows per image, most likely first.

    FashionMNIST and MNIST images are light objects on a black background. A photo of a dark
    object on a light background (a shoe on a white floor, a digit written on paper) reads as
    something else unless you pass --invert, which swaps light and dark first. Crop the photo to
    the object, square if you can: it is squeezed to a square. Examples:

    \b
        hpsearch verify --study quickstart --top 1 --seeds 1 --save models/quickstart
        hpsearch predict models/quickstart shirt.png boot.jpg --top 3
        hpsearch predict models/quickstart photo-on-white.jpg --invert
    """

    from hpsearch.predict import predict as classify
    from hpsearch.predict import render

    saved, found = classify(
        Path(model_dir), [Path(p) for p in images], resolve_device(device), top=top, invert=invert
    )
    click.echo(render(saved, found, top), nl=False)


if __name__ == "__main__":
    main()
