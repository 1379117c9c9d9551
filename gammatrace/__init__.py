"""gammatrace: exact, O(model size) measurement of optimization-trajectory principles.

The public API (DESIGN.md §3): :class:`Probe`, :func:`train`, :func:`analyze`,
:func:`load_run`, :func:`report`. Attributes are imported lazily so that
``import gammatrace`` stays cheap and the NumPy-only parts never pull in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Probe": "gammatrace.probe",
    "train": "gammatrace.train",
    "analyze": "gammatrace.analysis",
    "load_run": "gammatrace.store",
    "report": "gammatrace.report",
    "RunConfig": "gammatrace.config",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'gammatrace' has no attribute '{name}'")
