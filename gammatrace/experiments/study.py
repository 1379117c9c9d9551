"""Studies: a named grid of runs plus the question it answers.

A study is a set of *cells* (one technique setting each, e.g. ``relu`` / ``sigmoid``)
that share a base config, repeated over seeds, plus the paper *claims* the report checks
("ReLU-type activations give larger γ and faster convergence than sigmoid"). Cells are
grouped by network/dataset (a *group*); figures, tables and claims are per group.
Built-in studies are registry entries ``factory(preset, data_dir) -> Study``; users
write the same thing as YAML (:func:`study_from_yaml`).

Every run is an independent task (train, verified replay, analysis against θ_T and,
when configured, a continuation reference), so a study fans out over an executor and
an interrupted study resumes without redoing finished runs: each task resumes its own
run directory and skips every analysis already on disk.

Example:
    >>> from gammatrace.experiments.study import STUDIES
    >>> study = STUDIES.get("activation")("quick", None)
    >>> sorted(study.cells)[:2], len(study.runs(seeds=2))
    (['leaky_relu', 'relu'], 8)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gammatrace.analysis import analyze
from gammatrace.config import RunConfig, load_yaml
from gammatrace.config import merge_config as merge
from gammatrace.data import load_dataset
from gammatrace.engine import train_pass
from gammatrace.engine.session import build_session
from gammatrace.executors import make_executor
from gammatrace.registry import Registry
from gammatrace.reporting import report
from gammatrace.store.run import RunStore, check_out_folder
from gammatrace.store.study import Claim, StudyMeta

STUDIES = Registry("study")


# Claim (a paper's claim: its text, its cells from the claimed largest γ to the smallest, its
# group) is part of study.json's schema, so it is defined with StudyMeta and used from there.
@dataclass
class Study:
    name: str
    question: str
    cells: dict[str, RunConfig]
    claims: list[Claim] = field(default_factory=list)
    # Figures and tables are drawn per group (a network/dataset); default: one group.
    groups: dict[str, list[str]] = field(default_factory=dict)
    preset: str = "custom"
    # One saved initial point per group and seed, loaded by every cell where shapes
    # allow (model.init_from), so cells differ only in the technique compared.
    shared_init: bool = False

    def __post_init__(self) -> None:
        unknown = {c for claim in self.claims for c in claim.order} - set(self.cells)
        unknown |= {c for cells in self.groups.values() for c in cells} - set(self.cells)
        if unknown:
            raise ValueError(f"study {self.name}: claims/groups name unknown cells {sorted(unknown)}")

    def group_of(self, cell: str) -> str:
        return next((g for g, cells in self.groups.items() if cell in cells), "all")

    def group_cells(self) -> dict[str, list[str]]:
        """Group -> its cells, in cell order; cells outside every group form 'all'."""
        out: dict[str, list[str]] = {}
        for cell in self.cells:
            out.setdefault(self.group_of(cell), []).append(cell)
        return out

    def run_names(self, seeds: int = 1) -> dict[str, tuple[str, int]]:
        """Run name -> (cell, seed index); with several seeds ``cell-s0``, ``cell-s1``, …"""
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return {(cell if seeds == 1 else f"{cell}-s{i}"): (cell, i) for cell in self.cells for i in range(seeds)}

    def runs(self, seeds: int = 1, init_dir: str | Path | None = None) -> dict[str, RunConfig]:
        """Run name -> config. With ``shared_init`` and an ``init_dir``, every run loads
        ``init_dir/<group>-s<i>.pt`` (see :func:`prepare_init`)."""
        out = {}
        for name, (cell, i) in self.run_names(seeds).items():
            cfg = self.cells[cell]
            over: dict[str, Any] = {"name": name, "seed": cfg.seed + i}
            if self.shared_init and init_dir is not None:
                over["model"] = {"init_from": str(init_path(init_dir, self.group_of(cell), i))}
            out[name] = cfg.with_overrides(over)
        return out

    def cell_of(self, run_name: str) -> str:
        return run_name if run_name in self.cells else run_name.rsplit("-s", 1)[0]

    def meta(self, seeds: int) -> StudyMeta:
        """What ``study.json`` records: the report reads cells, groups and claims from it.

        Example:
            >>> s = make_study("demo", "?", {}, {"a": {}, "b": {}}, [Claim("a first", ("a", "b"))])
            >>> m = s.meta(seeds=2)
            >>> m.runs, m.seed_of["b-s1"], m.group("a-s0"), m.claims[0].order
            ({'a-s0': 'a', 'a-s1': 'a', 'b-s0': 'b', 'b-s1': 'b'}, 1, 'all', ('a', 'b'))
        """
        names = self.run_names(seeds)
        return StudyMeta(study=self.name, question=self.question, preset=self.preset, seeds=seeds,
                         shared_init=self.shared_init,
                         runs={name: cell for name, (cell, _) in names.items()},
                         seed_of={name: i for name, (_, i) in names.items()},
                         groups={name: self.group_of(cell) for name, (cell, _) in names.items()},
                         claims=list(self.claims))


def make_study(name: str, question: str, base: dict[str, Any], cells: dict[str, dict[str, Any]],
               claims: list[Claim] | None = None, groups: dict[str, list[str]] | None = None,
               preset: str = "custom", shared_init: bool = False) -> Study:
    """A study from a base config dict and per-cell overrides (merged by :func:`merge`).

    Example:
        >>> s = make_study("demo", "?", {"data": {"name": "digits"}},
        ...                {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}})
        >>> s.cells["tanh"].model.switches()
        {'activation': 'tanh'}
    """
    configs = {c: RunConfig.model_validate(merge(merge(base, over or {}), {"name": c})) for c, over in cells.items()}
    return Study(name, question, configs, list(claims or []), dict(groups or {}), preset, shared_init)


GRID_KEYS = {"name", "question", "base", "variants", "groups", "claims", "shared_init"}


def grid_study(spec: dict[str, Any], preset: str = "custom") -> Study:
    """A study from the grid form: variants (the techniques) × groups (networks/datasets).

    ``spec`` keys: ``name``, ``question``, ``base`` (every run), ``variants``
    (variant -> overrides), ``groups`` (group -> ``{base: overrides, variants:
    {...}}``; a group's ``variants`` replaces the study's), ``claims`` (``[{text,
    order}]`` with ``order`` naming variants, largest γ first; each claim is checked
    in every group on the variants that group has, in claim order), ``shared_init``.
    With one group a cell is named after its variant, otherwise ``group-variant``.

    Example:
        >>> s = grid_study({"name": "d", "base": {"data": {"name": "digits"}},
        ...                 "variants": {"relu": {"model": {"activation": "relu"}},
        ...                              "tanh": {"model": {"activation": "tanh"}}},
        ...                 "groups": {"mlp": {"base": {"model": {"name": "mlp"}}},
        ...                            "cnn": {"base": {"model": {"name": "cnn1d"}}}},
        ...                 "claims": [{"text": "ReLU first", "order": ["relu", "tanh"]}]})
        >>> sorted(s.cells), [(c.group, c.order) for c in s.claims]
        (['cnn-relu', 'cnn-tanh', 'mlp-relu', 'mlp-tanh'], [('mlp', ('mlp-relu', 'mlp-tanh')), ('cnn', ('cnn-relu', 'cnn-tanh'))])
    """
    unknown = set(spec) - GRID_KEYS
    if unknown:
        raise ValueError(f"study {spec.get('name')}: unknown keys {sorted(unknown)}")
    groups = spec.get("groups") or {spec.get("name", "all"): {}}
    default_variants = spec.get("variants") or {}
    cells: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    claims: list[Claim] = []
    named = len(groups) > 1
    for group, g in groups.items():
        g = g or {}
        bad = set(g) - {"base", "variants"}
        if bad:
            raise ValueError(f"study {spec.get('name')}, group {group}: unknown keys {sorted(bad)}")
        variants = g.get("variants") or default_variants
        if not variants:
            raise ValueError(f"study {spec.get('name')}, group {group}: no variants")
        cell_name = {v: f"{group}-{v}" if named else v for v in variants}
        for v, over in variants.items():
            cells[cell_name[v]] = merge(g.get("base") or {}, over or {})
        members[group] = list(cell_name.values())
        for c in spec.get("claims") or []:
            order = tuple(cell_name[v] for v in c["order"] if v in cell_name)
            if len(order) >= 2:
                claims.append(Claim(c["text"], order, group))
    known = {v for g in groups.values() for v in ((g or {}).get("variants") or default_variants)}
    typos = {v for c in spec.get("claims") or [] for v in c["order"]} - known
    if typos:  # a misspelt variant would silently drop out of every claim
        raise ValueError(f"study {spec.get('name')}: claims name unknown variants {sorted(typos)}")
    return make_study(spec.get("name", "study"), spec.get("question", ""), spec.get("base") or {}, cells, claims,
                      members, preset=preset, shared_init=bool(spec.get("shared_init", False)))


def study_from_yaml(path: str | Path) -> Study:
    """A user study from YAML, in either form.

    Grid form (:func:`grid_study`): ``name, question, base, variants, groups: {group:
    {base, variants}}, claims: [{text, order}], shared_init``. Cell form: ``name,
    question, base, cells: {cell: overrides}, claims: [{text, order, group}], groups:
    {group: [cells]}``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "acts.yaml"
        >>> _ = path.write_text("base: {data: {name: digits}, model: {name: mlp, width: 8}}\\n"
        ...                     "variants: {relu: {model: {activation: relu}}, tanh: {model: {activation: tanh}}}\\n"
        ...                     "claims: [{text: ReLU first, order: [relu, tanh]}]\\n")
        >>> study = study_from_yaml(path)  # grid form; named after the file
        >>> study.name, sorted(study.cells), study.cells["tanh"].model.switches()
        ('acts', ['relu', 'tanh'], {'width': 8, 'activation': 'tanh'})
        >>> study.claims
        [Claim(text='ReLU first', order=('relu', 'tanh'), group='acts')]
    """
    data = load_yaml(path)
    data.setdefault("name", Path(path).stem)
    if "variants" in data or ("groups" in data and "cells" not in data):
        return grid_study(data, preset="yaml")
    unknown = set(data) - {"name", "question", "base", "cells", "claims", "groups", "shared_init"}
    if unknown:
        raise ValueError(f"{path}: unknown study keys {sorted(unknown)}")
    if not isinstance(data.get("cells"), dict) or not data["cells"]:
        raise ValueError(f"{path}: a study needs 'cells: {{name: overrides}}' or 'variants:' (grid form)")
    claims = [Claim(c["text"], tuple(c["order"]), c.get("group")) for c in data.get("claims") or []]
    return make_study(data["name"], data.get("question", ""), data.get("base") or {}, data["cells"], claims,
                      data.get("groups"), preset="yaml", shared_init=bool(data.get("shared_init", False)))


# ------------------------------------------------------------------ shared initial point
def init_path(init_dir: str | Path, group: str, seed_index: int) -> Path:
    return Path(init_dir).resolve() / f"{group}-s{seed_index}.pt"


def prepare_init(study: Study, init_dir: str | Path, seeds: int = 1) -> list[Path]:
    """Write the shared initial point of every group and seed (kept if already there).

    Each group's point merges the freshly initialized state dicts of its cells, largest
    model first, so every cell finds each of its tensors whose name and shape some cell
    of the group has (a U-Net without a skip has narrower decoder convs: those keep the
    cell's own seeded initialization). Built on the CPU; data is loaded once per
    distinct data config. Returns the paths.

    Example:
        >>> import tempfile
        >>> study = make_study("demo", "?", {"data": {"name": "digits", "n_train": 96, "n_test": 64},
        ...                                  "model": {"name": "mlp", "width": 8}},
        ...                    {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}},
        ...                    shared_init=True)
        >>> init_dir = tempfile.mkdtemp()
        >>> [p.name for p in prepare_init(study, init_dir, seeds=2)]  # one group, 'all'
        ['all-s0.pt', 'all-s1.pt']
        >>> runs = study.runs(seeds=2, init_dir=init_dir)  # every run of a seed starts there
        >>> Path(runs["relu-s1"].model.init_from) == Path(runs["tanh-s1"].model.init_from) == init_path(init_dir, "all", 1)
        True
    """
    store = RunStore(Path(init_dir).resolve())
    datasets: dict[str, Any] = {}
    paths = []
    for group, cells in study.group_cells().items():
        for i in range(seeds):
            path = init_path(init_dir, group, i)
            paths.append(path)
            if path.exists():
                continue  # resume: the runs already started from this file
            states = []
            for cell in cells:
                cfg = study.cells[cell].with_overrides({"seed": study.cells[cell].seed + i, "device": "cpu",
                                                        "model": {"init_from": None}})
                key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True)
                if key not in datasets:
                    d = cfg.data
                    datasets[key] = load_dataset(d.name, n_train=d.n_train, n_test=d.n_test, classes=d.classes,
                                                 **d.switches())
                states.append(build_session(cfg, data=datasets[key]).model.state_dict())
            merged: dict[str, Any] = {}
            for state in sorted(states, key=lambda s: -sum(v.numel() for v in s.values())):
                for k, v in state.items():
                    merged.setdefault(k, v.detach().cpu().clone())
            store.write_torch(path.name, merged)
    return paths


# ------------------------------------------------------------------------------ running
def run_task(config: dict[str, Any], path: str) -> dict[str, Any]:
    """One run of a study: train (or resume), replay, analyse. Top-level for executors.

    Finished work is never redone: training returns at once for a trained run, and an
    analysis whose ``summary.json`` is on disk (written last) is skipped, so rerunning
    a finished study rewrites none of its run files.
    """
    run = train_pass(config, path, progress=False)
    if run.status == "diverged":
        return {"path": path, "status": "diverged"}
    # A diverged continuation leaves only θ_T; the report says why (run.json's continuation_error).
    refs = ["last"] + (["continuation"] if run.config.reference.extra_epochs and not run.meta.continuation_error
                       else [])
    store = RunStore(path)
    done = []
    for ref in refs:
        if not store.exists(f"analysis/{ref}/summary.json"):
            analyze(path, ref, progress=False)
            done.append(ref)
    return {"path": path, "status": "complete", "analysed": done}


def run_study(study: Study, out: str | Path, *, seeds: int = 1, executor: str = "local", workers: int = 1,
              address: str | None = None, gpus_per_task: float = 0.0, progress: bool = True,
              report_only: bool = False) -> Path:
    """Run every cell × seed (resuming finished work), then write the report; returns its path.

    ``executor`` 'local' runs ``workers`` processes; 'ray' sends one task per run to a
    Ray cluster at ``address`` (or a local instance), each task asking for
    ``gpus_per_task`` GPUs; the out folder must then be on a file system every node
    sees. ``report_only`` re-renders the report of the runs on disk.

    Args:
        study: the study (cells, claims)
        out: the study folder (one sub-folder per run, the report in report/)
        seeds: repeat every cell with this many seeds
        executor: where the runs go: local processes or a Ray cluster
        workers: parallel runs (local processes; Ray: local CPUs)
        address: Ray cluster address (executor ray); default: a local instance
        gpus_per_task: GPUs each Ray task asks for (executor ray)
        progress: show progress bars
        report_only: re-render the report of the runs on disk

    Example:
        >>> run_study(STUDIES.get("activation")("quick", None), "studies/activation", workers=2)  # trains and analyses 4 runs: minutes  # doctest: +SKIP
        PosixPath('studies/activation/report/report.html')
    """
    out = Path(out)
    meta = study.meta(seeds)
    path = StudyMeta.path(out)
    old = StudyMeta.load(path) if path.exists() else None
    if old is not None:
        if old.study != meta.study:
            raise ValueError(f"{out} holds another study ({old.study}); choose another --out")
        if old.runs != meta.runs:
            raise ValueError(f"{out} holds study {meta.study} with other runs ({len(old.runs)} "
                             f"vs {len(meta.runs)}: another preset or --seeds {old.seeds}?); "
                             "choose another --out")
    runs = study.runs(seeds, init_dir=out / "init")
    if not report_only:
        for cfg in runs.values():
            cfg.check_names()
        executor_ = make_executor(executor, workers=workers, address=address, num_gpus=gpus_per_task)
        # The study folder's lock is held by this command; each task holds its run's lock.
        with RunStore(check_out_folder(out)).lock():
            if old != meta:
                meta.write(out)  # unchanged on resume: finished work keeps its mtimes
            if study.shared_init:
                prepare_init(study, out / "init", seeds)
            tasks = [(cfg.model_dump(mode="json"), str(out / name)) for name, cfg in runs.items()]
            executor_.map(run_task, tasks, desc=study.name, progress=progress)
    elif old is None:
        raise ValueError(f"{out} holds no study yet; run it first (without --report-only)")

    return report([out / name for name in runs], out / "report", title=f"gammatrace study: {study.name}",
                  study=path)
