"""The survey's landscape hypotheses in a study report, γ against λ_1 across runs, and the figure.

A study may carry *hypotheses* (``study.json``'s ``hypotheses``, written from the presets'
:class:`~gammatrace.experiments.study.HypothesisSpec`): landscape statements of paper 004,
the survey, which summarises other papers ("with BN, λ_1 along the path is smaller"). Each is
a weak order of cells by a path statistic of the runs' curvature tables
(``analysis/<ref>/curvature/``; :mod:`gammatrace.principles.survey`), and its verdict comes
from the one rule of every claim (:func:`~gammatrace.principles.claims.check_claim`), each
run's statistic in place of its median γ_k, with the same run exclusions
(:func:`~gammatrace.reporting.claims.exclusion`). Where a run of the hypothesis has no value
(no curvature table, or the column absent), the hypothesis says **not measured** and gives no
verdict.

Beside them, per group: Spearman's rank correlation across the runs between median γ_k and
median λ_1 along the path (and median η_k·λ_1/2) — a correlation over n runs, said as such —
a figure of median γ_k against median λ_1, one point per run, and (every study) the ratio
RSI_k/EB_k of "No Wrong Turns" per epoch beside γ_k (:func:`rsi_eb_figure`).

Example:
    >>> import pandas as pd
    >>> from gammatrace.principles.survey import Hypothesis
    >>> from gammatrace.reporting.collect import example_entry
    >>> from gammatrace.reporting.study import StudyRun
    >>> runs = [StudyRun(f"{c}-s{i}", c, "g", example_entry(f"{c}-s{i}"), None, i) for c in ("none", "all")
    ...         for i in range(5)]
    >>> tables = {r.name: pd.DataFrame({"lambda_1": [9.0 + i if r.cell == "none" else 2.0 + i]})
    ...           for i, r in enumerate(runs)}
    >>> h = Hypothesis("BN: smaller λ_1", "none > all", "lambda_1", group="g")
    >>> check_hypothesis(h, runs, tables).text
    'consistent (every relation p < α = 0.05: none > all: p = 0.031)'
    >>> check_hypothesis(h, runs, {}).text
    'not measured (no curvature table: none-s0, none-s1, none-s2, none-s3, none-s4, all-s0, …)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure as MplFigure

from gammatrace.principles.claims import ClaimResult, RunPoint, check_claim
from gammatrace.principles.survey import (
    CURVATURE_TABLE,
    NOT_MEASURED,
    Hypothesis,
    get_statistic,
    missing_columns,
    path_statistic,
    spearman,
)
from gammatrace.reporting.claims import exclusion
from gammatrace.reporting.collect import RunEntry, num
from gammatrace.reporting.document import Block, Bullets, Figure, Heading, Table, Text, fmt
from gammatrace.reporting.figures import gamma_epoch_stats, run_colors, save_figure
from gammatrace.reporting.study import REFERENCES, StudyRun
from gammatrace.store.run import RunStore, StoreError
from gammatrace.store.study import StudyMeta

# A run's curvature table is the same under every reference (λ_1 at θ_k involves no θ*); the
# first reference whose replay measured it is read.
TABLE_REFERENCES = ("last", "continuation")
# What the figure and the correlation read: each run's median γ_k and its curvature table's λ_1.
FIGURE_NEEDS = ("summary.gamma_median", f"{CURVATURE_TABLE}.lambda_1")


def curvature_table(entry: RunEntry | None) -> pd.DataFrame | None:
    """The run's curvature step-hook table (``analysis/<ref>/curvature/``) of the first
    reference that has one; None where no replay measured curvature (or it cannot be read).

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> print(curvature_table(example_entry()))
        None
    """
    if entry is None:
        return None
    store = entry.run.store
    for ref in TABLE_REFERENCES:
        folder = RunStore.analysis(ref, CURVATURE_TABLE)
        try:
            if store.shard_paths(folder):
                table = store.read_shards(folder)
                return table if len(table) else None
        except (StoreError, OSError):
            continue
    return None


def read_tables(runs: Sequence[StudyRun]) -> dict[str, pd.DataFrame]:
    """Run name -> its curvature table, for the runs that have one."""
    out = {}
    for r in runs:
        t = curvature_table(r.last)
        if t is not None:
            out[r.name] = t
    return out


def hypotheses_of(info: StudyMeta) -> list[Hypothesis]:
    """The hypotheses ``study.json`` lists (none for a study written without them).

    Example:
        >>> info = StudyMeta(study="s", hypotheses=[{"text": "t", "order": [["a"], ["b"]], "statistic": "lambda_1"}])
        >>> [h.order_text for h in hypotheses_of(info)], hypotheses_of(StudyMeta(study="s"))
        (['a > b'], [])
    """
    raw = getattr(info, "hypotheses", None) or []
    return [Hypothesis.from_json(h) for h in raw]


@dataclass
class HypothesisCheck:
    """One hypothesis on the study's runs: each run's statistic (``values``, by run name),
    the verdict of the claims' rule (``result``), or why it was not measured."""

    hypothesis: Hypothesis
    values: dict[str, float]
    result: ClaimResult | None
    not_measured: str | None = None

    @property
    def verdict(self) -> str:
        return NOT_MEASURED if self.result is None else self.result.verdict

    @property
    def text(self) -> str:
        if self.result is None:
            return f"{NOT_MEASURED} ({self.not_measured})"
        return self.result.text


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (", …" if len(names) > limit else "")


