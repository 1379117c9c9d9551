"""``gammatrace landscape RUN… --out DIR``: the loss landscape around trained paths.

Also from any training loop's files: ``gammatrace landscape ckpt_0.pt … ckpt_T.pt
--model pkg.module:factory --data pkg.module:factory --out DIR`` (one path, θ_T last).
The factories are imported from the working directory or ``PYTHONPATH``.
``--plane per_path`` draws one PCA plane per path; ``--directions random --dims 1|2``
Li et al.'s filter-normalised random directions. Registered by the main CLI through
``register(subparsers)`` (``cli.PLUGIN_COMMANDS``). A
:class:`~gammatrace.landscape.sources.LandscapeWarning` (a path that ends higher than it
starts) is one line on stderr, ``gammatrace: warning: …``, as errors are.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
    >>> register(sub)
    >>> parser.parse_args(["landscape", "runs/a", "--out", "o"]).grid
    21
    >>> ns = parser.parse_args(["landscape", "c0.pt", "c1.pt", "--out", "o", "--model", "m:net", "--data", "m:xy",
    ...                         "--directions", "random", "--dims", "1"])
    >>> ns.runs, ns.model, ns.dims, ns.loss
    (['c0.pt', 'c1.pt'], 'm:net', 1, 'cross_entropy')
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from gammatrace.cliopts import add_options, option_help, parsed
from gammatrace.executors import EXECUTORS
from gammatrace.landscape import landscape
from gammatrace.landscape.compute import DIRECTIONS, PCA_PLANES, LandscapeConfig, compute_landscape
from gammatrace.landscape.directions import IGNORE
from gammatrace.landscape.evaluate import BN_MODES
from gammatrace.landscape.sources import LandscapeWarning
from gammatrace.techniques import LOSSES


def cmd_landscape(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) and os.getcwd() not in sys.path:
        # As `python -m` would: factories next to the user's script import without PYTHONPATH
        # (the console script's sys.path starts at its own bin folder, not the working directory).
        sys.path.insert(0, os.getcwd())
    if not args.quiet:
        what = "checkpoint file(s)" if getattr(args, "model", None) else "run(s)"
        print(f"landscape of {len(args.runs)} {what} -> {args.out}", file=sys.stderr)
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("default", LandscapeWarning)
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, LandscapeWarning):
                print(f"gammatrace: warning: {' '.join(str(message).split())}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        # The fields of LandscapeConfig, which compute_landscape validates into one.
        files = landscape(args.runs, args.out, **parsed(args, LandscapeConfig), progress=not args.quiet)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def register(subparsers) -> None:
    """Add the ``landscape`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser("landscape", help="loss contours on the PCA plane(s) of trained paths or on random "
                                                "filter-normalised directions, and θ_0→θ_T interpolation")
    p.add_argument("runs", nargs="+", help=option_help(compute_landscape).get("runs"))
    p.add_argument("--out", required=True, help=option_help(compute_landscape).get("out"))
    # Every other option, its type, default and help come from LandscapeConfig itself.
    add_options(p, LandscapeConfig,
                choices={"bn": BN_MODES.names(), "executor": EXECUTORS.names(), "plane": PCA_PLANES.names(),
                         "directions": DIRECTIONS.names(), "dims": [1, 2], "ignore": IGNORE.names(),
                         "loss": LOSSES.names()})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_landscape)
