"""backend="dask": the same promises on a real Dask ``distributed`` cluster.

Most tests share the session's two-process LocalCluster (conftest
``dask_cluster``), reached through ``address=`` or PARMAP_DASK_ADDRESS. Tests
that start or kill workers use a cluster of their own, because a worker the
nanny restarts would be a new child process of this test.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parmap

distributed = pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parent.parent


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"three is bad: {x}")
    return x


@pytest.fixture(scope="module")
def dask_pool(dask_cluster):
    """One Pool (one client) on the session cluster for the property tests."""
    with parmap.Pool(backend="dask", address=dask_cluster.scheduler_address) as pool:
        yield pool


# -- results equal the serial map ---------------------------------------------

_property = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_items = st.lists(st.integers(-1000, 1000), max_size=60)
_chunksizes = st.one_of(st.none(), st.integers(1, 7))


@_property
@given(items=_items, chunksize=_chunksizes)
def test_map_equals_serial(dask_pool, items, chunksize):
    assert dask_pool.map(square, items, chunksize=chunksize) == [square(x) for x in items]


# Unordered only until the core scheduler refills its window after delivering
# (ordered imap can block when a whole window finishes at once; issue 6 report).
@_property
@given(items=_items, chunksize=_chunksizes)
def test_imap_unordered_equals_serial(dask_pool, items, chunksize):
    results = list(dask_pool.imap(square, iter(items), chunksize=chunksize, ordered=False))
    assert sorted(results) == sorted(square(x) for x in items)


def test_lambdas_closures_partials_through_the_environment(dask_address):
    offset = 10

    def nested(x):
        return (x, offset)

    assert parmap.map(lambda x: x + offset, range(20), backend="dask") == [x + 10 for x in range(20)]
    assert parmap.map(functools.partial(add, 5), range(5), backend="dask") == [5, 6, 7, 8, 9]
    assert parmap.map(nested, [1, 2], backend="dask") == [(1, 10), (2, 10)]
    assert parmap.map(square, [], backend="dask") == []


def test_submit(dask_pool):
    assert dask_pool.submit(pow, 2, 10).result(timeout=30) == 1024


def test_impure_calls_are_never_served_from_a_cache(dask_pool):
    def stamp(_):
        return time.perf_counter_ns()

    # The same function object, the same items: Dask must run them again.
    first = dask_pool.map(stamp, [1, 2, 3], chunksize=1)
    second = dask_pool.map(stamp, [1, 2, 3], chunksize=1)
    assert not set(first) & set(second)


class _CountsUnpickling:
    """A callable that records, in a file, each time it is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_rebuild_counter, (self.path,))

    def __call__(self, x):
        return x


