"""gammatrace: exact, O(model size) measurement of optimization-trajectory principles.

The public API (DESIGN.md §3): :class:`Probe`, :func:`train`, :func:`analyze`,
:func:`load_run`, :func:`report`, and the typed :class:`RunConfig`.

Example:
    >>> import gammatrace
    >>> sorted(gammatrace.__all__)[:3]
    ['Probe', 'RunConfig', '__version__']
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported eagerly: the functions `train` and `report` share their names with the
# subpackages that hold them, and a lazy attribute would be shadowed by the submodule
# as soon as anything imports it.
from gammatrace.analysis import analyze  # noqa: E402
from gammatrace.config import RunConfig  # noqa: E402
from gammatrace.probe import Probe  # noqa: E402
from gammatrace.report import report  # noqa: E402
from gammatrace.store import load_run  # noqa: E402
from gammatrace.train import train  # noqa: E402

__all__ = ["Probe", "RunConfig", "__version__", "analyze", "load_run", "report", "train"]
