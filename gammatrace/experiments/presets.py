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
claim is marked a hypothesis (no source). Where the papers disagree (VGG-11 on CIFAR-100,
ResNet-18 skips on CIFAR-10) both claims are checked; paper 002's "comparable γ" is an
equivalence within :data:`COMPARABLE_GAMMA`; its "skip connections are more effective in
deeper resnets" a claim across groups about differences (``across``: γ_all − γ_first per
seed, ResNet-34 above ResNet-18).

Quick presets are sized so that every cell can reach a common training loss
(``target_loss``, with ``epochs`` as the cap) on two CPU cores within minutes: γ
normalized by a run's own θ_T is comparable only across runs that end at comparable
losses (DESIGN §1). Every preset runs the seeds per cell with which each of its claims can
reach both verdicts (:func:`seeds_for`: activation 7, batchnorm 6, skip 6 quick / 8 paper, width 6 quick / 7 paper,
optimizer 6, init 7), each quick study in ≤ 10 minutes with ``--workers 2``. A cell that misses the target is flagged by the report and kept out of
the claim check. They read no data folder, except the quick skip study's U-Net: it
reconstructs the digits, or — given ``--data-dir`` — MNIST images from that folder.

Paper presets follow the papers: CIFAR from ``--data-dir`` (the "python version"
folders), batch 128, 150 epochs, no augmentation, CUDA, plain SGD unless the study
varies the optimizer, and one fixed initial point per network shared by all of its
cells (``shared_init``: written to ``OUT/init/<group>-s<seed>.pt`` at study start and
loaded through ``model.init_from`` wherever names and shapes match). The U-Net cells
reconstruct the CIFAR images (the papers say only "MSE loss"; ``task: reconstruct`` of
:mod:`gammatrace.data.tasks`). Every value of every paper cell is in the study's
provenance table (:func:`paper_settings`): the paper's phrase, or "not stated" and the
choice made (tests/test_paper_presets.py compares each with the built configs and finds
each phrase in its paper).

Example:
    >>> from gammatrace.experiments.study import STUDIES
    >>> s = STUDIES.get("batchnorm")("paper", "/data/cifar")
    >>> s.cells["vgg11-none"].data.switches(), s.cells["vgg11-none"].optim.lr
    ({'data_dir': '/data/cifar'}, 0.01)
    >>> [c.order_text for c in s.claims if c.group == "vgg16"], s.seeds
    (['vgg16-all ≈ vgg16-first > vgg16-none'], 6)
    >>> print(next(r.source for r in paper_settings("batchnorm", "paper") if r.cells == "vgg*"))
    001_954b36295a226970.txt: “$\\eta = 0.05$ for ResNet, 0.01 for VGG” (VGG)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gammatrace.config import RunConfig, merge_config
from gammatrace.experiments import sources
from gammatrace.experiments.sources import Setting
from gammatrace.experiments.study import (
    STUDIES,
    ClaimSpec,
    GridSpec,
    GroupSpec,
    HypothesisSpec,
    Source,
    Study,
)
from gammatrace.models.init import INITS
from gammatrace.principles.claims import ALPHA, Order, parse_order

PRESETS = ("quick", "paper", "paper100")
SHORT = "000_236cbbea7b64027d.txt"  # the regularity-principle paper, short version
LONG = "001_954b36295a226970.txt"  # the same study, long version with the appendix
PRINCIPLE = "002_e9418eb884993e44.txt"  # "An Optimization Principle of Deep Learning?" (γ-optimization)
SURVEY = "004_c1755dd0f4887641.txt"  # the survey of neural-network optimization theory


@dataclass(frozen=True)
class Target:
    """What a preset trains on: ``preset``, the CIFAR set of the paper presets and the
    user's ``data_dir`` (None: the reader's default, $GAMMATRACE_DATA, else ./data). The
    quick presets keep ``data_dir`` for their one image task (:meth:`images`): MNIST from
    that folder instead of the digits.

    Example:
        >>> Target.of("paper100", "/cifar").cifar(), Target.of("paper", None).cifar()
        ({'name': 'cifar100', 'data_dir': '/cifar'}, {'name': 'cifar10'})
        >>> Target.of("quick").images()["name"], Target.of("quick", "/mnist").images()["name"]
        ('digits', 'mnist')
    """

    preset: str
    dataset: str | None = None
    data_dir: str | None = None

    @classmethod
    def of(cls, preset: str, data_dir: str | None = None) -> Target:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
        dataset = {"quick": None, "paper": "cifar10", "paper100": "cifar100"}[preset]
        return cls(preset, dataset, data_dir)

    @property
    def quick(self) -> bool:
        return self.preset == "quick"

    def _folder(self) -> dict[str, Any]:
        return {"data_dir": self.data_dir} if self.data_dir is not None else {}

    def cifar(self) -> dict[str, Any]:
        """The data section of a CIFAR cell."""
        return {"name": self.dataset, **self._folder()}

    def images(self) -> dict[str, Any]:
        """The data section of a U-Net cell: the images reconstructed (``task: reconstruct``,
        target the clean image; noise-free, see :data:`RECONSTRUCT`). Paper presets: the
        CIFAR set. Quick: the digits (1×8×8, so a U-Net of depth ≤ 3), or with a data folder
        the first :data:`QUICK_MNIST` MNIST images (1×28×28: depth ≤ 2)."""
        if not self.quick:
            return {**self.cifar(), **RECONSTRUCT}
        if self.data_dir is None:
            return {"name": "digits", **RECONSTRUCT}
        return {"name": "mnist", **self._folder(), **RECONSTRUCT, **QUICK_MNIST}

    def net(self, name: str, **over: Any) -> dict[str, Any]:
        """A paper network's overrides (model, loss, data), with ``over`` merged in:
        cross-entropy on CIFAR, except the U-Net (MSE reconstruction of the CIFAR images,
        depth 4: the papers keep "the last 3,2,1" of its skips)."""
        if name == "unet":
            # norm written out: a choice the papers do not state (see _unet_rows).
            base = {"model": {"name": "unet", "depth": 4, "norm": "all"}, "loss": "mse", "data": self.images()}
        else:
            base = {"model": {"name": name}, "data": self.cifar()}
        return merge_config(base, over)


# The U-Net's task. The papers say only "MSE loss": the clean image is the target, and
# noise-free, so the loss's infimum is 0 as the regularity principle's over-parameterized
# problem (P) assumes (data.noise_std > 0 would make it denoising).
RECONSTRUCT = {"task": "reconstruct", "noise_std": 0.0}
# The quick U-Net on MNIST (given a data folder): the first 1,024 training and 256 test
# images, the digits' scale (1,438 / 359) at 12× the pixels.
QUICK_MNIST = {"n_train": 1024, "n_test": 256}


