"""The report of a study: claim checks, Theorem 1, a table per run, a null baseline, figures per group.

A study folder holds ``study.json`` (cells, groups, seeds, claims; the typed
:class:`~gammatrace.store.study.StudyMeta`, written by
:func:`gammatrace.experiments.study.run_study`) beside one folder per run. This module
turns the runs' own summaries and step tables into:

- the **claim check** (:func:`check_study_claim`): for each claim, the exact test of
  every strict relation of its weak order, paired by seed, decided by intersection–union
  (:func:`~gammatrace.principles.claims.check_claim`, the one rule of every report) on
  each seed's median γ_k — with the continuation
  reference θ* (the verdict; trained beyond the horizon, so the telescoping does not
  close) and with θ* = θ_T beside it — and on each seed's γ at matched training loss
  (:func:`~gammatrace.reporting.claims.matched_loss`), each with its p-values; the
  paper's stated speed order, where it states one, as a verdict of its own beside. γ_eff is never the γ of a
  claim: with θ* = θ_T it is a function of the losses (DESIGN §1);
- **Theorem 1** as verdicts per run and per cell (:func:`theorem1_blocks`);
- a table per run (certified on every step, γ_lo, γ_hi = min γ_k, fraction γ_k > 0, γ_eff labelled loss-determined,
  monotone-distance violations, rate-bound tightness, epochs to a loss threshold,
  final train/test numbers, flags);
- a null baseline for alignment (:func:`~gammatrace.reporting.claims.null_baseline`).

Example:
    >>> from gammatrace.reporting.collect import example_entry
    >>> last = [example_entry(f"{c}-s{i}", g + 0.01 * i, [1, 0.1]) for c, g in [("a", 0.3), ("b", 0.2)]
    ...         for i in range(5)]
    >>> meta = StudyMeta(study="s", runs={e.run.path.name: e.label.split("-")[0] for e in last},  # folder -> cell
    ...                  seed_of={e.run.path.name: int(e.label[-1]) for e in last}, claims=[Claim("a first", "a > b")])
    >>> check = check_study_claim(meta.claims[0], study_runs(meta, last, cont=[]))
    >>> check.results["median", "last"].text  # paired by seed: 5 of 5 seeds above, p = 2^-5
    'consistent (every relation p < α = 0.05: a > b: p = 0.031)'
    >>> check.results["median", "continuation"].reason
    'cells excluded: a, b'
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gammatrace.principles.claims import ALPHA, ClaimResult, RunPoint, check_claim, order_text
from gammatrace.principles.theorem1 import FAILS, HOLDS, NOT_APPLICABLE
from gammatrace.reporting.claims import (
    LOSS_RATIO_LIMIT,
    Convergence,
    MatchedLoss,
    convergence,
    end_point_problem,
    epochs_to,
    exclusion,
    matched_loss,
    null_baseline,
    run_point,
    target_of,
    theorem1,
    threshold_of,
)
from gammatrace.reporting.collect import RunEntry, num
from gammatrace.reporting.content import GAMMA_EFF_LOSS_LABEL, options_note
from gammatrace.reporting.document import (
    MISSING,
    Block,
    Bullets,
    Details,
    Heading,
    Table,
    Text,
    fmt,
    fold,
)
from gammatrace.store.run import Run, StoreError
from gammatrace.store.study import Claim, StudyMeta

# The verdict's reference first: the continuation θ* (the telescoping does not close there).
REFERENCES = {"continuation": "continuation θ* (trained beyond the horizon)", "last": "θ* = θ_T (last iterate)"}
STATISTICS = {"median": "median γ_k per seed", "matched": "γ at matched loss per seed"}


def find_study(runs: Sequence[Any]) -> Path | None:
    """``study.json`` of the folder holding every run, when each run is one of its runs.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> StudyMeta(study="activation", runs={"relu-s0": "relu", "tanh-s0": "tanh"}).write(folder)
        >>> find_study([folder / "relu-s0", folder / "tanh-s0"]) == folder / "study.json"
        True
        >>> print(find_study([folder / "relu-s0", folder / "other"]))  # not a run of the study
        None
    """
    paths = [Path(r.path if isinstance(r, Run) else r).resolve() for r in runs]
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        return None
    candidate = StudyMeta.path(parents.pop())
    if not candidate.is_file():
        return None
    try:
        names = set(StudyMeta.load(candidate).runs)
    except StoreError:  # a damaged study.json: report the runs plainly
        return None
    return candidate if all(p.name in names for p in paths) else None


# ----------------------------------------------------------------------- study runs
@dataclass(eq=False)
class StudyRun:
    """A run of the study with both references' entries and its place in the grid."""

    name: str
    cell: str
    group: str
    last: RunEntry
    cont: RunEntry | None
    seed: int | None = None  # the seed index (study.json's seed_of): a seed's runs are paired across cells

    def entry(self, ref: str) -> RunEntry | None:
        return self.last if ref == "last" else self.cont

    def first_epochs(self, n: int) -> StudyRun:
        """The run cut to its first ``n`` epochs under both references (:meth:`RunEntry.first_epochs`)."""
        return StudyRun(self.name, self.cell, self.group, self.last.first_epochs(n),
                        self.cont.first_epochs(n) if self.cont is not None else None, self.seed)

    def point(self, ref: str, conv: float, gamma: float | None = None) -> RunPoint:
        # The flags that exclude a run come from its training: the same for every reference.
        p = run_point(self.entry(ref), conv, run=self.name, cell=self.cell, trained=self.last, reference=ref,
                      gamma=gamma)
        return replace(p, seed=self.seed)


