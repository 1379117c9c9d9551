"""Executors: run independent tasks (runs of a study, replay segments) in parallel.

Every executor has one method, ``map(fn, tasks) -> results`` in task order, raising the
first failure. Tasks are a top-level function and picklable arguments, so the same
task list goes to any executor unchanged.

- ``local``: this process (workers=1) or spawned worker processes.
- ``ray``: one Ray task per item, on a cluster (``address``) or a local instance;
  needs the optional dependency (``pip install 'gammatrace[ray]'``).

Example:
    >>> make_executor("local", workers=1).map(pow, [(2, 3), (3, 2)], progress=False)
    [8, 9]
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, Protocol

from tqdm.auto import tqdm

from gammatrace.errors import ConfigError, UserError
from gammatrace.machine import fingerprint, ray_resource
from gammatrace.registry import Registry

# What a task asks of its node's machine-kind resource: a sliver (a node declares 1), so the
# resource picks the node and never limits how many tasks run there at once.
MACHINE_SHARE = 0.001


class Executor(Protocol):
    """``map(fn, tasks) -> results`` in task order, raising the first failure.

    ``machines``: per task, the machine kind (:func:`gammatrace.machine.machine_id`) it
    must run on, or None for any. Bits belong to a machine kind: a replay segment must run
    where its run was recorded. Here is the only machine a local executor has (its callers
    warn when it is of another kind); Ray schedules on nodes that declare the kind.
    """

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], *, desc: str = "",
            progress: bool = True, machines: Sequence[str | None] | None = None) -> list[Any]: ...


class MachineUnavailableError(UserError):
    """No node of the Ray cluster is of the machine kind a task's run was recorded on."""


class ExecutorFactory(Protocol):
    """``factory(workers=..., address=..., num_gpus=..., ...) -> Executor``."""

    def __call__(self, **options: Any) -> Executor: ...


EXECUTORS: Registry[ExecutorFactory] = Registry("executor")


class MissingDependencyError(UserError, ImportError):
    """An executor needs an optional package that is not installed."""


def _bar(n: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=n, desc=desc, disable=not progress or not n, leave=False)


def die_with_parent(parent: int) -> None:
    """Make this worker process end when ``parent`` dies (even by ``kill -9``): a spawned
    worker would otherwise keep training and writing after the command that owns the run
    folder's lock is gone. Linux: the kernel's parent-death signal; elsewhere a thread
    that polls the parent.

    Example:
        >>> import subprocess, sys
        >>> code = "import os; from gammatrace.executors import die_with_parent; die_with_parent(os.getppid()); print('armed')"
        >>> subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        'armed'
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the signal was armed
                os.kill(os.getpid(), signal.SIGKILL)
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _worker_init(parent: int) -> None:
    """A local worker: ends with its parent, and leaves Ctrl-C to it (SIGINT was blocked
    while it started; ignored from now on, a pending one dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    die_with_parent(parent)


@EXECUTORS.register("local")
class LocalExecutor:
    """Tasks in this process (``workers=1``) or in ``workers`` spawned processes.

    Example:
        >>> LocalExecutor(workers=1).map(divmod, [(7, 2)], progress=False)
        [(3, 1)]
    """

    def __init__(self, workers: int = 1, **_: Any):
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], *, desc: str = "", progress: bool = True,
            machines: Sequence[str | None] | None = None) -> list[Any]:
        """Results of ``fn(*task)`` in task order; the first failure is raised. ``machines``
        is not checked here: this machine is the only one (the caller warns)."""
        bar = _bar(len(tasks), desc, progress)
        try:
            if self.workers == 1 or len(tasks) <= 1:
                out = []
                for t in tasks:
                    out.append(fn(*t))
                    bar.update(1)
                return out
            # spawn: a forked child would inherit torch's thread pools and locks. Ctrl-C
            # reaches every process of the terminal's group: the workers are started with
            # SIGINT blocked (a mask survives exec; the pool starts them in submit) and
            # ignore it from then on, so an interrupt is the driver's alone: it stops the
            # workers and prints one line, instead of a traceback from every worker.
            pool = ProcessPoolExecutor(min(self.workers, len(tasks)), mp_context=mp.get_context("spawn"),
                                       initializer=_worker_init, initargs=(os.getpid(),))
            try:
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    futures = [pool.submit(fn, *t) for t in tasks]
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending Ctrl-C is raised here
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    bar.update(len(done))
                    for fut in done:
                        if fut.exception() is not None:
                            raise fut.exception()
                return [f.result() for f in futures]
            except KeyboardInterrupt:
                # The workers ignore SIGINT: end them (a rerun resumes what they were writing,
                # as after any kill), rather than wait for their tasks to finish.
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
                raise
            finally:
                # On a failure, queued tasks are dropped rather than run to completion
                # first; running ones finish (a resumed study picks up the rest).
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            bar.close()


