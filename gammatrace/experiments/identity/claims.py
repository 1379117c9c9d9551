"""The CS260 report's MNIST comparisons (its §5.1–5.3) checked as claims, not only tabled.

The report states three findings on the test error after training, each in its own words,
and one tie:

- §5.1 ReLU vs PReLU (no identity mapping, random init): "The results indicates PReLU's
  advancement successfully" — PReLU's test error is lower;
- §5.2 the identity mapping (PReLU, random init): "The result indicates identity mapping's
  advancement successfully" — lower with it;
- §5.3 zero init (PReLU): "with identity mapping, the zero initialization will still work"
  — lower with it than without — "(and almost have the same performance as random
  initialization)": a tie, tested as an equivalence within a margin δ no paper states
  (:data:`ERROR_MARGIN`, a choice).

Each is a weak order of cells by **test accuracy after the last epoch** (1 − test error,
larger first, so "a > b" reads "a's error is lower"), decided by the one rule of every
report (:func:`~gammatrace.principles.claims.check_claim`): each strict relation by the
exact sign test on the per-seed differences — run r of every cell has seed ``seed + r``,
its initialization draw and batch order, so cells are paired by seed — consistent only
when every relation's p < α, not consistent when some is significantly reversed; the tie
by two one-sided exact tests. With the report's 5 runs both verdicts can be reached
(2⁻⁵ < 0.05); an exact 95 % interval for the tie needs 6. The numbers are read from each
run's own record (its ``epochs`` table at the horizon), the same the error table shows.

Example:
    >>> [c.order for c in MNIST_CLAIMS][:2]
    ['prelu-noid-random > relu-noid-random', 'prelu-id-random > prelu-noid-random']
    >>> print(MNIST_CLAIMS[3].source)
    003_169288aa6363f27d.txt: “have the same performance as random initialization”
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gammatrace.experiments.identity.sources import Source, quote
from gammatrace.principles.claims import ClaimResult, RunPoint, check_claim, parse_order
from gammatrace.store.run import Run

# "almost have the same performance": |Δ test accuracy| < 0.005 (half a percentage point) per
# seed. Not stated by the report — a choice: its own two numbers differ by 0.00004 (0.01646 vs
# 0.0165), and its other findings are differences of 0.00026 to 0.87.
ERROR_MARGIN = 0.005


@dataclass(frozen=True)
class MnistClaim:
    """A finding of the report: ``text``, the weak ``order`` of cells by test accuracy
    (largest first; ≈ a tie), the report's words, and a margin for its tie (None: none)."""

    text: str
    order: str
    source: Source
    equivalent_within: float | None = None

    @property
    def cells(self) -> tuple[str, ...]:
        return tuple(c for level in parse_order(self.order) for c in level)


MNIST_CLAIMS = (
    MnistClaim("PReLU gives a lower test error than ReLU (no identity mapping, random init)",
               "prelu-noid-random > relu-noid-random",
               quote("The results indicates PReLU's advancement successfully")),
    MnistClaim("The identity mapping lowers PReLU's test error (random init)",
               "prelu-id-random > prelu-noid-random",
               quote("result indicates identity mapping's advancement successfully")),
    MnistClaim("With the identity mapping a zero init still trains: a lower test error than without it (PReLU)",
               "prelu-id-zero > prelu-noid-zero",
               quote("with identity mapping, the zero initialization will still work")),
    MnistClaim(f"With the identity mapping a zero init does almost as well as a random one (PReLU; test accuracy "
               f"within ±{ERROR_MARGIN:g}, a margin the report does not state)",
               "prelu-id-zero ≈ prelu-id-random",
               quote("have the same performance as random initialization"), equivalent_within=ERROR_MARGIN),
)


def final_accuracy(run_path: str) -> tuple[float, int]:
    """A run's test accuracy after its last epoch (within its horizon) and its seed.

    Example:
        >>> final_accuracy("out/mn/prelu-id-zero-run0")  # needs a study's output  # doctest: +SKIP
        (0.98, 0)
    """
    run = Run(run_path)
    epochs = run.epochs()
    epochs = epochs[epochs["epoch"] < run.meta.horizon_epochs]
    return float(epochs["test_acc"].iloc[-1]), int(run.config.seed)


def mnist_points(cells: Mapping[str, Mapping[str, Any]]) -> list[RunPoint]:
    """Every run of the study's cells (``summarize_mnist``'s output: each cell's
    ``run_paths``) as a point: its final test accuracy, paired by seed."""
    points = []
    for name, c in cells.items():
        for path in c.get("run_paths", []):
            acc, seed = final_accuracy(path)
            points.append(RunPoint(str(path), name, acc, 1.0 - acc, seed=seed))
    return points


def check_mnist_claims(points: Sequence[RunPoint]) -> list[tuple[MnistClaim, ClaimResult | None]]:
    """Each claim with its verdict, None where a cell of it was not run (a preset that runs
    a subset of the cells).

    Example:
        >>> pts = [RunPoint(f"{c}-run{s}", c, acc + 0.001 * s, 0.0, seed=s) for c, acc in
        ...        [("relu-noid-random", 0.980), ("prelu-noid-random", 0.982)] for s in range(5)]
        >>> [(c.order, r.text if r else None) for c, r in check_mnist_claims(pts)][:2]
        [('prelu-noid-random > relu-noid-random', 'consistent (every relation p < α = 0.05: prelu-noid-random > relu-noid-random: p = 0.031)'), ('prelu-id-random > prelu-noid-random', None)]
    """
    ran = {p.cell for p in points}
    return [(c, check_claim(c.order, points, equivalent_within=c.equivalent_within)
             if set(c.cells) <= ran else None) for c in MNIST_CLAIMS]


def verdict_sentences(checked: Sequence[tuple[MnistClaim, ClaimResult | None]]) -> list[str]:
    """One sentence per claim: the claim, its order, the verdict with every relation's p.

    Example:
        >>> verdict_sentences([(MNIST_CLAIMS[0], None)])[0]
        'PReLU gives a lower test error than ReLU (no identity mapping, random init): prelu-noid-random > relu-noid-random by test accuracy — not checked: this preset does not run every cell of it.'
    """
    out = []
    for c, r in checked:
        verdict = r.text if r is not None else "not checked: this preset does not run every cell of it"
        out.append(f"{c.text}: {c.order} by test accuracy — {verdict}.")
    return out
