"""VGG for CIFAR, as a plain (skip-free) stack of conv stages; ``cnn1d`` reuses it.

Registered: ``vgg11``, ``vgg16`` (the CIFAR variants of kuangliu/pytorch-cifar that
the trajectory papers train: 3×3 convs, a max-pool closing every stage, one linear
head 512 -> classes, no dropout).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from gammatrace.models.layers import (
    GLOBAL_AVG_POOL,
    MAX_POOL,
    activation_factory,
    conv_norm,
    placement,
    scaled,
    spatial_dim,
)
from gammatrace.models.registry import MODELS

# Output channels of each conv, grouped by stage; every stage ends in a 2× max-pool.
VGG_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class PlainConvNet(nn.Module):
    """Stages of (conv -> norm -> activation) layers, each closed by a max-pool, then
    global average pooling and one linear head. See :func:`plain_convnet`."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        stages: tuple[tuple[int, ...], ...],
        *,
        width: float = 1.0,
        kernel_size: int = 3,
        activation: str = "relu",
        activation_options: dict | None = None,
        norm_type: str = "batch",
        norm: str = "all",
        conv_bias: bool | str = True,
    ):
        super().__init__()
        dim = spatial_dim(input_shape)
        keep_norm = placement(norm)
        act = activation_factory(activation, activation_options)
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for stage in stages:
            for i, out in enumerate(stage):
                out = scaled(out, width)
                conv, nrm = conv_norm(
                    dim, channels, out, kernel_size,
                    norm_type=norm_type, keep_norm=keep_norm(i, len(stage)), conv_bias=conv_bias,
                )  # fmt: skip
                layers += [conv, nrm, act()]
                channels = out
            # ceil_mode lets inputs smaller than 2**len(stages) (CPU-sized 16×16) pass
            # every pool; for 32×32 CIFAR inputs it changes nothing.
            layers.append(MAX_POOL[dim](2, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        # At 32×32 the features are already 1×1 after five pools, so the global pool is
        # a no-op there; it makes the head independent of the input size.
        self.pool = GLOBAL_AVG_POOL[dim](1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def plain_convnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    stages: tuple[tuple[int, ...], ...] = VGG_STAGES["vgg11"],
    **switches,
) -> PlainConvNet:
    """A VGG-style network: ``stages`` lists each conv's output channels, stage by stage.

    Switches: ``width`` (channel multiplier), ``kernel_size``, ``activation`` (+
    ``activation_options``), ``norm_type`` (any name of the norm registry; "none" drops
    them all), ``norm`` placement within each stage (``all`` | ``first`` — only the
    stage's first norm layer — | ``none``, or any other name of
    :data:`gammatrace.models.layers.PLACEMENTS`), ``conv_bias`` (True | False | "auto",
    see :func:`gammatrace.models.layers.conv_norm`). VGG defaults to ``conv_bias=True``
    because the reference CIFAR VGG — and the parameter counts the papers quote, e.g.
    VGG-16 14,728,266 — keep the bias in front of batch norm; under batch norm those
    biases get zero gradient and stay where they were initialized.

    Example:
        >>> from gammatrace.models import build, count_params
        >>> count_params(build("vgg16"))
        14728266
        >>> net = build("vgg11", input_shape=(3, 16, 16), width=0.125, norm="first")
        >>> sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        5
    """
    return PlainConvNet(input_shape, num_classes, stages, **switches)


for _name, _stages in VGG_STAGES.items():
    MODELS.register(_name)(partial(plain_convnet, stages=_stages))
del _name, _stages
