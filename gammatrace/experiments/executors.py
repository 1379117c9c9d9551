"""Executors: run independent tasks (runs of a study, replay segments) in parallel.

``local`` runs tasks in this process (workers=1) or in spawned worker processes; each
task is a top-level function and picklable arguments, so the same task list can go to
a cluster executor unchanged.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from gammatrace.registry import Registry

EXECUTORS = Registry("executor")


class LocalExecutor:
    def __init__(self, workers: int = 1, **_: Any):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], *, desc: str = "", progress: bool = True) -> list[Any]:
        """Results of ``fn(*task)`` in task order; the first failure is raised."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=desc, disable=not progress or not tasks, leave=False)
        try:
            if self.workers == 1 or len(tasks) <= 1:
                out = []
                for t in tasks:
                    out.append(fn(*t))
                    bar.update(1)
                return out
            results: list[Any] = [None] * len(tasks)
            # spawn: a forked child would inherit torch's thread pools and locks.
            with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(fn, *t): i for i, t in enumerate(tasks)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
            return results
        finally:
            bar.close()


EXECUTORS.register("local")(LocalExecutor)


def make_executor(name: str = "local", **options: Any):
    """An executor by name, e.g. ``make_executor("local", workers=2)``."""
    return EXECUTORS.get(name)(**options)
