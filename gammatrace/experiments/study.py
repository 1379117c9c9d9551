"""Studies: a named grid of runs plus the question it answers.

A study is a set of *cells* (one technique setting each, e.g. ``relu`` / ``sigmoid``)
that share a base config, repeated over seeds, plus the paper *claims* the report checks
("ReLU-type activations give larger γ and faster convergence than sigmoid"). Cells are
grouped by network/dataset (a *group*); figures, tables and claims are per group.
Built-in studies are registry entries ``factory(preset, data_dir) -> Study`` built from
typed :class:`GridSpec` objects (:mod:`gammatrace.experiments.presets`); users write the
same thing as YAML (:func:`study_from_yaml`), validated by the same models.

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gammatrace.analysis import analyze
from gammatrace.config import MAX_SEEDS, RunConfig, check_name, load_yaml
from gammatrace.config import merge_config as merge
from gammatrace.data import load_dataset
from gammatrace.engine import budget, train_pass
from gammatrace.engine.session import build_session
from gammatrace.errors import UserError
from gammatrace.executors import make_executor
from gammatrace.experiments.remote import report_to
from gammatrace.principles.claims import Order, parse_order, restrict_order
from gammatrace.principles.survey import Hypothesis, get_statistic
from gammatrace.registry import Registry
from gammatrace.store.backend import Location, inside, location
from gammatrace.store.run import Run, RunStore, check_out_folder, recorded_kind
from gammatrace.store.study import Claim, StudyMeta

STUDIES = Registry("study")


class StudyError(UserError, ValueError):
    """A study definition that cannot be built (unknown keys, a claim naming no cell)."""


# Claim (a paper's claim: its text, its weak order of cells from the claimed largest γ to the
# smallest, its group, its source) is part of study.json's schema, so it is defined with
# StudyMeta and used from there.
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
    # Seeds per cell when the caller does not say (run_study's seeds=None).
    seeds: int = 1
    # Cells whose paths the report draws on their own PCA planes (paper 002, Fig. 12).
    paths: list[str] = field(default_factory=list)
    # Landscape statements over a path statistic of the curvature table (the survey's), checked by
    # the claims' rule on each run's statistic (gammatrace.principles.survey).
    hypotheses: list[Hypothesis] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_seeds(self.seeds, f"study {self.name}: ")
        for cell in self.cells:  # printable, bounded folder names, before any run name is built from them
            check_name(cell, "cell")
        unknown = {c for claim in self.claims for c in claim.cells} - set(self.cells)
        unknown |= {c for h in self.hypotheses for c in h.cells} - set(self.cells)
        unknown |= {c for cells in self.groups.values() for c in cells} - set(self.cells)
        unknown |= set(self.paths) - set(self.cells)
        if unknown:
            raise StudyError(f"study {self.name}: claims/groups name unknown cells {sorted(unknown)}")

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
        _check_seeds(seeds)
        names = {(cell if seeds == 1 else f"{cell}-s{i}"): (cell, i) for cell in self.cells for i in range(seeds)}
        for name in names:  # a cell name near the length ceiling plus "-s12"
            check_name(name)
        return names

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
            >>> m.runs, m.seed_of["b-s1"], m.group("a-s0"), m.claims[0].order_text
            ({'a-s0': 'a', 'a-s1': 'a', 'b-s0': 'b', 'b-s1': 'b'}, 1, 'all', 'a > b')
        """
        names = self.run_names(seeds)
        # Only where there are some: a study without them keeps the study.json it always had
        # (a resumed study compares the file it finds with this one).
        extra = {"hypotheses": [h.as_json() for h in self.hypotheses]} if self.hypotheses else {}
        return StudyMeta(study=self.name, question=self.question, preset=self.preset, seeds=seeds,
                         shared_init=self.shared_init,
                         runs={name: cell for name, (cell, _) in names.items()},
                         seed_of={name: i for name, (_, i) in names.items()},
                         groups={name: self.group_of(cell) for name, (cell, _) in names.items()},
                         claims=list(self.claims), paths=list(self.paths), **extra)


