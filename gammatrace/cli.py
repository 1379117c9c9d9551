"""The command line: a thin layer over the Python API.

    gammatrace run CONFIG.yaml --out runs/NAME     train + replay + analyse (+ report)
                   [--dry-run] [--max-disk GiB] [--prune-checkpoints]   (--out may be s3://...)
    gammatrace analyze RUN [--reference R] [--tail m]
    gammatrace report RUN... --out DIR
    gammatrace models [NAME] [--num-classes N] [--SWITCH VALUE ...]
    gammatrace inspect CONFIG.yaml [--out DIR]
    gammatrace machine [--ray]                     this machine's kind (what a run's bits belong to)

Errors a user can fix (bad config, unknown name, missing data, damaged file: a
:class:`gammatrace.errors.UserError`, or a config field pydantic refuses) are one line on
stderr and exit status 2; nothing already on disk is touched. Anything else is a bug in
gammatrace: its traceback, one line saying so, and exit status 1.

Example (``main`` takes the arguments the ``gammatrace`` command would; unknown
``--flags`` of ``models`` are the network's switches):
    >>> main(["models", "mlp", "--input-shape", "64", "--width", "8", "--depth", "2"])
    mlp                             682
    0
    >>> import tempfile
    >>> main(["analyze", tempfile.mkdtemp()])  # an empty folder is no run: one line on stderr
    2
    >>> configs = expand_runs({"base": {"data": {"name": "digits"}},
    ...                        "runs": {"fast": {"optim": {"lr": 0.5}}, "slow": {"optim": {"lr": 0.01}}}})
    >>> {name: (cfg.name, cfg.data.name, cfg.optim.lr) for name, cfg in configs.items()}
    {'fast': ('fast', 'digits', 0.5), 'slow': ('slow', 'digits', 0.01)}
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gammatrace.analysis import analyze, train
from gammatrace.cliopts import add_options, option_help
from gammatrace.config import (
    AnalysisConfig,
    RunConfig,
    check_switches,
    error_location,
    load_yaml,
    merge_config,
)
from gammatrace.engine import budget, train_pass
from gammatrace.engine.session import build_session
from gammatrace.errors import BUG_REPORT, ConfigError, UserError, os_error
from gammatrace.experiments.remote import report_to
from gammatrace.machine import describe, fingerprint, machine_id, ray_resource
from gammatrace.models import MODELS, build, count_params
from gammatrace.models.inspect import inspect_init, plot_inspect
from gammatrace.store.backend import inside, is_remote, output_folder, write_bytes_inside
from gammatrace.store.run import Status, check_out_folder
from gammatrace.techniques import per_sample_loss


def _preset_path(name: str) -> Path:
    """A config file, or the name of a packaged preset (gammatrace/configs/NAME.yaml)."""
    path = Path(name)
    if path.exists():
        return path
    packaged = resources.files("gammatrace") / "configs" / f"{name}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    presets = sorted(p.name.removesuffix(".yaml") for p in (resources.files("gammatrace") / "configs").iterdir()
                     if p.name.endswith(".yaml"))
    raise UserError(f"config {name} does not exist (packaged presets: {', '.join(presets)})")


def expand_runs(data: dict[str, Any]) -> dict[str, RunConfig]:
    """A config file holds one run, or ``base:`` plus ``runs: {name: overrides}``."""
    if "runs" not in data:
        cfg = RunConfig.model_validate(data)
        return {cfg.name: cfg}
    unknown = set(data) - {"base", "runs"}
    if unknown:
        raise ConfigError(f"a multi-run config has only 'base' and 'runs', not {sorted(unknown)}")
    runs = data["runs"] or {}
    if not isinstance(runs, dict) or not runs:
        raise ConfigError("'runs' must map run names to overrides")
    return {name: RunConfig.model_validate(merge_config(merge_config(data.get("base") or {}, over or {}), {"name": name}))
            for name, over in runs.items()}


def _note(args: argparse.Namespace, text: str, always: bool = False) -> None:
    """Progress on stderr; ``--quiet`` keeps stderr for errors and warnings only."""
    if always or not getattr(args, "quiet", False):
        print(text, file=sys.stderr)


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")


def cmd_run(args: argparse.Namespace) -> int:
    _check_workers(args.workers)
    configs = expand_runs(load_yaml(_preset_path(args.config)))
    for cfg in configs.values():
        cfg.check_names()  # every run's names before the first one trains
    out = check_out_folder(args.out)
    single = len(configs) == 1 and "runs" not in load_yaml(_preset_path(args.config))
    where_of = {name: out if single else out / name for name in configs}
    if not is_remote(out):  # a run's folder or the report: never a symbolic link planted in --out
        for name in [*([] if single else configs), "report"]:
            inside(out, name)
    # The disk estimate before anything is trained (and all of it for --dry-run).
    plan = budget.plan_disk({where_of[n].name if single else n: c for n, c in configs.items()}, out,
                            max_disk=args.max_disk, prune_checkpoints=args.prune_checkpoints,
                            check_free=args.check_free)
    budget.announce(plan, dry_run=args.dry_run, quiet=args.quiet)
    if args.dry_run:
        return 0
    spacing = [r.checkpoint_every for r in plan.runs]
    paths = []
    for i, ((name, cfg), every) in enumerate(zip(configs.items(), spacing, strict=True), 1):
        path = where_of[name]
        if cfg.checkpoint_every == "auto":
            cfg = cfg.model_copy(update={"checkpoint_every": every})
        _note(args, f"[{i}/{len(configs)}] {name}: training -> {path}")
        run = train_pass(cfg, path, progress=not args.quiet)
        if run.status == Status.DIVERGED:
            _note(args, f"[{i}/{len(configs)}] {name}: diverged at step {run.meta.diverged_at_step}", always=True)
        else:
            _note(args, f"[{i}/{len(configs)}] {name}: replaying and analysing")
            analyze(path, workers=args.workers, progress=not args.quiet)
            if plan.prune and not run.meta.checkpoints_pruned:
                freed = budget.prune_checkpoints(path)
                _note(args, f"[{i}/{len(configs)}] {name}: checkpoints pruned ({freed / budget.GiB:.3f} GiB freed)")
        paths.append(path)
    if args.no_report:
        print(out)
        return 0
    where = report_to(paths, out / "report", title=f"gammatrace: {Path(args.config).stem}")
    print(f"report: {where}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    s = analyze(args.run, args.reference, tail=args.tail, ell_inf=args.ell_inf, workers=args.workers,
                progress=not args.quiet)
    keys = ["reference", "n_steps", "gamma_min", "gamma_certified", "gamma_frac_positive", "gamma_median",
            "gamma_n_undefined", "gamma_rp_median", "gamma_eff", "dist_n_increase", "rate_tightness",
            "path_ratio", "cos_align_mean", "cos_null_scale", "no_progress"]
    width = max(map(len, keys))
    for k in keys:
        v = s.get(k)
        print(f"{k:<{width}}  {v:.6g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(f"report: {report_to(args.runs, args.out, reference=args.reference)}")
    return 0


def _parse_switches(tokens: list[str]) -> dict[str, Any]:
    """``--width 0.5 --norm first`` -> {"width": 0.5, "norm": "first"} (YAML scalars)."""
    out: dict[str, Any] = {}
    it = iter(tokens)
    for tok in it:
        if not tok.startswith("--"):
            raise ConfigError(f"expected --SWITCH VALUE, got {tok!r}")
        key = tok[2:].replace("-", "_")
        try:
            out[key] = yaml.safe_load(next(it))
        except StopIteration:
            raise ConfigError(f"switch {tok} needs a value") from None
    return out


def cmd_models(args: argparse.Namespace, extra: list[str]) -> int:
    switches = _parse_switches(extra)
    if args.name:  # a switch the network does not take, or of another type: one line, as in a config
        check_switches("model", args.name, MODELS.get(args.name), switches, builder_args={"input_shape", "num_classes"})
    names = [args.name] if args.name else MODELS.names()
    shape = tuple(args.input_shape) if args.input_shape else None
    for name in names:
        kwargs = dict(switches)
        if shape:
            kwargs["input_shape"] = shape
        try:
            n = count_params(build(name, num_classes=args.num_classes, **kwargs))
            print(f"{name:<20} {n:>14,}")
        except (TypeError, ValueError) as exc:
            if args.name:
                raise
            print(f"{name:<20} {'-':>14}  ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    configs = expand_runs(load_yaml(_preset_path(args.config)))
    out, note = output_folder(args.out)  # resolved once when a link; never one planted in a run or study
    if note:
        print(f"gammatrace: {note}", file=sys.stderr)
    for name in configs:
        inside(out, f"inspect_{name}.png")  # a planted link refused before anything is drawn
    for name, cfg in configs.items():
        sess = build_session(cfg)
        bs = min(cfg.batch_size, sess.data.n_train)
        per_sample = per_sample_loss(cfg.loss)
        table = inspect_init(sess.model, sess.x[:bs], sess.y[:bs], lambda o, y, f=per_sample: f(o, y).mean())
        print(f"== {name}")
        print(table.to_string(index=False))
        with tempfile.TemporaryDirectory(prefix="gammatrace-inspect-") as tmp:
            # drawn aside, then written through the one confined writer (issue 22)
            png = plot_inspect(table, Path(tmp) / "inspect.png").read_bytes()
        write_bytes_inside(out, f"inspect_{name}.png", png)
        print(f"figure: {out / f'inspect_{name}.png'}")
    return 0


def cmd_machine(args: argparse.Namespace) -> int:
    fp = fingerprint(args.device)
    if args.ray:
        # for `ray start --resources "$(gammatrace machine --ray)"`
        print(json.dumps({ray_resource(fp): 1}))
        return 0
    print(f"machine kind {machine_id(fp)}: {describe(fp)}")
    for key, value in fp.items():
        print(f"  {key}: {value}")
    print(f"Ray nodes of this kind: ray start ... --resources '{json.dumps({ray_resource(fp): 1})}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gammatrace", description="Exact measurement of optimization-trajectory principles.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train, replay exactly, analyse and report one or several runs")
    r.add_argument("config", help="a YAML config, or a packaged preset name (e.g. quickstart)")
    r.add_argument("--out", required=True, help="output folder (one sub-folder per run)")
    add_options(r, train, only={"workers"})
    # The disk budget's options, their help and defaults from the function that plans it.
    add_options(r, budget.plan_disk, only={"max_disk", "prune_checkpoints", "dry_run", "check_free"})
    r.add_argument("--no-report", action="store_true")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)

    a = sub.add_parser("analyze", help="(re)analyse a trained run against a reference")
    a.add_argument("run", help=option_help(analyze).get("run"))
    # Options, defaults and help from analyze() and AnalysisConfig: one definition each.
    add_options(a, analyze, only={"reference", "workers"})
    add_options(a, AnalysisConfig, only={"tail", "ell_inf"}, default=None, help_suffix="; default: the run config's")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(fn=cmd_analyze)

    rep = sub.add_parser("report", help="figures + markdown/HTML summary of analysed runs")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--out", required=True)
    rep.add_argument("--reference", default=None)
    rep.set_defaults(fn=cmd_report)

    m = sub.add_parser("models", help="list networks with parameter counts; unknown --flags are switches")
    m.add_argument("name", nargs="?")
    m.add_argument("--num-classes", type=int, default=10)
    m.add_argument("--input-shape", type=int, nargs="+", default=None)
    m.set_defaults(fn=cmd_models, takes_extra=True)

    i = sub.add_parser("inspect", help="per-layer forward/backward signal at initialization")
    i.add_argument("config")
    i.add_argument("--out", default="inspect")
    i.set_defaults(fn=cmd_inspect)

    mc = sub.add_parser("machine", help="this machine's kind: what a run's bits belong to (and its Ray resource)")
    mc.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    mc.add_argument("--ray", action="store_true",
                    help="print only the --resources JSON for `ray start` on a node of this kind")
    mc.set_defaults(fn=cmd_machine)

    # Subcommands that live beside their code: each module has register(subparsers),
    # whose parsers set_defaults(fn=...) like the ones above.
    for module in PLUGIN_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not (exc.name and module.startswith(exc.name)):
                raise  # a plugin that exists but fails to import is a bug, not absence
            continue
        mod.register(sub)
    return p


PLUGIN_COMMANDS = ("gammatrace.experiments.cli", "gammatrace.experiments.identity.cli", "gammatrace.landscape.cli",
                   "gammatrace.engine.script")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        parts = [f"{error_location(e['loc'])}: {e['msg']}" for e in exc.errors()]
        return "invalid config: " + "; ".join(parts)
    return " ".join(str(exc).split()) or exc.__class__.__name__


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C anywhere, building the parser (it imports the plugin commands) included: one
    # line, exit status 130 (`gammatrace.__main__` covers the imports before and the exit after).
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("gammatrace: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        try:
            return args.fn(args, extra) if getattr(args, "takes_extra", False) else args.fn(args)
        except OSError as exc:  # a full disk, a read-only folder: one line; any other OSError is a bug
            mapped = os_error(exc, str(exc.filename or "writing the output"))
            if mapped is None:
                raise
            raise mapped from None
    except (UserError, ValidationError) as exc:  # ValidationError: a config field pydantic refused
        print(f"gammatrace: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception:  # a bug: its traceback, and where to report it
        traceback.print_exc()
        print(f"gammatrace: {BUG_REPORT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