@dataclass
class ClaimCheck:
    """Everything the report says about one claim: its runs, their convergence, the
    verdicts (``results[statistic, reference]``, statistic "median" or "matched"), the
    matched-loss levels per reference and the test at each level."""

    claim: Claim
    runs: list[StudyRun]
    conv: Convergence
    results: dict[tuple[str, str], ClaimResult]
    matched: dict[str, MatchedLoss]
    per_level: dict[str, list[ClaimResult]]

    @property
    def verdict_ref(self) -> str:
        """The verdict's reference: the continuation θ*, or θ* = θ_T when no run of the
        claim has a continuation analysis (a study whose config sets no continuation)."""
        has = any(r.cont is not None and r.cont.analysed for r in self.runs)
        return "continuation" if has else "last"

    @property
    def verdict(self) -> ClaimResult:
        """The claim's verdict: median γ_k per seed, under :attr:`verdict_ref`."""
        return self.results["median", self.verdict_ref]


def difference_points(claim: Claim, points: Sequence[RunPoint]) -> list[RunPoint]:
    """The claim's points with each difference item ``"a − b"`` (:attr:`Claim.differences`)
    made per seed: γ_a,s − γ_b,s (and conv_a,s − conv_b,s), excluded when either run is or
    a seed lacks one of them; plain cells' points as they are.

    Example:
        >>> c = Claim("deeper", "x-all − x-first > y-all − y-first")
        >>> pts = [RunPoint(f"{cell}-s{s}", cell, g + s, 10.0, seed=s)
        ...        for cell, g in [("x-all", 3.0), ("x-first", 1.0), ("y-all", 2.0), ("y-first", 1.5)] for s in (0, 1)]
        >>> [(p.cell, p.gamma, p.seed) for p in difference_points(c, pts)][:2]
        [('x-all − x-first', 2.0, 0), ('x-all − x-first', 2.0, 1)]
    """
    diffs = claim.differences
    if not diffs:
        return list(points)
    parts = {c for pair in diffs.values() for c in pair}
    plain = {c for lv in claim.order for c in lv if c not in diffs}
    out = [p for p in points if p.cell in plain or p.cell not in parts]
    for name, (a, b) in diffs.items():
        of = {cell: {p.seed: p for p in points if p.cell == cell} for cell in (a, b)}
        for seed in sorted(set(of[a]) | set(of[b]), key=lambda x: (x is None, x)):
            pa, pb = of[a].get(seed), of[b].get(seed)
            run = f"{name}, seed {seed}"
            if seed is None:
                out.append(RunPoint(run, name, math.nan, math.nan, "no seed index: a per-seed difference pairs runs "
                                    "by seed", seed))
            elif pa is None or pb is None:
                out.append(RunPoint(run, name, math.nan, math.nan, f"no run of {b if pa else a} with seed {seed}",
                                    seed))
            else:
                why = "; ".join(f"{p.run}: {p.excluded}" for p in (pa, pb) if p.excluded) or None
                out.append(RunPoint(run, name, pa.gamma - pb.gamma, pa.conv - pb.conv, why, seed))
    return out