def claim(text: str, order: str, paper: str | None = None, quote: str | None = None,
          first_epochs: int | None = None, speed: str | None = None,
          equivalent_within: float | None = None) -> ClaimSpec:
    """A claim with the paper's words (``paper`` None: a hypothesis), over the whole run or
    the ``first_epochs`` the paper states it for; ``speed`` the order of convergence speed
    the paper states beside it (fastest first), checked as a verdict of its own;
    ``equivalent_within`` a margin δ that gives each tie its own verdict (|Δγ| < δ).

    Example:
        >>> claim("BN first", "all ≈ first > none", LONG, "converge as fast as").source.paper == LONG
        True
    """
    source = Source(paper=paper, quote=quote) if paper is not None and quote is not None else None
    return ClaimSpec(text=text, order=parse_order(order), source=source, first_epochs=first_epochs,
                     speed=parse_order(speed) if speed is not None else None, equivalent_within=equivalent_within)


def relations(order: Order | None) -> int:
    """The strict relations of a weak order: cross-level pairs of cells.

    Example:
        >>> relations(parse_order("relu ≈ leaky_relu > tanh > sigmoid")), relations(None)
        (5, 0)
    """
    if order is None:
        return 0
    sizes = [len(lv) for lv in order]
    return sum(a * sum(sizes[i + 1:]) for i, a in enumerate(sizes))


# An exact 95 % interval for a tie's median per-seed difference needs 2^(1−n) ≤ 0.05: n ≥ 6.
TIE_SEEDS = 6
SEEDS_WHY = ("seeds per cell: the fewest with which each claim can reach both verdicts by the paired sign test "
             "(2^-n < α for consistent, 2^-n < α / r for not consistent over its r strict relations; ≥ 6 with a "
             "tie)")


def seeds_for(claims: list[ClaimSpec] | list[ClaimSpec | HypothesisSpec]) -> int:
    """Seeds per cell a preset runs: the fewest with which every claim can reach both
    verdicts by the paired sign test — "consistent" needs 2^-n < α, "not consistent"
    2^-n < α / r (Holm over the claim's r strict relations, of the γ order and of the
    speed order) — and at least :data:`TIE_SEEDS` where a claim has a tie (its exact
    95 % interval).

    Example:
        >>> seeds_for([claim("t", "a > b")]), seeds_for([claim("t", "a > b > c")])
        (5, 6)
        >>> seeds_for([claim("t", "relu ≈ leaky_relu > tanh > sigmoid")])  # 5 relations: 2^-7 < 0.05 / 5
        7
    """
    need = 1
    for c in claims:
        r = max(relations(c.order), relations(getattr(c, "speed", None)), 1)  # a hypothesis states no speed
        n = next(n for n in range(1, 64) if 0.5 ** n < ALPHA / r)
        if any(len(lv) > 1 for lv in c.order):
            n = max(n, TIE_SEEDS)
        need = max(need, n)
    return need


def _grid(name: str, question: str, base: dict[str, Any], groups: dict[str, GroupSpec], *,
          variants: dict[str, dict[str, Any]] | None = None, claims: list[ClaimSpec] | None = None,
          shared_init: bool = True, paths: list[str] | None = None,
          across: list[ClaimSpec] | None = None, hypotheses: list[HypothesisSpec] | None = None,
          seeds: int | None = None) -> GridSpec:
    every: list[ClaimSpec | HypothesisSpec] = [
        c for g in groups.values() for c in (g.claims if g.claims is not None else claims or [])]
    every += [*(across or []), *(hypotheses or [])]
    return GridSpec(name=name, question=question, base=base, variants=variants or {}, groups=groups,
                    claims=claims or [], shared_init=shared_init, seeds=seeds or seeds_for(every), paths=paths or [],
                    across=across or [], hypotheses=hypotheses or [])


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


# ------------------------------------------------------------------------- provenance
# Each paper preset's values, row by row (sources.Setting: field, value, source, cells): the
# phrase of the paper that states it, or "not stated" and the choice made. Cells are globs
# over the grid's cell names ("unet-*": the U-Net group, "*-adam": the Adam variant).
# tests/test_paper_presets.py builds every paper preset and checks each row against the
# built configs, each phrase against its paper, and that every value-bearing field of
# every cell (value_fields) is covered by exactly one row.
def said(phrase: str, note: str = "", paper: str = LONG) -> sources.Source:
    """A value stated in ``paper`` (the long regularity paper unless said otherwise)."""
    return sources.Source.quote(phrase, note, paper=paper)


def unstated(choice: str) -> sources.Source:
    """A value no paper states: the choice made and why."""
    return sources.Source.not_stated(choice)


# Run-config fields that are not settings of the experiment: names, how γ is measured and
# stored, and what a study fills in at run time. Everything else of a paper cell is in its
# study's table.
BOOKKEEPING = {
    "name": "the cell's name",
    "eval_batch_size": "the batch of the evaluation passes; the losses do not depend on it",
    "checkpoint_every": "epochs between checkpoints: disk against replay parallelism, same trajectory",
    "model.init_from": "filled in at study start with the shared initial point (study.shared_init)",
    "reference.path": "used by reference kind 'file' only",
    "analysis": "how γ is measured, not how the network is trained (DESIGN §1)",
    "curvature": "what is measured along the path (Hessian eigenvalues, Santurkar's step measurements), not how "
                 "the network is trained: it runs on a copy and leaves the trajectory bitwise unchanged",
}


def value_fields(cfg: RunConfig) -> dict[str, Any]:
    """The value-bearing fields of a run config (dotted path -> JSON value): every leaf but
    :data:`BOOKKEEPING` and the schedule options the named schedule does not take.

    Example:
        >>> f = value_fields(RunConfig.model_validate({"optim": {"name": "adam", "lr": 0.001}}))
        >>> f["optim.betas"], f["schedule.name"], "schedule.factor" in f, "analysis.tail" in f
        ([0.9, 0.999], 'constant', False, False)
    """
    inert = {f"schedule.{k}" for k in type(cfg.schedule).model_fields} - {
        "schedule.name", "schedule.warmup_epochs", *(f"schedule.{k}" for k in cfg.schedule.options())}

    def leaves(obj: Any, path: str) -> dict[str, Any]:
        if isinstance(obj, dict) and obj:
            return {k: v for key, sub in obj.items() for k, v in leaves(sub, f"{path}.{key}" if path else key).items()}
        return {path: obj}

    return {k: v for k, v in leaves(cfg.model_dump(mode="json"), "").items()
            if k not in inert and not any(k == b or k.startswith(b + ".") for b in BOOKKEEPING)}


