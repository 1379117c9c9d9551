"""Claim statistics: the one verdict rule every report uses, and the null baseline for alignment.

Pure statistics over numbers the reporting layer has already read from the runs (no
torch, no files).

A *claim* is a weak order of cells by γ, largest first, as a paper states it: ``"relu ≈
leaky_relu > tanh > sigmoid"`` (:func:`parse_order` → levels; cells of one level are
tied, "≈" asserts no order between them). A run is a :class:`RunPoint` (one seed of a
cell: its median γ_k, its convergence value, its seed index, and why it is excluded, if
it is). :func:`check_claim` decides the claim by one rule:

- a weak order is the set of its strict relations a > b: every cell of a level above
  every cell of every lower level (all cross-level pairs: "d_s > 0 for most seeds" is not
  transitive, so adjacent levels do not imply the rest);
- each relation gets an exact one-sided test valid for the composite null "a not above
  b" (:func:`relation_test`): the exact sign test on the per-seed differences when the
  two cells share their seeds (every preset's cells of one seed share its batch order,
  and its initial point where the study shares one — seeds are blocks), zero differences
  counted against the claim (:func:`sign_test` says why); the exact Mann–Whitney test
  where they do not;
- verdict by intersection–union: **consistent** only when every relation's p < α (0.05;
  the size is ≤ α without a multiplicity correction); **not consistent** when some
  relation is significantly reversed, Holm over the relations; **inconclusive**
  otherwise, naming the relations not separated and their p, and the verdicts these
  seed counts cannot reach (:func:`reachable`: paired, 2^-n < α for consistent and
  2^-n < α / r for not consistent); **single seed** when a cell has one run; inconclusive
  when a cell of the claim has an excluded run or the runs end at incomparable losses;
- ties "a ≈ b" are not tested: each is reported with the observed difference and an
  exact confidence interval (:func:`tie_report`); with an equivalence margin
  (``equivalent_within`` δ) the tie gets its own verdict from two one-sided exact tests;
- the Jonckheere–Terpstra count of the whole order (:func:`order_test`) is kept as a
  *trend* statistic beside the verdict, never the verdict: it tests "no difference"
  against "some increasing trend", not the claimed order (the data "relu > leaky_relu >
  sigmoid > tanh" in every seed gave p = 0.024 for "relu ≈ leaky_relu > tanh > sigmoid").

Convergence speed: where the paper states a speed order, :func:`check_claim` tests it by
the same rule on −epochs (``speed``), a verdict of its own beside the γ verdict.

The same rule serves the report of a plain set of runs (no claimed order: the runs
ordered by convergence speed are the claim, each run a cell of one seed — so it says
"single seed"). Also here: :func:`epochs_to_loss` and :func:`null_alignment` (the
exact null baseline for cos_align and for the fraction of steps that move toward θ*).

Example:
    >>> pts = [RunPoint(f"{c}-s{i}", c, g + 0.01 * i, 10, seed=i) for c, g in [("a", 3), ("b", 2), ("c", 1)]
    ...        for i in range(7)]
    >>> r = check_claim("a > b > c", pts)
    >>> r.verdict, [round(t.p_value, 4) for t in r.relations], r.design
    ('consistent', [0.0078, 0.0078, 0.0078], 'paired')
    >>> check_claim("c > b > a", pts).verdict
    'not consistent'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from gammatrace.errors import UserError

ALPHA = 0.05  # significance level of the exact test; a p-value below it decides
TIE = "≈"  # "a ≈ b": the claim asserts no order between a and b
TIE_SPELLINGS = ("≈", "~", "=")
# Past this many states the exact distribution with tied values is not enumerated.
MAX_TIED_STATES = 2_000_000

CONSISTENT = "consistent"
NOT_CONSISTENT = "not consistent"
INCONCLUSIVE = "inconclusive"
SINGLE_SEED = "single seed"

Order = tuple[tuple[str, ...], ...]  # levels, claimed largest γ first; cells of one level tied


class ClaimError(UserError):
    """A claim that cannot be checked as written (an order with one level, a cell twice)."""


def _g(x: float) -> str:
    """A statistic in a verdict's reason: 2 significant digits (p-values), — when undefined."""
    return f"{float(x):.2g}" if x is not None and math.isfinite(x) else "—"


# ---------------------------------------------------------------------------- orders
def parse_order(order: str | Iterable[str | Iterable[str]]) -> Order:
    """A claimed weak order as levels, largest γ first.

    A string ``"a ≈ b > c"`` (``~`` or ``=`` also mean ≈); or a sequence whose items
    are levels: a cell name (which may itself read ``"a ≈ b"``) or a sequence of tied
    cell names. A plain list of names is a strict order.

    Example:
        >>> parse_order("relu ≈ leaky_relu > tanh > sigmoid")
        (('relu', 'leaky_relu'), ('tanh',), ('sigmoid',))
        >>> parse_order(["all", "first"]), parse_order([["all", "first"], "none"])
        ((('all',), ('first',)), (('all', 'first'), ('none',)))
    """
    if isinstance(order, str):
        items: list[Any] = [part for part in order.split(">")]
    else:
        items = list(order)
    levels = []
    for item in items:
        if isinstance(item, str):
            for tie in TIE_SPELLINGS[1:]:
                item = item.replace(tie, TIE)
            level = tuple(name.strip() for name in item.split(TIE))
        else:
            level = tuple(str(name).strip() for name in item)
        if not level or any(not name for name in level):
            raise ClaimError(f"claim order {order!r} has an empty cell name")
        levels.append(level)
    names = [c for level in levels for c in level]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise ClaimError(f"claim order {order!r} names {', '.join(twice)} more than once")
    return tuple(levels)


