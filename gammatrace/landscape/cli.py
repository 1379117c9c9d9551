"""``gammatrace landscape RUN… --out DIR``: the loss landscape around trained paths.

Registered by the main CLI through ``register(subparsers)`` (``cli.PLUGIN_COMMANDS``).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
    >>> register(sub)
    >>> parser.parse_args(["landscape", "runs/a", "--out", "o"]).grid
    21
"""

from __future__ import annotations

import argparse
import sys

from gammatrace.cliopts import add_options, option_help, parsed
from gammatrace.executors import EXECUTORS
from gammatrace.landscape import landscape
from gammatrace.landscape.compute import compute_landscape
from gammatrace.landscape.evaluate import BN_MODES


def cmd_landscape(args: argparse.Namespace) -> int:
    if not args.quiet:
        print(f"landscape of {len(args.runs)} run(s) -> {args.out}", file=sys.stderr)
    files = landscape(**{**parsed(args, compute_landscape), "progress": not args.quiet})
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def register(subparsers) -> None:
    """Add the ``landscape`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser("landscape", help="loss contours on the PCA plane of trained paths, and θ_0→θ_T interpolation")
    p.add_argument("runs", nargs="+", help=option_help(compute_landscape).get("runs"))
    p.add_argument("--out", required=True, help=option_help(compute_landscape).get("out"))
    # Every other option, its type, default and help come from compute_landscape itself.
    add_options(p, compute_landscape, skip={"runs", "out", "progress"},
                choices={"bn": BN_MODES.names(), "executor": EXECUTORS.names()})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_landscape)