def _paper_rows(t: Target, *, init: bool = True) -> list[Setting]:
    """The rows every paper study shares (data, device, schedule, reference, …)."""
    rows = [
        Setting("data.name", t.dataset, said("on the CIFAR-10 and CIFAR-100 datasets",
                                             "paper: CIFAR-10, paper100: CIFAR-100")),
        Setting("data.n_train", None, said("on the CIFAR-10 and CIFAR-100 datasets", "the whole training set")),
        Setting("data.n_test", None, said("on the CIFAR-10 and CIFAR-100 datasets", "the whole test set")),
        Setting("data.classes", None, said("on the CIFAR-10 and CIFAR-100 datasets", "every class")),
        Setting("data.augment", "none", unstated("none: the papers name no augmentation, and the principle is "
                                                 "stated for a fixed training set (problem (P))")),
        Setting("device", "cuda", unstated("cuda: the papers train ResNets and VGGs on CIFAR for 150 epochs")),
        Setting("dtype", "float32", unstated("float32, PyTorch's default")),
        Setting("threads", 1, unstated("1 CPU thread: part of a run's bitwise identity; GPU kernels do not use it")),
        Setting("seed", 0, unstated("seeds 0 … n−1 per cell, n = study.seeds (the cell's seed plus the index)")),
        Setting("drop_last", False, said("every data sample is visited once in each epoch",
                                         "a reading of Theorem 1's proof, not of the experiments: the last, short "
                                         "batch of an epoch is kept", paper=PRINCIPLE)),
        Setting("schedule.name", "constant", said("a constant learning rate")),
        Setting("schedule.warmup_epochs", 0.0, said("a constant learning rate", "no warm-up")),
        Setting("optim.weight_decay", 0.0, unstated("0: no weight decay")),
        Setting("optim.clip_grad_norm", None, unstated("no gradient clipping")),
        Setting("target_loss", None, said("we train the network for a sufficient number of epochs to achieve an "
                                          "approximate global minimum", "a fixed number of epochs, no early stop")),
        # The papers' θ* is θ_T (001: "corresponds to the network parameters produced in the last
        # training iteration"); a deviation, so not the papers' value: marked a choice.
        Setting("reference.kind", "continuation", unstated(
            "a deviation: the papers' θ* is the last iterate θ_T (001: \"corresponds to the network parameters "
            "produced in the last training iteration\"), and every run is also analysed against it ('last'); the "
            "claim verdict uses the continuation θ* = θ_{T+10}, trained beyond the horizon so that the telescoping "
            "sum does not close (DESIGN §1)")),
        Setting("reference.extra_epochs", 10, unstated("10 epochs beyond the horizon for the continuation θ*")),
    ]
    if init:
        rows.append(Setting("model.init", "default", unstated(
            "PyTorch's default initialization: the papers fix the initial point, not its distribution")))
    if t.data_dir is not None:
        rows.append(Setting("data.data_dir", t.data_dir, unstated("the folder given as --data-dir")))
    return rows


def _unet_rows(cells: str = "unet-*") -> list[Setting]:
    """The U-Net's rows: depth (from its skips) and its reconstruction task."""
    return [
        Setting("model.depth", 4, said("keep the last 3,2,1 skip-connections",
                                       "inferred: the variants keep all, the last 3, 2, 1 or none of its skips, "
                                       "so it has four, and depth 4 as the U-Net [25] the papers cite"), cells),
        Setting("model.norm", "all", unstated(
            "batch norm after every convolution, our U-Net's default: the papers do not say, and the U-Net [25] "
            "they cite has none"), cells),
        Setting("data.task", "reconstruct", unstated(
            "reconstruction of the image: the papers say only \"MSE loss\" for the U-Net on CIFAR"), cells),
        Setting("data.noise_std", 0.0, unstated(
            "0, the image itself: the loss's infimum is then 0, as the principle's over-parameterized problem "
            "(P) assumes"), cells),
    ]


def _borrowed(rows: list[Setting], why: str) -> list[Setting]:
    """``rows`` with every quoted value turned into a choice: a study no paper runs takes
    another study's settings, so none of its values is stated — the quote says where from."""
    return [r if not r.source.stated else Setting(r.field, r.value, unstated(f"{why}: {r.source}"), r.cells)
            for r in rows]


def _each(field: str, values: dict[str, Any], source: sources.Source) -> list[Setting]:
    """One row per variant (``{cell glob: value}``), all with the same source."""
    return [Setting(field, v, source, cells) for cells, v in values.items()]


# ------------------------------------------------------------------------- activation
ACT_Q = "Does a ReLU-type activation make γ larger and training faster?"
# Speed orders, where the paper states one (each checked as its own verdict beside γ's):
# 001, classification: "the trainings with ReLU types of activation functions converge faster than those
# with tanh activation function, which is further faster than the trainings with sigmoid activation
# function"; U-Net: "the trainings with the sigmoid activation function converge faster than those with
# the ReLU types of activation functions, and the trainings with the tanh activation function converge the
# slowest".
ACT_CLASSIFICATION = claim(
    "ReLU types give the largest γ, sigmoid the smallest (classification)", "relu ≈ leaky_relu > tanh > sigmoid",
    LONG, "the trainings with ReLU types of activation functions satisfy the regularity principle with the largest",
    speed="relu ≈ leaky_relu > tanh > sigmoid")
ACT_UNET = claim(
    "Sigmoid gives the largest γ, tanh the smallest (U-Net regression)", "sigmoid > relu ≈ leaky_relu > tanh",
    LONG, "the training trajectories with the sigmoid activation function obey the regularity principle with the "
          "largest", speed="sigmoid > relu ≈ leaky_relu > tanh")
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


