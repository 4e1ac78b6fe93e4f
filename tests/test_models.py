import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hpsearch.models import INITS, MODELS, build_model, input_size, task
from hpsearch.registry import UnknownName


def _weighted(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _biases_zero(layers: list[nn.Conv2d | nn.Linear]) -> bool:
    return all(layer.bias is not None and not layer.bias.any() for layer in layers)


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    if task(name) == "regression":
        in_channels, num_classes, x = 1, 1, torch.randn(2, 1)
    else:
        in_channels, num_classes = (3 if name == "cifar_cnn" else 1), 10
        side = input_size(name) or 32
        x = torch.rand(2, in_channels, side, side)
    model = build_model(name, in_channels, num_classes)

    out = model(x)
    assert out.shape == (2, num_classes)
    if task(name) == "regression":
        loss = nn.functional.mse_loss(out, x.pow(2))
    else:
        loss = nn.functional.cross_entropy(out, torch.tensor([0, 1]))
    loss.backward()

    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The first layer's gradient being non-zero shows the loss reaches all the way back.
    first = _weighted(model)[0].weight.grad
    assert first is not None and first.abs().sum() > 0


def test_every_model_has_known_task_and_input_size() -> None:
    for name in MODELS.names():
        assert task(name) in ("classification", "regression")
        assert input_size(name) in (None, 28, 32, 224)
        assert MODELS.doc(name)


def test_default_init_is_pytorch_own() -> None:
    torch.manual_seed(0)
    plain = MODELS["lenet"](1, 10)
    torch.manual_seed(0)
    built = build_model("lenet", 1, 10, init="default")
    for a, b in zip(plain.state_dict().values(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b)


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


def test_every_init_is_covered() -> None:
    assert set(INITS) == {"default", "constant", *_RANDOM_INITS}


@pytest.mark.parametrize("init", sorted(_RANDOM_INITS))
def test_random_inits_follow_their_scale(init: str) -> None:
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
        input_size("lenet6")


def test_vgg11_ratio_divides_channels() -> None:
    convs = [m for m in build_model("vgg11", 1, 10, ratio=4).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    tiny = _weighted(build_model("vgg11", 1, 10, ratio=64))
    assert [m.out_channels for m in tiny if isinstance(m, nn.Conv2d)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert next(m for m in tiny if isinstance(m, nn.Linear)).in_features == 8 * 7 * 7


@pytest.mark.parametrize("ratio", [0, -2, 3, 128])
def test_vgg11_bad_ratio(ratio: int) -> None:
    with pytest.raises(ValueError, match="ratio"):
        build_model("vgg11", 1, 10, ratio=ratio)


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
    assert sorted(OWN_KWARGS) == MODELS.names()
    for name, own in OWN_KWARGS.items():
        params = MODELS.params(name)
        assert set(params) == own, name
        assert all(p.default is not p.empty for p in params.values()), name


def test_own_kwargs_reach_the_layers() -> None:
    dropouts = list(build_model("alexnet28", 1, 10, dropout=0.2).modules())
    assert [m.p for m in dropouts if isinstance(m, nn.Dropout)] == [0.2]
    assert [m.weight.shape for m in _weighted(build_model("mlp", 3, 2, hidden=7))] == [
        (7, 3),
        (2, 7),
    ]
    assert _weighted(build_model("bn_cnn", 1, 10, hidden=5))[-1].in_features == 5
