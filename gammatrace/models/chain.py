"""The deep scalar chain F(w) = ½(w₁ w₂ ⋯ w_L − 1)², the smallest model with
vanishing/exploding gradients (Sun 2019, "Optimization for deep learning: theory
and algorithms", §4).

∂F/∂w_i = (Πw − 1)·Π_{j≠i} w_j: started at w_i = 0.5 the gradient is ~0.5^{L−1}
(vanishing), at w_i = 2 it is ~2^{L−1} (exploding), although every minimizer has
Πw = 1.

How it plugs into the trainer: the model is an ordinary network that ignores its
input and outputs the product, broadcast to shape (N, 1). Use any dataset with
regression targets of 1 (shape (N, 1)) and the loss ½·MSE, so the mini-batch loss is
exactly F(w) at every step, independent of the batch; plain ``nn.MSELoss`` gives
2F, the same trajectory as F at twice the learning rate. The L weights are L
separate scalar parameters (``w.0`` … ``w.{L-1}``), so the per-tensor shares of the
progress show each factor's pull.

Example:
    >>> import torch
    >>> from gammatrace.models import build
    >>> net = build("scalar_chain", input_shape=(1,), num_classes=1, depth=4, init_value=0.5)
    >>> out = net(torch.zeros(3, 1)); out.shape
    torch.Size([3, 1])
    >>> loss = 0.5 * torch.nn.functional.mse_loss(out, torch.ones(3, 1))
    >>> torch.isclose(loss, net.objective()).item(), round(net.objective().item(), 6)
    (True, 0.439453)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gammatrace.errors import ConfigError
from gammatrace.models.registry import MODELS


def chain_objective(w: torch.Tensor | Sequence[torch.Tensor], target: float = 1.0) -> torch.Tensor:
    """F(w) = ½(Π_i w_i − target)² for a 1-D tensor or a sequence of scalars.

    Example:
        >>> chain_objective(torch.tensor([2.0, 0.25]))
        tensor(0.1250)
    """
    ws = w if isinstance(w, torch.Tensor) else torch.stack([torch.as_tensor(v) for v in w])
    return 0.5 * (ws.reshape(-1).prod() - target) ** 2


class ScalarChain(nn.Module):
    """L scalar parameters w_1 … w_L; the forward pass outputs Π w_i as (N, 1).

    Example:
        >>> c = ScalarChain(depth=3, init_value=2.0)
        >>> c.product(), c.objective()
        (tensor(8., grad_fn=<ProdBackward0>), tensor(24.5000, grad_fn=<MulBackward0>))
    """

    def __init__(self, depth: int = 10, init_value: float = 0.5, init_std: float = 0.0,
                 target: float = 1.0):
        super().__init__()
        if depth <= 0:
            raise ConfigError(f"scalar_chain needs depth > 0, got {depth}")
        values = init_value + init_std * torch.randn(depth)
        self.w = nn.ParameterList([nn.Parameter(v.clone()) for v in values])
        self.target = target

    def product(self) -> torch.Tensor:
        return torch.stack(list(self.w)).prod()

    def objective(self) -> torch.Tensor:
        """F(w) for the current parameters."""
        return chain_objective(list(self.w), self.target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The input only sets the batch size; expand keeps one product in the graph.
        return self.product().expand(x.shape[0], 1)


@MODELS.register("scalar_chain")
def scalar_chain(
    input_shape: tuple[int, ...],
    num_classes: int = 1,
    depth: int = 10,
    init_value: float = 0.5,
    init_std: float = 0.0,
) -> nn.Module:
    """The chain with ``depth`` factors w_i = init_value + init_std·N(0, 1); input and
    ``num_classes`` are ignored (output (N, 1)).

    Example:
        >>> len(list(scalar_chain((1,), 1, depth=6).parameters()))
        6
    """
    return ScalarChain(depth=depth, init_value=init_value, init_std=init_std)
