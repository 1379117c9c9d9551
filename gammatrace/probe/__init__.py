"""The online instrument: :class:`Probe` wraps ``optimizer.step()`` in any PyTorch loop."""

from gammatrace.probe.probe import Probe, ReferenceError_, load_reference

__all__ = ["Probe", "ReferenceError_", "load_reference"]
