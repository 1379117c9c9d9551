"""Studies: a named grid of runs plus the question it answers.

A study is a set of *cells* (one technique setting each, e.g. ``relu`` / ``sigmoid``)
that share a base config, repeated over seeds, plus the paper *claims* the report checks
("ReLU-type activations give larger γ and faster convergence than sigmoid"). Built-in
studies are registry entries ``factory(preset, data_dir) -> Study``; users write the
same thing as YAML (:func:`study_from_yaml`).

Every run is an independent task (train, verified replay, analysis against θ_T and,
when configured, a continuation reference), so a study fans out over an executor and
an interrupted study resumes without redoing finished runs: each task resumes its own
run directory.

Example:
    >>> from gammatrace.experiments.study import STUDIES
    >>> study = STUDIES.get("activation")("quick", None)
    >>> sorted(study.cells)[:2], len(study.runs(seeds=2))      # doctest: +SKIP
    (['leaky_relu', 'relu'], 8)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gammatrace.config import RunConfig, deep_merge, load_yaml
from gammatrace.registry import Registry

STUDIES = Registry("study")


@dataclass(frozen=True)
class Claim:
    """A paper's claim about a set of cells: ``order`` lists them from the claimed
    largest γ (and fastest convergence) to the smallest."""

    text: str
    order: tuple[str, ...]
    group: str | None = None


@dataclass
class Study:
    name: str
    question: str
    cells: dict[str, RunConfig]
    claims: list[Claim] = field(default_factory=list)
    # Figures and tables are drawn per group (a network/dataset); default: one group.
    groups: dict[str, list[str]] = field(default_factory=dict)
    preset: str = "custom"

    def __post_init__(self) -> None:
        unknown = {c for claim in self.claims for c in claim.order} - set(self.cells)
        unknown |= {c for cells in self.groups.values() for c in cells} - set(self.cells)
        if unknown:
            raise ValueError(f"study {self.name}: claims/groups name unknown cells {sorted(unknown)}")

    def group_of(self, cell: str) -> str:
        return next((g for g, cells in self.groups.items() if cell in cells), "all")

    def runs(self, seeds: int = 1) -> dict[str, RunConfig]:
        """Run name -> config; with several seeds each cell becomes ``cell-s0``, ``cell-s1``, …"""
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        out = {}
        for cell, cfg in self.cells.items():
            for i in range(seeds):
                name = cell if seeds == 1 else f"{cell}-s{i}"
                out[name] = cfg.with_overrides({"name": name, "seed": cfg.seed + i})
        return out

    def cell_of(self, run_name: str) -> str:
        return run_name if run_name in self.cells else run_name.rsplit("-s", 1)[0]


def make_study(name: str, question: str, base: dict[str, Any], cells: dict[str, dict[str, Any]],
               claims: list[Claim] | None = None, groups: dict[str, list[str]] | None = None,
               preset: str = "custom") -> Study:
    """A study from a base config dict and per-cell overrides."""
    configs = {c: RunConfig.model_validate(deep_merge(deep_merge(base, over or {}), {"name": c}))
               for c, over in cells.items()}
    return Study(name, question, configs, list(claims or []), dict(groups or {}), preset)


def study_from_yaml(path: str | Path) -> Study:
    """A user study: ``name, question, base, cells: {cell: overrides}, claims: [{text, order}], groups``."""
    data = load_yaml(path)
    unknown = set(data) - {"name", "question", "base", "cells", "claims", "groups"}
    if unknown:
        raise ValueError(f"{path}: unknown study keys {sorted(unknown)}")
    if not isinstance(data.get("cells"), dict) or not data["cells"]:
        raise ValueError(f"{path}: a study needs 'cells: {{name: overrides}}'")
    claims = [Claim(c["text"], tuple(c["order"]), c.get("group")) for c in data.get("claims") or []]
    return make_study(data.get("name") or Path(path).stem, data.get("question", ""), data.get("base") or {},
                      data["cells"], claims, data.get("groups"), preset="yaml")


def run_task(config: dict[str, Any], path: str) -> dict[str, Any]:
    """One run of a study: train (or resume), replay, analyse. Top-level for executors."""
    from gammatrace.analysis import analyze
    from gammatrace.train import train_pass

    run = train_pass(config, path, progress=False)
    if run.status == "diverged":
        return {"path": path, "status": "diverged"}
    analyze(path, "last", progress=False)
    if run.config.reference.extra_epochs:
        analyze(path, "continuation", progress=False)
    return {"path": path, "status": "complete"}


def run_study(study: Study, out: str | Path, *, seeds: int = 1, executor: str = "local", workers: int = 1,
              address: str | None = None, progress: bool = True) -> Path:
    """Run every cell × seed (resuming finished work), then write the report; returns its path."""
    from gammatrace.experiments.executors import make_executor
    from gammatrace.store.run import RunStore

    out = Path(out)
    runs = study.runs(seeds)
    for cfg in runs.values():
        cfg.check_names()
    store = RunStore(out)
    meta = {"study": study.name, "question": study.question, "preset": study.preset, "seeds": seeds,
            "runs": {name: study.cell_of(name) for name in runs},
            "groups": {name: study.group_of(study.cell_of(name)) for name in runs},
            "claims": [{"text": c.text, "order": list(c.order), "group": c.group} for c in study.claims]}
    if store.exists("study.json"):
        old = store.read_json("study.json")
        if old.get("runs") != meta["runs"] or old.get("study") != meta["study"]:
            raise ValueError(f"{out} holds another study ({old.get('study')}); choose another --out")
    store.write_json("study.json", meta)
    tasks = [(cfg.model_dump(mode="json"), str(out / name)) for name, cfg in runs.items()]
    make_executor(executor, workers=workers, address=address).map(run_task, tasks, desc=study.name,
                                                                   progress=progress)
    from gammatrace.report import report

    return report([out / name for name in runs], out / "report", title=f"gammatrace study: {study.name}")
