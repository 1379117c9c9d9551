"""The built-in studies (DESIGN.md §3 experiments/): each a registry entry with a
``quick`` preset (CPU, minutes) and the papers' settings, ``paper`` (CIFAR-10) and
``paper100`` (CIFAR-100).

Every study is a typed :class:`~gammatrace.experiments.study.GridSpec` built by a
function of the preset (:class:`Target`: which preset, which CIFAR, the user's
``--data-dir``); nothing is filled into placeholder strings.

Claims are the papers' own, per network, with ties (``"relu ≈ leaky_relu > tanh >
sigmoid"``), each with its :class:`~gammatrace.experiments.study.Source` — the paper file
in ``../shared/papers/`` and the phrase that states it (tests/test_claim_sources.py finds
every phrase there). The quick networks stand in for the papers' classification networks
(MLP, 1-D conv nets) and U-Net (a small U-Net): their claims are the ones the papers state
for the network they stand in for. Where no paper states an order (initialization) the
claim is marked a hypothesis (no source).

Quick presets are sized so that every cell can reach a common training loss
(``target_loss``, with ``epochs`` as the cap) on two CPU cores within minutes: γ
normalized by a run's own θ_T is comparable only across runs that end at comparable
losses (DESIGN §1). They run 3 seeds per cell (4 where a claim has two cells: with 3 seeds
each, the exact test cannot go below p = 0.05), each quick study in ≤ 5 minutes with
``--workers 2``. A cell that misses the target is flagged by the report and kept out of
the claim check.

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
    >>> [c.order_text for c in s.claims if c.group == "vgg16"], s.seeds
    (['vgg16-all ≈ vgg16-first > vgg16-none'], 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gammatrace.config import merge_config
from gammatrace.experiments.study import STUDIES, ClaimSpec, GridSpec, GroupSpec, Source, Study
from gammatrace.models.init import INITS
from gammatrace.principles.claims import parse_order

PRESETS = ("quick", "paper", "paper100")
SHORT = "000_236cbbea7b64027d.txt"  # the regularity-principle paper, short version
LONG = "001_954b36295a226970.txt"  # the same study, long version with the appendix


@dataclass(frozen=True)
class Target:
    """What a preset trains on: ``preset``, the CIFAR set of the paper presets and the
    user's ``data_dir`` (None: the reader's default, $GAMMATRACE_DATA, else ./data).

    Example:
        >>> Target.of("paper100", "/cifar").cifar(), Target.of("paper", None).cifar()
        ({'name': 'cifar100', 'data_dir': '/cifar'}, {'name': 'cifar10'})
    """

    preset: str
    dataset: str | None = None
    data_dir: str | None = None

    @classmethod
    def of(cls, preset: str, data_dir: str | None = None) -> Target:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
        dataset = {"quick": None, "paper": "cifar10", "paper100": "cifar100"}[preset]
        return cls(preset, dataset, data_dir if dataset else None)

    @property
    def quick(self) -> bool:
        return self.preset == "quick"

    def cifar(self) -> dict[str, Any]:
        """The data section of a CIFAR cell."""
        return {"name": self.dataset, **({"data_dir": self.data_dir} if self.data_dir is not None else {})}

    def net(self, name: str, **over: Any) -> dict[str, Any]:
        """A paper network's overrides (model, loss, data), with ``over`` merged in:
        cross-entropy on CIFAR, except the U-Net (MSE denoising of CIFAR-shaped synthetic
        images, no data folder)."""
        if name == "unet":
            base = {"model": {"name": "unet"}, "loss": "mse",
                    "data": {"name": "synthetic_denoise", "size": 32, "num_train": 50000, "num_test": 10000}}
        else:
            base = {"model": {"name": name}, "data": self.cifar()}
        return merge_config(base, over)


def claim(text: str, order: str, paper: str | None = None, quote: str | None = None) -> ClaimSpec:
    """A claim with the paper's words (``paper`` None: a hypothesis).

    Example:
        >>> claim("BN first", "all ≈ first > none", LONG, "converge as fast as").source.paper == LONG
        True
    """
    source = Source(paper=paper, quote=quote) if paper is not None and quote is not None else None
    return ClaimSpec(text=text, order=parse_order(order), source=source)


def seeds_for(claims: list[ClaimSpec]) -> int:
    """Seeds per cell a preset runs: 3, or 4 where a claim has two cells (3 seeds per cell
    give 20 arrangements, so the exact test's p never goes below 1/20 = 0.05).

    Example:
        >>> seeds_for([claim("t", "a > b > c")]), seeds_for([claim("t", "all > first")])
        (3, 4)
    """
    return 4 if any(sum(len(lv) for lv in c.order) == 2 for c in claims) else 3


def _grid(name: str, question: str, base: dict[str, Any], groups: dict[str, GroupSpec], *,
          variants: dict[str, dict[str, Any]] | None = None, claims: list[ClaimSpec] | None = None,
          shared_init: bool = True) -> GridSpec:
    every = [c for g in groups.values() for c in (g.claims if g.claims is not None else claims or [])]
    return GridSpec(name=name, question=question, base=base, variants=variants or {}, groups=groups,
                    claims=claims or [], shared_init=shared_init, seeds=seeds_for(every))


# ------------------------------------------------------------------------ shared pieces
# The continuation reference θ* = θ_{T+E} is trained E epochs beyond the analysed
# horizon, so the telescoping of Σ P_k no longer closes (DESIGN §1).
QUICK_REF = {"kind": "continuation", "extra_epochs": 5}
PAPER = {"epochs": 150, "batch_size": 128, "device": "cuda", "reference": {"kind": "continuation", "extra_epochs": 10}}
SGD = {"name": "sgd"}
# Digits (1,437 train images, 8×8) with a batch-normalized MLP: every activation and
# optimizer reaches the target in well under a minute of training on one core.
DIGITS_MLP = {"data": {"name": "digits"}, "batch_size": 128, "reference": QUICK_REF,
              "model": {"name": "mlp", "width": 128, "depth": 3, "batchnorm": True}}
# MNIST-1D, 800 train sequences: the 1-D conv nets reach a loss near 0 in tens of epochs.
MNIST1D = {"data": {"name": "mnist1d", "num_samples": 1000}, "batch_size": 128, "reference": QUICK_REF,
           "optim": {"name": "momentum", "lr": 0.01, "momentum": 0.9}}


def _variants(switch: str, section: str, *names: str) -> dict[str, dict[str, Any]]:
    return {n: {section: {switch: n}} for n in names}


# ------------------------------------------------------------------------- activation
ACT_Q = "Does a ReLU-type activation make γ larger and training faster?"
ACT_CLASSIFICATION = claim(
    "ReLU types give the largest γ, sigmoid the smallest (classification)", "relu ≈ leaky_relu > tanh > sigmoid",
    LONG, "the trainings with ReLU types of activation functions satisfy the regularity principle with the largest")
ACT_UNET = claim(
    "Sigmoid gives the largest γ, tanh the smallest (U-Net regression)", "sigmoid > relu ≈ leaky_relu > tanh",
    LONG, "the training trajectories with the sigmoid activation function obey the regularity principle with the "
          "largest")
ACT_ALEXNET = claim(
    "Sigmoid gives a much smaller γ than the other activations (AlexNet)", "relu ≈ leaky_relu ≈ tanh > sigmoid",
    LONG, "under the sigmoid activation is much smaller than those under the other activation functions")


def activation(t: Target) -> GridSpec:
    acts = _variants("activation", "model", "relu", "leaky_relu", "tanh", "sigmoid")
    if t.quick:
        # Batch norm keeps the sigmoid net trainable at lr 0.05 (without it, it stays at
        # loss 2.30: a no-progress run). Measured (3 seeds): relu 6–7, tanh 8, sigmoid 54–55 epochs.
        return _grid("activation", ACT_Q,
                     {**DIGITS_MLP, "optim": {"name": "sgd", "lr": 0.05}, "epochs": 100, "target_loss": 0.15},
                     {"mlp_bn": GroupSpec(claims=[ACT_CLASSIFICATION])}, variants=acts)
    return _grid("activation", ACT_Q, {**PAPER, "optim": {**SGD, "lr": 0.05}},
                 {"alexnet_small": GroupSpec(base=t.net("alexnet_small"), claims=[ACT_ALEXNET]),
                  "resnet18": GroupSpec(base=t.net("resnet18"), claims=[ACT_CLASSIFICATION]),
                  "unet": GroupSpec(base=t.net("unet", optim={"lr": 0.005}), claims=[ACT_UNET])},
                 variants=acts)


# ------------------------------------------------------------------------- batch norm
BN_Q = "Does batch normalization make γ larger and training faster?"
BN_TIED = claim(
    "Keeping the first BN layer per block is as good as keeping all; removing BN gives a very small γ",
    "all ≈ first > none", LONG,
    "the trainings that keep the first BN layer in each block converge as fast as those that keep all the BN layers")
BN_CIFAR100 = claim(
    "All BN layers give a larger γ than the first only, and removing BN the smallest (CIFAR-100)",
    "all > first > none", LONG,
    "the training trajectories with all BN layers kept obey the regularity principle with a larger")


def batchnorm(t: Target) -> GridSpec:
    norms = _variants("norm", "model", "all", "first", "none")
    if t.quick:
        # Plain 1-D conv net: without norm it sits on a plateau first, so the target is 0.3.
        # lr 0.02 (MNIST-1D's 0.01 let 'none' need ~160 epochs, too long for 3 seeds in
        # 5 minutes); measured to 0.3 (3 seeds): all 11–14, first 12–15, none 91–111 epochs.
        return _grid("batchnorm", BN_Q,
                     {**MNIST1D, "optim": {**MNIST1D["optim"], "lr": 0.02}, "model": {"name": "cnn1d", "width": 0.5},
                      "epochs": 200, "target_loss": 0.3},
                     {"cnn1d": GroupSpec(claims=[BN_TIED])}, variants=norms)
    # VGG on CIFAR-10: "first" as fast and as large as "all"; on CIFAR-100 all > first. The
    # ResNets: "very similar observations" (appendix B-B), so the same claim per dataset.
    bn = BN_TIED if t.dataset == "cifar10" else BN_CIFAR100
    return _grid("batchnorm", BN_Q, PAPER,
                 {"vgg11": GroupSpec(base=t.net("vgg11", optim={**SGD, "lr": 0.01}), claims=[bn]),
                  "vgg16": GroupSpec(base=t.net("vgg16", optim={**SGD, "lr": 0.01}), claims=[bn]),
                  "resnet18": GroupSpec(base=t.net("resnet18", optim={**SGD, "lr": 0.05}), claims=[bn]),
                  "resnet34": GroupSpec(base=t.net("resnet34", optim={**SGD, "lr": 0.05}), claims=[bn])},
                 variants=norms)


# ------------------------------------------------------------------------------- skip
SKIP_Q = "Do skip connections make γ larger and training faster?"
_MORE_SKIPS = ("the trainings that keep more skip-connections achieve a faster convergence, and the corresponding "
               "optimization trajectories obey the regularity principle with a larger")
_MORE_SKIPS_UNET = ("the trainings that keep more skip-connections achieve a faster convergence and the "
                    "corresponding optimization trajectories obey the regularity principle with a larger")


def skip_claim(order: str, quote: str = _MORE_SKIPS) -> ClaimSpec:
    return claim("More skip connections give a larger γ", order, LONG, quote)


SKIP_RESNET18 = claim("Keeping all skip connections gives a larger γ than the first per block (ResNet-18)",
                      "all > first", LONG, "the ResNet-18 training results in Section B-C, where one can make very "
                                           "similar observations")


def skip(t: Target) -> GridSpec:
    skips = partial(_variants, "skip", "model")
    if t.quick:
        return _grid("skip", SKIP_Q, {**MNIST1D, "epochs": 100, "target_loss": 0.2}, {
            # Measured to 0.2 (3 seeds): all 30–36, first 36–47, none 38–64 epochs (to the
            # former 0.1: 38–83, too long for 3 seeds in 5 minutes).
            "resnet1d": GroupSpec(base={"model": {"name": "resnet1d", "width": 0.5}},
                                  variants=skips("all", "first", "none"),
                                  claims=[skip_claim("all > first > none")]),
            # Depth 2: two skips, so all / last1 (full resolution only) / none. Without skips
            # the loss levels off near 0.063 (it never reached the former target 0.045 in 40
            # epochs, so the claim was always inconclusive); measured to 0.07: all 3, last1 3,
            # none 10 epochs.
            "unet": GroupSpec(base={"model": {"name": "unet", "width": 0.125, "depth": 2}, "loss": "mse",
                                    "data": {"name": "synthetic_denoise", "size": 16, "num_train": 512,
                                             "num_test": 128},
                                    "batch_size": 64, "epochs": 40, "target_loss": 0.07},
                              variants=skips("all", "last1", "none"),
                              claims=[skip_claim("all > last1 > none", _MORE_SKIPS_UNET)])})
    return _grid("skip", SKIP_Q, {**PAPER, "optim": {**SGD, "lr": 0.05}}, {
        "resnet18": GroupSpec(base=t.net("resnet18"), variants=skips("all", "first"), claims=[SKIP_RESNET18]),
        "resnet34": GroupSpec(base=t.net("resnet34"), variants=skips("all", "first2", "first"),
                              claims=[skip_claim("all > first2 > first")]),
        "unet": GroupSpec(base=t.net("unet", optim={"lr": 0.005}),
                          variants=skips("all", "last3", "last2", "last1", "none"),
                          claims=[skip_claim("all > last3 > last2 > last1 > none", _MORE_SKIPS_UNET)])})


# -------------------------------------------------------------------------- optimizer
OPT_Q = "Does the optimizer (SGD, momentum, Adam at lr 0.001) order γ as it orders convergence speed?"
OPTS = {"adam": {"optim": {"name": "adam", "betas": [0.9, 0.999], "eps": 0.01}},
        "momentum": {"optim": {"name": "momentum", "momentum": 0.5}},
        "sgd": {"optim": {"name": "sgd"}}}
# The papers order speed adam > momentum > sgd, but γ only "Adam the largest, the SGD types
# less regularized": no order between momentum and SGD.
OPT_CLAIM = claim("Adam gives the largest γ; SGD with and without momentum smaller", "adam > momentum ≈ sgd", LONG,
                  "the optimization trajectories driven by Adam obey the regularity principle with the largest")
OPT_UNET = claim("Adam gives the largest γ; SGD with and without momentum smaller (U-Net)", "adam > momentum ≈ sgd",
                 LONG, "SGD and SGD with momentum converge much slower and their optimization trajectories obey "
                       "the regularity principle with a smaller")


def optimizer(t: Target) -> GridSpec:
    if t.quick:
        # lr 0.001 as in the papers: plain SGD needs ~170 epochs to loss 0.3 here, Adam ~5;
        # the target makes every cell end at the same loss (DESIGN §1's prototype inverted
        # the ordering only because SGD barely moved in a fixed budget).
        return _grid("optimizer", OPT_Q, {**DIGITS_MLP, "optim": {"lr": 0.001}, "epochs": 250, "target_loss": 0.3},
                     {"mlp_bn": GroupSpec(claims=[OPT_CLAIM])}, variants=OPTS)
    return _grid("optimizer", OPT_Q, {**PAPER, "optim": {"lr": 0.001}},
                 {name: GroupSpec(base=t.net(name), claims=[OPT_UNET if name == "unet" else OPT_CLAIM])
                  for name in ("resnet18", "resnet34", "vgg11", "vgg16", "unet")}, variants=OPTS)


# ----------------------------------------------------------------------- initialization
INIT_Q = "How does the initialization shape γ and convergence, with and without batch norm?"
# A hypothesis, not a paper's claim: a variance-preserving start lets a deep ReLU net
# train at once; a start that halves the signal per layer sits on a plateau first.
INIT_CLAIM = claim("Variance-preserving initializations (LSUV, Kaiming) give a larger γ than Xavier and LeCun in a "
                   "deep ReLU network (hypothesis: no paper states it)", "lsuv ≈ kaiming_in > xavier_normal ≈ lecun")


def init(t: Target) -> GridSpec:
    if t.quick:
        return _grid("init", INIT_Q,
                     {"data": {"name": "digits"}, "batch_size": 128, "reference": QUICK_REF,
                      "model": {"name": "mlp", "width": 64, "depth": 6}, "optim": {"name": "sgd", "lr": 0.05},
                      "epochs": 80, "target_loss": 0.15},
                     {"plain": GroupSpec(), "bn": GroupSpec(base={"model": {"batchnorm": True}})},
                     # The claim's four: default and zero never leave loss 2.30 (no progress).
                     variants=_variants("init", "model", "lsuv", "kaiming_in", "xavier_normal", "lecun"),
                     claims=[INIT_CLAIM], shared_init=False)
    return _grid("init", INIT_Q, {**PAPER, "optim": {**SGD, "lr": 0.01}},
                 {"vgg16_bn": GroupSpec(base=t.net("vgg16", model={"norm": "all"})),
                  "vgg16_plain": GroupSpec(base=t.net("vgg16", model={"norm": "none"}))},
                 variants=_variants("init", "model", *INITS.names()), claims=[INIT_CLAIM], shared_init=False)


# --------------------------------------------------------------------------- registry
SPECS: dict[str, Callable[[Target], GridSpec]] = {
    "activation": activation, "batchnorm": batchnorm, "skip": skip, "optimizer": optimizer, "init": init}


def preset_spec(name: str, preset: str, data_dir: str | None = None) -> GridSpec:
    """The typed grid of study ``name`` in ``preset``.

    Example:
        >>> preset_spec("optimizer", "paper100", "/cifar").groups["vgg11"].base["data"]
        {'name': 'cifar100', 'data_dir': '/cifar'}
    """
    return SPECS[name](Target.of(preset, data_dir))


def build_study(name: str, preset: str = "quick", data_dir: str | None = None) -> Study:
    """The built-in study ``name`` in ``preset`` (what ``STUDIES.get(name)`` returns).

    Example:
        >>> s = build_study("skip", "quick")
        >>> s.groups["unet"], s.seeds
        (['unet-all', 'unet-last1', 'unet-none'], 3)
    """
    return preset_spec(name, preset, data_dir).build(preset)


for _name in SPECS:
    STUDIES.register(_name)(partial(build_study, _name))