def _rebuild_counter(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return _CountsUnpickling(path)


def test_fn_is_loaded_once_per_worker_not_per_chunk(dask_pool, tmp_path):
    log = tmp_path / "unpickled"
    fn = _CountsUnpickling(str(log))
    assert dask_pool.map(fn, range(40), chunksize=1) == list(range(40))
    pids = log.read_text().split()
    assert len(pids) == len(set(pids)) <= 2  # two workers in the session cluster


# -- errors -----------------------------------------------------------------------


def test_error_keeps_its_type_and_names_the_item(dask_pool):
    with pytest.raises(ValueError, match="three is bad") as info:
        dask_pool.map(fail_on_three, range(10))
    assert any("item #3" in note for note in info.value.__notes__)
    assert isinstance(info.value.__cause__, parmap.RemoteTraceback)
    assert "fail_on_three" in info.value.__cause__.text


def decode_or_exit(kind):
    if kind == "decode":
        b"\xff".decode("utf-8")
    raise SystemExit(5)


def test_builtin_exceptions_keep_their_fields(dask_pool):
    # Dask's workers pickle exceptions with tblib's reducers, which skip __init__.
    with pytest.raises(UnicodeDecodeError) as info:
        dask_pool.map(decode_or_exit, ["decode"])
    assert (info.value.encoding, info.value.reason) == ("utf-8", "invalid start byte")
    with pytest.raises(SystemExit) as stop:
        dask_pool.map(decode_or_exit, ["exit"])
    assert stop.value.code == 5


def test_state_an_initializer_sets_up_is_seen_by_fn_sent_by_value(dask_cluster):
    # Sent by value (as a script's functions are), the initializer and fn
    # unpickle with private copies of their module's globals.
    import cloudpickle
    import initstate

    cloudpickle.register_pickle_by_value(initstate)
    try:
        options = {"address": dask_cluster.scheduler_address, "initializer": initstate.remember, "initargs": ("T",)}
        assert parmap.map(initstate.recall, range(4), backend="dask", chunksize=1, **options) == ["T"] * 4
        with parmap.Pool(backend="dask", **options) as pool:
            assert pool.submit(initstate.recall, 0).result(timeout=60) == "T"
    finally:
        cloudpickle.unregister_pickle_by_value(initstate)


def test_on_error_skip_and_return(dask_pool):
    assert dask_pool.map(fail_on_three, range(6), on_error="skip") == [0, 1, 2, 4, 5]
    returned = dask_pool.map(fail_on_three, range(6), on_error="return", chunksize=2)
    assert returned[:3] == [0, 1, 2] and returned[4:] == [4, 5]
    assert isinstance(returned[3], ValueError)


def _fail_first_time(marker_dir, x):
    marker = os.path.join(marker_dir, str(x))
    if x % 3 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"first attempt at {x}")
    return x


def test_retries(dask_pool, tmp_marker_dir):
    fn = functools.partial(_fail_first_time, tmp_marker_dir)
    assert dask_pool.map(fn, range(12), retries=1) == list(range(12))
    with pytest.raises(RuntimeError, match="first attempt at 12"):
        dask_pool.map(fn, range(12, 15), retries=0)


def slow_square(x):
    time.sleep(0.02)
    return x * x


def test_terminate_ends_the_maps_other_threads_run(dask_address):
    # Their chunks were cancelled but never reported: those maps waited for ever.
    pool = parmap.Pool(workers=2, backend="dask", address=dask_address)
    outcome: list[BaseException | list[int]] = []

    def run() -> None:
        try:
            outcome.append(pool.map(slow_square, range(400), chunksize=2))
        except BaseException as exc:
            outcome.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    pool.terminate()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(outcome) == 3 and all(isinstance(o, parmap.PoolClosedError) for o in outcome), outcome


def test_timeout_is_refused_up_front(dask_address):
    with pytest.raises(ValueError, match="timeout"):
        parmap.map(square, range(3), backend="dask", timeout=1)


def test_initializer_runs_once_per_worker(dask_address, tmp_path):
    log = tmp_path / "init"

    def init(path):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    pids = parmap.map(lambda _: os.getpid(), range(30), backend="dask", chunksize=1, initializer=init, initargs=(log,))
    initialized = log.read_text().split()
    assert len(initialized) == len(set(initialized))
    assert set(map(str, pids)) <= set(initialized)


def test_initializer_error_is_raised(dask_address):
    def init():
        raise OSError("no database")

    with pytest.raises(OSError, match="no database"):
        parmap.map(square, range(4), backend="dask", initializer=init)


# -- progress and laziness --------------------------------------------------------


def test_progress_counts_items(dask_pool, capsys):
    dask_pool.map(square, range(50), progress=True, chunksize=7)
    assert "50/50" in capsys.readouterr().err


def test_imap_pulls_input_only_as_workers_take_it(dask_pool):
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    results = dask_pool.imap(square, endless(), chunksize=2, ordered=False)
    taken = []
    for value in results:
        taken.append(value)
        time.sleep(0.01)  # a slow consumer
        if len(taken) == 30:
            break
    results.close()
    assert len(set(taken)) == 30
    window = 2 * 2 + 1  # chunks in flight for a two-thread cluster
    assert pulled <= len(taken) + window * 2


# -- clusters of their own ----------------------------------------------------------


