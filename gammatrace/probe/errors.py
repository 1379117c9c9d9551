"""What a loop, a loss or a reference can get wrong, as the probe reports it.

Raised by :class:`~gammatrace.probe.Probe` and its parts (the consistency check, the
per-step state); importable from :mod:`gammatrace.probe` too.

Example:
    >>> from gammatrace.probe.errors import ProbeUsageError
    >>> issubclass(ProbeUsageError, RuntimeError)
    True
"""

from __future__ import annotations


class ReferenceError_(ValueError):
    """The reference parameters do not fit the model."""


class ConsistencyError(ValueError):
    """The loss given to :meth:`Probe.batch` is not ``loss_fn(model, batch)`` at θ_k."""


class ProbeUsageError(RuntimeError):
    """The loop calls the probe or the optimizer in an order the probe cannot measure."""
