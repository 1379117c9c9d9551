"""Issue 21, items 7 and 8: what a report says its numbers are.

Item 7: an analysis with a tail (or another ℓ_inf) is an analysis of its own beside the run
config's (``analysis/last/tail=2``), and every table and figure of a report that reads it
says so, over the same steps (the Theorem 1 table included). Item 8: runs of the user's own
loop (:class:`gammatrace.TwoPass` + :func:`gammatrace.save_run`) have no full training loss;
what is shown is their mean batch loss, labelled so, and they count as trained runs.
Engine runs and own-loop runs are real, trained here with the public API.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import gammatrace
from gammatrace.analysis import analyze, train
from gammatrace.engine.twopass import TwoPass, save_run
from gammatrace.reporting import report
from gammatrace.reporting.claims import theorem1
from gammatrace.reporting.collect import collect
from gammatrace.reporting.document import fmt, md_unescape
from gammatrace.reporting.figures import _Line, loss_row
from gammatrace.store import load_run
from gammatrace.store.run import OWN_LOOP
from tests.test_report import md_table

TAIL = 2


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    cfg = {"name": "eng", "seed": 1, "epochs": 3, "batch_size": 64, "data": {"name": "digits", "n_train": 256},
           "model": {"name": "mlp", "width": 16, "depth": 2}, "optim": {"name": "adam", "lr": 0.01}}
    run = train(cfg, out=tmp_path_factory.mktemp("engine") / "eng", progress=False)
    assert run.config.analysis.tail == 0 and len(run.steps()) == 12
    return run.path


def _defined_gammas(steps) -> int:
    return int(np.isfinite(steps["gamma"].to_numpy(float)).sum())


# ------------------------------------------------------------------------------ item 7
def test_another_tail_is_an_analysis_of_its_own(engine_run, tmp_path, capsys):
    before = json.loads((engine_run / "analysis" / "last" / "summary.json").read_text())
    summary = analyze(engine_run, tail=TAIL, progress=False)
    assert f"stored as analysis/last/tail={TAIL}" in capsys.readouterr().err
    # The run config's analysis is still there, unchanged: not silently replaced.
    assert json.loads((engine_run / "analysis" / "last" / "summary.json").read_text()) == before
    assert before["tail"] == 0 and summary["tail"] == TAIL
    stored = json.loads((engine_run / "analysis" / "last" / f"tail={TAIL}" / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary)) or stored["gamma_median"] == pytest.approx(summary["gamma_median"])
    assert stored["analysis"] == f"last/tail={TAIL}" and stored["reference"] == "last"
    run = load_run(engine_run)
    assert run.references() == ["last"]
    assert f"last/tail={TAIL}" in run.analyses() and "last" in run.analyses()
    assert run.summary()["tail"] == 0 and run.summary(f"last/tail={TAIL}")["tail"] == TAIL
    # the replay's measurements are the reference's, shared
    assert len(run.tensor_steps(f"last/tail={TAIL}")) == len(run.tensor_steps())
    analyze(engine_run, ell_inf=0.1, progress=False)
    assert load_run(engine_run).summary("last/ell_inf=0.1")["ell_inf"] == 0.1
    assert load_run(engine_run).summary()["ell_inf"] == 0.0


def test_every_table_and_figure_of_a_tail_report_says_so(engine_run, tmp_path):
    analyze(engine_run, tail=TAIL, progress=False)
    run = load_run(engine_run)
    name = f"last/tail={TAIL}"
    s, steps = run.summary(name), run.steps(name).sort_values("step")
    kept = steps.iloc[: len(steps) - TAIL]
    assert _defined_gammas(kept) != _defined_gammas(steps)  # else the check below would pass vacuously
    words = f"steps 0–{len(steps) - TAIL - 1} of {len(steps)} (the last {TAIL} left out: --tail {TAIL})"

    report([engine_run], tmp_path / "tail", reference=name)
    md = md_unescape((tmp_path / "tail" / "summary.md").read_text())
    principles = md_table(md, "## Trajectory principles")[0]
    assert principles["steps (analyze options)"] == words
    assert float(principles["γ_hi = min γ_k"]) == pytest.approx(s["gamma_min"], rel=5e-4)
    theorem = md_table(md, "## Theorem 1")[0]
    assert theorem["steps (analyze options)"] == words
    premise = theorem["the principle with one γ > 0 on every step (the premise)"]
    # The Theorem 1 table is over the same steps as the principles table: γ_min and the count.
    assert premise.split(": ", 1)[1].startswith(f"on every step: {s['gamma_certificate']}")
    assert f"of {_defined_gammas(kept)} defined steps" in premise
    item1 = theorem["‖θ_{k+1} − θ*‖ ≤ ‖θ_k − θ*‖ for every k"]
    assert f"d_k rises at {s['dist_n_increase']} of {s['n_steps']} steps" in item1
    # The figure draws every step and says the tables do not.
    assert f"eng: every step drawn; the tables are over {words}" in md
    assert f"the table's γ_eff = {fmt(s['gamma_eff'])} leaves out the last {TAIL} steps" in md

    # The run config's analysis: all steps, in every table, and no note.
    report([engine_run], tmp_path / "plain")
    md = md_unescape((tmp_path / "plain" / "summary.md").read_text())
    assert md_table(md, "## Trajectory principles")[0]["steps (analyze options)"] == "all 12 steps"
    premise = md_table(md, "## Theorem 1")[0]["the principle with one γ > 0 on every step (the premise)"]
    assert f"of {_defined_gammas(steps)} defined steps" in premise
    assert "every step drawn" not in md and "--tail" not in md

    analyze(engine_run, ell_inf=0.1, progress=False)
    report([engine_run], tmp_path / "ell", reference="last/ell_inf=0.1")
    md = md_unescape((tmp_path / "ell" / "summary.md").read_text())
    assert md_table(md, "## Trajectory principles")[0]["steps (analyze options)"] == "ℓ_inf = 0.1 (--ell-inf)"
    assert "eng: γ^RP_k measured above ℓ_inf = 0.1 (--ell-inf)" in md


def test_theorem1_is_checked_over_the_steps_of_the_summary(engine_run):
    """The issue's report: the principles table with --tail 28 (γ_min 1.323), the Theorem 1
    table of the same report over all steps (γ_min 0.15). Both now read the summary's steps."""
    (entry,) = collect([engine_run])
    steps = entry.steps.sort_values("step")
    entry.summary = {**entry.summary, "tail": TAIL, "n_steps_total": len(steps)}
    premise, item1 = theorem1(entry)[:2]
    kept = steps.iloc[: len(steps) - TAIL]
    assert _defined_gammas(kept) != _defined_gammas(steps)
    assert f"of {_defined_gammas(kept)} defined steps" in premise.numbers
    assert f"of {len(kept)} steps" in item1.numbers