def _check_seeds(seeds: int, where: str = "") -> None:
    """1 <= seeds <= MAX_SEEDS, before a name per seed is built."""
    if not 1 <= seeds <= MAX_SEEDS:
        raise StudyError(f"{where}seeds must be between 1 and {MAX_SEEDS:,}, got {seeds}")


def make_study(name: str, question: str, base: dict[str, Any], cells: dict[str, dict[str, Any]],
               claims: list[Claim] | None = None, groups: dict[str, list[str]] | None = None,
               preset: str = "custom", shared_init: bool = False, seeds: int = 1,
               paths: list[str] | None = None, hypotheses: list[Hypothesis] | None = None) -> Study:
    """A study from a base config dict and per-cell overrides (merged by :func:`merge`).

    Example:
        >>> s = make_study("demo", "?", {"data": {"name": "digits"}},
        ...                {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}})
        >>> s.cells["tanh"].model.switches()
        {'activation': 'tanh'}
    """
    configs = {c: RunConfig.model_validate(merge(merge(base, over or {}), {"name": c})) for c, over in cells.items()}
    return Study(name, question, configs, list(claims or []), dict(groups or {}), preset, shared_init, seeds,
                 list(paths or []), list(hypotheses or []))


# --------------------------------------------------------------------- typed definitions
class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Spec):
    """Where a paper states a claim: its file in ``../shared/papers/`` and the phrase.

    Example:
        >>> Source(paper="001_954b36295a226970.txt", quote="converge as fast as").text
        '001_954b36295a226970.txt: “converge as fast as”'
    """

    paper: str
    quote: str

    @property
    def text(self) -> str:
        return f"{self.paper}: “{self.quote}”"


