"""The training recipe as study-file keys: random crops, label smoothing, gradient clipping, dropout.

Each is checked where it acts, on the real code path: crops through ``Dataset.inputs`` and a
trial's own epoch loop, label smoothing through the loss a trial minimises, clipping through the
trial's step (alone, inside LBFGS's closure, and per member of a batched pack), dropout through the
network a trial builds. Then one study searches them all through ``hpsearch run``, and bad values
are refused at load in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from conftest import run_cli, write_study
from hpsearch import train
from hpsearch.cli import main
from hpsearch.datasets import Dataset
from hpsearch.models import build_model
from hpsearch.spec import SpecError, StudySpec, load_spec
from hpsearch.task import CLASSIFICATION, REGRESSION
from hpsearch.train import _Member, _step, evaluate, train_epoch

CPU = torch.device("cpu")

# 100 synthetic examples, 10 for validation: 90 to train on, in batches of 23 (23, 23, 23, 21).
STUDY = """
[study]
n_trials = 4
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 23
train_limit = 100
{data}

[model]
name = "{model}"
{model_keys}

[optimizer]
name = "{optimizer}"
lr = {lr}

[train]
epochs = 1
{train}
"""


def spec_of(tmp_path: Path, name: str, **keys: str) -> StudySpec:
    values = {"data": "", "model": "lenet", "model_keys": "", "optimizer": "sgd", "lr": "0.1", "train": ""}
    return load_spec(write_study(tmp_path, name, STUDY.format(**{**values, **keys})))


def members(spec: StudySpec, *params: Mapping[str, object]) -> list[_Member]:
    """Trials of ``spec`` set up as a run sets them up, each with ``params`` fixed through the queue."""
    study = optuna.create_study(direction=spec.direction)
    out = []
    for p in params:
        study.enqueue_trial(dict(p))
        m = _Member(study.ask(), spec, CPU, None)
        m.setup(None)
        out.append(m)
    return out


def shift_of(out: torch.Tensor, plain: torch.Tensor, pad: int, zero: float) -> tuple[int, int] | None:
    """The (dy, dx) within ±``pad`` by which ``out`` is ``plain`` translated, uncovered pixels at
    ``zero``; None when it is no such translation."""
    _, h, w = plain.shape
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            moved = torch.full_like(plain, zero)
            moved[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = plain[
                :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
            if torch.allclose(out, moved, atol=1e-5):
                return dy, dx
    return None


# Random crops.


def test_a_crop_translates_each_image_by_its_own_shift_with_zeros_filled_in() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (13, 3, 9, 11), dtype=torch.uint8, generator=g)  # no pixel is black
    y = torch.zeros(13, dtype=torch.long)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    data = Dataset("crafted", CLASSIFICATION, x, y, x, y, 10, mean, std)
    plain = data.inputs(x)
    zero = [-m / s for m, s in zip(mean, std, strict=True)]  # a black pixel, normalised

    out = data.inputs(x, generator=torch.Generator().manual_seed(1), crop_padding=3)
    assert out.shape == plain.shape
    shifts: list[tuple[int, int]] = []
    for i in range(len(x)):
        # Channel by channel, each with its own black: all three moved by the same shift.
        found = {shift_of(out[i, c : c + 1], plain[i, c : c + 1], 3, zero[c]) for c in range(3)}
        [shift] = found
        assert shift is not None, i
        shifts.append(shift)
    assert any(s != (0, 0) for s in shifts) and len(set(shifts)) > 3
    assert all(max(abs(dy), abs(dx)) <= 3 for dy, dx in shifts)
    # Drawn from the generator: the same seed, the same shifts; another seed, others.
    assert torch.equal(out, data.inputs(x, generator=torch.Generator().manual_seed(1), crop_padding=3))
    assert not torch.equal(out, data.inputs(x, generator=torch.Generator().manual_seed(2), crop_padding=3))
    # Off, nothing is drawn: the generator is where it was, the images as they were.
    g = torch.Generator().manual_seed(1)
    assert torch.equal(data.inputs(x, generator=g, crop_padding=0), plain)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(1).get_state())


def test_a_trial_crops_its_training_batches_and_never_its_evaluation(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "crop", data="crop_padding = 2")
    [m] = members(spec, {})
    data, seen, training = m.data, [], []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].detach().clone())
        training.append(module.training)

    m.model.register_forward_pre_hook(record)
    train_epoch([m], data, spec.task, m.cfg.data, CPU)
    batches = [m.order[s] for s in m.slices]
    assert [len(b) for b in batches] == [23, 23, 23, 21] and training == [True] * 4
    zero = -data.mean[0] / data.std[0]
    shifts = set()
    for x, idx in zip(seen, batches, strict=True):
        plain = data.inputs(data.train_x[idx])
        for out, ref in zip(x, plain, strict=True):
            shift = shift_of(out, ref, 2, zero)
            assert shift is not None
            shifts.add(shift)
    assert len(shifts) > 3

    seen.clear()
    evaluate(m.net, data, spec.task, data.train_x, data.train_y, m.val_idx, m.cfg, CPU)
    assert torch.equal(torch.cat(seen), data.inputs(data.train_x[m.val_idx]))


# Label smoothing.


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """The mean over a batch of -Σ_c q_c log p_c with q = (1 - eps)·one-hot + eps/C, by hand."""
    total = 0.0
    for row, label in zip(logits.double().tolist(), y.tolist(), strict=True):
        norm = math.log(sum(math.exp(v) for v in row))
        logp = [v - norm for v in row]
        total += -sum(((1 - eps) * (c == label) + eps / len(row)) * lp for c, lp in enumerate(logp))
    return total / len(y)


def test_label_smoothing_gives_the_loss_of_a_known_batch_its_closed_form(tmp_path: Path) -> None:
    logits = torch.tensor(
        [[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0], [-0.5, 0.2, 4.0], [1.5, 0.0, 0.0]]
    )
    y = torch.tensor([0, 2, 1, 2, 1])
    plain = float(CLASSIFICATION.loss()(logits, y))
    smoothed = float(CLASSIFICATION.loss(label_smoothing=0.2)(logits, y))
    assert plain == pytest.approx(smoothed_cross_entropy(logits, y, 0.0), rel=1e-6)
    assert smoothed == pytest.approx(smoothed_cross_entropy(logits, y, 0.2), rel=1e-6)
    assert abs(smoothed - plain) > 0.05

    # What a trial minimises: its step's loss on a batch is that closed form of the network's outputs.
    spec = spec_of(tmp_path, "smooth", train="label_smoothing = 0.3")
    [m] = members(spec, {})
    train_epoch([m], m.data, spec.task, m.cfg.data, CPU)
    idx = m.train_idx[:17]
    x, y = m.data.inputs(m.data.train_x[idx]), m.data.train_y[idx]
    with torch.no_grad():
        out = m.net(x)
    loss, _ = train._member_step(m, x, y, CPU)
    assert float(loss) == pytest.approx(smoothed_cross_entropy(out, y, 0.3), rel=1e-5)
    assert float(loss) != pytest.approx(smoothed_cross_entropy(out, y, 0.0), rel=1e-3)


# Gradient clipping.


def test_clipping_bounds_the_step_and_leaves_a_short_gradient_alone() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(19, 5) * 10, torch.randint(0, 3, (19,))

    def stepped(clip: float) -> tuple[torch.Tensor, torch.Tensor]:
        """SGD at lr 1 from the same weights: the update is minus the gradient it was given."""
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=1.0)
        _step(model, opt, nn.CrossEntropyLoss(), x, y, params, 0.0, CPU, clip)
        return torch.cat([p.detach().flatten() for p in params]) - before, torch.cat(
            [p.grad.flatten() for p in params if p.grad is not None]
        )

    free, grad = stepped(0.0)
    norm = float(free.norm())
    assert norm > 1.0  # long enough for the clip below to act
    clipped, clipped_grad = stepped(0.5)
    assert float(clipped.norm()) <= 0.5 + 1e-5 and float(clipped_grad.norm()) <= 0.5 + 1e-5
    assert float(clipped.norm()) == pytest.approx(0.5, rel=1e-4)
    assert torch.allclose(clipped, free * (0.5 / norm), atol=1e-6)  # shortened, not turned
    assert torch.equal(stepped(norm * 2)[0], free)  # a gradient within the bound is untouched
    assert torch.equal(grad, -free)


def test_clipping_acts_inside_lbfgs_closure() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(19, 5) * 10, torch.randint(0, 3, (19,))

    def stepped(clip: float) -> tuple[torch.Tensor, float]:
        torch.manual_seed(1)
        model = nn.Linear(5, 3)
        params = list(model.parameters())
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=4)
        _step(model, opt, nn.CrossEntropyLoss(), x, y, params, 0.01, CPU, clip)
        grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        return torch.cat([p.detach().flatten() for p in params]), float(grad.norm())

    free, free_grad = stepped(0.0)
    clipped, clipped_grad = stepped(0.25)
    # LBFGS stepped on clipped gradients (a clip after its step would leave the step as it was),
    # and the gradient of its last closure call is the clipped one.
    assert free_grad > 0.25 and clipped_grad <= 0.25 + 1e-5
    assert not torch.allclose(free, clipped)


def test_a_batched_pack_clips_and_smooths_each_member_by_its_own_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two members with one seed, one clipping and smoothing its labels and one doing neither,
    trained as one batched model (a GPU's way, here on the CPU): each ends where it ends alone."""
    searched = "clip_grad_norm = { choices = [0.0, 0.05] }\nlabel_smoothing = { choices = [0.0, 0.1] }"
    spec = spec_of(tmp_path, "clip", train=f"seed = 3\n{searched}", lr="0.5")
    configs = [
        {"train.clip_grad_norm": 0.05, "train.label_smoothing": 0.1},
        {"train.clip_grad_norm": 0.0, "train.label_smoothing": 0.0},
    ]
    packed, alone = members(spec, *configs), members(spec, *configs)
    monkeypatch.setattr(train, "BATCHED_ON", {"cpu"})
    train_epoch(packed, packed[0].data, spec.task, packed[0].cfg.data, CPU)
    assert isinstance(train._together(packed, CPU), train._Stacked)
    for m in alone:
        train_epoch([m], m.data, spec.task, m.cfg.data, CPU)

    def weights(m: _Member) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in m.params])

    for p, a in zip(packed, alone, strict=True):
        assert torch.allclose(weights(p), weights(a), rtol=1e-4, atol=1e-5)
        assert p.loss == pytest.approx(a.loss, rel=1e-4)
    # Same start, same batches: the clipped one moved less, 4 steps of at most lr × bound.
    start = torch.cat([p.detach().flatten() for p in members(spec, configs[0])[0].params])
    moved = [float((weights(m) - start).norm()) for m in packed]
    assert moved[0] < moved[1] and moved[0] <= 4 * 0.5 * 0.05 + 1e-5


