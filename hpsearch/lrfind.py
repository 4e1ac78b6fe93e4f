"""The learning-rate range test: sweep the rate up, watch the loss, suggest where it falls fastest.

A freshly built network of the study trains with the study's data, batch size and one of its
optimizers while the rate grows exponentially from ``start`` to ``end``, one batch per rate. The
losses are smoothed (an exponential moving average, bias-corrected so the first steps are not pulled
towards zero), the sweep stops once the smoothed loss passes ``diverge`` times its best, and the
suggestion is the rate where the smoothed loss falls fastest against log lr, before its minimum.
``plot`` draws the curve; ``apply`` writes a copy of the study file with that optimizer's lr range
narrowed around the suggestion.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import tomlkit
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tomlkit.items import AoT, Item, Table

from hpsearch.datasets import batch_slices, load_dataset, split
from hpsearch.errors import HpsearchError
from hpsearch.optim import build_optimizer
from hpsearch.schema import Param
from hpsearch.spec import StudySpec, TrialConfig, load_spec
from hpsearch.storage import atomic_write
from hpsearch.train import _build, _layout, _step, trial_seed

# A fall of the loss below this fraction is too small to read a rate from: the network has barely
# begun to learn in the sweep (sigmoid LeNet under SGD falls 7 % in 100 batches, to chance level).
SMALL_FALL = 0.1

# The window ``apply`` narrows an lr range to, as factors of the suggestion: a decade below (the
# steepest point is a safe rate, not the largest one), three times above.
BELOW, ABOVE = 10.0, 3.0


class LrFindError(HpsearchError):
    """A range test cannot run, or its result cannot be applied to the study file."""


@dataclass(frozen=True)
class RangeTest:
    """One range test: the rate, raw loss and smoothed loss of every step it ran.

    ``suggestion`` is the rate where the smoothed loss falls fastest before its minimum, or None
    when it never fell. ``settings`` are the study's searched values the sweep trained with (lr
    aside); ``stop_reason`` says why it stopped before ``planned`` steps ("" when it ran them all).
    """

    study: str
    optimizer: str
    loss_name: str  # the task's loss, as torch names it
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    planned: int
    settings: dict[str, Any] = field(default_factory=dict)
    stop_reason: str = ""

    @property
    def steps(self) -> int:
        return len(self.lrs)

    @property
    def best(self) -> int:
        """The step of the lowest smoothed loss."""
        return int(np.argmin(self.smoothed))

    @property
    def min_loss_lr(self) -> float:
        return self.lrs[self.best]

    @property
    def fall(self) -> float:
        """How far the smoothed loss fell, as a fraction of where it began (the first batches' median)."""
        start = float(np.median(self.losses[:10]))
        return 1 - self.smoothed[self.best] / start if start > 0 else 0.0


def optimizer_choices(spec: StudySpec) -> list[str]:
    """The optimizers a study offers, in file order (one when its name is fixed)."""
    name = spec.space["optimizer"].name
    assert name is not None  # [optimizer] always has a name
    return [str(c) for c in name.candidates()]


def pick_optimizer(spec: StudySpec, optimizer: str | None) -> str:
    """``optimizer`` if the study offers it; by default the study's fixed optimizer or first choice."""
    offered = optimizer_choices(spec)
    if optimizer is None:
        return offered[0]
    if optimizer not in offered:
        raise LrFindError(f"study {spec.name} offers no optimizer {optimizer!r}; valid: {', '.join(offered)}")
    return optimizer


def sweep_config(spec: StudySpec, optimizer: str) -> tuple[TrialConfig, dict[str, Any]]:
    """The configuration a range test trains with, and the searched values it picked (lr aside).

    ``optimizer`` is taken as the optimizer; every other searched value takes a typical value: the
    first of its choices, or the middle of its range (geometric for a log range).
    """
    params: dict[str, Any] = {}
    for title, s in spec.space.items():
        choice = s.name.candidates()[0] if s.name is not None else None
        if title == "optimizer":
            choice = optimizer
        if s.name is not None and s.name.searched:
            params[s.name.name] = choice
        for p in s.params(choice):
            if p.searched:
                params[p.name] = _typical(p)
    cfg = spec.sample(optuna.trial.FixedTrial(params))
    return cfg, {k: v for k, v in params.items() if _trains_with(k)}


def _typical(p: Param) -> Any:
    v = p.value
    if "choices" in v:
        return v["choices"][0]
    low, high = v["low"], v["high"]
    mid = math.sqrt(low * high) if v.get("log") else (low + high) / 2
    if "step" in v:
        mid = low + round((mid - low) / v["step"]) * v["step"]
    return float(mid) if p.is_float_range else round(mid)


def _trains_with(name: str) -> bool:
    """Whether the sweep's training depends on searched parameter ``name`` (the lr it sets itself)."""
    if name == "optimizer.name" or (name.startswith("optimizer.") and name.endswith(".lr")):
        return False
    return name.startswith(("data.", "model.", "optimizer.")) or name == "train.l1"


def train_losses(
    spec: StudySpec,
    cfg: TrialConfig,
    lrs: Iterator[float] | list[float],
    device: torch.device,
    data_dir: str | None = None,
) -> Iterator[float]:
    """Train a freshly built network of ``cfg``, one batch per rate of ``lrs``; yield each step's loss.

    The loss is the batch's data loss before its step (the L1 penalty aside), as a trial records
    it. The weights and the batch order are seeded from the study as a trial's are, so a sweep is
    repeatable; batches run over the training split epoch after epoch, each in a fresh order.
    """
    seed = cfg.train.seed if cfg.train.seed is not None else trial_seed(spec.seed, 0)
    torch.manual_seed(seed)
    data = load_dataset(cfg.data.name, data_dir, str(device))
    spec.check_data(len(data.train_y), len(data.test_y))
    train_idx, _ = split(
        len(data.train_y), cfg.data.val_fraction, spec.seed, cfg.data.train_limit, str(device)
    )
    slices = batch_slices(len(train_idx), cfg.data.batch_size)
    model = _build(cfg.model.name, cfg.model.kwargs, data, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(**cfg.optimizer.as_dict(), params=model.parameters())
    loss_fn = spec.task.loss()
    g = torch.Generator(device=device).manual_seed(seed)
    model.train()

    def batches() -> Iterator[torch.Tensor]:
        while True:
            order = train_idx[torch.randperm(len(train_idx), generator=g, device=device)]
            for s in slices:
                yield order[s]

    for lr, batch in zip(lrs, batches(), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = _layout(data.inputs(data.train_x[batch], cfg.data.resize, cfg.data.flip, g))
        loss, _ = _step(model, optimizer, loss_fn, x, data.train_y[batch], params, cfg.train.l1, device)
        yield float(loss)  # one host sync per step: the sweep decides after each whether to go on


def lr_find(
    spec: StudySpec,
    optimizer: str | None = None,
    *,
    steps: int = 100,
    start: float = 1e-6,
    end: float = 10.0,
    diverge: float = 4.0,
    beta: float = 0.9,
    device: torch.device | None = None,
    data_dir: str | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> RangeTest:
    """Run the range test on ``spec`` with ``optimizer`` (see ``pick_optimizer``).

    Step k of ``steps`` trains at ``start · (end/start)^(k/(steps-1))``. The smoothed loss is the
    bias-corrected exponential moving average of the losses with factor ``beta``; the sweep stops
    once it passes ``diverge`` times its lowest value, or at a non-finite loss (not recorded).
    ``progress(step, lr, smoothed loss)`` is told of every step. Raises ``LrFindError`` for an
    unknown optimizer or a bad sweep, ``SpecError`` when the data does not fit the study.
    """
    if steps < 3:
        raise LrFindError(f"--steps must be at least 3, not {steps}")
    if not 0 < start < end:
        raise LrFindError(f"the sweep needs 0 < start < end, not start {start:g} and end {end:g}")
    if not diverge > 1:
        raise LrFindError(f"the divergence factor must be more than 1, not {diverge:g}")
    if not 0 <= beta < 1:
        raise LrFindError(f"the smoothing factor must be in [0, 1), not {beta:g}")
    name = pick_optimizer(spec, optimizer)
    cfg, settings = sweep_config(spec, name)
    dev = device or torch.device("cpu")
    schedule = [start * (end / start) ** (k / (steps - 1)) for k in range(steps)]
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best, reason = 0.0, math.inf, ""
    for k, loss in enumerate(train_losses(spec, cfg, schedule, dev, data_dir)):
        lr = schedule[k]
        if not math.isfinite(loss):
            reason = f"the loss became {loss} at lr {lr:.3g}"
            break
        avg = beta * avg + (1 - beta) * loss
        value = avg / (1 - beta ** (k + 1))
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(value)
        best = min(best, value)
        if progress:
            progress(k + 1, lr, value)
        if value > diverge * best:
            reason = f"the smoothed loss {value:.4g} passed {diverge:g} × its best {best:.4g}"
            break
    if not lrs:
        raise LrFindError(f"the loss was not finite at the first rate, {start:g}; lower --start")
    # Until the average has seen about 1 / (1 - beta) batches, bias correction makes it the mean of a
    # few batches, as noisy as they are; the slope is taken across ±5 % of the sweep.
    skip = math.ceil(1 / (1 - beta)) if beta > 0 else 0
    suggestion = steepest(lrs, smoothed, skip, max(1, steps // 20))
    return RangeTest(
        study=spec.name,
        optimizer=name,
        loss_name=type(spec.task.loss()).__name__,
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        planned=steps,
        settings=settings,
        stop_reason=reason,
    )


def steepest(lrs: list[float], smoothed: list[float], skip: int = 0, half: int = 1) -> float | None:
    """The rate where ``smoothed`` falls fastest against log lr before its minimum; None if it never falls.

    The slope at step k is taken from step k - ``half`` to k + ``half``, cut at the minimum, so one
    noisy batch cannot make a slope on its own; the first ``skip`` steps are left out.
    """
    m = int(np.argmin(smoothed))
    x = np.log10(lrs)
    best, found = 0.0, None
    for k in range(skip, m):
        a, b = max(k - half, skip), min(k + half, m)
        slope = (smoothed[b] - smoothed[a]) / (x[b] - x[a])
        if slope < best:
            best, found = slope, lrs[k]
    return found


def plot(result: RangeTest, path: Path) -> Path:
    """Draw the raw and smoothed loss against the rate (log axis), the suggestion marked; write a PNG."""
    fig = Figure(figsize=(8.0, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.7", linewidth=1, label="loss per batch")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.plot(
        [result.min_loss_lr],
        [result.smoothed[result.best]],
        "o",
        color="C2",
        label=f"minimum at lr {result.min_loss_lr:.3g}",
    )
    if result.suggestion is not None:
        ax.axvline(
            result.suggestion, color="C3", linestyle="--", label=f"suggested lr {result.suggestion:.3g}"
        )
    ax.set_xscale("log")
    # The first batches and the blow-up at the end would squeeze the interesting part flat.
    low, high = min(result.smoothed), max(result.smoothed[0], result.smoothed[-1])
    margin = 0.1 * (high - low) or 0.1 * abs(high) or 1.0
    ax.set_ylim(low - margin, high + margin)
    ax.set(
        title=f"Learning-rate range test: {result.study}, {result.optimizer}",
        xlabel="learning rate (log scale)",
        ylabel=f"training loss ({result.loss_name})",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())
    return path


def write_curve(result: RangeTest, path: Path) -> Path:
    """Write the sweep as CSV, one row per step: ``step,lr,loss,smoothed``."""
    rows = ["step,lr,loss,smoothed"]
    rows += [
        f"{k},{lr!r},{loss!r},{smooth!r}"
        for k, (lr, loss, smooth) in enumerate(
            zip(result.lrs, result.losses, result.smoothed, strict=True), 1
        )
    ]
    atomic_write(path, "\n".join(rows) + "\n")
    return path


@dataclass(frozen=True)
class Narrowed:
    """What ``apply`` wrote: the new study file, and the lr entry before and after (as TOML)."""

    path: Path
    key: str  # the parameter's name, e.g. optimizer.sgd.lr
    before: str
    after: str
    note: str = ""  # anything else the copy changed, one line


def apply_target(spec: StudySpec, target: str | Path | None) -> Path:
    """Where ``apply`` writes: ``target``, or ``<stem>-lr.toml`` in the current folder."""
    return Path(target) if target else Path(f"{spec.path.stem}-lr.toml")


def check_apply(spec: StudySpec, optimizer: str, target: Path, force: bool) -> Param:
    """Raise ``LrFindError`` unless ``apply`` can write ``target`` and ``optimizer``'s lr is a search
    table in the file; return that lr entry. Cheap: run it before a sweep."""
    if target.suffix != ".toml":
        raise LrFindError(f"--apply writes a study file; give a path ending in .toml, not {target}")
    if target.resolve() == spec.path.resolve():
        raise LrFindError(f"--apply never overwrites the study file itself ({spec.path}); name a copy")
    if target.exists() and not force:
        raise LrFindError(f"{target} exists; pass --force to replace it, or give --apply another path")
    lr = next((p for p in spec.space["optimizer"].params(optimizer) if p.key == "lr"), None)
    if lr is None:
        raise LrFindError(
            f"{spec.path} sets no lr for {optimizer} (it trains at torch's default), so there is no range "
            f"to narrow; add lr = {{ low = ..., high = ..., log = true }} to [optimizer.{optimizer}]"
        )
    if not lr.searched:
        raise LrFindError(
            f"{spec.path}: {lr.name} is fixed at {lr.value!r}, not searched, so there is no range to "
            "narrow; set the suggested rate by hand"
        )
    return lr


def apply(spec: StudySpec, optimizer: str, suggestion: float, target: Path, force: bool = False) -> Narrowed:
    """Write a copy of ``spec``'s file to ``target`` with ``optimizer``'s lr search narrowed around
    ``suggestion``; the study file itself is never written.

    A range becomes ``suggestion / BELOW … suggestion × ABOVE`` on a log scale, within the old range
    when the suggestion lies in it. Choices keep those in that window. An lr shared by several
    optimizers (in ``[optimizer]``) moves into each one's sub-table, the others' unchanged. Comments
    and layout are kept. ``[[study.enqueue]]`` configurations follow (``_fit_enqueued``), a grid
    whose ``n_trials`` the narrowed grid no longer reaches gets ``n_trials`` lowered to its size, and
    the copy is checked with ``load_spec`` before it is written. Raises ``LrFindError`` where there is
    nothing to narrow (``check_apply``, or choices all inside the window or none).
    """
    lr = check_apply(spec, optimizer, target, force)
    doc = tomlkit.parse(spec.source)
    section = doc["optimizer"]
    assert isinstance(section, Table)
    before = (section if lr.choice is None else section[optimizer])["lr"].as_string().strip()
    low, high = _round(suggestion / BELOW), _round(suggestion * ABOVE)
    window = f"{_short(low)}…{_short(high)}"
    if "choices" in lr.value:
        kept = [c for c in lr.value["choices"] if low <= c <= high]
        if not kept:
            raise LrFindError(
                f"none of {lr.name}'s choices {before} lies within {window} around the suggested "
                f"{suggestion:.3g}; edit the choices by hand"
            )
        if len(kept) == len(lr.value["choices"]):
            raise LrFindError(f"every choice of {lr.name} {before} lies within {window}; nothing to narrow")
        value: dict[str, Any] = {"choices": kept}
    else:
        old_low, old_high = float(lr.value["low"]), float(lr.value["high"])
        if old_low <= suggestion <= old_high:
            low, high = max(low, old_low), min(high, old_high)
        if low <= old_low and high >= old_high and lr.value.get("log"):
            raise LrFindError(f"{lr.name} {before} already lies within {window}; nothing to narrow")
        value = {"low": low, "high": high, "log": True}
    after = _toml(value)
    note = f"hpsearch lr-find suggested {suggestion:.3g}; was {before}"
    key = f"optimizer.{optimizer}.lr"
    split = False
    if lr.choice is not None:
        _set_lr(section, optimizer, after, note)
    elif len(optimizer_choices(spec)) == 1:
        _set_lr(section, None, after, note)
        key = "optimizer.lr"
    else:
        # Shared by every optimizer: each gets the entry as written in its own sub-table.
        del section["lr"]
        for other in optimizer_choices(spec):
            _set_lr(section, other, *((after, note) if other == optimizer else (before, "")))
        split = True
    dropped = _fit_enqueued(doc, key, value, split)
    text, extra = _fit_grid(spec, doc)
    notes = "; ".join(n for n in (dropped, extra) if n)
    atomic_write(target, text)
    return Narrowed(target, key, before, after, notes)


def _set_lr(section: Table, choice: str | None, value: str, note: str) -> None:
    """Write ``lr = value  # note`` in ``[optimizer]`` (``choice`` None) or ``[optimizer.<choice>]``:
    in place of the entry written there, else as the sub-table's first key, adding the sub-table
    after the others when there is none."""
    item = tomlkit.parse(f"lr = {value}")["lr"]
    table = section if choice is None else section.get(choice)
    if table is None:
        new = tomlkit.parse(f"[optimizer.{choice}]\nlr = {value}\n\n")["optimizer"][choice]
        section[str(choice)] = new
        table = new
    elif "lr" in table:
        old = table["lr"]
        kept = old.trivia.comment.lstrip("# ") if isinstance(old, Item) else ""
        note = "; ".join(t for t in (kept, note) if t)
        table["lr"] = item
    else:
        # Added first, so that the blank line that ends the sub-table stays at its end.
        new = tomlkit.table()
        new.append("lr", item)
        for k, v in table.value.body:
            new.append(k, v)
        section[str(choice)] = new
        table = new
    if note:
        table["lr"].comment(note)
        table["lr"].trivia.comment_ws = "  "


def _fit_enqueued(doc: tomlkit.TOMLDocument, key: str, value: dict[str, Any], split: bool) -> str:
    """Keep the copy's ``[[study.enqueue]]`` configurations valid: an ``optimizer.lr`` that moved into
    the sub-tables is renamed after the entry's optimizer, and an entry whose lr the narrowed search
    no longer holds is dropped. Returns a line saying what was dropped ("" when nothing was)."""
    study = doc.get("study")
    entries = study.get("enqueue") if isinstance(study, Table) else None
    if not isinstance(entries, AoT):
        return ""
    dropped: list[str] = []
    for i in reversed(range(len(entries))):
        flat = _flat(entries[i].unwrap())
        if split and "optimizer.lr" in flat:
            if "optimizer.name" not in flat:
                dropped.insert(0, f"optimizer.lr = {_toml(flat['optimizer.lr'])} for any optimizer")
                del entries[i]
                continue
            flat[f"optimizer.{flat['optimizer.name']}.lr"] = flat.pop("optimizer.lr")
            text = "\n".join(f"{k} = {_toml(v)}" for k, v in flat.items())
            entries[i] = tomlkit.parse(f"[[study.enqueue]]\n{text}\n\n")["study"]["enqueue"][0]
        lr = flat.get(key)
        if lr is None:
            continue
        held = lr in value["choices"] if "choices" in value else value["low"] <= lr <= value["high"]
        if not held:
            dropped.insert(0, f"{key} = {_toml(lr)}")
            del entries[i]
    if not dropped:
        return ""
    if not entries:
        del study["enqueue"]  # type: ignore[union-attr]
    return f"dropped the [[study.enqueue]] configurations outside the narrowed search: {', '.join(dropped)}"


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A table by parameter name: TOML reads the dotted key ``optimizer.sgd.lr`` as nested tables."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fit_grid(spec: StudySpec, doc: tomlkit.TOMLDocument) -> tuple[str, str]:
    """The copy's text, checked by ``load_spec``; a grid's ``n_trials`` lowered to the grid's size."""
    note = ""
    study = doc.get("study")
    if spec.enumerates and isinstance(study, Table) and "n_trials" in study:
        unbounded = tomlkit.parse(tomlkit.dumps(doc))
        del unbounded["study"]["n_trials"]
        size = len(_load(spec, tomlkit.dumps(unbounded)).grid())
        if size < study["n_trials"]:
            note = f"study.n_trials lowered from {study['n_trials']} to {size}, the narrowed grid's size"
            study["n_trials"] = size
    text = tomlkit.dumps(doc)
    _load(spec, text)
    return text, note


def _load(spec: StudySpec, text: str) -> StudySpec:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / spec.path.name
        path.write_text(text, encoding="utf-8")
        try:
            return load_spec(path)
        except HpsearchError as exc:
            why = str(exc).replace(f"{path}: ", "")
            raise LrFindError(f"the narrowed copy of {spec.path} would not load: {why}") from None


def _toml(value: Any) -> str:
    """A value as the house style writes it: ``{ low = 1e-3, high = 0.5, log = true }``."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _exponent(repr(value))  # the shortest text that reads back as the same float
    return tomlkit.item(value).as_string()


def _round(x: float) -> float:
    """``x`` to 2 significant digits: a range's new bounds are read by people."""
    return float(f"{x:.2g}")


def _short(x: float) -> str:
    return _exponent(f"{x:.2g}")


def _exponent(text: str) -> str:
    """``1e-05`` as ``1e-5``."""
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"
