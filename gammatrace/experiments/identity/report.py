"""The study's report as document blocks (:mod:`gammatrace.reporting.document`), rendered
to ``summary.md`` and ``report.html`` by the report layer's renderers.

Example:
    >>> fmt(0.12345), fmt(float("nan")), fmt(3)
    ('0.123', '—', '3')
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gammatrace.experiments.identity.claims import (
    check_mnist_claims,
    mnist_points,
    verdict_sentences,
)
from gammatrace.experiments.identity.figures import LOSS_DISTANCE, ONE_POINT, REFERENCES
from gammatrace.experiments.identity.problem import SOURCES, Preset
from gammatrace.experiments.identity.summary import PROXIES, WINDOW_LABELS, WINDOWS
from gammatrace.reporting.document import Block, Bullets, Details, Figure, Heading, Table, Text
from gammatrace.store.backend import inside, output_folder, write_inside

FIGURE_CAPTIONS = {
    LOSS_DISTANCE: "Training loss, distance to the planted W* and to the exact minimizer reached",
    ONE_POINT: "One-point strong convexity per epoch, against W* and against the minimizer reached",
    REFERENCES: "γ_k and d_k / D_0 against the exact minimizer, the last iterate and a continuation iterate",
}


def study_folder(out: str | Path, names: Iterable[str], progress: bool = True) -> Path:
    """The study's output folder, before anything is trained: resolved once when ``out`` is a
    symbolic link (said on stderr), refused (one line) when one of ``names`` in it (the
    runs' folders, the report's files) is a symbolic link planted there, or when ``out`` is reached through a link planted in a run
    or study folder (:func:`~gammatrace.store.backend.output_folder`); created.

    Example:
        >>> import tempfile; base = Path(tempfile.mkdtemp())
        >>> study_folder(base / "im", ["relu-run0/run"]) == base / "im"
        True
        >>> (base / "im" / "tanh-run0").symlink_to(tempfile.mkdtemp())
        >>> study_folder(base / "im", ["tanh-run0/run"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gammatrace.store.backend.UnsafePathError: .../tanh-run0 is a symbolic link inside the study folder ...
    """
    folder, note = output_folder(out)
    if note and progress:
        print(f"gammatrace: {note}", file=sys.stderr)
    for rel in names:
        inside(folder, rel, what="the study folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_text_inside(out: Path, name: str, text: str) -> Path:
    """``out/name`` written atomically with ``text`` (UTF-8), never through a symbolic link
    (:func:`~gammatrace.store.backend.write_inside`)."""
    return write_inside(out, name, lambda p: Path(p).write_text(text, encoding="utf-8"), what="the study folder")


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
    ]
    blocks += source_blocks(preset, preset_name)
    blocks += repeat_blocks(summaries, preset)
    blocks.append(Heading("Convergence and one-point strong convexity" + (" (first run)" if preset.runs > 1 else ""),
                          2))
    rows = []
    for s in summaries.values():
        op_p, op_f = s["one_point"]["planted"], s["one_point"].get("found")
        found = ("W* itself" if s["found_is_planted"] else f"Π·W*, Π = {s['perm']}") if s["found_reached"] else "none"
        rows.append([s["label"], str(s["horizon_epochs"]), fmt(s["loss_final"]), fmt(s["w_dist_ratio"]),
                     "yes" if s["reached_w_star"] else "no", found, fmt(op_p["frac_holds"]),
                     fmt(op_p["delta_min"]), fmt(op_f["frac_holds"]) if op_f else "—",
                     fmt(s.get("row_spread_final"))])
    blocks.append(Table(["cell", "T (epochs)", "final loss", "‖W_T − W*‖ / ‖W_0 − W*‖", "reached W*",
                         "minimizer reached", "one-point holds (vs W*)", "δ_min (vs W*)",
                         "holds (vs minimizer reached)", "row spread of W_T"], rows))
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
    zero = ("a zero init without identity starts where every hidden unit is the same: σ'(0) = a gives every row "
            "of W the same gradient, so the rows stay equal (row spread 0) and the run reaches no minimizer"
            if preset.output == "sum" else
            "a stalled run (zero init without identity: σ(0) = 0 and |·|'(0) = 0 give a zero gradient) reaches no "
            "minimizer and has D_0 = 0 against its own θ_T")
    blocks.append(Text(
        "Reading: planted is the teacher W*; found the exact zero-loss point the run converged to (a row "
        "permutation of the teacher, W* itself when the permutation is the identity); last the papers' proxy θ_T; "
        f"continuation θ_{{T+E}}. γ_k is undefined where the loss gap is ≤ {preset.eps:g}; {zero}."))
    return blocks


def source_blocks(preset: Preset, preset_name: str) -> list[Block]:
    """For a paper preset: each value and where it comes from (a quoted phrase or "not stated").

    Example:
        >>> from gammatrace.experiments.identity.problem import PRESETS
        >>> table = source_blocks(PRESETS.get("paper")(), "paper")[1]
        >>> table.rows[0]
        ['d', '10', '003_169288aa6363f27d.txt: “random generalized input dataset of dimension $d = 10$”']
        >>> source_blocks(PRESETS.get("quick")(), "quick")
        []
    """
    sources = SOURCES.get(preset_name)
    if not sources:
        return []
    values = asdict(preset)
    fixed = {"activation": f"PReLU, slope {preset.negative_slope:g}", "loss": "mse", "optimizer": "sgd",
             "inputs": "x ~ N(0, I_d)", "learned_slope": "no"}
    rows = [[k, fmt(values[k]) if k in values else fixed.get(k, "—"), str(src)] for k, src in sources.items()]
    return [Heading("Settings and where they come from", 2), Table(["setting", "value", "source"], rows)]


def _spread(x: dict[str, float]) -> str:
    if x["min"] == x["max"]:
        return fmt(x["mean"])
    return f"{fmt(x['mean'])} [{fmt(x['min'])}, {fmt(x['max'])}]"


def repeat_blocks(summaries: dict[str, dict[str, Any]], preset: Preset) -> list[Block]:
    """With more than one run per cell: mean [min, max] of the convergence numbers over the runs.

    Example:
        >>> from gammatrace.experiments.identity.problem import PRESETS
        >>> repeat_blocks({}, PRESETS.get("quick")())
        []
    """
    if preset.runs <= 1:
        return []
    rows = []
    for s in summaries.values():
        r = s["repeats"]
        rows.append([s["label"], str(r["n"]), _spread(r["loss_final"]), _spread(r["w_dist_ratio"]),
                     f"{r['reached_w_star']} / {r['n']}", f"{r['found_reached']} / {r['n']}",
                     _spread(r["one_point_frac_holds"]), _spread(r["row_spread_final"])])
    return [Heading(f"Convergence over {preset.runs} runs (mean [min, max])", 2),
            Table(["cell", "runs", "final loss", "‖W_T − W*‖ / ‖W_0 − W*‖", "reached W*", "reached a minimizer",
                   "one-point holds (vs W*)", "row spread of W_T"], rows)]


def mnist_report_blocks(cells: dict[str, dict[str, Any]], settings: dict[str, Any], preset_name: str,
                        sources: dict[str, Any], wall: float, figures: list[str]) -> list[Block]:
    """The identity-mnist report: the verdict of each of the report's findings
    (:mod:`~gammatrace.experiments.identity.claims`, read from the runs of ``cells``) in
    one sentence, the figure, the settings (and, for the paper preset, where they come
    from), the claims' sources and the error table, beside the report's numbers.

    Example:
        >>> blocks = mnist_report_blocks({}, {"data": "digits"}, "quick", {}, 1.0, [])
        >>> [type(b).__name__ for b in blocks]
        ['Heading', 'Text', 'Heading', 'Table', 'Text']
    """
    checked = check_mnist_claims(mnist_points(cells)) if cells else []
    blocks: list[Block] = [Heading("Identity mapping on MNIST-style data: the CS260 report's Fig. 3")]
    if checked:
        blocks.append(Bullets(verdict_sentences(checked)))
    blocks += [
        *(Figure(name, "Test error per epoch: mean over the runs, band min–max") for name in figures),
        Text(f"Preset {preset_name}: {json.dumps(settings)}. Wall time {wall:.0f} s. One hidden layer as wide as "
             "the input, logits = V σ((I + W) x + b) + c with the identity mapping, V σ(W x + b) + c without; "
             "ReLU or PReLU (one learned slope, initially 0.25); zero init: every weight and bias 0. Each cell and "
             "run is one engine run (pass 1 trains, pass 2 replays against θ_T, verified step by step)."),
    ]
    if checked:
        blocks.append(Details("How the findings are checked", [
            Text("Each finding of the report (§5.1–5.3) is a weak order of cells by test accuracy after the last "
                 "epoch (1 − test error, larger first). Run r of every cell has the same seed (the preset's seed + r: "
                 "its initialization draw and batch order), so each relation a > b is tested by the exact one-sided sign test on the per-seed "
                 "differences (a zero difference counts against the claim): consistent only when every relation's "
                 "p < 0.05; not consistent when one is significantly reversed (Holm); inconclusive otherwise. The "
                 "tie (≈) is tested for equivalence within its margin by two one-sided exact sign tests."),
            Table(["finding", "order (test accuracy, larger first)", "source", "verdict"],
                  [[c.text, c.order, str(c.source), r.verdict if r is not None else "not checked"]
                   for c, r in checked])]))
    if sources:
        blocks += [Heading("Settings and where they come from", 2),
                   Table(["setting", "source"], [[k, str(v)] for k, v in sources.items()])]
    rows = []
    for c in cells.values():
        e = c["final_error"]
        gam = [g.get("gamma_median") for g in c["gamma"]]
        gam = [g for g in gam if g is not None]
        rows.append([c["label"], str(c["runs"]), f"{fmt(e['mean'], '.4f')} ± {fmt(e['std'], '.4f')}",
                     f"[{fmt(e['min'], '.4f')}, {fmt(e['max'], '.4f')}]",
                     fmt(c["reported_error"], ".5g") if c["reported_error"] is not None else "—",
                     fmt(c["final_train_loss"]["mean"]), fmt(float(sum(gam) / len(gam))) if gam else "—",
                     str(sum(bool(g.get("no_progress")) for g in c["gamma"]))])
    blocks += [Heading("Test error after the last epoch", 2),
               Table(["cell", "runs", "test error (mean ± std)", "[min, max]", "report's error",
                      "final train loss", "median γ_k vs θ_T (mean over runs)", "runs flagged no progress"], rows),
               Text("The report's errors are its MNIST numbers (§5.1–5.3), shown beside whatever data this "
                    "preset uses. Without the identity mapping a zero init leaves the hidden features at σ(0) = 0: "
                    "only the output bias learns, and the network predicts the most frequent class.")]
    return blocks