def check_study_claim(claim: Claim, runs: Sequence[StudyRun]) -> ClaimCheck:
    """Test ``claim`` on the study's runs by the one rule, for each statistic and reference.

    Each seed's value is its median γ_k, or its γ at matched loss (the median over 10
    log-spaced levels of the full training loss, over the range every comparable run of
    the claim reaches, of its median γ_k there). A run is excluded by its training
    flags (:func:`~gammatrace.reporting.claims.exclusion`), the same for every
    reference; inconclusive when the comparable runs end at losses too far apart
    (:func:`~gammatrace.reporting.claims.end_point_problem`). Example: see the module.
    """
    cells = set(claim.cells)
    mine = [r for r in runs if r.cell in cells]
    # Convergence speed is the whole run's; so is the end point each γ is measured
    # against, whose losses the comparability check compares (DESIGN §1).
    convs = convergence([r.last for r in mine])
    conv = dict(zip((r.name for r in mine), convs.values, strict=True))
    if claim.first_epochs is not None:  # a claim the paper states over the first epochs
        mine = [r.first_epochs(claim.first_epochs) for r in mine]
    apart = end_point_problem([r.last for r in mine])
    ok = [r for r in mine if exclusion(r.last) is None]

    def paired(points: list[RunPoint]) -> list[RunPoint]:
        return difference_points(claim, points)

    results: dict[tuple[str, str], ClaimResult] = {}
    matched: dict[str, MatchedLoss] = {}
    per_level: dict[str, list[ClaimResult]] = {}
    for ref in REFERENCES:
        entries = [r.entry(ref) for r in ok if r.entry(ref) is not None and r.entry(ref).analysed]
        m = matched[ref] = matched_loss(entries)
        results["median", ref] = check_claim(claim.order, paired([r.point(ref, conv[r.name]) for r in mine]),
                                             incomparable=apart, speed=claim.speed,
                                             equivalent_within=claim.equivalent_within)

        def point(r: StudyRun, gamma: float, ref: str = ref, m: MatchedLoss = m) -> RunPoint:
            p = r.point(ref, conv[r.name], gamma=gamma)
            if p.excluded == "median γ_k undefined":
                why = m.problem or "no step of this run in the matched loss range"
                p = replace(p, excluded=f"γ at matched loss undefined ({why})")
            return p

        label = {r.name: (r.entry(ref).label if r.entry(ref) is not None else r.name) for r in mine}
        results["matched", ref] = check_claim(
            claim.order, paired([point(r, m.value.get(label[r.name], math.nan)) for r in mine]), incomparable=apart,
            equivalent_within=claim.equivalent_within)
        per_level[ref] = [check_claim(claim.order, paired([point(r, float(m.per_level[label[r.name]][i])
                                                                 if label[r.name] in m.per_level else math.nan)
                                                           for r in mine]), equivalent_within=claim.equivalent_within)
                          for i in range(len(m.levels))]
    return ClaimCheck(claim, mine, convs, results, matched, per_level)


