"""Gradient collapse without BN (issue 13, item 5): the gradient-norm series, its collapse,
its row in the study figure, and claims stated over the first epochs.

Paper 002 cuts its no-BN ResNet curves "up to the epoch when gradient vanishes" and states
its CIFAR-100 batch-norm order "in the first 20 epochs". The per-epoch gradient norms are
checked against a loop over the steps, the collapse rule on hand-made series and on a real
run whose gradients vanish (a zero-initialised ReLU MLP: only the output bias learns, the
loss stays at the class prior's entropy), the figure against the stored steps, and the
windowed claim against statistics computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from gammatrace import principles as P
from gammatrace import train
from gammatrace.principles.claims import RunPoint, check_claim
from gammatrace.reporting import figures as F
from gammatrace.reporting.collect import collect, example_entry
from gammatrace.reporting.study import check_study_claim, claim_blocks, runs_table, study_runs
from gammatrace.store.study import Claim, StudyMeta


# ------------------------------------------------------------------------ the series
def test_grad_norm_per_epoch_equals_a_loop_over_the_steps():
    rng = np.random.default_rng(0)
    epochs = np.repeat(np.arange(5), [3, 4, 1, 5, 2])
    grad_sq = rng.lognormal(0.0, 2.0, len(epochs))
    grad_sq[[2, 9]] = [np.nan, np.inf]  # undefined steps are not values
    steps = pd.DataFrame({"step": np.arange(len(epochs)), "epoch": epochs, "grad_sq": grad_sq,
                          "loss": rng.random(len(epochs))})
    table = P.grad_norm_per_epoch(steps)
    for e in range(5):
        norms = [math.sqrt(g) for g, ep in zip(grad_sq, epochs, strict=True) if ep == e and math.isfinite(g)]
        norms.sort()
        mid = len(norms) // 2
        median = norms[mid] if len(norms) % 2 else (norms[mid - 1] + norms[mid]) / 2
        assert table.loc[e, "median"] == pytest.approx(median, rel=1e-15)
        assert table.loc[e, "min"] == min(norms) and table.loc[e, "max"] == max(norms)
        assert table.loc[e, "n_steps"] == (epochs == e).sum()


def test_collapse_is_a_vanishing_gradient_at_a_high_loss():
    def table(norms, losses):
        return pd.DataFrame({"step": range(len(norms)), "epoch": range(len(norms)),
                             "grad_sq": np.square(norms), "loss": losses})

    # The peak comes after the start: the ratio is to the largest median so far.
    assert P.gradient_collapse(table([0.1, 2.0, 0.01, 0.0015, 1e-4], [2.3] * 5)) == 3
    # Convergence: the gradient falls because the loss does.
    assert P.gradient_collapse(table([1.0, 1e-2, 1e-5], [2.0, 0.05, 1e-5])) is None
    # Exactly at the ratio counts; just above it does not.
    assert P.gradient_collapse(table([1.0, 1e-3], [1.0, 1.0])) == 1
    assert P.gradient_collapse(table([1.0, 1.001e-3], [1.0, 1.0])) is None
    # An epoch without a defined norm is skipped, not a collapse.
    assert P.gradient_collapse(table([1.0, np.nan, 0.5], [1.0, 1.0, 1.0])) is None
    # Thresholds are the caller's to set.
    assert P.gradient_collapse(table([1.0, 0.05], [1.0, 1.0]), ratio=0.1) == 1
    assert P.gradient_collapse(table([1.0, 1e-4], [1.0, 0.05]), loss_fraction=0.01) == 1
    with pytest.raises(ValueError, match="ratio"):
        P.gradient_collapse(table([1.0], [1.0]), ratio=0.0)
    # No recorded gradient: nothing to say.
    assert P.gradient_collapse(pd.DataFrame({"step": [0], "epoch": [0], "loss": [1.0]})) is None


# --------------------------------------------------------------------- a real collapse
@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    """A run whose gradients vanish at a high loss, and one that trains, as two cells."""
    root = tmp_path_factory.mktemp("collapse")
    base = {"epochs": 24, "batch_size": 128, "data": {"name": "digits", "n_train": 128, "n_test": 64},
            "optim": {"name": "sgd", "lr": 5.0}}
    # Zero init: every hidden unit outputs relu(0) = 0 with zero gradient, so only the
    # output bias learns; full-batch steps shrink its gradient geometrically while the
    # loss stays at the entropy of the class prior.
    dead = train({**base, "seed": 0, "name": "dead", "model": {"name": "mlp", "width": 8, "depth": 2, "init": "zero"}},
                 out=root / "dead", progress=False)
    alive = train({**base, "seed": 0, "name": "alive", "epochs": 6, "optim": {"name": "sgd", "lr": 0.2},
                   "model": {"name": "mlp", "width": 8, "depth": 2}}, out=root / "alive", progress=False)
    entries = collect([dead.path, alive.path])
    steps = entries[0].steps.sort_values("step")
    epoch = P.gradient_collapse(steps)
    # The fixture must hold what the tests rely on.
    assert epoch is not None and 10 <= epoch < 24, epoch
    assert steps["loss"].iloc[-1] > 2.0 and entries[1].gradient_collapse is None
    return entries, epoch


def test_real_run_collapses_and_the_probe_recorded_the_raw_gradient(collapsed):
    entries, epoch = collapsed
    dead = entries[0]
    assert dead.gradient_collapse == epoch
    # Before the collapse epoch no epoch qualifies, by the rule's own definition checked by hand.
    med = P.grad_norm_per_epoch(dead.steps)["median"]
    loss = dead.steps.groupby("epoch")["loss"].mean()
    first = next(e for e in med.index if med[e] <= 1e-3 * med[:e].max() and loss[e] >= 0.1 * loss.iloc[0]
                 and e > 0)
    assert first == epoch


def test_gradient_row_draws_the_stored_norms_and_marks_the_collapse(collapsed, tmp_path, monkeypatch):
    entries, epoch = collapsed
    drawn = {}

    def keep(fig, out, stem):
        drawn["fig"] = fig
        return out / f"{stem}.png"

    monkeypatch.setattr(F, "save_figure", keep)
    notes: list[str] = []
    F.trajectory_figure(entries, tmp_path, notes)
    [ax_g] = [ax for ax in drawn["fig"].axes if "gradient norm" in ax.get_title()]
    assert ax_g.get_yscale() == "log"
    curves = [line for line in ax_g.lines if line.get_gid() is None]
    assert len(curves) == 2
    for line, e in zip(curves, entries, strict=True):
        expected = P.grad_norm_per_epoch(e.steps.sort_values("step"))["median"]
        np.testing.assert_array_equal(line.get_xdata(), expected.index.to_numpy() + 0.5)
        np.testing.assert_array_equal(line.get_ydata(), expected.to_numpy())
    [marker] = [line for line in ax_g.lines if line.get_gid() == "collapse"]
    assert marker.get_xdata()[0] == epoch + 0.5
    assert marker.get_ydata()[0] == P.grad_norm_per_epoch(entries[0].steps)["median"][epoch]
    [vline] = [line for line in ax_g.lines if line.get_gid() == "collapse-epoch"]
    assert list(vline.get_xdata()) == [epoch + 0.5] * 2
    assert any(n.startswith(f"{entries[0].label}: gradient collapse at epoch {epoch}") for n in notes)
    assert "gradient collapse" in [t.get_text() for t in ax_g.get_legend().get_texts()]
    # Without a collapse the legend does not promise one.
    F.trajectory_figure(entries[1:], tmp_path, [])
    [ax_g] = [ax for ax in drawn["fig"].axes if "gradient norm" in ax.get_title()]
    assert [t.get_text() for t in ax_g.get_legend().get_texts()] == ["median ‖g_k‖"]


def test_runs_table_flags_the_collapse(collapsed):
    entries, epoch = collapsed
    meta = StudyMeta(study="s", runs={e.run.path.name: e.label for e in entries})
    [table, _] = runs_table(study_runs(meta, entries, []))
    flags = {row[0]: row[3] for row in table.rows}
    assert f"gradient collapse at epoch {epoch}" in flags["dead"]
    assert "gradient collapse" not in flags["alive"]


# ------------------------------------------------------------------ windowed claims
def _entry(label: str, gammas: list[float], epochs: list[int], losses: list[float], target=None) -> object:
    e = example_entry(label, losses=losses, target_loss=target)
    e.steps = pd.DataFrame({"step": range(len(gammas)), "epoch": epochs, "gamma": gammas,
                            "gamma_rp": gammas})
    e.summary = {**e.summary, "gamma_median": float(np.median(gammas)), "tail": 0}
    return e


def test_claim_over_the_first_epochs_uses_only_their_steps():
    # Two epochs of two steps each, then a late epoch that reverses the order: a claim over the
    # first two epochs holds, over the whole run it does not.
    runs = []
    for cell, early, late in (("all", 5.0, 0.1), ("none", 1.0, 9.0)):
        for seed in range(4):
            gammas = [early + 0.1 * seed] * 4 + [late + 0.1 * seed] * 4
            runs.append(_entry(f"{cell}-s{seed}", gammas, [0, 0, 1, 1, 2, 2, 3, 3], [1.0, 0.5, 0.3, 0.2]))
    meta = StudyMeta(study="bn", runs={e.run.path.name: e.label.split("-")[0] for e in runs})
    srs = study_runs(meta, runs, [])
    whole = check_study_claim(Claim("all first", "all > none"), srs)
    window = check_study_claim(Claim("all first", "all > none", first_epochs=2), srs)
    assert whole.results["median", "last"].verdict == "not consistent"
    res = window.results["median", "last"]
    assert res.verdict == "consistent"
    # The same test on statistics computed by hand from the first two epochs' steps.
    points = [RunPoint(e.label, e.label.split("-")[0], float(np.median(e.steps["gamma"][:4])), math.nan)
              for e in runs]
    brute = check_claim("all > none", points)
    assert res.p_value == brute.p_value and res.trend.statistic == brute.trend.statistic
    assert [t.p_value for t in res.relations] == [t.p_value for t in brute.relations]
    text = " ".join(b.text for b in claim_blocks(window) if hasattr(b, "text"))
    assert "Stated over the first 2 epochs" in text


def test_windowed_claim_keeps_runs_that_missed_the_target_but_not_incomparable_end_points():
    def runs(final_none: float):
        out = []
        for cell, g, final in (("all", 5.0, 0.1), ("none", 1.0, final_none)):
            for seed in range(4):
                out.append(_entry(f"{cell}-s{seed}", [g + 0.1 * seed] * 4, [0, 0, 1, 1], [1.0, final],
                                  target=0.15))
        return out

    def meta(rs):
        return StudyMeta(study="bn", runs={e.run.path.name: e.label.split("-")[0] for e in rs})

    # 'none' misses the target (0.18 > 0.15) but ends within 2× of 'all': the windowed claim decides,
    # the whole-run claim excludes it.
    rs = runs(0.18)
    srs = study_runs(meta(rs), rs, [])
    assert check_study_claim(Claim("t", "all > none", first_epochs=1), srs).results["median", "last"].verdict \
        == "consistent"
    whole = check_study_claim(Claim("t", "all > none"), srs).results["median", "last"]
    assert whole.verdict == "inconclusive" and "missed the target" in " ".join(whole.excluded.values())
    # Ends 8× apart: θ* are not comparable end points, window or not.
    rs = runs(0.8)
    res = check_study_claim(Claim("t", "all > none", first_epochs=1), study_runs(meta(rs), rs, [])).results[
        "median", "last"]
    assert res.verdict == "inconclusive" and "differ by 8×" in res.reason


def test_first_epochs_round_trips_through_study_json_and_specs(tmp_path):
    from gammatrace.experiments.study import ClaimSpec, GridSpec, GroupSpec

    spec = GridSpec(name="bn", base={"data": {"name": "digits"}},
                    variants={"all": {"model": {"norm": "all"}}, "none": {"model": {"norm": "none"}}},
                    groups={"g": GroupSpec(claims=[ClaimSpec(text="t", order="all > none", first_epochs=20)])})
    study = spec.build()
    meta = study.meta(1)
    meta.write(tmp_path)
    assert StudyMeta.load(tmp_path / "study.json").claims[0].first_epochs == 20
    with pytest.raises(ValueError):
        Claim("t", "a > b", first_epochs=0)


def _two_cells(n_epochs: int = 4) -> list:
    runs = []
    for cell, g in (("all", 5.0), ("none", 1.0)):
        for seed in range(4):
            epochs = [e for e in range(n_epochs) for _ in range(2)]
            runs.append(_entry(f"{cell}-s{seed}", [g + 0.1 * seed] * len(epochs), epochs,
                               [1.0 / (e + 1) for e in range(n_epochs)]))
    return runs


def _text(blocks) -> str:
    return " ".join(b.text for b in blocks if hasattr(b, "text"))


def test_verdict_falls_back_to_theta_T_and_says_so_when_no_run_has_a_continuation():
    runs = _two_cells()
    meta = StudyMeta(study="bn", runs={e.run.path.name: e.label.split("-")[0] for e in runs})
    check = check_study_claim(Claim("all first", "all > none"), study_runs(meta, runs, []))
    assert check.verdict_ref == "last" and check.verdict is check.results["median", "last"]
    assert check.verdict.verdict == "consistent"
    blocks = claim_blocks(check)
    assert "No run of this claim has a continuation analysis" in _text(blocks)
    verdicts = next(b for b in blocks if getattr(b, "header", [None])[0] == "statistic")
    marked = [row for row in verdicts.rows if row[0].endswith("the verdict")]
    assert len(marked) == 1 and marked[0][1].startswith("θ* = θ_T")


def test_window_longer_than_every_run_says_it_covers_whole_runs():
    runs = _two_cells(n_epochs=4)
    meta = StudyMeta(study="bn", runs={e.run.path.name: e.label.split("-")[0] for e in runs})
    for e in runs:
        e.summary["epochs"] = 4
    long = claim_blocks(check_study_claim(Claim("t", "all > none", first_epochs=10), study_runs(meta, runs, [])))
    assert "cover every run whole (none is longer than 10 epochs)" in _text(long)
    assert "epochs 0 … 9" not in _text(long)
    # A hypothesis (no source) is not said to be "the paper's".
    assert "the paper states it" not in _text(long)
    short = claim_blocks(check_study_claim(Claim("t", "all > none", source="p: “q”", first_epochs=2),
                                           study_runs(meta, runs, [])))
    assert "epochs 0 … 1 only" in _text(short) and "the paper states it" in _text(short)
