"""``gammatrace identity-mapping --preset quick --out DIR``: the teacher–student study with a
known minimizer (:mod:`gammatrace.experiments.identity`).

Registered by the main CLI through ``register(subparsers)`` (``cli.PLUGIN_COMMANDS``).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
    >>> register(sub)
    >>> parser.parse_args(["identity-mapping", "--out", "o"]).preset
    'quick'
"""

from __future__ import annotations

import argparse
import json

from gammatrace.cliopts import add_options, parsed
from gammatrace.executors import EXECUTORS
from gammatrace.experiments.identity import study
from gammatrace.experiments.identity.figures import FIGURES
from gammatrace.experiments.identity.problem import PRESETS


def cmd_identity_mapping(args: argparse.Namespace) -> int:
    summary = study.run_identity_mapping(**{**parsed(args, study.run_identity_mapping), "progress": not args.quiet})
    data = json.loads((summary.parent / "identity_mapping.json").read_text())
    print(data["headline"]["sentence"])
    print(f"summary: {summary}")
    print(f"report: {summary.parent / 'report.html'}")
    print(f"numbers: {summary.parent / 'identity_mapping.json'}")
    for name in FIGURES:
        print(f"figure: {summary.parent / name}")
    return 0


def register(subparsers) -> None:
    """Add the ``identity-mapping`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser("identity-mapping",
                              help="teacher–student study with a known minimizer: identity mapping, "
                                   "one-point convexity, and γ against W* vs the last iterate")
    # Options, defaults and help from run_identity_mapping itself.
    add_options(p, study.run_identity_mapping, skip={"progress"},
                choices={"preset": PRESETS.names(), "executor": EXECUTORS.names()})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_identity_mapping)