# ------------------------------------------------------------------------------ item 8
def _own_loop_run(path, lr):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)  # learnable: the loss falls

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def build():
        model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
        return model, torch.optim.Adam(model.parameters(), lr=lr)

    def loop(model, opt, probe):
        for _ in range(3):
            for idx in torch.randperm(96).split(16):
                opt.zero_grad()
                loss = loss_fn(model, (x[idx], y[idx]))
                loss.backward()
                probe.batch((x[idx], y[idx]), loss)
                opt.step()
            probe.end_epoch()

    return save_run(TwoPass(build, loop, loss_fn=loss_fn, seed=0, threads=1).run(), path)


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    runs = [_own_loop_run(root / f"own{i}", lr) for i, lr in enumerate((0.02, 0.03, 0.04))]
    for run in runs:  # what the test relies on
        assert run.meta.source == OWN_LOOP and "train_loss" not in run.epochs()
        assert run.summary()["no_progress"] is False
    return [run.path for run in runs]


def test_own_loop_runs_show_their_mean_batch_loss_labelled(own_runs, tmp_path):
    report(own_runs, tmp_path / "r")
    md = md_unescape((tmp_path / "r" / "summary.md").read_text())
    rows = {r["run"]: r for r in md_table(md, "## Runs")}
    finals = {}
    for path in own_runs:
        run = load_run(path)
        final = float(run.epochs()["mean_batch_loss"].iloc[-1])
        finals[run.name] = final
        assert rows[run.name]["final train loss"] == f"{fmt(final)} (mean batch loss of the last epoch)"
    section = md[md.index("## What these numbers can and cannot say"):md.index("## Ordering")]
    assert "fewer than two runs trained" not in section
    lo, hi = min(finals, key=finals.get), max(finals, key=finals.get)
    assert (f"Comparability across runs: the final train losses of the runs that trained are within "
            f"{finals[hi] / finals[lo]:.3g}× of each other ({lo} {fmt(finals[lo])} (mean batch loss of the last "
            f"epoch), {hi} {fmt(finals[hi])} (mean batch loss of the last epoch)") in section
    ordering = md_table(md, "## Ordering")
    assert len(ordering) == 3
    assert all("(mean batch loss of the last epoch)" in r["by convergence (lowest final train loss first)"]
               for r in ordering)
    assert "full training loss per epoch" not in md and "mean batch loss where no full" in md


def test_comparability_counts_the_runs_that_trained(own_runs):
    entries = collect(own_runs[:1])
    md = md_unescape(gammatrace.reporting.document.to_markdown(gammatrace.reporting.content.caveats(entries)))
    assert "Comparability across runs: 1 of the 1 run(s) that finished training may be compared" in md


def test_loss_row_says_which_loss_it_draws(own_runs, engine_run):
    own, eng = collect(own_runs[:1]), collect([engine_run])

    def title(entries):
        ax = Figure().subplots()
        loss_row(ax, [_Line(e.label, [e], "k", False) for e in entries])
        return ax.get_title(), ax.get_ylabel()

    assert title(own) == ("mean batch loss over each epoch (no full training loss measured)", "mean batch loss")
    assert title(eng) == ("full training loss after each epoch", "training loss")
    assert title(eng + own) == (f"full training loss after each epoch; mean batch loss over the epoch for "
                                f"{own[0].label}", "training loss")
