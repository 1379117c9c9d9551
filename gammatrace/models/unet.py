"""U-Net for image-to-image regression (denoising / reconstruction under MSE), with
switchable encoder->decoder skip placement.

Registered: ``unet``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.models.layers import (
    CONV,
    CONV_TRANSPOSE,
    MAX_POOL,
    activation_factory,
    conv_norm,
    placement,
    scaled,
    spatial_dim,
)
from gammatrace.models.registry import MODELS


class DoubleConv(nn.Sequential):
    """(conv -> norm -> act) twice; norm sites 0 and 1 decided by ``keep_norm``."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        *,
        keep_norm: Callable[[int], bool],
        norm_type: str,
        conv_bias: bool | str,
        act: Callable[[], nn.Module],
    ):
        layers: list[nn.Module] = []
        for i, cin in enumerate((in_channels, out_channels)):
            conv, nrm = conv_norm(
                dim,
                cin,
                out_channels,
                3,
                norm_type=norm_type,
                keep_norm=keep_norm(i),
                conv_bias=conv_bias,
            )
            layers += [conv, nrm, act()]
        super().__init__(*layers)


class UpBlock(nn.Module):
    """2× transposed-conv upsampling, concatenation with the encoder feature of the same
    resolution when ``has_skip``, then a :class:`DoubleConv`.

    Without the skip the DoubleConv simply takes fewer input channels: the network is
    a plain encoder-decoder at that level, not one fed zeros.
    """

    def __init__(
        self, dim: int, in_channels: int, out_channels: int, *, has_skip: bool, **conv_options
    ):
        super().__init__()
        self.has_skip = has_skip
        self.up = CONV_TRANSPOSE[dim](in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(
            dim, out_channels * (2 if has_skip else 1), out_channels, **conv_options
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.has_skip:
            x = torch.cat([skip, x], dim=1)
        return self.conv(x)


class UNet(nn.Module):
    """``depth`` encoder levels (DoubleConv, then 2× max-pool), a bottleneck, ``depth``
    :class:`UpBlock` decoder levels and a 1×1 output conv. See :func:`unet`."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        *,
        out_channels: int | None = None,
        width: float = 1.0,
        base_channels: int = 64,
        depth: int = 4,
        activation: str = "relu",
        activation_options: dict | None = None,
        norm_type: str = "batch",
        norm: str = "all",
        skip: str = "all",
        conv_bias: bool | str = "auto",
    ):
        super().__init__()
        dim = spatial_dim(input_shape)
        if depth < 1 or any(size % 2**depth for size in input_shape[1:]):
            raise ConfigError(
                f"unet with depth {depth} needs spatial sizes divisible by {2**depth}, got {input_shape}"
            )
        keep_norm, keep_skip = placement(norm), placement(skip)
        conv_options = dict(
            keep_norm=lambda i: keep_norm(i, 2), norm_type=norm_type, conv_bias=conv_bias,
            act=activation_factory(activation, activation_options),
        )  # fmt: skip
        channels = [scaled(base_channels * 2**level, width) for level in range(depth + 1)]
        self.encoder = nn.ModuleList()
        cin = input_shape[0]
        for level in range(depth):
            self.encoder.append(DoubleConv(dim, cin, channels[level], **conv_options))
            cin = channels[level]
        self.pool = MAX_POOL[dim](2, 2)
        self.bottleneck = DoubleConv(dim, cin, channels[depth], **conv_options)
        # Decoder order: decoder[0] is the deepest (lowest-resolution) level, decoder[-1]
        # the full-resolution one, so skip="last1" keeps only the full-resolution skip.
        self.decoder = nn.ModuleList(
            UpBlock(
                dim,
                channels[level + 1],
                channels[level],
                has_skip=keep_skip(j, depth),
                **conv_options,
            )
            for j, level in enumerate(reversed(range(depth)))
        )
        self.out = CONV[dim](channels[0], out_channels or input_shape[0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for enc in self.encoder:
            x = enc(x)
            features.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, feature in zip(self.decoder, reversed(features), strict=True):
            x = up(x, feature)
        return self.out(x)


@MODELS.register("unet")
def unet(input_shape: tuple[int, ...], num_classes: int | None = None, **switches) -> UNet:
    """U-Net regressor whose output has the input's shape (denoise / reconstruct, MSE).

    ``num_classes`` is ignored: the output has ``out_channels`` channels, by default the
    input's. (``build`` passes ``num_classes=10`` by default, which must not silently
    turn a 3-channel denoiser into a 10-channel one.)

    Switches:
        width: channel multiplier of ``base_channels`` (64); level l has
            ``base_channels * 2**l`` channels, the bottleneck ``base_channels * 2**depth``.
        depth: number of down/up-sampling levels = number of skips (4); spatial sizes
            must be divisible by ``2**depth``.
        skip: which encoder->decoder skips are kept, counted in *decoder* order (deepest,
            lowest-resolution level first): ``all`` | ``last3`` (drops the deepest skip)
            | ``last2`` | ``last1`` (only the full-resolution skip) | ``none``.
        norm_type, norm: the norm kind and its placement in every DoubleConv (``all`` |
            ``first`` | ``none``).
        activation, activation_options, conv_bias: as for :func:`gammatrace.models.resnet.resnet`.
        out_channels: output channels (default: the input's).

    Example:
        >>> import torch
        >>> from gammatrace.models import build
        >>> net = build("unet", input_shape=(3, 32, 32), width=0.125, skip="last2")
        >>> [up.has_skip for up in net.decoder]
        [False, False, True, True]
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """
    return UNet(input_shape, **switches)
