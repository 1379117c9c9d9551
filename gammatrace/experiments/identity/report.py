"""The study's report as document blocks (:mod:`gammatrace.reporting.document`), rendered
to ``summary.md`` and ``report.html`` by the report layer's renderers.

Example:
    >>> fmt(0.12345), fmt(float("nan")), fmt(3)
    ('0.123', '—', '3')
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from gammatrace.experiments.identity.figures import LOSS_DISTANCE, ONE_POINT, REFERENCES
from gammatrace.experiments.identity.problem import Preset
from gammatrace.experiments.identity.summary import PROXIES, WINDOW_LABELS, WINDOWS
from gammatrace.reporting.document import Block, Figure, Heading, Table, Text

FIGURE_CAPTIONS = {
    LOSS_DISTANCE: "Training loss, distance to the planted W* and to the exact minimizer reached",
    ONE_POINT: "One-point strong convexity per epoch, against W* and against the minimizer reached",
    REFERENCES: "γ_k and d_k / D_0 against the exact minimizer, the last iterate and a continuation iterate",
}


def fmt(v: Any, spec: str = ".3g") -> str:
    """A table cell: floats with ``spec``, a dash for missing or non-finite values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec) if isinstance(v, float) else str(v)


def report_blocks(summaries: dict[str, dict[str, Any]], head: dict[str, Any], preset: Preset, preset_name: str,
                  wall: float, figures: list[str]) -> list[Block]:
    """The report: the sentence, the settings, the figures and the two tables.

    Example:
        >>> from gammatrace.experiments.identity.problem import PRESETS
        >>> blocks = report_blocks({}, {"sentence": "S."}, PRESETS.get("tiny")(), "tiny", 1.0, [])
        >>> [type(b).__name__ for b in blocks][:3]
        ['Heading', 'Text', 'Text']
    """
    blocks: list[Block] = [
        Heading("Identity mapping: a teacher–student problem with a known minimizer"),
        Text(head["sentence"]),
        Text(f"Preset {preset_name}: {json.dumps(asdict(preset))}. Wall time {wall:.0f} s. Every cell is one "
             "engine run; each reference is measured by a verified replay of its recorded trajectory (every "
             "step's loss and every epoch's end state equal pass 1's bit for bit, or the study stops with "
             "ReplayMismatchError)."),
        *(Figure(name, FIGURE_CAPTIONS.get(name, name)) for name in figures),
        Heading("Convergence and one-point strong convexity", 2),
    ]
    rows = []
    for s in summaries.values():
        op_p, op_f = s["one_point"]["planted"], s["one_point"].get("found")
        found = ("W* itself" if s["found_is_planted"] else f"Π·W*, Π = {s['perm']}") if s["found_reached"] else "none"
        rows.append([s["label"], str(s["horizon_epochs"]), fmt(s["loss_final"]), fmt(s["w_dist_ratio"]),
                     "yes" if s["reached_w_star"] else "no", found, fmt(op_p["frac_holds"]),
                     fmt(op_p["delta_min"]), fmt(op_f["frac_holds"]) if op_f else "—"])
    blocks.append(Table(["cell", "T (epochs)", "final loss", "‖W_T − W*‖ / ‖W_0 − W*‖", "reached W*",
                         "minimizer reached", "one-point holds (vs W*)", "δ_min (vs W*)",
                         "holds (vs minimizer reached)"], rows))
    blocks += [Heading("γ against the exact minimizer and against the proxies", 2),
               Text("Windows: all steps of the horizon, the first 90% (the papers' tail exclusion), the last 10%. "
                    "Distance increases: steps where d_k = ‖θ_k − θ*‖ grows (Theorem 1 item 1 says never).")]
    rows = []
    for s in summaries.values():
        for ref, stats in s["references"].items():
            for w in WINDOWS:
                x = stats[w]
                dis = s["distortion"].get(ref, {}).get(w) if ref in PROXIES else None
                rows.append([s["cell"], ref, WINDOW_LABELS[w], fmt(x["gamma_median"]), fmt(x["gamma_min"]),
                             fmt(x["gamma_frac_positive"]), str(x["gamma_n_undefined"]),
                             f"{x['dist_n_increase']} / {x['n_steps']}",
                             fmt(dis["median_ratio"]) if dis else "—", fmt(dis["sign_agreement"]) if dis else "—"])
    blocks.append(Table(["cell", "θ*", "window", "median γ_k", "γ_min", "γ_k > 0", "undefined", "d_k increases",
                         "γ_k^θ* / γ_k^true (median)", "sign agrees"], rows))
    blocks.append(Text(
        "Reading: planted is the teacher W*; found the exact zero-loss point the run converged to (a row "
        "permutation of the teacher, W* itself when the permutation is the identity); last the papers' proxy θ_T; "
        f"continuation θ_{{T+E}}. γ_k is undefined where the loss gap is ≤ {preset.eps:g}. A stalled run (zero "
        "init without identity: σ(0) = 0 and |·|'(0) = 0 give a zero gradient) reaches no minimizer and has "
        "D_0 = 0 against its own θ_T."))
    return blocks
