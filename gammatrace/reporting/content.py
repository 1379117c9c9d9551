"""The report's content as document blocks: tables, caveats with this run set's numbers, ordering.

Every number shown is read from a run's own summary (or, for the γ_eff identity, summed
from its own step table) — the report adds no measurement, only presentation and the
checks DESIGN §1 says a reader needs before comparing runs. Which runs may be compared,
and the verdict of the ordering, come from :mod:`gammatrace.reporting.claims`, the rule
the study report uses too.

Example:
    >>> from gammatrace.reporting.collect import example_entry
    >>> from gammatrace.reporting.document import to_markdown
    >>> md = to_markdown(ordering([example_entry("relu", 0.3, [1, 0.10]), example_entry("tanh", 0.2, [1, 0.11]),
    ...                            example_entry("sigmoid", 0.1, [1, 0.12])]))
    >>> "relu > tanh > sigmoid: single seed (one run per cell: trend p = 0.17, reversed 1 shown" in md
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gammatrace.principles.claims import ALPHA, order_text
from gammatrace.reporting.claims import (
    LOSS_RATIO_LIMIT,
    check_runs,
    eligible,
    exclusion,
    loss_drop_words,
    loss_spread,
    theorem1,
)
from gammatrace.reporting.collect import (
    CURVATURE_SUMMARY,
    RunEntry,
    curvature_summary,
    final_loss_text,
    num,
)
from gammatrace.reporting.document import MISSING, Block, Bullets, Heading, Table, Text, fmt

GAMMA_EFF_LOSS_LABEL = "γ_eff (loss-determined)"


# ------------------------------------------------------------------------------ tables
def runs_table(entries: Sequence[RunEntry]) -> Table:
    """Status and outcome of every run, analysed or not."""
    rows = []
    for e in entries:
        s = e.summary or {}
        drop = num(s.get("loss_rel_drop"))
        rows.append([
            e.label, e.status_text, fmt(e.n_epochs), final_loss_text(e), fmt(e.final("test_acc")),
            f"{drop:.1%}" if math.isfinite(drop) else MISSING,
            fmt(s.get("no_progress")) if e.analysed else MISSING,
            fmt(s.get("reached_target")),
        ])
    return Table(["run", "status", "epochs", "final train loss", "test acc",
                  "loss drop (first → last epoch)", "no progress", "reached target"], rows)


def principle_columns(gamma_eff_label: str) -> list[tuple[str, Callable[[dict], Any]]]:
    """(header, value-from-summary) of the trajectory table; one place for both renderers."""
    def key(k: str) -> Callable[[dict], Any]:
        return lambda s: s.get(k)

    def null_ratio(s: dict) -> float:
        return num(s.get("cos_align_mean")) / num(s.get("cos_null_scale"))

    return [
        # The certificate (DESIGN §1): the interval [γ_lo, γ_hi] of γ > 0 meeting every step.
        ("certified on every step", key("gamma_certified")),
        ("γ_lo (0: no lower bound)", key("gamma_lo")),
        ("γ_hi = min γ_k", key("gamma_min")),
        ("fraction γ_k > 0", key("gamma_frac_positive")),
        ("undefined γ_k", key("gamma_n_undefined")),
        ("median γ_k", key("gamma_median")),
        ("median γ^RP_k / D_0²", key("gamma_rp_median")),
        (gamma_eff_label, key("gamma_eff")),
        ("d_k increases", key("dist_n_increase")),
        ("fraction d_k increases", key("dist_frac_increase")),
        ("rate tightness (actual / bound)", key("rate_tightness")),
        ("path ratio (length / displacement)", key("path_ratio")),
        ("mean cos_align", key("cos_align_mean")),
        ("cos null scale 1/√n", key("cos_null_scale")),
        ("mean cos_align / null scale", null_ratio),
    ]


STEPS_HEADER = "steps (analyze options)"


def principles_table(entries: Sequence[RunEntry], gamma_eff_label: str) -> Table:
    """The trajectory numbers of every analysed run, straight from its summary, with the
    steps they are over (a tail left out, ℓ_inf: :attr:`RunEntry.analysed_steps`)."""
    cols = principle_columns(gamma_eff_label)
    rows = [[e.label, e.analysed_steps, *(fmt(get(e.summary)) for _, get in cols)] for e in entries if e.analysed]
    return Table(["run", STEPS_HEADER, *(h for h, _ in cols)], rows)


def options_note(entries: Sequence[RunEntry], what: str) -> list[Block]:
    """One sentence naming the runs whose ``what`` leaves steps out or assumes ℓ_inf (none: nothing)."""
    items = [f"{e.label}: {e.analysis_options}" for e in entries if e.analysed and e.analysis_options]
    return [Text(f"{what} over the steps each run's analysis keeps — " + "; ".join(items) + ".")] if items else []


# ----------------------------------------------------------------------------- caveats
def _weighted_gap(e: RunEntry) -> float:
    """Σ_k η_k (ℓ_k − ℓ*_k) over the whole analysed horizon (the γ_eff denominator / 2D_0²)."""
    st = e.steps
    if not {"lr", "loss", "loss_ref"} <= set(st.columns):
        return math.nan
    return float(np.sum(st["lr"].to_numpy(float) * (st["loss"].to_numpy(float) - st["loss_ref"].to_numpy(float))))


def _end_distance(e: RunEntry) -> float:
    """d_T / D_0 from the last row: d_T² = d_{T−1}² − 2 P_{T−1}."""
    st = e.steps
    if not len(st) or not {"dist_sq", "progress"} <= set(st.columns):
        return math.nan
    d0_sq = float(st["dist_sq"].iloc[0])
    end_sq = float(st["dist_sq"].iloc[-1]) - 2.0 * float(st["progress"].iloc[-1])
    return math.sqrt(max(end_sq, 0.0) / d0_sq) if d0_sq > 0 else math.nan


def gamma_eff_items(entries: Sequence[RunEntry]) -> list[str]:
    items = []
    for e in entries:
        if not e.analysed:
            continue
        s, ref = e.summary, e.summary.get("reference")
        total = _weighted_gap(e)
        if ref == "last":
            tail = int(s.get("tail") or 0)
            line = (f"{e.label}: Σ η_k(ℓ_k − ℓ*_k) = {fmt(total)} over T = {len(e.steps)} steps, so "
                    f"γ_eff(T) = 1/(2·{fmt(total)}) = {fmt(0.5 / total if total > 0 else math.nan)}")
            line += (f"; the table's γ_eff = {fmt(s.get('gamma_eff'))}." if tail == 0 else
                     f"; the table's γ_eff = {fmt(s.get('gamma_eff'))} leaves out the last {tail} steps "
                     "(the tail), where d_K ≠ 0 enters.")
            items.append(line)
        else:
            items.append(f"{e.label}: reference '{ref}' ends at d_T/D_0 = {fmt(_end_distance(e))} ≠ 0, "
                         f"so the telescoping does not close and its γ_eff = {fmt(s.get('gamma_eff'))} "
                         "is not fixed by the losses alone.")
    return items


def caveats(entries: Sequence[RunEntry]) -> list[Block]:
    """The section DESIGN §1 requires, in plain words and with this run set's numbers."""
    blocks: list[Block] = [Heading("What these numbers can and cannot say", 2)]
    analysed = [e for e in entries if e.analysed]
    if not analysed:
        return blocks + [Text("No run has an analysis, so there is nothing to compare.")]

    blocks.append(Text(
        "γ_eff is determined by the losses. With θ* = θ_T the progress telescopes, Σ_k P_k = ½(d_0² − d_T²) = ½D_0², "
        "so γ_eff(T) = 1/(2 Σ_k η_k(ℓ_k − ℓ*_k)) depends on the losses alone, and the gap-weighted mean of γ_k "
        "equals it. \"Larger γ ⇔ faster convergence\" is therefore an identity for γ_eff, not evidence; it is "
        f"shown in the column \"{GAMMA_EFF_LOSS_LABEL}\" for that reason:"))
    blocks.append(Bullets(gamma_eff_items(entries)))
    blocks.append(Text(
        "What the losses do not determine, and what claims should rest on: the per-step distribution "
        "(the certified interval [γ_lo, γ_hi], median γ_k, fraction of steps with γ_k > 0, increases of d_k), the per-layer shares, "
        "a continuation reference (θ* beyond the analysed horizon), and the null baseline below."))

    flagged = [e for e in analysed if e.no_progress]
    if flagged:
        items = []
        for e in flagged:
            s = e.summary
            items.append(f"{e.label}: {loss_drop_words(s)}; "
                         f"its D_0² = {fmt(s.get('d0_sq'))} and its loss gaps are near 0, so its γ_k are noise.")
        blocks.append(Text("Runs flagged \"no progress\" are kept out of every ordering:"))
        blocks.append(Bullets(items))
    else:
        blocks.append(Text("No analysed run is flagged \"no progress\" (every run's loss fell enough to measure γ)."))

    ordered = eligible(entries)
    ratio, lo, hi = loss_spread(ordered)
    if lo is None:
        trained = sum(e.run.status.finished_training for e in entries)
        blocks.append(Text(f"Comparability across runs: {len(ordered)} of the {trained} run(s) that finished training "
                           "may be compared (the others: see the ordering), so no cross-run comparison."))
    elif ratio > LOSS_RATIO_LIMIT:
        blocks.append(Text(
            f"Warning: γ normalized by a run's own θ_T is comparable only across runs that end at comparable "
            f"losses. The final train losses differ by {ratio:.3g}× (more than {LOSS_RATIO_LIMIT:g}×): "
            f"{lo.label} ends at {final_loss_text(lo)}, {hi.label} at {final_loss_text(hi)}. "
            "Train to a common target loss (target_loss) before comparing γ across these runs."))
    else:
        blocks.append(Text(
            f"Comparability across runs: the final train losses of the runs that trained are within "
            f"{ratio:.3g}× of each other ({lo.label} {final_loss_text(lo)}, {hi.label} "
            f"{final_loss_text(hi)}; limit {LOSS_RATIO_LIMIT:g}×), so γ normalized by each run's θ_T "
            "refers to comparable end points."))

    items = []
    for e in analysed:
        s = e.summary
        mean, null = num(s.get("cos_align_mean")), num(s.get("cos_null_scale"))
        n = e.run.meta.n_params
        items.append(f"{e.label}: mean cos_align {fmt(mean)} = {fmt(mean / null, 3)} × the null scale "
                     f"1/√n = {fmt(null)}" + (f" (n = {n} parameters)" if n else "") + ".")
    blocks.append(Text(
        "Null baseline for cos_align: an update direction unrelated to θ* − θ_k has cosine of mean 0 and "
        "standard deviation 1/√n (n parameters). A mean cos_align within a few multiples of that scale "
        "says nothing about alignment:"))
    blocks.append(Bullets(items))
    return blocks