def check_hypothesis(h: Hypothesis, runs: Sequence[StudyRun], tables: Mapping[str, pd.DataFrame]) -> HypothesisCheck:
    """Decide ``h`` on the runs of its cells by the claims' rule on each run's path
    statistic; not measured (no verdict) where a run of its cells lacks the table or a column
    it needs, or has no finite value. Example: see the module."""
    mine = [r for r in runs if r.cell in set(h.cells) and (h.group is None or r.group == h.group)]
    values = {r.name: path_statistic(tables.get(r.name), h.statistic) for r in mine}
    if not mine:
        return HypothesisCheck(h, values, None, "no run of its cells")
    no_table = [r.name for r in mine if r.name not in tables]
    if no_table:
        return HypothesisCheck(h, values, None, f"no curvature table: {_names(no_table)}")
    lacking = sorted({c for r in mine for c in missing_columns(tables[r.name], h.statistic)})
    if lacking:
        return HypothesisCheck(h, values, None, f"the curvature tables lack {', '.join(lacking)}")
    undefined = [r.name for r in mine if not math.isfinite(values[r.name])]
    if undefined:
        return HypothesisCheck(h, values, None, f"no finite {h.statistic} along the path: {_names(undefined)}")
    points = [RunPoint(r.name, r.cell, values[r.name], math.nan, exclusion(r.last), r.seed) for r in mine]
    return HypothesisCheck(h, values, check_claim(h.order, points))


def hypothesis_sentence(check: HypothesisCheck) -> str:
    """The hypothesis, where, by what, and its verdict, in one sentence.

    Example:
        >>> h = Hypothesis("BN: smaller λ_1", "none > all", "lambda_1", "004.txt", "Lipschitz", "Santurkar et al.", "g")
        >>> hypothesis_sentence(HypothesisCheck(h, {}, None, "no run of its cells"))
        "BN: smaller λ_1 (g): none > all by median λ_1 along the path (largest Hessian eigenvalue) per run — not measured (no run of its cells). Source: 004.txt (the survey's summary of Santurkar et al.): “Lipschitz”."
    """
    h = check.hypothesis
    where = f" ({h.group})" if h.group else ""
    return (f"{h.text}{where}: {h.order_text} by {get_statistic(h.statistic).label} per run — {check.text}. "
            f"Source: {h.attribution}.")


@dataclass
class Correlation:
    """Spearman's ρ across a group's runs between median γ_k and a path statistic."""

    group: str
    statistic: str
    rho: float
    n: int
    cells: int

    @property
    def text(self) -> str:
        label = get_statistic(self.statistic).label
        if self.n < 3 or not math.isfinite(self.rho):
            return (f"{self.group}: median γ_k vs {label}: not computed ({self.n} run(s) with both numbers; "
                    "a rank correlation needs 3 and values that are not all equal)")
        return (f"{self.group}: Spearman ρ = {self.rho:.2f} between median γ_k and {label}, over n = {self.n} runs "
                f"of {self.cells} cell(s)")


def _gamma(r: StudyRun) -> float:
    e = r.cont if r.cont is not None and r.cont.analysed else r.last
    return num(e.summary.get("gamma_median")) if e is not None and e.analysed else math.nan


