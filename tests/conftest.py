"""Shared fixtures: the backend list every behavioural test runs over, and the
no-orphans check every test passes through."""

from __future__ import annotations

import os
import time

import psutil
import pytest

#: Every local backend. Adding a backend to the behavioural suite is one line here.
LOCAL_BACKENDS = ["serial", "thread", "process", "fork", "pool", "apply_async"]
#: Backends whose workers are separate processes (a crash cannot kill the test).
PROCESS_BACKENDS = ["process", "fork", "pool", "apply_async"]
#: Backends that can stop a running item (``timeout=``).
TIMEOUT_BACKENDS = PROCESS_BACKENDS

# Long-lived helpers that multiprocessing starts once per interpreter, on purpose.
_SINGLETON_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


@pytest.fixture(params=LOCAL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each local backend name in turn."""
    return str(request.param)


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request: pytest.FixtureRequest) -> str:
    """Each backend whose workers are real processes."""
    return str(request.param)


def _children() -> dict[int, psutil.Process]:
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if any(helper in cmdline for helper in _SINGLETON_HELPERS):
            continue
        found[child.pid] = child
    return found


@pytest.fixture(autouse=True)
def no_orphans():
    """Fail a test that leaves a child process alive (after a short grace period)."""
    before = set(_children())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = {pid: p for pid, p in _children().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        described = []
        for pid, proc in left.items():
            try:
                described.append(f"{pid} {' '.join(proc.cmdline())[:80]}")
                proc.kill()
            except psutil.Error:
                pass
        pytest.fail(f"test left {len(left)} child process(es) running: {described}")


@pytest.fixture
def tmp_marker_dir(tmp_path):
    """A directory for marker files that workers in other processes can see."""
    path = tmp_path / "markers"
    path.mkdir()
    return str(path)


def pytest_report_header() -> str:
    return f"parmap tests: {os.cpu_count()} CPUs; backends {', '.join(LOCAL_BACKENDS)}"