# Dropout.


def test_dropout_changes_training_outputs_and_not_evaluation_outputs(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, "drop", model="alexnet28", model_keys="dropout = 0.4")
    [m] = members(spec, {})
    assert [mod.p for mod in m.model.modules() if isinstance(mod, nn.Dropout)] == [0.4]
    x = m.data.inputs(m.data.train_x[:9])
    without = build_model("alexnet28", 1, 10, dropout=0.0)
    without.load_state_dict(m.model.state_dict())
    m.model.train()
    with torch.no_grad():
        a, b = m.model(x), m.model(x)
        m.model.eval()
        c, d, e = m.model(x), m.model(x), without.eval()(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert torch.equal(c, d) and torch.allclose(c, e, atol=1e-6)


# All of them searched in one study.

SEARCH = """
[study]
n_trials = 1
seed = 0
sampler = "random"
pruner = "none"

[data]
name = "synthetic"
batch_size = 23
train_limit = 100
test_limit = 30
crop_padding = { low = 1, high = 3 }
flip = true

[model]
name = "alexnet28"
dropout = { low = 0.0, high = 0.5 }

[optimizer]
name = "adam"
lr = 0.001

[train]
epochs = 1
label_smoothing = { low = 0.05, high = 0.2 }
clip_grad_norm = { low = 0.5, high = 2.0, log = true }
"""


def test_a_study_searches_every_recipe_key(tmp_path: Path) -> None:
    path = write_study(tmp_path, "recipe", SEARCH)
    url = f"sqlite:///{tmp_path / 'recipe.db'}"
    run_cli("run", "--study", str(path), "--storage", url, "--device", "cpu")
    [trial] = optuna.load_study(study_name="recipe", storage=url).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    params, config = trial.params, trial.user_attrs["config"]
    names = ["data.crop_padding", "model.dropout", "train.label_smoothing", "train.clip_grad_norm"]
    assert sorted(params) == sorted(names)
    assert isinstance(params["data.crop_padding"], int) and 1 <= params["data.crop_padding"] <= 3
    assert 0.0 <= params["model.dropout"] <= 0.5
    assert 0.05 <= params["train.label_smoothing"] <= 0.2 and 0.5 <= params["train.clip_grad_norm"] <= 2.0
    for name in names:
        section, key = name.split(".")
        assert config[section][key] == params[name], name


# Bad values.


@pytest.mark.parametrize(
    ("keys", "where", "message"),
    [
        ({"data": "crop_padding = -1"}, "data.crop_padding", "crop_padding must be at least 0, not -1"),
        ({"data": "crop_padding = 28"}, "data.crop_padding", "less than the 28-pixel image side"),
        ({"data": "crop_padding = 2.5"}, "data.crop_padding", "must be an integer"),
        ({"train": "label_smoothing = 1.0"}, "train.label_smoothing", "must be in [0, 1), not 1.0"),
        ({"train": "label_smoothing = -0.1"}, "train.label_smoothing", "must be in [0, 1), not -0.1"),
        (
            {"train": "label_smoothing = { low = 0.0, high = 1.0 }"},
            "train.label_smoothing",
            "must be in [0, 1), not 1.0",
        ),
        ({"train": "clip_grad_norm = -1.0"}, "train.clip_grad_norm", "must be 0 (off) or more, not -1.0"),
        (
            {"model": "alexnet28", "model_keys": "dropout = { low = 0.0, high = 1.0 }"},
            "model.dropout",
            "dropout must be in [0, 1), not 1.0",
        ),
        ({"model_keys": "dropout = 0.2"}, "model.dropout", "unknown key"),  # lenet has none
    ],
)
def test_a_bad_value_fails_at_load_in_one_line(
    tmp_path: Path, keys: dict[str, str], where: str, message: str
) -> None:
    values = {"data": "", "model": "lenet", "model_keys": "", "optimizer": "sgd", "lr": "0.1", "train": ""}
    path = write_study(tmp_path, "bad", STUDY.format(**{**values, **keys}))
    refused(path, where, message)


REGRESSION_STUDY = """
[data]
name = "toy_regression"
{data}

[model]
name = "mlp"

[optimizer]
name = "sgd"

[train]
{train}
"""


@pytest.mark.parametrize(
    ("data", "train_keys", "where", "message"),
    [
        ("", "label_smoothing = 0.1", "train.label_smoothing", "label smoothing applies to classes"),
        ("", "label_smoothing = { choices = [0.0, 0.1] }", "train.label_smoothing", "mean squared error"),
        ("crop_padding = 2", "", "data.crop_padding", "crop_padding shifts images; toy_regression has none"),
    ],
)
def test_a_regression_study_refuses_the_image_classification_keys(
    tmp_path: Path, data: str, train_keys: str, where: str, message: str
) -> None:
    path = write_study(tmp_path, "reg", REGRESSION_STUDY.format(data=data, train=train_keys))
    refused(path, where, message)
    with pytest.raises(ValueError, match="label smoothing applies to classes"):
        REGRESSION.loss(label_smoothing=0.1)
    # Off, as every resolved regression study has it, is fine.
    off = REGRESSION_STUDY.format(data="", train="label_smoothing = 0.0")
    load_spec(write_study(tmp_path, "reg-off", off))


def refused(path: Path, where: str, message: str) -> None:
    """``path`` is refused by the library with a ``SpecError`` and by ``hpsearch run`` with exit
    code 1 and one line naming the file and the key, before anything is stored."""
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(error.value).startswith(f"{path}: {where}") and message in str(error.value)
    db = path.parent / "refused.db"
    result = CliRunner().invoke(main, ["run", "--study", str(path), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    [line] = result.output.strip().splitlines()
    assert line == f"Error: {error.value}"
    assert not db.exists()