def correlations(runs: Sequence[StudyRun], tables: Mapping[str, pd.DataFrame]) -> list[Correlation]:
    """Per group, ρ of median γ_k (the verdict reference: continuation θ* where analysed, else
    θ_T) with median λ_1 and with median η_k·λ_1/2, over the runs no claim excludes that have
    both numbers.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> runs = [StudyRun(f"r{i}", "a", "g", example_entry(f"r{i}", 0.1 * i), None, i) for i in range(1, 5)]
        >>> tables = {r.name: pd.DataFrame({"lr": 0.1, "lambda_1": [10.0 / i]}) for i, r in enumerate(runs, 1)}
        >>> [c.text for c in correlations(runs, tables)][0]
        'g: Spearman ρ = -1.00 between median γ_k and median λ_1 along the path (largest Hessian eigenvalue), over n = 4 runs of 1 cell(s)'
    """
    out = []
    for group in dict.fromkeys(r.group for r in runs):
        ok = [r for r in runs if r.group == group and exclusion(r.last) is None]
        gamma = [_gamma(r) for r in ok]
        for stat in ("lambda_1", "stability"):
            values = [path_statistic(tables.get(r.name), stat) for r in ok]
            rho, n = spearman(gamma, values)
            both = [r.cell for r, g, v in zip(ok, gamma, values, strict=True) if math.isfinite(g) and math.isfinite(v)]
            out.append(Correlation(group, stat, rho, n, len(set(both))))
    return out


def survey_blocks(info: StudyMeta, runs: Sequence[StudyRun], out: str | Path | None = None) -> list[Block]:
    """The report's "Landscape hypotheses" section: each hypothesis's verdict with its per-cell
    values, then the correlations, then (given ``out``) a figure per group; nothing for a
    study without hypotheses and without curvature tables."""
    hyps = hypotheses_of(info)
    tables = read_tables(runs)
    ratio = _ratio_blocks(runs, out) if out is not None else []
    if not hyps and not tables:
        return [Heading("RSI/EB beside γ", 2), *ratio] if any(isinstance(b, Figure) for b in ratio) else []
    blocks: list[Block] = [Heading("Landscape hypotheses and curvature", 2), Text(
        "The statements below are the survey's (paper 004) summary of other papers, not claims of the papers "
        "this study reproduces; each is checked by the same rule as every claim (an exact sign test per strict "
        "relation, paired by seed; consistent only when every relation's p < α), on each run's median of the "
        "statistic over its curvature measurements (at the steps its run config's curvature block names: every N "
        "steps, and at the epoch ends where it says so; on a fixed evaluation subset) instead of its median γ_k. A hypothesis some run of which was not measured says so and gets no "
        "verdict.")]
    checks = [check_hypothesis(h, runs, tables) for h in hyps]
    if checks:
        blocks.append(Bullets([hypothesis_sentence(c) for c in checks]))
    for c in checks:
        if c.result is None:
            continue
        rows = []
        for cell in c.hypothesis.cells:
            vals = [v for name, v in c.values.items() if next(r.cell for r in runs if r.name == name) == cell]
            rows.append([cell, str(len(vals)), fmt(float(np.median(vals))) if vals else "—",
                         f"{fmt(min(vals), 3)} – {fmt(max(vals), 3)}" if vals else "—"])
        blocks.append(Text(f"{c.hypothesis.text} ({c.hypothesis.group}): each run's "
                           f"{get_statistic(c.hypothesis.statistic).label}, per cell."))
        blocks.append(Table(["cell", "runs", f"median over runs of {c.hypothesis.statistic}", "min – max"], rows))
    corr = correlations(runs, tables)
    ref = "continuation" if any(r.cont is not None and r.cont.analysed for r in runs) else "last"
    blocks.append(Text(
        f"Rank correlation across runs (median γ_k with {REFERENCES[ref]}): a correlation over the n runs named, "
        "which mixes differences between cells with the spread of seeds within a cell; it says how the two "
        "numbers co-vary across these runs, not that one causes the other."))
    blocks.append(Bullets([c.text for c in corr]))
    if out is not None:
        for group in dict.fromkeys(r.group for r in runs):
            notes: list[str] = []
            stem = _stem("gamma_lambda_", group)
            png = gamma_lambda_figure([r for r in runs if r.group == group], tables, Path(out), notes,
                                      title=f"{info.name}: {group} — median γ_k against median λ_1", stem=stem)
            blocks.append(Figure(png.name, f"{group}. {GAMMA_LAMBDA_CAPTION}", pdf=png.with_suffix(".pdf").name,
                                 notes=notes) if png is not None else
                          Text(f"{stem}.png not drawn. " + "; ".join(notes)))
    return blocks + ratio


def _stem(prefix: str, group: str) -> str:
    return prefix + "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in group)


