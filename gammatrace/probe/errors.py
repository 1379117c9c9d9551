"""What a loop, a loss or a reference can get wrong, as the probe reports it.

Raised by :class:`~gammatrace.probe.Probe` and its parts (the consistency check, the
per-step state); importable from :mod:`gammatrace.probe` too. Each is a
:class:`~gammatrace.errors.UserError` and keeps the built-in base its callers catch.

Example:
    >>> from gammatrace.errors import UserError
    >>> from gammatrace.probe.errors import ProbeUsageError
    >>> issubclass(ProbeUsageError, UserError), issubclass(ProbeUsageError, RuntimeError)
    (True, True)
"""

from __future__ import annotations

from gammatrace.errors import UserError


class BadReferenceError(UserError, ValueError):
    """The reference parameters do not fit the model, or its file is missing or unreadable."""


class ConsistencyError(UserError, ValueError):
    """The loss given to :meth:`Probe.batch` is not ``loss_fn(model, batch)`` at θ_k."""


class ProbeUsageError(UserError, RuntimeError):
    """The loop calls the probe or the optimizer in an order the probe cannot measure."""
