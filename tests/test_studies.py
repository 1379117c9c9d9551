"""Studies end to end: a two-cell study trains, replays, analyses and reports; the report's
numbers are the runs' own; the claim verdicts follow their rules; presets and YAML grids
build valid configs; an interrupted study resumes without redoing finished runs.

One tiny study (digits, 128 samples, MLP 16×2, Adam; relu and tanh, each reaching the
target loss in a few epochs, plus one epoch of continuation) is run once per module.
"""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from gammatrace.engine import train_pass
from gammatrace.errors import UserError
from gammatrace.experiments import STUDIES, run_study, study_from_yaml
from gammatrace.experiments.presets import PRESETS
from gammatrace.experiments.study import Claim, grid_study, make_study, prepare_init, run_task
from gammatrace.reporting import study as S
from gammatrace.reporting.claims import null_baseline
from gammatrace.store import StoreError, StudyMeta, load_run
from tests.test_report import assert_cell, md_table

TARGET = 1.0
SPEC = {
    "name": "tiny", "question": "Does ReLU beat tanh?", "shared_init": True,
    "base": {"epochs": 10, "batch_size": 32, "target_loss": TARGET,
             "data": {"name": "digits", "n_train": 128, "n_test": 64},
             "model": {"name": "mlp", "width": 16, "depth": 2}, "optim": {"name": "adam", "lr": 0.02},
             "reference": {"kind": "continuation", "extra_epochs": 1}},
    "variants": {a: {"model": {"activation": a}} for a in ("relu", "tanh")},
    "claims": [{"text": "ReLU first", "order": ["relu", "tanh"]}],
}


def _mtimes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    html = run_study(grid_study(SPEC), out, progress=False)
    for name in ("relu", "tanh"):  # the fixture must hold what the tests rely on
        run = load_run(out / name)
        assert run.status == "complete" and run.meta.reached_target is True
        assert set(run.references()) == {"last", "continuation"}
    return out, html


# ------------------------------------------------------------------ end to end + numbers
def test_study_writes_report_and_init(study):
    out, html = study
    assert html == out / "report" / "report.html"
    meta = json.loads((out / "study.json").read_text())
    assert meta["runs"] == {"relu": "relu", "tanh": "tanh"} and meta["claims"][0]["order"] == [["relu"], ["tanh"]]
    # One shared initial point, loaded by both cells (same shapes: every tensor).
    init = out / "init" / "tiny-s0.pt"
    assert init.is_file()
    for name in ("relu", "tanh"):
        assert load_run(out / name).config.model.init_from == str(init.resolve())
    for f in ("trajectory_tiny.png", "trajectory_tiny.pdf", "layers_tiny.png", "matched_tiny.png", "theorem1_tiny.png",
              "rsi_eb_tiny.png", "summary.md", "report.html"):
        assert (out / "report" / f).stat().st_size > 1000, f
    assert html.read_text().count('<img src="data:image/png;base64,') == 5


def test_study_json_is_one_typed_model(study, tmp_path):
    out, _ = study
    # Written by run_study, read back as the model the report reads: equal to what the study states.
    meta = StudyMeta.load(out / "study.json")
    assert meta == grid_study(SPEC).meta(seeds=1)
    assert meta.name == "tiny" and meta.cell("relu") == "relu" and meta.group("tanh") == "tiny"
    assert meta.claims == [Claim("ReLU first", "relu > tanh", "tiny")]
    # The file of the previous (untyped) writer, key for key, loads unchanged.
    old = {"study": "activation", "question": "q", "preset": "quick", "seeds": 2, "shared_init": True,
           "runs": {"relu-s0": "relu", "relu-s1": "relu"}, "seed_of": {"relu-s0": 0, "relu-s1": 1},
           "groups": {"relu-s0": "mlp_bn", "relu-s1": "mlp_bn"},
           "claims": [{"text": "t", "order": ["relu", "tanh"], "group": "mlp_bn"}]}
    (tmp_path / "study.json").write_text(json.dumps(old))
    loaded = StudyMeta.load(tmp_path / "study.json")
    # A strict order written as a list of names is read as levels of one cell each.
    # Fields added since (a claim's window, the drawn paths) take their defaults.
    assert loaded.model_dump(mode="json") == {**old, "claims": [{**old["claims"][0], "order": [["relu"], ["tanh"]],
                                                                 "source": None, "first_epochs": None,
                                                                 "equivalent_within": None, "speed": None}],
                                              "paths": []}
    assert loaded.cell("relu-s1") == "relu" and loaded.claims[0].order == (("relu",), ("tanh",))
    # A damaged file names its field, and a report of its runs falls back to the plain layout.
    (tmp_path / "study.json").write_text(json.dumps({**old, "seeds": "many"}))
    with pytest.raises(StoreError, match="field 'seeds'"):
        StudyMeta.load(tmp_path / "study.json")
    assert S.find_study([tmp_path / "relu-s0"]) is None


