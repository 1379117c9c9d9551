"""The survey's landscape statements as hypotheses over curvature measured along the path,
and the rank correlation of γ with curvature across runs.

Paper 004 (the survey) explains techniques by the geometry of the loss, summarising other
papers: batch norm "reduce[s] the Lipschitz constants (of the objective and the gradients)"
(its summary of Santurkar et al.), "for networks without BatchNorm, there are large isolated
eigenvalues" (its summary of Ghorbani et al.), "more parameters than necessary" can "smooth
the landscape". Each becomes a :class:`Hypothesis`: a weak order of cells by a *path
statistic* — one number per run, read from the run's curvature step-hook table
(``analysis/<ref>/curvature/``: ``lambda_1 … lambda_k, beta_eff, outlier_ratio, lr, …``) —
checked by the one verdict rule of every claim
(:func:`~gammatrace.principles.claims.check_claim`, each run's statistic in place of its
median γ_k). Nothing here decides differently from a γ claim: only the number per run
differs.

:func:`spearman` is the rank correlation across runs of two per-run numbers (median γ_k and
median λ_1): a correlation over n runs, never a verdict.

Example:
    >>> import pandas as pd
    >>> t = pd.DataFrame({"step": [0, 5, 10], "lr": 0.1, "lambda_1": [4.0, 2.0, 3.0]})
    >>> path_statistic(t, "lambda_1"), round(path_statistic(t, "stability"), 6), path_statistic(t, "beta_eff")
    (3.0, 0.15, nan)
    >>> h = Hypothesis("BN smaller λ_1", (("none",), ("all",)), "lambda_1")
    >>> Hypothesis.from_json(h.as_json()) == h
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gammatrace.principles.claims import ClaimError, Order, order_text, parse_order

# The step-hook table the statistics are read from (DESIGN §4: analysis/<ref>/<hook>/).
CURVATURE_TABLE = "curvature"
# What a hypothesis says when a run of it has no value: never a verdict.
NOT_MEASURED = "not measured"
# Paper 004, the survey: its statements summarise other papers.
SURVEY = "004_c1755dd0f4887641.txt"


@dataclass(frozen=True)
class PathStatistic:
    """One number per run from its curvature table: the median over the table's rows (every
    measurement along the path, at every N steps and at the epoch ends alike) of
    ``values(table)``; ``needs`` the columns it reads, ``label`` what it is, in words."""

    name: str
    label: str
    needs: tuple[str, ...]
    values: Callable[[pd.DataFrame], np.ndarray]


# name -> statistic (a plain mapping: principles import nothing above themselves).
STATISTICS: dict[str, PathStatistic] = {}


def _register(name: str, label: str, needs: tuple[str, ...], values: Callable[[pd.DataFrame], np.ndarray]) -> None:
    STATISTICS[name] = PathStatistic(name, label, needs, values)


def get_statistic(name: str) -> PathStatistic:
    """The path statistic ``name``; an unknown name is a ClaimError listing the known ones.

    Example:
        >>> get_statistic("lambda_1").needs
        ('lambda_1',)
        >>> get_statistic("lambda_9")
        Traceback (most recent call last):
        ...
        gammatrace.principles.claims.ClaimError: unknown path statistic 'lambda_9'; choose one of: beta_eff, lambda_1, outlier_ratio, stability, trace
    """
    if name not in STATISTICS:
        raise ClaimError(f"unknown path statistic {name!r}; choose one of: {', '.join(sorted(STATISTICS))}")
    return STATISTICS[name]


def _column(name: str) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda t: t[name].to_numpy(np.float64)


_register("lambda_1", "median λ_1 along the path (largest Hessian eigenvalue)", ("lambda_1",), _column("lambda_1"))
_register("beta_eff", "median effective β-smoothness along the path", ("beta_eff",), _column("beta_eff"))
_register("outlier_ratio", "median outlier ratio λ_1/λ_k along the path", ("outlier_ratio",),
          _column("outlier_ratio"))
_register("trace", "median Hessian trace along the path (Hutchinson estimate)", ("trace",), _column("trace"))
# η_k·λ_1/2 from the table's own lr and λ_1: the plain-SGD stability ratio, whatever the
# optimizer (the table's stability_ratio uses the optimizer's own threshold).
_register("stability", "median η_k·λ_1/2 along the path", ("lr", "lambda_1"),
          lambda t: t["lr"].to_numpy(np.float64) * t["lambda_1"].to_numpy(np.float64) / 2.0)


def missing_columns(table: pd.DataFrame | None, statistic: str) -> list[str]:
    """The columns ``statistic`` needs that ``table`` lacks (all of them for no table).

    Example:
        >>> missing_columns(pd.DataFrame({"lambda_1": [1.0]}), "stability"), missing_columns(None, "lambda_1")
        (['lr'], ['lambda_1'])
    """
    need = get_statistic(statistic).needs
    if table is None:
        return list(need)
    return [c for c in need if c not in table.columns]


def path_statistic(table: pd.DataFrame | None, statistic: str) -> float:
    """``statistic`` (:data:`STATISTICS`) of one run's curvature table: the median of its
    finite values over the rows; NaN where the table or a column is absent or no value is
    finite.

    Example:
        >>> path_statistic(pd.DataFrame({"outlier_ratio": [float("nan"), 8.0, 2.0]}), "outlier_ratio")
        5.0
    """
    stat = get_statistic(statistic)
    if table is None or missing_columns(table, statistic) or not len(table):
        return math.nan
    v = stat.values(table)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else math.nan


@dataclass(frozen=True)
class Hypothesis:
    """A landscape statement as a weak order of cells by a path statistic, largest first.

    ``source``/``quote``: the paper file and its phrase; ``summary_of``: whose finding the
    paper summarises (the survey's statements are its summary of other papers, said so in
    the report); ``group``: the group of cells it is checked in.

    Example:
        >>> h = Hypothesis("BN smaller λ_1", "none > all ≈ first", "lambda_1", SURVEY, "Lipschitz", "Santurkar et al.")
        >>> h.order, h.order_text, h.attribution
        ((('none',), ('all', 'first')), 'none > all ≈ first', "004_c1755dd0f4887641.txt (the survey's summary of Santurkar et al.): “Lipschitz”")
    """

    text: str
    order: Order
    statistic: str
    source: str | None = None
    quote: str | None = None
    summary_of: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", parse_order(self.order))
        get_statistic(self.statistic)  # an unknown statistic fails here, by name

    @property
    def order_text(self) -> str:
        return order_text(self.order)

    @property
    def cells(self) -> tuple[str, ...]:
        return tuple(c for level in self.order for c in level)

    @property
    def attribution(self) -> str:
        """Where the statement is made, and whose finding it reports."""
        if self.source is None:
            return "hypothesis (no paper states it)"
        who = f" (the survey's summary of {self.summary_of})" if self.summary_of else ""
        return f"{self.source}{who}" + (f": “{self.quote}”" if self.quote else "")

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (study.json's ``hypotheses``)."""
        return {"text": self.text, "order": [list(lv) for lv in self.order], "statistic": self.statistic,
                "source": self.source, "quote": self.quote, "summary_of": self.summary_of, "group": self.group}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Hypothesis:
        """The hypothesis ``as_json`` wrote; a malformed entry is a ClaimError naming it."""
        keys = {"text", "order", "statistic", "source", "quote", "summary_of", "group"}
        if not isinstance(data, Mapping) or not {"text", "order", "statistic"} <= set(data) or set(data) - keys:
            raise ClaimError(f"a hypothesis needs text, order and statistic (and only {sorted(keys)}), got {data!r}")
        return cls(**{k: data.get(k) for k in keys})


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
    """Spearman's rank correlation ρ of the pairs where both values are finite, and their
    number n (ties get their average rank; ρ is NaN for n < 3 or a constant side).

    A correlation over n runs: it describes how the runs' two numbers co-vary, not what
    causes what.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3, 4], [4, 3, 2, 1])
        ((1.0, 4), (-1.0, 4))
        >>> rho, n = spearman([1, 2, 3, float("nan")], [1, 3, 2, 5])
        >>> round(rho, 3), n
        (0.5, 3)
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(len(a))
    if n < 3:
        return math.nan, n
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return (float((ra * rb).sum()) / den if den > 0 else math.nan), n


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1 … n, tied values sharing the mean of their ranks."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1, dtype=np.float64)
    for value in np.unique(v):
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
