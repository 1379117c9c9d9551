"""``gammatrace identity-mapping --preset quick --out DIR``: the teacher–student study with a
known minimizer (:mod:`gammatrace.experiments.identity`), and ``gammatrace identity-mnist
--preset quick --out DIR``: the report's MNIST experiment
(:mod:`gammatrace.experiments.identity.mnist`).

Registered by the main CLI through ``register(subparsers)`` (``cli.PLUGIN_COMMANDS``).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
    >>> register(sub)
    >>> parser.parse_args(["identity-mapping", "--out", "o"]).preset
    'quick'
    >>> args = parser.parse_args(["identity-mnist", "--out", "o", "--preset", "paper", "--data-dir", "/datasets"])
    >>> args.preset, args.data_dir, args.device
    ('paper', '/datasets', 'cpu')
"""

from __future__ import annotations

import argparse
import json

from gammatrace.cliopts import add_options, parsed
from gammatrace.executors import EXECUTORS
from gammatrace.experiments.identity import mnist, study
from gammatrace.experiments.identity.figures import FIGURES, MNIST_ERROR
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


def cmd_identity_mnist(args: argparse.Namespace) -> int:
    summary = mnist.run_identity_mnist(**{**parsed(args, mnist.run_identity_mnist), "progress": not args.quiet})
    data = json.loads((summary.parent / mnist.RESULTS_FILE).read_text())
    for name, c in data["cells"].items():
        e = c["final_error"]
        print(f"{name}: test error {e['mean']:.4f} ± {e['std']:.4f} over {c['runs']} runs")
    print(f"summary: {summary}")
    print(f"report: {summary.parent / 'report.html'}")
    print(f"numbers: {summary.parent / mnist.RESULTS_FILE}")
    print(f"figure: {summary.parent / MNIST_ERROR}")
    return 0


def register(subparsers) -> None:
    """Add the ``identity-mapping`` and ``identity-mnist`` subcommands to the main parser's subparsers."""
    p = subparsers.add_parser("identity-mapping",
                              help="teacher–student study with a known minimizer: identity mapping, "
                                   "one-point convexity, and γ against W* vs the last iterate")
    # Options, defaults and help from run_identity_mapping itself.
    add_options(p, study.run_identity_mapping, skip={"progress"},
                choices={"preset": PRESETS.names(), "executor": EXECUTORS.names()})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_identity_mapping)

    m = subparsers.add_parser("identity-mnist",
                              help="the CS260 report's MNIST experiment (Fig. 3): one hidden layer, ReLU vs PReLU, "
                                   "with and without identity mapping, zero vs random init")
    add_options(m, mnist.run_identity_mnist, skip={"progress"},
                choices={"preset": mnist.MNIST_PRESETS.names(), "executor": EXECUTORS.names()})
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(fn=cmd_identity_mnist)
