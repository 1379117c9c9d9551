"""The run directory (DESIGN.md §4): atomic, versioned, never unpickles arbitrary objects;
and a study folder's ``study.json`` (:class:`StudyMeta`).

Example:
    >>> import tempfile
    >>> from gammatrace.config import RunConfig
    >>> folder = tempfile.mkdtemp()
    >>> config = RunConfig(name="demo", epochs=3).model_dump(mode="json")
    >>> RunStore(folder).write_meta(RunMeta(config=config, epochs_done=1))  # a run one epoch in
    >>> run = load_run(folder)
    >>> run.name, run.status.value, run.meta.epochs_done, run.config.epochs, run.references()
    ('demo', 'running', 1, 3, [])
"""

from gammatrace.store.run import Run, RunMeta, RunStore, Status, StoreError, load_run
from gammatrace.store.study import Claim, StudyMeta
from gammatrace.store.summary import RunSummary

__all__ = ["Claim", "Run", "RunMeta", "RunStore", "RunSummary", "Status", "StoreError", "StudyMeta", "load_run"]
