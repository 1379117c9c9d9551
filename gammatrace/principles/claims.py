"""Claim statistics: the one verdict rule every report uses, and the null baseline for alignment.

Pure statistics over numbers the reporting layer has already read from the runs (no
torch, no files).

A *claim* is a weak order of cells by γ, largest first, as a paper states it: ``"relu ≈
leaky_relu > tanh > sigmoid"`` (:func:`parse_order` → levels; cells of one level are
tied, "≈" asserts no order between them). A run is a :class:`RunPoint` (one seed of a
cell: its median γ_k, its convergence value, and why it is excluded, if it is).
:func:`check_claim` decides the claim by one rule:

- statistic: the Jonckheere–Terpstra count J = Σ over pairs (x, y) of seeds, x in a
  level claimed larger than y's, of [x > y] + ½[x = y]; pairs inside a level do not
  count (:func:`order_statistic`);
- test: exact one-sided permutation test over all cells' seeds (:func:`order_test`):
  p = P(J ≥ J_obs) when the seeds' values are exchangeable across cells, computed
  exactly (no sampling); the reversed order's p is P(J ≤ J_obs);
- verdict: **consistent** when p < α (0.05); **not consistent** when the reversed
  order's p < α; **inconclusive** otherwise, with the reason; **single seed** when a
  cell has one run (one seed never yields "consistent"); inconclusive when a cell of
  the claim has an excluded run or the runs end at incomparable losses.

With two cells of 3 seeds the 20 arrangements give p ≥ 1/20 = 0.05: such a claim is
never significant, hence 4 seeds where a claim has two cells (:func:`min_p_value`).
Convergence speed is reported beside the verdict (the same test on −epochs), never part
of it: with θ* = θ_T, "larger γ ⇔ faster" is an identity for the averaged γ (DESIGN §1).

The same rule serves the report of a plain set of runs (no claimed order: the runs
ordered by convergence speed are the claim, each run a cell of one seed — so it says
"single seed"). Also here: :func:`epochs_to_loss` and :func:`null_alignment` (the
exact null baseline for cos_align and for the fraction of steps that move toward θ*).

Example:
    >>> pts = [RunPoint(f"{c}-s{i}", c, g + 0.01 * i, 10) for c, g in [("a", 3), ("b", 2), ("c", 1)]
    ...        for i in range(3)]
    >>> r = check_claim("a > b > c", pts)
    >>> r.verdict, round(r.test.p_value, 6), r.test.n_arrangements
    ('consistent', 0.000595, 1680)
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
    faster), and why it is excluded, if it is.

    Example:
        >>> RunPoint("relu-s0", "relu", 0.29, 6).excluded is None
        True
    """

    run: str
    cell: str
    gamma: float
    conv: float
    excluded: str | None = None


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


@dataclass
class ClaimResult:
    """What :func:`check_claim` found; ``text`` is the verdict with its p-value and reason.

    ``test`` is the exact test of the claimed order on γ (None when it could not run);
    ``speed`` the same test on convergence speed (faster = larger), reported beside the
    verdict and never part of it.
    """

    levels: Order
    cells: list[CellStat]
    excluded: dict[str, str]
    test: OrderTest | None
    speed: OrderTest | None
    gamma_order: list[str]
    speed_order: list[str]
    n_runs: int
    verdict: str
    reason: str = ""
    alpha: float = ALPHA
    notes: list[str] = field(default_factory=list)

    @property
    def order(self) -> list[str]:
        """The claim's cells, flattened in claimed order."""
        return [c for level in self.levels for c in level]

    @property
    def p_value(self) -> float:
        return self.test.p_value if self.test is not None else math.nan

    @property
    def p_reversed(self) -> float:
        return self.test.p_reversed if self.test is not None else math.nan

    @property
    def p_text(self) -> str:
        """``p = …`` (claimed order) and the reversed order's, or — without a test."""
        if self.test is None:
            return "p = —"
        return f"p = {_g(self.test.p_value)}, reversed p = {_g(self.test.p_reversed)}"

    @property
    def text(self) -> str:
        return f"{self.verdict} ({self.reason})" if self.reason else self.verdict


def _stat(cell: str, level: int, pts: list[RunPoint]) -> CellStat:
    g = [p.gamma for p in pts]
    c = [p.conv for p in pts]
    return CellStat(cell, level, len(pts), float(np.mean(g)), float(np.median(g)), min(g), max(g),
                    float(np.mean(c)), min(c), max(c))