def activation_sources(t: Target) -> list[Setting]:
    """Where the paper activation study's values come from (§III-A of the long paper)."""
    nets = said("We train a variant of the AlexNet [30] and the ResNet-18 [11]")
    explored = said("include sigmoid, tanh, ReLU and leaky ReLU (with slope $10^{-2}$ )")
    classification = ("alexnet_small-*", "resnet18-*")
    return [
        *_paper_rows(t), *_unet_rows(),
        Setting("study.shared_init", True, said("with a fixed initialization point")),
        Setting("study.seeds", 7, unstated(f"7 {SEEDS_WHY}: the ResNet and U-Net claims have 5")),
        Setting("epochs", 150, said("to train these networks for 150 epochs")),
        Setting("batch_size", 128, said("a mini-batch size 128")),
        Setting("model.name", "alexnet_small", said(nets.phrase, "Zhang et al.'s small AlexNet [30]"),
                "alexnet_small-*"),
        Setting("model.name", "resnet18", nets, "resnet18-*"),
        Setting("model.name", "unet", said("Next, we train a U-Net [25] with different choices of activation "
                                           "functions"), "unet-*"),
        *_each("model.activation", {"*-relu": "relu", "*-tanh": "tanh", "*-sigmoid": "sigmoid"}, explored),
        Setting("model.activation", "leaky_relu", said(explored.phrase, "the activation's default slope 0.01"),
                "*-leaky_relu"),
        Setting("optim.name", "sgd", said("We apply the standard SGD optimizer with a fixed initialization point")),
        Setting("optim.lr", 0.05, said(r"a constant learning rate $\eta = 0.05$"), classification),
        Setting("optim.lr", 0.005, said(r"a constant learning rate $\eta = 0.005$"), "unet-*"),
        Setting("loss", "cross_entropy", said("and we use the cross-entropy loss"), classification),
        Setting("loss", "mse", said("and we use the MSE loss"), "unet-*"),
    ]


# ------------------------------------------------------------------------- batch norm
BN_Q = "Does batch normalization make γ larger and training faster?"
BN_TIED = claim(
    "Keeping the first BN layer per block is as good as keeping all; removing BN gives a very small γ",
    "all ≈ first > none", LONG,
    "the trainings that keep the first BN layer in each block converge as fast as those that keep all the BN layers")
# Speed, 001 on the VGGs on CIFAR-100: "the trainings that keep all the BN layers are slightly faster than
# those that keep the first BN layer in each block, and both of them converge much faster than the trainings
# that remove all the BN layers".
BN_CIFAR100 = claim(
    "All BN layers give a larger γ than the first only, and removing BN the smallest (CIFAR-100)",
    "all > first > none", LONG,
    "the training trajectories with all BN layers kept obey the regularity principle with a larger",
    speed="all > first > none")
# The ResNets: the long paper says "very similar observations" to the VGGs' (B-B, over the
# whole run); paper 002 states the orders over the epochs it plots — on CIFAR-10 its no-BN
# ResNets' curves stop where "vanishing gradient occurs after around 25 epochs", on CIFAR-100
# "in the first 20 epochs". Both papers' claims are checked; the report's gradient row shows
# whether and where the no-BN runs' gradients collapse.
_RESNET_SIMILAR = "We also present the ResNet training results in Section B-B, where one can make very similar observations"
BN_TIED_RESNET = claim(
    "Keeping the first BN layer per block is as good as keeping all; removing BN gives a very small γ (ResNets, "
    "as the VGGs)", "all ≈ first > none", LONG, _RESNET_SIMILAR)
BN_CIFAR100_RESNET = claim(
    "All BN layers give a larger γ than the first only, and removing BN the smallest (ResNets, CIFAR-100, as the "
    "VGGs)", "all > first > none", LONG, _RESNET_SIMILAR)
BN_RESNET10 = claim(
    "Removing BN gives a considerably smaller γ, over the first 25 epochs (paper 002 plots the no-BN ResNets up to "
    "their vanishing gradient)", "all ≈ first > none", PRINCIPLE,
    "the γ in the trainings without any BN layer is considerably smaller than that in the trainings with either "
    "one BN layer or all BN layers", first_epochs=25)
BN_RESNET100 = claim(
    "All BN layers give a larger γ than the first only, and removing BN the smallest, in the first 20 epochs "
    "(ResNets, CIFAR-100)", "all > first > none", PRINCIPLE,
    "in the first 20 epochs where the training loss is close to the global minimum, one can see that the γ in the "
    "trainings with all BN layers is larger than that in the trainings with one BN layer in each block",
    first_epochs=20)
# VGG-16 on CIFAR-100, paper 002: "Similar observation is made in the training of the Vgg-16
# network" follows the ResNets' sentence, so it states the same order over the same window (the
# first 20 epochs). Checked beside the long paper's whole-run claim.
BN_VGG16_100 = claim(
    "All BN layers give a larger γ than the first only, and removing BN the smallest, in the first 20 epochs "
    "(VGG-16, CIFAR-100: paper 002's \"similar observation\" to the ResNets')", "all > first > none", PRINCIPLE,
    "Similar observation is made in the training of the Vgg-16 network", first_epochs=20)
# "Comparable γ" (paper 002), tested as an equivalence: |Δ median γ_k| < δ per seed by two one-sided
# exact sign tests. No paper states a margin: δ = 0.025 is a choice, about a tenth of the median γ_k
# of the quick studies' ReLU-type cells (~0.24, README), and wider than their seeds' spread of a
# tie's difference (relu − leaky_relu ~0.002) but narrower than the differences the papers call
# larger (relu − sigmoid ~0.2).
COMPARABLE_GAMMA = 0.025
# VGG-11 on CIFAR-100: the papers disagree. The long paper says of the VGGs "all BN layers kept
# ... a larger γ than that with only the first BN layer kept"; paper 002 names VGG-11: "their γ
# have similar values". Both claims are checked: the data decides between them.
BN_VGG11_100 = claim(
    "The first BN layer per block is as good as all; removing BN gives a much smaller γ (VGG-11, CIFAR-100; the "
    "long paper says all > first)", "all ≈ first > none", PRINCIPLE,
    "the training with one BN layers in each block is sufficient to achieve comparable performance to that of the "
    "training with all BN layers, and their γ have similar values throughout the training",
    equivalent_within=COMPARABLE_GAMMA)


# The survey's statements about batch norm (paper 004 summarising Santurkar et al. and Ghorbani
# et al.), as hypotheses over the curvature measured along each path: the same verdict rule as
# every claim, on each run's median of the statistic instead of its median γ_k. "With BN"
# is every cell that keeps BN layers (all, first): no order is asserted between them.
_SANTURKAR = ("the major benefit of BatchNorm is to reduce the Lipschitz constants (of the objective and the "
              "gradients)")
