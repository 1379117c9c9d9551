"""Figures (matplotlib) and the report: ``report(runs, out)`` writes trajectory and
layer figures, ``summary.md`` and a self-contained ``report.html`` (DESIGN §3).

Example (two runs without an analysis: listed and flagged, so no figures are drawn):
    >>> import tempfile
    >>> from pathlib import Path
    >>> from gammatrace.reporting import report
    >>> from gammatrace.reporting.collect import example_entry
    >>> runs = [example_entry("relu").run.path, example_entry("sigmoid", analysed=False).run.path]
    >>> out = Path(tempfile.mkdtemp()) / "report"
    >>> report(runs, out=out).relative_to(out.parent)
    PosixPath('report/report.html')
    >>> sorted(p.name for p in out.iterdir())  # the manifest: what a later report may replace; the folder's lock
    ['.gammatrace-report.json', '.lock', 'report.html', 'summary.md']
"""

from gammatrace.reporting.build import report

__all__ = ["report"]
