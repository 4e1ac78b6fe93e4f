"""Every registered network builds, runs forward and backward, initialises as asked and checks its args."""

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hpsearch import models
from hpsearch.models import INITS, MODELS, build_model
from hpsearch.registry import UnknownName
from hpsearch.task import CLASSIFICATION, REGRESSION

# The networks hpsearch ships; the registry may also hold plug-ins (conftest registers two).
BUILTIN = [n for n in MODELS.names() if MODELS[n].__module__ == models.__name__]


def _weighted(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _biases_zero(layers: list[nn.Conv2d | nn.Linear]) -> bool:
    return all(layer.bias is not None and not layer.bias.any() for layer in layers)


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _inputs(name: str, side: int | None = None) -> tuple[int, int, torch.Tensor]:
    """in_channels, outputs and a batch of two inputs the facts of ``name`` say it takes."""
    facts = MODELS.facts(name)
    if facts.task is REGRESSION:
        return 1, 1, torch.randn(2, 1)
    in_channels = 3 if name == "cifar_cnn" else 1
    side = side or facts.input_size or 32
    return in_channels, 10, torch.rand(2, in_channels, side, side)


# Real forward and backward passes through the 224×224 nets and ResNet take seconds on a CPU.
_HEAVY = {"alexnet", "alexnet_small", "vgg11", "resnet18"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in BUILTIN]
)
def test_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    in_channels, num_classes, x = _inputs(name)
    model = build_model(name, in_channels, num_classes)

    out = model(x)
    assert out.shape == (2, num_classes)
    if MODELS.facts(name).task is REGRESSION:
        loss = nn.functional.mse_loss(out, x.pow(2))
    else:
        loss = nn.functional.cross_entropy(out, torch.tensor([0, 1]))
    loss.backward()

    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The first layer's gradient being non-zero shows the loss reaches all the way back.
    first = _weighted(model)[0].weight.grad
    assert first is not None and first.abs().sum() > 0


@pytest.mark.parametrize("name", BUILTIN)
def test_output_shape_at_the_input_size_of_the_facts(name: str) -> None:
    # On the meta device a forward pass computes shapes only: every net, 224×224 ones included.
    in_channels, num_classes, x = _inputs(name)
    with torch.device("meta"):
        model = build_model(name, in_channels, num_classes)
        assert model(x.to("meta")).shape == (2, num_classes)


def test_facts_of_every_model() -> None:
    for name in BUILTIN:
        facts = MODELS.facts(name)
        assert facts.task is (REGRESSION if name == "mlp" else CLASSIFICATION), name
        assert facts.input_size in (None, 28, 32, 224), name
        assert MODELS.doc(name), name
    assert "resnet18" in _ANY_SIZE  # the any-size test below runs on something


_ANY_SIZE = [
    n for n in BUILTIN if MODELS.facts(n).input_size is None and MODELS.facts(n).task is CLASSIFICATION
]


@pytest.mark.parametrize("name", _ANY_SIZE)
def test_any_input_size_works_where_the_facts_say_so(name: str) -> None:
    # A model whose facts give no input_size runs on images of sizes no other model takes.
    for side in (20, 37):
        in_channels, num_classes, x = _inputs(name, side)
        with torch.device("meta"):
            model = build_model(name, in_channels, num_classes)
            assert model(x.to("meta")).shape == (2, num_classes)


def test_input_size_is_the_size_the_first_linear_layer_needs() -> None:
    # The lenet and alexnet28 heads are sized for 28×28: 32×32 does not fit them.
    for name in ("lenet", "alexnet28"):
        assert MODELS.facts(name).input_size == 28
        with pytest.raises(RuntimeError):
            build_model(name, 1, 10)(torch.rand(1, 1, 32, 32))


def test_default_init_is_pytorch_own() -> None:
    torch.manual_seed(0)
    plain = MODELS["lenet"](1, 10)
    torch.manual_seed(0)
    built = build_model("lenet", 1, 10, init="default")
    for a, b in zip(plain.state_dict().values(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert INITS["default"] is None


def test_constant_init_sets_weights_and_zeroes_biases() -> None:
    layers = _weighted(build_model("lenet", 1, 10, init="constant", init_value=0.5))
    assert all(torch.all(layer.weight == 0.5) for layer in layers)
    assert _biases_zero(layers)


# init → (uniform?, bound or std from fan-in and fan-out) for the random inits.
_RANDOM_INITS: dict[str, tuple[bool, Callable[[int, int], float]]] = {
    "xavier_uniform": (True, lambda fi, fo: math.sqrt(6 / (fi + fo))),
    "xavier_normal": (False, lambda fi, fo: math.sqrt(2 / (fi + fo))),
    "kaiming_uniform": (True, lambda fi, fo: math.sqrt(6 / fi)),
    "kaiming_normal": (False, lambda fi, fo: math.sqrt(2 / fi)),
}


@pytest.mark.parametrize("init", [i for i in INITS if i not in ("default", "constant")])
def test_random_inits_follow_their_scale(init: str) -> None:
    # Parametrised over INITS itself: a new random init fails here until its scale is added above.
    assert init in _RANDOM_INITS, f"init {init!r} has no expected scale in this test"
    uniform, scale = _RANDOM_INITS[init]
    torch.manual_seed(0)
    layers = _weighted(build_model("lenet", 1, 10, init=init))
    assert _biases_zero(layers)
    # Linear(400, 120): 48,000 weights, enough for a tight statistical check.
    weight = next(m.weight for m in layers if m.weight.shape == (120, 400)).detach()
    expected = scale(*_fans(weight))
    if uniform:
        assert weight.abs().max() <= expected
        assert weight.abs().max() > 0.99 * expected
    else:
        assert weight.std().item() == pytest.approx(expected, rel=0.03)
        # A uniform draw of this std never exceeds √3·std; a normal one does in about 8 % of draws.
        assert weight.abs().max() > math.sqrt(3) * expected


def test_unknown_init_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="orthogonal") as err:
        build_model("lenet", 1, 10, init="orthogonal")
    assert all(init in str(err.value) for init in INITS)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnknownName) as err:
        build_model("lenet6", 1, 10)
    assert all(name in str(err.value) for name in MODELS.names())
    with pytest.raises(UnknownName):
        MODELS.facts("lenet6")
    with pytest.raises(KeyError):  # UnknownName is also a KeyError
        MODELS.facts("lenet6")