def check_claim(order: str | Sequence[Any] | Order, points: Sequence[RunPoint], *, alpha: float = ALPHA,
                incomparable: str | None = None) -> ClaimResult:
    """Decide the claim "the cells' γ follow ``order``" from each seed's value.

    ``order``: a weak order (:func:`parse_order`). ``points``: the runs of the claim's
    cells (others are ignored). ``incomparable``: why the runs' γ cannot be compared
    (their end losses differ, DESIGN §1). Verdict, in this order:

    - inconclusive: a cell of the claim has an excluded run or no run ("cells
      excluded"), fewer than two levels have runs, or ``incomparable``;
    - single seed: a cell has one run (the p-value is shown, but a single seed has no
      spread to test against, so it never decides);
    - consistent: the exact test's p < ``alpha``;
    - not consistent: the reversed order's p < ``alpha``;
    - inconclusive otherwise — the reason names the p-values, and says so when the seed
      counts cannot reach p < ``alpha`` at all.

    Convergence: ``speed`` is the same test on −conv (claimed larger γ = faster),
    reported beside; ``speed_order`` lists cells by mean conv (fastest first).

    Example:
        >>> pts = [RunPoint("a-s0", "a", 3.0, 10), RunPoint("b-s0", "b", 2.0, 20), RunPoint("c-s0", "c", 1.0, 30)]
        >>> check_claim("a > b > c", pts).text
        'single seed (one run per cell: p = 0.17, reversed p = 1 shown, never a verdict)'
        >>> pts += [RunPoint("a-s1", "a", 2.1, 11), RunPoint("b-s1", "b", 2.2, 21), RunPoint("c-s1", "c", 1.1, 29)]
        >>> check_claim("a ≈ b > c", pts).text
        'inconclusive (p = 0.067, reversed p = 1 ≥ α = 0.05; with 4+2 seeds p cannot go below 0.067: add seeds)'
    """
    levels = parse_order(order) if not (isinstance(order, tuple) and all(isinstance(lv, tuple) for lv in order)) \
        else order
    if len(levels) < 2:
        raise ClaimError(f"a claim needs at least two levels ('a > b'), got {order_text(levels)!r}")
    excluded: dict[str, str] = {}
    stats: list[CellStat] = []
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
                mine += pts
        by_level.append(mine)
    comparable = [s.cell for s in stats]
    by = {s.cell: s for s in stats}
    gamma_order = sorted(comparable, key=lambda c: -by[c].gamma)
    speed_order = sorted(comparable, key=lambda c: by[c].conv)
    filled = [lv for lv in by_level if lv]
    test = speed = None
    if len(filled) >= 2:
        test = order_test([[p.gamma for p in lv] for lv in filled])
        conv = [[-p.conv for p in lv] for lv in filled]
        if all(math.isfinite(v) for lv in conv for v in lv):
            speed = order_test(conv)
    result = ClaimResult(levels, stats, excluded, test, speed, gamma_order, speed_order,
                         sum(len(lv) for lv in by_level), INCONCLUSIVE, alpha=alpha)
    seeds = "+".join(str(len(lv)) for lv in filled)
    if excluded:
        result.reason = "cells excluded: " + ", ".join(c for lv in levels for c in lv if c in excluded)
    elif test is None:
        result.reason = "fewer than two levels of the claim have comparable runs"
    elif incomparable:
        result.reason = incomparable
    elif min(s.n for s in stats) < 2:
        result.verdict = SINGLE_SEED
        result.reason = f"one run per cell: {result.p_text} shown, never a verdict"
    elif test.p_value < alpha:
        result.verdict, result.reason = CONSISTENT, f"p = {_g(test.p_value)} < α = {alpha:g}"
    elif test.p_reversed < alpha:
        result.verdict = NOT_CONSISTENT
        result.reason = f"the reversed order is significant: reversed p = {_g(test.p_reversed)} < α = {alpha:g}"
    else:
        result.reason = f"{result.p_text} ≥ α = {alpha:g}"
        if test.p_min >= alpha:
            result.reason += f"; with {seeds} seeds p cannot go below {_g(test.p_min)}: add seeds"
        else:
            result.reason += "; the seeds' spread does not separate the claimed order"
    return result


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
