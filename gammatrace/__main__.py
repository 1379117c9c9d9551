"""The ``gammatrace`` command (``python -m gammatrace`` too): Ctrl-C handled from the
first instruction to the last.

Importing the command line takes seconds (torch, pandas); an interrupt then, or while
the interpreter shuts down after the command finished, would otherwise print a traceback
(or nothing) and end with the signal's status. Here it is always one line,
"interrupted; rerun the same command to resume", and exit status 130. While the command
runs, :func:`gammatrace.cli.main` turns the interrupt into the same line (its work
stops at a point a rerun resumes from).

Nothing heavy is imported at module level: spawned worker processes import this module
as their ``__main__`` too.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

INTERRUPTED = "gammatrace: interrupted; rerun the same command to resume"


def _quit(signum: int, frame: object) -> None:
    """Ctrl-C outside the command's own handling: nothing is half-written here (imports
    have not written anything; after the command, everything is written), so leave at once."""
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stdout: the line below still goes out
        pass
    os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(130)


def main() -> int:
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not ignored by our caller
    if ours:
        signal.signal(signal.SIGINT, _quit)
    # Imported here, after the handler, on purpose: this import is the seconds-long part.
    cli_main = importlib.import_module("gammatrace.cli").main

    if ours:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a KeyboardInterrupt cli.main catches
    try:
        return cli_main()
    finally:
        if ours:  # the interpreter's shutdown (joining threads, atexit) is interrupted quietly too
            signal.signal(signal.SIGINT, _quit)


if __name__ == "__main__":
    sys.exit(main())