BN_SURVEY = [
    HypothesisSpec(text="With BN, the largest Hessian eigenvalue λ_1 along the path is smaller (a smaller local "
                        "Lipschitz constant of the gradient)", order="none > all ≈ first", statistic="lambda_1",
                   source=Source(paper=SURVEY, quote=_SANTURKAR), summary_of="Santurkar et al."),
    HypothesisSpec(text="With BN, the effective β-smoothness along the path is smaller", order="none > all ≈ first",
                   statistic="beta_eff", source=Source(paper=SURVEY, quote=_SANTURKAR),
                   summary_of="Santurkar et al."),
    # With k = 3 (the curvature blocks below) λ_1/λ_3 compares the top three eigenvalues, which
    # with 10 classes likely all lie among the outliers: the text says what is measured, a proxy,
    # not Ghorbani et al.'s outliers-against-the-bulk density.
    HypothesisSpec(text="Without BN, λ_1 stands further above λ_3: the median ratio λ_1/λ_3 along the path is "
                        "larger (a top-3 proxy for the survey's large isolated eigenvalues, not the spectral "
                        "density Ghorbani et al. estimate)",
                   order="none > all ≈ first", statistic="outlier_ratio",
                   source=Source(paper=SURVEY, quote="for networks without BatchNorm, there are large isolated "
                                                     "eigenvalues, while for networks with BatchNorm this phenomenon "
                                                     "does not occur"),
                   summary_of="Ghorbani et al."),
]
# Curvature along the quick paths (gammatrace.curvature.CurvatureConfig): λ_1 … λ_3 on a fixed
# subset of 128 training samples and Santurkar's measurements at s = η_k/2, η_k, 2η_k along the
# step, every 25 steps (not at the epoch ends: at 7 (MNIST-1D) to 12 (digits) steps per epoch they
# would be 2–4 times as many; a study measures once per run, its second reference's replay
# reuses the table); no trace (the hypotheses do not read it). Measured alone on one core (the width study's w16, seed 0, every 50 steps: 13 measurements): the replay and analysis
# took 9.1 s against 8.0 s without curvature, ~0.09 s per measurement.
QUICK_CURVATURE = {"every": 25, "k": 3, "trace_samples": 0, "subset": 128, "at_epoch_end": False,
                   "santurkar_steps": (0.5, 1.0, 2.0)}
PAPER_CURVATURE = {"every": 200, "k": 3, "trace_samples": 0, "subset": 512, "at_epoch_end": True}


def batchnorm(t: Target) -> GridSpec:
    norms = _variants("norm", "model", "all", "first", "none")
    if t.quick:
        # Plain 1-D conv net: without norm it sits on a plateau first, so the target is 0.3.
        # lr 0.02 (MNIST-1D's 0.01 let 'none' need ~160 epochs, too long for 3 seeds in
        # 5 minutes); measured to 0.3 (3 seeds): all 11–14, first 12–15, none 91–111 epochs.
        return _grid("batchnorm", BN_Q,
                     {**MNIST1D, "optim": {**MNIST1D["optim"], "lr": 0.02}, "model": {"name": "cnn1d", "width": 0.5},
                      "epochs": 200, "target_loss": 0.3, "curvature": QUICK_CURVATURE},
                     {"cnn1d": GroupSpec(claims=[BN_TIED])}, variants=norms, hypotheses=BN_SURVEY)
    # VGG on CIFAR-10: "first" as fast and as large as "all"; on CIFAR-100 all > first (and for
    # VGG-11 paper 002's "similar values" beside it). The ResNets: the long paper's "very similar
    # observations" over the whole run, and paper 002's claim over the epochs it plots.
    ten = t.dataset == "cifar10"
    vgg = [BN_TIED] if ten else [BN_CIFAR100]
    resnet = [BN_TIED_RESNET, BN_RESNET10] if ten else [BN_CIFAR100_RESNET, BN_RESNET100]
    return _grid("batchnorm", BN_Q, {**PAPER, "curvature": PAPER_CURVATURE},
                 {"vgg11": GroupSpec(base=t.net("vgg11", optim={**SGD, "lr": 0.01}),
                                     claims=vgg if ten else [*vgg, BN_VGG11_100]),
                  "vgg16": GroupSpec(base=t.net("vgg16", optim={**SGD, "lr": 0.01}),
                                     claims=vgg if ten else [*vgg, BN_VGG16_100]),
                  "resnet18": GroupSpec(base=t.net("resnet18", optim={**SGD, "lr": 0.05}), claims=resnet),
                  "resnet34": GroupSpec(base=t.net("resnet34", optim={**SGD, "lr": 0.05}), claims=resnet)},
                 variants=norms, hypotheses=BN_SURVEY)


def batchnorm_sources(t: Target) -> list[Setting]:
    """Where the paper batch-norm study's values come from (§III-B)."""
    nets = said("We train the ResNet-18, 34 and the VGG-11, 16 networks with the settings")
    rate = r"$\eta = 0.05$ for ResNet, 0.01 for VGG"
    return [
        *_paper_rows(t),
        Setting("study.shared_init", True, said("We apply SGD with a fixed initialization")),
        Setting("study.seeds", 6, unstated(f"6 {SEEDS_WHY}: 2 or 3 relations, and a tie")),
        Setting("epochs", 150, unstated("150, as the activation and skip studies: the batch-norm setups name no "
                                        "epoch count")),
        Setting("batch_size", 128, said("and batch size 128 to train these networks")),
        *_each("model.name", {"resnet18-*": "resnet18", "resnet34-*": "resnet34"}, nets),
        *_each("model.name", {"vgg11-*": "vgg11", "vgg16-*": "vgg16"},
               said(nets.phrase, "the CIFAR VGGs have no dropout: \"We remove all dropout layers in the VGG "
                                 "networks\"")),
        *_each("model.norm", {"*-all": "all", "*-first": "first", "*-none": "none"},
               said("1) keep all the BN layers; 2) keep the first BN layer in each block; and 3) remove all the BN "
                    "layers")),
        Setting("optim.name", "sgd", said("We apply SGD with a fixed initialization")),
        Setting("optim.lr", 0.05, said(rate, "ResNet"), "resnet*"),
        Setting("optim.lr", 0.01, said(rate, "VGG"), "vgg*"),
        Setting("loss", "cross_entropy", said("and we use the cross-entropy loss")),
    ]


# ------------------------------------------------------------------------------- skip
SKIP_Q = "Do skip connections make γ larger and training faster?"
_MORE_SKIPS = ("the trainings that keep more skip-connections achieve a faster convergence, and the corresponding "
               "optimization trajectories obey the regularity principle with a larger")
_MORE_SKIPS_UNET = ("the trainings that keep more skip-connections achieve a faster convergence and the "
                    "corresponding optimization trajectories obey the regularity principle with a larger")


def skip_claim(order: str, quote: str = _MORE_SKIPS) -> ClaimSpec:
    # The quote states speed too ("keep more skip-connections achieve a faster convergence"): the same order.
    return claim("More skip connections give a larger γ", order, LONG, quote, speed=order)


# ResNet-18: the long paper says "very similar observations" to ResNet-34's, without a dataset;
# paper 002 names them: on CIFAR-100 more skips give a larger γ, on CIFAR-10 "both trainings have
# comparable γ values". On CIFAR-10 the papers disagree, and both claims are checked (as for
# VGG-11 on CIFAR-100): 001's all > first, and 002's tie as an equivalence within δ.
SKIP_RESNET18 = claim("Keeping all skip connections gives a larger γ than the first per block (ResNet-18; paper "
                      "002 reports comparable γ on CIFAR-10)",
                      "all > first", LONG, "the ResNet-18 training results in Section B-C, where one can make very "
                                           "similar observations")