@EXECUTORS.register("ray")
class RayExecutor:
    """One Ray task per item: ``ray.remote(num_cpus, num_gpus)``, on the cluster at
    ``address`` or on a local instance started for this call (and stopped after it).

    A task's files are written by the task itself: on a cluster the output folder must be
    one every node reaches — object storage (``--out s3://bucket/study``: tasks read inputs
    from it and write results to it, no shared file system needed) or a shared file
    system. ``workers`` sizes the local instance (CPUs); on a cluster Ray schedules by the
    resources each task asks for. A local instance listens on 127.0.0.1 only.

    Example:
        >>> ex = make_executor("ray", workers=2)  # building it needs no Ray; map() does
        >>> type(ex).__name__, ex.workers, ex.address
        ('RayExecutor', 2, None)
        >>> ex.map(pow, [(2, 3), (3, 2)], progress=False)  # starts a Ray instance: seconds  # doctest: +SKIP
        [8, 9]
    """

    def __init__(self, workers: int = 1, address: str | None = None, num_gpus: float = 0.0,
                 num_cpus: float = 1.0, **_: Any):
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if num_gpus < 0 or num_cpus <= 0:
            raise ConfigError(f"ray tasks need num_cpus > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}")
        self.workers, self.address, self.num_gpus, self.num_cpus = workers, address, num_gpus, num_cpus

    @staticmethod
    def _ray():
        try:
            # ray is an optional extra
            import ray
        except ImportError:
            raise MissingDependencyError(
                "executor 'ray' needs Ray, which is not installed: pip install 'gammatrace[ray]'") from None
        return ray

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], *, desc: str = "", progress: bool = True,
            machines: Sequence[str | None] | None = None) -> list[Any]:
        """Results of ``fn(*task)`` in task order; the first failure is raised (its own
        exception type, not Ray's wrapper) and the tasks not yet finished are cancelled.

        A task with a machine kind in ``machines`` asks for the custom resource
        ``gammatrace-machine-<kind>`` (a sliver of it, so it never limits concurrency): Ray
        runs it only on a node that declares that resource (``gammatrace machine`` prints
        the ``ray start --resources`` argument for the node it runs on; a local instance
        started here declares its own). A kind no node declares is refused before any task
        starts, in one line."""
        if not tasks:
            return []
        machines = list(machines) if machines is not None else [None] * len(tasks)
        if len(machines) != len(tasks):
            raise ValueError(f"{len(machines)} machine kinds for {len(tasks)} tasks")
        ray = self._ray()
        started = not ray.is_initialized()
        options: dict[str, Any] = {"address": self.address, "log_to_driver": False,
                                   "logging_level": logging.ERROR}  # Ray's INFO/WARNING lines are not ours
        if self.address is None:
            # A private local instance: no dashboard, only as many CPUs as asked for, and
            # loopback only (Ray would otherwise bind the host's interface address). It is
            # this machine, so it declares this machine's kind.
            options.update(num_cpus=self.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                           resources={ray_resource(fingerprint()): 1.0})
        with (_ray_instance(ray, options, local=self.address is None) if started else contextlib.nullcontext()), \
                _node_died(ray, self.address):
            return self._map(ray, fn, tasks, machines, desc, progress)

    def _map(self, ray: Any, fn: Callable[..., Any], tasks: Sequence[tuple], machines: list[str | None],
             desc: str, progress: bool) -> list[Any]:
        bar = _bar(len(tasks), desc, progress)
        try:
            declared = ray.cluster_resources()
            missing = sorted({m for m in machines if m is not None and ray_resource(m) not in declared})
            if missing:
                raise MachineUnavailableError(
                    f"no node of the Ray cluster{' at ' + self.address if self.address else ''} is of the machine "
                    f"kind {', '.join(missing)} that the run was recorded on (bitwise replay needs it): start such "
                    "a node with the resource that `gammatrace machine` prints there, or replay locally on it")
            remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus)(_call)
            refs = [(remote.options(resources={ray_resource(m): MACHINE_SHARE}) if m else remote).remote(fn, *t)
                    for t, m in zip(tasks, machines, strict=True)]
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as exc:
                        for other in pending:
                            ray.cancel(other)
                        raise _cause(exc) from exc
                bar.update(len(done))
            return ray.get(refs)
        finally:
            bar.close()


