"""Every built-in claim's order is pinned to the paper's words.

Each row below states, for one network of one study and preset, the order of γ the paper
claims (largest first; ≈: the paper asserts no order between those cells), the paper file in
``../shared/papers/`` and the phrase that says so. The test checks that the study's claim
has exactly that order and cites that phrase, and — when the papers folder is present —
that the phrase is in the paper (whitespace normalized: the text files break lines and pad
formulas with spaces). The init study's claim is a hypothesis: no paper states it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gammatrace.experiments import STUDIES
from gammatrace.principles.claims import order_text

PAPERS = Path(__file__).resolve().parents[1].parent / "shared" / "papers"
LONG = "001_954b36295a226970.txt"  # "...Regularize Optimization Trajectory", long version
SHORT = "000_236cbbea7b64027d.txt"  # the same study, short version
PRINCIPLE = "002_e9418eb884993e44.txt"  # "An Optimization Principle of Deep Learning?"
# Claims a paper states over the first epochs only: (study, preset, group, paper) -> epochs.
WINDOWS = {("batchnorm", "paper", "resnet18", PRINCIPLE): 25, ("batchnorm", "paper", "resnet34", PRINCIPLE): 25,
           ("batchnorm", "paper100", "resnet18", PRINCIPLE): 20, ("batchnorm", "paper100", "resnet34", PRINCIPLE): 20,
           ("batchnorm", "paper100", "vgg16", PRINCIPLE): 20}
# Claims a paper states as "comparable" γ: an equivalence margin δ on each tie, (study, preset, group, paper) -> δ.
MARGINS = {("batchnorm", "paper100", "vgg11", PRINCIPLE): 0.025, ("skip", "paper", "resnet18", PRINCIPLE): 0.025}
RESNET_SIMILAR = "We also present the ResNet training results in Section B-B, where one can make very similar observations"

# (study, preset, group) -> (claimed order, paper, the phrase stating it); a group whose papers
# state two claims (the long paper over the whole run, paper 002 over a window or naming the
# network) has a list of them.
PINNED = {
    # §III-A: "the trainings with ReLU types of activation functions satisfy the regularity
    # principle with the largest γ, whereas the trainings with sigmoid activation function have
    # the smallest γ" (ResNet-18, classification): ReLU ≈ leaky ReLU on top, tanh in between.
    ("activation", "paper", "resnet18"): (
        "relu ≈ leaky_relu > tanh > sigmoid", LONG,
        "the trainings with ReLU types of activation functions satisfy the regularity principle with the largest"),
    ("activation", "quick", "mlp_bn"): (
        "relu ≈ leaky_relu > tanh > sigmoid", LONG,
        "the trainings with ReLU types of activation functions satisfy the regularity principle with the largest"),
    # U-Net regression: "the training trajectories with the sigmoid activation function obey the
    # regularity principle with the largest γ, whereas ... tanh ... the smallest γ".
    ("activation", "paper", "unet"): (
        "sigmoid > relu ≈ leaky_relu > tanh", LONG,
        "the training trajectories with the sigmoid activation function obey the regularity principle with the "
        "largest"),
    # Appendix B-A (AlexNet): only sigmoid is singled out.
    ("activation", "paper", "alexnet_small"): (
        "relu ≈ leaky_relu ≈ tanh > sigmoid", LONG,
        "under the sigmoid activation is much smaller than those under the other activation functions"),
    # §III-B, VGG on CIFAR-10: first converges as fast as all, both with a large γ; none very small.
    ("batchnorm", "paper", "vgg16"): (
        "all ≈ first > none", LONG,
        "the trainings that keep the first BN layer in each block converge as fast as those that keep all the BN "
        "layers"),
    # The ResNets: "very similar observations" (001, B-B, whole run), and paper 002 over the epochs it
    # plots (the no-BN ResNets "up to the epoch when gradient vanishes", "after around 25 epochs").
    ("batchnorm", "paper", "resnet18"): [
        ("all ≈ first > none", LONG, RESNET_SIMILAR),
        ("all ≈ first > none", PRINCIPLE,
         "the γ in the trainings without any BN layer is considerably smaller than that in the trainings with either "
         "one BN layer or all BN layers")],
    ("batchnorm", "quick", "cnn1d"): (
        "all ≈ first > none", LONG,
        "the trainings that keep the first BN layer in each block converge as fast as those that keep all the BN "
        "layers"),
    # CIFAR-100 (Fig. 5): "all BN layers kept obey the regularity principle with a larger γ than
    # that with only the first BN layer kept".
    # VGG-11 on CIFAR-100: the papers disagree, both are checked — 002 names VGG-11: "their γ have
    # similar values throughout the training".
    ("batchnorm", "paper100", "vgg11"): [
        ("all > first > none", LONG,
         "the training trajectories with all BN layers kept obey the regularity principle with a larger"),
        ("all ≈ first > none", PRINCIPLE,
         "the training with one BN layers in each block is sufficient to achieve comparable performance to that of "
         "the training with all BN layers, and their γ have similar values throughout the training")],
    # VGG-16 on CIFAR-100: the long paper over the whole run, and paper 002's "Similar observation"
    # right after its ResNet sentence "in the first 20 epochs ... all BN layers ... larger".
    ("batchnorm", "paper100", "vgg16"): [
        ("all > first > none", LONG,
         "the training trajectories with all BN layers kept obey the regularity principle with a larger"),
        ("all > first > none", PRINCIPLE, "Similar observation is made in the training of the Vgg-16 network")],
    # ResNets on CIFAR-100: 001 "very similar observations" to the VGGs' (whole run), and paper 002
    # "in the first 20 epochs ... the γ in the trainings with all BN layers is larger than that in
    # the trainings with one BN layer in each block, and ... without any BN layer ... the smallest".
    **{("batchnorm", "paper100", net): [
        ("all > first > none", LONG, RESNET_SIMILAR),
        ("all > first > none", PRINCIPLE,
         "in the first 20 epochs where the training loss is close to the global minimum, one can see that the γ in "
         "the trainings with all BN layers is larger than that in the trainings with one BN layer in each block")]
       for net in ("resnet18", "resnet34")},
    # §III-C: more skip connections, larger γ (ResNet-34; ResNet-18 "very similar"; U-Net "similar").
    ("skip", "paper", "resnet34"): (
        "all > first2 > first", LONG,
        "the trainings that keep more skip-connections achieve a faster convergence, and the corresponding "
        "optimization trajectories obey the regularity principle with a larger"),
    # ResNet-18: 001 without a dataset; 002 names CIFAR-100, and on CIFAR-10 reports comparable γ:
    # both papers' claims are checked there, 002's as an equivalence within δ.
    ("skip", "paper", "resnet18"): [
        ("all > first", LONG,
         "the ResNet-18 training results in Section B-C, where one can make very similar observations"),
        ("all ≈ first", PRINCIPLE, "both trainings have comparable γ values")],
    ("skip", "paper100", "resnet18"): (
        "all > first", PRINCIPLE,
        "the training with more skip connections achieves a slightly faster convergence, and the corresponding γ "
        "value is larger than that in the training with one skip connections"),
    ("skip", "paper", "unet"): (
        "all > last3 > last2 > last1 > none", LONG,
        "the trainings that keep more skip-connections achieve a faster convergence and the corresponding "
        "optimization trajectories obey the regularity principle with a larger"),
    ("skip", "quick", "resnet1d"): (
        "all > first > none", LONG,
        "the trainings that keep more skip-connections achieve a faster convergence, and the corresponding "
        "optimization trajectories obey the regularity principle with a larger"),
    ("skip", "quick", "unet"): (
        "all > last1 > none", LONG,
        "the trainings that keep more skip-connections achieve a faster convergence and the corresponding "
        "optimization trajectories obey the regularity principle with a larger"),
    # §IV: Adam the largest γ, "the SGD types of algorithms ... less regularized": speed orders
    # momentum before SGD, γ does not.
    ("optimizer", "paper", "resnet18"): (
        "adam > momentum ≈ sgd", LONG,
        "the optimization trajectories driven by Adam obey the regularity principle with the largest"),
    ("optimizer", "paper", "unet"): (
        "adam > momentum ≈ sgd", LONG,
        "SGD and SGD with momentum converge much slower and their optimization trajectories obey the regularity "
        "principle with a smaller"),
    ("optimizer", "quick", "mlp_bn"): (
        "adam > momentum ≈ sgd", LONG,
        "the optimization trajectories driven by Adam obey the regularity principle with the largest"),
    # No paper: a hypothesis.
    ("init", "quick", "plain"): ("lsuv ≈ kaiming_in > xavier_normal ≈ lecun", None, None),
    # No paper (issue 24): γ beside the survey's width statement, a hypothesis.
    ("width", "quick", "mlp"): ("w512 > w128 > w16", None, None),
    ("width", "paper", "resnet18"): ("w2 > w1 > w0_5 > w0_25", None, None),
}


# Claims across groups, over cell names (study, preset) -> [(order, paper, phrase)]: 002's "skip
# connections are more effective in deeper resnets" (of both datasets) as a claim about differences.
DEEPER = ("resnet34-all − resnet34-first > resnet18-all − resnet18-first", PRINCIPLE,
          "Our training results imply that skip connections are more effective in deeper resnets")
ACROSS = {("skip", "paper"): [DEEPER], ("skip", "paper100"): [DEEPER]}


def normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _pinned(key) -> list[tuple]:
    value = PINNED[key]
    return value if isinstance(value, list) else [value]


def _claims(study: str, preset: str, group: str):
    s = STUDIES.get(study)(preset, None)
    prefix = f"{group}-" if len(s.groups) > 1 else ""
    return [c for c in s.claims if c.group == group], prefix


@pytest.mark.parametrize("key", list(PINNED), ids=["/".join(k) for k in PINNED])
def test_claim_order_is_the_papers(key):
    claims, prefix = _claims(*key)
    assert len(claims) == len(_pinned(key)), key  # every claim of the group is pinned
    for claim, (order, paper, phrase) in zip(claims, _pinned(key), strict=True):
        assert order_text(claim.order) == " > ".join(" ≈ ".join(prefix + c for c in lv.split(" ≈ "))
                                                     for lv in order.split(" > "))
        if paper is None:
            assert claim.source is None and "hypothesis" in claim.text
        else:
            assert claim.source == f"{paper}: “{phrase}”"
        assert claim.first_epochs == WINDOWS.get((*key, paper)), key
        assert claim.equivalent_within == MARGINS.get((*key, paper)), key


def _across(study: str, preset: str):
    s = STUDIES.get(study)(preset, None)
    return [c for c in s.claims if c.group not in s.groups]


@pytest.mark.parametrize("key", list(ACROSS), ids=["/".join(k) for k in ACROSS])
def test_claims_across_groups_are_the_papers(key):
    claims = _across(*key)
    assert len(claims) == len(ACROSS[key])
    for claim, (order, paper, phrase) in zip(claims, ACROSS[key], strict=True):
        assert claim.order_text == order and claim.source == f"{paper}: “{phrase}”"
        # A claim about differences: each side is γ_all − γ_first of one network, per seed.
        assert claim.differences == {"resnet34-all − resnet34-first": ("resnet34-all", "resnet34-first"),
                                     "resnet18-all − resnet18-first": ("resnet18-all", "resnet18-first")}
        assert claim.group == "resnet34, resnet18" and claim.first_epochs is None
        if PAPERS.is_dir():
            assert normalized(phrase) in normalized((PAPERS / paper).read_text(encoding="utf-8"))


def test_no_other_claim_spans_groups():
    for name in STUDIES.names():
        for preset in ("quick", "paper", "paper100"):
            assert len(_across(name, preset)) == len(ACROSS.get((name, preset), [])), (name, preset)


def test_every_windowed_claim_is_pinned():
    for name in STUDIES.names():
        for preset in ("quick", "paper", "paper100"):
            for c in STUDIES.get(name)(preset, None).claims:
                paper = c.source.split(": ", 1)[0] if c.source else None
                assert c.first_epochs == WINDOWS.get((name, preset, c.group, paper)), (name, preset, c.group)


@pytest.mark.skipif(not PAPERS.is_dir(), reason="../shared/papers/ is not here")
@pytest.mark.parametrize("key", list(PINNED), ids=["/".join(k) for k in PINNED])
def test_phrase_is_in_the_paper(key):
    for _, paper, phrase in _pinned(key):
        if paper is not None:
            assert normalized(phrase) in normalized((PAPERS / paper).read_text(encoding="utf-8")), (paper, phrase)


@pytest.mark.skipif(not PAPERS.is_dir(), reason="../shared/papers/ is not here")
def test_every_built_in_claim_cites_a_phrase_of_its_paper():
    # Beyond the pinned rows: every claim of every preset quotes its paper verbatim.
    texts = {p.name: normalized(p.read_text(encoding="utf-8")) for p in PAPERS.glob("*.txt")}
    for name in STUDIES.names():
        for preset in ("quick", "paper", "paper100"):
            for claim in STUDIES.get(name)(preset, None).claims:
                if claim.source is None:
                    assert "hypothesis" in claim.text, (name, preset, claim.text)
                    continue
                paper, quote = claim.source.split(": ", 1)
                assert normalized(quote.strip("“”")) in texts[paper], (name, preset, claim.group)


def test_short_paper_agrees_where_it_says_the_same():
    # The short version states the activation and BN claims in the same words.
    if not PAPERS.is_dir():
        pytest.skip("../shared/papers/ is not here")
    short = normalized((PAPERS / SHORT).read_text(encoding="utf-8"))
    for key in (("activation", "paper", "resnet18"), ("batchnorm", "paper", "vgg16")):
        assert normalized(_pinned(key)[0][2]) in short


def test_every_equivalence_margin_is_pinned():
    for name in STUDIES.names():
        for preset in ("quick", "paper", "paper100"):
            for c in STUDIES.get(name)(preset, None).claims:
                paper = c.source.split(": ", 1)[0] if c.source else None
                assert c.equivalent_within == MARGINS.get((name, preset, c.group, paper)), (name, preset, c.group)


# The CS260 report's MNIST findings (§5.1–5.3), checked as claims over test accuracy (larger first).
MNIST_PINNED = [
    ("prelu-noid-random > relu-noid-random", "The results indicates PReLU's advancement successfully", None),
    ("prelu-id-random > prelu-noid-random", "result indicates identity mapping's advancement successfully", None),
    ("prelu-id-zero > prelu-noid-zero", "with identity mapping, the zero initialization will still work", None),
    ("prelu-id-zero ≈ prelu-id-random", "have the same performance as random initialization", 0.005),
]


def test_mnist_findings_are_the_reports():
    from gammatrace.experiments.identity.claims import MNIST_CLAIMS
    from gammatrace.experiments.identity.mnist import MNIST_CELL_BY_NAME
    assert [(c.order, c.source.phrase, c.equivalent_within) for c in MNIST_CLAIMS] == MNIST_PINNED
    for c in MNIST_CLAIMS:
        assert c.source.paper == "003_169288aa6363f27d.txt" and set(c.cells) <= set(MNIST_CELL_BY_NAME)
        if PAPERS.is_dir():
            text = normalized((PAPERS / c.source.paper).read_text(encoding="utf-8"))
            assert normalized(c.source.phrase) in text, c.source.phrase
