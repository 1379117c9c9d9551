"""Study ``identity-mapping``: a teacher–student problem whose minimizer is known (CS260 report).

The student is the two-layer network of Li & Yuan (NeurIPS 2017),
y(x, W) = ‖σ(Wx + x)‖₁ (identity mapping on) or ‖σ(Wx)‖₁ (off), with σ a PReLU of fixed
slope a = 0.25, x ~ N(0, I_d), and targets from the same network at a planted teacher W*.
Eight cells: identity on/off × ‖W*‖₂ bounded/unbounded × random/zero initialization,
each trained by plain mini-batch SGD on the engine, in float64.

What it answers:

1. **The report's Fig. 4** — training loss and ‖W − W*‖_F per cell.
2. **One-point strong convexity** along the path, ⟨−∇L(W), W* − W⟩ > δ‖W* − W‖², with ∇L
   the gradient of the full training loss at each iterate: δ_k =
   ⟨∇L(W_k), W_k − W*⟩ / ‖W_k − W*‖², reported as the per-epoch minimum and the fraction
   of steps where it is positive.
3. **Does the papers' last-iterate proxy measure γ faithfully?** γ_k (DESIGN §1) is
   measured on the *same* trajectory against several references, each a verified replay:

   - ``planted``: θ* = W*, the teacher;
   - ``found``: the exact global minimizer the run converges to. The network is
     invariant to permuting the rows of its effective weight (I + W, or W without
     identity), so every Π(I + W*) − I is a zero-loss point too; the permutation is read
     off the last iterate (optimal assignment), and ``found`` = ``planted`` when it is
     the identity. This is the true θ* of the trajectory;
   - ``last``: θ* = θ_T, the papers' proxy; ``continuation``: θ* = θ_{T+E}.

   Statistics are compared over all steps, over the first 90% (the papers' tail
   exclusion) and over the last 10% of the horizon, where the proxy matters most.

Everything runs in float64: the problem is realizable (the loss at a minimizer is 0),
so SGD converges linearly, and float32 round-off would otherwise dominate the loss
gaps of exactly the late steps under study. Each cell trains until its full training
loss is ≤ ``target_loss`` (the horizon T) or for ``max_epochs`` (exactly, without a target:
the paper preset trains the report's 10 epochs); the continuation runs
``continuation_epochs`` beyond T.

The report's MNIST experiment (its Fig. 3: ReLU vs PReLU, identity mapping, zero vs random
init) is the sibling study ``identity-mnist``, :mod:`~gammatrace.experiments.identity.mnist`.

Modules: :mod:`~gammatrace.experiments.identity.problem` (presets, cells, configs),
:mod:`~gammatrace.experiments.identity.sources` (where each paper value comes from),
:mod:`~gammatrace.experiments.identity.study` (running it on the engine),
:mod:`~gammatrace.experiments.identity.summary` (the analysis and the sentence),
:mod:`~gammatrace.experiments.identity.figures`, :mod:`~gammatrace.experiments.identity.report`,
:mod:`~gammatrace.experiments.identity.cli`.

Example:
    >>> from gammatrace.experiments.identity import PRESETS
    >>> PRESETS.names()
    ['extended', 'paper', 'quick', 'quick-abs', 'tiny']
"""

from gammatrace.experiments.identity.mnist import MNIST_PRESETS, run_identity_mnist
from gammatrace.experiments.identity.problem import PRESETS
from gammatrace.experiments.identity.study import run_identity_mapping

__all__ = ["MNIST_PRESETS", "PRESETS", "run_identity_mapping", "run_identity_mnist"]
