"""Study files: every bundled study loads and samples; malformed ones fail with precise messages."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from torch import nn

from hpsearch.datasets import DATASETS
from hpsearch.models import MODELS
from hpsearch.optim import OPTIMIZERS, SCHEDULERS, Schedule, build_optimizer, build_scheduler
from hpsearch.search import PRUNERS, SAMPLERS
from hpsearch.spec import SpecError, StudySpec, find_study_file, load_spec
from hpsearch.study import open_study
from hpsearch.task import CLASSIFICATION

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY_FILES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.toml"))

BASE = """
[data]
name = "synthetic"

[model]
name = "mnist_cnn"

[optimizer]
name = "sgd"
lr = 0.01
"""


def write(tmp_path: Path, text: str, name: str = "study") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def sample_configs(spec: StudySpec, n: int, sampler: optuna.samplers.BaseSampler | None = None) -> list[Any]:
    """``n`` trials' configurations, sampled the way ``hpsearch run`` samples them (study.optimize)."""
    study = optuna.create_study(sampler=sampler or spec.sampler(), direction=spec.direction)
    out: list[Any] = []

    def objective(trial: optuna.Trial) -> float:
        out.append((trial, spec.sample(trial).as_dict()))
        return float(len(out))

    study.optimize(objective, n_trials=n)
    assert len(out) == n
    return out


# Every study file in the repository.


