"""Run a fixture training script with ``gammatrace.attach`` replaced by the brute force's
read-only :class:`tests.oracle.Recorder`; at exit, save what the brute force needs.

    GT_ORACLE_OUT=/tmp/o python tests/script_oracle.py SCRIPT [ARGS...]   (or under torchrun)

writes ``/tmp/o.rank{RANK}.pt``. Run it in the environment of a ``gammatrace twopass`` pass
(:func:`gammatrace.engine.script.pass_environment`) so that it starts from the same seeds.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` importable from a script

import torch  # noqa: E402

import gammatrace  # noqa: E402
from tests.oracle import Recorder  # noqa: E402

made: list[Recorder] = []


def attach(model, optimizer, loss_fn=None, **_):
    made.append(Recorder(model, optimizer, loss_fn))
    return made[-1]


def save():
    if made:
        torch.save(made[0].finish(), f"{os.environ['GT_ORACLE_OUT']}.rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    gammatrace.attach = attach
    atexit.register(save)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
