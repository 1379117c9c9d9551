"""The built-in studies (DESIGN.md §3 experiments/): each a registry entry with a
``quick`` preset (CPU, minutes) and the papers' settings, ``paper`` (CIFAR-10) and
``paper100`` (CIFAR-100).

Every study is data: a grid spec per preset (see :func:`gammatrace.experiments.study.grid_study`)
in which the strings ``{dataset}`` and ``{data_dir}`` stand for the preset's dataset and
the user's ``--data-dir``. The registered factory only fills those in.

Quick presets are sized so that every cell can reach a common training loss
(``target_loss``, with ``epochs`` as the cap) on two CPU cores within minutes: γ
normalized by a run's own θ_T is comparable only across runs that end at comparable
losses (DESIGN §1). A cell that misses the target is flagged by the report and kept
out of the claim check.

Paper presets follow the papers: CIFAR from ``--data-dir`` (the "python version"
folders), batch 128, 150 epochs, no augmentation, CUDA, plain SGD unless the study
varies the optimizer, and one fixed initial point per network shared by all of its
cells (``shared_init``: written to ``OUT/init/<group>-s<seed>.pt`` at study start and
loaded through ``model.init_from`` wherever names and shapes match). The U-Net cells
denoise CIFAR-shaped synthetic images (3×32×32): the data layer has no CIFAR denoising
target.

Example:
    >>> from gammatrace.experiments.study import STUDIES
    >>> s = STUDIES.get("batchnorm")("paper", "/data/cifar")
    >>> s.cells["vgg11-none"].data.switches(), s.cells["vgg11-none"].optim.lr
    ({'data_dir': '/data/cifar'}, 0.01)
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

from gammatrace.config import deep_merge
from gammatrace.experiments.study import STUDIES, Study, grid_study
from gammatrace.models.init import INITS

PRESETS = ("quick", "paper", "paper100")
# What the placeholders of a spec become in each preset (data_dir is the user's).
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "quick": {},
    "paper": {"dataset": "cifar10"},
    "paper100": {"dataset": "cifar100"},
}

# ------------------------------------------------------------------- shared pieces
# The continuation reference θ* = θ_{T+E} is trained E epochs beyond the analysed
# horizon, so the telescoping of Σ P_k no longer closes (DESIGN §1).
_QUICK_REF = {"kind": "continuation", "extra_epochs": 5}
_PAPER = {"epochs": 150, "batch_size": 128, "device": "cuda", "reference": {"kind": "continuation", "extra_epochs": 10}}
_CIFAR = {"name": "{dataset}", "data_dir": "{data_dir}"}
_SGD = {"name": "sgd"}
# Papers' networks, by group name -> overrides (cross-entropy on CIFAR unless said).
_NET = {
    **{name: {"model": {"name": name}, "data": _CIFAR}
       for name in ("alexnet_small", "vgg11", "vgg16", "resnet18", "resnet34")},
    # MSE denoising of CIFAR-shaped synthetic images: no {dataset}/{data_dir}.
    "unet": {"model": {"name": "unet"}, "loss": "mse",
             "data": {"name": "synthetic_denoise", "size": 32, "num_train": 50000, "num_test": 10000}},
}


def _net(name: str, **over: Any) -> dict[str, Any]:
    """A paper network's overrides (model, loss, data), with ``over`` merged in."""
    out = copy.deepcopy(_NET[name])
    return deep_merge(out, over)


# Digits (1,437 train images, 8×8) with a batch-normalized MLP: every activation and
# optimizer reaches the target in well under a minute of training on one core.
_DIGITS_MLP = {"data": {"name": "digits"}, "batch_size": 128, "reference": _QUICK_REF,
               "model": {"name": "mlp", "width": 128, "depth": 3, "batchnorm": True}}
# MNIST-1D, 800 train sequences: the 1-D conv nets reach a loss near 0 in tens of epochs.
_MNIST1D = {"data": {"name": "mnist1d", "num_samples": 1000}, "batch_size": 128, "reference": _QUICK_REF,
            "optim": {"name": "momentum", "lr": 0.01, "momentum": 0.9}}

# ------------------------------------------------------------------------ the studies
SPECS: dict[str, dict[str, dict[str, Any]]] = {}

_ACTS = {a: {"model": {"activation": a}} for a in ("relu", "leaky_relu", "tanh", "sigmoid")}
_ACT_CLAIM = [{"text": "ReLU-type activations give larger γ and faster convergence than tanh and sigmoid",
               "order": ["relu", "leaky_relu", "tanh", "sigmoid"]}]