def test_vgg11_ratio_divides_channels() -> None:
    with torch.device("meta"):
        convs = [m for m in build_model("vgg11", 1, 10, ratio=4).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    tiny = _weighted(build_model("vgg11", 1, 10, ratio=64))
    assert [m.out_channels for m in tiny if isinstance(m, nn.Conv2d)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert next(m for m in tiny if isinstance(m, nn.Linear)).in_features == 8 * 7 * 7


@pytest.mark.parametrize("ratio", [0, -2, 3, 128])
def test_vgg11_bad_ratio(ratio: int) -> None:
    with pytest.raises(ValueError, match="ratio"):
        build_model("vgg11", 1, 10, ratio=ratio)


# Own keyword arguments: dropout and hidden are checked for every model that takes them.

_WITH_DROPOUT = [n for n in BUILTIN if "dropout" in MODELS.params(n)]
_WITH_HIDDEN = [n for n in BUILTIN if "hidden" in MODELS.params(n)]


def _meta_build(name: str, **kwargs: object) -> nn.Module:
    # The meta device builds the layers' shapes without allocating memory: the 224×224 nets are free.
    in_channels, num_classes, _ = _inputs(name)
    with torch.device("meta"):
        return build_model(name, in_channels, num_classes, **kwargs)


def test_models_with_dropout_and_hidden() -> None:
    # The loops below must reach something: the seeds' nets with dropout and a hidden width.
    assert {"alexnet", "alexnet_small", "alexnet28", "vgg11"} <= set(_WITH_DROPOUT)
    assert {"bn_cnn", "cifar_cnn", "mlp"} <= set(_WITH_HIDDEN)


@pytest.mark.parametrize("name", _WITH_DROPOUT)
def test_dropout_outside_zero_to_one_is_refused(name: str) -> None:
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout"):
            _meta_build(name, dropout=p)
    for p in (0.0, 0.99):
        layers = [m for m in _meta_build(name, dropout=p).modules() if isinstance(m, nn.Dropout)]
        assert layers and all(m.p == p for m in layers), name


@pytest.mark.parametrize("name", _WITH_HIDDEN)
def test_hidden_below_one_is_refused(name: str) -> None:
    for width in (0, -3):
        with pytest.raises(ValueError, match="hidden"):
            _meta_build(name, hidden=width)
    linears = [m for m in _meta_build(name, hidden=1).modules() if isinstance(m, nn.Linear)]
    assert [m.in_features for m in linears][-1] == 1


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet_parameter_count() -> None:
    # conv 6·1·5·5+6, conv 16·6·5·5+16, fc 400·120+120, fc 120·84+84, fc 84·10+10
    assert 156 + 2_416 + 48_120 + 10_164 + 850 == 61_706
    assert _count(build_model("lenet", 1, 10)) == 61_706


@pytest.mark.parametrize(("in_channels", "expected"), [(1, 46_764_746), (3, 46_787_978)])
def test_alexnet_parameter_count(in_channels: int, expected: int) -> None:
    convs = 96 * in_channels * 11 * 11 + 96
    convs += 256 * 96 * 5 * 5 + 256 + 384 * 256 * 9 + 384 + 384 * 384 * 9 + 384 + 256 * 384 * 9 + 256
    linears = 6400 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
    assert convs + linears == expected
    with torch.device("meta"):
        assert _count(build_model("alexnet", in_channels, 10)) == expected


OWN_KWARGS = {
    "lenet": set(),
    "alexnet": {"dropout"},
    "alexnet_small": {"dropout"},
    "alexnet28": {"dropout"},
    "vgg11": {"ratio", "dropout"},
    "resnet18": set(),
    "bn_cnn": {"hidden"},
    "cifar_cnn": {"hidden"},
    "mnist_cnn": set(),
    "mlp": {"hidden"},
}


def test_params_are_exactly_the_own_kwargs() -> None:
    assert sorted(OWN_KWARGS) == BUILTIN
    for name, own in OWN_KWARGS.items():
        params = MODELS.params(name)
        assert set(params) == own, name
        assert all(p.default is not p.empty for p in params.values()), name
        assert not {"in_channels", "num_classes"} & set(params), name


def test_own_kwargs_reach_the_layers() -> None:
    dropouts = list(build_model("alexnet28", 1, 10, dropout=0.2).modules())
    assert [m.p for m in dropouts if isinstance(m, nn.Dropout)] == [0.2]
    assert [m.weight.shape for m in _weighted(build_model("mlp", 3, 2, hidden=7))] == [
        (7, 3),
        (2, 7),
    ]
    assert _weighted(build_model("bn_cnn", 1, 10, hidden=5))[-1].in_features == 5
