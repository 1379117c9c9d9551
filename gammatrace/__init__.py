"""gammatrace: exact, O(model size) measurement of optimization-trajectory principles.

The public API (DESIGN.md §3): :class:`Probe`, :class:`TwoPass` and :func:`save_run` (your
own loop, measured exactly and saved as a run), :func:`attach` (a script run by
``gammatrace twopass``), :func:`train`, :func:`analyze`,
:func:`load_run`, :func:`report`, and the typed :class:`RunConfig`.

Attributes are resolved on first use (PEP 562), so ``import gammatrace`` loads neither
matplotlib nor the report: a replay worker that imports the package pays only for what it
runs. No subpackage shares a name with these functions (the trainer is ``engine/``, the
report ``reporting/``), so a lazy attribute is never shadowed by a submodule.

Example:
    >>> import gammatrace, subprocess, sys
    >>> sorted(gammatrace.__all__)[:4]
    ['Probe', 'RunConfig', 'TwoPass', '__version__']
    >>> gammatrace.report.__module__
    'gammatrace.reporting.build'

    A fresh interpreter shows that importing the package loads no matplotlib (this one
    may already have it from other modules):

    >>> subprocess.run([sys.executable, "-c", "import gammatrace, sys; print('matplotlib' in sys.modules)"],
    ...                capture_output=True, text=True).stdout
    'False\\n'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gammatrace._version import __version__

# public name -> defining module
_API = {
    "Probe": "gammatrace.probe",
    "attach": "gammatrace.integrations.script",
    "TwoPass": "gammatrace.engine.twopass",
    "save_run": "gammatrace.engine.twopass",
    "RunConfig": "gammatrace.config",
    "load_run": "gammatrace.store",
    "analyze": "gammatrace.analysis",
    "train": "gammatrace.analysis",
    "report": "gammatrace.reporting.build",
}

__all__ = ["Probe", "RunConfig", "TwoPass", "__version__", "analyze", "attach", "load_run", "report", "save_run",
           "train"]

if TYPE_CHECKING:  # static checkers see the real objects
    from gammatrace.analysis import analyze, train
    from gammatrace.config import RunConfig
    from gammatrace.engine.twopass import TwoPass, save_run
    from gammatrace.integrations.script import attach
    from gammatrace.probe import Probe
    from gammatrace.reporting.build import report
    from gammatrace.store import load_run


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'gammatrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
