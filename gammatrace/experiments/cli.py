"""`gammatrace study NAME|FILE.yaml ...`: run a study and write its report.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
    >>> register(sub)
    >>> args = parser.parse_args(["study", "skip", "--out", "o", "--executor", "ray", "--gpus-per-task", "1"])
    >>> args.preset, args.executor, args.gpus_per_task
    ('quick', 'ray', 1.0)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gammatrace.cliopts import add_options, option_help, parsed
from gammatrace.executors import EXECUTORS
from gammatrace.experiments.presets import PRESETS
from gammatrace.experiments.study import STUDIES, run_study, study_from_yaml


def cmd_study(args: argparse.Namespace) -> int:
    if Path(args.name).suffix in (".yaml", ".yml") or Path(args.name).is_file():
        study = study_from_yaml(args.name)
    else:
        study = STUDIES.get(args.name)(args.preset, args.data_dir)
    where = run_study(**{**parsed(args, run_study), "study": study, "out": args.out, "progress": not args.quiet})
    if where is not None:  # None: a --dry-run, whose plan is the output
        print(f"report: {where}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("study", help="run a named study (or a YAML grid) and report its claim checks")
    s.add_argument("name", help="a registered study (activation, batchnorm, skip, optimizer, init) or a study YAML")
    s.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="quick: CPU, minutes; paper: the papers' CIFAR-10 settings (GPU); paper100: CIFAR-100")
    s.add_argument("--data-dir", default=None, help="folder with the CIFAR files (paper presets), or MNIST for the quick skip study's U-Net (else digits)")
    # The run options, their defaults and help come from run_study itself.
    add_options(s, run_study, skip={"study", "out", "progress"}, choices={"executor": EXECUTORS.names()})
    s.add_argument("--out", required=True, help=option_help(run_study).get("out"))
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_study)