# ---------------------------------------------------------------------------- ordering
def ordering(entries: Sequence[RunEntry]) -> list[Block]:
    """Runs that may be compared, by median γ_k next to their ordering by convergence, and
    the verdict of :func:`~gammatrace.reporting.claims.check_runs`: the one rule of every
    report (every strict relation tested exactly, intersection–union), with the runs
    ordered by convergence as the claim and each run a cell of one seed — so "single
    seed", with the trend's p-value.

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> [type(b).__name__ for b in ordering([example_entry("relu")])]
        ['Heading', 'Table', 'Text']
    """
    blocks: list[Block] = [Heading("Ordering", 2)]
    check = check_runs(entries)
    runs, r = check.runs, check.result
    conv = {id(e): c for e, c in zip(runs, check.conv.values, strict=True)}
    kept = {id(e) for e in runs}
    left_out = [f"{e.label} ({exclusion(e)})" for e in entries if id(e) not in kept]
    by_gamma = sorted(runs, key=lambda e: -num(e.summary["gamma_median"]))
    # With a common target loss every run that may be compared reached it; convergence
    # is then how many epochs it took. Otherwise: where each run got to.
    by_conv = sorted(runs, key=lambda e: (conv[id(e)], e.final_train_loss))
    if check.conv.by_epochs:
        conv_text = "by convergence (fewest epochs to the target loss first)"
        conv_cell = [f"{e.label} ({fmt(conv[id(e)])} epochs)" if math.isfinite(conv[id(e)])
                     else f"{e.label} (not reached)" for e in by_conv]
    else:
        conv_text = "by convergence (lowest final train loss first)"
        conv_cell = [f"{e.label} ({final_loss_text(e)})" for e in by_conv]

    if runs:
        blocks.append(Table(["rank", "by median γ_k (largest first)", conv_text],
                            [[str(i + 1), f"{g.label} ({fmt(g.summary['gamma_median'])})", c]
                             for i, (g, c) in enumerate(zip(by_gamma, conv_cell, strict=True))]))
        blocks += options_note(runs, "Median γ_k")
    if left_out:
        blocks.append(Text("Not in the ordering: " + "; ".join(left_out) + "."))

    verdict = (f"{order_text(check.order)}: {r.text}" if r is not None
               else f"inconclusive (fewer than 2 comparable runs ({len(runs)}))")
    blocks.append(Text(
        f"Faster convergence ⇔ larger median γ_k, the runs ordered by convergence as the claim — {verdict}. "
        f"(The rule of every report, the study's too: an exact one-sided test of every strict relation of the "
        f"claimed order over the seeds, consistent when every relation's p < α = {ALPHA:g}, not consistent when "
        "some relation is significantly reversed (Holm), inconclusive otherwise; a single seed per cell is never "
        "a verdict, so runs outside a study — one seed each — only show the p-value of the Jonckheere–Terpstra "
        "trend of the whole order. Inconclusive too when the final train losses differ by more than "
        f"{LOSS_RATIO_LIMIT:g}×. Convergence: epochs to the target loss when every run shares one, else the final "
        "train loss. Run a study with several seeds per cell for a verdict.)"))
    return blocks