def test_report_numbers_equal_the_runs_tables(study):
    out, _ = study
    md = (out / "report" / "summary.md").read_text()
    rows = {r["run"]: r for r in md_table(md, "## Runs")}
    assert set(rows) == {"relu", "tanh"}
    for name, row in rows.items():
        run = load_run(out / name)
        s, c = run.summary("last"), run.summary("continuation")
        epochs = run.epochs()
        for header, value in [("certified on every step", s["gamma_certified"]), ("γ_lo", s["gamma_lo"]),
                              ("γ_hi = min γ_k", s["gamma_min"]), ("fraction γ_k > 0", s["gamma_frac_positive"]),
                              ("median γ_k", s["gamma_median"]), ("median γ_k (continuation)", c["gamma_median"]),
                              ("γ_eff (loss-determined)", s["gamma_eff"]), ("d_k increases", s["dist_n_increase"]),
                              ("rate tightness (actual / bound)", s["rate_tightness"]),
                              ("final train loss", s["train_loss"]), ("final test acc / MSE", s["test_acc"]),
                              ("epochs", s["epochs"])]:
            assert_cell(row[header], value, f"{name} {header}")
        # Epochs to the threshold (the target) straight from the per-epoch table.
        first = int(epochs.loc[epochs["train_loss"] <= TARGET, "epoch"].iloc[0]) + 1
        assert row["epochs to threshold"] == str(first) == str(s["epochs"])
        assert row["flags"] == "—"
        # The median γ_k of the summary is the median of the step table's defined γ_k.
        g = run.steps("last")["gamma"].to_numpy(float)
        assert math.isclose(s["gamma_median"], float(np.median(g[np.isfinite(g)])), rel_tol=1e-9)

    claim = md_table(md, "### ReLU first")
    for r in claim:
        run = load_run(out / r["cell"])
        assert_cell(r["median γ_k, θ* = θ_T"], run.summary("last")["gamma_median"], r["cell"])
        assert_cell(r["median γ_k, continuation θ*"], run.summary("continuation")["gamma_median"], r["cell"])
        assert r[f"epochs to the target loss {TARGET:g}"] == str(run.summary()["epochs"])
    verdicts = md_table(md, "| statistic |")
    assert [(v["statistic"].split(" —")[0], v["reference point"]) for v in verdicts] == [
        (stat, ref) for stat in S.STATISTICS.values() for ref in S.REFERENCES.values()]
    assert verdicts[0]["statistic"] == "median γ_k per seed — the verdict"
    # One seed per cell: never a verdict, whatever the numbers; the trend's p-value is shown.
    for v in verdicts:
        assert v["verdict"].startswith("single seed (one run per cell: trend p = "), v
        assert v["seeds per level"] == "1+1"
        assert v["trend J / pairs, p (side statistic, not the verdict)"].split(",")[0] in ("0 / 1", "1 / 1")
    # The numbers of the check are the runs' own: the one relation relu > tanh, by whether relu's
    # median γ_k is larger (one seed each: p = 0.5 or 1).
    g = {c: load_run(out / c).summary("continuation")["gamma_median"] for c in ("relu", "tanh")}
    assert verdicts[0]["trend J / pairs, p (side statistic, not the verdict)"].startswith(
        "1 / 1" if g["relu"] > g["tanh"] else "0 / 1")
    assert verdicts[0]["p (largest relation p)"] == ("0.5" if g["relu"] > g["tanh"] else "1")
    assert verdicts[0]["relations (exact one-sided p each)"] == "relu > tanh: p = " + (
        "0.5" if g["relu"] > g["tanh"] else "1")