class ClaimSpec(_Spec):
    """A claim over variant names: ``order`` a weak order (``"relu ≈ leaky_relu > tanh"``,
    or a list), ``source`` the paper's words (None: a hypothesis no paper states),
    ``first_epochs`` the window a paper states it over ("in the first 20 epochs"; None:
    the whole run), ``equivalent_within`` a margin δ for its ties (each then tested:
    |difference| < δ), ``speed`` the order of convergence speed the paper states.

    Example:
        >>> ClaimSpec(text="BN first", order="all ≈ first > none").order
        (('all', 'first'), ('none',))
        >>> ClaimSpec(text="Adam fastest", order="adam > momentum ≈ sgd", speed="adam > momentum > sgd").speed
        (('adam',), ('momentum',), ('sgd',))
    """

    text: str
    order: tuple[tuple[str, ...], ...]
    source: Source | None = None
    first_epochs: int | None = Field(None, ge=1)
    equivalent_within: float | None = Field(None, gt=0)
    speed: tuple[tuple[str, ...], ...] | None = None

    @field_validator("order", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Order:
        return parse_order(value)

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_levels(cls, value: Any) -> Order | None:
        return None if value is None else parse_order(value)


class HypothesisSpec(_Spec):
    """A landscape statement over variant names: ``order`` a weak order of the variants by
    ``statistic`` (a :data:`~gammatrace.principles.survey.STATISTICS` name, e.g. ``lambda_1``),
    largest first; ``source``/``quote`` the paper's words, ``summary_of`` whose finding the
    paper summarises (the survey's statements summarise other papers). Checked in every group
    by the claims' rule on each run's statistic; a group with fewer than two of its levels
    skips it.

    Example:
        >>> HypothesisSpec(text="BN: smaller λ_1", order="none > all ≈ first", statistic="lambda_1").order
        (('none',), ('all', 'first'))
    """

    text: str
    order: tuple[tuple[str, ...], ...]
    statistic: str
    source: Source | None = None
    summary_of: str | None = None

    @field_validator("order", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Order:
        return parse_order(value)

    @field_validator("statistic")
    @classmethod
    def _known(cls, value: str) -> str:
        get_statistic(value)
        return value


class GroupSpec(_Spec):
    """One network / dataset of a grid: ``base`` overrides the study's base; ``variants``
    (variant -> overrides) replace the study's when given; ``claims`` replace the study's
    when given (the papers state some orders per network)."""

    base: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] | None = None
    claims: list[ClaimSpec] | None = None


class GridSpec(_Spec):
    """A study in grid form: variants (the techniques) × groups (networks / datasets).

    ``base`` applies to every run; each group's ``base`` and each variant's overrides
    are merged onto it (:func:`~gammatrace.config.merge_config`). A claim of the study
    is checked in every group on the variants that group has, in claim order (a group
    with fewer than two of its levels skips it); a group's own ``claims`` replace the
    study's there and must name its variants. With one group a cell is named after its
    variant, otherwise ``group-variant``. ``seeds``: seeds per cell by default.
    ``across``: claims over cells of several groups, by cell name; an item ``"a − b"``
    of their order is the per-seed difference of two cells' γ (a claim about differences,
    tested on them by the same rule: paired by seed).

    Example:
        >>> spec = GridSpec(name="d", base={"data": {"name": "digits"}},
        ...                 variants={"relu": {"model": {"activation": "relu"}},
        ...                           "tanh": {"model": {"activation": "tanh"}}},
        ...                 groups={"mlp": GroupSpec(base={"model": {"name": "mlp"}}),
        ...                         "cnn": GroupSpec(base={"model": {"name": "cnn1d"}})},
        ...                 claims=[ClaimSpec(text="ReLU first", order="relu > tanh")])
        >>> s = spec.build()
        >>> sorted(s.cells), [(c.group, c.order_text) for c in s.claims]
        (['cnn-relu', 'cnn-tanh', 'mlp-relu', 'mlp-tanh'], [('mlp', 'mlp-relu > mlp-tanh'), ('cnn', 'cnn-relu > cnn-tanh')])
        >>> deeper = ClaimSpec(text="ReLU helps the CNN more", order="cnn-relu − cnn-tanh > mlp-relu − mlp-tanh")
        >>> c = spec.model_copy(update={"across": [deeper]}).build().claims[-1]
        >>> c.group, c.cells
        ('cnn, mlp', ('cnn-relu', 'cnn-tanh', 'mlp-relu', 'mlp-tanh'))
    """

    name: str = "study"
    question: str = ""
    base: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {}
    groups: dict[str, GroupSpec] = {}
    claims: list[ClaimSpec] = []
    shared_init: bool = False
    seeds: int = Field(1, ge=1, le=MAX_SEEDS)
    paths: list[str] = []  # variants whose paths the report draws on their own PCA planes, in every group
    # Claims across groups, over cell names (``group-variant``): e.g. a claim about
    # differences, "r34-all − r34-first > r18-all − r18-first" (each item per seed: γ of the
    # first cell minus γ of the second), checked once, in the groups of its cells.
    across: list[ClaimSpec] = []
    # Landscape statements over a path statistic (the survey's), in every group.
    hypotheses: list[HypothesisSpec] = []

    def build(self, preset: str = "custom") -> Study:
        """The :class:`Study` this grid defines (cell configs validated)."""
        groups = self.groups or {self.name: GroupSpec()}
        cells: dict[str, dict[str, Any]] = {}
        members: dict[str, list[str]] = {}
        claims: list[Claim] = []
        named = len(groups) > 1
        paths: list[str] = []
        for group, g in groups.items():
            variants = g.variants or self.variants
            if not variants:
                raise StudyError(f"study {self.name}, group {group}: no variants")
            cell_name = {v: f"{group}-{v}" if named else v for v in variants}
            for v, over in variants.items():
                cells[cell_name[v]] = merge(g.base, over or {})
            members[group] = list(cell_name.values())
            paths += [cell_name[v] for v in self.paths if v in cell_name]
            for c in g.claims if g.claims is not None else self.claims:
                unknown = sorted({v for lv in c.order for v in lv} - set(variants))
                if g.claims is not None and unknown:
                    raise StudyError(f"study {self.name}, group {group}: claim {c.text!r} names unknown variants "
                                     f"{unknown}")
                levels = restrict_order(c.order, variants)
                if len(levels) >= 2 or (c.equivalent_within is not None and sum(map(len, levels)) >= 2):
                    speed = restrict_order(c.speed, variants) if c.speed is not None else None
                    claims.append(Claim(c.text, [[cell_name[v] for v in lv] for lv in levels], group,
                                        c.source.text if c.source else None, c.first_epochs, c.equivalent_within,
                                        [[cell_name[v] for v in lv] for lv in speed]
                                        if speed is not None and len(speed) >= 2 else None))
        for c in self.across:
            claim = Claim(c.text, c.order, None, c.source.text if c.source else None, c.first_epochs,
                          c.equivalent_within, c.speed)
            unknown = sorted(set(claim.cells) - set(cells))
            if unknown:
                raise StudyError(f"study {self.name}: claim {c.text!r} names unknown cells {unknown}")
            names = {cell: g for g, ms in members.items() for cell in ms}
            claims.append(claim.model_copy(update={"group": ", ".join(dict.fromkeys(names[x] for x in claim.cells))}))
        hypotheses = []
        for group, g in groups.items():
            variants = g.variants or self.variants
            cell_name = {v: f"{group}-{v}" if named else v for v in variants}
            for h in self.hypotheses:
                levels = restrict_order(h.order, variants)
                if len(levels) >= 2:
                    hypotheses.append(Hypothesis(h.text, tuple(tuple(cell_name[v] for v in lv) for lv in levels),
                                                 h.statistic, h.source.paper if h.source else None,
                                                 h.source.quote if h.source else None, h.summary_of, group))
        known = {v for g in groups.values() for v in (g.variants or self.variants)}
        typos = {v for c in self.claims for lv in (*c.order, *(c.speed or ())) for v in lv} - known
        typos |= {v for h in self.hypotheses for lv in h.order for v in lv} - known
        if typos:  # a misspelt variant would silently drop out of every claim
            raise StudyError(f"study {self.name}: claims name unknown variants {sorted(typos)}")
        if set(self.paths) - known:
            raise StudyError(f"study {self.name}: paths name unknown variants {sorted(set(self.paths) - known)}")
        return make_study(self.name, self.question, self.base, cells, claims, members, preset=preset,
                          shared_init=self.shared_init, seeds=self.seeds, paths=paths, hypotheses=hypotheses)


class _CellClaim(_Spec):
    text: str
    order: tuple[tuple[str, ...], ...]
    group: str | None = None
    source: str | None = None
    first_epochs: int | None = Field(None, ge=1)
    equivalent_within: float | None = Field(None, gt=0)
    speed: tuple[tuple[str, ...], ...] | None = None

    @field_validator("order", mode="before")
    @classmethod
    def _levels(cls, value: Any) -> Order:
        return parse_order(value)

    @field_validator("speed", mode="before")
    @classmethod
    def _speed_levels(cls, value: Any) -> Order | None:
        return None if value is None else parse_order(value)


class CellsSpec(_Spec):
    """A study in cell form: ``cells`` (cell -> overrides of ``base``), ``claims`` over
    cell names (with their group), ``groups`` (group -> cells)."""

    name: str = "study"
    question: str = ""
    base: dict[str, Any] = {}
    cells: dict[str, dict[str, Any]] = Field(min_length=1)
    claims: list[_CellClaim] = []
    groups: dict[str, list[str]] | None = None
    shared_init: bool = False
    seeds: int = Field(1, ge=1, le=MAX_SEEDS)
    paths: list[str] = []  # cells whose paths the report draws on their own PCA planes

    def build(self, preset: str = "custom") -> Study:
        claims = [Claim(c.text, c.order, c.group, c.source, c.first_epochs, c.equivalent_within, c.speed)
                  for c in self.claims]
        return make_study(self.name, self.question, self.base, {c: over or {} for c, over in self.cells.items()},
                          claims, self.groups, preset=preset, shared_init=self.shared_init, seeds=self.seeds,
                          paths=self.paths)


def _validated(model: type[_Spec], data: Any, where: str) -> Any:
    """``model`` from ``data``; a validation error becomes one :class:`StudyError` line."""
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown keys ['{err['loc'][-1]}'] (at {loc})")
            else:
                problems.append(f"{loc}: {err['msg']}")
        raise StudyError(f"{where}: " + "; ".join(problems)) from None


def grid_study(spec: dict[str, Any] | GridSpec, preset: str = "custom") -> Study:
    """A study from the grid form (a :class:`GridSpec` or its dict, as YAML writes it).

    Example:
        >>> s = grid_study({"name": "d", "base": {"data": {"name": "digits"}},
        ...                 "variants": {"relu": {"model": {"activation": "relu"}},
        ...                              "tanh": {"model": {"activation": "tanh"}}},
        ...                 "claims": [{"text": "ReLU first", "order": ["relu", "tanh"]}]})
        >>> sorted(s.cells), s.claims[0].order_text
        (['relu', 'tanh'], 'relu > tanh')
    """
    name = spec.name if isinstance(spec, GridSpec) else spec.get("name", "study")
    return _validated(GridSpec, spec, f"study {name}").build(preset)


def study_from_yaml(path: str | Path) -> Study:
    """A user study from YAML, in either form.

    Grid form (:class:`GridSpec`): ``name, question, base, variants, groups: {group:
    {base, variants, claims}}, claims: [{text, order, first_epochs, equivalent_within, speed}],
    shared_init, seeds, paths``. Cell form (:class:`CellsSpec`): ``name, question, base,
    cells: {cell: overrides}, claims: [{text, order, group, first_epochs, equivalent_within,
    speed}], groups: {group: [cells]}, shared_init, seeds, paths``. A claim's ``order`` is a
    weak order, largest γ first: ``"relu ≈ leaky_relu > tanh"`` or a list; ``first_epochs``
    (optional) states it over the first N epochs only; ``equivalent_within`` (optional) a
    margin δ that gives each tie its own verdict (|difference| < δ, two one-sided exact
    tests; a claim of one level, ``"all ≈ first"``, is then an equivalence claim);
    ``speed`` (optional) the order of convergence speed the paper states, fastest first,
    checked beside the γ verdict.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "acts.yaml"
        >>> _ = path.write_text("base: {data: {name: digits}, model: {name: mlp, width: 8}}\\n"
        ...                     "variants: {relu: {model: {activation: relu}}, tanh: {model: {activation: tanh}}}\\n"
        ...                     "claims: [{text: ReLU first, order: relu > tanh, first_epochs: 20}]\\n")
        >>> study = study_from_yaml(path)  # grid form; named after the file
        >>> study.name, sorted(study.cells), study.cells["tanh"].model.switches()
        ('acts', ['relu', 'tanh'], {'width': 8, 'activation': 'tanh'})
        >>> study.claims
        [Claim(text='ReLU first', order=(('relu',), ('tanh',)), group='acts', source=None, first_epochs=20, equivalent_within=None, speed=None)]
    """
    data = load_yaml(path)
    data.setdefault("name", Path(path).stem)
    if "variants" in data or ("groups" in data and "cells" not in data):
        return grid_study(data, preset="yaml")
    if not isinstance(data.get("cells"), dict) or not data["cells"]:
        unknown = sorted(set(data) - set(CellsSpec.model_fields))
        if unknown:
            raise StudyError(f"{path}: unknown study keys {unknown}")
        raise StudyError(f"{path}: a study needs 'cells: {{name: overrides}}' or 'variants:' (grid form)")
    return _validated(CellsSpec, data, str(path)).build(preset="yaml")


# ------------------------------------------------------------------ shared initial point
def init_path(init_dir: str | Path | Location, group: str, seed_index: int) -> Path | Location:
    return location(init_dir).resolve() / f"{group}-s{seed_index}.pt"  # a URL on object storage


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
    store = RunStore(location(init_dir).resolve())
    datasets: dict[str, Any] = {}
    paths = []
    for group, cells in study.group_cells().items():
        for i in range(seeds):
            path = init_path(init_dir, group, i)
            paths.append(path)
            if store.exists(path.name):
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
def run_task(config: dict[str, Any], path: str, prune: bool = False) -> dict[str, Any]:
    """One run of a study: train (or resume), replay, analyse (and with ``prune``, delete
    the checkpoints once analysed). Top-level for executors; ``path`` may be a URL, so a
    Ray task needs no shared file system.

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
    if prune and not Run(path).meta.checkpoints_pruned:
        budget.prune_checkpoints(path)
    return {"path": path, "status": "complete", "analysed": done}


def run_study(study: Study, out: str | Path, *, seeds: int | None = None, executor: str = "local", workers: int = 1,
              address: str | None = None, gpus_per_task: float = 0.0, progress: bool = True,
              report_only: bool = False, dry_run: bool = False, max_disk: float | None = None,
              prune_checkpoints: bool = False, check_free: bool = True) -> Path | Location | None:
    """Run every cell × seed (resuming finished work), then write the report; returns its path.

    ``executor`` 'local' runs ``workers`` processes; 'ray' sends one task per run to a
    Ray cluster at ``address`` (or a local instance), each task asking for
    ``gpus_per_task`` GPUs; the out folder must then be on a file system every node
    sees, or on object storage (``s3://bucket/study``: tasks read and write it directly).
    ``report_only`` re-renders the report of the runs on disk.

    Args:
        study: the study (cells, claims)
        out: the study folder (one sub-folder per run, the report in report/)
        seeds: repeat every cell with this many seeds (default: the study's own, e.g. 3 for a quick
            preset, 4 where a claim has two cells)
        executor: where the runs go: local processes or a Ray cluster
        workers: parallel runs (local processes; Ray: local CPUs)
        address: Ray cluster address (executor ray); default: a local instance
        gpus_per_task: GPUs each Ray task asks for (executor ray)
        progress: show progress bars
        report_only: re-render the report of the runs on disk
        dry_run: print the plan and the disk estimate, then stop (no training; no data folder needed)
        max_disk: disk budget in GiB for the study folder; implies --prune-checkpoints; refused
            before training when the estimate exceeds it
        prune_checkpoints: delete each run's epoch checkpoints once its analysis succeeded (keeps θ_T,
            the continuation θ* and their hashes)
        check_free: refuse to start when the estimate exceeds the free space (--no-check-free: start anyway)

    Example:
        >>> run_study(STUDIES.get("activation")("quick", None), "studies/activation", workers=2)  # trains and analyses 4 runs: minutes  # doctest: +SKIP
        PosixPath('studies/activation/report/report.html')
    """
    out = location(out)  # a local folder, or a URL (s3://...) on object storage
    seeds = study.seeds if seeds is None else seeds
    meta = study.meta(seeds)
    path = StudyMeta.path(out)
    old = StudyMeta.load(path) if RunStore(out).exists(StudyMeta.FILE) else None
    if old is not None:
        if old.study != meta.study:
            raise StudyError(f"{out} holds another study ({old.study}); choose another --out")
        if old.runs != meta.runs:
            raise StudyError(f"{out} holds study {meta.study} with other runs ({len(old.runs)} "
                              f"vs {len(meta.runs)}: another preset or --seeds {old.seeds}?); "
                              "choose another --out")
    runs = study.runs(seeds, init_dir=out / "init")
    if not report_only:
        for cfg in runs.values():
            cfg.check_names()
        inits = {f"{g}-s{i}": study.cells[cells[0]] for g, cells in study.group_cells().items()
                 for i in range(seeds)} if study.shared_init else {}
        plan = budget.plan_disk(runs, out, max_disk=max_disk, prune_checkpoints=prune_checkpoints,
                                check_free=check_free, workers=workers if address is None else len(runs),
                                init_points=inits)
        budget.announce(plan, dry_run=dry_run, quiet=not progress)
        if dry_run:
            return None
        runs = budget.resolved(runs, plan)
        executor_ = make_executor(executor, workers=workers, address=address, num_gpus=gpus_per_task)
        # The study folder's lock is held by this command; each task holds its run's lock.
        with RunStore(check_out_folder(out)).lock():
            if not isinstance(out, Location):  # every cell, the shared points, the report: never a planted link
                for name in (*runs, "init", "report"):
                    inside(out, name, what="the study folder")
            if old != meta:
                meta.write(out)  # unchanged on resume: finished work keeps its mtimes
            if study.shared_init:
                prepare_init(study, out / "init", seeds)
            tasks = [(cfg.model_dump(mode="json"), str(out / name), plan.prune) for name, cfg in runs.items()]
            # A run begun earlier resumes and replays on its recording's machine kind
            # (Ray schedules it there); a new run may start on any node.
            executor_.map(run_task, tasks, desc=study.name, progress=progress,
                          machines=[recorded_kind(out / name) for name in runs])
    elif old is None:
        raise StudyError(f"{out} holds no study yet; run it first (without --report-only)")

    return report_to([out / name for name in runs], out / "report", title=f"gammatrace study: {study.name}",
                     study=path)
