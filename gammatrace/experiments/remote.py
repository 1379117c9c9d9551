"""Reports of runs and studies on object storage.

The report reads run tables and writes figures to a local folder; for runs stored under a
URL (``s3://…``) it works on a local copy of their tables and summaries — never the
checkpoints — and uploads the finished report next to them.

Example:
    >>> import tempfile
    >>> from gammatrace.reporting.collect import example_entry
    >>> out = tempfile.mkdtemp()
    >>> report_to([example_entry("relu").run.path], out + "/report").name   # local runs: the plain report
    'report.html'
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gammatrace.reporting import report
from gammatrace.reporting.build import publish_remote
from gammatrace.store.backend import Location, ObjectFiles, location
from gammatrace.store.run import RunStore


def _tables_only(rel: str) -> bool:
    """What a report needs of a run: everything but the tensor files (checkpoints, θ_T, θ*)."""
    return rel.endswith(".pt")


def report_to(runs: Sequence[str | Path | Location], out: str | Path | Location, *,
              study: str | Path | Location | None = None, **options: Any) -> Path | Location:
    """:func:`gammatrace.reporting.report` for runs and a report folder anywhere (local
    paths or URLs); returns where ``report.html`` is."""
    runs = [location(r) for r in runs]
    out = location(out)
    study = location(study) if study is not None else None
    if not any(isinstance(x, Location) for x in (*runs, out, study)):
        return report(runs, out, **({"study": study} if study is not None else {}), **options)
    with tempfile.TemporaryDirectory(prefix="gammatrace-report-") as tmp:
        local_runs: list[Path] = []
        base = Path(tmp) / "runs"
        for i, run in enumerate(runs):
            if isinstance(run, Location):
                name = run.name if all(r.name != run.name for r in runs[:i]) else f"{run.name}-{i}"
                dest = base / name
                ObjectFiles(run).download("", dest, skip=_tables_only)
                local_runs.append(dest)
            else:
                local_runs.append(Path(run))
        if isinstance(study, Location):
            (base / study.name).write_bytes(ObjectFiles(study.parent).read_bytes(study.name))
            study = base / study.name
        local_out = Path(tmp) / "report" if isinstance(out, Location) else out
        where = report(local_runs, local_out, **({"study": study} if study is not None else {}), **options)
        if not isinstance(out, Location):
            return where
        with RunStore(out).lock():  # one writer per report folder, as locally
            publish_remote(local_out, out)  # and stale figures removed by the manifest there
        return out / Path(where).relative_to(local_out).as_posix()
