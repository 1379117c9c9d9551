"""Table-driven tests over every optimizer, schedule and loss in the registries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gammatrace
from gammatrace.config import (
    OPTIM_VARIANTS,
    RunConfig,
    ScheduleConfig,
    optim_config,
    upgrade_legacy_optim,
)
from gammatrace.techniques import LOSSES, OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule
from tests.conftest import tiny_config


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_reduces_the_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    lr = 0.3 if name in ("sgd", "momentum", "nesterov", "adagrad") else 0.01
    cfg = optim_config(name=name, lr=lr, weight_decay=1e-4)
    opt = make_optimizer(model.parameters(), name, **cfg.optimizer_kwargs())
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


# Config -> optimizer arguments: every field of an optimizer's config variant reaches the
# torch optimizer under its own name, with a value that is not torch's default (so a field
# dropped on the way fails the test), and nothing else is set.
NON_DEFAULT = {"lr": 0.0123, "weight_decay": 0.0456, "momentum": 0.789, "betas": (0.81, 0.92), "eps": 3.5e-6,
               "alpha": 0.777}
TORCH_EXTRAS = {"nesterov": {"nesterov": True}, "amsgrad": {"amsgrad": True}}


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_config_arguments_reach_the_optimizer(name):
    fields = next(v for v in OPTIM_VARIANTS if name in v.model_fields["name"].annotation.__args__).model_fields
    chosen = {k: v for k, v in NON_DEFAULT.items() if k in fields}
    cfg = optim_config(name=name, **chosen)
    opt = make_optimizer(nn.Linear(2, 2).parameters(), name, **cfg.optimizer_kwargs())
    for key, value in {**chosen, **TORCH_EXTRAS.get(name, {})}.items():
        assert opt.defaults[key] == value, (name, key)
    # the arguments it does not take are rejected, not ignored
    for key in set(NON_DEFAULT) - set(fields):
        with pytest.raises(ValueError, match=key):
            optim_config(name=name, **{key: NON_DEFAULT[key]})


def test_optimizer_variants_cover_the_registry():
    names = {n for v in OPTIM_VARIANTS for n in v.model_fields["name"].annotation.__args__}
    assert names == set(OPTIMIZERS.names())


def test_rmsprop_takes_its_own_momentum_and_alpha():
    cfg = RunConfig.model_validate({"optim": {"name": "rmsprop", "lr": 0.01, "momentum": 0.5, "alpha": 0.9}})
    opt = make_optimizer(nn.Linear(2, 2).parameters(), "rmsprop", **cfg.optim.optimizer_kwargs())
    assert (opt.defaults["momentum"], opt.defaults["alpha"]) == (0.5, 0.9)


@pytest.mark.parametrize("name, expect", [
    ("sgd", {"name": "sgd", "lr": 0.1, "weight_decay": 0.0, "clip_grad_norm": None}),
    ("momentum", {"name": "momentum", "lr": 0.1, "weight_decay": 0.0, "clip_grad_norm": None, "momentum": 0.9}),
    ("adam", {"name": "adam", "lr": 0.1, "weight_decay": 0.0, "clip_grad_norm": None, "betas": (0.9, 0.999),
              "eps": 1e-8}),
    # the flat format gave rmsprop alpha = betas[1] and no momentum: kept, so old runs replay
    ("rmsprop", {"name": "rmsprop", "lr": 0.1, "weight_decay": 0.0, "clip_grad_norm": None, "alpha": 0.999,
                 "momentum": 0.0, "eps": 1e-8}),
])
def test_legacy_flat_optim_section_upgrades_to_what_the_run_used(name, expect):
    legacy = {"name": name, "lr": 0.1, "momentum": 0.9, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
              "clip_grad_norm": None}
    cfg = RunConfig.from_stored({"optim": legacy})
    assert cfg.optim.model_dump() == expect
    assert upgrade_legacy_optim({"name": "sgd", "lr": 0.1}) == {"name": "sgd", "lr": 0.1}  # current format as is


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
    f = make_schedule(name, SPE, TOTAL, **cfg.options())
    for k in (0, 1, 9, 10, 29, 30, 55, 99):
        assert f(k) == pytest.approx(EXPECTED[name](k, cfg), rel=1e-12), k


def test_warmup_composes_with_any_schedule():
    cfg = ScheduleConfig(name="step", step_epochs=3, factor=0.5, warmup_epochs=2)
    f = make_schedule(cfg.name, SPE, TOTAL, warmup_epochs=cfg.warmup_epochs, **cfg.options())
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