def test_null_baseline_rows_match_the_steps(study):
    out, _ = study
    md = (out / "report" / "summary.md").read_text()
    rows = {r["run"]: r for r in md_table(md, "## Null baseline for alignment")}
    for name, row in rows.items():
        run = load_run(out / name)
        st = run.steps("last")
        assert_cell(row["fraction P_k > 0"], float((st["progress"] > 0).mean()), name)
        assert_cell(row["mean cos_align"], float(st["cos_align"].mean()), name)
        assert_cell(row["null sd of one step (1/√n)"], run.summary()["cos_null_scale"], name)
        assert 0 <= float(row["fraction P_k > 0, random direction (exact)"]) < 0.5


def test_exact_null_fraction_matches_sampling():
    # Random directions of the step's norm in R^n, sampled: the fraction that decreases
    # the distance to θ* equals the exact Beta-law value the report prints.
    rng = np.random.default_rng(0)
    n, steps = 40, []
    v = rng.normal(size=n)
    for upd in (0.05, 0.3, 1.0):
        u = rng.normal(size=(20000, n))
        u *= upd / np.linalg.norm(u, axis=1, keepdims=True)
        progress = u @ v - 0.5 * upd**2  # P = <θ_k − θ*, Δ> − ½‖Δ‖², with θ_k − θ* = v
        steps.append((float(v @ v), upd**2, float((progress > 0).mean())))
    table = pd.DataFrame({"dist_sq": [s[0] for s in steps], "update_sq": [s[1] for s in steps],
                          "progress": [1.0, 1.0, 1.0], "cos_align": [0.0, 0.0, 0.0]})
    entry = SimpleNamespace(run=SimpleNamespace(meta=SimpleNamespace(n_params=n)), steps=table)
    exact = null_baseline(entry)["frac_progress_null"]
    sampled = float(np.mean([s[2] for s in steps]))
    assert abs(exact - sampled) < 0.01, (exact, sampled)


def test_seeded_figure_draws_mean_and_band(study, tmp_path):
    from gammatrace.reporting.collect import collect
    from gammatrace.reporting.figures import trajectory_figure

    out, _ = study
    entries = collect([out / "relu", out / "tanh"], "last")
    # Two runs as the two "seeds" of one cell: one line (their mean) with a min–max band.
    png = trajectory_figure(entries, tmp_path, notes := [], cells={"pair": entries}, stem="trajectory_pair")
    assert png == tmp_path / "trajectory_pair.png" and not notes
    lines = trajectory_figure(entries, tmp_path, [], cells={"relu": entries[:1], "tanh": entries[1:]})
    assert lines.stat().st_size > 10000


