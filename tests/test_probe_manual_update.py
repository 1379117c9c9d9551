"""Loops without an optimizer object: the step marked by ``with probe.update(lr=η)``.

The stand-in is an LSTM language model trained with truncated BPTT (the hidden state carried
from one chunk to the next, detached) and a hand-written SGD update after clipping, as in
PyTorch's word-language-model example. Against a brute-force oracle that stores every θ_k
in float64 and recomputes every column; probing leaves the trajectory bitwise unchanged; and
a manual SGD update under ``probe.update(lr)`` gives the step table of ``torch.optim.SGD``.
"""

from __future__ import annotations

import contextlib
import copy

import pandas as pd
import pytest
import torch
from torch import nn

import gammatrace
from gammatrace.errors import UserError
from gammatrace.probe import ProbeUsageError
from tests.test_probe_oracle import _compare, flat

VOCAB, BPTT, COLUMNS, CLIP = 11, 5, 4, 0.2


class TinyLSTM(nn.Module):
    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.lstm = nn.LSTM(6, 8)
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(8, VOCAB)

    def forward(self, x, hidden):
        out, hidden = self.lstm(self.drop(self.embed(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def loss_fn(model, batch):
    x, y, h, c = batch
    logits, _ = model(x, (h, c))
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def _model(dropout: float = 0.2) -> TinyLSTM:
    torch.manual_seed(0)
    return TinyLSTM(dropout)


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (6 * BPTT + 1, COLUMNS), generator=g)  # (time, columns)


class Oracle:
    """Stores everything the brute force needs: θ_k, the raw and the used gradient, the loss,
    η_k, the batch and the RNG state of each step's forward."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.thetas, self.grads, self.used, self.losses, self.lrs, self.batches, self.rng = [], [], [], [], [], [], []
        self._raw: dict = {}
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda q: self._raw.__setitem__(id(q), q.grad.detach().clone()))

    def forward(self) -> None:
        self.rng.append(torch.get_rng_state())

    def before_update(self, loss, batch, lr) -> None:
        self.thetas.append(flat(self.params))
        self.grads.append(flat([self._raw.get(id(p), torch.zeros_like(p)) for p in self.params]))
        self.used.append(flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]))
        self._raw = {}
        self.losses.append(float(loss.detach()))
        self.lrs.append(lr)
        self.batches.append(tuple(t.clone() for t in batch))

    def columns(self, model: nn.Module, theta_T: torch.Tensor, ref_state: dict) -> pd.DataFrame:
        ref_model = copy.deepcopy(model)
        ref_model.load_state_dict(ref_state)
        ref_model.train()
        theta_star = flat([ref_state[n] for n, p in model.named_parameters() if p.requires_grad])
        thetas = [*self.thetas, theta_T]
        rows = []
        for k, batch in enumerate(self.batches):
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.rng[k])  # the training forward's dropout masks
                loss_ref = float(loss_fn(ref_model, batch))
            e, delta = thetas[k] - theta_star, thetas[k] - thetas[k + 1]
            e_next = thetas[k + 1] - theta_star
            g, u = self.grads[k], self.used[k]
            rows.append({
                "loss": self.losses[k], "loss_ref": loss_ref, "lr": self.lrs[k],
                "progress": float(e @ delta - 0.5 * delta @ delta),
                "progress_identity": 0.5 * (float(e @ e) - float(e_next @ e_next)),
                "dist_sq": float(e @ e), "update_sq": float(delta @ delta),
                "grad_dot": float(e @ g), "grad_sq": float(g @ g),
                "grad_dot_used": float(e @ u), "grad_sq_used": float(u @ u),
            })
        return pd.DataFrame(rows)


def lstm_script(model, data, *, probe=None, oracle=None, optimizer=None, lr=2.0, epochs=2):
    """The stand-in training script: truncated BPTT, clipping, a manual SGD update (or, with
    ``optimizer``, ``optimizer.step()`` in its place), lr annealed after the first epoch."""
    for _epoch in range(epochs):
        hidden = (torch.zeros(1, COLUMNS, 8), torch.zeros(1, COLUMNS, 8))
        for i in range(0, data.size(0) - 1, BPTT):
            x, y = data[i:i + BPTT], data[i + 1:i + 1 + BPTT]
            hidden = tuple(h.detach() for h in hidden)  # truncated BPTT
            batch = (x, y, *hidden)
            model.zero_grad()
            if oracle is not None:
                oracle.forward()
            logits, hidden = model(x, hidden)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            if probe is not None:
                probe.batch(batch, loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if oracle is not None:
                oracle.before_update(loss, batch, lr)
            if optimizer is not None:
                optimizer.step()
                continue
            with probe.update(lr=lr) if probe is not None else contextlib.nullcontext():
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-lr)
        lr /= 4.0
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if probe is not None:
            probe.end_epoch()
    return model


@pytest.mark.parametrize("kernel", ["fused", "torch"])
def test_manual_update_matches_brute_force_and_leaves_the_trajectory_alone(kernel):
    data = _data()
    # The plain script, with the oracle storing every iterate (it only reads).
    plain = _model()
    oracle = Oracle(plain)
    lstm_script(plain, data, oracle=oracle)
    theta_T = flat([p for p in plain.parameters() if p.requires_grad])
    ref_state = {k: v.clone() for k, v in plain.state_dict().items()}
    # The same script, probed in reference mode (θ* = θ_T).
    model = _model()
    probe = gammatrace.Probe(model, None, loss_fn=loss_fn, reference=ref_state, kernel=kernel)
    lstm_script(model, data, probe=probe)
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # bitwise: probing does not change the trajectory
    steps = probe.steps()
    assert steps["step"].tolist() == list(range(12))
    assert steps["epoch"].tolist() == [0] * 6 + [1] * 6
    assert steps["lr"].tolist() == [2.0] * 6 + [0.5] * 6  # η_k as given to probe.update
    expected = oracle.columns(plain, theta_T, ref_state)
    _compare(steps, expected)  # ≤ 1e-10 relative for the inner products, 1e-12 for the norms
    # Clipping bites: the raw gradient is not the one the update used.
    assert (steps["grad_sq"] > steps["grad_sq_used"] * (1 + 1e-6)).any()
    assert probe.skipped().empty


def test_manual_sgd_gives_the_step_table_of_torch_optim_sgd():
    """Bitwise equal: torch.optim.SGD without momentum or weight decay steps each tensor with
    ``param.add_(grad, alpha=-lr)`` (its CPU foreach path is that loop), the very update the
    script writes, so both runs visit the same θ_k bit for bit; the probe reads the same
    gradients with the same kernel in the same order, so every column comes out identical."""
    data = _data()
    ref_state = {k: v.clone() for k, v in lstm_script(_model(), data).state_dict().items()}

    manual = _model()
    probe_manual = gammatrace.Probe(manual, None, loss_fn=loss_fn, reference=ref_state)
    lstm_script(manual, data, probe=probe_manual)

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    probe_opt = gammatrace.Probe(model, opt, loss_fn=loss_fn, reference=ref_state)
    lstm_script(model, data, probe=probe_opt, optimizer=opt)

    for a, b in zip(manual.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The weight decay folded into g_k (grad_*_wd, rsi_wd, eb_wd) needs the optimizer's λ: unknown
    # to a probe without an optimizer (NaN), 0 for this SGD (equal to the raw columns).
    folded = ["grad_dot_wd", "grad_sq_wd", "rsi_wd", "eb_wd"]
    manual_steps, opt_steps = probe_manual.steps(), probe_opt.steps()
    assert manual_steps[folded].isna().all().all()
    assert opt_steps["grad_dot_wd"].equals(opt_steps["grad_dot"]) and opt_steps["rsi_wd"].equals(opt_steps["rsi"])
    pd.testing.assert_frame_equal(manual_steps.drop(columns=folded), opt_steps.drop(columns=folded), check_exact=True)
    pd.testing.assert_frame_equal(probe_manual.tensor_steps(), probe_opt.tensor_steps(), check_exact=True)


def _one_batch(model):
    model.zero_grad()
    x = torch.ones(2, 3)
    loss = model(x).pow(2).mean()
    loss.backward()
    return x, loss


def test_manual_update_usage_errors():
    model = nn.Linear(3, 1)
    probe = gammatrace.Probe(model, None)
    # No probe.batch before the block.
    with pytest.raises(ProbeUsageError, match="no probe.batch since the last update"):
        with probe.update(lr=0.1):
            pass
    # probe.step needs an optimizer.
    x, loss = _one_batch(model)
    with pytest.raises(ProbeUsageError, match=r"Probe\(model, None\)"):
        probe.step(loss, x)
    # probe.batch inside the block.
    probe.batch(x, loss)
    with pytest.raises(ProbeUsageError, match="inside `with probe.update"):
        with probe.update(lr=0.1):
            probe.batch(x, loss)
    # A block that raises is no step; the exception is the user's.
    x, loss = _one_batch(model)
    probe.batch(x, loss)
    with pytest.raises(KeyError):
        with probe.update(lr=0.1):
            raise KeyError("user")
    assert probe.steps().empty
    # Stepping without the block: the gradients reset with no update marked between.
    x, loss = _one_batch(model)
    probe.batch(x, loss)
    with torch.no_grad():
        model.weight.sub_(0.1 * model.weight.grad)  # an unmarked update
    x, loss = _one_batch(model)
    with pytest.raises(ProbeUsageError, match="no `with probe.update"):
        probe.batch(x, loss)
    # The last batch is still pending: marking its update now works.
    with probe.update(lr=0.1), torch.no_grad():
        model.weight.sub_(0.1 * model.weight.grad)
    assert probe.steps()["step"].tolist() == [0]
    # probe.update with an optimizer attached.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with_opt = gammatrace.Probe(model, opt)
    with pytest.raises(ProbeUsageError, match="SGD already"):
        with with_opt.update(lr=0.1):
            pass
    assert issubclass(ProbeUsageError, UserError)


def test_manual_update_record_mode_and_close():
    model = nn.Linear(3, 1)
    probe = gammatrace.Probe(model, None)
    thetas = [flat(model.parameters())]
    for _ in range(3):
        x, loss = _one_batch(model)
        probe.batch(x, loss)
        with probe.update(lr=0.05), torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.05)
        thetas.append(flat(model.parameters()))
    steps = probe.steps()
    assert steps["step"].tolist() == [0, 1, 2]
    for k in range(3):
        delta, e = thetas[k] - thetas[k + 1], thetas[k] - thetas[0]
        assert steps["update_sq"][k] == pytest.approx(float(delta @ delta), rel=1e-12)
        assert steps["dist0_sq"][k] == pytest.approx(float(e @ e), rel=1e-12, abs=0)
    probe.close()  # no optimizer to detach from
    _one_batch(model)  # unmeasured, allowed