_ACT_Q = "Does a ReLU-type activation make γ larger and training faster?"
SPECS["activation"] = {
    # Batch norm keeps the sigmoid net trainable at lr 0.05 (without it, it stays at
    # loss 2.30: a no-progress run). Measured: relu 12, tanh 20, sigmoid ~50 epochs.
    "quick": {"question": _ACT_Q, "variants": _ACTS, "claims": _ACT_CLAIM, "shared_init": True,
              "base": {**_DIGITS_MLP, "optim": {"name": "sgd", "lr": 0.05}, "epochs": 100, "target_loss": 0.15},
              "groups": {"mlp_bn": {}}},
    "paper": {"question": _ACT_Q, "variants": _ACTS, "claims": _ACT_CLAIM, "shared_init": True,
              "base": {**_PAPER, "optim": {**_SGD, "lr": 0.05}},
              "groups": {"alexnet_small": {"base": _net("alexnet_small")},
                         "resnet18": {"base": _net("resnet18")},
                         "unet": {"base": _net("unet", optim={"lr": 0.005})}}},
}

_NORMS = {n: {"model": {"norm": n}} for n in ("all", "first", "none")}
_BN_CLAIM = [{"text": "Removing batch norm shrinks γ and slows convergence", "order": ["all", "first", "none"]}]
_BN_Q = "Does batch normalization make γ larger and training faster?"
SPECS["batchnorm"] = {
    # Plain 1-D conv net: without norm it sits on a plateau for ~40 epochs, so the
    # target is 0.3 (reached by 'none' at ~150 epochs, by the others at ~20).
    "quick": {"question": _BN_Q, "variants": _NORMS, "claims": _BN_CLAIM, "shared_init": True,
              "base": {**_MNIST1D, "model": {"name": "cnn1d", "width": 0.5}, "epochs": 200, "target_loss": 0.3},
              "groups": {"cnn1d": {}}},
    "paper": {"question": _BN_Q, "variants": _NORMS, "claims": _BN_CLAIM, "shared_init": True,
              "base": _PAPER,
              "groups": {"vgg11": {"base": _net("vgg11", optim={**_SGD, "lr": 0.01})},
                         "vgg16": {"base": _net("vgg16", optim={**_SGD, "lr": 0.01})},
                         "resnet18": {"base": _net("resnet18", optim={**_SGD, "lr": 0.05})},
                         "resnet34": {"base": _net("resnet34", optim={**_SGD, "lr": 0.05})}}},
}


def _skips(*names: str) -> dict[str, dict[str, Any]]:
    return {n: {"model": {"skip": n}} for n in names}


def _skip_claim(*order: str) -> list[dict[str, Any]]:
    """One order for every network of a preset: each group checks the placements it has,
    in this order (e.g. ResNet all > first2 > first, U-Net all > last3 > … > none)."""
    return [{"text": "More skip connections give larger γ and faster convergence", "order": list(order)}]


_SKIP_Q = "Do skip connections make γ larger and training faster?"
SPECS["skip"] = {
    "quick": {"question": _SKIP_Q, "claims": _skip_claim("all", "last1", "first", "none"), "shared_init": True,
              "base": {**_MNIST1D, "epochs": 100, "target_loss": 0.1},
              "groups": {
                  # Measured: all 30, first 41, none 55 epochs to 0.1.
                  "resnet1d": {"base": {"model": {"name": "resnet1d", "width": 0.5}},
                               "variants": _skips("all", "first", "none")},
                  # Depth 2: two skips, so all / last1 (full resolution only) / none.
                  "unet": {"base": {"model": {"name": "unet", "width": 0.125, "depth": 2}, "loss": "mse",
                                    "data": {"name": "synthetic_denoise", "size": 16, "num_train": 512,
                                             "num_test": 128},
                                    "batch_size": 64, "epochs": 40, "target_loss": 0.045},
                           "variants": _skips("all", "last1", "none")}}},
    "paper": {"question": _SKIP_Q, "shared_init": True,
              "claims": _skip_claim("all", "first2", "last3", "last2", "last1", "first", "none"),
              "base": {**_PAPER, "optim": {**_SGD, "lr": 0.05}},
              "groups": {"resnet18": {"base": _net("resnet18"), "variants": _skips("all", "first")},
                         "resnet34": {"base": _net("resnet34"), "variants": _skips("all", "first2", "first")},
                         "unet": {"base": _net("unet", optim={"lr": 0.005}),
                                  "variants": _skips("all", "last3", "last2", "last1", "none")}}},
}

_OPTS = {"adam": {"optim": {"name": "adam", "betas": [0.9, 0.999], "eps": 0.01}},
         "momentum": {"optim": {"name": "momentum", "momentum": 0.5}},
         "sgd": {"optim": {"name": "sgd"}}}
_OPT_CLAIM = [{"text": "Adam > SGD with momentum > SGD in γ and in convergence speed",
               "order": ["adam", "momentum", "sgd"]}]