def test_cluster_named_by_the_environment_variable(monkeypatch):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        monkeypatch.setenv("PARMAP_DASK_ADDRESS", cluster.scheduler_address)
        where = parmap.map(lambda _: distributed.get_worker().address, range(4), backend="dask")
        assert set(where) == set(cluster.scheduler_info["workers"])


def _kill_on(victim, x):
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _exit_on(victim, x):
    if x == victim:
        os._exit(7)
    return x


@pytest.mark.timeout(150)  # a rare ~30 s wait on Dask (see below) must not time it out
def test_own_cluster_survives_calls_and_a_killed_worker(monkeypatch):
    monkeypatch.delenv("PARMAP_DASK_ADDRESS", raising=False)
    with parmap.Pool(backend="dask", workers=2) as pool:
        first = set(pool.map(lambda _: os.getpid(), range(20), chunksize=1))
        second = set(pool.map(lambda _: os.getpid(), range(20), chunksize=1))
        assert len(first | second) <= 2  # the same two workers serve every call

        started = time.monotonic()
        # Named as the local backends name it: Dask's KilledWorker knows only an address.
        with pytest.raises(parmap.WorkerCrashedError, match=r"item #5 \(5\) died: signal SIGKILL") as crash:
            pool.map(functools.partial(_kill_on, 5), range(10), chunksize=1)
        assert crash.value.exitcode == -signal.SIGKILL
        # Usually 0.2-3.5 s. Dask cannot say which of the tasks on a dead worker
        # was running, so each is rerun alone and the killer takes down a
        # second worker; rarely (1 run in 80) Dask needs ~30 s to hand back a
        # result, so the bound leaves room for that.
        assert time.monotonic() - started < 60

        # The dead worker's item is skipped; the others' results are kept.
        kept = pool.map(functools.partial(_kill_on, 2), range(6), chunksize=3, on_error="skip")
        assert kept == [0, 1, 3, 4, 5]
        got = pool.map(functools.partial(_exit_on, 1), range(3), chunksize=1, on_error="return")
        assert isinstance(got[1], parmap.WorkerCrashedError), got
        assert (got[0], got[2], got[1].exitcode) == (0, 2, 7)
        assert "item #1 (1) died: exit code 7" in str(got[1])
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]

        # Stopping at once (as on Ctrl-C) does not wait for running tasks.
        futures = [pool.submit(time.sleep, 30) for _ in range(2)]
        time.sleep(0.5)
        started = time.monotonic()
        pool.terminate()
        assert time.monotonic() - started < 3
        for future in futures:
            with pytest.raises(parmap.PoolClosedError, match="terminated"):
                future.result(timeout=1)
    # no_orphans checks that closing the pool stopped the cluster's processes.


def test_unreachable_scheduler_fails_naming_it(monkeypatch):
    import parmap.backends.dask

    monkeypatch.setattr(parmap.backends.dask, "CONNECT_TIMEOUT", 0.5)
    monkeypatch.setenv("PARMAP_DASK_ADDRESS", "tcp://127.0.0.1:1")
    with pytest.raises(OSError) as info:
        parmap.map(square, range(3), backend="dask")
    assert any("PARMAP_DASK_ADDRESS" in note for note in info.value.__notes__)


def test_an_empty_input_asks_nothing_of_the_scheduler():
    # It connected (to count the workers) and failed on an address it never needed.
    assert parmap.map(square, [], backend="dask", address="tcp://127.0.0.1:1") == []
    assert parmap.starmap(pow, (), backend="dask", address="tcp://127.0.0.1:1") == []


@pytest.mark.parametrize("peer", ["silent", "babbling"])
def test_an_address_that_is_no_scheduler_fails_naming_it(monkeypatch, peer):
    # A listener that never answers (a dashboard's port, say) kept Client()
    # waiting for ever; one that answers junk made Dask raise MemoryError.
    import socket

    import parmap.backends.dask

    monkeypatch.setattr(parmap.backends.dask, "CONNECT_TIMEOUT", 1 if peer == "silent" else 2)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def babble() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)

    babbler = threading.Thread(target=babble, daemon=True)
    if peer == "babbling":
        babbler.start()
    address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(OSError, match=rf"{address} \(from address=\)"):
            parmap.map(square, range(3), backend="dask", address=address)
    finally:
        stop.set()
        if babbler.is_alive():
            babbler.join()
        listener.close()


