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
#: Processes owned by session-scoped fixtures (the shared Dask cluster), not by a test.
SESSION_PIDS: set[int] = set()


@pytest.fixture(params=LOCAL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each local backend name in turn."""
    return str(request.param)


@pytest.fixture(params=PROCESS_BACKENDS)
def process_backend(request: pytest.FixtureRequest) -> str:
    """Each backend whose workers are real processes."""
    return str(request.param)


def live_children() -> dict[int, psutil.Process]:
    """This process's live descendants, by pid, less the session's own (its
    Dask cluster) and multiprocessing's helpers (forkserver, resource tracker)."""
    found = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if child.pid in SESSION_PIDS or any(helper in cmdline for helper in _SINGLETON_HELPERS):
            continue
        found[child.pid] = child
    return found


@pytest.fixture(autouse=True)
def no_orphans():
    """Fail a test that leaves a child process alive (after a short grace period)."""
    before = set(live_children())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = {pid: p for pid, p in live_children().items() if pid not in before}
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


# ---------------------------------------------------------------------------
# Dask (issue 6). Additions only: one real cluster for the whole session, and
# a fixture through which any behavioural test can include backend="dask".
# ---------------------------------------------------------------------------

try:
    import distributed as _distributed  # noqa: F401 - only asks whether it is installed
except ImportError:
    DASK_AVAILABLE = False
else:
    DASK_AVAILABLE = True

#: The local backends plus "dask" (skipped when distributed is not installed).
ALL_BACKENDS = [
    *LOCAL_BACKENDS,
    pytest.param("dask", marks=pytest.mark.skipif(not DASK_AVAILABLE, reason="needs parmap[dask]")),
]


@pytest.fixture(scope="session")
def dask_cluster():
    """A real two-process LocalCluster shared by the session's dask tests.

    Configured as parmap configures a cluster it starts itself (see
    parmap/backends/dask.py). It is created before the first test that needs
    it starts, so its processes are in that test's ``no_orphans`` "before"
    set; a test that kills a worker must use its own cluster, because the
    nanny's replacement would be a new child.
    """
    if not DASK_AVAILABLE:
        pytest.skip("needs parmap[dask]")
    import dask
    from distributed import LocalCluster

    from parmap.backends.dask import OWN_CLUSTER_CONFIG

    with dask.config.set(OWN_CLUSTER_CONFIG):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    # Created on behalf of the session, possibly inside some test's no_orphans window.
    SESSION_PIDS.update(p.pid for p in psutil.Process().children(recursive=True))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def dask_address(dask_cluster, monkeypatch) -> str:
    """The session cluster's address, also set as PARMAP_DASK_ADDRESS for this test."""
    address = str(dask_cluster.scheduler_address)
    monkeypatch.setenv("PARMAP_DASK_ADDRESS", address)
    return address


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> str:
    """Each backend name in turn, dask included (on the session cluster).

    Use it instead of ``backend`` in a behavioural test that every backend
    must pass; ``backend="dask"`` then connects through PARMAP_DASK_ADDRESS.
    """
    if request.param == "dask":
        request.getfixturevalue("dask_address")
    return str(request.param)