_OPT_Q = "Does the optimizer (SGD, momentum, Adam at lr 0.001) order γ as it orders convergence speed?"
SPECS["optimizer"] = {
    # lr 0.001 as in the papers: plain SGD needs ~170 epochs to loss 0.3 here, Adam ~5;
    # the target makes every cell end at the same loss (DESIGN §1's prototype inverted
    # the ordering only because SGD barely moved in a fixed budget).
    "quick": {"question": _OPT_Q, "variants": _OPTS, "claims": _OPT_CLAIM, "shared_init": True,
              "base": {**_DIGITS_MLP, "optim": {"lr": 0.001}, "epochs": 250, "target_loss": 0.3},
              "groups": {"mlp_bn": {}}},
    "paper": {"question": _OPT_Q, "variants": _OPTS, "claims": _OPT_CLAIM, "shared_init": True,
              "base": {**_PAPER, "optim": {"lr": 0.001}},
              "groups": {name: {"base": _net(name)} for name in ("resnet18", "resnet34", "vgg11", "vgg16", "unet")}},
}


def _inits() -> dict[str, dict[str, Any]]:
    return {name: {"model": {"init": name}} for name in INITS.names()}


# A hypothesis, not a paper's claim: a variance-preserving start lets a deep ReLU net
# train at once; a start that halves the signal per layer sits on a plateau first.
_INIT_CLAIM = [{"text": "Variance-preserving initializations (LSUV, Kaiming) give larger γ and faster "
                        "convergence than Xavier and LeCun in a deep ReLU network (hypothesis)",
                "order": ["lsuv", "kaiming_in", "xavier_normal", "lecun"]}]
_INIT_Q = "How does the initialization shape γ and convergence, with and without batch norm?"
SPECS["init"] = {
    # Measured (plain, to 0.15): lsuv 11, kaiming 12-15, xavier/lecun/orthogonal ~35
    # epochs; default and zero never leave loss 2.30 (no progress, flagged).
    "quick": {"question": _INIT_Q, "variants": "inits", "claims": _INIT_CLAIM,
              "base": {"data": {"name": "digits"}, "batch_size": 128, "reference": _QUICK_REF,
                       "model": {"name": "mlp", "width": 64, "depth": 6}, "optim": {"name": "sgd", "lr": 0.05},
                       "epochs": 80, "target_loss": 0.15},
              "groups": {"plain": {}, "bn": {"base": {"model": {"batchnorm": True}}}}},
    "paper": {"question": _INIT_Q, "variants": "inits", "claims": _INIT_CLAIM,
              "base": {**_PAPER, "optim": {**_SGD, "lr": 0.01}},
              "groups": {"vgg16_bn": {"base": _net("vgg16", model={"norm": "all"})},
                         "vgg16_plain": {"base": _net("vgg16", model={"norm": "none"})}}},
}


# ------------------------------------------------------------------------ expansion
def _fill(obj: Any, values: dict[str, Any]) -> Any:
    """Replace placeholder strings ``{key}``; a key whose value is None is dropped."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            v = _fill(v, values)
            if v is not _DROP:
                out[k] = v
        return out
    if isinstance(obj, list):
        return [_fill(v, values) for v in obj]
    if isinstance(obj, str) and obj.startswith("{") and obj.endswith("}") and obj[1:-1] in values:
        value = values[obj[1:-1]]
        return _DROP if value is None else value
    return obj


_DROP = object()


def preset_spec(name: str, preset: str, data_dir: str | None = None) -> dict[str, Any]:
    """The grid spec of study ``name`` in ``preset``, placeholders filled in.

    Example:
        >>> preset_spec("optimizer", "paper100", "/cifar")["groups"]["vgg11"]["base"]["data"]
        {'name': 'cifar100', 'data_dir': '/cifar'}
    """
    if preset not in PRESET_VALUES:
        raise ValueError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    spec = SPECS[name]["paper" if preset.startswith("paper") else preset]
    # data_dir None: the reader's default ($GAMMATRACE_DATA, else ./data) applies.
    spec = _fill(copy.deepcopy(spec), {**PRESET_VALUES[preset], "data_dir": data_dir})
    if spec.get("variants") == "inits":
        spec["variants"] = _inits()  # every entry of the init registry, at build time
    return {"name": name, **spec}


def build_study(name: str, preset: str = "quick", data_dir: str | None = None) -> Study:
    """The built-in study ``name`` in ``preset`` (what ``STUDIES.get(name)`` returns).

    Example:
        >>> build_study("skip", "quick").groups["unet"]
        ['unet-all', 'unet-last1', 'unet-none']
    """
    return grid_study(preset_spec(name, preset, data_dir), preset=preset)


for _name in SPECS:
    STUDIES.register(_name)(partial(build_study, _name))
