"""Table-driven tests of the convolutional zoo: every network trains a little, has the
published size, and every switch removes exactly what it names."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from gammatrace.models import MODELS, build, count_params
from gammatrace.models.resnet import BasicBlock
from gammatrace.registry import UnknownNameError

# name -> (small input shape, CPU-small switches, task). One row per registry entry.
ZOO = {
    "alexnet_small": ((3, 16, 16), dict(width=0.25), "classify"),
    "vgg11": ((3, 16, 16), dict(width=0.125), "classify"),
    "vgg16": ((3, 16, 16), dict(width=0.125), "classify"),
    "resnet18": ((3, 16, 16), dict(width=0.125), "classify"),
    "resnet34": ((3, 16, 16), dict(width=0.125), "classify"),
    "unet": ((3, 16, 16), dict(width=0.125), "regress"),
    "cnn1d": ((1, 40), {}, "classify"),
    "resnet1d": ((1, 40), {}, "classify"),
}
NUM_CLASSES = 10
BATCH = 16


def small(name: str, **switches) -> nn.Module:
    shape, defaults, _ = ZOO[name]
    torch.manual_seed(0)
    return build(name, input_shape=shape, num_classes=NUM_CLASSES, **{**defaults, **switches})


def fixed_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape, _, task = ZOO[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *shape, generator=g)
    if task == "regress":  # denoising: noisy input, clean target
        return x + 0.3 * torch.randn(x.shape, generator=g), x
    return x, torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)


def loss_of(name: str, model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    if ZOO[name][2] == "regress":
        return nn.functional.mse_loss(out, y)
    return nn.functional.cross_entropy(out, y)


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def test_every_zoo_network_is_registered():
    assert set(ZOO) <= set(MODELS.names())


@pytest.mark.parametrize("name", ZOO)
def test_forward_backward_and_three_sgd_steps_reduce_the_loss(name):
    model = small(name)
    batch = fixed_batch(name)
    expected = batch[1].shape if ZOO[name][2] == "regress" else (BATCH, NUM_CLASSES)
    assert model(batch[0]).shape == expected
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_of(name, model, batch)
        assert torch.isfinite(loss)
        loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        losses.append(loss.item())
        opt.step()
    assert losses[3] < losses[0], losses


# Counts of kuangliu/pytorch-cifar, the CIFAR networks the trajectory papers train.
@pytest.mark.parametrize(
    "name, params",
    [
        ("resnet18", 11_173_962),
        ("resnet34", 21_282_122),
        ("vgg11", 9_231_114),
        ("vgg16", 14_728_266),
    ],
)
def test_full_size_cifar_parameter_counts_and_forward(name, params):
    model = build(name, input_shape=(3, 32, 32), num_classes=10)
    assert count_params(model) == params
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_alexnet_small_matches_zhang_et_al():
    # Table 1 of "Understanding deep learning requires rethinking generalization" (28×28 crops).
    model = build("alexnet_small", input_shape=(3, 28, 28), num_classes=10)
    assert count_params(model) == 1_387_786
    assert count(model, nn.LocalResponseNorm) == 2
    no_lrn = build("alexnet_small", input_shape=(3, 28, 28), num_classes=10, lrn=False)
    assert count(no_lrn, nn.LocalResponseNorm) == 0
    assert count_params(no_lrn) == count_params(model)  # LRN has no parameters


@pytest.mark.parametrize("name", ZOO)
def test_activation_switch_reaches_every_site(name):
    n_sites = count(small(name), nn.ReLU)
    assert n_sites > 0
    model = small(name, activation="leaky_relu", activation_options={"negative_slope": 0.2})
    assert count(model, nn.ReLU) == 0
    leaky = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == n_sites and all(m.negative_slope == 0.2 for m in leaky)


NORM_COUNTS = [
    # resnet: stem + 2 per block + 1 per projection; "first": stem + 1 per block
    ("resnet18", "all", 1 + 16 + 3), ("resnet18", "first", 1 + 8), ("resnet18", "none", 0),
    ("resnet34", "all", 1 + 32 + 3), ("resnet34", "first", 1 + 16), ("resnet34", "none", 0),
    ("resnet1d", "all", 1 + 12 + 2), ("resnet1d", "first", 1 + 6), ("resnet1d", "none", 0),
    # plain stacks: one per conv; "first": one per stage
    ("vgg11", "all", 8), ("vgg11", "first", 5), ("vgg11", "none", 0),
    ("vgg16", "all", 13), ("vgg16", "first", 5), ("vgg16", "none", 0),
    ("cnn1d", "all", 5), ("cnn1d", "first", 3), ("cnn1d", "none", 0),
    # unet: two per DoubleConv (4 encoder, bottleneck, 4 decoder)
    ("unet", "all", 18), ("unet", "first", 9), ("unet", "none", 0),
]  # fmt: skip


@pytest.mark.parametrize("name, norm, expected", NORM_COUNTS)
def test_norm_placement_counts(name, norm, expected):
    model = small(name, norm=norm)
    assert count(model, BATCH_NORMS) == expected
    model(fixed_batch(name)[0])  # still runs


def test_resnet_first_norm_keeps_stem_and_each_blocks_first_norm():
    model = small("resnet18", norm="first")
    assert isinstance(model.stem[1], nn.BatchNorm2d)
    for block in model.modules():
        if isinstance(block, BasicBlock):
            assert isinstance(block.norm1, nn.BatchNorm2d)
            assert isinstance(block.norm2, nn.Identity)
            if isinstance(block.shortcut, nn.Sequential):
                assert isinstance(block.shortcut[1], nn.Identity)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("switch", [dict(norm_type="none"), dict(norm="none")])
def test_removing_norms_gives_every_conv_a_bias(name, switch):
    if name == "alexnet_small":  # has no norm placement; it has no norm by default
        switch = dict(norm_type="none")
    model = small(name, **switch)
    assert count(model, BATCH_NORMS) == 0
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(c.bias is not None for c in convs)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet1d", "unet", "cnn1d"])
def test_auto_conv_bias_is_dropped_exactly_in_front_of_batch_norm(name):
    # In these nets every conv is followed directly by its norm (or is the output /
    # upsampling conv); VGG keeps the reference biases (conv_bias=True).
    model = small(name)
    modules = list(model.modules())
    for i, m in enumerate(modules):
        if isinstance(m, nn.modules.conv._ConvNd):
            followed_by_bn = i + 1 < len(modules) and isinstance(modules[i + 1], BATCH_NORMS)
            assert (m.bias is None) == followed_by_bn


def shortcut_counts(model: nn.Module) -> tuple[int, int]:
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert all(b.has_skip == (b.shortcut is not None) for b in blocks)
    projections = sum(isinstance(b.shortcut, nn.Sequential) for b in blocks)
    return sum(b.has_skip for b in blocks), projections


SKIP_COUNTS = [
    ("resnet18", "all", 8, 3), ("resnet18", "first", 4, 3), ("resnet18", "first2", 8, 3), ("resnet18", "none", 0, 0),
    ("resnet34", "all", 16, 3), ("resnet34", "first", 4, 3), ("resnet34", "first2", 8, 3), ("resnet34", "none", 0, 0),
    ("resnet1d", "all", 6, 2), ("resnet1d", "first", 3, 2), ("resnet1d", "none", 0, 0),
]  # fmt: skip


@pytest.mark.parametrize("name, skip, shortcuts, projections", SKIP_COUNTS)
def test_resnet_skip_placement_removes_shortcuts(name, skip, shortcuts, projections):
    model = small(name, skip=skip)
    assert shortcut_counts(model) == (shortcuts, projections)
    # Copy the weights of the all-skip network: only shortcut parameters may be left
    # over, and the output must change exactly when a shortcut was removed.
    full = small(name).eval()
    result = model.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(".shortcut." in key for key in result.unexpected_keys)
    assert bool(result.unexpected_keys) == (projections < shortcut_counts(full)[1])
    x = fixed_batch(name)[0]
    with torch.no_grad():
        same = torch.allclose(model.eval()(x), full(x))
    assert same == (shortcuts == shortcut_counts(full)[0])


UNET_SKIPS = {
    "all": [True, True, True, True],
    "last3": [False, True, True, True],
    "last2": [False, False, True, True],
    "last1": [False, False, False, True],
    "none": [False, False, False, False],
}


@pytest.mark.parametrize("skip", UNET_SKIPS)
def test_unet_skip_placement_in_decoder_order(skip):
    model = small("unet", skip=skip)
    assert [up.has_skip for up in model.decoder] == UNET_SKIPS[skip]
    for up in model.decoder:  # the decoder takes exactly the channels it is given
        assert up.conv[0].in_channels == up.up.out_channels * (2 if up.has_skip else 1)
    x = fixed_batch("unet")[0]
    assert model(x).shape == x.shape


def test_unet_removing_skips_removes_parameters():
    sizes = [count_params(small("unet", skip=skip)) for skip in UNET_SKIPS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def test_unet_ignores_num_classes_and_honours_out_channels():
    assert build("unet", input_shape=(3, 16, 16), num_classes=10, width=0.125).out.out_channels == 3
    assert build("unet", input_shape=(3, 16, 16), width=0.125, out_channels=1).out.out_channels == 1


@pytest.mark.parametrize(
    "name, shape, switches, error",
    [
        ("unet", (3, 30, 30), {}, ValueError),
        ("resnet18", (3,), {}, ValueError),
        ("resnet18", (3, 16, 16), dict(skip="sometimes"), UnknownNameError),
        ("vgg11", (3, 16, 16), dict(norm="most"), UnknownNameError),
        ("cnn1d", (1, 40), dict(conv_bias="maybe"), ValueError),
        ("cnn1d", (1, 40), dict(width=0), ValueError),
    ],
)
def test_bad_configs_are_loud(name, shape, switches, error):
    with pytest.raises(error):
        build(name, input_shape=shape, num_classes=10, **switches)


def weight_normed(model: nn.Module) -> int:
    return sum(parametrize.is_parametrized(m, "weight") for m in model.modules())


@pytest.mark.parametrize(
    "name, norm, expected",
    [
        ("resnet18", "all", 1 + 16 + 3), ("resnet18", "first", 1 + 8), ("resnet18", "none", 0),
        ("vgg16", "first", 5), ("unet", "all", 18), ("cnn1d", "all", 5),
        ("alexnet_small", "all", 2 + 2),  # two convs, two hidden FC layers
    ],
)  # fmt: skip
def test_weight_norm_follows_the_norm_placement(name, norm, expected):
    switches = dict(norm_type="weight") | ({} if name == "alexnet_small" else dict(norm=norm))
    model = small(name, **switches)
    assert weight_normed(model) == expected and count(model, BATCH_NORMS) == 0
    loss = loss_of(name, model, fixed_batch(name))
    loss.backward()
    assert torch.isfinite(loss)
