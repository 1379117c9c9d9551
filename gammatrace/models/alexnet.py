"""The small AlexNet of Zhang et al. 2017, "Understanding deep learning requires
rethinking generalization" (after the TensorFlow CIFAR-10 tutorial model).

Registered: ``alexnet_small``.
"""

from __future__ import annotations

import torch
from torch import nn

from gammatrace.models.layers import MAX_POOL, activation_factory, conv_norm, scaled, spatial_dim
from gammatrace.models.norms import apply_weight_norm, make_norm, uses_weight_norm
from gammatrace.models.registry import MODELS

# TF's tf.nn.lrn(depth_radius=4, bias=1, alpha=0.001/9, beta=0.75) of the tutorial.
# PyTorch sums over size = 2*radius + 1 channels and divides alpha by size, so the
# same normalization is size=9, alpha=0.001.
LRN_OPTIONS = dict(size=9, alpha=0.001, beta=0.75, k=1.0)


class LocalResponseNorm(nn.LocalResponseNorm):
    """``nn.LocalResponseNorm`` whose backward is deterministic on CUDA too.

    PyTorch computes the channel window with ``avg_pool3d``, whose CUDA backward has no
    deterministic implementation (``torch.use_deterministic_algorithms`` refuses it), so a
    verified replay could not run there. On CUDA the window is a sum of shifted slices
    (forward and backward deterministic); elsewhere PyTorch's own code runs, bit for bit
    as before.

    Example:
        >>> x = torch.randn(2, 12, 5, 5)
        >>> lrn = LocalResponseNorm(**LRN_OPTIONS)
        >>> torch.allclose(lrn.window_sum_form(x), nn.functional.local_response_norm(x, **LRN_OPTIONS), atol=1e-6)
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.window_sum_form(x) if x.is_cuda else super().forward(x)

    def window_sum_form(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        sq = nn.functional.pad((x * x).unsqueeze(1), (0, 0) * (x.dim() - 2) + (self.size // 2, (self.size - 1) // 2))
        window = sq[:, :, 0:c]
        for i in range(1, self.size):
            window = window + sq[:, :, i:i + c]
        div = (window.squeeze(1) / self.size).mul(self.alpha).add(self.k).pow(self.beta)
        return x / div


class AlexNetSmall(nn.Module):
    """Two (conv 5×5 -> [norm] -> act -> max-pool 3/2 -> LRN) stages, FC 384, FC 192,
    linear classifier. See :func:`alexnet_small`."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        width: float = 1.0,
        activation: str = "relu",
        activation_options: dict | None = None,
        lrn: bool = True,
        norm_type: str = "none",
        conv_bias: bool | str = "auto",
    ):
        super().__init__()
        dim = spatial_dim(input_shape)
        act = activation_factory(activation, activation_options)
        layers: list[nn.Module] = []
        channels, sizes = input_shape[0], list(input_shape[1:])
        for _ in range(2):
            out = scaled(64, width)
            conv, nrm = conv_norm(dim, channels, out, 5, norm_type=norm_type, conv_bias=conv_bias)
            # padding=1 reproduces TF's "SAME" 3/2 pooling: ceil(size / 2) outputs.
            layers += [conv, nrm, act(), MAX_POOL[dim](3, 2, padding=1)]
            layers.append(LocalResponseNorm(**LRN_OPTIONS) if lrn else nn.Identity())
            channels, sizes = out, [(s + 1) // 2 for s in sizes]
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Flatten()]
        fan_in = channels * torch.Size(sizes).numel()
        for hidden in (384, 192):
            hidden = scaled(hidden, width)
            nrm = make_norm(norm_type, hidden, 0)
            # Same bias rule as the convs (see layers.conv_norm).
            bias = isinstance(nrm, nn.Identity) if conv_bias == "auto" else conv_bias
            linear = nn.Linear(fan_in, hidden, bias=bias)
            if uses_weight_norm(norm_type):
                apply_weight_norm(linear)
            fc += [linear, nrm, act()]
            fan_in = hidden
        fc.append(nn.Linear(fan_in, num_classes))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("alexnet_small")
def alexnet_small(input_shape: tuple[int, ...], num_classes: int, **switches) -> AlexNetSmall:
    """The small AlexNet of Zhang et al. 2017 (their CIFAR-10 inputs are 28×28 center crops).

    Switches: ``width`` (multiplier of the 64 conv channels and the 384 / 192 FC units),
    ``activation`` (+ ``activation_options``), ``lrn`` (keep the local response
    normalization after each pool; default True, as in the paper), ``norm_type`` (a
    norm after every conv and hidden FC layer; default "none", as in the paper),
    ``conv_bias`` (True | False | "auto": a conv or hidden FC layer has a bias unless a
    norm follows it).

    Example:
        >>> from gammatrace.models import build, count_params
        >>> count_params(build("alexnet_small", input_shape=(3, 28, 28)))  # Zhang et al., Table 1
        1387786
    """
    return AlexNetSmall(input_shape, num_classes, **switches)
