"""ResNet with switchable norm and skip placement, for 1-D and 2-D inputs.

Registered: ``resnet18``, ``resnet34`` — the CIFAR variants (3×3 stem conv, no
max-pool, BasicBlocks, widths 64–512, 1×1 conv + norm projection where the shape
changes, global average pool, linear head). ``resnet1d`` (MNIST-1D) is the same
implementation with other depths and widths; see :mod:`gammatrace.models.cnn1d`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.models.layers import (
    GLOBAL_AVG_POOL,
    activation_factory,
    conv_norm,
    placement,
    scaled,
    spatial_dim,
)
from gammatrace.models.registry import MODELS

RESNET_BLOCKS: dict[str, tuple[int, ...]] = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
CIFAR_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """conv -> norm -> act -> conv -> norm (+ shortcut) -> act.

    ``has_skip`` says whether the block has a shortcut at all; without one it is a
    plain two-conv block and builds no projection (so removing skips removes their
    parameters too). ``keep_norm(i)`` decides the block's norm sites in forward
    order: 0 after conv1, 1 after conv2, 2 in the projection shortcut.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        has_skip: bool,
        keep_norm: Callable[[int], bool],
        kernel_size: int,
        norm_type: str,
        conv_bias: bool | str,
        act: Callable[[], nn.Module],
    ):
        super().__init__()
        common = dict(norm_type=norm_type, conv_bias=conv_bias)
        self.conv1, self.norm1 = conv_norm(
            dim, in_channels, out_channels, kernel_size, stride=stride, keep_norm=keep_norm(0), **common
        )  # fmt: skip
        self.act1 = act()
        self.conv2, self.norm2 = conv_norm(
            dim, out_channels, out_channels, kernel_size, keep_norm=keep_norm(1), **common
        )
        self.has_skip = has_skip
        self.shortcut: nn.Module | None = None
        if has_skip and (stride != 1 or in_channels != out_channels):
            projection = conv_norm(dim, in_channels, out_channels, 1, stride=stride, keep_norm=keep_norm(2), **common)  # fmt: skip
            self.shortcut = nn.Sequential(*projection)
        elif has_skip:
            self.shortcut = nn.Identity()
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act2(out)


class ResNet(nn.Module):
    """Stem conv, stages of :class:`BasicBlock`, global average pool, linear head.

    See :func:`resnet` for the switches.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        blocks: tuple[int, ...],
        widths: tuple[int, ...] = CIFAR_WIDTHS,
        *,
        width: float = 1.0,
        kernel_size: int = 3,
        activation: str = "relu",
        activation_options: dict | None = None,
        norm_type: str = "batch",
        norm: str = "all",
        skip: str = "all",
        conv_bias: bool | str = "auto",
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ConfigError(f"need one width per stage, got blocks={blocks}, widths={widths}")
        dim = spatial_dim(input_shape)
        keep_norm, keep_skip = placement(norm), placement(skip)
        act = activation_factory(activation, activation_options)
        channels = scaled(widths[0], width)
        # The stem is its own group of one norm site, so "first" keeps it.
        conv, nrm = conv_norm(
            dim, input_shape[0], channels, kernel_size,
            norm_type=norm_type, keep_norm=keep_norm(0, 1), conv_bias=conv_bias,
        )  # fmt: skip
        self.stem = nn.Sequential(conv, nrm, act())
        block_norm = partial(keep_norm, n=3)  # norm1, norm2, projection norm
        stages = []
        for s, (n_blocks, out) in enumerate(zip(blocks, widths, strict=True)):
            out = scaled(out, width)
            stage = []
            for b in range(n_blocks):
                stage.append(
                    BasicBlock(
                        dim, channels, out, stride=2 if s > 0 and b == 0 else 1,
                        has_skip=keep_skip(b, n_blocks), keep_norm=block_norm, kernel_size=kernel_size,
                        norm_type=norm_type, conv_bias=conv_bias, act=act,
                    )
                )  # fmt: skip
                channels = out
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = GLOBAL_AVG_POOL[dim](1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    blocks: tuple[int, ...] = RESNET_BLOCKS["resnet18"],
    widths: tuple[int, ...] = CIFAR_WIDTHS,
    **switches,
) -> ResNet:
    """A ResNet of BasicBlocks: ``blocks[s]`` blocks of ``widths[s]`` channels in stage s.

    The first stage keeps the stem's resolution; every later stage halves it in its
    first block. Inputs of shape ``(C, L)`` give a 1-D network, ``(C, H, W)`` a 2-D one.

    Switches:
        width: channel multiplier (0.25 is the CPU preset).
        kernel_size: of the stem and block convs (3).
        activation, activation_options: any activation of the registry.
        norm_type: any norm of the norm registry; "none" removes them all.
        norm: norm placement — ``all``; ``first``: the stem norm and the first norm of
            every block (the one after conv1; the second and the projection's are
            removed); ``none``.
        skip: skip placement per stage — ``all``; ``first``: only the first block of
            each stage keeps its shortcut; ``first2``: the first two; ``none``.
        conv_bias: True | False | "auto" (default: a conv has a bias exactly when no
            norm follows it; see :func:`gammatrace.models.layers.conv_norm`).

    Example:
        >>> from gammatrace.models import build, count_params
        >>> count_params(build("resnet18"))
        11173962
        >>> net = build("resnet34", input_shape=(3, 16, 16), width=0.125, skip="first")
        >>> sum(block.has_skip for block in net.modules() if isinstance(block, BasicBlock))
        4
    """
    return ResNet(input_shape, num_classes, blocks, widths, **switches)


for _name, _blocks in RESNET_BLOCKS.items():
    MODELS.register(_name)(partial(resnet, blocks=_blocks))
del _name, _blocks