@pytest.mark.parametrize("address", ["garbage", "tls://127.0.0.1:1"])
def test_a_failed_connect_does_not_stall_the_exit(address):
    # Dask's failed Client was collected at exit and waited 20 s to close.
    code = (
        "import parmap\n"
        "try:\n"
        f"    parmap.map(abs, [1], backend='dask', address={address!r})\n"
        "except OSError as exc:\n"
        "    print('OSError')\n"
    )
    began = time.monotonic()
    done = _run_python(code)
    assert (done.returncode, done.stdout) == (0, "OSError\n"), done.stderr
    assert time.monotonic() - began < 15, done.stderr[-2000:]


def test_the_command_line_says_in_one_line_that_the_scheduler_cannot_be_reached(tmp_path):
    (tmp_path / "in.txt").write_text("1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PARMAP_DASK_ADDRESS": "garbage"}
    done = subprocess.run(
        [sys.executable, "-m", "parmap", "builtins:len", "in.txt", "-b", "dask"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "PARMAP_DASK_ADDRESS" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(90)
def test_terminate_while_another_thread_starts_the_own_cluster_stops_it_too(monkeypatch):
    # terminate() found no cluster yet and had nothing to close; the start
    # then finished and kept its cluster, whose workers ran on after the
    # pool (and distributed's console logging stayed hushed for good).
    monkeypatch.delenv("PARMAP_DASK_ADDRESS", raising=False)
    pool = parmap.Pool(workers=1, backend="dask")
    outcome = []

    def run():
        try:
            outcome.append(pool.map(abs, range(-3, 0)))
        except parmap.PoolClosedError as exc:
            outcome.append(exc)

    starter = threading.Thread(target=run)
    starter.start()
    time.sleep(0.2)  # the cluster takes a second or two to start
    pool.terminate()
    starter.join(60)
    assert outcome and (isinstance(outcome[0], parmap.PoolClosedError) or outcome[0] == [3, 2, 1])
    from parmap.backends import dask as dask_backend

    assert dask_backend._hushed_clusters == 0
    # and no_orphans: the cluster's processes are gone


@pytest.mark.timeout(60)
def test_a_kill_ends_a_polite_close_that_waits_for_running_chunks(dask_address):
    # The polite close waited for the running chunk to be reported; the kill
    # reported it itself and never said so: the polite close waited for ever.
    from parmap.backends import dask as dask_backend
    from parmap.backends._base import Call, Chunk

    backend = dask_backend.DaskBackend(workers=1, address=dask_address)
    outcomes = []
    call = Call(fn=time.sleep, star=False, stop_on_error=False, timeout=None)
    backend.submit(Chunk(call=call, positions=range(1), items=[3]), lambda chunk, outcome: outcomes.append(outcome))
    polite = threading.Thread(target=backend.close)
    polite.start()
    time.sleep(0.5)
    backend.close(kill=True)
    polite.join(10)
    assert not polite.is_alive()
    assert len(outcomes) == 1 and outcomes[0].fatal is not None


def test_pools_started_at_once_from_threads_each_get_a_quiet_cluster():
    # distributed imports its dashboard as a cluster starts: a second start
    # in another thread met it half-imported ("module 'distributed.dashboard'
    # has no attribute 'scheduler'", one of three pools in most runs); and
    # the first cluster to close let the others' INFO lines reach stderr.
    code = (
        "import threading, parmap\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def job(_):\n"
        "    with parmap.Pool(workers=2, backend='dask') as pool:\n"
        "        return pool.map(abs, range(-20, 0)) == list(range(20, 0, -1))\n"
        "if __name__ == '__main__':\n"
        "    with ThreadPoolExecutor(3) as threads:\n"
        "        print(list(threads.map(job, range(3))))\n"
    )
    done = _run_python(code)
    assert (done.returncode, done.stdout) == (0, "[True, True, True]\n"), done.stderr[-3000:]
    assert " - INFO - " not in done.stderr, done.stderr[-3000:]


# -- installation -------------------------------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


QUIET_EXIT = """
import os
import parmap

def crash_on_1(x):
    if x == 1:
        os._exit(3)
    return x

pool = parmap.Pool(workers=2, backend="dask")
results = pool.map(crash_on_1, range(4), chunksize=1, on_error="return")
print([type(r).__name__ for r in results])
# left open: the exit hook closes it
"""


@pytest.mark.timeout(90)
def test_a_crash_and_a_pool_left_open_at_exit_are_quiet_on_parmaps_own_cluster():
    # Dask logged the crash parmap reports itself ("marked as failed because
    # 1 workers died"), and at exit closed its cluster before parmap's pool
    # closed its client: "Failed to reconnect to scheduler", tracebacks.
    done = _run_python(QUIET_EXIT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['int', 'WorkerCrashedError', 'int', 'int']"
    # (A slow machine may still have Dask warn that its event loop stalled.)
    for noise in ("ERROR", "Traceback", "reconnect", "workers died"):
        assert noise not in done.stderr, done.stderr


def test_a_dask_pool_leaves_the_programs_exit_hooks_their_pools():
    # Making a Dask backend moved parmap's exit hook ahead of the program's:
    # a hook of its own that used a process pool met PoolClosedError.
    code = (
        "import atexit, parmap\n"
        "pool = parmap.Pool(workers=1, backend='process')\n"
        "atexit.register(lambda: print(pool.map(abs, [-1])))\n"
        "parmap.Pool(backend='dask').close()  # no cluster starts for nothing\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1]"


def test_import_parmap_does_not_import_distributed():
    done = _run_python("import sys, parmap; print('distributed' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_missing_distributed_says_how_to_install():
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "import parmap\n"
        "try:\n"
        "    parmap.map(abs, [1], backend='dask')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = _run_python(code)
    assert done.returncode == 0, done.stderr
    assert "pip install parmap[dask]" in done.stdout


def test_a_task_whose_callback_never_comes_is_reported_by_the_watchdog(dask_cluster):
    # Dask runs every callback on one thread, and one fetch stuck behind a
    # dead worker held the others back ~30 s: ended tasks are also found by
    # parmap's watchdog. Here the callback is never registered at all.
    from parmap.backends import dask as dask_backend
    from parmap.backends._base import Call, Chunk

    backend = dask_backend.DaskBackend(2, address=dask_cluster.scheduler_address)
    try:
        client = backend._ensure_client()
        call = Call(square)
        chunk = Chunk(call, range(0, 3), [1, 2, 3])
        header, items = chunk.header(), chunk.items_bytes()
        run = dask_backend.run_remote_chunk
        future = client.submit(run, "k", call.fn_bytes, header, items, None, None, pure=False)
        got: list[object] = []
        state = dask_backend._CallState(future)
        task = dask_backend._Task(future, chunk, lambda c, outcome: got.append(outcome), state)
        with backend._lock:
            backend._tasks[future.key] = task
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [getattr(o, "results", None) for o in got] == [[1, 4, 9]]
    finally:
        backend.close()


def test_losses_a_chunk_did_not_cause_are_told_apart(dask_address):
    from distributed import KilledWorker

    from parmap.backends.dask import DaskBackend

    backend = DaskBackend(2, address=dask_address)
    chunk_task = types.SimpleNamespace(key="run_remote_chunk-1")
    own = backend._killed_worker(chunk_task, KilledWorker("run_remote_chunk-1", "tcp://w:1", 0))
    assert own.unsure and not own.innocent  # it may have killed the worker, or waited there
    upstream = backend._killed_worker(chunk_task, KilledWorker("parmap-function-1", "tcp://w:1", 0))
    assert upstream.innocent  # its function died with a worker: the chunk never ran
    backend.close()
