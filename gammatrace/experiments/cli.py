"""`gammatrace study NAME|FILE.yaml ...`: run a study and write its report."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_study(args: argparse.Namespace) -> int:
    from gammatrace.experiments.study import STUDIES, run_study, study_from_yaml

    if Path(args.name).suffix in (".yaml", ".yml") or Path(args.name).is_file():
        study = study_from_yaml(args.name)
    else:
        study = STUDIES.get(args.name)(args.preset, args.data_dir)
    where = run_study(study, args.out, seeds=args.seeds, executor=args.executor, workers=args.workers,
                      address=args.address, progress=not args.quiet)
    print(f"report: {where}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("study", help="run a named study (or a YAML grid) and report its claim checks")
    s.add_argument("name", help="a registered study (activation, batchnorm, ...) or a study YAML file")
    s.add_argument("--preset", default="quick", choices=["quick", "paper"])
    s.add_argument("--data-dir", default=None, help="folder with CIFAR/MNIST files (paper presets)")
    s.add_argument("--seeds", type=int, default=1, help="repeat every cell with this many seeds")
    s.add_argument("--executor", default="local", help="local | ray")
    s.add_argument("--workers", type=int, default=1, help="parallel runs (local processes)")
    s.add_argument("--address", default=None, help="Ray cluster address (executor ray)")
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_study)
