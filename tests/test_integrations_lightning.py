"""The Lightning integration (gammatrace.integrations.lightning).

Lightning's three traps — the loss divided by ``accumulate_grad_batches``, the step's
closure with clipping inside it, precision plugins — are each exercised on a small model
with dropout (its training_step calls a submodule, not ``self(...)``): a plain loop is
shown to reproduce ``Trainer.fit`` bit for bit, the probed fit to be that same trajectory,
and its γ to equal the plain loop's probe to float64 round-off; the two-pass ``fit`` writes
a run folder the command line reads, and what it logs through ``pl_module.log`` reads back
as ``probe.steps()``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.test_integrations_support import need

L = need("lightning")

import gammatrace  # noqa: E402
from gammatrace.integrations import lightning as gl  # noqa: E402

SEED = 0
ACCUMULATE, CLIP, EPOCHS = 2, 0.5, 2
X = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
Y = torch.arange(40) % 3
STEPS_PER_EPOCH = 3  # 5 micro-batches of 8: 2 + 2 + the epoch's last one alone

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore:.*LeafSpec.*")


class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):  # the plain loop's probe watches this forward; training_step does not use it
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)  # a no-op on the probe's copy
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.01)


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that is a function of the epoch (Lightning calls ``set_epoch``): the order does
    not depend on how often Lightning creates an iterator."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist())


def loader() -> DataLoader:
    # Its own generator: a DataLoader without one draws each iterator's seed from the global stream.
    return DataLoader(TensorDataset(X, Y), batch_size=8, sampler=EpochShuffle(len(X)), generator=torch.Generator())


def build(precision: str = "32-true", **options):
    trainer = L.Trainer(max_epochs=EPOCHS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
                        precision=precision, **{**gl.QUIET, **options})
    return trainer, Lit(), {"train_dataloaders": loader()}


def fit_plain_lightning(precision: str = "32-true", callbacks=()) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    trainer, module, kwargs = build(precision)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, **kwargs)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def plain_loop(precision: str = "32-true", reference=None):
    """Trainer.fit written out; returns (θ_T, probe or None)."""
    torch.manual_seed(SEED)
    module = Lit()
    opt = module.configure_optimizers()
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    probe = gammatrace.Probe(module, opt, loss_fn, reference=reference) if reference is not None else None
    data = loader()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    module.train()
    for epoch in range(EPOCHS):
        data.sampler.set_epoch(epoch)
        batches = list(data)
        for i, batch in enumerate(batches):
            if i % ACCUMULATE == 0:
                opt.zero_grad()
            with autocast:
                logits = module(batch[0])
                loss = nn.functional.cross_entropy(logits, batch[1])
            (loss / ACCUMULATE).backward()
            if probe is not None:
                probe.batch(batch, loss)
            if (i + 1) % ACCUMULATE == 0 or i == len(batches) - 1:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], CLIP)
                opt.step()
        if probe is not None:
            probe.end_epoch()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, probe


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad}"


@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)])
def test_plain_loop_is_lightning_and_probing_changes_nothing(precision):
    final = fit_plain_lightning(precision)
    assert_same(final, plain_loop(precision)[0])
    probed = gl.GammaTrace(log_every=0)
    assert_same(final, fit_plain_lightning(precision, [probed]))  # the probed fit: the same trajectory
    steps = probed.steps()
    assert len(steps) == STEPS_PER_EPOCH * EPOCHS and steps["loss"].notna().all()


@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=pytest.mark.slow)])
def test_two_pass_gamma_equals_the_plain_loop_probe(precision, tmp_path):
    result = gl.fit(lambda: build(precision), seed=SEED, threads=1, out=tmp_path / "lit")
    assert result.reference_name == "last"
    _, probe = plain_loop(precision, reference=result.theta_T)
    ours, theirs = result.steps(), probe.steps()
    # ℓ_k: the micro-batches' own losses (not ÷ accumulate_grad_batches), weighted by their sizes.
    assert ours["loss"].tolist() == theirs["loss"].tolist()
    for col in ("loss_ref", "progress", "dist_sq", "update_sq", "grad_dot", "grad_sq", "gamma", "gamma_rp",
                "cos_align"):
        np.testing.assert_allclose(ours[col], theirs[col], rtol=1e-12, atol=1e-15, err_msg=col)
    assert ours["gamma"].notna().sum() >= 3

    from gammatrace.cli import main

    assert main(["analyze", str(tmp_path / "lit"), "--quiet"]) == 0
    assert main(["report", str(tmp_path / "lit"), "--out", str(tmp_path / "report")]) == 0


def test_what_pl_module_log_writes_is_probe_steps(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    passes = iter(["record", "reference"])

    def logged_build():
        return build(logger=CSVLogger(tmp_path, name=next(passes)), log_every_n_steps=1)

    result = gl.fit(logged_build, seed=SEED, threads=1, log_every=1)
    steps = result.steps()
    for name, columns in (("record", ["loss", "update_sq", "grad_sq", "skipped"]),
                          ("reference", ["gamma", "gamma_rp", "dist_ratio", "cos_align", "loss_ref"])):
        csv = pd.read_csv(tmp_path / name / "version_0" / "metrics.csv")
        logged = csv.dropna(subset=[f"gammatrace/{columns[0]}"]).sort_values("step")
        assert len(logged) == len(steps)
        expected = result.record if name == "record" else steps.assign(
            dist_ratio=np.sqrt(steps["dist_sq"] / steps["dist_sq"].iloc[0]))
        for c in columns:
            want = expected[c].to_numpy(np.float64) if c in expected else np.zeros(len(steps))
            np.testing.assert_array_equal(logged[f"gammatrace/{c}"].to_numpy(np.float64), want, err_msg=c)


def test_manual_optimization_is_refused_with_what_to_do():
    class Manual(Lit):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.manual_backward(loss)
            opt.step()

    trainer = L.Trainer(max_epochs=1, callbacks=[gl.GammaTrace()], **gl.QUIET)
    with warnings.catch_warnings(), pytest.raises(gl.IntegrationError, match="manual optimization"):
        warnings.simplefilter("ignore")
        trainer.fit(Manual(), train_dataloaders=loader())


class Scheduled(Lit):
    """Warm-up + cosine written, as usual, with ``trainer.estimated_stepping_batches``."""

    def configure_optimizers(self):
        import math

        opt = torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.01)
        total = self.trainer.estimated_stepping_batches
        warm = max(1, total // 3)

        def factor(s):
            if s < warm:
                return (s + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_two_pass_fit_sees_what_a_plain_fit_sees(tmp_path):
    """Issue 21 item 3: Lightning configures the optimizers itself in both passes, so a schedule
    written with estimated_stepping_batches is the plain fit's, bit for bit."""
    def scheduled():
        trainer, _, kwargs = build()
        return trainer, Scheduled(), kwargs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(SEED)
        trainer, module, kwargs = scheduled()
        trainer.fit(module, **kwargs)
        plain = {k: v.detach().clone() for k, v in module.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    result = gl.fit(scheduled, seed=SEED, threads=1, out=tmp_path / "lit")
    assert_same(plain, {k: result.theta_T[k] for k in plain})
    lr = result.steps()["lr"]
    assert len(lr) == STEPS_PER_EPOCH * EPOCHS and (lr > 0).all()
    with pytest.raises(gammatrace.engine.RunConflictError, match="already holds a run"):
        gl.fit(lambda: pytest.fail("built before the folder was checked"), seed=SEED, threads=1, out=tmp_path / "lit")
