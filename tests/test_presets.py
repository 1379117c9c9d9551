"""The built-in presets are typed objects, and their run configs are the ones they were.

``fixtures/preset_configs_before.json`` holds every cell config of every study × preset
(× ``--data-dir`` for the paper presets) as the dict-and-placeholder presets built them
(``git show HEAD:gammatrace/experiments/presets.py`` at the commit before the typed presets,
each config stored as its difference from ``RunConfig()``). The typed presets must build
the same configs, except where issues 12 and 13 changed them on purpose (:data:`REMOVED`,
:data:`CHANGED`): the quick init study runs the four initializations its claim names (default
and zero never leave loss 2.30; the other three are not in the claim), so it is small enough
for 3 seeds in minutes; the quick skip study's ResNet stops at loss 0.2; the quick batch-norm
study trains at lr 0.02; every U-Net cell reconstructs real images instead of denoising
synthetic ones (issue 13): CIFAR in the paper presets, the digits in the quick skip study.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gammatrace.config import RunConfig
from gammatrace.curvature import CurvatureConfig
from gammatrace.experiments import STUDIES
from gammatrace.experiments.presets import (
    PAPER_CURVATURE,
    PRESETS,
    QUICK_CURVATURE,
    Target,
    preset_spec,
    relations,
    seeds_for,
)
from gammatrace.experiments.study import GridSpec
from gammatrace.principles.claims import ALPHA

FIXTURE = Path(__file__).parent / "fixtures" / "preset_configs_before.json"
BEFORE = json.loads(FIXTURE.read_text())
# Cells issue 12 removed on purpose (quick init: only the claim's four initializations).
REMOVED = {"init/quick/-": {f"{g}-{i}" for g in ("plain", "bn")
                            for i in ("default", "kaiming_out", "orthogonal", "xavier_uniform", "zero")}}
ABSENT = "<absent>"  # a field the config did not set (before) or no longer sets (now)
# Fields changed on purpose (dotted path: (before, now)). Issue 12: the quick skip ResNet's
# target loss 0.1 → 0.2 (up to 83 epochs per run before); the quick batch-norm study's lr 0.01 →
# 0.02 ('none' needed ~160 epochs, too long for 3 seeds in 5 minutes; now ~90).
CHANGED = {**{("skip/quick/-", f"resnet1d-{v}"): {"target_loss": (0.1, 0.2)} for v in ("all", "first", "none")},
           **{("batchnorm/quick/-", v): {"optim.lr": (0.01, 0.02)} for v in ("all", "first", "none")}}
# Issue 24: the batch-norm study measures curvature along every path (its survey hypotheses read
# it); the trajectory is unchanged (the measurement runs on a copy), only what is recorded grows.
for _key in [k for k in BEFORE if k.startswith("batchnorm/")]:
    _curv = QUICK_CURVATURE if "/quick/" in _key else PAPER_CURVATURE
    for _cell in BEFORE[_key]["cells"]:
        CHANGED.setdefault((_key, _cell), {})["curvature"] = (
            ABSENT, CurvatureConfig(**_curv).model_dump(mode="json"))
# Issue 13: the U-Nets reconstruct real images. The papers train their U-Net "on the CIFAR-10 and
# CIFAR-100 datasets" with "the MSE loss": the paper U-Net cells reconstruct the CIFAR images of
# --data-dir (data.task reconstruct, noise-free) instead of denoising synthetic CIFAR-shaped
# images, at depth 4 written out (the papers "keep the last 3,2,1 skip-connections": four).
SYNTHETIC_CIFAR = {"name": "synthetic_denoise", "num_test": 10000, "num_train": 50000, "size": 32}
UNET_VARIANTS = {"activation": ("relu", "leaky_relu", "tanh", "sigmoid"),
                 "skip": ("all", "last3", "last2", "last1", "none"), "optimizer": ("adam", "momentum", "sgd")}
for _study, _variants in UNET_VARIANTS.items():
    for _preset, _cifar in (("paper", "cifar10"), ("paper100", "cifar100")):
        for _dir in ("-", "/data/cifar"):
            _data = {"name": _cifar, **({"data_dir": _dir} if _dir != "-" else {}), "noise_std": 0.0,
                     "task": "reconstruct"}
            for _v in _variants:
                # model.norm "all" (the U-Net's default) written out: a choice the papers do not state.
                CHANGED[(f"{_study}/{_preset}/{_dir}", f"unet-{_v}")] = {"data": (SYNTHETIC_CIFAR, _data),
                                                                         "model.depth": (ABSENT, 4),
                                                                         "model.norm": (ABSENT, "all")}
# The quick skip study's U-Net reconstructs the digits (the synthetic target 0.045 was never
# reached without skips; issue 12's 0.07 was reached, on synthetic images). Re-measured on the
# digits (see the preset's comment): momentum lr 0.03, target 0.015, at most 60 epochs.
for _v in ("all", "last1", "none"):
    CHANGED[("skip/quick/-", f"unet-{_v}")] = {
        "data": ({"name": "synthetic_denoise", "num_test": 128, "num_train": 512, "size": 16},
                 {"name": "digits", "noise_std": 0.0, "task": "reconstruct"}),
        "optim.lr": (0.01, 0.03), "epochs": (40, 60), "target_loss": (0.045, 0.015)}

def difference(cfg: dict, base: dict) -> dict:
    """What ``cfg`` sets differently from ``base`` ("<absent>": a key of base it lacks)."""
    out = {}
    for k in sorted(set(cfg) | set(base)):
        if k not in cfg:
            out[k] = "<absent>"
        elif k not in base:
            out[k] = cfg[k]
        elif isinstance(cfg[k], dict) and isinstance(base[k], dict):
            d = difference(cfg[k], base[k])
            if d:
                out[k] = d
        elif cfg[k] != base[k]:
            out[k] = cfg[k]
    return out


# Studies added after the fixture was written (issue 24: the width study): no "before" to match.
NEW_STUDIES = {"width"}


def test_fixture_covers_every_study_and_preset():
    assert {k.split("/")[0] for k in BEFORE} == set(STUDIES.names()) - NEW_STUDIES
    assert {k.split("/")[1] for k in BEFORE} == set(PRESETS)


@pytest.mark.parametrize("key", sorted(BEFORE))
def test_typed_presets_build_the_same_run_configs(key):
    name, preset, data_dir = key.split("/", 2)
    study = STUDIES.get(name)(preset, None if data_dir == "-" else data_dir)
    default = RunConfig().model_dump(mode="json")
    now = {c: difference(cfg.model_dump(mode="json"), default) for c, cfg in study.cells.items()}
    before = BEFORE[key]
    assert set(before["cells"]) - set(now) == REMOVED.get(key, set())
    assert set(now) <= set(before["cells"])  # no new cell
    for cell, cfg in now.items():
        expected = json.loads(json.dumps(before["cells"][cell]))
        for field, (old, new) in CHANGED.get((key, cell), {}).items():
            *parents, leaf = field.split(".")
            section = expected
            for part in parents:
                section = section[part]
            assert section.get(leaf, ABSENT) == old, (key, cell, field)
            if new == ABSENT:
                del section[leaf]
            else:
                section[leaf] = new
        assert cfg == expected, (key, cell)
    assert study.shared_init == before["shared_init"]
    for group, cells in study.groups.items():
        assert set(cells) == set(before["groups"][group]) - REMOVED.get(key, set())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", STUDIES.names())
def test_presets_are_typed_and_seeded_for_a_verdict(name, preset):
    spec = preset_spec(name, preset, "/cifar")
    assert isinstance(spec, GridSpec)
    study = spec.build(preset)
    # Every claim can reach both verdicts by the paired sign test: 2^-n < α, and 2^-n < α/r
    # over its r strict relations (of the γ order and of the stated speed order); ≥ 6 with a tie.
    for c in [*study.claims, *study.hypotheses]:  # a hypothesis by the same rule (no speed order)
        r = max(relations(c.order), relations(getattr(c, "speed", None)), 1)
        assert 0.5 ** study.seeds < ALPHA / r, (name, preset, c.text)
        if any(len(lv) > 1 for lv in c.order):
            assert study.seeds >= 6, (name, preset, c.text)
    assert study.seeds == seeds_for([c for g in spec.groups.values() for c in (g.claims or spec.claims)]
                                    + list(spec.across) + list(spec.hypotheses))
    # Nothing is a placeholder: every string in every config is what the run gets.
    def strings(obj):
        if isinstance(obj, dict):
            return [s for v in obj.values() for s in strings(v)]
        if isinstance(obj, list):
            return [s for v in obj for s in strings(v)]
        return [obj] if isinstance(obj, str) else []

    for cfg in study.cells.values():
        assert not [s for s in strings(cfg.model_dump(mode="json")) if "{" in s]


def test_seed_counts_reach_both_verdicts():
    # The old rule (3 seeds, 4 for two cells) let the J-T test reach p < α; the relation rule needs
    # each claim's relations reachable: the paper U-Net skip claim has 10 relations (2^-8 < 0.005).
    skip = STUDIES.get("skip")("paper", None)
    # ResNet-18 on CIFAR-10: 001's order and 002's "comparable γ" (an equivalence, a tie: ≥ 6 seeds).
    assert [c.order_text for c in skip.claims if c.group == "resnet18"] == ["resnet18-all > resnet18-first",
                                                                          "resnet18-all ≈ resnet18-first"]
    assert skip.seeds == 8 and STUDIES.get("skip")("quick", None).seeds == 6
    assert STUDIES.get("activation")("quick", None).seeds == 7 and STUDIES.get("optimizer")("quick", None).seeds == 6


def test_target():
    assert Target.of("quick", "/x") == Target("quick", None, "/x")  # for the quick U-Net's MNIST
    assert Target.of("quick").images() == {"name": "digits", "task": "reconstruct", "noise_std": 0.0}
    assert Target.of("paper100", "/c").images() == {"name": "cifar100", "data_dir": "/c", "task": "reconstruct",
                                                   "noise_std": 0.0}
    assert Target.of("paper100", None).cifar() == {"name": "cifar100"}
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        Target.of("fast")


@pytest.mark.parametrize("name", STUDIES.names())
def test_quick_presets_read_a_data_folder_only_for_the_unet(name):
    """Given --data-dir, the quick skip study's U-Net reconstructs MNIST from it (the first 1,024
    training images, its own target loss); nothing else of any quick study changes."""
    plain, given = STUDIES.get(name)("quick", None), STUDIES.get(name)("quick", "/mnist")
    assert set(plain.cells) == set(given.cells)
    for cell, cfg in given.cells.items():
        if name == "skip" and cell.startswith("unet-"):
            assert cfg.data.name == "mnist" and cfg.data.n_train == 1024 and cfg.data.n_test == 256
            assert cfg.data.switches() == {"data_dir": "/mnist", "task": "reconstruct", "noise_std": 0.0}
            assert cfg.target_loss == 0.003 and plain.cells[cell].target_loss == 0.015
            rest = {"data", "target_loss"}
            assert cfg.model_dump(exclude=rest) == plain.cells[cell].model_dump(exclude=rest)
        else:
            assert cfg == plain.cells[cell], cell
