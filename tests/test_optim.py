"""Table-driven tests over every optimizer, schedule and loss in the registries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gammatrace
from gammatrace.config import OptimConfig, ScheduleConfig
from gammatrace.train.optim import LOSSES, OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule
from tests.conftest import tiny_config


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_reduces_the_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    lr = 0.3 if name in ("sgd", "momentum", "nesterov", "adagrad") else 0.01
    opt = make_optimizer(model.parameters(), OptimConfig(name=name, lr=lr, weight_decay=1e-4))
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_replays_exactly(tmp_path, name):
    run = gammatrace.train(tiny_config(optim={"name": name, "lr": 0.01}), tmp_path / name, progress=False)
    assert run.status == "complete" and len(run.steps()) == 6


SPE, TOTAL = 10, 100
EXPECTED = {
    "constant": lambda k, c: 1.0,
    "step": lambda k, c: c.factor ** (k // (c.step_epochs * SPE)),
    "cosine": lambda k, c: c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * k / TOTAL)),
    "cyclical": lambda k, c: 1 + (c.max_ratio - 1) * (1 - abs(2 * ((k % (c.cycle_epochs * SPE)) / (c.cycle_epochs * SPE)) - 1)),
    "inv_sqrt": lambda k, c: 1 / math.sqrt(1 + k / SPE),
}


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_matches_its_closed_form(name):
    cfg = ScheduleConfig(name=name, step_epochs=3, factor=0.5, min_lr_ratio=0.1, cycle_epochs=2, max_ratio=3)
    f = make_schedule(cfg, SPE, TOTAL)
    for k in (0, 1, 9, 10, 29, 30, 55, 99):
        assert f(k) == pytest.approx(EXPECTED[name](k, cfg), rel=1e-12), k


def test_warmup_composes_with_any_schedule():
    cfg = ScheduleConfig(name="step", step_epochs=3, factor=0.5, warmup_epochs=2)
    f = make_schedule(cfg, SPE, TOTAL)
    assert f(0) == pytest.approx(1 / 20) and f(9) == pytest.approx(10 / 20) and f(19) == 1.0 and f(30) == 0.5


def test_schedule_table_covers_registry():
    assert set(EXPECTED) == set(SCHEDULES.names())


@pytest.mark.parametrize("name", LOSSES.names())
def test_losses_are_per_sample(name):
    out = torch.randn(7, 4, requires_grad=True)
    y = torch.randint(0, 4, (7,))
    per = LOSSES.get(name)(out, y)
    assert per.shape == (7,)
    if name == "cross_entropy":
        torch.testing.assert_close(per.mean(), nn.functional.cross_entropy(out, y))
    else:
        torch.testing.assert_close(per.mean(), nn.functional.mse_loss(out, nn.functional.one_hot(y, 4).float()))
