"""The study's analysis: γ statistics per reference and window, the proxy's distortion,
one-point strong convexity, every number of a cell, and the quotable sentence.

Example:
    >>> from gammatrace import principles as P
    >>> reference_stats(P.example_steps(), late=1, eps=1e-8)["late"]["gamma_median"]
    10.0
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from gammatrace import principles as P
from gammatrace.experiments.identity.problem import CELL_BY_NAME, MAIN_CELL, Preset

REFERENCES = ("planted", "found", "last", "continuation")
REFERENCE_LABELS = {
    "planted": "θ* = W* (planted teacher)",
    "found": "θ* = Π·W* (exact minimizer reached)",
    "last": "θ* = θ_T (last iterate, the papers' proxy)",
    "continuation": "θ* = θ_{T+E} (continuation)",
}
PROXIES = ("last", "continuation")
WINDOWS = ("all", "body", "late")
WINDOW_LABELS = {"all": "all steps", "body": "first 90% (tail excluded)", "late": "last 10%"}
# A run "reached" a minimizer when its distance to it fell below this fraction of the start's.
REACHED = 0.05


def _slice(n: int, window: str, late: int) -> slice:
    return {"all": slice(0, n), "body": slice(0, n - late), "late": slice(n - late, n)}[window]


def reference_stats(steps: pd.DataFrame, late: int, eps: float) -> dict[str, dict[str, Any]]:
    """γ statistics and the monotone-distance check of one step table, per window.

    Windows: ``all`` steps of the horizon, ``body`` (all but the last ``late`` — the
    papers' tail exclusion) and ``late`` (the last ``late`` steps). D_0 is always the
    first step's distance, as in the definition. Keys per window: ``gamma_median``,
    ``gamma_min``, ``gamma_frac_positive``, ``gamma_n_undefined``, ``dist_n_increase``,
    ``dist_frac_increase``, ``n_steps``; ``all`` also has ``gamma_eff`` and ``no_progress``.

    Example:
        >>> s = reference_stats(P.example_steps(), late=1, eps=1e-8)
        >>> s["late"]["gamma_median"], s["body"]["dist_n_increase"]
        (10.0, 1)
    """
    # A stalled run has D_0 = 0 against its own θ_T: every ratio is undefined (NaN,
    # counted), which numpy would also announce as warnings.
    with np.errstate(divide="ignore", invalid="ignore"):
        full = P.derive(steps, eps=eps)
        d0 = float(full["dist_sq"].iloc[0]) if len(full) else math.nan
        out: dict[str, dict[str, Any]] = {}
        for w in WINDOWS:
            part = full.iloc[_slice(len(full), w, late)]
            cert = P.certify(part["gamma"])
            mono = P.monotone_distance(part, d0_sq=d0)
            out[w] = {"n_steps": len(part), "gamma_median": cert["median"], "gamma_min": cert["gamma_min"],
                      "gamma_frac_positive": cert["frac_positive"], "gamma_n_undefined": cert["n_undefined"],
                      "dist_n_increase": mono["n_increase"], "dist_frac_increase": mono["frac_increase"]}
        whole = P.summarize(steps, eps=eps)
    out["all"]["gamma_eff"] = whole["gamma_eff"]
    out["all"]["no_progress"] = whole["no_progress"]
    return out


def distortion(truth: pd.DataFrame, proxy: pd.DataFrame, late: int, eps: float) -> dict[str, dict[str, Any]]:
    """Per-step agreement of γ_k against a proxy reference with γ_k against the truth.

    Per window: ``sign_agreement`` (fraction of the steps defined under both where the
    signs agree), ``median_ratio`` (median of γ_k^proxy / γ_k^true over them) and
    ``n_steps`` (how many).

    Example:
        >>> df = P.example_steps()
        >>> distortion(df, df, late=1, eps=1e-8)["all"]
        {'sign_agreement': 1.0, 'median_ratio': 1.0, 'n_steps': 4}
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        a = P.derive(truth, eps=eps)["gamma"].to_numpy()
        b = P.derive(proxy, eps=eps)["gamma"].to_numpy()
    out = {}
    for w in WINDOWS:
        sl = _slice(len(a), w, late)
        x, y = a[sl], b[sl]
        ok = np.isfinite(x) & np.isfinite(y) & (x != 0)
        out[w] = {"sign_agreement": float(np.mean(np.sign(x[ok]) == np.sign(y[ok]))) if ok.any() else math.nan,
                  "median_ratio": float(np.median(y[ok] / x[ok])) if ok.any() else math.nan,
                  "n_steps": int(ok.sum())}
    return out


def one_point(delta: pd.DataFrame) -> dict[str, Any]:
    """Summary of a δ_k table (step, epoch, delta): where the one-point condition holds.

    Example:
        >>> one_point(pd.DataFrame({"step": [0, 1], "epoch": [0, 0], "delta": [0.5, -0.1]}))["frac_holds"]
        0.5
    """
    d = delta["delta"].to_numpy()
    ok = np.isfinite(d)
    per_epoch = {int(e): {"delta_min": float(g.min()), "frac_holds": float(np.mean(g.to_numpy() > 0))}
                 for e, g in delta.groupby("epoch")["delta"]}
    return {"frac_holds": float(np.mean(d[ok] > 0)) if ok.any() else math.nan,
            "delta_min": float(d[ok].min()) if ok.any() else math.nan,
            "delta_median": float(np.median(d[ok])) if ok.any() else math.nan, "per_epoch": per_epoch}


def summarize_cell(result: dict[str, Any], preset: Preset) -> dict[str, Any]:
    """Every number of one cell (a :func:`~gammatrace.experiments.identity.study.run_cell`
    result): convergence, one-point strong convexity, γ per reference.

    Example:
        >>> from gammatrace.experiments.identity.problem import CELLS, PRESETS
        >>> from gammatrace.experiments.identity.study import run_cell
        >>> tiny = PRESETS.get("tiny")()
        >>> s = summarize_cell(run_cell(tiny, CELLS[0], "out/im"), tiny)  # a long training (seconds)  # doctest: +SKIP
        >>> s["reached_w_star"]  # doctest: +SKIP
        True
    """
    cell = CELL_BY_NAME[result["cell"]]
    ep, T = result["epochs"], result["horizon"]
    n_steps = T * result["steps_per_epoch"]
    late = max(1, int(round(preset.late_fraction * n_steps)))
    w0, wT = float(ep["w_dist"].iloc[0]), float(ep["w_dist"].iloc[T])
    refs = {r: reference_stats(result["steps"][r], late, preset.eps) for r in REFERENCES if r in result["steps"]}
    truth = result["steps"].get("found")
    return {
        "cell": cell.name, "label": cell.label(preset), "identity": cell.identity, "bounded": cell.bounded,
        "init": cell.init, "w_star_norm": cell.norm(preset), "horizon_epochs": T, "n_steps": n_steps,
        "late_steps": late, "loss_initial": float(ep["train_loss"].iloc[0]),
        "loss_final": float(ep["train_loss"].iloc[T]),
        # None without a target: the horizon is max_epochs (the paper preset's 10 epochs).
        "reached_target": None if preset.target_loss is None else bool(ep["train_loss"].iloc[T] <= preset.target_loss),
        "w_dist_initial": w0, "w_dist_final": wT, "w_dist_ratio": wT / w0 if w0 > 0 else math.nan,
        "reached_w_star": bool(w0 > 0 and wT < REACHED * w0),
        "found_reached": result["found_reached"], "found_is_planted": result["perm"] == sorted(result["perm"]),
        "found_dist_initial": result["found_dist_initial"], "found_dist_final": result["found_dist_final"],
        "perm": result["perm"], "repeat": int(result.get("repeat", 0)),
        "row_spread_final": float(result.get("row_spread_final", math.nan)),
        "one_point": {r: one_point(d) for r, d in result["delta"].items()},
        "references": refs,
        "distortion": {r: distortion(truth, result["steps"][r], late, preset.eps) for r in PROXIES}
        if truth is not None else {},
        "no_progress": bool(refs["planted"]["all"]["no_progress"]),
        "run": result["run"], "run_references": result["run_references"], "seconds": float(result["seconds"]),
    }


def _spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    ok = a[np.isfinite(a)]
    if not len(ok):
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(ok.mean()), "min": float(ok.min()), "max": float(ok.max())}


