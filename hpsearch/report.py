"""The study report: figures that compare optimizers, a Markdown summary, attached as Optuna artifacts."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from hpsearch.errors import HpsearchError
from hpsearch.objectives import Objectives, first_value, front, of_stored, ranked
from hpsearch.record import DESCRIPTION, SPEC, TrialRecord, study_task
from hpsearch.storage import atomic_write, load_stored_study, open_artifacts, open_storage
from hpsearch.task import CLASSIFICATION, Task

REPORT_ATTR = "report_artifacts"
DPI = 120
_ARTIFACT_PREFIX = "artifacts:"


class ReportError(HpsearchError):
    """No report can be made: unknown study, missing storage, or no trial that finished an epoch."""


@dataclass
class _Run:
    """A complete or pruned trial that finished at least one epoch."""

    trial: FrozenTrial
    optimizer: str
    lr: float | None
    val: list[float]
    loss: list[float]

    @property
    def complete(self) -> bool:
        return self.trial.state == TrialState.COMPLETE

    def label(self) -> str:
        lr = f" lr={self.lr:.3g}" if self.lr is not None else ""
        return f"{self.optimizer}{lr}" + ("" if self.complete else " (pruned)")


def make_report(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write the figures and ``report.md`` into ``out_dir`` and return the written files.

    Only reads the study: ``attach`` adds the files to it as artifacts.
    """
    task = study_task(study)
    metric = "accuracy" if task is CLASSIFICATION else task.metric.upper()
    runs = [r for t in study.get_trials(deepcopy=False) if (r := _run(t, task)) is not None]
    if not runs:
        raise ReportError(f"study {study.study_name!r} has no trial that finished an epoch yet")
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1.0
    best: dict[str, _Run] = {}
    for r in runs:
        old = best.get(r.optimizer)
        if old is None or (r.complete, sign * r.val[-1]) > (old.complete, sign * old.val[-1]):
            best[r.optimizer] = r
    colors = {name: f"C{i % 10}" for i, name in enumerate(sorted(best))}
    ylabel = f"validation {metric} " + ("(fraction correct)" if metric == "accuracy" else "(lower is better)")

    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, tuple[str, Figure | str]] = {
        "learning_curves.png": ("Learning curves", _curves(best, colors, ylabel, metric)),
        "accuracy_vs_lr.png": (
            f"Final validation {metric} against learning rate",
            _vs_lr(runs, colors, ylabel, metric),
        ),
        "history.png": ("Optimization history", _history(study, runs, sign, ylabel)),
        "importances.png": ("Parameter importances", _importances(study)),
    }
    goals = of_stored(study)
    if goals.multi:
        figures["front.png"] = ("Pareto front", _front(study, goals, metric))
    written, sections = [], []
    for filename, (title, fig) in figures.items():
        if isinstance(fig, str):
            sections.append(f"## {title}\n\nNot drawn: {fig}.\n")
            continue
        _save(out_dir / filename, fig)
        written.append(out_dir / filename)
        sections.append(f"## {title}\n\n![{title}]({filename})\n")
    md = _markdown(study, task, runs, best, metric, sections)
    _write_text(out_dir / "report.md", md)
    written.append(out_dir / "report.md")
    return written


def _run(t: FrozenTrial, task: Task) -> _Run | None:
    rec = TrialRecord.of(t, task)
    if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or not rec.val:
        return None
    opt = rec.config.get("optimizer", {})
    lr = opt.get("lr")
    return _Run(t, str(opt.get("name", "?")), None if lr is None else float(lr), rec.val, rec.train_loss)


def _figure(width: float = 8.0, height: float = 5.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _curves(best: dict[str, _Run], colors: dict[str, str], ylabel: str, metric: str) -> Figure:
    fig = _figure(11.0, 5.0)
    acc, loss = fig.subplots(1, 2)
    for name, r in sorted(best.items()):
        acc.plot(range(1, len(r.val) + 1), r.val, "o-", color=colors[name], label=r.label())
        loss.plot(range(1, len(r.loss) + 1), r.loss, "o-", color=colors[name], label=r.label())
    acc.set(title=f"Validation {metric}", xlabel="epoch", ylabel=ylabel)
    loss_name = "cross-entropy" if metric == "accuracy" else "mean squared error"
    losses = [v for r in best.values() for v in r.loss]
    # A log axis only pays off over a decade or more; below that its tick labels get cryptic.
    log = bool(losses) and min(losses) > 0 and max(losses) / min(losses) >= 10
    loss.set(
        title="Training loss",
        xlabel="epoch",
        ylabel=f"training loss ({loss_name}{', log scale' if log else ''})",
    )
    if log:
        loss.set_yscale("log")
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title="best trial per optimizer", fontsize="small")
    fig.suptitle("Learning curves of the best trial of each optimizer")
    return fig