def order_text(levels: Order) -> str:
    """Levels back as text.

    Example:
        >>> order_text((("relu", "leaky_relu"), ("tanh",)))
        'relu ≈ leaky_relu > tanh'
    """
    return " > ".join(f" {TIE} ".join(level) for level in levels)


def restrict_order(levels: Order, cells: Iterable[str]) -> Order:
    """The order among ``cells`` only (a group lacking some cells checks the ones it has).

    Example:
        >>> restrict_order(parse_order("all > first2 > last3 > first > none"), ["all", "first", "none"])
        (('all',), ('first',), ('none',))
    """
    keep = set(cells)
    return tuple(lv for lv in (tuple(c for c in level if c in keep) for level in levels) if lv)


# ------------------------------------------------------------------------ exact test
def order_statistic(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(J, number of pairs): J counts pairs (x, y), x from a level claimed larger than
    y's, with x > y (½ for x = y). The reversed order's J is pairs − J.

    Example:
        >>> order_statistic([[3, 4], [1, 2], [0]])
        (8.0, 8)
        >>> order_statistic([[1, 2], [1, 0]])
        (3.5, 4)
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    j, pairs = 0.0, 0
    for i, x in enumerate(arrays):
        for y in arrays[i + 1:]:
            diff = x[:, None] - y[None, :]
            j += float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
            pairs += diff.size
    return j, pairs


@cache
def _mann_whitney_counts(m: int, n: int) -> tuple[int, ...]:
    """Counts, over the C(m+n, m) arrangements of m and n distinct values, of U = the
    number of pairs where the m-side value is larger (index = U)."""
    if m == 0 or n == 0:
        return (1,)
    # The largest value is an m-side value (it beats all n) or an n-side value.
    a, b = _mann_whitney_counts(m - 1, n), _mann_whitney_counts(m, n - 1)
    out = [0] * (m * n + 1)
    for u, c in enumerate(a):
        out[u + n] += c
    for u, c in enumerate(b):
        out[u] += c
    return tuple(out)


def _convolve(a: Sequence[int], b: Sequence[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] += x * y
    return out


def _distribution_distinct(sizes: Sequence[int]) -> list[int]:
    """Counts of J (index = J) over all arrangements of distinct values: J is a sum of
    independent Mann–Whitney counts, each level against every level below it."""
    dist = [1]
    for i, n in enumerate(sizes):
        dist = _convolve(dist, _mann_whitney_counts(n, sum(sizes[i + 1:])))
    return dist


def _distribution_tied(values: np.ndarray, sizes: Sequence[int]) -> list[int]:
    """Counts of 2J (index = 2J) over all labelings of the pooled ``values`` with level
    sizes ``sizes``, the tied values handled exactly (a dynamic programme over blocks of
    equal values, smallest first: a value placed now beats every value of a lower level
    placed before it, and ties with the values of its own block)."""
    _, blocks = np.unique(values, return_counts=True)
    m = len(sizes)
    states = math.prod(n + 1 for n in sizes)
    if states > MAX_TIED_STATES:
        raise ValueError(f"{len(values)} seeds in {m} levels with tied values: too many states ({states}) for "
                         "the exact distribution")

    def compositions(b: int, room: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
        if len(room) == 1:
            if b <= room[0]:
                yield (b,)
            return
        for k in range(min(b, room[0]) + 1):
            for rest in compositions(b - k, room[1:]):
                yield (k, *rest)

    dp: dict[tuple[int, ...], dict[int, int]] = {(0,) * m: {0: 1}}
    for b in blocks:
        nxt: dict[tuple[int, ...], dict[int, int]] = {}
        for placed, dist in dp.items():
            room = tuple(n - c for n, c in zip(sizes, placed, strict=True))
            below = [sum(placed[j + 1:]) for j in range(m)]  # values placed in lower levels
            for k in compositions(int(b), room):
                ways = math.factorial(int(b))
                for kl in k:
                    ways //= math.factorial(kl)
                add2 = sum(2 * k[i] * below[i] for i in range(m))
                add2 += sum(k[i] * k[j] for i in range(m) for j in range(i + 1, m))
                key = tuple(c + kl for c, kl in zip(placed, k, strict=True))
                target = nxt.setdefault(key, {})
                for j2, c in dist.items():
                    target[j2 + add2] = target.get(j2 + add2, 0) + c * ways
        dp = nxt
    (final,) = dp.values()
    out = [0] * (max(final) + 1)
    for j2, c in final.items():
        out[j2] = c
    return out


def min_p_value(sizes: Sequence[int]) -> float:
    """The smallest p-value the exact test can reach with these level sizes (values
    distinct): one arrangement in N! / Π n_i!.

    Example:
        >>> min_p_value([3, 3]), round(min_p_value([4, 4]), 4), round(min_p_value([6, 3, 3]), 6)
        (0.05, 0.0143, 5.4e-05)
    """
    n = math.factorial(sum(sizes))
    for s in sizes:
        n //= math.factorial(s)
    return 1.0 / n


@dataclass(frozen=True)
class OrderTest:
    """The exact permutation test of a claimed weak order.

    ``statistic`` J and ``pairs`` (:func:`order_statistic`); ``p_value`` = P(J ≥ J_obs)
    and ``p_reversed`` = P(J ≤ J_obs) under exchangeability of all seeds' values;
    ``n_arrangements`` = N! / Π n_i!; ``p_min`` the smallest p these sizes allow.
    """

    statistic: float
    pairs: int
    p_value: float
    p_reversed: float
    n_arrangements: int
    p_min: float
    sizes: tuple[int, ...]


def order_test(groups: Sequence[Sequence[float]]) -> OrderTest:
    """Exact one-sided permutation test that the values in ``groups`` (one group per
    level, the claimed largest first; a level pools the seeds of its tied cells) are
    ordered as claimed.

    Exact: the null distribution of J over all N! / Π n_i! assignments of the pooled
    values to the levels is counted, not sampled (a convolution of Mann–Whitney
    distributions for distinct values; a dynamic programme when values tie).

    Example:
        >>> t = order_test([[2.0, 2.1, 2.2], [1.0, 1.1, 1.2]])
        >>> t.statistic, t.p_value, t.p_reversed, t.n_arrangements
        (9.0, 0.05, 1.0, 20)
        >>> round(order_test([[2.0, 2.1, 2.2, 2.3], [1.0, 1.1, 1.2, 1.3]]).p_value, 4)
        0.0143
    """
    sizes = tuple(len(g) for g in groups)
    if len(sizes) < 2 or any(s == 0 for s in sizes):
        raise ValueError(f"order_test needs at least two non-empty levels, got sizes {sizes}")
    values = np.concatenate([np.asarray(g, dtype=np.float64) for g in groups])
    if not np.isfinite(values).all():
        raise ValueError("order_test needs finite values")
    j, pairs = order_statistic(groups)
    j2 = int(round(2 * j))
    if len(np.unique(values)) == len(values):
        dist = _distribution_distinct(sizes)
        counts = [0] * (2 * len(dist) - 1)
        counts[::2] = dist  # index = 2J, as for tied values
    else:
        counts = _distribution_tied(values, sizes)
    total = sum(counts)
    upper = sum(counts[j2:])
    lower = sum(counts[: j2 + 1])
    return OrderTest(j, pairs, upper / total, lower / total, total, min_p_value(sizes), sizes)


# ------------------------------------------------------------------------ the points
@dataclass(frozen=True)
class RunPoint:
    """One run (a seed of a cell) as the claim check sees it: ``gamma`` (its per-seed
    statistic, e.g. median γ_k), ``conv`` (epochs to the target or final loss: lower is
    faster), why it is excluded, if it is, and its ``seed`` index (None: unknown, so
    the run is not paired with another cell's run of the same seed).

    Example:
        >>> RunPoint("relu-s0", "relu", 0.29, 6).excluded is None
        True
    """

    run: str
    cell: str
    gamma: float
    conv: float
    excluded: str | None = None
    seed: int | None = None  # the seed index: runs of one seed in two cells are paired


@dataclass
class CellStat:
    """A comparable cell: its level (0 = claimed largest), runs, γ (mean, median, min–max
    over its seeds) and convergence (mean, min–max)."""

    cell: str
    level: int
    n: int
    gamma: float
    gamma_median: float
    gamma_lo: float
    gamma_hi: float
    conv: float
    conv_lo: float
    conv_hi: float


# ------------------------------------------------------------------- relation tests
PAIRED = "paired"
UNPAIRED = "unpaired"


def sign_test(diffs: Sequence[float]) -> tuple[float, float]:
    """Exact one-sided sign test of "above > below" on per-seed differences d_s =
    above_s − below_s: (p, p_reversed).

    p = P(B ≥ #{d_s > 0}), B ~ Binomial(n, ½), n = every seed; the reversed p the same
    with #{d_s < 0}. **Zero differences count against the claim** (and against the
    reversed claim): a tie is no evidence that one cell is above the other. This is the
    conservative of the two usual choices and valid for the composite null "above is not
    above below", P(d > 0) ≤ ½, whatever the chance of a tie: #{d > 0} is then
    stochastically at most Binomial(n, ½). Dropping the zeros (the textbook sign test)
    conditions on their number and tests P(d > 0) against P(d < 0) only — one strictly
    larger seed among seeds that are mostly equal would weigh as much as a clean sweep
    of fewer seeds. With zeros counted, p + p_reversed ≥ 1, so at most one is small.

    Example:
        >>> sign_test([0.2, 0.1, 0.3, 0.05, 0.4])  # 5 of 5 above: 2^-5
        (0.03125, 1.0)
        >>> sign_test([0.2, 0.1, 0.0, 0.05, 0.4])  # a zero counts against: P(B ≥ 4)
        (0.1875, 1.0)
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        return 1.0, 1.0
    return _binom_upper(n, int((d > 0).sum())), _binom_upper(n, int((d < 0).sum()))


@cache
def _binom_upper(n: int, k: int) -> float:
    """P(B ≥ k) for B ~ Binomial(n, ½), exactly (integer counts)."""
    return sum(math.comb(n, i) for i in range(max(k, 0), n + 1)) / 2 ** n


def _ranked(values: Sequence[float]) -> np.ndarray:
    """Values with ±inf replaced by finite ones beyond the rest, order and ties kept (the
    tests here depend on the values' order only: a run that never reached the target is
    slower than every run that did, and as slow as another that did not)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
    span = hi - lo + 1.0
    return np.where(v == np.inf, hi + span, np.where(v == -np.inf, lo - span, v))


def _diff(a: float, b: float) -> float:
    """a − b, 0 where both are the same infinity."""
    return 0.0 if a == b else float(a - b)


@dataclass(frozen=True)
class RelationTest:
    """The exact one-sided test of one strict relation ``above > below`` of a claim.

    ``design`` "paired" (the cells share their seeds — a seed's runs share its batch
    order, and its initial point where the study shares one — so the test is the exact
    sign test on the per-seed differences ``diffs``, :func:`sign_test`) or "unpaired"
    (the exact Mann–Whitney test, the permutation distribution of U = #{x > y} + ½#{x = y}
    over all C(m+n, m) splits, ties handled exactly: :func:`order_test` on two groups).
    ``statistic`` (seeds with d > 0, or U) and ``against`` (seeds with d < 0, or
    m·n − U) out of ``n`` (seeds, or pairs m·n); ``p_value`` the claimed direction's
    p, ``p_reversed`` the reversed direction's; ``p_min`` the smallest p these sizes
    allow (2^-n paired, 1 / C(m+n, m) unpaired).
    """

    above: str
    below: str
    design: str
    n: int
    statistic: float
    against: float
    p_value: float
    p_reversed: float
    p_min: float
    diffs: tuple[float, ...] = ()

    @property
    def text(self) -> str:
        """``above > below: p = …`` (the claimed direction's p)."""
        return f"{self.above} > {self.below}: p = {_g(self.p_value)}"

    @property
    def counts_text(self) -> str:
        """What the test counted, e.g. ``6 of 7 seeds above, 1 below (paired)``."""
        if self.design == PAIRED:
            return f"{self.statistic:g} of {self.n} seeds above, {self.against:g} below (paired sign test)"
        return f"U = {self.statistic:g} of {self.n} pairs (unpaired Mann–Whitney)"


def _seed_values(pts: Sequence[RunPoint], value: Any) -> dict[int, float] | None:
    """{seed: value} when every run names its seed once; None otherwise (unpaired)."""
    if any(p.seed is None for p in pts):
        return None
    out = {int(p.seed): value(p) for p in pts}  # type: ignore[arg-type]
    return out if len(out) == len(pts) else None


def relation_test(above: str, below: str, a: Sequence[RunPoint], b: Sequence[RunPoint],
                  value: Any = None) -> RelationTest:
    """Test ``above > below`` from the two cells' runs: paired by seed when both cells'
    runs name the same seeds (each once), unpaired otherwise. ``value`` maps a run to its
    number (default: its γ).

    Example:
        >>> a = [RunPoint(f"a-s{i}", "a", 2.0 + 0.1 * i, 0, seed=i) for i in range(5)]
        >>> b = [RunPoint(f"b-s{i}", "b", 1.0 + 0.3 * i, 0, seed=i) for i in range(5)]
        >>> t = relation_test("a", "b", a, b)
        >>> t.design, t.counts_text, t.p_value  # b's last seed, 2.2, is above a's, 2.4? no: 2.4 > 2.2
        ('paired', '5 of 5 seeds above, 0 below (paired sign test)', 0.03125)
        >>> u = relation_test("a", "b", a, [RunPoint("b-x", "b", 1.0, 0)])
        >>> u.design, round(u.p_value, 4), u.p_min
        ('unpaired', 0.1667, 0.16666666666666666)
    """
    value = value or (lambda p: p.gamma)
    sa, sb = _seed_values(a, value), _seed_values(b, value)
    if sa is not None and sb is not None and set(sa) == set(sb):
        seeds = sorted(sa)
        d = [_diff(sa[s], sb[s]) for s in seeds]
        p, pr = sign_test(d)
        n = len(d)
        return RelationTest(above, below, PAIRED, n, float(sum(x > 0 for x in d)), float(sum(x < 0 for x in d)),
                            p, pr, 0.5 ** n, tuple(d))
    x = _ranked([value(p) for p in a] + [value(p) for p in b])
    t = order_test([x[:len(a)], x[len(a):]])
    return RelationTest(above, below, UNPAIRED, t.pairs, t.statistic, t.pairs - t.statistic, t.p_value,
                        t.p_reversed, t.p_min)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): a hypothesis is rejected
    at family-wise level α when its adjusted p < α.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    r = len(p_values)
    order = sorted(range(r), key=lambda i: p_values[i])
    out = [1.0] * r
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (r - rank) * p_values[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------- ties
@dataclass(frozen=True)
class TieReport:
    """A tie ``a ≈ b`` of a claim: "no order asserted — not tested", with the observed
    difference a − b and an exact confidence interval for it; with an equivalence margin
    δ, the two one-sided exact tests of |a − b| < δ (TOST).

    Paired: ``diffs`` per seed, ``estimate`` their median, ``ci`` the sign-test
    (order-statistic) interval for the median difference, exact coverage ≥ ``level``
    (for any continuous distribution; None with too few seeds — 95 % needs ≥ 6).
    Unpaired: ``estimate`` the median of all pairwise differences (Hodges–Lehmann) and
    ``ci`` the Mann–Whitney interval for a shift (order statistics of the m·n
    differences; exact under a location shift). ``p_lower`` tests d > −δ, ``p_upper``
    d < δ (each exact, zeros against); ``p_value`` = max of the two (equivalent when
    < α); ``p_beyond`` = the smaller of the tests of d > δ and d < −δ, doubled
    (significantly not equivalent when < α).
    """

    a: str
    b: str
    design: str
    n: int
    estimate: float
    ci: tuple[float, float] | None
    level: float
    diffs: tuple[float, ...] = ()
    margin: float | None = None
    p_lower: float = math.nan
    p_upper: float = math.nan
    p_beyond: float = math.nan

    @property
    def p_value(self) -> float:
        return max(self.p_lower, self.p_upper) if self.margin is not None else math.nan

    @property
    def text(self) -> str:
        ci = (f"[{_g3(self.ci[0])}, {_g3(self.ci[1])}]" if self.ci is not None
              else f"not available with {self.n} {'seeds' if self.design == PAIRED else 'pairs'}")
        what = "median per-seed difference" if self.design == PAIRED else "Hodges–Lehmann difference"
        base = f"{self.a} ≈ {self.b}: {what} {_g3(self.estimate)}, exact {self.level:.0%} CI {ci}"
        if self.margin is None:
            return base + " — no order asserted, not tested"
        return base + (f"; within ±{self.margin:g}: p = {_g(self.p_value)} (two one-sided exact tests, "
                       f"larger of {_g(self.p_lower)}, {_g(self.p_upper)})")


def _g3(x: float) -> str:
    return f"{float(x):.3g}" if math.isfinite(x) else "—"


def _sign_ci(d: np.ndarray, alpha: float) -> tuple[tuple[float, float] | None, float]:
    """The order-statistic interval [d_(k), d_(n+1−k)] for the median of d, with the
    largest k whose exact coverage 1 − 2 P(B ≤ k − 1) is ≥ 1 − α; None when even k = 1
    falls short (2^(1−n) > α)."""
    n = len(d)
    s = np.sort(d)
    best = None
    for k in range(1, n // 2 + 1):
        cover = 1.0 - 2.0 * (1.0 - _binom_upper(n, k))  # 1 − 2 P(B ≤ k − 1)
        if cover >= 1.0 - alpha:
            best = (k, cover)
    if best is None:
        return None, 1.0 - alpha
    k, cover = best
    return (float(s[k - 1]), float(s[n - k])), cover


def _shift_ci(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[tuple[float, float] | None, float]:
    """The Mann–Whitney interval for a shift x − y: order statistics of the m·n pairwise
    differences, the largest k with exact coverage 1 − 2 P(U ≤ k − 1) ≥ 1 − α."""
    m, n = len(x), len(y)
    counts = _mann_whitney_counts(m, n)
    total = sum(counts)
    diffs = np.sort((x[:, None] - y[None, :]).ravel())
    best = None
    for k in range(1, m * n // 2 + 1):
        cover = 1.0 - 2.0 * sum(counts[:k]) / total
        if cover >= 1.0 - alpha:
            best = (k, cover)
    if best is None:
        return None, 1.0 - alpha
    k, cover = best
    return (float(diffs[k - 1]), float(diffs[m * n - k])), cover


def tie_report(a: str, b: str, pa: Sequence[RunPoint], pb: Sequence[RunPoint], *, margin: float | None = None,
               alpha: float = ALPHA) -> TieReport:
    """The tie ``a ≈ b``: observed difference, exact CI, and with ``margin`` δ the TOST.

    Example:
        >>> pa = [RunPoint(f"a-s{i}", "a", 1.0 + 0.01 * i, 0, seed=i) for i in range(7)]
        >>> pb = [RunPoint(f"b-s{i}", "b", 1.0 - 0.01 * (i % 3), 0, seed=i) for i in range(7)]
        >>> t = tie_report("a", "b", pa, pb, margin=0.1)
        >>> t.text
        'a ≈ b: median per-seed difference 0.04, exact 98% CI [0, 0.07]; within ±0.1: p = 0.0078 (two one-sided exact tests, larger of 0.0078, 0.0078)'
        >>> tie_report("a", "b", pa[:5], pb[:5]).text
        'a ≈ b: median per-seed difference 0.03, exact 95% CI not available with 5 seeds — no order asserted, not tested'
    """
    sa, sb = _seed_values(pa, lambda p: p.gamma), _seed_values(pb, lambda p: p.gamma)
    if sa is not None and sb is not None and set(sa) == set(sb):
        d = np.array([_diff(sa[s], sb[s]) for s in sorted(sa)])
        ci, level = _sign_ci(d, alpha)
        out = dict(design=PAIRED, n=len(d), estimate=float(np.median(d)), ci=ci, level=level, diffs=tuple(d))
        if margin is not None:
            p_up, _ = sign_test(margin - d)  # d < δ
            p_lo, _ = sign_test(d + margin)  # d > −δ
            beyond = min(sign_test(d - margin)[0], sign_test(-margin - d)[0])
            out.update(margin=margin, p_lower=p_lo, p_upper=p_up, p_beyond=min(1.0, 2 * beyond))
        return TieReport(a, b, **out)  # type: ignore[arg-type]
    x = np.array([p.gamma for p in pa], dtype=np.float64)
    y = np.array([p.gamma for p in pb], dtype=np.float64)
    ci, level = _shift_ci(x, y, alpha)
    out2: dict[str, Any] = dict(design=UNPAIRED, n=len(x) * len(y),
                                estimate=float(np.median((x[:, None] - y[None, :]).ravel())), ci=ci, level=level)
    if margin is not None:
        p_up = order_test([y + margin, x]).p_value  # x − y < δ
        p_lo = order_test([x + margin, y]).p_value  # x − y > −δ
        beyond = min(order_test([x - margin, y]).p_value, order_test([y - margin, x]).p_value)
        out2.update(margin=margin, p_lower=p_lo, p_upper=p_up, p_beyond=min(1.0, 2 * beyond))
    return TieReport(a, b, **out2)


@dataclass
class ClaimResult:
    """What :func:`check_claim` found; ``text`` is the verdict with its reason, which
    lists every relation with its p.

    ``relations``: the exact one-sided test of each strict relation of the claim (every
    cell of a level above every cell of each lower level, :class:`RelationTest`);
    ``ties``: each tied pair, reported (not tested) or, with a margin, tested for
    equivalence (:class:`TieReport`; ``tie_verdict`` its verdict); ``trend``: the
    Jonckheere–Terpstra count of the order over all seeds, a side statistic labelled as a
    trend, never the verdict; ``speed``: the verdict of the speed order the paper states
    (the same rule on −epochs to the target), None when it states none; ``speed_order``
    the cells by mean convergence, fastest first, always.
    """

    levels: Order
    cells: list[CellStat]
    excluded: dict[str, str]
    relations: list[RelationTest]
    ties: list[TieReport]
    trend: OrderTest | None
    speed: ClaimResult | None
    gamma_order: list[str]
    speed_order: list[str]
    n_runs: int
    verdict: str
    reason: str = ""
    alpha: float = ALPHA
    notes: list[str] = field(default_factory=list)
    margin: float | None = None
    tie_verdict: str | None = None
    tie_reason: str = ""

    @property
    def order(self) -> list[str]:
        """The claim's cells, flattened in claimed order."""
        return [c for level in self.levels for c in level]

    @property
    def p_value(self) -> float:
        """The intersection–union p-value: the largest relation p (consistent ⇔ < α)."""
        return max((r.p_value for r in self.relations), default=math.nan)

    @property
    def p_reversed(self) -> float:
        """The smallest Holm-adjusted reversed p over the relations (not consistent ⇔ < α)."""
        return min(holm([r.p_reversed for r in self.relations]), default=math.nan)

    @property
    def p_text(self) -> str:
        """``p = …`` (largest relation p) and the reversed order's (Holm), or — without relations."""
        if not self.relations:
            return "p = —"
        return f"p = {_g(self.p_value)}, reversed p = {_g(self.p_reversed)}"

    @property
    def relations_text(self) -> str:
        """Every relation with its p: ``a > b: p = 0.031; a > c: p = 0.031``."""
        return "; ".join(r.text for r in self.relations)

    @property
    def design(self) -> str:
        """How the relations were tested: "paired", "unpaired" or "paired and unpaired"."""
        kinds = sorted({r.design for r in self.relations})
        return " and ".join(kinds) if kinds else "—"

    @property
    def text(self) -> str:
        out = f"{self.verdict} ({self.reason})" if self.reason else self.verdict
        if self.tie_verdict is not None and len(self.levels) > 1:
            out += f"; ties within ±{self.margin:g}: {self.tie_verdict} ({self.tie_reason})"
        return out


def _stat(cell: str, level: int, pts: list[RunPoint]) -> CellStat:
    g = [p.gamma for p in pts]
    c = [p.conv for p in pts]
    return CellStat(cell, level, len(pts), float(np.mean(g)), float(np.median(g)), min(g), max(g),
                    float(np.mean(c)), min(c), max(c))


def _as_order(order: str | Sequence[Any] | Order) -> Order:
    if isinstance(order, tuple) and all(isinstance(lv, tuple) for lv in order):
        return order
    return parse_order(order)


def reachable(relations: Sequence[RelationTest], alpha: float = ALPHA) -> list[str]:
    """What these seed counts cannot reach, in words (empty: both verdicts can be reached).

    "consistent" needs every relation's smallest possible p below α; "not consistent"
    needs some relation's below α / r (Holm's first step over r relations).

    Example:
        >>> t = RelationTest("a", "b", PAIRED, 4, 4, 0, 0.0625, 1.0, 0.0625)
        >>> reachable([t])
        ["with these seeds 'consistent' cannot be reached (a > b: smallest p 0.062 ≥ α = 0.05)", "'not consistent' cannot be reached (smallest p 0.062 ≥ α / 1 relation = 0.05)"]
    """
    out = []
    worst = max(relations, key=lambda r: r.p_min, default=None)
    if worst is not None and worst.p_min >= alpha:
        out.append(f"with these seeds 'consistent' cannot be reached ({worst.above} > {worst.below}: smallest p "
                   f"{_g(worst.p_min)} ≥ α = {alpha:g})")
    r = len(relations)
    best = min((x.p_min for x in relations), default=None)
    if best is not None and best * r >= alpha:
        out.append(("with these seeds " if not out else "") + f"'not consistent' cannot be reached (smallest p "
                   f"{_g(best)} ≥ α / {r} relation{'s' if r > 1 else ''} = {_g(alpha / r)})")
    return out


def check_claim(order: str | Sequence[Any] | Order, points: Sequence[RunPoint], *, alpha: float = ALPHA,
                incomparable: str | None = None, speed: str | Sequence[Any] | Order | None = None,
                equivalent_within: float | None = None) -> ClaimResult:
    """Decide the claim "the cells' γ follow ``order``" from each seed's value.

    ``order``: a weak order (:func:`parse_order`). ``points``: the runs of the claim's
    cells (others are ignored). ``incomparable``: why the runs' γ cannot be compared
    (their end losses differ, DESIGN §1). ``speed``: the order of convergence speed the
    paper states (fastest first), tested by the same rule on −conv beside the γ verdict.
    ``equivalent_within``: a margin δ for the claim's ties (:class:`TieReport`).

    The claim is the set of its strict relations: every cell of a level above every cell
    of every lower level (:func:`relation_test` each: paired by seed, or unpaired).
    Verdict, in this order:

    - inconclusive: a cell of the claim has an excluded run or no run ("cells
      excluded"), fewer than two levels have runs, or ``incomparable``;
    - single seed: a cell has one run (the trend's p-value is shown, never a verdict);
    - consistent: every relation's p < ``alpha`` (intersection–union: the size is ≤ α
      without a multiplicity correction, since the claim holds only if every relation
      does);
    - not consistent: some relation is significantly reversed, Holm over the relations;
    - inconclusive otherwise — naming the relations not separated and their p, and saying
      which verdicts the seed counts cannot reach at all (:func:`reachable`).

    A claim of one level (``"a ≈ b"``) needs ``equivalent_within``: its verdict is then
    the equivalence verdict (consistent: every tie within ±δ by both one-sided tests;
    not consistent: some tie significantly beyond δ, Holm over the ties).

    Example:
        >>> pts = [RunPoint("a-s0", "a", 3.0, 10), RunPoint("b-s0", "b", 2.0, 20), RunPoint("c-s0", "c", 1.0, 30)]
        >>> check_claim("a > b > c", pts).text
        'single seed (one run per cell: trend p = 0.17, reversed 1 shown, never a verdict)'
        >>> pts = [RunPoint(f"{c}-s{i}", c, g + 0.01 * i, 10, seed=i) for c, g in [("a", 3), ("b", 2), ("c", 1)]
        ...        for i in range(5)]
        >>> check_claim("a > b > c", pts).text
        "consistent (every relation p < α = 0.05: a > b: p = 0.031; a > c: p = 0.031; b > c: p = 0.031; with these seeds 'not consistent' cannot be reached (smallest p 0.031 ≥ α / 3 relations = 0.017))"
        >>> check_claim("c > a ≈ b", pts).verdict
        'inconclusive'
    """
    levels = _as_order(order)
    if len(levels) < 2 and equivalent_within is None:
        raise ClaimError(f"a claim needs at least two levels ('a > b'), or an equivalence margin for a tie, got "
                         f"{order_text(levels)!r}")
    excluded: dict[str, str] = {}
    stats: list[CellStat] = []
    by_cell: dict[str, list[RunPoint]] = {}
    by_level: list[list[RunPoint]] = []
    for i, level in enumerate(levels):
        mine: list[RunPoint] = []
        for cell in level:
            pts = [p for p in points if p.cell == cell]
            bad = [p for p in pts if p.excluded]
            if not pts:
                excluded[cell] = "no run"
            elif bad:
                excluded[cell] = "; ".join(f"{p.run}: {p.excluded}" for p in bad)
            else:
                stats.append(_stat(cell, i, pts))
                by_cell[cell] = pts
                mine += pts
        by_level.append(mine)
    comparable = [s.cell for s in stats]
    by = {s.cell: s for s in stats}
    gamma_order = sorted(comparable, key=lambda c: -by[c].gamma)
    speed_order = sorted(comparable, key=lambda c: by[c].conv)
    relations = [relation_test(a, b, by_cell[a], by_cell[b])
                 for i, hi in enumerate(levels) for lo in levels[i + 1:] for a in hi for b in lo
                 if a in by_cell and b in by_cell]
    ties = [tie_report(a, b, by_cell[a], by_cell[b], margin=equivalent_within, alpha=alpha)
            for level in levels for j, a in enumerate(level) for b in level[j + 1:] if a in by_cell and b in by_cell]
    filled = [lv for lv in by_level if lv]
    trend = order_test([_ranked([p.gamma for p in lv]) for lv in filled]) if len(filled) >= 2 else None
    result = ClaimResult(levels, stats, excluded, relations, ties, trend, None, gamma_order, speed_order,
                         sum(len(lv) for lv in by_level), INCONCLUSIVE, alpha=alpha, margin=equivalent_within)
    if speed is not None:
        fast = [RunPoint(p.run, p.cell, -p.conv, p.conv, p.excluded, p.seed) for p in points]
        result.speed = check_claim(speed, fast, alpha=alpha)
    one_level = len(levels) < 2
    if excluded:
        result.reason = "cells excluded: " + ", ".join(c for lv in levels for c in lv if c in excluded)
        return result
    if not relations and not (one_level and ties):
        result.reason = "fewer than two levels of the claim have comparable runs"
        return result
    if incomparable:
        result.reason = incomparable
        return result
    if min(s.n for s in stats) < 2:
        result.verdict = SINGLE_SEED
        result.reason = ("one run per cell: " + (f"trend p = {_g(trend.p_value)}, reversed {_g(trend.p_reversed)}"
                                                 if trend is not None else "nothing") + " shown, never a verdict")
        return result
    if equivalent_within is not None and ties:
        result.tie_verdict, result.tie_reason = _tie_verdict(ties, alpha)
    if one_level:
        result.verdict, result.reason = result.tie_verdict or INCONCLUSIVE, result.tie_reason
        result.tie_verdict = None
        return result
    reach = reachable(relations, alpha)
    result.notes += reach
    adjusted = holm([r.p_reversed for r in relations])
    reversed_ = [(r, q) for r, q in zip(relations, adjusted, strict=True) if q < alpha]
    if all(r.p_value < alpha for r in relations):
        result.verdict = CONSISTENT
        result.reason = f"every relation p < α = {alpha:g}: {result.relations_text}"
    elif reversed_:
        result.verdict = NOT_CONSISTENT
        result.reason = (f"reversed under Holm over {len(relations)} relation{'s' if len(relations) > 1 else ''}: "
                         + "; ".join(f"{r.below} > {r.above} (reversed p = {_g(r.p_reversed)}, Holm {_g(q)})"
                                     for r, q in reversed_)
                         + f" < α = {alpha:g}; claimed: {result.relations_text}")
    else:
        open_ = [r for r in relations if r.p_value >= alpha]
        done = [r for r in relations if r.p_value < alpha]
        result.reason = (f"not separated (p ≥ α = {alpha:g}): " + "; ".join(r.text for r in open_)
                         + ("; separated: " + "; ".join(r.text for r in done) if done else "")
                         + "; none significantly reversed (Holm)")
    if reach:
        result.reason += "; " + "; ".join(reach)
    return result


def _tie_verdict(ties: Sequence[TieReport], alpha: float) -> tuple[str, str]:
    """The equivalence verdict of the ties (each with a margin), by the same rule:
    consistent when every tie's TOST p < α; not consistent when some tie is significantly
    beyond the margin (Holm over the ties); inconclusive otherwise."""
    listed = "; ".join(f"{t.a} ≈ {t.b} within ±{t.margin:g}: p = {_g(t.p_value)}" for t in ties)
    worst = max((0.5 ** t.n if t.design == PAIRED else math.nan) for t in ties)
    if all(t.p_value < alpha for t in ties):
        return CONSISTENT, f"every tie p < α = {alpha:g}: {listed}"
    adjusted = holm([t.p_beyond for t in ties])
    beyond = [(t, q) for t, q in zip(ties, adjusted, strict=True) if q < alpha]
    if beyond:
        return NOT_CONSISTENT, ("beyond the margin under Holm: " + "; ".join(
            f"{t.a} − {t.b} = {_g3(t.estimate)} (p = {_g(t.p_beyond)}, Holm {_g(q)})" for t, q in beyond)
            + f" < α = {alpha:g}")
    why = f"equivalence not shown: {listed}"
    if math.isfinite(worst) and worst >= alpha:
        why += f"; with these seeds the smallest p is {_g(worst)} ≥ α: equivalence cannot be shown"
    return INCONCLUSIVE, why


# ----------------------------------------------------------------------- convergence
def epochs_to_loss(epochs: Sequence[int], losses: Sequence[float], threshold: float | None) -> int | None:
    """Epochs until the loss first was ≤ ``threshold``: the first such epoch index + 1.

    None when it never was, or without a threshold. ``epochs`` are 0-based indices.

    Example:
        >>> epochs_to_loss([0, 1, 2, 3], [2.3, 0.9, 0.4, 0.2], 0.5), epochs_to_loss([0], [2.3], 0.5)
        (3, None)
    """
    if threshold is None or not len(losses):
        return None
    hit = np.flatnonzero(np.asarray(losses, dtype=np.float64) <= threshold)
    return int(np.asarray(epochs)[hit[0]]) + 1 if len(hit) else None


# ----------------------------------------------------------------------- null baseline
def null_alignment(n_params: int, cos_align: Any, dist_sq: Any, update_sq: Any, progress: Any) -> dict[str, float]:
    """Alignment of the real updates against random directions of the same norm.

    A direction u uniform on the sphere in R^n has cos(u, v) with (1 + cos)/2 ~
    Beta((n−1)/2, (n−1)/2) for any fixed v: mean 0, standard deviation ≈ 1/√n. A
    random step of the real step's length ‖Δ_k‖ from θ_k moves *toward* θ* (P_k > 0)
    exactly when cos > ‖Δ_k‖ / (2 d_k), so the expected fraction of steps with
    P_k > 0 under the null is computed exactly from each step's ``dist_sq`` and
    ``update_sq`` (no sampling). Returns ``cos_mean``, ``cos_null_sd`` (1/√n, one
    step), ``cos_null_sd_mean`` (1/√(nT), the mean over T independent steps),
    ``cos_z`` (mean / that), ``frac_progress`` (measured fraction P_k > 0) and
    ``frac_progress_null`` (its expectation for random directions); NaN without steps.

    Example:
        >>> b = null_alignment(100, [0.5, 0.4], [1.0, 0.8], [0.01, 0.01], [0.04, 0.03])
        >>> b["frac_progress"], round(b["frac_progress_null"], 3), round(b["cos_z"], 1)
        (1.0, 0.3, 6.4)
    """
    cos = np.asarray(cos_align, dtype=np.float64)
    cos = cos[np.isfinite(cos)]
    dist = np.sqrt(np.maximum(np.asarray(dist_sq, dtype=np.float64), 0.0))
    upd = np.sqrt(np.maximum(np.asarray(update_sq, dtype=np.float64), 0.0))
    out = dict.fromkeys(("cos_mean", "cos_null_sd", "cos_null_sd_mean", "cos_z", "frac_progress",
                         "frac_progress_null"), math.nan)
    if not n_params or not len(dist):
        return out
    # scipy is costly to import and only the exact null fraction needs the Beta law
    from scipy.stats import beta

    n = int(n_params)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(dist > 0, upd / (2.0 * dist), np.inf)
    a = (n - 1) / 2.0
    p = np.where(c < 1.0, beta.sf((1.0 + np.minimum(c, 1.0)) / 2.0, a, a), 0.0)
    out.update(cos_mean=float(cos.mean()) if len(cos) else math.nan, cos_null_sd=1.0 / math.sqrt(n),
               cos_null_sd_mean=1.0 / math.sqrt(n * max(len(cos), 1)),
               frac_progress=float((np.asarray(progress, dtype=np.float64) > 0).mean()),
               frac_progress_null=float(p.mean()))
    out["cos_z"] = out["cos_mean"] / out["cos_null_sd_mean"]
    return out
