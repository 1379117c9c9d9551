"""The engine's per-step hooks and its dtype: δ_k of the one-point-convexity hook against
the full-data gradient computed the slow obvious way (one sample at a time), hooks that
leave the measured trajectory bit for bit alone, and float64 runs."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from gammatrace.config import RunConfig
from gammatrace.engine.hooks import OnePointConvexity
from gammatrace.engine.replay import ReplayMismatchError, replay
from gammatrace.engine.session import build_session
from gammatrace.engine.trainer import train_pass
from gammatrace.store.run import RunStore
from tests.conftest import tiny_config
from tests.oracle import ParameterHook


def _regression(**overrides) -> dict:
    """Two epochs of an MLP on a tiny teacher problem (MSE), 48 samples, batch 16."""
    return tiny_config(**{"loss": "mse", "batch_size": 16,
                          "data": {"name": "teacher", "num_train": 48, "num_test": 8, "dim": 3, "out_dim": 2,
                                   "n_train": None, "n_test": None},
                          "model": {"name": "mlp", "width": 4, "depth": 1}, **overrides})


def test_one_point_convexity_matches_the_full_gradient_summed_sample_by_sample(tmp_path):
    run = train_pass(_regression(dtype="float64"), tmp_path / "run", progress=False)
    name = replay(run.path, "last", hooks=(OnePointConvexity, ParameterHook), progress=False)
    delta = run.store.read_shards(RunStore.analysis(name, "one_point"))
    thetas = run.store.read_shards(RunStore.analysis(name, "params"))
    assert delta["step"].tolist() == thetas["step"].tolist() == list(range(6))

    sess = build_session(run.config)
    model, x, y, n = sess.model, sess.x, sess.y, len(sess.x)
    params = [p for p in model.parameters() if p.requires_grad]
    star = torch.cat([t.reshape(-1) for t in torch.load(run.path / "final.pt", weights_only=True)["model"].values()])
    for k in range(len(thetas)):
        theta = torch.tensor(thetas.loc[k, [f"p{i}" for i in range(len(star))]].to_numpy(dtype=np.float64))
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, params)
        # The slow obvious way: the full-data gradient as the mean of n per-sample gradients.
        grad, loss = torch.zeros_like(theta), 0.0
        for i in range(n):
            li = ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean()
            grad += torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, params)]) / n
            loss += li.item() / n
        diff = theta - star
        row = delta.iloc[k]
        assert row["dist_sq"] == pytest.approx(float(diff @ diff), rel=1e-12)
        assert row["grad_dot"] == pytest.approx(float(grad @ diff), rel=1e-10)
        assert row["delta"] == pytest.approx(float(grad @ diff) / float(diff @ diff), rel=1e-10)
        assert row["full_loss"] == pytest.approx(loss, rel=1e-12)


def test_hooks_leave_the_measured_trajectory_bit_for_bit_alone(tmp_path):
    # Batch norm: the hook's extra forward would move the running statistics if it did
    # not restore them, and the replay's end-of-epoch check would then fail.
    run = train_pass(_regression(model={"name": "mlp", "width": 4, "depth": 1, "batchnorm": True}),
                     tmp_path / "run", progress=False)
    plain = run.store.read_shards(RunStore.analysis(replay(run.path, "last", progress=False), "steps"))
    shutil.rmtree(run.path / "analysis")
    name = replay(run.path, "last", hooks=(OnePointConvexity,), progress=False)
    hooked = run.store.read_shards(RunStore.analysis(name, "steps"))
    pd.testing.assert_frame_equal(plain, hooked, check_exact=True)
    assert len(run.store.read_shards(RunStore.analysis(name, "one_point"))) == len(plain)


class _Nudge:
    """A broken hook: from the second step on it moves the parameters it should only look
    at (the probe's own consistency check looks at the first step)."""

    name = "nudge"

    def __init__(self, session, reference):
        self.param, self.calls = next(session.model.parameters()), 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls > 1:
            with torch.no_grad():
                self.param.add_(1e-3)
        return {}


def test_a_hook_that_moves_the_trajectory_fails_the_verified_replay(tmp_path):
    run = train_pass(_regression(), tmp_path / "run", progress=False)
    # Moved at step 1 after its loss was computed: step 2 is the first to see it.
    with pytest.raises(ReplayMismatchError, match="step 2 "):
        replay(run.path, "last", hooks=(_Nudge,), progress=False)
    with pytest.raises(ValueError, match="hook names"):
        replay(run.path, "last", hooks=(type("Bad", (), {"name": "steps"}),), progress=False)


def test_dtype_defaults_to_float32_and_a_float64_run_is_float64_throughout(tmp_path):
    stored = RunConfig().model_dump(mode="json")
    del stored["dtype"]  # a run.json written before the field existed
    assert RunConfig.from_stored(stored).dtype == "float32"
    run = train_pass(_regression(dtype="float64"), tmp_path / "run", progress=False)
    final = torch.load(run.path / "final.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float64 for v in final.values())
    sess = build_session(run.config)
    assert sess.x.dtype == sess.y.dtype == torch.float64
    digits = build_session(RunConfig.model_validate(tiny_config(dtype="float64")))
    assert digits.y.dtype == torch.int64  # class labels stay integers
    model32 = build_session(RunConfig.model_validate(_regression())).model
    model64 = copy.deepcopy(sess.model)
    model64.load_state_dict(torch.load(run.path / "checkpoints" / "epoch_0000.pt", weights_only=True)["model"])
    # The random initial draw is the same in both dtypes: float64 holds the float32 values exactly.
    assert all(torch.equal(a.double(), b) for a, b in zip(model32.state_dict().values(),
                                                          model64.state_dict().values(), strict=True))