def _vs_lr(runs: list[_Run], colors: dict[str, str], ylabel: str, metric: str) -> Figure | str:
    with_lr = [r for r in runs if r.lr is not None and r.lr > 0]
    if not with_lr:
        return "no trial has a learning rate in its optimizer config"
    fig = _figure()
    ax = fig.subplots()
    for name in sorted(colors):
        for complete, marker, state in ((True, "o", "complete"), (False, "X", "pruned")):
            pts = [(r.lr, r.val[-1]) for r in with_lr if r.optimizer == name and r.complete == complete]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(
                    xs, ys, s=60, marker=marker, color=colors[name], alpha=0.8, label=f"{name}, {state}"
                )
    ax.set_xscale("log")
    ax.set(
        title=f"Final validation {metric} against learning rate",
        xlabel="learning rate (log scale)",
        ylabel=f"final {ylabel}",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="optimizer, trial state", fontsize="small")
    return fig


def _history(study: optuna.Study, runs: list[_Run], sign: float, ylabel: str) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    done = sorted((r for r in runs if r.complete), key=lambda r: r.trial.number)
    pruned = [r for r in runs if not r.complete]
    shown = {r.trial.number for r in runs}
    ended = [t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    lost = [n for n in ended if n not in shown]
    if done:
        ax.scatter([r.trial.number for r in done], [r.val[-1] for r in done], color="C0", label="complete")
        so_far = list(accumulate((r.val[-1] for r in done), max if sign > 0 else min))
        # Carried on to the last trial, so a lone complete trial still shows a line.
        xs = [r.trial.number for r in done] + [max(ended)]
        ax.step(xs, [*so_far, so_far[-1]], where="post", color="C3", label="best so far")
    if pruned:
        ax.scatter(
            [r.trial.number for r in pruned],
            [r.val[-1] for r in pruned],
            marker="x",
            color="grey",
            label="pruned (last epoch reached)",
        )
    if lost:
        where = ax.get_xaxis_transform()  # x in data, y in axes units: a tick along the bottom
        lost_label = "no epoch finished (diverged or failed)"
        ax.scatter(lost, [0.04] * len(lost), marker="|", s=300, color="C1", transform=where, label=lost_label)
    ax.set_xlim(min(ended) - 0.5, max(ended) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="Optimization history", xlabel="trial number", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _front(study: optuna.Study, goals: Objectives, metric: str) -> Figure | str:
    """The metric against each cost: every complete trial, the Pareto front joined by a line."""
    done = ranked(study)
    if not done:
        return "the front needs complete trials; this study has none"
    on_front = {t.number for t in front(study)}
    fig = _figure(5.5 * len(goals.costs) + 0.5, 5.0)
    axes = fig.subplots(1, len(goals.costs), squeeze=False)[0]
    for k, (ax, cost) in enumerate(zip(axes, goals.costs, strict=True), start=1):
        rest = [t for t in done if t.number not in on_front]
        best = sorted((t for t in done if t.number in on_front), key=lambda t: t.values[k])
        ax.scatter([t.values[k] for t in rest], [t.values[0] for t in rest], color="grey", label="dominated")
        ax.plot(
            [t.values[k] for t in best], [t.values[0] for t in best], "o-", color="C3", label="Pareto front"
        )
        for t in best:
            ax.annotate(f" {t.number}", (t.values[k], t.values[0]), fontsize="small")
        ax.set(
            title=f"validation {metric} against {cost.label}",
            xlabel=cost.label,
            ylabel=f"validation {metric}",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Pareto front of {len(done)} complete trials (numbers: trials on the front)")
    return fig


def _importances(study: optuna.Study) -> Figure | str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return f"parameter importances need at least 2 complete trials; this study has {len(complete)}"
    if not any(t.params for t in complete):
        return "the study searches no parameter"
    # PED-ANOVA, Optuna's default, is deterministic and needs no scikit-learn (fANOVA does). Raw
    # scores, since normalizing all-zero ones would draw a misleading tie.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                normalize=False,
                # Of the metric, in a multi-objective study too.
                target=(lambda t: t.values[0]) if len(study.directions) > 1 else None,
            )
    except (ValueError, RuntimeError) as exc:
        return f"parameter importances could not be computed ({exc})"
    total = sum(raw.values())
    if not total > 0:
        return (
            f"the {len(complete)} complete trials are too few or too alike for PED-ANOVA to tell the "
            "parameters apart"
        )
    imp = {k: v / total for k, v in raw.items()}
    fig = _figure()
    ax = fig.subplots()
    names = sorted(imp, key=lambda n: (imp[n], n))  # barh draws bottom-up: the largest on top
    ax.barh(names, [imp[n] for n in names], color="C0")
    for i, n in enumerate(names):
        ax.text(imp[n], i, f" {imp[n]:.3f}", va="center")
    ax.set_xlim(0, max(1.0, max(imp.values()) * 1.15))
    ax.set(
        title=f"Parameter importances (PED-ANOVA, {len(complete)} complete trials)",
        xlabel="importance (normalized, sums to 1)",
        ylabel="parameter",
    )
    ax.grid(alpha=0.3, axis="x")
    return fig


def _markdown(
    study: optuna.Study, task: Task, runs: list[_Run], best: dict[str, _Run], metric: str, sections: list[str]
) -> str:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    diverged = sum(str(TrialRecord.of(t, task).stop_reason or "").startswith("diverged") for t in trials)
    line = (
        f"{len(trials)} trials: {count[TrialState.COMPLETE]} complete, "
        f"{count[TrialState.PRUNED]} pruned ({diverged} diverged), {count[TrialState.FAIL]} failed"
    )
    if count[TrialState.RUNNING]:
        line += f", {count[TrialState.RUNNING]} running"
    if count[TrialState.COMPLETE]:
        top = ranked(study)[0]
        line += f"; best validation {metric} {first_value(top):.4f} (trial {top.number})."
        if len(study.directions) > 1:
            line += f" {len(front(study))} trials on the Pareto front."
    else:
        line += "; no complete trial yet."
    rows = [
        f"| optimizer | lr | val {metric} | test {metric} | epochs | run time (s) | trial |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in sorted(best.items()):
        if not r.complete:
            continue
        rec = TrialRecord.of(r.trial, task)
        lr = f"{r.lr:.4g}" if r.lr is not None else "default"
        t = f"{rec.test:.4f}" if isinstance(rec.test, int | float) else "–"
        rows.append(
            f"| {name} | {lr} | {r.val[-1]:.4f} | {t} | {rec.epochs_run} | "
            f"{rec.run_time_s:.1f} | {r.trial.number} |"
        )
    no_complete = sorted(n for n, r in best.items() if not r.complete)
    if no_complete:
        rows.append(
            f"\nNo complete trial for: {', '.join(no_complete)} (their best pruned trial is in the "
            "learning curves)."
        )
    desc = str(study.user_attrs.get(DESCRIPTION, "")).strip()
    head = [f"# Report: {study.study_name}", desc, line, "## Best trial per optimizer", "\n".join(rows)]
    return "\n\n".join(p for p in head if p) + "\n\n" + "\n".join(sections)


def _save(path: Path, fig: Figure) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write(path, buffer.getvalue())


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def attach(study_name: str, url: str | None, files: list[Path]) -> dict[str, str]:
    """Attach ``files`` to the stored study ``study_name`` as artifacts, reusing this report's ids.

    Only a study hpsearch made (one that stores its spec) is written to; another program's study
    raises ``ReportError`` and is left as it is. Optuna has no call to delete an artifact's record:
    optuna-dashboard marks deleted ones with a ``null`` record, which
    ``optuna.artifacts.get_all_artifact_meta`` then fails on. So a re-run writes new content under
    the old id instead of deleting and uploading. Returns name → id.
    """
    if SPEC not in load_stored_study(study_name, url).user_attrs:  # looked at read-only first
        raise ReportError(
            f"study {study_name!r} was not made by hpsearch; its figures are not attached to it"
        )
    storage = open_storage(url)
    study = optuna.load_study(study_name=study_name, storage=storage)
    store = open_artifacts(url)
    # Read the records directly so that null (dashboard-deleted) records are skipped, not fatal.
    live: dict[str, str] = {}
    system = storage.get_study_system_attrs(storage.get_study_id_from_name(study_name))
    for key, value in system.items():
        meta = json.loads(value) if key.startswith(_ARTIFACT_PREFIX) and isinstance(value, str) else value
        if key.startswith(_ARTIFACT_PREFIX) and isinstance(meta, dict):
            live[key[len(_ARTIFACT_PREFIX) :]] = str(meta.get("filename"))
    previous = study.user_attrs.get(REPORT_ATTR)
    ids: dict[str, str] = dict(previous) if isinstance(previous, dict) else {}
    for path in files:
        old = ids.get(path.name)
        if old is not None and live.get(old) == path.name:
            with path.open("rb") as f:
                store.write(old, f)
        else:
            ids[path.name] = optuna.artifacts.upload_artifact(
                artifact_store=store, file_path=str(path), study_or_trial=study
            )
    study.set_user_attr(REPORT_ATTR, ids)
    return ids
