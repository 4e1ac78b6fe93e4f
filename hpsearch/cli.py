"""The ``hpsearch`` command: a thin shell over the package's functions."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click
import optuna

from hpsearch.datasets import DATASETS, DataNotFound
from hpsearch.models import MODELS
from hpsearch.optim import OPTIMIZERS, SCHEDULERS
from hpsearch.registry import UnknownName
from hpsearch.search import PRUNERS, SAMPLERS
from hpsearch.spec import SpecError, list_studies, load_spec
from hpsearch.storage import ENV_STORAGE, StorageError

# Errors of a user's making: shown as one line, never as a traceback.
USER_ERRORS = (SpecError, StorageError, DataNotFound, UnknownName, FileNotFoundError, ValueError)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


storage_option = click.option(
    "--storage", envvar=ENV_STORAGE, default=None, metavar="URL",
    help=f"Optuna storage URL (default: ${ENV_STORAGE}, else sqlite:///hpsearch.db here). "
    "PostgreSQL: postgresql+psycopg://user:pass@host/db.",
)  # fmt: skip
study_option = click.option(
    "--study", "study_name", required=True, metavar="NAME|PATH",
    help="Study name (studies/NAME.toml) or path to a study file.",
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpsearch")
def main() -> None:
    """Hyperparameter search for image classifiers, built on Optuna.

    \b
    hpsearch list                              what can be searched, and the bundled studies
    hpsearch run --study quickstart            run (or resume) a study
    hpsearch export --study quickstart -o -    best configurations as a table
    hpsearch dashboard                         browse studies in optuna-dashboard
    """


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
    type=click.FloatRange(min=0),
    default=None,
    help="Stop starting new trials after this many seconds.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when present), cpu, cuda or cuda:N.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), envvar="HPSEARCH_DATA_DIR",
              default=None, help="Folder holding the dataset files (default: $HPSEARCH_DATA_DIR, "
              "the cache, /usr/share/datasets, then a download).")  # fmt: skip
@user_errors
def run(
    study_name: str,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    device: str,
    data_dir: str | None,
) -> None:
    """Run or resume a study: sample, train, report each epoch, prune.

    Trials are stored as they finish; stopping (Ctrl-C) and running the same command again
    resumes the study. Example:

    \b
        hpsearch run --study lenet-fashion --n-trials 20 --device cuda
    """
    from hpsearch.study import run_study

    spec = load_spec(study_name)
    click.echo(f"study {spec.name}: {spec.description}".rstrip(": "), err=True)
    try:
        study = run_study(
            spec, storage, n_trials=n_trials, timeout=timeout, device=device,
            data_dir=data_dir, progress=_epoch_bar, on_trial=_trial_line,
        )  # fmt: skip
    except KeyboardInterrupt:
        click.echo("interrupted: finished trials are stored; run the same command to resume",
                   err=True)  # fmt: skip
        sys.exit(130)
    _best_summary(study)


def _epoch_bar(number: int) -> Callable[[int, int, float], None] | None:
    """A progress line per trial, redrawn after every epoch (on a terminal only)."""
    if not sys.stderr.isatty():
        return None

    def show(epoch: int, epochs: int, value: float) -> None:
        width = 20
        filled = width * epoch // epochs
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if epoch == epochs else ""
        click.echo(f"\rtrial {number:>4} [{bar}] epoch {epoch}/{epochs} val {value:.4f}",
                   err=True, nl=False)  # fmt: skip
        click.echo(end, err=True, nl=False)

    return show


def _trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    attrs = trial.user_attrs
    state = trial.state.name.lower()
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    epochs = attrs.get("epochs_run", 0)
    secs = attrs.get("run_time_s", 0.0)
    why = attrs.get("stop_reason") or attrs.get("fail_reason") or ""
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    click.echo(f"\rtrial {trial.number:>4} {state:<8} value {value} epochs {epochs} "
               f"{secs:.1f}s  {params}" + (f"  ({why})" if why and state != "complete" else ""),
               err=True)  # fmt: skip


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _best_summary(study: optuna.Study) -> None:
    try:
        best = study.best_trial
    except ValueError:
        click.echo("no finished trial yet", err=True)
        return
    click.echo(f"best trial {best.number}: value {best.value:.4f}")
    for key, value in best.params.items():
        click.echo(f"  {key} = {_fmt(value)}")
    test = best.user_attrs.get("test_acc", best.user_attrs.get("test_mse"))
    if test is not None:
        click.echo(f"  test {study.user_attrs.get('metric', 'metric')}: {test:.4f}")


@main.command(name="list")
def list_() -> None:
    """List the models, datasets, optimizers, schedulers, samplers, pruners and studies.

    Every name shown can be used in a study file. Example:

    \b
        hpsearch list
    """
    for title, registry in (("models", MODELS), ("datasets", DATASETS),
                            ("optimizers", OPTIMIZERS), ("schedulers", SCHEDULERS),
                            ("samplers", SAMPLERS), ("pruners", PRUNERS)):  # fmt: skip
        click.echo(f"{title}:")
        for name in registry.names():
            click.echo(f"  {name:<20} {registry.doc(name)}".rstrip())
    click.echo("studies:")
    for path in list_studies():
        try:
            desc = load_spec(path).description
        except SpecError as exc:
            desc = f"(invalid: {exc})"
        click.echo(f"  {path.stem:<20} {desc}".rstrip())


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

    click.echo(f"dashboard on http://{host}:{port} (Ctrl-C to stop)", err=True)
    serve(storage, host=host, port=port)


if __name__ == "__main__":
    main()