@pytest.mark.parametrize("path", STUDY_FILES, ids=[p.stem for p in STUDY_FILES])
def test_every_study_file_loads_and_samples(path: Path, tmp_path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.direction in ("maximize", "minimize")
    assert isinstance(spec.sampler(), optuna.samplers.BaseSampler)
    assert isinstance(spec.pruner(), optuna.pruners.BasePruner)
    configs = (
        [(None, c) for c in run_grid(tmp_path, path.read_text())[1][:3]]
        if spec.enumerates
        else sample_configs(spec, 3)
    )
    for trial, cfg in configs:
        assert set(cfg) == {"data", "model", "optimizer", "scheduler", "train"}
        assert cfg["data"]["name"] in DATASETS
        assert cfg["model"]["name"] in MODELS
        assert cfg["optimizer"]["name"] in OPTIMIZERS
        assert cfg["scheduler"]["name"] in SCHEDULERS
        opt = cfg["optimizer"]["name"]
        assert set(cfg["optimizer"]) - {"name"} <= set(OPTIMIZERS.params(opt))
        sched = cfg["scheduler"]["name"]
        assert set(cfg["scheduler"]) - {"name"} <= set(SCHEDULERS.params(sched))
        assert all(isinstance(cfg["data"][k], int) for k in ("batch_size", "train_limit", "test_limit"))
        assert isinstance(cfg["train"]["epochs"], int)
        assert trial is None or all(k.split(".")[0] in cfg for k in trial.params)


def test_bundled_study_found_by_name() -> None:
    assert STUDY_FILES
    first = STUDY_FILES[0]
    assert find_study_file(first.stem).resolve() == first.resolve()
    assert load_spec(first.stem).name == first.stem


# Malformed files: each error names the file, the key and the valid values.

MALFORMED: dict[str, tuple[str, list[str]]] = {
    "unknown_section": (
        BASE + "[training]\nepochs = 3\n",
        ["[training]", "unknown section", "study, data, model, optimizer, scheduler, train"],
    ),
    "unknown_data_key": (
        BASE.replace('name = "synthetic"', 'name = "synthetic"\nbatchsize = 32'),
        ["data.batchsize", "unknown key", "batch_size", "val_fraction", "train_limit"],
    ),
    "unknown_optimizer_key": (
        BASE + "lrr = 0.1\n",
        ["optimizer.lrr", "unknown key for sgd", "valid: dampening, lr, momentum, nesterov, weight_decay"],
    ),
    "unknown_model": (
        BASE.replace('"mnist_cnn"', '"mnist_cnnn"'),
        ["model.name", "'mnist_cnnn'", "lenet", "mnist_cnn", "resnet18"],
    ),
    "unknown_dataset": (
        BASE.replace('"synthetic"', '"fashion"'),
        ["data.name", "'fashion'", "cifar10, fashion_mnist, mnist, synthetic, toy_regression"],
    ),
    "unknown_optimizer": (
        BASE.replace('"sgd"', '"adamm"'),
        ["optimizer.name", "'adamm'", "adadelta", "adam", "lbfgs", "sgd"],
    ),
    "unknown_optimizer_in_choices": (
        BASE.replace('name = "sgd"', 'name = { choices = ["sgd", "sgdd"] }'),
        ["optimizer.name", "'sgdd'", "adam", "sgd"],
    ),
    "unknown_scheduler": (
        BASE + '[scheduler]\nname = "cosinus"\n',
        ["scheduler.name", "'cosinus'", "cosine", "none", "onecycle", "step"],
    ),
    "unknown_sampler": (
        '[study]\nsampler = "bayes"\n' + BASE,
        ["study.sampler.name", "'bayes'", "cmaes, gp, grid, nsga2, qmc, random, tpe"],
    ),
    "unknown_pruner": (
        '[study]\npruner = { name = "medain" }\n' + BASE,
        ["study.pruner.name", "'medain'", "hyperband", "median", "none", "patient"],
    ),
    "unknown_sampler_arg": (
        '[study]\nsampler = { name = "tpe", n_startup = 3 }\n' + BASE,
        ["study.sampler.n_startup", "not an argument of sampler tpe", "n_startup_trials"],
    ),
    "pruner_missing_required_arg": (
        '[study]\npruner = "percentile"\n' + BASE,
        ["study.pruner.percentile", "missing", "pruner percentile requires percentile"],
    ),
    "nested_pruner_missing_required_arg": (
        '[study]\npruner = { name = "patient", patience = 2, wrapped = { name = "percentile" } }\n' + BASE,
        ["study.pruner.wrapped.percentile", "missing"],
    ),
    "lr_wrong_type": (
        BASE.replace("lr = 0.01", 'lr = "fast"'),
        ["optimizer.lr", "'fast'", "wrong type", "expected a number"],
    ),
    "batch_size_float": (
        BASE.replace('name = "synthetic"', 'name = "synthetic"\nbatch_size = 1.5'),
        ["data.batch_size", "1.5", "integer"],
    ),
    "batch_size_float_range": (
        BASE.replace('name = "synthetic"', 'name = "synthetic"\nbatch_size = { low = 16.0, high = 64 }'),
        ["data.batch_size", "integer"],
    ),
    "batch_size_float_choice": (
        BASE.replace('name = "synthetic"', 'name = "synthetic"\nbatch_size = { choices = [32, 64.5] }'),
        ["data.batch_size", "integer"],
    ),
    "epochs_float": (
        BASE + "[train]\nepochs = 2.5\n",
        ["train.epochs", "2.5", "integer"],
    ),
    "flip_not_bool": (
        BASE.replace('name = "synthetic"', 'name = "synthetic"\nflip = 1'),
        ["data.flip", "wrong type", "bool"],
    ),
    "low_above_high": (
        BASE.replace("lr = 0.01", "lr = { low = 0.1, high = 0.01 }"),
        ["optimizer.lr", "low (0.1) is greater than high (0.01)"],
    ),
    "log_range_low_zero": (
        BASE.replace("lr = 0.01", "lr = { low = 0.0, high = 0.1, log = true }"),
        ["optimizer.lr", "log range needs low > 0", "0.0"],
    ),
    "empty_choices": (
        BASE.replace("lr = 0.01", "lr = { choices = [] }"),
        ["optimizer.lr", "non-empty list"],
    ),
    "range_without_high": (
        BASE.replace("lr = 0.01", "lr = { low = 0.01 }"),
        ["optimizer.lr", "needs low and high"],
    ),
    "table_for_choice_not_offered": (
        BASE.replace('name = "sgd"', 'name = { choices = ["sgd", "rmsprop"] }')
        + "[optimizer.adam]\nlr = 0.1\n",
        ["optimizer.adam", "does not offer", "offered: sgd, rmsprop"],
    ),
    "table_neither_range_nor_choices": (
        BASE.replace("lr = 0.01", "lr = { lo = 0.001, hi = 0.1 }"),
        ["optimizer.lr", "{low, high[, log, step]}", "{choices = [...]}"],
    ),
    "invalid_toml": (
        BASE + "momentum = = 0.9\n",
        ["not valid TOML", "line"],
    ),
    "missing_model_name": (
        BASE.replace('name = "mnist_cnn"', "dropout = 0.2"),
        ["model.name", "missing", "[model] name = "],
    ),
    "missing_data_section": (
        BASE.replace('[data]\nname = "synthetic"\n', ""),
        ["data.name", "missing"],
    ),
    "model_needs_resize": (
        BASE.replace('"synthetic"', '"fashion_mnist"').replace('"mnist_cnn"', '"alexnet"'),
        ["data.resize", "alexnet needs 224×224", "28×28", "resize = 224"],
    ),
    "regression_model_on_images": (
        BASE.replace('"mnist_cnn"', '"mlp"'),
        ["model.name", "mlp is a regression model", "synthetic is a classification dataset"],
    ),
    "grid_with_range": (
        '[study]\nsampler = "grid"\n' + BASE.replace("lr = 0.01", "lr = { low = 0.001, high = 0.1 }"),
        ["optimizer.lr", "grid sampler needs {choices = [...]}", "not a range"],
    ),
    "grid_with_conditional_range": (
        '[study]\nsampler = "grid"\n'
        + BASE.replace('name = "sgd"', 'name = { choices = ["sgd", "adam"] }')
        + "[optimizer.sgd]\nmomentum = { low = 0.0, high = 0.9 }\n",
        ["optimizer.sgd.momentum", "grid sampler needs {choices = [...]}"],
    ),
    "weight_decay_with_lbfgs": (
        BASE.replace('name = "sgd"', 'name = { choices = ["sgd", "lbfgs"] }') + "weight_decay = 1e-4\n",
        ["optimizer.weight_decay", "unknown key for lbfgs", "put it in [optimizer.<name>]"],
    ),
    "key_in_choice_table_unknown": (
        BASE.replace('name = "sgd"', 'name = { choices = ["sgd", "adam"] }').replace("lr = 0.01\n", "")
        + "[optimizer.adam]\nmomentum = 0.9\n",
        ["optimizer.adam.momentum", "unknown key", "amsgrad", "betas", "lr"],
    ),
    "unknown_scheduler_key": (
        BASE + '[scheduler]\nname = "step"\nstepsize = 2\n',
        ["scheduler.stepsize", "unknown key for step", "valid: gamma, step_size"],
    ),
    "unknown_study_key": (
        "[study]\ntrials = 3\n" + BASE,
        ["study.trials", "unknown key", "n_trials"],
    ),
    "bad_direction": (
        '[study]\ndirection = "minimize"\n' + BASE,
        ["study.direction", "validation accuracy", "'maximize'"],
    ),
    "unknown_init_choice": (
        BASE.replace('name = "mnist_cnn"', 'name = "mnist_cnn"\ninit = { choices = ["default", "he"] }'),
        ["model.init", "'he'", "xavier_uniform", "kaiming_normal"],
    ),
    "unknown_init": (
        BASE.replace('name = "mnist_cnn"', 'name = "mnist_cnn"\ninit = "glorot"'),
        ["model.init", "'glorot'", "xavier_uniform", "kaiming_normal"],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_study_file(tmp_path: Path, case: str) -> None:
    text, expected = MALFORMED[case]
    path = write(tmp_path, text, case)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: "), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_base_study_is_valid(tmp_path: Path) -> None:
    # The malformed cases are one edit away from this file, so each error is due to that edit.
    spec = load_spec(write(tmp_path, BASE))
    assert spec.task is CLASSIFICATION and spec.direction == "maximize"


def test_integer_counts_are_accepted(tmp_path: Path) -> None:
    text = BASE.replace('name = "synthetic"', 'name = "synthetic"\nbatch_size = { choices = [32, 64] }')
    text += "[train]\nepochs = { low = 1, high = 4 }\neval_batch_size = 256\n"
    spec = load_spec(write(tmp_path, text))
    for _, cfg in sample_configs(spec, 5, optuna.samplers.RandomSampler(seed=0)):
        assert cfg["data"]["batch_size"] in (32, 64)
        assert isinstance(cfg["train"]["epochs"], int) and 1 <= cfg["train"]["epochs"] <= 4
        assert cfg["train"]["eval_batch_size"] == 256


def test_init_may_be_searched(tmp_path: Path) -> None:
    text = BASE.replace(
        'name = "mnist_cnn"', 'name = "mnist_cnn"\ninit = { choices = ["default", "xavier_normal"] }'
    )
    spec = load_spec(write(tmp_path, text))
    inits = {
        cfg["model"]["init"] for _, cfg in sample_configs(spec, 12, optuna.samplers.RandomSampler(seed=1))
    }
    assert inits == {"default", "xavier_normal"}


# Conditional parameters.

CONDITIONAL = """
[data]
name = "synthetic"
flip = true

[model]
name = "bn_cnn"
hidden = { low = 16, high = 64, step = 16 }

[optimizer]
name = { choices = ["sgd", "adam"] }
lr = { low = 1e-4, high = 1e-1, log = true }
weight_decay = 1e-5

[optimizer.sgd]
momentum = { low = 0.0, high = 0.9 }

[scheduler]
name = { choices = ["none", "step"] }

[scheduler.step]
step_size = { low = 1, high = 5 }
gamma = 0.5
"""


def test_conditional_parameters(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, CONDITIONAL))
    seen: set[tuple[str, str]] = set()
    for trial, cfg in sample_configs(spec, 30, optuna.samplers.RandomSampler(seed=0)):
        opt, sched = cfg["optimizer"]["name"], cfg["scheduler"]["name"]
        seen.add((opt, sched))
        assert trial.params["optimizer.name"] == opt and trial.params["scheduler.name"] == sched
        expected = {"optimizer.name", "optimizer.lr", "scheduler.name", "model.hidden"}
        if opt == "sgd":
            expected.add("optimizer.sgd.momentum")
        if sched == "step":
            expected.add("scheduler.step.step_size")
        assert set(trial.params) == expected
        # The per-choice key lands in the section under its plain name, and only for that choice.
        assert ("momentum" in cfg["optimizer"]) == (opt == "sgd")
        if opt == "sgd":
            assert 0.0 <= cfg["optimizer"]["momentum"] <= 0.9
            assert cfg["optimizer"]["momentum"] == trial.params["optimizer.sgd.momentum"]
        assert ("step_size" in cfg["scheduler"]) == (sched == "step")
        assert ("gamma" in cfg["scheduler"]) == (sched == "step")
        if sched == "step":
            size = cfg["scheduler"]["step_size"]
            assert isinstance(size, int) and 1 <= size <= 5
            assert cfg["scheduler"]["gamma"] == 0.5
        lr = cfg["optimizer"]["lr"]
        assert isinstance(lr, float) and 1e-4 <= lr <= 1e-1
        hidden = cfg["model"]["hidden"]
        assert isinstance(hidden, int) and hidden in (16, 32, 48, 64)
        # Fixed values and defaults.
        assert cfg["optimizer"]["weight_decay"] == 1e-5
        assert cfg["data"] == {
            "name": "synthetic",
            "batch_size": 128,
            "val_fraction": 0.1,
            "resize": 0,
            "flip": True,
            "crop_padding": 0,
            "train_limit": 0,
            "test_limit": 0,
        }
        assert cfg["train"] == {
            "epochs": 10,
            "l1": 0.0,
            "max_loss": pytest.approx(10 * math.log(10)),  # resolved at load: 10·ln(classes)
            "eval_batch_size": None,  # the device's own, chosen when it trains (train.EVAL_BATCH)
            "seed": None,
            "max_minutes": None,
            "compile": False,
            "label_smoothing": 0.0,
            "clip_grad_norm": 0.0,
        }
        assert cfg["model"]["init"] == "default" and cfg["model"]["name"] == "bn_cnn"
    assert seen == {("sgd", "none"), ("sgd", "step"), ("adam", "none"), ("adam", "step")}


def test_log_range_spans_decades(tmp_path: Path) -> None:
    # A log range samples the small decades about as often as the large ones.
    spec = load_spec(
        write(tmp_path, BASE.replace("lr = 0.01", "lr = { low = 1e-5, high = 1e-1, log = true }"))
    )
    lrs = [
        cfg["optimizer"]["lr"] for _, cfg in sample_configs(spec, 40, optuna.samplers.RandomSampler(seed=0))
    ]
    assert all(1e-5 <= lr <= 1e-1 for lr in lrs)
    assert sum(lr < 1e-3 for lr in lrs) >= 10


def run_grid(tmp_path: Path, text: str) -> tuple[StudySpec, list[dict[str, Any]]]:
    """A grid study created in a real SQLite file, each queued trial sampled through Optuna."""
    spec = load_spec(write(tmp_path, text, "grid"))
    study = open_study(spec, f"sqlite:///{tmp_path / 'grid.db'}")
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(queued) == len(spec.grid()) == spec.n_trials
    configs: list[dict[str, Any]] = []
    study.optimize(lambda t: configs.append(spec.sample(t).as_dict()) or 0.0, n_trials=len(queued))
    return spec, configs


def test_grid_sampler_covers_choices(tmp_path: Path) -> None:
    text = '[study]\nsampler = "grid"\n' + BASE.replace("lr = 0.01", "lr = { choices = [0.1, 0.01] }")
    text = text.replace('name = "sgd"', 'name = { choices = ["sgd", "adam"] }')
    _, configs = run_grid(tmp_path, text)
    got = [(c["optimizer"]["name"], c["optimizer"]["lr"]) for c in configs]
    assert sorted(got) == sorted([("sgd", 0.1), ("sgd", 0.01), ("adam", 0.1), ("adam", 0.01)])


def test_grid_with_conditional_parameters_runs_each_configuration_once(tmp_path: Path) -> None:
    # Optuna's GridSampler would take the product with the unused momentum choices: 3 × 2 + 3 × 2 × 3 =
    # 24 trials, each Adam configuration three times. The union of each branch's grid is 3 + 9 = 12.
    text = '[study]\nsampler = "grid"\n' + BASE.replace("lr = 0.01", "lr = { choices = [0.1, 0.01, 0.3] }")
    text = text.replace('name = "sgd"', 'name = { choices = ["sgd", "adam"] }')
    text += "[optimizer.sgd]\nmomentum = { choices = [0.0, 0.5, 0.9] }\n"
    spec, configs = run_grid(tmp_path, text)
    assert spec.n_trials == 12
    seen = [json.dumps(c["optimizer"], sort_keys=True) for c in configs]
    assert len(seen) == len(set(seen)) == 12
    assert sum(c["optimizer"]["name"] == "adam" for c in configs) == 3
    momenta = {
        (c["optimizer"]["lr"], c["optimizer"]["momentum"]) for c in configs if c["optimizer"]["name"] == "sgd"
    }
    assert momenta == {(lr, m) for lr in (0.1, 0.01, 0.3) for m in (0.0, 0.5, 0.9)}


def test_grid_refuses_more_trials_than_configurations(tmp_path: Path) -> None:
    text = '[study]\nsampler = "grid"\nn_trials = 3\n' + BASE.replace(
        "lr = 0.01", "lr = { choices = [0.1, 0.01] }"
    )
    with pytest.raises(SpecError, match="the grid has 2 configurations, fewer than n_trials = 3"):
        load_spec(write(tmp_path, text))


@pytest.mark.parametrize("sampler", SAMPLERS.names())
def test_every_sampler_builds_from_a_study_file(tmp_path: Path, sampler: str) -> None:
    lr = "{ choices = [0.1, 0.01] }" if sampler == "grid" else "{ low = 0.001, high = 0.1 }"
    text = f'[study]\nsampler = "{sampler}"\nseed = 3\n' + BASE.replace("lr = 0.01", f"lr = {lr}")
    spec = load_spec(write(tmp_path, text))
    assert isinstance(spec.sampler(), optuna.samplers.BaseSampler)
    configs = run_grid(tmp_path, text)[1] if sampler == "grid" else [c for _, c in sample_configs(spec, 2)]
    assert len(configs) == 2
    for cfg in configs:
        assert 0.001 <= cfg["optimizer"]["lr"] <= 0.1


@pytest.mark.parametrize("pruner", PRUNERS.names())
def test_every_pruner_builds_from_a_study_file(tmp_path: Path, pruner: str) -> None:
    args = {
        "threshold": ", lower = 0.1",
        "percentile": ", percentile = 25.0",
        "patient": ', patience = 2, wrapped = { name = "median" }',
    }
    text = f'[study]\npruner = {{ name = "{pruner}"{args.get(pruner, "")} }}\n' + BASE
    built = load_spec(write(tmp_path, text)).pruner()
    assert isinstance(built, PRUNERS[pruner])


# Every optimizer and scheduler is reachable from a study file.


def _scalar_defaults(params: dict[str, inspect.Parameter], allowed: set[str]) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in params.items()
        if k in allowed and isinstance(p.default, bool | int | float) and math.isfinite(p.default)
    }


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_from_a_study_file(tmp_path: Path, name: str) -> None:
    values = _scalar_defaults(OPTIMIZERS.params(name), set(OPTIMIZERS.params(name)))
    values["lr"] = 0.0123
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    text = BASE.replace('name = "sgd"\nlr = 0.01\n', f'name = "{name}"\n{body}')
    spec = load_spec(write(tmp_path, text))
    [(_, cfg)] = sample_configs(spec, 1)
    assert cfg["optimizer"].items() >= {"name": name, **values}.items()
    model = nn.Linear(4, 2)
    opt = build_optimizer(**cfg["optimizer"], params=model.parameters())
    assert isinstance(opt, OPTIMIZERS[name])
    for key, value in values.items():
        assert opt.param_groups[0][key] == value, key


# Values for the arguments whose default is None ("work it out from the run").
SCHEDULER_VALUES: dict[str, dict[str, Any]] = {
    "multistep": {"milestones": [2, 4]},
    "cosine": {"T_max": 5},
    "onecycle": {"max_lr": 0.5},
    "polynomial": {"total_iters": 5},
}


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_from_a_study_file(tmp_path: Path, name: str) -> None:
    params = SCHEDULERS.params(name)
    values = {**_scalar_defaults(params, set(params)), **SCHEDULER_VALUES.get(name, {})}
    body = "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())
    text = BASE.replace("lr = 0.01", "lr = 0.1") + f'[scheduler]\nname = "{name}"\n{body}'
    spec = load_spec(write(tmp_path, text))
    [(_, cfg)] = sample_configs(spec, 1)
    assert cfg["scheduler"] == {"name": name, **values}
    model = nn.Linear(4, 2)
    opt = build_optimizer(**cfg["optimizer"], params=model.parameters())
    run = Schedule(epochs=6, steps_per_epoch=5, mode="max")
    stepper = build_scheduler(**cfg["scheduler"], optimizer=opt, run=run)
    if name == "none":
        assert stepper.scheduler is None
        return
    assert stepper.scheduler is not None
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for epoch in range(run.epochs):
        for _ in range(run.steps_per_epoch):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            stepper.after_batch()
        stepper.after_epoch(0.5)
        assert math.isfinite(opt.param_groups[0]["lr"]), epoch


# Finding study files.


def test_unknown_study_name_lists_known_studies() -> None:
    with pytest.raises(SpecError) as err:
        find_study_file("no-such-study")
    message = str(err.value)
    assert "'no-such-study'" in message and "known studies:" in message
    for path in STUDY_FILES:
        assert path.stem in message


def test_missing_toml_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(SpecError, match="does not exist") as err:
        load_spec(missing)
    assert str(missing) in str(err.value)


def test_local_studies_folder_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "studies").mkdir()
    write(tmp_path / "studies", BASE, "mine")
    monkeypatch.chdir(tmp_path)
    assert find_study_file("mine") == Path("studies") / "mine.toml"
    assert load_spec("mine").name == "mine"


def test_a_float_argument_is_searched_as_floats_whatever_the_bounds_spelling(tmp_path: Path) -> None:
    # SGD's momentum and alexnet28's dropout are floats in their signatures: integer bounds must not
    # turn them into an integer search of {0, 1} (dropout 1 would zero every activation).
    text = BASE.replace('"mnist_cnn"', '"alexnet28"\ndropout = { low = 0, high = 0.5 }')
    text = text.replace("lr = 0.01", "lr = 0.01\nmomentum = { low = 0, high = 1 }")
    spec = load_spec(write(tmp_path, text))
    momenta = [
        c["optimizer"]["momentum"] for _, c in sample_configs(spec, 20, optuna.samplers.RandomSampler(seed=0))
    ]
    assert all(isinstance(m, float) and 0 <= m <= 1 for m in momenta)
    assert sum(0 < m < 1 for m in momenta) >= 18
    trial_distributions = sample_configs(spec, 1)[0][0].distributions
    assert isinstance(trial_distributions["optimizer.momentum"], optuna.distributions.FloatDistribution)
    assert isinstance(trial_distributions["model.dropout"], optuna.distributions.FloatDistribution)
