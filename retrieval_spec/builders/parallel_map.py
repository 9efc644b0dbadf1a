"""Where a build's tasks run: in this process, in local worker processes, or as Ray tasks on a cluster.

Every backend takes a module-level function and picklable arguments and returns a
:class:`concurrent.futures.Future`, so the build's scheduler (:func:`retrieval_spec.builders.build`) is one loop
whatever runs the tasks. A task whose worker process dies (killed, out of memory) fails with
:class:`WorkerDied`; the scheduler resubmits it a bounded number of times. Retries live there, not in Ray's
``max_retries``, so that both backends count attempts the same way and fail with the same message.

Ray runs plain tasks rather than Ray Data: a build is a few dozen to a few thousand coarse tasks that write files
and return a small dict, in an order the plan fixes; Ray Data's row blocks, operator fusion and autoscaling would
add a dependency (``ray[data]``) and a second notion of "block" without anything to stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Protocol

from retrieval_spec.errors import BuildError

PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>
DRIVER_POLL_SECONDS = 0.5


class WorkerDied(Exception):
    """The process running a task ended before the task returned."""


class Backend(Protocol):
    """Runs tasks; ``workers`` of them at a time make full use of it."""

    name: str
    workers: int

    def share(self, value: Any) -> Any:
        """A handle of a large read-only argument (the tokenizer) to pass to many tasks."""

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        """Start ``function(*args)``; the future fails with :class:`WorkerDied` if its worker dies."""

    def close(self, *, abort: bool) -> None:
        """Release the workers; with ``abort``, stop running tasks first and wait until none is left writing."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default number of local workers."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_backend(workers: int | None, ray_address: str | None) -> Backend:
    """In-process for one local worker, a process pool for more, Ray tasks when ``ray_address`` is given.

    Args:
        workers: tasks at once (default: the cores of this machine, or the CPUs of the Ray cluster).
        ray_address: ``"local"`` starts Ray on this machine (or joins the cluster named by ``RAY_ADDRESS``);
            anything else is passed to ``ray.init(address=...)`` (``"auto"``, ``"ray://head:10001"``).
    """
    if workers is not None and workers < 1:
        raise BuildError(f"workers must be at least 1, got {workers}")
    if ray_address is not None:
        return RayTasks(ray_address, workers)
    workers = workers or available_cores()
    return InProcess() if workers == 1 else LocalProcesses(workers)


class InProcess:
    """Runs each task when it is submitted, in this process: no pickling, nothing to lose but the build."""

    name = "in-process"
    workers = 1

    def share(self, value: Any) -> Any:
        return value

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except Exception as error:  # noqa: BLE001 - handed to the scheduler like a worker's exception
            future.set_exception(error)
        return future

    def close(self, *, abort: bool) -> None:
        pass


class LocalProcesses:
    """``workers`` processes on this machine, each its own one-process pool, started fresh (spawn) and
    replaced when it dies.

    One pool per process, rather than one pool of ``workers`` processes: a process that dies breaks its pool,
    and every task of a broken pool fails with it, so only with one task per pool is the task that killed
    its worker the only one charged an attempt. Spawned rather than forked: the parent may hold threads
    (tqdm's monitor, a tokenizer's thread pool) and torch, which a fork copies in an undefined state. Each
    process exits when the driver does (:func:`_die_with_driver`).
    """

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._idle: list[ProcessPoolExecutor | None] = [None] * workers  # None: started on first use
        self._busy: set[ProcessPoolExecutor] = set()

    def share(self, value: Any) -> Any:
        return value

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        if not self._idle:
            raise RuntimeError(f"more than {self.workers} tasks submitted at once")
        pool = self._idle.pop() or _one_process_pool()
        try:
            inner = pool.submit(function, *args)
        except BrokenProcessPool:  # its process died after its last task ended
            pool.shutdown(wait=True)
            pool = _one_process_pool()
            inner = pool.submit(function, *args)
        self._busy.add(pool)
        outer: Future = Future()

        def settle(done: Future) -> None:
            self._busy.discard(pool)
            if done.cancelled():  # the build is being aborted
                outer.cancel()
                return
            error = done.exception()
            if isinstance(error, BrokenProcessPool):
                pool.shutdown(wait=False)  # its process is gone; a new one starts with the next task
                self._idle.append(None)
                outer.set_exception(WorkerDied(f"a local worker process died ({error})"))
                return
            self._idle.append(pool)
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result())

        inner.add_done_callback(settle)
        return outer

    def close(self, *, abort: bool) -> None:
        pools = [pool for pool in [*self._idle, *self._busy] if pool is not None]
        if abort:
            for pool in pools:
                _terminate_workers(pool)
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._idle, self._busy = [None] * self.workers, set()


def _one_process_pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_driver,
                               initargs=(os.getpid(),))


def _die_with_driver(driver: int) -> None:
    """In a worker, first thing: exit as soon as the driver process is gone, however it ended (``kill -9``
    included), so that no task writes on into the staging directory of a build nobody runs any more.

    On Linux the kernel kills the worker when the driver's thread that started it ends (``PR_SET_PDEATHSIG``);
    everywhere a daemon thread also checks every :data:`DRIVER_POLL_SECONDS` that the driver is still its parent.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != driver:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(DRIVER_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-driver", daemon=True).start()


def _terminate_workers(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's processes so that none writes after the build removed its staging directory."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    processes = list((pool._processes or {}).values())  # noqa: SLF001 - no public way before Python 3.14
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


class RayTasks:
    """Ray tasks of one CPU each on a local Ray or a cluster; at most ``workers`` are submitted at once.

    Ray is started here (and shut down on close) unless this process is already connected to one. Every node
    must have this package installed and reach the index directory at the same path.
    """

    name = "ray"

    def __init__(self, address: str, workers: int | None) -> None:
        try:
            import ray
        except ImportError:
            raise BuildError("--ray needs Ray: pip install 'retrieval-spec[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            try:
                if address == "local":
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, log_to_driver=False)
            except ConnectionError as error:
                raise BuildError(f"cannot reach the Ray cluster at {address!r}: {error}") from None
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote: dict[Callable[..., Any], Any] = {}
        self._running: dict[Any, Future] = {}

    def share(self, value: Any) -> Any:
        return self._ray.put(value)  # stored once; a task given the reference receives the value

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        ray = self._ray
        if function not in self._remote:
            self._remote[function] = ray.remote(num_cpus=1, max_retries=0)(function)
        ref = self._remote[function].remote(*args)
        outer: Future = Future()
        self._running[ref] = outer

        def settle(done: Future) -> None:
            self._running.pop(ref, None)
            if done.cancelled():
                outer.cancel()
                return
            error = done.exception()
            if isinstance(error, ray.exceptions.RayTaskError):
                outer.set_exception(error.cause)  # the task's own exception (an InputError, a bug)
            elif isinstance(error, ray.exceptions.RayError):
                outer.set_exception(WorkerDied(f"a Ray worker died ({type(error).__name__}: {error})"))
            elif error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(done.result())

        ref.future().add_done_callback(settle)
        return outer

    def close(self, *, abort: bool) -> None:
        ray = self._ray
        if abort and self._running:
            refs = list(self._running)
            for ref in refs:
                ray.cancel(ref, force=True)  # kills the worker process: nothing writes after this returns
            ray.wait(refs, num_returns=len(refs), timeout=60)
        if self._started:
            ray.shutdown()