def summarize_repeats(each: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (min–max) of a cell's convergence numbers over its repeats
    (the :func:`summarize_cell` of each), and how many reached W* / an exact minimizer.

    Example:
        >>> rep = summarize_repeats([{"loss_final": 1.0, "w_dist_ratio": 0.5, "reached_w_star": True,
        ...                           "found_reached": True, "row_spread_final": 0.9, "horizon_epochs": 10,
        ...                           "one_point": {"planted": {"frac_holds": 1.0}}},
        ...                          {"loss_final": 3.0, "w_dist_ratio": 0.7, "reached_w_star": False,
        ...                           "found_reached": True, "row_spread_final": 0.8, "horizon_epochs": 10,
        ...                           "one_point": {"planted": {"frac_holds": 0.5}}}])
        >>> rep["n"], rep["loss_final"], rep["reached_w_star"], rep["found_reached"]
        (2, {'mean': 2.0, 'min': 1.0, 'max': 3.0}, 1, 2)
    """
    keys = ("loss_final", "w_dist_ratio", "row_spread_final", "horizon_epochs")
    return {"n": len(each), **{k: _spread([e[k] for e in each]) for k in keys},
            "one_point_frac_holds": _spread([e["one_point"]["planted"]["frac_holds"] for e in each]),
            "reached_w_star": sum(bool(e["reached_w_star"]) for e in each),
            "found_reached": sum(bool(e["found_reached"]) for e in each)}


# The per-epoch series Fig. 4 draws, as columns of a run_cell result's epoch table.
CURVES = ("train_loss", "w_dist", "found_dist")


def loss_distance_curves(repeats: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Fig. 4's numbers: per cell and per epoch 0..T, the mean, min and max over the cell's
    repeats of the full training loss, ‖W − W*‖_F and ‖W − Π·W*‖_F (the last over the repeats
    that reached a minimizer; NaN where none did). Repeats with a shorter horizon end early
    (the statistics at a later epoch are over the repeats still running).

    Example:
        >>> ep = lambda *loss: {"epochs": pd.DataFrame({"epoch": range(len(loss)), "train_loss": loss,
        ...                                               "w_dist": loss, "found_dist": [np.nan] * len(loss)})}
        >>> c = loss_distance_curves({"id-bounded-random": [ep(4.0, 1.0), ep(2.0, 3.0, 0.5)]})["id-bounded-random"]
        >>> c["epoch"], c["train_loss"]["mean"], c["train_loss"]["max"], c["found_dist"]["mean"]
        ([0, 1, 2], [3.0, 2.0, 0.5], [4.0, 3.0, 0.5], [nan, nan, nan])
    """
    out: dict[str, dict[str, Any]] = {}
    for name, rs in repeats.items():
        T = max(len(r["epochs"]) for r in rs)
        curve: dict[str, Any] = {"epoch": list(range(T)), "n": len(rs)}
        for key in CURVES:
            a = np.full((len(rs), T), np.nan)
            for i, r in enumerate(rs):
                v = r["epochs"][key].to_numpy(dtype=float)
                a[i, : len(v)] = v
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is NaN, as meant
                curve[key] = {"mean": np.nanmean(a, 0).tolist(), "min": np.nanmin(a, 0).tolist(),
                              "max": np.nanmax(a, 0).tolist()}
        out[name] = curve
    return out


def headline(cells: dict[str, dict[str, Any]], preset: Preset) -> dict[str, Any]:
    """The numbers the quotable sentence states, and the sentence built from them.

    The main cell is Li & Yuan's setting (identity, bounded ‖W*‖, random init), where the
    run reaches the planted W* itself; the count of cells is over all cells that reached
    an exact minimizer. Each number is formatted with ``formats[key]``, so the sentence
    is reproducible from the JSON.

    Example:
        >>> import json
        >>> from gammatrace.experiments.identity.problem import PRESETS
        >>> cells = json.load(open("out/im/identity_mapping.json"))["cells"]  # needs a study's output  # doctest: +SKIP
        >>> headline(cells, PRESETS.get("quick")())["sentence"][:40]  # doctest: +SKIP
        "With the exact minimizer known (teacher–"
    """
    main = cells[MAIN_CELL]
    cell = CELL_BY_NAME[MAIN_CELL]
    body_pct, late_pct = round(100 * (1 - preset.late_fraction)), round(100 * preset.late_fraction)
    if not main["distortion"]:
        sentence = (f"In this preset the run in Li & Yuan's setting ({cell.label(preset)}) reached no exact "
                    "minimizer within its horizon, so the last-iterate proxy could not be checked against the truth.")
        return {"cell": MAIN_CELL, "numbers": {}, "formats": {}, "sentence": sentence}
    ref, dis = main["references"], main["distortion"]
    reached = [c for c in cells.values() if c["found_reached"] and c["distortion"]]
    moved = [c for c in reached if not abs(c["distortion"]["last"]["late"]["median_ratio"] - 1) <= 0.1]
    late = {(who, key): ref[r]["late"][stat] for who, r in (("true", "found"), ("last", "last"))
            for key, stat in (("median", "gamma_median"), ("min", "gamma_min"), ("pos", "gamma_frac_positive"),
                              ("inc", "dist_n_increase"), ("undef", "gamma_n_undefined"))}
    n = {"late_steps": main["late_steps"], "body_ratio": dis["last"]["body"]["median_ratio"],
         **{f"{who}_late_{key}": 100 * v if key == "pos" else v for (who, key), v in late.items()},
         "cont_late_median": ref["continuation"]["late"]["gamma_median"],
         "n_moved": len(moved), "n_reached": len(reached)}
    kinds = {"body_ratio": ".3f", "median": ".2f", "min": ".2f", "pos": ".1f"}
    fmt = {k: next((f for suffix, f in kinds.items() if k.endswith(suffix)), "d") for k in n}
    f = {k: format(v, fmt[k]) for k, v in n.items()}
    body_verb = "reproduces" if abs(n["body_ratio"] - 1) <= 0.05 else "already shifts"
    same_late = abs(dis["last"]["late"]["median_ratio"] - 1) <= 0.1 and n["last_late_inc"] == n["true_late_inc"]
    cont_ok = abs(dis["continuation"]["late"]["median_ratio"] - 1) <= 0.05
    sentence = (
        f"With the exact minimizer known (teacher–student, {cell.label(preset)}), the papers' last-iterate proxy "
        f"θ* = θ_T {body_verb} γ_k over the first {body_pct}% of SGD steps (median ratio to the true γ_k "
        f"{f['body_ratio']}) but {'also reproduces' if same_late else 'distorts'} the last {late_pct}% "
        f"({f['late_steps']} steps: median γ_k {f['true_late_median']} → {f['last_late_median']}, "
        f"γ_min {f['true_late_min']} → {f['last_late_min']}, positive {f['true_late_pos']}% → {f['last_late_pos']}%, "
        f"distance increases {f['true_late_inc']} → {f['last_late_inc']}, undefined {f['true_late_undef']} → "
        f"{f['last_late_undef']}), while a continuation reference θ_{{T+E}} {'restores' if cont_ok else 'gives'} a late "
        f"median of {f['cont_late_median']}; the proxy moved the late median γ_k by more than 10% in {f['n_moved']} "
        f"of the {f['n_reached']} cells that reached an exact minimizer."
    )
    return {"cell": MAIN_CELL, "numbers": n, "formats": fmt, "sentence": sentence}