class RayNodeDiedError(UserError):
    """The Ray node running the tasks died (its raylet, or an agent the raylet needs, was
    killed or crashed): what the tasks wrote stays, a rerun resumes."""


# Ray's exceptions that mean "a node of the instance is gone", not "a task failed" (a
# task's own exception reaches the caller as itself, see _cause).
_NODE_DIED = ("LocalRayletDiedError", "NodeDiedError", "RaySystemError", "OwnerDiedError", "ObjectLostError")


@contextlib.contextmanager
def _node_died(ray: Any, address: str | None) -> Iterator[None]:
    """A dead raylet or node as one line (:class:`RayNodeDiedError`) instead of Ray's traceback."""
    try:
        yield
    except Exception as exc:
        died = [k for k in type(exc).__mro__ if k.__name__ in _NODE_DIED and k.__module__.startswith("ray")]
        if not died:
            raise
        where = f"the Ray cluster at {address}" if address else "the local Ray instance"
        text = " ".join(str(exc).split())
        raise RayNodeDiedError(f"a node of {where} died while the tasks ran ({type(exc).__name__}: "
                               f"{text[:160]}); what finished is kept: rerun the same command to resume") from None


@contextlib.contextmanager
def _ray_instance(ray: Any, options: dict[str, Any], local: bool) -> Iterator[None]:
    """``ray.init(**options)`` for this call, and ``ray.shutdown()`` after it whatever
    happens, an interrupt during ``ray.init`` included. A local instance also leaves no
    process behind: while it lives this process is a child subreaper (Linux), so Ray's
    processes orphaned by a raylet that died (its DashboardAgent and RuntimeEnvAgent,
    which outlived a driver interrupted inside ``ray.init``) stay below it, and whatever
    Ray started that is still alive after the shutdown is killed; SIGTERM ends it the
    way Ctrl-C does (Ray's own handler would end the driver with no shutdown)."""
    before = set(_descendants()) if local else set()
    reaper = local and _subreaper(True)
    term = _on_sigterm() if local else None
    try:
        ray.init(**options)
        if local:
            _on_sigterm()  # ray.init installs Ray's SIGTERM handler over ours
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            if local:
                _end_leftovers(before)
            if reaper:
                _subreaper(False)
            if term is not None:
                signal.signal(signal.SIGTERM, term)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _on_sigterm() -> Any:
    """SIGTERM raises KeyboardInterrupt (the command's own interrupt path: one line, the
    instance shut down); the previous handler, or None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _interrupted)


def _subreaper(on: bool) -> bool:
    """Linux PR_SET_CHILD_SUBREAPER: orphaned descendants are reparented to this process
    (not to init), so they can be found and ended. True when this call changed it (a
    process that already was one, under tini say, stays one); False where unavailable."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        now = ctypes.c_int(0)
        if prctl(37, ctypes.byref(now), 0, 0, 0) != 0 or bool(now.value) == on:  # PR_GET_CHILD_SUBREAPER
            return False
        return prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _descendants() -> dict[int, str]:
    """This process's descendants (Linux /proc; none elsewhere): PID -> command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(pid)
    return found


def _end_leftovers(before: set[int]) -> None:
    """Kill the Ray processes started below this process since ``before`` that outlived
    ``ray.shutdown()``, and reap those reparented here."""
    left = [pid for pid, cmd in _descendants().items() if pid not in before and "ray" in cmd.lower()]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in left:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    # ray.remote takes Python functions only; this wrapper also carries builtins and
    # other callables (functools.partial, bound methods) to the workers.
    return fn(*args)


def _cause(exc: Exception) -> BaseException:
    """The task's own exception inside Ray's wrapper (so callers catch what they expect)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def make_executor(name: str = "local", **options: Any):
    """An executor by name, e.g. ``make_executor("local", workers=2)``; unknown options
    are ignored by executors that have no use for them (``num_gpus`` locally).

    Example:
        >>> type(make_executor("ray", workers=2, address=None)).__name__
        'RayExecutor'
    """
    return EXECUTORS.get(name)(**options)
