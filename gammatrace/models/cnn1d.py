"""Small networks for MNIST-1D inputs ``(1, 40)``: the 1-D instances of the plain conv
stack (:mod:`gammatrace.models.vgg`) and of the ResNet (:mod:`gammatrace.models.resnet`),
sized for CPU studies.

Registered: ``cnn1d`` (48,106 parameters for 10 classes), ``resnet1d`` (61,210).
"""

from __future__ import annotations

from torch import nn

from gammatrace.models.registry import MODELS
from gammatrace.models.resnet import ResNet
from gammatrace.models.vgg import PlainConvNet

# Three stages halve the length 40 -> 20 -> 10 -> 5 before the global pool.
CNN1D_STAGES = ((32, 32), (64, 64), (128,))
RESNET1D_BLOCKS, RESNET1D_WIDTHS = (2, 2, 2), (16, 32, 64)


@MODELS.register("cnn1d")
def cnn1d(input_shape: tuple[int, ...], num_classes: int, **switches) -> nn.Module:
    """A plain (skip-free) 1-D conv net: stages of 3-tap conv -> norm -> activation, each
    closed by a 2× max-pool, then global average pool and a linear head.

    Switches as :func:`gammatrace.models.vgg.plain_convnet` (``width``, ``kernel_size``,
    ``activation``, ``activation_options``, ``norm_type``, ``norm`` = all | first |
    none per stage, ``conv_bias``), except that ``conv_bias`` defaults to "auto" (no
    reference parameter count to match here).

    Example:
        >>> import torch
        >>> from gammatrace.models import build
        >>> net = build("cnn1d", input_shape=(1, 40), num_classes=10, norm="first")
        >>> net(torch.zeros(8, 1, 40)).shape
        torch.Size([8, 10])
    """
    switches.setdefault("conv_bias", "auto")
    return PlainConvNet(input_shape, num_classes, CNN1D_STAGES, **switches)


@MODELS.register("resnet1d")
def resnet1d(input_shape: tuple[int, ...], num_classes: int, **switches) -> nn.Module:
    """A 1-D ResNet: 3-tap stem, stages of (2, 2, 2) BasicBlocks with 16, 32, 64 channels.

    Switches as :func:`gammatrace.models.resnet.resnet` (``width``, ``activation``,
    ``norm_type``, ``norm`` = all | first | none, ``skip`` = all | first | none — with
    two blocks per stage ``first2`` equals ``all`` —, ``conv_bias``, ``kernel_size``).

    Example:
        >>> from gammatrace.models import build, count_params
        >>> net = build("resnet1d", input_shape=(1, 40), num_classes=10, skip="none")
        >>> sum(getattr(m, "has_skip", False) for m in net.modules())
        0
    """
    return ResNet(input_shape, num_classes, RESNET1D_BLOCKS, RESNET1D_WIDTHS, **switches)
