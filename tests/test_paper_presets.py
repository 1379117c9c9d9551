"""Every value of every paper preset is pinned to the paper's words, or marked "not stated"
with the choice made.

Each study's provenance table (:func:`~gammatrace.experiments.presets.paper_settings`) has
one row per value: a run-config field, the cells it applies to, the value, and its source —
a paper file in ``../shared/papers/`` and the phrase stating the value, or "not stated". The
tests build each paper preset (CIFAR-10 and CIFAR-100, with and without ``--data-dir``) and
check (a) that every row's value is the one in the built configs, (b) that every quoted
phrase is in its paper (whitespace-normalised), and (c) that every value-bearing field of
every cell is covered by exactly one row, so a new field cannot slip in unpinned.

The paper presets need CIFAR folders and a GPU; the last tests write small folders in the
standard formats (CIFAR "python version" pickles, MNIST IDX files) and load the U-Net cells'
data from them, then run one optimizer step of the paper U-Net config end to end on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gammatrace
from gammatrace.data import load_dataset
from gammatrace.engine.session import build_session
from gammatrace.experiments import STUDIES
from gammatrace.experiments.presets import (
    BOOKKEEPING,
    LONG,
    PRINCIPLE,
    SHORT,
    paper_settings,
    preset_spec,
    value_fields,
)
from gammatrace.experiments.sources import phrase_in
from gammatrace.models import build
from gammatrace.models.activations import make_activation
from gammatrace.store.run import RunStore
from tests.test_data import write_cifar, write_mnist

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"
CASES = [(name, preset, data_dir) for name in STUDIES.names() for preset in ("paper", "paper100")
         for data_dir in ("/cifar", None)]


def _json(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("name,preset,data_dir", CASES)
def test_every_value_of_every_paper_cell_is_pinned(name, preset, data_dir):
    spec = preset_spec(name, preset, data_dir)
    study = spec.build(preset)
    rows = paper_settings(name, preset, data_dir)
    used: set[int] = set()
    for cell, cfg in study.cells.items():
        fields = value_fields(cfg)
        for field, value in fields.items():
            matching = [r for r in rows if r.field == field and r.applies(cell)]
            assert len(matching) == 1, f"{name}/{preset} {cell}: {field} is pinned by {len(matching)} rows"  # (c)
            assert _json(matching[0].value) == value, (cell, field, matching[0].value, value)  # (a)
            used.add(id(matching[0]))
        for row in rows:  # a row names a field the cell has
            if row.applies(cell) and not row.field.startswith("study."):
                assert row.field in fields, (cell, row.field)
    for row in rows:  # the study's own fields: the shared initial point, seeds per cell
        if row.field.startswith("study."):
            assert getattr(spec, row.field.removeprefix("study.")) == row.value, (name, row.field)
            used.add(id(row))
    assert {r.field for r in rows if r.field.startswith("study.")} == {"study.shared_init", "study.seeds"}
    assert not [(r.field, r.cells) for r in rows if id(r) not in used]  # no stale row


def test_value_fields_are_every_leaf_but_the_bookkeeping():
    cfg = preset_spec("optimizer", "paper", "/cifar").build("paper").cells["unet-adam"]
    fields = value_fields(cfg)
    assert fields["optim.betas"] == [0.9, 0.999] and fields["optim.eps"] == 0.01 and fields["data.noise_std"] == 0.0
    assert fields["schedule.name"] == "constant" and "schedule.factor" not in fields  # constant takes no factor
    assert not [f for f in fields if f.split(".")[0] in BOOKKEEPING or f in BOOKKEEPING]
    # Brute force: the dump's leaves, less the bookkeeping and the schedule options 'constant' ignores.
    dump = cfg.model_dump(mode="json")
    flat = {f"{s}.{k}": v for s, sec in dump.items() if isinstance(sec, dict) for k, v in sec.items()}
    flat |= {k: v for k, v in dump.items() if not isinstance(v, dict)}
    inert = {f"schedule.{k}" for k in ("step_epochs", "factor", "min_lr_ratio", "cycle_epochs", "max_ratio")}
    expected = {k: v for k, v in flat.items()
                if k not in inert and k.split(".")[0] != "analysis" and k not in BOOKKEEPING}
    assert fields == expected


def _quotes() -> list[tuple[str, str]]:
    return sorted({(r.source.paper, r.source.phrase) for name, preset, data_dir in CASES
                   for r in paper_settings(name, preset, data_dir) if r.source.stated})


@pytest.mark.parametrize("paper,phrase", _quotes())
def test_quoted_phrases_are_in_their_paper(paper, phrase):  # (b)
    assert paper in (SHORT, LONG, PRINCIPLE)
    if not (PAPERS / paper).is_file():
        pytest.skip(f"{PAPERS / paper} is absent: the shared papers folder sits beside the clone")
    assert phrase_in((PAPERS / paper).read_text(), phrase), phrase


def test_unstated_values_say_what_was_chosen():
    for name, preset, data_dir in CASES:
        for row in paper_settings(name, preset, data_dir):
            text = str(row.source)
            assert text.startswith("not stated — ") != row.source.stated and len(text) > 20, (name, row.field)
    with pytest.raises(ValueError, match="quick presets stand in"):
        paper_settings("skip", "quick")


def test_choices_are_not_cited_as_the_papers_values():
    """What no paper states is never a quote: the init study (no paper runs one) borrows every
    value, the continuation reference deviates from the papers' θ_T, the U-Net's batch norm is ours."""
    for preset in ("paper", "paper100"):
        assert not any(r.source.stated for r in paper_settings("init", preset))
        for name in ("activation", "batchnorm", "skip", "optimizer"):
            rows = {(r.field, r.cells): r for r in paper_settings(name, preset)}
            ref = rows["reference.kind", "*"]
            assert not ref.source.stated and "last iterate" in str(ref.source)
            if name != "batchnorm":
                assert not rows["model.norm", "unet-*"].source.stated


@pytest.mark.parametrize("name,field,cells,value,phrase", [
    ("activation", "optim.lr", "resnet18-relu", 0.05, r"a constant learning rate $\eta = 0.05$"),
    ("activation", "optim.lr", "unet-tanh", 0.005, r"a constant learning rate $\eta = 0.005$"),
    ("activation", "loss", "unet-relu", "mse", "and we use the MSE loss"),
    ("activation", "epochs", "alexnet_small-sigmoid", 150, "to train these networks for 150 epochs"),
    ("batchnorm", "optim.lr", "vgg16-first", 0.01, r"$\eta = 0.05$ for ResNet, 0.01 for VGG"),
    ("batchnorm", "batch_size", "resnet34-none", 128, "and batch size 128 to train these networks"),
    ("skip", "model.skip", "unet-last3", "last3", "1) keep all the skip-connections; 2) keep the last 3,2,1 "
                                                  "skip-connections, respectively and 3) remove all the skip-connections"),
    ("skip", "model.depth", "unet-none", 4, "keep the last 3,2,1 skip-connections"),
    ("optimizer", "optim.momentum", "vgg11-momentum", 0.5, "We set the momentum to be 0.5"),
    ("optimizer", "optim.eps", "unet-adam", 0.01, r"$\beta_1 = 0.9, \beta_2 = 0.999, \epsilon = 10^{-2}$"),
    ("optimizer", "optim.lr", "resnet18-sgd", 0.001, r"a constant learning rate $\eta = 0.001$"),
    ("optimizer", "study.shared_init", "*", True, "We apply a fixed initialization"),
])
def test_the_papers_key_values(name, field, cells, value, phrase):
    """The values the papers' experiment setups spell out, each with its phrase (so a table
    that lost one of them, or a preset that drifted, fails here by name)."""
    for preset in ("paper", "paper100"):
        rows = [r for r in paper_settings(name, preset) if r.field == field and r.applies(cells)]
        assert len(rows) == 1 and rows[0].value == value and rows[0].source.phrase == phrase
        assert rows[0].source.paper == LONG
        if field.startswith("study."):
            assert getattr(preset_spec(name, preset), field.removeprefix("study.")) == value
        else:
            assert value_fields(preset_spec(name, preset).build(preset).cells[cells])[field] == value


def test_values_the_models_hold_implicitly():
    # "leaky ReLU (with slope 10^{-2})": the activation's default.
    assert make_activation("leaky_relu").negative_slope == 0.01
    # "We remove all dropout layers in the VGG networks": the CIFAR VGGs have none.
    for name in ("vgg11", "vgg16"):
        assert not [m for m in build(name, input_shape=(3, 32, 32), width=0.125).modules() if isinstance(m, nn.Dropout)]
    # "keep the last 3,2,1 skip-connections": depth 4 has four, and last3 drops the deepest.
    unet = build("unet", input_shape=(3, 32, 32), width=0.125, depth=4, skip="last3")
    assert [up.has_skip for up in unet.decoder] == [False, True, True, True]


# ------------------------------------------------------------- the paper U-Net on files
def _cifar_images(batches: list[dict]) -> torch.Tensor:
    data = np.concatenate([b[b"data"] for b in batches])
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("preset,variant", [("paper", "cifar10"), ("paper100", "cifar100")])
def test_paper_unet_cells_reconstruct_cifar_from_the_data_folder(tmp_path, preset, variant):
    batches = write_cifar(tmp_path, variant)
    for name in ("activation", "skip", "optimizer"):  # the studies with a U-Net group
        study = STUDIES.get(name)(preset, str(tmp_path))
        cells = [c for c in study.cells if c.startswith("unet-")]
        assert cells and {study.cells[c].data.name for c in cells} == {variant}
        d = study.cells[cells[0]].data
        ds = load_dataset(d.name, n_train=d.n_train, n_test=d.n_test, classes=d.classes, **d.switches())
        assert ds.task == "regression" and ds.num_classes == 3
        assert torch.equal(ds.y_train, _cifar_images(batches["train"]))  # the real images, not synthetic ones
        assert torch.equal(ds.y_test, _cifar_images(batches["test"]))
        assert torch.equal(ds.x_train, ds.y_train)  # noise_std 0: the input is the image itself


def test_one_step_of_the_paper_unet_config_end_to_end(tmp_path):
    write_cifar(tmp_path / "data", "cifar10")
    cfg = STUDIES.get("skip")("paper", str(tmp_path / "data")).cells["unet-all"]
    # The paper's U-Net (depth 4, 64 base channels), lr, loss and data; 8 images, one epoch (one
    # step of batch 128) on the CPU, and one epoch of continuation for the paper's reference kind.
    tiny = cfg.with_overrides({"epochs": 1, "device": "cpu", "data": {"n_train": 8, "n_test": 3},
                               "reference": {"extra_epochs": 1}})
    assert (tiny.model.name, tiny.model.switches(), tiny.optim.name, tiny.optim.lr, tiny.loss) == (
        "unet", {"depth": 4, "norm": "all", "skip": "all"}, "sgd", 0.005, "mse")
    run = gammatrace.train(tiny, tmp_path / "run", progress=False)
    assert run.status.value == "complete" and run.meta.steps_per_epoch == 1
    assert run.references() == ["continuation"] and len(run.steps()) == 1  # the config's reference kind
    # Brute force: θ_1 = θ_0 − η ∇ℓ(θ_0) over the 8 images (one full batch; MSE and the batch
    # statistics of batch norm do not depend on the order).
    store = RunStore(run.path)
    theta0 = store.read_torch(RunStore.checkpoint(0))["model"]
    theta1 = store.read_torch(RunStore.checkpoint(1))["model"]
    sess = build_session(tiny)
    sess.model.load_state_dict(theta0)
    sess.model.train()
    loss = nn.functional.mse_loss(sess.model(sess.x), sess.y)
    loss.backward()
    for name, p in sess.model.named_parameters():
        assert torch.allclose(theta1[name], theta0[name] - 0.005 * p.grad, atol=1e-6, rtol=1e-4), name


def test_quick_unet_reconstructs_mnist_from_a_data_folder(tmp_path):
    arrays = write_mnist(tmp_path / "mnist", gz=True, n_train=12, n_test=5)
    study = STUDIES.get("skip")("quick", str(tmp_path))
    assert {study.cells[c].data.name for c in study.groups["unet"]} == {"mnist"}
    assert {study.cells[c].data.name for c in study.groups["resnet1d"]} == {"mnist1d"}  # the rest needs no folder
    cfg = study.cells["unet-last1"].with_overrides({"epochs": 1, "reference": {"kind": "last", "extra_epochs": 0},
                                                     "data": {"n_train": 12, "n_test": 5}})
    sess = build_session(cfg)  # 1×28×28 at depth 2: 28 = 4·7, no padding needed
    clean = torch.from_numpy(arrays["train_images"].astype(np.float32) / np.float32(255))[:, None]
    assert torch.equal(sess.y, clean) and torch.equal(sess.x, clean)
    assert sess.model(sess.x[:2]).shape == (2, 1, 28, 28)
    run = gammatrace.train(cfg, tmp_path / "run", progress=False)
    assert run.status.value == "complete" and len(run.steps()) == 1
    digits = STUDIES.get("skip")("quick", None).cells["unet-last1"].data
    assert (digits.name, digits.switches()) == ("digits", {"task": "reconstruct", "noise_std": 0.0})
