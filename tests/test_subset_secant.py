"""RSI and EB over the evaluation subset at epoch ends (issue 24, item 3's full-batch versions)
against the slow obvious way: θ_k stored by a hook at every step, θ* = θ_T from final.pt, the
gradient of the mean loss over the subset by plain autograd on a fresh copy, "No Wrong Turns"'
definitions (⟨θ − x*, G⟩ / ‖θ − x*‖², ‖G‖ / ‖θ − x*‖) with coupled decay folded (G + λθ)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from gammatrace.analysis import analyze, load_hook_table
from gammatrace.engine.hooks import evaluation_subset
from gammatrace.engine.replay import replay
from gammatrace.engine.session import build_session
from gammatrace.engine.trainer import train_pass
from gammatrace.reporting.collect import collect
from gammatrace.reporting.survey import _subset_ratio, rsi_eb_figure
from tests.conftest import tiny_config
from tests.oracle import ParameterHook


def _config(optim: dict, subset: int) -> dict:
    """Three epochs of a float64 MLP on a 48-sample teacher, 3 steps per epoch."""
    return tiny_config(**{"loss": "mse", "batch_size": 16, "dtype": "float64", "epochs": 3,
                          "data": {"name": "teacher", "num_train": 48, "num_test": 8, "dim": 3, "out_dim": 2,
                                   "n_train": None, "n_test": None},
                          "model": {"name": "mlp", "width": 4, "depth": 1},
                          "optim": optim,
                          "curvature": {"every": 100, "k": 1, "subset": subset, "at_epoch_end": False}})


def _expected(run, subset: int, lam: float) -> dict[int, dict[str, float]]:
    sess = build_session(run.config)
    idx = evaluation_subset(len(sess.x), subset, run.config.seed)
    x, y = sess.x[idx], sess.y[idx]
    final = torch.load(run.path / "final.pt", weights_only=True)["model"]
    names = [n for n, p in sess.model.named_parameters() if p.requires_grad]
    star = torch.cat([final[n].reshape(-1).double() for n in names])
    thetas = run.store.read_shards("analysis/last/params").set_index("step").drop(columns="epoch")
    out = {}
    for k in thetas.index:
        theta = torch.tensor(thetas.loc[k].to_numpy(np.float64))
        twin = copy.deepcopy(sess.model)
        params = [p for p in twin.parameters() if p.requires_grad]
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, params)
        loss = ((twin(x) - y) ** 2).mean(dim=1).mean()
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).double()
        e, folded = theta - star, g + lam * theta
        d = float(e.norm())
        out[int(k)] = {"loss": float(loss.detach()), "rsi": float(e @ g) / d**2, "eb": float(g.norm()) / d,
                       "rsi_wd": float(e @ folded) / d**2, "eb_wd": float(folded.norm()) / d}
    return out


def test_subset_rsi_eb_at_epoch_ends_equal_no_wrong_turns_with_decay_folded(tmp_path):
    lam = 0.05
    run = train_pass(_config({"name": "momentum", "lr": 0.05, "momentum": 0.9, "weight_decay": lam}, subset=32),
                     tmp_path / "run", progress=False)
    replay(run.path, "last", hooks=(ParameterHook,), progress=False)
    analyze(run.path, progress=False)
    table = load_hook_table(run, "subset_secant")
    assert table["step"].tolist() == [2, 5, 8]  # the last step of each of the 3 epochs
    assert set(table["samples"]) == {32} and not table["full_batch"].any()
    expected = _expected(run, 32, lam)
    for _, row in table.iterrows():
        want = expected[int(row["step"])]
        assert abs(want["rsi_wd"] - want["rsi"]) > 1e-6 * abs(want["rsi"])  # the decay shows
        for col in ("loss", "rsi", "eb", "rsi_wd", "eb_wd"):
            np.testing.assert_allclose(row[col], want[col], rtol=1e-9, err_msg=f"{col} at step {row['step']}")
    # The report reads the table as stored: its ratio ⟨G, θ_k − θ*⟩ / (‖G‖ d_k) = RSI/EB per epoch,
    # drawn as circles beside the step table's RSI_k/EB_k; a claim window cuts it like the steps.
    entry = collect([run.path])[0]
    ratio = _subset_ratio(entry)
    assert ratio.index.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ratio.to_numpy(), [expected[k]["rsi"] / expected[k]["eb"] for k in (2, 5, 8)],
                               rtol=1e-9)
    assert entry.first_epochs(2).secant["epoch"].tolist() == [0, 1]
    notes: list[str] = []
    assert rsi_eb_figure({"momentum": [entry]}, tmp_path, notes) is not None and not notes


def test_the_whole_training_set_is_said_full_batch_and_decoupled_decay_is_not_folded(tmp_path):
    run = train_pass(_config({"name": "adamw", "lr": 0.01, "weight_decay": 0.05}, subset=10_000),
                     tmp_path / "run", progress=False)
    analyze(run.path, progress=False)
    table = load_hook_table(run, "subset_secant")
    assert set(table["samples"]) == {48} and table["full_batch"].all()
    assert table["rsi_wd"].isna().all() and table["eb_wd"].isna().all() and table["rsi"].notna().all()