SKIP_RESNET18_100 = claim("Keeping all skip connections gives a larger γ than the first per block (ResNet-18, "
                          "CIFAR-100)", "all > first", PRINCIPLE,
                          "the training with more skip connections achieves a slightly faster convergence, and the "
                          "corresponding γ value is larger than that in the training with one skip connections",
                          speed="all > first")
SKIP_RESNET18_10 = claim("Keeping the first skip connection per block gives a γ comparable to keeping all "
                         "(ResNet-18, CIFAR-10; the long paper says all > first)", "all ≈ first", PRINCIPLE,
                         "both trainings have comparable γ values", equivalent_within=COMPARABLE_GAMMA)
# "skip connections are more effective in deeper resnets" (002, after Fig. 4, of both datasets): a
# claim about differences — the gain of keeping all skips over the first per block, γ_all − γ_first
# per seed, is larger for ResNet-34 than for ResNet-18 (the paired sign test on the per-seed
# differences of those differences; a seed's cells share its batch order).
SKIP_DEEPER = claim("Skip connections are more effective in the deeper ResNet: γ_all − γ_first is larger for "
                    "ResNet-34 than for ResNet-18", "resnet34-all − resnet34-first > resnet18-all − resnet18-first",
                    PRINCIPLE, "Our training results imply that skip connections are more effective in deeper resnets")


def skip(t: Target) -> GridSpec:
    skips = partial(_variants, "skip", "model")
    if t.quick:
        return _grid("skip", SKIP_Q, {**MNIST1D, "epochs": 100, "target_loss": 0.2}, {
            # Measured to 0.2 (3 seeds): all 30–36, first 36–47, none 38–64 epochs (to the
            # former 0.1: 38–83, too long for 3 seeds in 5 minutes).
            "resnet1d": GroupSpec(base={"model": {"name": "resnet1d", "width": 0.5}},
                                  variants=skips("all", "first", "none"),
                                  claims=[skip_claim("all > first > none")]),
            # Reconstruction of the images (as the paper U-Net's, data.task reconstruct): the digits
            # (1×8×8: depth ≤ 3), or given --data-dir the first 1,024 MNIST images (1×28×28: depth
            # ≤ 2). Depth 2: two skips, so all / last1 (full resolution only) / none. Momentum 0.9
            # at lr 0.03, batch 64. Measured with the study runner (3 seeds s0/s1/s2, replay and
            # analysis, --workers 2 on 2 shared cores), epochs to the target: digits to 0.015:
            # all 2/2/2, last1 2/2/2, none 26/26/24 (final losses 0.011–0.015, within 1.4×; the
            # group in 110 s). MNIST to 0.003, measured on a stand-in (no MNIST here: the digits
            # upscaled to 20×20 in a 28×28 frame, written as IDX files): all 5/5/4, last1 5/4/4,
            # none 22/19/19 (final losses within 1.7×; 320 s: the MNIST variant outgrows the quick
            # presets' 5 minutes).
            "unet": GroupSpec(base={"model": {"name": "unet", "width": 0.125, "depth": 2}, "loss": "mse",
                                    "data": t.images(), "optim": {"lr": 0.03}, "batch_size": 64, "epochs": 60,
                                    "target_loss": 0.015 if t.data_dir is None else 0.003},
                              variants=skips("all", "last1", "none"),
                              claims=[skip_claim("all > last1 > none", _MORE_SKIPS_UNET)])})
    return _grid("skip", SKIP_Q, {**PAPER, "optim": {**SGD, "lr": 0.05}}, {
        "resnet18": GroupSpec(base=t.net("resnet18"), variants=skips("all", "first"),
                              claims=[SKIP_RESNET18, SKIP_RESNET18_10] if t.dataset == "cifar10"
                              else [SKIP_RESNET18_100]),
        "resnet34": GroupSpec(base=t.net("resnet34"), variants=skips("all", "first2", "first"),
                              claims=[skip_claim("all > first2 > first")]),
        "unet": GroupSpec(base=t.net("unet", optim={"lr": 0.005}),
                          variants=skips("all", "last3", "last2", "last1", "none"),
                          claims=[skip_claim("all > last3 > last2 > last1 > none", _MORE_SKIPS_UNET)])},
                 across=[SKIP_DEEPER])


def skip_sources(t: Target) -> list[Setting]:
    """Where the paper skip study's values come from (§III-C)."""
    resnets = ("resnet18-*", "resnet34-*")
    return [
        *_paper_rows(t), *_unet_rows(),
        Setting("study.shared_init", True, said("with a fixed initialization point")),
        Setting("study.seeds", 8, unstated(f"8 {SEEDS_WHY}: the U-Net claim has 10")),
        Setting("epochs", 150, said("to train these networks for 150 epochs")),
        Setting("batch_size", 128, said(r"a constant learning rate $\eta = 0.05$ and batch size 128"), resnets),
        Setting("batch_size", 128, said("a mini-batch size 128"), "unet-*"),
        Setting("model.name", "resnet18", said("We train the ResNet-18 with the settings"), "resnet18-*"),
        Setting("model.name", "resnet34", said("For the ResNet-34, we consider an additional setting"), "resnet34-*"),
        Setting("model.name", "unet", said("We also train a U-Net on the CIFAR-10 and CIFAR-100 datasets"), "unet-*"),
        *_each("model.skip", {"resnet*-all": "all", "resnet*-first": "first"},
               said("1) keep all the skip-connections; and 2) keep the first skip-connection in each block")),
        Setting("model.skip", "first2", said("we keep the first two skip-connections in each block"),
                "resnet34-first2"),
        *_each("model.skip", {f"unet-{v}": v for v in ("all", "last3", "last2", "last1", "none")},
               said("1) keep all the skip-connections; 2) keep the last 3,2,1 skip-connections, respectively and 3) "
                    "remove all the skip-connections")),
        Setting("optim.name", "sgd", said("We apply SGD with a fixed initialization point"), resnets),
        Setting("optim.name", "sgd", said("We apply the standard SGD optimizer with a fixed initialization point"),
                "unet-*"),
        Setting("optim.lr", 0.05, said(r"a constant learning rate $\eta = 0.05$"), resnets),
        Setting("optim.lr", 0.005, said(r"a constant learning rate $\eta = 0.005$"), "unet-*"),
        Setting("loss", "cross_entropy", said("and use the cross-entropy loss"), resnets),
        Setting("loss", "mse", said("and we use the MSE loss"), "unet-*"),
    ]


