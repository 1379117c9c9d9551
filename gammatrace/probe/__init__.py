"""The online instrument: :class:`Probe` measures ``optimizer.step()`` in any PyTorch loop."""

from gammatrace.probe.probe import (
    ConsistencyError,
    Probe,
    ProbeUsageError,
    ReferenceError_,
    load_reference,
)

__all__ = ["ConsistencyError", "Probe", "ProbeUsageError", "ReferenceError_", "load_reference"]