# ---------------------------------------------------------------------- presets, YAML
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", STUDIES.names())
def test_every_study_and_preset_builds_valid_configs(name, preset):
    study = STUDIES.get(name)(preset, None if preset == "quick" else "/data/cifar")
    assert study.cells and study.claims, name
    for cell, cfg in study.cells.items():
        cfg.check_names()
        assert cell in study.groups[study.group_of(cell)]
    for claim in study.claims:
        # Two levels, or one tie with an equivalence margin ("comparable γ"); a claim across
        # groups names cells of each group it lists.
        assert len(claim.order) >= 2 or (claim.equivalent_within is not None and len(claim.cells) >= 2)
        groups = claim.group.split(", ") if claim.group not in study.groups else [claim.group]
        assert set(claim.cells) <= {c for g in groups for c in study.groups[g]}
    for cfg in study.runs(seeds=2, init_dir="/tmp/init").values():
        assert cfg.reference.kind == "continuation" and cfg.reference.extra_epochs >= 1
        assert (cfg.model.init_from is not None) == study.shared_init
    if preset == "quick":
        for cfg in study.cells.values():
            # A common end point: every quick cell stops at a target loss, with a cap.
            assert cfg.device == "cpu" and cfg.target_loss is not None and cfg.epochs <= 250
            assert cfg.threads == 1  # two workers on two cores
        assert len(study.cells) <= 18
    else:
        dataset = "cifar100" if preset == "paper100" else "cifar10"
        for cell, cfg in study.cells.items():
            assert (cfg.device, cfg.epochs, cfg.batch_size, cfg.data.augment) == ("cuda", 150, 128, "none")
            assert cfg.data.name == dataset and cfg.data.switches()["data_dir"] == "/data/cifar", cell
            if cfg.loss == "mse":  # the U-Net reconstructs the CIFAR images
                assert cfg.data.switches()["task"] == "reconstruct" and cfg.model.switches()["depth"] == 4
        assert study.shared_init or name in ("init", "width")  # what they compare changes the initial point


@pytest.mark.parametrize("name", STUDIES.names())
def test_every_quick_cell_builds_its_data_and_model(name):
    from gammatrace.engine.session import build_session

    for cell, cfg in STUDIES.get(name)("quick", None).cells.items():
        sess = build_session(cfg)
        assert sess.steps_per_epoch >= 5, cell  # enough steps per epoch for per-epoch γ statistics


def test_paper_learning_rates():
    lr = {c: cfg.optim.lr for c, cfg in STUDIES.get("batchnorm")("paper", None).cells.items()}
    assert lr["vgg11-all"] == lr["vgg16-none"] == 0.01 and lr["resnet18-first"] == lr["resnet34-all"] == 0.05
    act = STUDIES.get("activation")("paper", None).cells
    assert act["unet-relu"].optim.lr == 0.005 and act["unet-relu"].loss == "mse"
    assert act["alexnet_small-leaky_relu"].optim.lr == 0.05
    opt = STUDIES.get("optimizer")("paper", None).cells
    assert {cfg.optim.lr for cfg in opt.values()} == {0.001}
    assert opt["vgg16-adam"].optim.eps == 0.01 and opt["vgg16-momentum"].optim.momentum == 0.5
    assert "data_dir" not in act["resnet18-relu"].data.switches()  # no --data-dir: the reader's default