# -------------------------------------------------------------------------- optimizer
OPT_Q = "Does the optimizer (SGD, momentum, Adam at lr 0.001) order γ as it orders convergence speed?"
OPTS = {"adam": {"optim": {"name": "adam", "betas": [0.9, 0.999], "eps": 0.01}},
        "momentum": {"optim": {"name": "momentum", "momentum": 0.5}},
        "sgd": {"optim": {"name": "sgd"}}}
# The papers order speed adam > momentum > sgd, but γ only "Adam the largest, the SGD types
# less regularized": no order between momentum and SGD.
# Speed, checked as its own verdict: 001 "In all these trainings, the Adam algorithm achieves the fastest
# convergence and is followed by the SGD with momentum, whereas the vanilla SGD achieves the slowest
# convergence"; 002 "the SGD with momentum trainings achieve significantly faster convergence speed than that
# achieved by the SGD trainings, and the Adam trainings converge the fastest".
OPT_SPEED = "adam > momentum > sgd"
OPT_CLAIM = claim("Adam gives the largest γ; SGD with and without momentum smaller", "adam > momentum ≈ sgd", LONG,
                  "the optimization trajectories driven by Adam obey the regularity principle with the largest",
                  speed=OPT_SPEED)
OPT_UNET = claim("Adam gives the largest γ; SGD with and without momentum smaller (U-Net)", "adam > momentum ≈ sgd",
                 LONG, "SGD and SGD with momentum converge much slower and their optimization trajectories obey "
                       "the regularity principle with a smaller", speed=OPT_SPEED)


# Paper 002's Fig. 12: "we store the optimization paths generated by both the SGD with
# momentum and Adam" — the report draws each on its own PCA plane with the SGD direction.
OPT_PATHS = ["momentum", "adam"]


def optimizer(t: Target) -> GridSpec:
    if t.quick:
        # lr 0.001 as in the papers: plain SGD needs ~170 epochs to loss 0.3 here, Adam ~5;
        # the target makes every cell end at the same loss (DESIGN §1's prototype inverted
        # the ordering only because SGD barely moved in a fixed budget).
        return _grid("optimizer", OPT_Q, {**DIGITS_MLP, "optim": {"lr": 0.001}, "epochs": 250, "target_loss": 0.3},
                     {"mlp_bn": GroupSpec(claims=[OPT_CLAIM])}, variants=OPTS, paths=OPT_PATHS)
    return _grid("optimizer", OPT_Q, {**PAPER, "optim": {"lr": 0.001}},
                 {name: GroupSpec(base=t.net(name), claims=[OPT_UNET if name == "unet" else OPT_CLAIM])
                  for name in ("resnet18", "resnet34", "vgg11", "vgg16", "unet")}, variants=OPTS, paths=OPT_PATHS)


def optimizer_sources(t: Target) -> list[Setting]:
    """Where the paper optimizer study's values come from (§IV)."""
    classification = ("resnet*", "vgg*")
    adam = said(r"$\beta_1 = 0.9, \beta_2 = 0.999, \epsilon = 10^{-2}$")
    return [
        *_paper_rows(t), *_unet_rows(),
        Setting("study.shared_init", True, said("We apply a fixed initialization")),
        Setting("study.seeds", 6, unstated(f"6 {SEEDS_WHY}: the speed order has 3, and the γ order a tie")),
        Setting("epochs", 150, unstated("150, as the activation and skip studies: the optimizer setups name no "
                                        "epoch count (paper 002 shows γ beyond 50 epochs)")),
        Setting("batch_size", 128, said("and batch size 128 to all the optimizers"), classification),
        Setting("batch_size", 128, said("a mini-batch size 128 to all the optimizers"), "unet-*"),
        *_each("model.name", {f"{n}-*": n for n in ("resnet18", "resnet34", "vgg11", "vgg16")},
               said("We train the ResNet-18, 34 and the VGG-11, 16 networks using SGD, SGD with momentum and Adam")),
        Setting("model.name", "unet", said("we train a U-Net on the CIFAR-10 and CIFAR-100 datasets using SGD, SGD "
                                           "with momentum and Adam"), "unet-*"),
        *_each("optim.name", {"*-sgd": "sgd", "*-momentum": "momentum", "*-adam": "adam"},
               said("using SGD, SGD with momentum and Adam")),
        Setting("optim.lr", 0.001, said(r"a constant learning rate $\eta = 0.001$")),
        Setting("optim.momentum", 0.5, said("We set the momentum to be 0.5"), "*-momentum"),
        Setting("optim.betas", [0.9, 0.999], adam, "*-adam"),
        Setting("optim.eps", 0.01, adam, "*-adam"),
        Setting("loss", "cross_entropy", said("and we use the cross-entropy loss"), classification),
        Setting("loss", "mse", said("and use the MSE loss"), "unet-*"),
    ]


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


def init_sources(t: Target) -> list[Setting]:
    """Where the paper initialization study's values come from: no paper runs one (its claim
    is a hypothesis), so it takes the batch-norm study's VGG-16 setup."""
    bn = "the batch-norm study's VGG setup; no paper runs an initialization study"
    return _borrowed([
        *_paper_rows(t, init=False),
        *_each("model.init", {f"*-{name}": name for name in INITS.names()},
               unstated("every scheme of the initialization registry: the technique compared")),
        Setting("study.shared_init", False, unstated("no shared point: the initial point is what is compared")),
        Setting("study.seeds", 7, unstated(f"7 {SEEDS_WHY}: the claim has 4")),
        Setting("epochs", 150, unstated("150, as the activation and skip studies")),
        Setting("batch_size", 128, said("and batch size 128 to train these networks", bn)),
        Setting("model.name", "vgg16", said("We train the ResNet-18, 34 and the VGG-11, 16 networks with the settings",
                                            "VGG-16 with all its BN layers and with none, as in the batch-norm study")),
        *_each("model.norm", {"vgg16_bn-*": "all", "vgg16_plain-*": "none"},
               said("1) keep all the BN layers; 2) keep the first BN layer in each block; and 3) remove all the BN "
                    "layers", "all and none")),
        Setting("optim.name", "sgd", said("We apply SGD with a fixed initialization", bn)),
        Setting("optim.lr", 0.01, said(r"$\eta = 0.05$ for ResNet, 0.01 for VGG", bn)),
        Setting("loss", "cross_entropy", said("and we use the cross-entropy loss", bn)),
    ], "as the batch-norm study (no paper runs an initialization study)")


