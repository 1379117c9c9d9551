"""The online instrument: :class:`Probe` measures ``optimizer.step()`` in any PyTorch loop.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from gammatrace.probe import Probe
    >>> model = nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> probe = Probe(model, opt)   # record mode: no θ* needed
    >>> x, y = torch.ones(4, 3), torch.zeros(4, 1)
    >>> loss = nn.functional.mse_loss(model(x), y)
    >>> loss.backward()
    >>> probe.batch((x, y), loss)
    >>> opt.step()                  # the loop's own step, measured through the optimizer's hooks
    >>> list(probe.steps()["step"])
    [0]
"""

from gammatrace.probe.probe import (
    BadReferenceError,
    ConsistencyError,
    Probe,
    ProbeUsageError,
    load_reference,
)

__all__ = ["BadReferenceError", "ConsistencyError", "Probe", "ProbeUsageError", "load_reference"]
