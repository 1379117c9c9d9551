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

import ctypes
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


def _forget_unhandled_interrupt() -> None:
    """CPython marks a KeyboardInterrupt as unhandled (``_Py_UnhandledKeyboardInterrupt``)
    whenever one leaves code a library ran through ``PyRun_*`` — even when
    :func:`gammatrace.cli.main` catches it afterwards — and then ends the process by
    SIGINT (status −2) instead of our 130. Seen at about 2 s into ``run`` (the interrupt
    reached such code while the first steps started); the flag was 1 in exactly the runs
    that ended −2. The interrupt was handled, so the mark is cleared."""
    try:
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
    except (ValueError, AttributeError, OSError):  # not CPython, or no such symbol
        pass


def main() -> int:
    ours = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not ignored by our caller
    if ours:
        signal.signal(signal.SIGINT, _quit)
    # Imported here, after the handler, on purpose: this import is the seconds-long part.
    cli_main = importlib.import_module("gammatrace.cli").main

    if ours:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a KeyboardInterrupt cli.main catches
    try:
        code = cli_main()
        if code == 130:  # cli.main caught the interrupt and said so
            _forget_unhandled_interrupt()
        return code
    finally:
        if ours:  # the interpreter's shutdown (joining threads, atexit) is interrupted quietly too
            signal.signal(signal.SIGINT, _quit)


if __name__ == "__main__":
    sys.exit(main())