def theorem1_table(entries: Sequence[RunEntry]) -> list[Block]:
    """Theorem 1 as verdicts with their numbers, one row per analysed run (see
    :func:`~gammatrace.reporting.claims.theorem1`).

    Example:
        >>> from gammatrace.reporting.collect import example_entry
        >>> e = example_entry("relu")
        >>> e.steps = e.steps.assign(lr=0.1, loss=[1.0, 0.8, 0.5], loss_ref=0.0)
        >>> theorem1_table([e])[1].rows[0][3]  # item 1 is per step: one step rises, so it fails
        "fails: d_k rises at 1 of 3 steps (step 1; largest rise 0.011 D_0); per epoch (what the papers' figures \
show): 0 of 2 epochs end farther from θ* — premise: principle on every step: no; ℓ_k ≥ ℓ*_k on every step: yes"
    """
    per_run = [(e, theorem1(e)) for e in entries]
    per_run = [(e, c) for e, c in per_run if c]
    blocks: list[Block] = [Heading("Theorem 1", 2)]
    if not per_run:
        return blocks + [Text("No analysed run: nothing to check.")]
    items = [c.item for c in per_run[0][1]]
    blocks.append(Table(["run", STEPS_HEADER, *items], [[e.label, e.analysed_steps, *(c.text for c in checks)]
                                                        for e, checks in per_run]))
    blocks.append(Text(
        "Theorem 1 (paper 002) per run, with each run's own reference θ*. The premise, evaluated on every step: "
        "one γ > 0 with P_k ≥ γ η_k D_0² (ℓ_k − ℓ*_k) on every step — the certified interval [γ_lo, γ_hi], "
        "empty when some steps need a larger γ than others allow (named); the fraction of γ_k > 0 beside it. "
        "Item 1 as stated, per step: ‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k (the rising steps named; per "
        "epoch, what the papers' figures show, beside it). Per-sample losses converge (last visit ≤ first "
        "visit for ≥ 95% of revisited samples). The O(1/γK) rate bound at every epoch boundary with "
        "γ = γ_hi = γ_min, the largest γ of the interval (not applicable when it is empty). Each consequence "
        "shows its premise on every step: for items 1 and 2 also ℓ_k ≥ ℓ*_k (θ* minimizes every batch loss)."))
    return blocks