def _ratio_blocks(runs: Sequence[StudyRun], out: str | Path) -> list[Block]:
    """One RSI/EB-beside-γ figure per group (θ* = θ_T, the runs' own step tables)."""
    blocks: list[Block] = []
    for group in dict.fromkeys(r.group for r in runs):
        cells: dict[str, list[RunEntry]] = {}
        for r in runs:
            if r.group == group:
                cells.setdefault(r.cell, []).append(r.last)
        notes: list[str] = []
        stem = _stem("rsi_eb_", group)
        png = rsi_eb_figure(cells, Path(out), notes, title=f"{group} — γ_k and RSI/EB per epoch (θ* = θ_T)",
                            stem=stem)
        if png is not None:
            blocks.append(Figure(png.name, f"{group}. {RSI_EB_CAPTION}", pdf=png.with_suffix(".pdf").name,
                                 notes=notes))
        elif notes:
            blocks.append(Text(f"{stem}.png not drawn. " + "; ".join(notes)))
    return blocks


RSI_EB_CAPTION = (
    "Per epoch, the median over its steps of γ_k (top; paper 002's γ, θ* = θ_T) and of RSI_k/EB_k = "
    "⟨g_k, θ_k − θ*⟩ / (‖g_k‖ ‖θ_k − θ*‖) (bottom; the ratio \"No Wrong Turns\" calls γ, from the raw mini-batch "
    "gradient: the cosine of g_k and θ_k − θ*), one line per cell: the median over its seeds. Open circles, where "
    "the run config has a curvature block: the same ratio with the gradient of the loss over the fixed evaluation "
    "subset instead of g_k, at each epoch's last step (median over seeds).")
# What the RSI/EB figure reads from each run's step table.
RSI_EB_NEEDS = ("epoch", "gamma", "grad_dot", "grad_sq", "dist_sq")


def _ratio(steps: pd.DataFrame) -> pd.Series:
    """rsi_eb, or (a table analysed before it was derived) from its raw columns."""
    if "rsi_eb" in steps:
        return steps["rsi_eb"].astype(np.float64)
    den = np.sqrt(steps["grad_sq"].astype(np.float64) * steps["dist_sq"].astype(np.float64))
    return (steps["grad_dot"].astype(np.float64) / den).where(den > 0)


def _subset_ratio(entry: RunEntry) -> pd.Series:
    """RSI/EB of the evaluation-subset gradient at each epoch end (the ``subset_secant`` table:
    ⟨G, θ_k − θ*⟩ / (‖G‖ d_k)), indexed by epoch like the per-epoch medians; empty without it."""
    t = entry.secant
    if not {"epoch", "grad_dot", "grad_sq", "dist_sq"} <= set(t.columns):
        return pd.Series(dtype=np.float64)
    den = np.sqrt(t["grad_sq"].to_numpy(np.float64) * t["dist_sq"].to_numpy(np.float64))
    ratio = np.where(den > 0, t["grad_dot"].to_numpy(np.float64) / np.where(den > 0, den, 1.0), np.nan)
    return pd.Series(ratio, index=t["epoch"].to_numpy())


