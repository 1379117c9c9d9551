"""Determinism from a script's first line, for ``gammatrace twopass`` (DESIGN §2).

``gammatrace twopass`` puts this folder first on ``PYTHONPATH``, so every Python process the
command starts — ``python train.py``, torchrun's launcher and each of its ranks, a subprocess
the script starts — imports this module while the interpreter starts, before any user code.
It acts only when the runner's ``GAMMATRACE_TWOPASS_DIR`` is set, and then:

* seeds Python's ``random`` at once (``PYTHONHASHSEED`` is set by the runner itself);
* when ``torch`` is first imported, right after its import: ``torch.manual_seed(seed)``,
  ``torch.set_num_threads(threads)``, ``torch.use_deterministic_algorithms(True)``
  (``warn_only`` with ``--deterministic warn``; nothing with ``off``; the inductor's
  ``deterministic`` flag once ``torch._inductor.config`` is imported) and
  ``torch.backends.cudnn.benchmark = False`` (``CUBLAS_WORKSPACE_CONFIG`` is in the environment);
* when ``numpy`` is first imported: ``numpy.random.seed(seed)``.

The torch and numpy settings wait for their import (a post-import hook on ``sys.meta_path``),
so a process that never imports torch (a tokenizer subprocess, a shell tool) pays nothing. A
script that seeds its generators itself still does so afterwards: its own seed wins, in both
passes alike.

Any other ``sitecustomize`` on the path (a site's or a virtual environment's) is shadowed by this
one, so it is run afterwards and registered under its own name.

Only the standard library is imported here: this runs in every process, before ``gammatrace``
is even importable in it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import random
import sys
from typing import Any


def _seed() -> int:
    return int(os.environ.get("GAMMATRACE_SEED", "0"))


def _torch_setup(torch: Any) -> None:
    torch.manual_seed(_seed())
    threads = int(os.environ.get("GAMMATRACE_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    mode = os.environ.get("GAMMATRACE_DETERMINISTIC", "on")
    if mode != "off":
        # What torch.use_deterministic_algorithms(True) does, less its import of
        # torch._inductor.config (~1 s of CPU: it loads Dynamo): that flag is set when a script
        # imports the inductor (torch.compile), below.
        torch._C._set_deterministic_algorithms(True, warn_only=mode == "warn")
        torch.backends.cudnn.benchmark = False
        inductor = sys.modules.get("torch._inductor.config")
        if inductor is not None:
            _inductor_setup(inductor)


def _inductor_setup(config: Any) -> None:
    if os.environ.get("GAMMATRACE_DETERMINISTIC", "on") != "off":
        config.deterministic = True


def _numpy_setup(numpy: Any) -> None:
    numpy.random.seed(_seed() % 2**32)


class _AfterImport:
    """A meta-path finder that runs ``action(module)`` right after a top-level module's first
    import (the module's own finder and loader do the import)."""

    def __init__(self, actions: dict[str, Any]):
        self.actions = actions

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        action = self.actions.get(name)
        if action is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self.actions[name]
        exec_module = spec.loader.exec_module

        def exec_then_act(module: Any) -> None:
            exec_module(module)
            action(module)

        spec.loader.exec_module = exec_then_act  # this spec's own loader object
        return spec


def _chain() -> None:
    """Run the ``sitecustomize`` this one shadows, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # what a later `import sitecustomize` finds
    spec.loader.exec_module(module)


def _install() -> None:
    if os.environ.get("GAMMATRACE_TWOPASS_DIR"):
        random.seed(_seed())  # before any user code runs
        sys.meta_path.insert(0, _AfterImport({"torch": _torch_setup, "numpy": _numpy_setup,
                                                "torch._inductor.config": _inductor_setup}))
    _chain()


if __name__ == "sitecustomize":  # imported by the interpreter's start-up, not as gammatrace.engine._site...
    _install()