def curvature_blocks(entries: Sequence[RunEntry]) -> list[Block]:
    """The curvature summary of every run that measured it (its config's ``curvature`` block),
    read from its curvature table without recomputation; nothing when no run has one.

    Example:
        >>> import pandas as pd
        >>> from gammatrace.reporting.collect import example_entry
        >>> from gammatrace.reporting.document import to_markdown
        >>> e = example_entry("bn")
        >>> curvature_blocks([e])
        []
        >>> e.curvature = pd.DataFrame({"step": [0, 10], "lambda_1": [2.0, 4.0], "stability_ratio": [0.1, 0.2],
        ...                             "stability_threshold_kind": ["sgd", "sgd"]})
        >>> "| bn | 2 | sgd | 3 | 4 | 0.2 |" in to_markdown(curvature_blocks([e]))
        True
    """
    measured = [e for e in entries if len(e.curvature)]
    if not measured:
        return []
    stats = [(key, label) for key, label, *_ in CURVATURE_SUMMARY]
    rows = []
    for e in measured:
        s = curvature_summary(e)
        kinds = sorted(set(e.curvature["stability_threshold_kind"].astype(str))) \
            if "stability_threshold_kind" in e.curvature else []
        rows.append([e.label, fmt(s.get("n")), ", ".join(kinds) or MISSING,
                     *(fmt(s.get(key)) for key, _ in stats[1:])])
    return [Heading("Curvature along the trajectory", 2),
            Table(["run", stats[0][1], "stability rule", *(label for _, label in stats[1:])], rows),
            Text("Measured during the analysis replay at θ_k before step k, every N steps and, where the run config's "
                 "curvature block asks, at every epoch end, on copies of the model with batch norm in train mode. λ_1 … λ_k "
                 "(Lanczos), tr H (Hutchinson) and the sharpness are of the mean loss on a fixed evaluation subset of "
                 "the training set; the sharpness is λ_1, or λ_1(P⁻¹H) with P the preconditioner of an adaptive "
                 "optimizer (Cohen et al. 2022), and the stability threshold is the optimizer's (sgd: 2/η; "
                 "heavy_ball: 2(1+β)/η; nesterov: (2+2β)/((1+2β)η); adam_preconditioned: (2+2β₁)/((1−β₁)η)). The "
                 "effective β-smoothness (Santurkar et al.) is max over s of ‖∇ℓ(θ_k) − ∇ℓ(θ_k − s g_k)‖ / ‖s g_k‖ "
                 "on the step's own mini-batch, s a few multiples of η_k. These are statistics over the measured "
                 "steps only, not over every step.")]