# ------------------------------------------------------------------------------ width
WIDTH_Q = "Does a wider network have a smoother path (smaller λ_1), and how does γ go with it?"
# The survey (004, over-parameterization): "It is widely believed that “more parameters than
# necessary” can smooth the landscape" — its summary of other papers' belief, stated without a
# measure of smoothness. Read here as: the wider the network, the smaller the median λ_1 along
# the path (a hypothesis; its verdict by the claims' rule on each run's median λ_1).
WIDTH_SURVEY = HypothesisSpec(
    text="Wider networks have a smoother path: the wider, the smaller the median λ_1 along it",
    order="w16 > w128 > w512", statistic="lambda_1",
    source=Source(paper=SURVEY, quote="can smooth the landscape"),
    summary_of="the works it cites [131, 154, 244] (“more parameters than necessary”)")
# γ beside it, a hypothesis no paper states: if a wider network's path is smoother, the
# γ-principle's reading (a larger γ on a better-conditioned path) predicts a larger γ the wider it is.
WIDTH_GAMMA = claim("Wider networks give a larger γ (hypothesis: no paper states it; the smoother-landscape reading "
                    "of the survey's statement)", "w512 > w128 > w16")
# Three widths, 32× apart end to end: with 3 relations 6 seeds reach both verdicts (four widths,
# 6 relations, would need 7 seeds: 28 runs, past the quick presets' 5 minutes on 2 cores).
QUICK_WIDTHS = (16, 128, 512)
PAPER_WIDTHS = (0.25, 0.5, 1, 2)  # multipliers of the ResNet-18's channels (1: the paper network)


def _paper_width(w: float) -> str:
    return "w" + f"{w:g}".replace(".", "_")


def width(t: Target) -> GridSpec:
    if t.quick:
        # The digits MLP without batch norm (batch norm would confound the curvature compared), plain
        # SGD at lr 0.1 to a common loss 0.3. Measured to 0.3 (seed 0, no curvature, one core): w16 51,
        # w64 33, w256 23 epochs; w16 trains (with its 5 continuation epochs) in 10 s, and each
        # replay with its analysis takes 8 s.
        return _grid("width", WIDTH_Q,
                     {"data": {"name": "digits"}, "batch_size": 128, "reference": QUICK_REF,
                      "model": {"name": "mlp", "depth": 3}, "optim": {"name": "sgd", "lr": 0.1},
                      "epochs": 150, "target_loss": 0.3, "curvature": QUICK_CURVATURE},
                     {"mlp": GroupSpec()},
                     variants={f"w{w}": {"model": {"width": w}} for w in QUICK_WIDTHS},
                     claims=[WIDTH_GAMMA], hypotheses=[WIDTH_SURVEY], shared_init=False)
    # ResNet-18 on CIFAR at a width multiplier, the batch-norm study's ResNet setup otherwise.
    order = " > ".join(_paper_width(w) for w in PAPER_WIDTHS)
    gamma = " > ".join(_paper_width(w) for w in reversed(PAPER_WIDTHS))
    return _grid("width", WIDTH_Q, {**PAPER, "optim": {**SGD, "lr": 0.05}, "curvature": PAPER_CURVATURE},
                 {"resnet18": GroupSpec(base=t.net("resnet18"))},
                 variants={_paper_width(w): {"model": {"width": w}} for w in PAPER_WIDTHS},
                 claims=[WIDTH_GAMMA.model_copy(update={"order": parse_order(gamma)})],
                 hypotheses=[WIDTH_SURVEY.model_copy(update={"order": parse_order(order)})], shared_init=False)


def width_sources(t: Target) -> list[Setting]:
    """Where the paper width study's values come from: no paper runs one (its statement is the
    survey's summary), so it takes the batch-norm study's ResNet-18 setup."""
    bn = "the batch-norm study's ResNet setup; no paper runs a width study"
    return _borrowed([
        *_paper_rows(t),
        *_each("model.width", {_paper_width(w): w for w in PAPER_WIDTHS},
               unstated("the ResNet-18's channel multiplier: the technique compared (1: the paper network)")),
        Setting("study.shared_init", False, unstated("no shared point: the widths' parameters have different "
                                                     "shapes, so each width starts from its own draw")),
        Setting("study.seeds", 7, unstated(f"7 {SEEDS_WHY}: the width hypothesis has 6")),
        Setting("epochs", 150, unstated("150, as the activation and skip studies")),
        Setting("batch_size", 128, said("and batch size 128 to train these networks", bn)),
        Setting("model.name", "resnet18", said("We train the ResNet-18, 34 and the VGG-11, 16 networks with the "
                                               "settings", bn)),
        Setting("optim.name", "sgd", said("We apply SGD with a fixed initialization", bn)),
        Setting("optim.lr", 0.05, said(r"$\eta = 0.05$ for ResNet, 0.01 for VGG", bn)),
        Setting("loss", "cross_entropy", said("and we use the cross-entropy loss", bn)),
    ], "as the batch-norm study (no paper runs a width study)")


# --------------------------------------------------------------------------- registry
SPECS: dict[str, Callable[[Target], GridSpec]] = {
    "activation": activation, "batchnorm": batchnorm, "skip": skip, "optimizer": optimizer, "init": init,
    "width": width}


# Each study's provenance table (paper presets).
PAPER_SOURCES: dict[str, Callable[[Target], list[Setting]]] = {
    "activation": activation_sources, "batchnorm": batchnorm_sources, "skip": skip_sources,
    "optimizer": optimizer_sources, "init": init_sources, "width": width_sources}


def paper_settings(name: str, preset: str = "paper", data_dir: str | None = None) -> tuple[Setting, ...]:
    """Study ``name``'s provenance table in paper preset ``preset``: each value of its cells
    with the phrase of the paper that states it, or "not stated" and the choice made.

    Example:
        >>> rows = [r for r in paper_settings("optimizer", "paper100") if r.cells == "*-adam"]
        >>> [(r.field, r.value) for r in rows]
        [('optim.name', 'adam'), ('optim.betas', [0.9, 0.999]), ('optim.eps', 0.01)]
        >>> print(rows[2].source)
        001_954b36295a226970.txt: “$\\beta_1 = 0.9, \\beta_2 = 0.999, \\epsilon = 10^{-2}$”
    """
    target = Target.of(preset, data_dir)
    if target.quick:
        raise ValueError("the quick presets stand in for the papers' settings; their values are measured, "
                         "not quoted (see each study's comments)")
    return tuple(PAPER_SOURCES[name](target))


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
        (['unet-all', 'unet-last1', 'unet-none'], 6)
    """
    return preset_spec(name, preset, data_dir).build(preset)


for _name in SPECS:
    STUDIES.register(_name)(partial(build_study, _name))