def test_study_yaml_grid_and_cell_forms(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "question": "q", "base": {"data": {"name": "digits"}},
        "variants": {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}},
        "groups": {"mlp": {"base": {"model": {"name": "mlp"}}},
                   "cnn": {"base": {"model": {"name": "cnn1d"}}, "variants": {"relu": {}}}},
        "claims": [{"text": "relu first", "order": ["relu", "tanh"]}]}))
    s = study_from_yaml(grid)
    assert s.name == "grid" and sorted(s.cells) == ["cnn-relu", "mlp-relu", "mlp-tanh"]
    assert s.groups == {"mlp": ["mlp-relu", "mlp-tanh"], "cnn": ["cnn-relu"]}
    assert [(c.group, c.order_text) for c in s.claims] == [("mlp", "mlp-relu > mlp-tanh")]  # cnn has one variant
    assert s.cells["cnn-relu"].model.name == "cnn1d" and s.cells["mlp-tanh"].model.switches() == {"activation": "tanh"}

    cells = tmp_path / "cells.yaml"
    cells.write_text(yaml.safe_dump({"name": "c", "cells": {"a": {"optim": {"lr": 0.1}}, "b": {}},
                                     "claims": [{"text": "a first", "order": ["a", "b"]}]}))
    s = study_from_yaml(cells)
    assert s.cells["a"].optim.lr == 0.1 and s.claims == [Claim("a first", ("a", "b"))]

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"variants": {"a": {}, "b": {}}, "claims": [{"text": "t", "order": ["a", "bb"]}]}))
    with pytest.raises(ValueError, match=r"unknown variants \['bb'\]"):
        study_from_yaml(bad)
    bad.write_text(yaml.safe_dump({"variants": {"a": {}}, "seed": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['seed'\]"):
        study_from_yaml(bad)
    bad.write_text(yaml.safe_dump({"variants": {"a": {}}, "groups": {"g": {"bases": {}}}}))
    with pytest.raises(ValueError, match=r"unknown keys \['bases'\] \(at groups.g.bases\)"):
        study_from_yaml(bad)
    bad.write_text(yaml.safe_dump({"variants": {"a": {}, "b": {}}, "claims": [{"text": "t", "order": "a > a"}]}))
    with pytest.raises(UserError, match="names a more than once"):
        study_from_yaml(bad)
    bad.write_text(yaml.safe_dump({"cells": {"a": {}}, "claims": [{"text": "t", "order": ["a", "zz"]}]}))
    with pytest.raises(ValueError, match="unknown cells"):
        study_from_yaml(bad)


def test_shared_init_covers_every_cell_where_shapes_allow(tmp_path):
    from gammatrace.engine.session import build_session
    from gammatrace.models.init import load_init

    # Skip quick: a U-Net without skips has narrower decoder convs than with them.
    study = STUDIES.get("skip")("quick", None)
    study = make_study("s", "", {}, {c: study.cells[c].model_dump() for c in ("unet-all", "unet-none")},
                       groups={"unet": ["unet-all", "unet-none"]}, shared_init=True)
    (path,) = prepare_init(study, tmp_path / "init")
    stamp = path.stat().st_mtime_ns
    reports = {c: load_init(build_session(cfg.with_overrides({"model": {"init_from": None}})).model, path)
               for c, cfg in study.cells.items()}
    assert reports["unet-all"].complete  # the largest cell is covered whole
    assert reports["unet-none"].loaded and reports["unet-none"].shape_mismatch
    assert prepare_init(study, tmp_path / "init") == [path] and path.stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- resume
def test_rerun_redoes_nothing_and_resumes_what_is_missing(study, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(study[0], out)
    for name in ("relu", "tanh"):  # the copied runs must point at the copied init
        meta = json.loads((out / name / "run.json").read_text())
        meta["config"]["model"]["init_from"] = str((out / "init" / "tiny-s0.pt").resolve())
        (out / name / "run.json").write_text(json.dumps(meta))
    before = _mtimes(out)
    # Interrupted analysis: tanh lost its continuation analysis.
    shutil.rmtree(out / "tanh" / "analysis" / "continuation")
    run_study(grid_study(SPEC), out, progress=False)
    after = _mtimes(out)
    # Re-analysing tanh legitimately rewrites its status in run.json, takes its lock, and the report;
    # the command takes the study folder's lock (its PID is written into .lock).
    untouched = [k for k in before if not k.startswith(("report/", "tanh/analysis/continuation", "tanh/run.json",
                                                        "tanh/.lock")) and k != ".lock"]
    changed = [k for k in untouched if after.get(k) != before[k]]
    assert not changed, changed  # relu, tanh's training and its 'last' analysis, study.json, init
    assert "tanh/analysis/continuation/summary.json" in after
    assert load_run(out / "tanh").summary("continuation") == load_run(study[0] / "tanh").summary("continuation")


def test_interrupted_training_resumes_inside_the_study(tmp_path):
    spec = {**SPEC, "shared_init": False}
    study = grid_study(spec)
    out = tmp_path / "s"
    configs = study.runs()
    # relu finished, tanh killed after one epoch (as a kill between epochs leaves it).
    run_task(configs["relu"].model_dump(mode="json"), str(out / "relu"))
    train_pass(configs["tanh"], out / "tanh", progress=False, stop_after=1)
    relu_before = _mtimes(out / "relu")
    assert load_run(out / "tanh").meta.epochs_done == 1
    run_study(study, out, progress=False)
    assert _mtimes(out / "relu") == relu_before
    assert load_run(out / "tanh").status == "complete"


def test_another_study_in_the_same_folder_is_refused(study):
    other = {**SPEC, "name": "other"}
    with pytest.raises(ValueError, match="holds another study"):
        run_study(grid_study(other), study[0], progress=False)
    with pytest.raises(ValueError, match="with other runs .* --seeds 1"):
        run_study(grid_study(SPEC), study[0], seeds=2, progress=False)


def test_report_only_and_auto_detected_study(study, tmp_path):
    out, _ = study
    from gammatrace.reporting import report

    html = report([out / "relu", out / "tanh"], tmp_path / "r")  # study.json found beside the runs
    assert "## Claim check" in (tmp_path / "r" / "summary.md").read_text()
    assert html.exists()
    assert run_study(grid_study(SPEC), out, report_only=True, progress=False) == out / "report" / "report.html"


def test_cli_study_yaml(tmp_path, capsys):
    from gammatrace.cli import main

    spec = {k: v for k, v in SPEC.items() if k != "name"}
    spec["base"] = {**spec["base"], "epochs": 3, "target_loss": None, "reference": {"kind": "last"}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert f"report: {tmp_path / 'o' / 'report' / 'report.html'}" in capsys.readouterr().out
    md = (tmp_path / "o" / "report" / "summary.md").read_text()
    # No continuation analysis: that side of the check says so, and no target: final loss.
    assert "no continuation analysis" in md and "final train loss (lowest first)" in md


# ------------------------------------------------------------- report layout (issue 19, 9)
def test_report_leads_with_the_verdict_then_the_figure(study):
    out, html = study
    md = (out / "report" / "summary.md").read_text()
    parts = md.split("\n\n")
    assert parts[0] == "# gammatrace study: tiny" or parts[0].startswith("# ")
    # First content after the title: each claim's verdict in one sentence, with its relations and p …
    check = S.check_study_claim(StudyMeta.load(out / "study.json").claims[0],
                                S.study_runs(StudyMeta.load(out / "study.json"),
                                             *_entries(out)))
    assert parts[1] == "- " + S.verdict_sentence(check).replace("*", "\\*")
    assert check.verdict.text in parts[1] and "ReLU first" in parts[1] and "relu > tanh" in parts[1]
    # … then the trajectory figure, before any table.
    assert parts[2].startswith("![") and "trajectory_tiny.png" in parts[2]
    assert md.index("](trajectory_tiny.png)") < md.index("\n| ")
    # In the page: the same order, and the method text and long tables folded (closed <details>).
    body = html.read_text().split("<body>", 1)[1]
    assert body.lstrip().startswith("<h1>")
    after = body.split("</h1>", 1)[1].lstrip()
    assert after.startswith("<ul>\n<li>") and after.index("<figure>") < after.index("<table>")
    assert after.index("</ul>") < after.index("<figure>")
    summaries = [s.split("</summary>")[0] for s in body.split("<details><summary>")[1:]]
    for section in ("How each claim is tested", "ReLU first", "Theorem 1", "Runs: one row per run",
                    "Trajectory principles (θ* = θ_T)", "Null baseline for alignment"):
        assert any(s.startswith(section) for s in summaries), (section, summaries)
    assert "<details open" not in body
    # Every table of the page is inside a fold; the figures are not.
    depth, seen = 0, 0
    for token in __import__("re").findall(r"<details>|</details>|<table>|<figure>", body):
        depth += {"<details>": 1, "</details>": -1}.get(token, 0)
        if token == "<table>":
            assert depth > 0
            seen += 1
        if token == "<figure>":
            assert depth == 0
    assert seen >= 5
    # The method paragraph is no longer the first thing a reader meets.
    assert body.index("Each claim is a weak order") > body.index("<figure>")


def _entries(out):
    from gammatrace.reporting.collect import collect
    runs = [out / "relu", out / "tanh"]
    last = collect(runs, "last")
    return last, collect([e.run for e in last], "continuation")


# ------------------------------------------------------------- claims about differences
def _diff_runs(gains: dict[str, list[float]]):
    """Two networks x, y with cells all / first, six seeds; ``gains``: per seed γ_all − γ_first."""
    from gammatrace.reporting.collect import example_entry
    entries, runs, seed_of = [], {}, {}
    for net, gain in gains.items():
        for s, d in enumerate(gain):
            for variant, g in (("all", 0.3 + d), ("first", 0.3)):
                e = example_entry(f"{net}-{variant}-s{s}", g + 0.001 * s, [1, 0.1])
                entries.append(e)
                runs[e.run.path.name] = f"{net}-{variant}"
                seed_of[e.run.path.name] = s
    claim = Claim("deeper", "x-all − x-first > y-all − y-first")
    meta = StudyMeta(study="d", runs=runs, seed_of=seed_of, claims=[claim])
    return claim, S.study_runs(meta, entries, cont=[])


def test_a_claim_about_differences_tests_the_per_seed_differences():
    claim, runs = _diff_runs({"x": [0.10, 0.12, 0.09, 0.11, 0.10, 0.13], "y": [0.01, 0.02, 0.00, 0.01, 0.03, 0.02]})
    assert claim.cells == ("x-all", "x-first", "y-all", "y-first")
    r = S.check_study_claim(claim, runs).results["median", "last"]
    # Six seeds, every per-seed difference of differences positive: the paired sign test, p = 2^-6.
    assert r.verdict == "consistent" and r.design == "paired"
    assert [(t.above, t.below, t.p_value) for t in r.relations] == [
        ("x-all − x-first", "y-all − y-first", pytest.approx(0.5 ** 6))]
    stats = {c.cell: c for c in r.cells}
    assert stats["x-all − x-first"].gamma == pytest.approx(np.mean([0.10, 0.12, 0.09, 0.11, 0.10, 0.13]))
    # Reversed in every seed: not consistent; the verdict names the relation.
    claim, runs = _diff_runs({"x": [0.0] * 6, "y": [0.1] * 6})
    r = S.check_study_claim(claim, runs).results["median", "last"]
    assert r.verdict == "not consistent" and "x-all − x-first > y-all − y-first" in r.text
    # The same gains in both networks, each difference of differences 0: counted against the claim.
    claim, runs = _diff_runs({"x": [0.05] * 6, "y": [0.05] * 6})
    assert S.check_study_claim(claim, runs).results["median", "last"].verdict == "inconclusive"


def test_a_difference_lacking_a_seed_excludes_that_side():
    claim, runs = _diff_runs({"x": [0.1] * 6, "y": [0.0] * 6})
    runs = [r for r in runs if (r.cell, r.seed) != ("y-first", 3)]
    r = S.check_study_claim(claim, runs).results["median", "last"]
    assert r.verdict == "inconclusive" and "no run of y-first with seed 3" in r.excluded["y-all − y-first"]
    blocks = S.claim_blocks(S.check_study_claim(claim, runs))
    table = next(b for b in blocks if getattr(b, "header", [None])[0] == "cell")
    assert [row[:2] for row in table.rows] == [["x-all", "1 (+ in x-all − x-first)"],
                                              ["x-first", "1 (− in x-all − x-first)"],
                                              ["y-all", "2 (+ in y-all − y-first)"],
                                              ["y-first", "2 (− in y-all − y-first)"]]


def test_a_difference_item_is_two_cells():
    assert Claim("t", "a - b > c - d").order_text == "a − b > c − d"  # ASCII, spaced, reads as the minus sign
    with pytest.raises(UserError, match="two different cells"):
        Claim("t", "a − a > c − d")
    with pytest.raises(UserError, match="two different cells"):
        Claim("t", "a − b − c > d")
    with pytest.raises(UserError, match="unknown cells"):
        grid_study({"name": "g", "base": {"data": {"name": "digits"}},
                    "variants": {"relu": {"model": {"activation": "relu"}}, "tanh": {"model": {"activation": "tanh"}}},
                    "groups": {"a": {}, "b": {}},
                    "across": [{"text": "t", "order": "a-relu − a-tanh > b-relu − b-gelu"}]})
