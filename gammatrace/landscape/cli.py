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

from gammatrace.landscape import landscape
from gammatrace.landscape.evaluate import BN_MODES


def cmd_landscape(args: argparse.Namespace) -> int:
    if not args.quiet:
        print(f"landscape of {len(args.runs)} run(s) -> {args.out}", file=sys.stderr)
    files = landscape(args.runs, args.out, grid=args.grid, extent=args.extent, samples=args.samples, bn=args.bn,
                      seed=args.seed, workers=args.workers, progress=not args.quiet)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def register(subparsers) -> None:
    """Add the ``landscape`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser("landscape", help="loss contours on the PCA plane of trained paths, and θ_0→θ_T interpolation")
    p.add_argument("runs", nargs="+", help="trained run directories; the first run's θ_T is the plane's origin")
    p.add_argument("--out", required=True, help="output folder (figures and the stored grid)")
    p.add_argument("--grid", type=int, default=21, help="grid points per axis")
    p.add_argument("--extent", type=float, default=1.2, help="half-width of the grid / the path's reach on each axis")
    p.add_argument("--samples", type=int, default=512, help="size of the fixed training subset the loss is evaluated on")
    p.add_argument("--bn", choices=BN_MODES.names(), default="train", help="module mode of every evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation subset (and of dropout)")
    p.add_argument("--workers", type=int, default=1, help="processes for the grid rows")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_landscape)
