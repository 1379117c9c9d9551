"""Weight decay folded into the raw gradient: the products RSI and EB of g_k + λθ_k need.

"No Wrong Turns" (ICML 2024) measures its restricted-secant (RSI) and error-bound (EB)
quantities on the gradient the optimizer descends; with weight decay that is g_k + λθ_k. With
the probe's raw g_k (:mod:`gammatrace.probe.probe`) and the anchor a = θ*:

    ⟨g + λθ, θ − a⟩ = ⟨g, θ − a⟩ + λ⟨θ, θ − a⟩
    ‖g + λθ‖²       = ‖g‖² + 2λ⟨g, θ⟩ + λ²‖θ‖²

so per parameter tensor i (λ_i its parameter group's ``weight_decay``) the probe adds three
float64 products to the raw gradient's two: ``λ_i⟨θ_i, θ_i − a_i⟩``, ``2λ_i⟨g_i, θ_i⟩`` (in the
backward's units: GradScaler's scale divides it like ⟨θ − a, g⟩) and ``λ_i²‖θ_i‖²``. The step
table adds them to ``grad_dot`` and ``grad_sq`` as ``grad_dot_wd`` and ``grad_sq_wd``
(:mod:`gammatrace.probe.table`).

Which decay folds in: *coupled* L2 decay — SGD (with or without momentum), Adam, RMSprop,
Adagrad with ``weight_decay``: the optimizer adds λθ to the gradient before anything else, so
it descends ℓ + (λ/2)‖θ‖², whose gradient is g + λθ. *Decoupled* decay (AdamW, or Adam with
``decoupled_weight_decay=True``) is not folded: the update is θ(1 − ηλ) − η·P_k m_k, the decay
bypasses the preconditioner and the moments, and no objective whose gradient is g + λθ is being
minimised — folding it would describe a regularised problem the run does not solve. Its
tensors give NaN (undefined), as does a probe without an optimizer (λ unknown). With λ = 0
everywhere nothing is computed: the three products are 0 and the folded columns equal the raw
ones exactly.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    >>> w.grad = torch.tensor([1.0, 0.0])
    >>> fold = WeightDecayFold([w], torch.optim.SGD([w], lr=0.1, weight_decay=0.5), [torch.zeros(2)])
    >>> fold.products([w], [w.grad]).tolist()  # λ⟨θ, θ − 0⟩, 2λ⟨g, θ⟩, λ²‖θ‖²
    [[12.5, 3.0, 6.25]]
    >>> fold = WeightDecayFold([w], torch.optim.AdamW([w], weight_decay=0.5), [torch.zeros(2)])
    >>> fold.products([w], [w.grad]).isnan().all().item()
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def decay_of(optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor]) -> list[float]:
    """Each parameter's coupled weight decay λ_i: its group's ``weight_decay`` (0 where the
    group has none), NaN where the decay is decoupled (AdamW) or the optimizer is unknown.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> decay_of(torch.optim.SGD([{"params": [a], "weight_decay": 0.1}, {"params": [b]}], lr=1.0), [a, b])
        [0.1, 0.0]
        >>> decay_of(None, [a])
        [nan]
    """
    if optimizer is None:
        return [math.nan] * len(params)
    decoupled_class = isinstance(optimizer, torch.optim.AdamW)
    of: dict[int, float] = {}
    for group in optimizer.param_groups:
        lam = float(group.get("weight_decay", 0.0) or 0.0)
        if lam and (decoupled_class or group.get("decoupled_weight_decay", False)):
            lam = math.nan
        for p in group["params"]:
            of[id(p)] = lam
    return [of.get(id(p), 0.0) for p in params]


class WeightDecayFold:
    """The three folded-decay products per tensor (see the module), reading λ_i from the
    optimizer's parameter groups at every call (a decay schedule is followed)."""

    def __init__(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer | None,
                 anchor: Sequence[torch.Tensor]):
        self.optimizer = optimizer
        device = params[0].device
        # The anchor a = θ* in float64 on the parameters' device, held only while some group
        # decays (see :meth:`needed`): O(d) memory the fold alone uses.
        self.anchor = [a.detach().to(device=device, dtype=torch.float64).reshape(p.shape)
                       for a, p in zip(anchor, params, strict=True)]

    @staticmethod
    def needed(optimizer: torch.optim.Optimizer | None) -> bool:
        """Whether any group has a nonzero weight decay (else the fold is identically 0)."""
        return optimizer is not None and any(float(g.get("weight_decay", 0.0) or 0.0) != 0.0
                                             for g in optimizer.param_groups)

    def products(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """``(n_tensors, 3)`` float64 on the parameters' device: λ⟨θ, θ − a⟩, 2λ⟨g, θ⟩, λ²‖θ‖²."""
        lams = decay_of(self.optimizer, params)
        rows = []
        for p, g, a, lam in zip(params, grads, self.anchor, lams, strict=True):
            theta = p.detach().to(torch.float64)
            if math.isnan(lam):
                rows.append(torch.full((3,), math.nan, dtype=torch.float64, device=theta.device))
                continue
            if lam == 0.0:
                rows.append(torch.zeros(3, dtype=torch.float64, device=theta.device))
                continue
            gt = (torch.zeros((), dtype=torch.float64, device=theta.device) if g is None else
                  ((g.to_dense() if g.is_sparse else g).detach().to(torch.float64) * theta).sum())
            rows.append(torch.stack([lam * (theta * (theta - a)).sum(), 2.0 * lam * gt, lam * lam * (theta * theta).sum()]))
        return torch.stack(rows)