def rsi_eb_figure(cells: Mapping[str, Sequence[RunEntry]], out: str | Path, notes: list[str], title: str = "",
                  stem: str = "rsi_eb") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: per epoch, the median γ_k (top) and the median RSI_k/EB_k
    (bottom) of each cell (the median over its seeds of each run's per-epoch median). Needs
    :data:`RSI_EB_NEEDS` in the step tables; a run without them is named in ``notes`` and
    left out; None when no run has them.

    Example:
        >>> import tempfile
        >>> from gammatrace.reporting.collect import example_entry
        >>> e = example_entry("a")
        >>> print(rsi_eb_figure({"a": [e]}, tempfile.mkdtemp(), notes := []))
        None
        >>> notes
        ['a: RSI/EB figure skipped (missing steps.gamma, steps.grad_dot, steps.grad_sq)']
        >>> e.steps = pd.DataFrame({"epoch": [0, 0, 1], "gamma": [0.2, 0.3, 0.4], "grad_dot": [1.0, 2.0, 1.0],
        ...                         "grad_sq": [4.0, 4.0, 1.0], "dist_sq": [1.0, 1.0, 4.0]})
        >>> rsi_eb_figure({"a": [e]}, tempfile.mkdtemp(), []).name
        'rsi_eb.png'
    """
    lines = {}
    for cell, entries in cells.items():
        per_run = []
        for e in entries:
            miss = [c for c in RSI_EB_NEEDS if c not in e.steps.columns]
            if not e.analysed or miss:
                notes.append(f"{e.label}: RSI/EB figure skipped (missing {', '.join('steps.' + c for c in miss)})"
                             if miss else f"{e.label}: RSI/EB figure skipped (not analysed)")
                continue
            st = e.steps.assign(rsi_eb=_ratio(e.steps))
            per_run.append((gamma_epoch_stats(st)["median"], gamma_epoch_stats(st, "rsi_eb")["median"],
                            _subset_ratio(e)))
        if per_run:
            lines[cell] = tuple(pd.concat([r[i] for r in per_run], axis=1).median(axis=1) for i in (0, 1, 2))
    if not lines:
        return None
    colors = dict(zip(lines, run_colors(len(lines)), strict=True))
    fig = MplFigure(figsize=(6.4, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for cell, (gamma, ratio, subset) in lines.items():
        top.plot(gamma.index, gamma.to_numpy(), color=colors[cell], label=cell)
        bottom.plot(ratio.index, ratio.to_numpy(), color=colors[cell], label=cell)
        if subset.notna().any():
            bottom.plot(subset.index, subset.to_numpy(), "o", ms=3.5, mfc="none", color=colors[cell])
    if any(subset.notna().any() for _, _, subset in lines.values()):
        # Said above the axis: a legend inside it covers the curves.
        bottom.set_title("lines: mini-batch g_k; circles: the evaluation subset's gradient at epoch ends", fontsize=8)
    values = np.concatenate([g.to_numpy() for g, _, _ in lines.values()])
    values = values[np.isfinite(values)]
    top.set_yscale("log" if len(values) and (values > 0).all() else "symlog")
    top.set_ylabel("median γ_k")
    bottom.set_ylabel("median RSI_k / EB_k")
    bottom.axhline(0.0, color="grey", lw=0.6)
    bottom.set_xlabel("epoch")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=8)
    if title:
        top.set_title(title, fontsize=9)
    return save_figure(fig, out, stem)


GAMMA_LAMBDA_CAPTION = (
    "Each run's median γ_k (y; continuation θ* where analysed, else θ* = θ_T) against its median λ_1 along the "
    "path (x, log scale; the largest Hessian eigenvalue on the fixed evaluation subset, at the steps the run "
    "config's curvature block names), one small point per run, a large marker at each cell's medians. Runs a claim excludes "
    "are left out.")


def gamma_lambda_figure(runs: Sequence[StudyRun], tables: Mapping[str, pd.DataFrame], out: str | Path,
                        notes: list[str], title: str = "", stem: str = "gamma_lambda") -> Path | None:
    """Draw ``<stem>.png``/``.pdf``: median γ_k against median λ_1 per run, coloured by cell,
    with each cell's medians marked. Needs :data:`FIGURE_NEEDS`; returns None (and says why
    in ``notes``) when no run has both.

    Example:
        >>> import tempfile
        >>> from gammatrace.reporting.collect import example_entry
        >>> runs = [StudyRun(f"w{w}", f"w{w}", "mlp", example_entry(f"w{w}", 0.1 * i), None, 0)
        ...         for i, w in enumerate((16, 64), 1)]
        >>> print(gamma_lambda_figure(runs, {}, tempfile.mkdtemp(), notes := []))
        None
        >>> notes
        ['γ–λ_1 figure skipped: no run has both summary.gamma_median and curvature.lambda_1']
        >>> tables = {"w16": pd.DataFrame({"lambda_1": [8.0]}), "w64": pd.DataFrame({"lambda_1": [4.0]})}
        >>> gamma_lambda_figure(runs, tables, tempfile.mkdtemp(), []).name
        'gamma_lambda.png'
    """
    points = []
    for r in runs:
        if exclusion(r.last) is not None:
            continue
        g, lam = _gamma(r), path_statistic(tables.get(r.name), "lambda_1")
        if math.isfinite(g) and math.isfinite(lam) and lam > 0:
            points.append((r.cell, lam, g))
    if not points:
        notes.append(f"γ–λ_1 figure skipped: no run has both {' and '.join(FIGURE_NEEDS)}")
        return None
    skipped = [r.name for r in runs if r.name not in tables]
    if skipped:
        notes.append(f"no curvature table (not drawn): {_names(skipped)}")
    cells = list(dict.fromkeys(c for c, _, _ in points))
    colors = dict(zip(cells, run_colors(len(cells)), strict=True))
    fig = MplFigure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    for cell in cells:
        xs = np.array([x for c, x, _ in points if c == cell])
        ys = np.array([y for c, _, y in points if c == cell])
        ax.scatter(xs, ys, s=14, color=colors[cell], alpha=0.6)
        ax.scatter([np.median(xs)], [np.median(ys)], s=90, marker="D", color=colors[cell], edgecolor="black",
                   label=f"{cell} ({len(xs)} run{'s' if len(xs) > 1 else ''})")
    ax.set_xscale("log")
    ax.set_xlabel("median λ_1 along the path")
    ax.set_ylabel("median γ_k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, out, stem)
