"""The run directory (DESIGN.md §4): atomic, versioned, never unpickles arbitrary objects."""

from gammatrace.store.run import Run, RunMeta, RunStore, Status, StoreError, load_run

__all__ = ["Run", "RunMeta", "RunStore", "Status", "StoreError", "load_run"]