def _spread(values: Sequence[float]) -> str:
    """The mean over seeds (4 significant digits) with the min–max (3) in brackets."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return MISSING
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(float(np.mean(vals)))} [{fmt(min(vals), 3)}, {fmt(max(vals), 3)}]"


def _trend_text(t: Any) -> str:
    return f"{fmt(t.statistic)} / {t.pairs}, p = {fmt(t.p_value, 3)}" if t is not None else MISSING


def claim_blocks(check: ClaimCheck, heading_level: int = 3) -> list[Block]:
    """The claim's section: its order and source, a per-cell table, the verdicts (each
    statistic and reference, with p-values), convergence beside, and the test at every
    matched-loss level. Example: see the module."""
    claim, mine = check.claim, check.runs
    title = claim.text + (f" — {claim.group}" if claim.group else "")
    window = ""
    if claim.first_epochs is not None:
        longest = max((r.last.n_epochs or 0 for r in mine), default=0)
        covered = (f"cover the steps of epochs 0 … {claim.first_epochs - 1} only" if longest > claim.first_epochs
                   else f"cover every run whole (none is longer than {claim.first_epochs} epochs)")
        window = (f" Stated over the first {claim.first_epochs} epochs: the γ statistics below (median γ_k, "
                  f"fraction γ_k > 0, γ_min, γ at matched loss) {covered}. θ* stays each run's own end point, so "
                  "the runs' final train losses must still be comparable; a run that missed the target loss still "
                  "enters" + (" (the paper states it of runs that do not converge)" if claim.source else "")
                  + "; convergence speed is the whole run's.")
    if check.verdict_ref == "last":
        window += (" No run of this claim has a continuation analysis, so the verdict uses θ* = θ_T, each run's "
                   "own end point (a study adds the continuation with `reference: {kind: continuation, "
                   "extra_epochs: N}` in its base config, as the built-in presets do).")
    blocks: list[Block] = [Heading(title, heading_level), Text(
        f"Claimed order of γ (largest first; ≈: no order asserted): {claim.order_text}. "
        + (f"Source: {claim.source}." if claim.source else "No paper states this order: a hypothesis.") + window)]
    conv = {r.name: c for r, c in zip(mine, check.conv.values, strict=True)}
    verdict = check.verdict

    def values(ref: str, cell: str, key: str) -> list[float]:
        return [num(r.entry(ref).summary.get(key)) for r in mine
                if r.cell == cell and r.entry(ref) is not None and r.entry(ref).analysed]

    def matched_values(ref: str, cell: str) -> list[float]:
        m = check.matched[ref]
        return [m.value.get(r.entry(ref).label, math.nan) for r in mine
                if r.cell == cell and r.entry(ref) is not None]

    rows = []
    diffs = claim.differences
    ranked = [(str(rank), cell) if name not in diffs else (f"{rank} ({sign} in {name})", cell)
              for rank, level in enumerate(claim.order, 1) for name in level
              for sign, cell in (zip("+−", diffs[name], strict=True) if name in diffs else [("", name)])]
    for rank, cell in ranked:
        runs = [r for r in mine if r.cell == cell]
        cv = [conv[r.name] for r in runs]
        cv_text = "not reached" if cv and not np.isfinite(cv).all() else _spread(cv)
        # The verdict's own reason first: the other tests may exclude a cell for another one.
        why = next((res.excluded[cell] for res in (verdict, *check.results.values()) if cell in res.excluded),
                   "—")
        rows.append([cell, rank, str(len(runs)), _spread(values("continuation", cell, "gamma_median")),
                     _spread(values("last", cell, "gamma_median")), _spread(matched_values("continuation", cell)),
                     _spread(values("last", cell, "gamma_frac_positive")),
                     _spread(values("last", cell, "gamma_min")), cv_text, why])
    blocks.append(Table(["cell", "claimed rank", "seeds", "median γ_k, continuation θ*", "median γ_k, θ* = θ_T",
                         "γ at matched loss, continuation θ*", "fraction γ_k > 0", "γ_hi = min γ_k",
                         check.conv.text.split(" (")[0], "excluded"], rows))

    vrows = []
    for stat, stat_label in STATISTICS.items():
        for ref, ref_label in REFERENCES.items():
            r = check.results[stat, ref]
            mark = " — the verdict" if (stat, ref) == ("median", check.verdict_ref) else ""
            vrows.append([stat_label + mark, ref_label, r.relations_text or MISSING, fmt(r.p_value, 3),
                          fmt(r.p_reversed, 3), r.design,
                          "+".join(str(n) for n in r.trend.sizes) if r.trend is not None else MISSING,
                          _trend_text(r.trend), r.text])
    blocks.append(Table(["statistic", "reference point", "relations (exact one-sided p each)",
                         "p (largest relation p)", "p reversed (Holm)", "design", "seeds per level",
                         "trend J / pairs, p (side statistic, not the verdict)", "verdict"], vrows))

    speed = verdict.speed
    items = [f"by median γ_k, {label}: " + (" > ".join(check.results['median', ref].gamma_order)
                                              or "no comparable cell") for ref, label in REFERENCES.items()]
    items += [f"tie, {t.text}" for t in verdict.ties]
    for name in diffs:  # a claim about differences: the values its relations test
        for ref, label in REFERENCES.items():
            res = check.results["median", ref]
            stat = next((c for c in res.cells if c.cell == name), None)
            items.append(f"{name}, median γ_k per seed, {label}: " + (
                f"mean {fmt(stat.gamma)} [{fmt(stat.gamma_lo, 3)}, {fmt(stat.gamma_hi, 3)}] over {stat.n} seeds"
                if stat is not None else f"not computed ({res.excluded.get(name, 'no comparable seed')})"))
    if speed is not None:
        items.append(f"convergence speed as the paper states it ({order_text(speed.levels)}, fastest first), "
                     f"by {check.conv.text.split(' (')[0]} — its own verdict, beside the γ verdict: {speed.text}")
    items.append(f"convergence speed observed, by {check.conv.text}: "
                 + (" > ".join(verdict.speed_order) or "no comparable cell")
                 + ("" if speed is not None else "; the paper states no speed order for this claim, so none is tested"))
    blocks.append(Bullets(items))

    m = check.matched[check.verdict_ref]
    if len(m.levels):
        lrows = []
        # A reference enters the table where its levels are these (a run analysed under one
        # reference only can move them; a reference without analyses has none).
        same = {ref: np.array_equal(check.matched[ref].levels, m.levels) for ref in REFERENCES}
        for i, level in enumerate(m.levels):
            res = {ref: check.per_level[ref][i] if same[ref] else None for ref in REFERENCES}
            lrows.append([fmt(float(level), 3), f"[{fmt(float(m.edges[i]), 3)}, {fmt(float(m.edges[i + 1]), 3)}]",
                          *(fmt(res[ref].p_value, 3) if res[ref] else MISSING for ref in REFERENCES),
                          *(res[ref].verdict if res[ref] else MISSING for ref in REFERENCES)])
        blocks.append(Table(["full training loss level", "bin", *(f"p, {lbl}" for lbl in REFERENCES.values()),
                             *(f"verdict, {lbl}" for lbl in REFERENCES.values())], lrows))
        sig = sum(res.verdict == "consistent" for res in check.per_level[check.verdict_ref])
        blocks.append(Text(
            f"γ at matched loss: {sig} of {len(m.levels)} levels are significant on their own ({REFERENCES[check.verdict_ref]}; "
            "not corrected for testing 10 levels — the verdict above tests each seed's median over the levels "
            "once). A difference that survives at matched loss is what the loss curve does not already say."))
    else:
        blocks.append(Text(f"γ at matched loss: not computed ({m.problem})."))
    return blocks


def verdict_sentence(check: ClaimCheck) -> str:
    """The claim's verdict in one sentence: what is claimed, where, the verdict with every
    relation and its p (:attr:`ClaimResult.text`), on what statistic, and the paper's speed
    order's own verdict where it states one.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> last = [example_entry(f"{c}-s{i}", g + 0.01 * i, [1, 0.1]) for c, g in [("a", 0.3), ("b", 0.2)]
        ...         for i in range(5)]
        >>> meta = StudyMeta(study="s", runs={e.run.path.name: e.label.split("-")[0] for e in last},
        ...                  seed_of={e.run.path.name: int(e.label[-1]) for e in last}, claims=[Claim("a first", "a > b")])
        >>> verdict_sentence(check_study_claim(meta.claims[0], study_runs(meta, last, cont=[])))
        'a first: a > b — consistent (every relation p < α = 0.05: a > b: p = 0.031), by median γ_k per seed, θ* = θ_T (last iterate).'
    """
    claim, verdict = check.claim, check.verdict
    where = f" ({claim.group}{', ' + claim.window_text if claim.first_epochs else ''})" if claim.group else (
        f" ({claim.window_text})" if claim.first_epochs else "")
    out = (f"{claim.text}{where}: {claim.order_text} — {verdict.text}, by {STATISTICS['median']}, "
           f"{REFERENCES[check.verdict_ref]}")
    if verdict.speed is not None:
        out += f"; speed as the paper states it, {order_text(verdict.speed.levels)}: {verdict.speed.text}"
    return out + "."


def claim_check_blocks(info: StudyMeta, runs: Sequence[StudyRun]) -> tuple[list[Block], list[ClaimCheck]]:
    """The "Claim check" section: the rule in words, then every claim; and the checks."""
    blocks: list[Block] = [Heading("Claim check", 2), Text(
        "Each claim is a weak order of cells by γ, largest first, as the paper states it (≈: the paper asserts "
        "no order between those cells). Statistic: each seed's median γ_k. The order is the set of its strict "
        "relations a > b — every cell of a level above every cell of every lower level — and each relation gets an "
        "exact one-sided test: the sign test on the per-seed differences where the two cells share their seeds "
        "(a seed's runs share its batch order, and its initial point where the study shares one; a zero "
        "difference counts against the claim), the Mann–Whitney test where they do not. Verdict "
        f"(intersection–union): consistent only when every relation's p < α = {ALPHA:g}; not consistent when some "
        "relation is significantly reversed (Holm over the relations); single seed when a cell has one run (never "
        "a verdict); inconclusive otherwise, naming the relations not separated and their p, and saying when the "
        "seed counts cannot reach a verdict at all (paired: 2⁻ⁿ < α for consistent, 2⁻ⁿ < α/r for not consistent "
        "over r relations) — also when a cell of the claim has a run "
        "that is excluded (no progress, missed target, diverged, not analysed) or the comparable runs' final "
        f"train losses differ by more than {LOSS_RATIO_LIMIT:g}×. A tie (≈) is not tested: the observed per-seed "
        "difference and an exact confidence interval are shown; a claim with an equivalence margin δ gives each "
        "tie its own verdict (two one-sided exact tests of |difference| < δ). The Jonckheere–Terpstra count of "
        "the whole order is shown as a trend statistic only. The verdict uses the continuation reference "
        "θ* (trained beyond the analysed horizon, so the telescoping does not close; θ* = θ_T where no run of a "
        "claim has one, said there); θ* = θ_T is shown beside "
        "it, and both again with each seed's γ at matched training loss (the median over 10 log-spaced levels "
        "of the full training loss that every comparable run reaches; with θ* = θ_T the average γ is a function "
        "of the losses, DESIGN §1). Where the paper states an order of convergence speed, it gets its own verdict "
        "by the same rule on −epochs to the common target loss, beside the γ verdict; otherwise the observed "
        "speed order is listed, untested. γ_eff is not used: with θ* = θ_T it is "
        "a function of the losses alone. The report of runs outside a study applies the same rule.")]
    blocks = [blocks[0], Details("How each claim is tested", blocks[1:], level=3)]
    if not info.claims:
        return blocks + [Text("This study states no claim.")], []
    checks = [check_study_claim(claim, runs) for claim in info.claims]
    for check in checks:  # each claim's numbers and tests, folded under its title
        blocks.append(fold(claim_blocks(check)))
    return blocks, checks


# ------------------------------------------------------------------------- Theorem 1
def theorem1_blocks(runs: Sequence[StudyRun]) -> list[Block]:
    """Theorem 1 as verdicts (θ* = θ_T, as the theorem states it): per cell, in how many
    of its runs each item holds; per run, each verdict with its numbers."""
    per_run = [(r, theorem1(r.last)) for r in runs]
    per_run = [(r, c) for r, c in per_run if c]
    blocks: list[Block] = [Heading("Theorem 1", 2), Text(
        "Theorem 1 (paper 002) checked on each run with θ* = θ_T (the theorem's reference point). The premise, "
        "evaluated on every step: one γ > 0 with P_k ≥ γ η_k D_0² (ℓ_k − ℓ*_k) on every step — the certified "
        "interval [γ_lo, γ_hi], empty when some steps need a larger γ than others allow (named); the fraction of "
        "γ_k > 0 beside it. (1) As stated, per step: ‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k (rising steps "
        "named; per epoch, what the papers' figures show, beside it); (2) per-sample losses converge: the gap at "
        "a sample's last visit is ≤ the gap at its first for ≥ 95% of the samples visited twice; (3) the O(1/γK) "
        "rate bound at every epoch boundary with γ = γ_hi = γ_min, the largest γ of the interval — not "
        "applicable when it is empty, for then the theorem implies no rate. Each consequence shows its premise "
        "on every step (for items 1 and 2 also ℓ_k ≥ ℓ*_k: θ* minimizes every batch loss).")]
    if not per_run:
        return blocks + [Text("No run has an analysis.")]
    items = [c.item for c in per_run[0][1]]
    cells = list(dict.fromkeys(r.cell for r, _ in per_run))
    rows = []
    for cell in cells:
        mine = [c for r, c in per_run if r.cell == cell]
        row = [cell, str(len(mine))]
        for i in range(len(items)):
            verdicts = [c[i].verdict for c in mine]
            held, na = verdicts.count(HOLDS), verdicts.count(NOT_APPLICABLE)
            text = f"holds in {held}/{len(mine)}"
            if na:
                text += f" (not applicable in {na})"
            if len(mine) - held - na - verdicts.count(FAILS):
                text += f" (not measured in {len(mine) - held - na - verdicts.count(FAILS)})"
            row.append(text)
        rows.append(row)
    blocks.append(Table(["cell", "runs", *items], rows))
    blocks.append(Table(["run", "cell", *items],
                        [[r.name, r.cell, *(c.text for c in checks)] for r, checks in per_run]))
    return blocks + options_note([r.last for r, _ in per_run], "Theorem 1")


def runs_table(runs: Sequence[StudyRun]) -> list[Block]:
    """One row per run: the numbers the papers report and the flags that qualify them."""
    blocks: list[Block] = []
    groups: dict[str, list[StudyRun]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    notes = []
    rows = []
    for group, members in groups.items():
        thr, how = threshold_of([r.last for r in members])
        notes.append(f"{group}: loss threshold {how}")
        for r in members:
            e, s = r.last, r.last.summary or {}
            c = r.cont.summary if r.cont is not None and r.cont.analysed else {}
            flags = []
            if e.diverged:
                flags.append(f"diverged at step {e.diverged_at_step}")
            elif not e.analysed:
                flags.append("not analysed")
            if e.no_progress:
                flags.append("no progress")
            if target_of(e) is not None and e.run.meta.reached_target is False:
                flags.append("missed target")
            if e.gradient_collapse is not None:
                flags.append(f"gradient collapse at epoch {e.gradient_collapse}")
            mse = e.run.config.loss == "mse"
            test = e.final("test_loss" if mse else "test_acc")
            rows.append([r.name, r.cell, group, ", ".join(flags) or "—", fmt(e.n_epochs), fmt(epochs_to(e, thr)),
                         fmt(e.final_train_loss), fmt(e.final("train_loss" if mse else "train_acc")),
                         (f"MSE {fmt(test)}" if mse else fmt(test)) if math.isfinite(test) else MISSING,
                         fmt(s.get("gamma_certified")), fmt(s.get("gamma_lo")), fmt(s.get("gamma_min")),
                         fmt(s.get("gamma_frac_positive")), fmt(s.get("gamma_median")),
                         fmt(c.get("gamma_median")), fmt(s.get("gamma_eff")), fmt(s.get("dist_n_increase")),
                         fmt(s.get("rate_tightness"))])
    blocks.append(Table(["run", "cell", "group", "flags", "epochs", "epochs to threshold", "final train loss",
                         "final train acc / MSE", "final test acc / MSE", "certified on every step", "γ_lo",
                         "γ_hi = min γ_k", "fraction γ_k > 0",
                         "median γ_k", "median γ_k (continuation)", GAMMA_EFF_LOSS_LABEL, "d_k increases",
                         "rate tightness (actual / bound)"], rows))
    blocks.append(Text("γ numbers use θ* = θ_T unless marked continuation; γ_eff is the loss-determined identity "
                       "of DESIGN §1, shown for reference only. Loss thresholds: " + "; ".join(notes) + "."))
    return blocks


# ------------------------------------------------------------------------ null baseline
def null_blocks(runs: Sequence[StudyRun]) -> list[Block]:
    rows = []
    for r in runs:
        if not r.last.analysed:
            continue
        b = null_baseline(r.last)
        rows.append([r.name, fmt(b["cos_mean"]), fmt(b["cos_null_sd"]), fmt(b["cos_z"], 3), fmt(b["frac_progress"]),
                     fmt(b["frac_progress_null"])])
    return [Heading("Null baseline for alignment", 2), Text(
        "Real updates against random directions of the same norm (θ* = θ_T). A random direction has cos_align "
        "of mean 0 and standard deviation ≈ 1/√n (n parameters); z = mean cos_align / (1/√(nT)) over the T steps. "
        "A random step of length ‖Δ_k‖ from θ_k decreases the distance to θ* (P_k > 0) only when its cosine "
        "exceeds ‖Δ_k‖/(2d_k): the null fraction is that probability, computed exactly (Beta law of the cosine) "
        "from each step's stored d_k² and ‖Δ_k‖², averaged over the steps — not sampled."),
        Table(["run", "mean cos_align", "null sd of one step (1/√n)", "z vs null", "fraction P_k > 0",
               "fraction P_k > 0, random direction (exact)"], rows)]


# ---------------------------------------------------------------------------- assembly
def study_runs(info: StudyMeta, last: Sequence[RunEntry], cont: Sequence[RunEntry]) -> list[StudyRun]:
    """The runs of a study: each θ_T entry with its continuation entry (matched by run
    folder name), and its cell and group from ``study.json``. Example: see the module."""
    by_name = {e.run.path.name: e for e in cont}
    return [StudyRun(e.run.path.name, info.cell(e.run.path.name), info.group(e.run.path.name), e,
                     by_name.get(e.run.path.name), info.seed_of.get(e.run.path.name)) for e in last]


def safe_stem(text: str) -> str:
    """A file-name-safe stem for a group name.

    Example:
        >>> safe_stem("resnet18 / cifar10")
        'resnet18_cifar10'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "group"


def cells_of_group(runs: Sequence[StudyRun], group: str) -> dict[str, list[RunEntry]]:
    out: dict[str, list[RunEntry]] = {}
    for r in runs:
        if r.group == group:
            out.setdefault(r.cell, []).append(r.last)
    return out
