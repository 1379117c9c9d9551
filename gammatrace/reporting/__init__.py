"""Figures (matplotlib) and the report: ``report(runs, out)`` writes trajectory and
layer figures, ``summary.md`` and a self-contained ``report.html`` (DESIGN §3).

Example:
    >>> from gammatrace.reporting import report
    >>> report(["runs/relu", "runs/sigmoid"], out="report")   # doctest: +SKIP
    PosixPath('report/report.html')
"""

from gammatrace.reporting.build import report

__all__ = ["report"]
