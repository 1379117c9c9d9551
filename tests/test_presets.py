"""The built-in presets are typed objects, and their run configs are the ones they were.

``fixtures/preset_configs_before.json`` holds every cell config of every study × preset
(× ``--data-dir`` for the paper presets) as the dict-and-placeholder presets built them
(``git show HEAD:gammatrace/experiments/presets.py`` at the commit before the typed presets,
each config stored as its difference from ``RunConfig()``). The typed presets must build
the same configs, except where issue 12 changed them on purpose (:data:`REMOVED`,
:data:`CHANGED`): the quick init study runs the four initializations its claim names (default
and zero never leave loss 2.30; the other three are not in the claim), so it is small enough
for 3 seeds in minutes; the quick skip study's U-Net stops at loss 0.07, which every cell reaches,
and its ResNet at 0.2; the quick batch-norm study trains at lr 0.02.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gammatrace.config import RunConfig
from gammatrace.experiments import STUDIES
from gammatrace.experiments.presets import PRESETS, Target, preset_spec, seeds_for
from gammatrace.experiments.study import GridSpec

FIXTURE = Path(__file__).parent / "fixtures" / "preset_configs_before.json"
BEFORE = json.loads(FIXTURE.read_text())
# Cells issue 12 removed on purpose (quick init: only the claim's four initializations).
REMOVED = {"init/quick/-": {f"{g}-{i}" for g in ("plain", "bn")
                            for i in ("default", "kaiming_out", "orthogonal", "xavier_uniform", "zero")}}
# Fields issue 12 changed on purpose (dotted path: (before, now)): the quick skip U-Net's target
# loss 0.045 → 0.07 (without skips its loss levels off near 0.063: the claim could never be
# decided) and its ResNet's 0.1 → 0.2 (up to 83 epochs per run before); the quick batch-norm
# study's lr 0.01 → 0.02 ('none' needed ~160 epochs, too long for
# 3 seeds in 5 minutes; now ~90).
CHANGED = {**{("skip/quick/-", f"unet-{v}"): {"target_loss": (0.045, 0.07)} for v in ("all", "last1", "none")},
           **{("skip/quick/-", f"resnet1d-{v}"): {"target_loss": (0.1, 0.2)} for v in ("all", "first", "none")},
           **{("batchnorm/quick/-", v): {"optim.lr": (0.01, 0.02)} for v in ("all", "first", "none")}}


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


def test_fixture_covers_every_study_and_preset():
    assert {k.split("/")[0] for k in BEFORE} == set(STUDIES.names())
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
            assert section[leaf] == old, (key, cell, field)
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
    two_cells = any(len(c.cells) == 2 for c in study.claims)
    assert study.seeds == (4 if two_cells else 3), (name, preset)
    assert study.seeds == seeds_for([c for g in spec.groups.values() for c in (g.claims or spec.claims)])
    # Nothing is a placeholder: every string in every config is what the run gets.
    def strings(obj):
        if isinstance(obj, dict):
            return [s for v in obj.values() for s in strings(v)]
        if isinstance(obj, list):
            return [s for v in obj for s in strings(v)]
        return [obj] if isinstance(obj, str) else []

    for cfg in study.cells.values():
        assert not [s for s in strings(cfg.model_dump(mode="json")) if "{" in s]


def test_two_cell_claims_get_four_seeds():
    skip = STUDIES.get("skip")("paper", None)
    assert [c.order_text for c in skip.claims if c.group == "resnet18"] == ["resnet18-all > resnet18-first"]
    assert skip.seeds == 4 and STUDIES.get("skip")("quick", None).seeds == 3


def test_target():
    assert Target.of("quick", "/x") == Target("quick", None, None)  # quick presets read no data folder
    assert Target.of("paper100", None).cifar() == {"name": "cifar100"}
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        Target.of("fast")
