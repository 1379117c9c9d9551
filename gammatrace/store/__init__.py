"""The run directory (DESIGN.md §4): atomic, versioned, never unpickles arbitrary objects;
and a study folder's ``study.json`` (:class:`StudyMeta`)."""

from gammatrace.store.run import Run, RunMeta, RunStore, Status, StoreError, load_run
from gammatrace.store.study import Claim, StudyMeta

__all__ = ["Claim", "Run", "RunMeta", "RunStore", "Status", "StoreError", "StudyMeta", "load_run"]
