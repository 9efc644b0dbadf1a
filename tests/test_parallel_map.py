"""Where a build's tasks run (builders/parallel_map.py), each backend on its own: results and a task's own
errors reach the future, a worker that dies fails its task with WorkerDied and is replaced, abort stops work."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from retrieval_spec.builders.parallel_map import (
    InProcess,
    LocalProcesses,
    RayTasks,
    WorkerDied,
    available_cores,
    make_backend,
)
from retrieval_spec.errors import BuildError


# Tasks: module-level, so that spawned processes and Ray workers can run them.
def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def interrupt() -> None:
    raise KeyboardInterrupt


def die() -> None:
    os._exit(3)  # as a worker killed or out of memory: no exception, no result


def pid() -> int:
    return os.getpid()


def write_pid_then_sleep(path: str, seconds: float) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)


def test_make_backend_picks_by_workers_and_address(monkeypatch: pytest.MonkeyPatch):
    assert isinstance(make_backend(1, None), InProcess)
    local = make_backend(3, None)
    assert isinstance(local, LocalProcesses) and local.workers == 3
    default = make_backend(None, None)
    assert default.workers == available_cores() >= 1
    with pytest.raises(BuildError, match="workers must be at least 1, got 0"):
        make_backend(0, None)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(BuildError, match=r"--ray needs Ray: pip install 'retrieval-spec\[ray\]'"):
        make_backend(2, "local")


def test_in_process_runs_each_task_when_submitted_and_hands_its_error_to_the_future():
    backend = InProcess()
    value = object()
    assert backend.share(value) is value
    done = backend.submit(add, 2, 3)
    assert done.done() and done.result() == 5
    failed = backend.submit(fail, "bad input")
    with pytest.raises(ValueError, match="bad input"):
        failed.result()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is not a task's error: it stops the build
        backend.submit(interrupt)
    backend.close(abort=False)


def test_local_processes_run_tasks_at_once_each_in_its_own_process():
    backend = LocalProcesses(2)
    try:
        first, second = backend.submit(pid), backend.submit(pid)
        pids = {first.result(timeout=60), second.result(timeout=60)}
        assert len(pids) == 2 and os.getpid() not in pids
        assert backend.submit(add, 2, 3).result(timeout=60) == 5
    finally:
        backend.close(abort=False)


def test_a_task_s_own_error_keeps_its_worker_and_a_dead_worker_is_replaced():
    backend = LocalProcesses(1)
    try:
        worker = backend.submit(pid).result(timeout=60)
        with pytest.raises(ValueError, match="bad input"):
            backend.submit(fail, "bad input").result(timeout=60)
        assert backend.submit(pid).result(timeout=60) == worker  # an exception is the task's, not the worker's
        with pytest.raises(WorkerDied, match="a local worker process died"):
            backend.submit(die).result(timeout=60)
        assert backend.submit(pid).result(timeout=60) not in (worker, os.getpid())  # a fresh process
    finally:
        backend.close(abort=False)


def test_more_tasks_than_workers_at_once_is_refused(tmp_path: Path):
    backend = LocalProcesses(1)
    try:
        backend.submit(write_pid_then_sleep, str(tmp_path / "pid"), 30)
        with pytest.raises(RuntimeError, match="more than 1 tasks submitted at once"):
            backend.submit(pid)
    finally:
        backend.close(abort=True)


def test_abort_ends_the_processes_of_running_tasks(tmp_path: Path):
    backend = LocalProcesses(2)
    paths = [tmp_path / f"pid-{number}" for number in range(2)]
    futures = [backend.submit(write_pid_then_sleep, str(path), 600) for path in paths]
    for _ in range(600):  # until both tasks run (spawning a process takes a second or two)
        if all(path.exists() and path.read_text() for path in paths):
            break
        time.sleep(0.1)
    workers = [int(path.read_text()) for path in paths]
    backend.close(abort=True)
    for worker in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)
    assert all(future.done() for future in futures)


def test_ray_tasks_return_results_errors_and_dead_workers_like_local_ones(monkeypatch: pytest.MonkeyPatch):
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # no token written under the home directory
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import this test module
    backend = RayTasks("local", 2)
    try:
        assert backend.workers == 2 and ray.is_initialized()
        assert backend.submit(add, backend.share(2), 3).result(timeout=120) == 5  # a shared value arrives as itself
        with pytest.raises(ValueError, match="bad input"):  # the task's own exception, not Ray's wrapper
            backend.submit(fail, "bad input").result(timeout=120)
        with pytest.raises(WorkerDied, match="a Ray worker died"):
            backend.submit(die).result(timeout=120)
        assert backend.submit(add, 1, 1).result(timeout=120) == 2
    finally:
        backend.close(abort=False)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized()  # started here, so shut down here


DRIVER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from retrieval_spec.builders.parallel_map import LocalProcesses
from test_parallel_map import write_pid_then_sleep

backend = LocalProcesses(2)
futures = [backend.submit(write_pid_then_sleep, f"{sys.argv[1]}/worker-{n}", 120) for n in range(2)]
time.sleep(300)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_local_workers_end_when_their_driver_is_killed(tmp_path: Path):
    """After ``kill -9`` of a build's driver, its workers end too, rather than go on writing into the staging
    directory of a build that no longer runs."""
    import signal
    import subprocess

    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), str(Path(__file__).parent)],
                              env=environment)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("worker-*"))) < 2 or not all(p.read_text() for p in tmp_path.glob("worker-*")):
            assert time.monotonic() < deadline and driver.poll() is None, "the workers never started"
            time.sleep(0.1)
        workers = [int(path.read_text()) for path in tmp_path.glob("worker-*")]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, workers)), "a worker outlived its driver"
    finally:
        driver.kill()
        for worker in filter(_running, workers):
            os.kill(worker, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for a parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
