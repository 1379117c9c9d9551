"""RSI and EB of "No Wrong Turns" (issue 24, item 3), with the optimizer's weight decay folded in.

Their ``get_norm_dot_prod`` on the flattened parameters gives ⟨θ − x*, g⟩, ‖g‖ and ‖θ − x*‖;
with weight decay their code folds it into the gradient, g + λθ. The brute force stores θ_k and
the raw g_k of a real trainer run (tests/test_probe_oracle's Recorder) and computes both, the
slow obvious way in float64; the analysis' derived columns must agree to round-off. Coupled
decay (SGD, momentum, Adam's L2) folds; decoupled decay (AdamW) is undefined (NaN); without
decay the folded columns are the raw ones, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gammatrace
from gammatrace.probe.decay import WeightDecayFold, decay_of
from tests.test_probe_oracle import _brute, _config, flat


def nwt(rec, theta_star: torch.Tensor, lam: float) -> dict[str, np.ndarray]:
    """"No Wrong Turns"' quantities per step from the stored iterates: RSI and EB of g_k and of
    g_k + λθ_k (get_norm_dot_prod: ⟨θ − x*, g⟩, ‖g‖, ‖θ − x*‖), and their ratio."""
    out: dict[str, list[float]] = {k: [] for k in ("rsi", "eb", "rsi_wd", "eb_wd", "rsi_eb")}
    for theta, g in zip(rec.thetas, rec.grads, strict=True):
        e = theta - theta_star
        dist = float(torch.linalg.vector_norm(e))
        folded = g + lam * theta
        out["rsi"].append(float(e @ g) / dist**2)
        out["eb"].append(float(torch.linalg.vector_norm(g)) / dist)
        out["rsi_wd"].append(float(e @ folded) / dist**2)
        out["eb_wd"].append(float(torch.linalg.vector_norm(folded)) / dist)
        out["rsi_eb"].append(float(e @ g) / (float(torch.linalg.vector_norm(g)) * dist))
    return {k: np.array(v) for k, v in out.items()}


COUPLED = [
    {"name": "sgd", "lr": 0.2, "weight_decay": 0.05},
    {"name": "momentum", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.05},
    {"name": "adam", "lr": 0.01, "weight_decay": 0.05},
]


@pytest.mark.parametrize("optim", COUPLED, ids=[o["name"] for o in COUPLED])
def test_folded_rsi_eb_equal_no_wrong_turns_on_a_real_run(tmp_path, optim):
    cfg = _config(optim, batchnorm=True)
    rec, sess, theta_T = _brute(cfg)
    run = gammatrace.train(cfg, out=tmp_path / "run", progress=False)
    final = torch.load(run.path / "final.pt", weights_only=True)["model"]
    assert torch.equal(flat([final[n] for n, p in sess.model.named_parameters() if p.requires_grad]), theta_T)
    steps = run.steps("last")
    expected = nwt(rec, theta_T, optim["weight_decay"])
    assert len(steps) == len(expected["rsi"]) == 9
    # The decay changes the numbers (a test that could not tell them apart would prove nothing).
    assert np.all(np.abs(expected["rsi_wd"] - expected["rsi"]) > 1e-6 * np.abs(expected["rsi"]))
    for col in ("rsi", "rsi_wd", "rsi_eb"):
        # ⟨θ − x*, g⟩ can be small against its terms: float64 round-off of the products, over d².
        scale = float(np.max(np.abs(expected[col])))
        np.testing.assert_allclose(steps[col], expected[col], rtol=1e-9, atol=1e-12 * scale, err_msg=col)
    for col in ("eb", "eb_wd"):
        np.testing.assert_allclose(steps[col], expected[col], rtol=1e-9, err_msg=col)


def test_without_decay_the_folded_columns_are_the_raw_ones(tmp_path):
    cfg = _config({"name": "sgd", "lr": 0.2}, batchnorm=False)
    steps = gammatrace.train(cfg, out=tmp_path / "run", progress=False).steps("last")
    assert steps["grad_dot_wd"].equals(steps["grad_dot"]) and steps["grad_sq_wd"].equals(steps["grad_sq"])
    assert steps["rsi_wd"].equals(steps["rsi"]) and steps["eb_wd"].equals(steps["eb"])


def test_decoupled_decay_is_not_folded(tmp_path):
    cfg = _config({"name": "adamw", "lr": 0.01, "weight_decay": 0.05}, batchnorm=False)
    steps = gammatrace.train(cfg, out=tmp_path / "run", progress=False).steps("last")
    assert steps["rsi_wd"].isna().all() and steps["eb_wd"].isna().all()
    assert steps["rsi"].notna().all()  # the raw ones are measured as ever


def test_probe_in_a_user_loop_folds_each_groups_own_decay():
    """Per-group decay (none on the bias, as users often set it) against the brute force."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    decayed = [p for n, p in model.named_parameters() if n.endswith("weight")]
    plain = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": 0.3}, {"params": plain}], lr=0.05)
    theta_star = {k: v + 0.1 for k, v in model.state_dict().items()}
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    probe = gammatrace.Probe(model, opt, loss_fn, reference=theta_star)
    params = [p for p in model.parameters()]
    lams = torch.cat([torch.full((p.numel(),), 0.3 if any(p is q for q in decayed) else 0.0, dtype=torch.float64)
                      for p in params])
    star = flat([theta_star[n] for n, _ in model.named_parameters()])
    expected = []
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model, (x, y))
        loss.backward()
        theta, g = flat(params), flat([p.grad for p in params])
        folded = g + lams * theta
        expected.append((float((theta - star) @ folded), float(folded @ folded)))
        probe.batch((x, y), loss)
        opt.step()
    steps = probe.steps()
    np.testing.assert_allclose(steps["grad_dot_wd"], [a for a, _ in expected], rtol=1e-10)
    np.testing.assert_allclose(steps["grad_sq_wd"], [b for _, b in expected], rtol=1e-10)
    assert decay_of(opt, params) == [0.3, 0.0, 0.3, 0.0]
    assert math.isnan(decay_of(torch.optim.Adam(params, weight_decay=0.1, decoupled_weight_decay=True), params)[0])
    assert math.isnan(decay_of(torch.optim.AdamW(params, weight_decay=0.1), params)[0])
    assert not WeightDecayFold.needed(torch.optim.SGD(params, lr=0.1)) and not WeightDecayFold.needed(None)
