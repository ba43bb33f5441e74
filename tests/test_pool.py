"""parmap.Pool: warm workers, per-call overrides, submit(), a clear end."""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import multiprocessing.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator

import psutil
import pytest
import workfns
from conftest import DASK_AVAILABLE, PROCESS_BACKENDS, live_children

import parmap
from parmap import _pool
from parmap.backends import _local
from parmap.backends.fork import ForkBackend


@pytest.mark.parametrize("shape", ["list", "generator"])
def test_a_finished_call_keeps_no_item_alive(backend, shape):
    # As CPython's test_release_task_refs asks of multiprocessing.Pool: the
    # pool lives on, but nothing of the call's input does.
    items = [workfns.Traveller(i) for i in range(40)]
    refs = [weakref.ref(item) for item in items]
    with parmap.Pool(workers=2, backend=backend) as pool:
        source = items if shape == "list" else (x for x in items)
        assert len(pool.map(workfns.tag, source, chunksize=3)) == 40
        del items, source
        gc.collect()
        assert [ref for ref in refs if ref() is not None] == []


def test_workers_are_reused_between_calls(process_backend):
    """The same worker processes serve consecutive calls (no new pool per call)."""
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        calls = [set(pool.map(workfns.getpid, range(30), chunksize=1)) for _ in range(3)]
    assert os.getpid() not in calls[0]
    assert len(set().union(*calls)) <= 2


def test_per_call_overrides(backend):
    with parmap.Pool(workers=2, backend=backend, on_error="skip") as pool:
        assert pool.map(workfns.raise_value_error, range(8)) == [0, 1, 2, 3, 4, 6, 7]
        with pytest.raises(ValueError):
            pool.map(workfns.raise_value_error, range(8), on_error="raise")
        assert list(pool.imap(workfns.square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
        assert pool.starmap(workfns.pack, [(1, 2), (3, 4)]) == [(1, 2), (3, 4)]


@pytest.mark.parametrize("method", ["map", "starmap", "imap", "imap_unordered"])
def test_chunksize_may_come_third_as_in_multiprocessing(any_backend, method):
    # pool.map(fn, xs, 8): code written for multiprocessing.Pool runs as it is.
    items = [(x,) for x in range(12)] if method == "starmap" else list(range(12))
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        call = getattr(pool, method)
        runners = set(call(workfns.runner_after_a_pause, items, 12))
        assert len(runners) == 1  # one chunk of all twelve
        with pytest.raises(ValueError, match="chunksize"):
            call(workfns.square, items, 0)


def test_a_second_iterable_is_told_apart_from_a_chunksize():
    # Executor.map(pow, xs, ys) zips them; here the third argument is chunksize.
    with parmap.Pool(workers=2, backend="thread") as pool:
        for method in ("map", "starmap", "imap", "imap_unordered", "map_async", "starmap_async"):
            with pytest.raises(TypeError, match=rf"{method}\(\) takes one iterable .* pool\.starmap\(fn, zip\("):
                getattr(pool, method)(pow, range(3), range(3))
        assert pool.starmap(pow, zip(range(3), range(3), strict=True)) == [1, 1, 4]


def test_an_initializer_where_multiprocessing_has_it_is_named():
    # multiprocessing.Pool(2, init): the second argument is the initializer there.
    with pytest.raises(TypeError, match=r"pass it as initializer=.* not initializer as in multiprocessing\.Pool"):
        parmap.Pool(2, workfns.set_setting)


def test_processes_is_another_name_for_workers():
    # multiprocessing.Pool(processes=2) carries over.
    with parmap.Pool(processes=2, backend="process") as pool:
        assert repr(pool).startswith("<parmap.Pool workers=2 ")
        assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
    with pytest.raises(ValueError, match="processes must be a positive int, got 0"):
        parmap.Pool(processes=0)
    with pytest.raises(TypeError, match="got workers=2 and processes=3: processes is multiprocessing's name"):
        parmap.Pool(2, processes=3)


def test_chunksize_none_leaves_the_pool_s_own(backend):
    with parmap.Pool(workers=2, backend=backend, chunksize=12) as pool:
        assert len(set(pool.map(workfns.runner_after_a_pause, range(12), None))) == 1
        assert len(set(pool.imap(workfns.runner_after_a_pause, range(12), chunksize=None))) == 1
        assert pool.map(workfns.square, range(12), 3) == [x * x for x in range(12)]


def test_pool_level_options_are_not_per_call():
    with parmap.Pool(workers=2, backend="thread") as pool:
        with pytest.raises(TypeError, match=r"workers is fixed for the pool's life: pass it to parmap\.Pool"):
            pool.map(workfns.square, [1], workers=3)
        with pytest.raises(TypeError, match="bogus; a call takes chunksize, on_error, ordered, progress, retries"):
            pool.imap(workfns.square, [1], bogus=3)


def test_submit_returns_a_future(backend):
    with parmap.Pool(workers=2, backend=backend) as pool:
        future = pool.submit(pow, 2, 10)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=30) == 1024
        failing = pool.submit(workfns.raise_value_error, 5)
        with pytest.raises(ValueError, match="bad item 5"):
            failing.result(timeout=30)
        keyword = pool.submit(sorted, [3, 1, 2], reverse=True)
        assert keyword.result(timeout=30) == [3, 2, 1]


def test_submit_honours_the_pools_retries(backend, tmp_marker_dir):
    with parmap.Pool(workers=2, backend=backend, retries=1) as pool:
        assert pool.submit(workfns.fail_first_time, tmp_marker_dir, 7).result(timeout=30) == 7
    # retries=0: the first failure counts
    with parmap.Pool(workers=2, backend=backend) as pool, pytest.raises(RuntimeError, match="first attempt at 8"):
        pool.submit(workfns.fail_first_time, tmp_marker_dir, 8).result(timeout=30)


@pytest.mark.timeout(30)
def test_closing_waits_for_the_retries_of_submitted_calls(backend, tmp_marker_dir):
    with parmap.Pool(workers=2, backend=backend, retries=1) as pool:
        futures = [pool.submit(workfns.fail_first_time, tmp_marker_dir, i) for i in range(4)]
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", *PROCESS_BACKENDS])
def test_a_submit_still_waiting_for_a_worker_can_be_cancelled_and_never_runs(backend, tmp_marker_dir):
    # As with ProcessPoolExecutor: pending until a worker takes it. At most
    # one runs and one waits on each worker (the multiprocessing pools used
    # to take ~20 at once, which then could not be cancelled).
    gate = os.path.join(tmp_marker_dir, "gate")
    with parmap.Pool(workers=1, backend=backend) as pool:
        blocker = pool.submit(workfns.wait_for_file, gate)
        futures = [pool.submit(workfns.mark, tmp_marker_dir, i) for i in range(30)]
        waiting = futures[1:]
        assert not any(f.running() or f.done() for f in waiting)
        assert all(f.cancel() for f in waiting[-25:])
        waiting = waiting[-25:]
        open(gate, "w").close()
        assert blocker.result(timeout=20) is True
        assert [f.result(timeout=20) for f in futures[:5]] == list(range(5))
        assert not blocker.cancel()
        for future in waiting:
            assert future.cancelled()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result()
    assert sorted(os.listdir(tmp_marker_dir)) == sorted(["gate", *(f"{i}.ran" for i in range(5))])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", *PROCESS_BACKENDS])
def test_terminate_fails_the_waiting_submits_it_finds_and_leaves_cancelled_ones_be(backend, tmp_marker_dir):
    pool = parmap.Pool(workers=1, backend=backend)
    blocker = pool.submit(workfns.wait_for_file, os.path.join(tmp_marker_dir, "gate"))
    futures = [pool.submit(workfns.mark, tmp_marker_dir, i) for i in range(30)]
    assert futures[-1].cancel()
    pool.terminate()
    assert futures[-1].cancelled()
    with pytest.raises(parmap.PoolClosedError):
        futures[-2].result(timeout=10)
    if backend != "thread":  # a thread cannot be stopped: it waits out the gate unwatched
        with pytest.raises(parmap.PoolClosedError):
            blocker.result(timeout=10)


@pytest.mark.parametrize("backend", ["serial", "dask"])
def test_a_backend_that_hands_work_on_at_once_starts_the_future_at_once(backend, request):
    if backend == "dask":
        request.getfixturevalue("dask_address")
    with parmap.Pool(workers=1, backend=backend) as pool:
        future = pool.submit(workfns.square, 3)
        assert not future.cancel()
        assert future.result(timeout=30) == 9


def _wait_for(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds; False if it never did within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _told_in_a_forked_child(act: Callable[[], object]) -> bytes:
    """Run ``act`` in a child made by os.fork(): b"refused" if it raised
    PoolClosedError for being a forked child, b"ran" if it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            said = b"ran"
            try:
                act()
            except parmap.PoolClosedError as exc:
                said = b"refused" if "forked" in str(exc) else b"other"
            os.write(write_end, said)
        finally:
            os._exit(0)
    os.close(write_end)
    said = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    return said


@pytest.mark.timeout(30)
def test_a_forked_child_is_refused_the_parents_pool_and_leaves_it_working(backend):
    # The child inherits the object, not the workers, threads and pipes
    # behind it: a call there used to wait for ever, and its exit could
    # have stopped the parent's workers.
    with parmap.Pool(workers=2, backend=backend) as pool:
        assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
        running = pool.submit(time.sleep, 0.5)

        def in_the_child() -> None:
            try:
                pool.map(workfns.square, range(4))
            finally:
                # What its exit would run: parmap's hook, then multiprocessing's,
                # which took the parent's workers for the child's own.
                _pool._terminate_open_pools()
                multiprocessing.util._exit_function()

        assert _told_in_a_forked_child(in_the_child) == b"refused"
        assert running.result(timeout=10) is None
        assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
        assert pool.submit(workfns.square, 5).result(timeout=10) == 25


@pytest.mark.timeout(30)
def test_an_imap_carried_on_in_a_forked_child_is_refused_there(backend):
    # Checked only when the imap began: next() in the child waited for ever
    # for results the parent's workers send the parent, and the child's exit,
    # ending its copy of the imap, could wait for a lock held at the fork.
    # Enough items that the parent's workers are still at them at the fork.
    results = parmap.imap(workfns.slow_square, range(30), workers=2, backend=backend, chunksize=1)
    assert next(results) == 0

    def in_the_child() -> None:
        try:
            for _ in results:
                pass
        finally:
            results.close()

    assert _told_in_a_forked_child(in_the_child) == b"refused"
    assert list(results) == [x * x for x in range(1, 30)]


@pytest.mark.timeout(30)
def test_submit_retries_a_crash(process_backend, tmp_marker_dir):
    with parmap.Pool(workers=2, backend=process_backend, retries=1) as pool:
        assert pool.submit(workfns.crash_first_time, tmp_marker_dir, workfns.BAD).result(timeout=20) == workfns.BAD


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["submit", "map"])
def test_a_crash_is_tried_exactly_retries_plus_one_times(process_backend, tmp_marker_dir, how):
    # On pool/apply_async the retry used to reach the multiprocessing.Pool that
    # was about to be replaced, run there, and run again in the new one.
    with parmap.Pool(workers=2, backend=process_backend, retries=2) as pool, pytest.raises(parmap.WorkerCrashedError):
        if how == "submit":
            pool.submit(workfns.count_then_crash, tmp_marker_dir, 1).result(timeout=20)
        else:
            pool.map(functools.partial(workfns.count_then_crash, tmp_marker_dir), [1])
    assert len(os.listdir(tmp_marker_dir)) == 3


@pytest.mark.timeout(30)
def test_submit_survives_a_crash(process_backend):
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        with pytest.raises(parmap.WorkerCrashedError):
            pool.submit(workfns.sigkill_self, 5).result(timeout=20)
        assert pool.submit(workfns.square, 7).result(timeout=20) == 49


def test_submits_of_a_module_function_share_one_call(process_backend, monkeypatch):
    # Sent to each worker once, not with every submit (benchmark W8).
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        calls = []
        handed_over = pool._backend.submit
        monkeypatch.setattr(
            pool._backend, "submit", lambda chunk, done: (calls.append(chunk.call.id), handed_over(chunk, done))[1]
        )
        futures = [pool.submit(workfns.square, i) for i in range(30)]
        assert [f.result(timeout=20) for f in futures] == [i * i for i in range(30)]
        assert len(set(calls)) == 1
        # Another function, then the first again: each is a new call.
        assert pool.submit(workfns.describe, 3).result(timeout=20) == workfns.describe(3)
        assert pool.submit(workfns.square, 5).result(timeout=20) == 25
        assert len(set(calls)) == 3


def test_each_submit_of_a_callable_object_runs_a_fresh_copy(process_backend, tmp_marker_dir):
    # As ProcessPoolExecutor does: its state at the submit, and nothing a
    # previous submit's run left in it.
    fn = workfns.CountingFn(tmp_marker_dir)
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        pool.map(workfns.square, range(4))  # workers up before fn exists: they must be sent it
        futures = [pool.submit(fn, i) for i in range(30)]
        assert [f.result(timeout=20) for f in futures] == list(range(30))
    assert len(os.listdir(tmp_marker_dir)) == 30  # unpickled once for each, in a worker, never here


def test_a_submit_whose_result_cannot_travel_names_the_submit_not_an_item(process_backend):
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        future = pool.submit(workfns.return_unpicklable, workfns.BAD)
        with pytest.raises(parmap.SerializationError, match=r"^the result of submit\(<function return_unpicklable"):
            future.result(timeout=20)


class _Reading:
    """A callable object whose state the caller changes between submits."""

    def __init__(self):
        self.value = 0

    def __call__(self):
        return self.value


def test_a_submit_sees_the_state_the_function_has_when_submitted(any_backend):
    # As ProcessPoolExecutor and a serial call do: what fn holds travels with each submit.
    data = {"value": 1}
    read = lambda: data["value"]  # noqa: E731
    obj = _Reading()
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        assert pool.submit(read).result(timeout=20) == 1
        data["value"] = 2
        assert pool.submit(read).result(timeout=20) == 2
        assert pool.submit(obj).result(timeout=20) == 0
        obj.value = 5
        assert pool.submit(obj).result(timeout=20) == 5


def test_done_callbacks_raising_system_exit_leave_the_futures_settling(caplog):
    # Each used to end its settling thread for good; past MAX_SETTLERS of
    # them, no future with a callback was ever settled again.
    def leave(_future):
        raise SystemExit("from a callback")

    with parmap.Pool(workers=2, backend="thread") as pool:
        for _ in range(_pool.MAX_SETTLERS + 1):
            go = threading.Event()
            future = pool.submit(go.wait, 10)
            future.add_done_callback(leave)  # before it is done: a settling thread runs it
            go.set()
            assert future.result(timeout=10) is True
        seen = threading.Event()
        future = pool.submit(workfns.square, 3)
        future.add_done_callback(lambda _: seen.set())
        assert future.result(timeout=10) == 9 and seen.wait(10)
    assert "a done-callback of a parmap.Pool future raised" in caplog.text


def test_terminate_then_join_leaves_no_idle_thread_of_the_pool():
    before = set(threading.enumerate())  # earlier tests' threads may still run an item
    pool = parmap.Pool(workers=2, backend="thread")
    assert pool.map(workfns.square, range(10), chunksize=1) == [x * x for x in range(10)]
    pool.terminate()
    pool.join()
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("parmap-thread")] == []


@pytest.mark.parametrize("warm", [False, True])
def test_a_submit_runs_the_function_as_it_was_when_submitted(any_backend, warm):
    # Not as it is when the call leaves for a worker, or when a worker is
    # forked for it (which inherits the call): later, on auto/process/fork.
    # (Threads share it with the caller, as a ThreadPoolExecutor's do.)
    if any_backend == "thread":
        pytest.skip("a thread runs the caller's very object")
    obj = _Reading()
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        if warm:
            pool.map(workfns.square, range(20), chunksize=1)
        futures = []
        for i in range(6):
            obj.value = i
            futures.append(pool.submit(obj))
        assert [f.result(timeout=20) for f in futures] == list(range(6))


def test_a_pool_keeps_no_submitted_function_alive_once_its_call_is_done(backend):
    # CPython's test_no_stale_references, for concurrent.futures executors.
    obj = _Reading()
    ref = weakref.ref(obj)
    with parmap.Pool(workers=2, backend=backend) as pool:
        assert pool.submit(obj.__call__).result(timeout=20) == 0
        del obj
        gc.collect()
        assert ref() is None


@pytest.mark.timeout(60)
def test_a_pool_inside_a_worker_lets_go_of_submitted_closures_once_they_have_run():
    # With a timeout, its submits run on a forked child, which kept every
    # closure (8 MiB captured each) until the pool closed.
    (growth,) = parmap.map(workfns.nested_submits_of_closures, [12], workers=1, backend="process")
    assert growth < 40 << 20


@pytest.mark.timeout(60)
def test_submit_with_an_unpicklable_argument_names_it_and_leaves_the_pool_usable(any_backend):
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        if any_backend in ("thread", "serial"):  # nothing is pickled: it just runs
            assert pool.submit(workfns.getpid, threading.Lock()).result(timeout=20) == os.getpid()
            return
        with pytest.raises(parmap.SerializationError, match=r"submit\(.*getpid.*\): argument #0 \(<unlocked"):
            pool.submit(workfns.getpid, threading.Lock())
        with pytest.raises(parmap.SerializationError, match="keyword argument '_'"):
            pool.submit(workfns.getpid, _=threading.Lock())
        assert pool.submit(workfns.square, 4).result(timeout=20) == 16
    # Leaving the block closes the pool: it used to wait for ever on the refused call.


def test_closed_pool_says_so(backend):
    pool = parmap.Pool(workers=2, backend=backend)
    assert pool.map(workfns.square, [1, 2]) == [1, 4]
    pool.close()
    assert pool.closed
    for use in (
        lambda: pool.map(workfns.square, [1]),
        lambda: pool.imap(workfns.square, [1]),
        lambda: pool.submit(workfns.square, 1),
    ):
        with pytest.raises(parmap.PoolClosedError, match="closed"):
            use()
        with pytest.raises(ValueError):  # as multiprocessing.Pool raises once closed
            use()
    pool.close()  # idempotent


def test_an_imap_taken_before_close_and_read_after_it_says_so(backend):
    # The input is pulled only when read: by then the workers are gone. On
    # pool/apply_async this used to start a multiprocessing.Pool first (and
    # leak its pipes); on serial the results came anyway.
    with parmap.Pool(workers=2, backend=backend) as pool:
        results = pool.imap(workfns.square, range(4))
    with pytest.raises(parmap.PoolClosedError):
        list(results)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("started", [False, True])
@pytest.mark.parametrize("closer", ["close", "shutdown"])
def test_an_imap_taken_before_close_yields_all_its_results(any_backend, closer, started):
    # multiprocessing's `it = pool.imap(...); pool.close(); for r in it: ...;
    # pool.join()`: it raised PoolClosedError, as a closed pool's new call.
    pool = parmap.Pool(workers=2, backend=any_backend)
    results = pool.imap(workfns.square, range(20), chunksize=2)
    other = pool.imap(workfns.square, range(5), ordered=False)
    first = [next(results)] if started else []
    pool.close() if closer == "close" else pool.shutdown(wait=False)
    assert pool.closed
    with pytest.raises(parmap.PoolClosedError):
        pool.imap(workfns.square, range(3))
    assert sorted(other) == [x * x for x in range(5)]  # one ended: the other runs on
    assert first + list(results) == [x * x for x in range(20)]
    assert not live_children()  # the last open imap stopped the workers as it ended
    pool.join()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ender", ["join", "with", "terminate"])
def test_join_the_with_block_or_terminate_end_an_imap_left_open_by_close(backend, ender):
    # Waiting for it could wait for ever: the thread that would read it is here.
    pool = parmap.Pool(workers=2, backend=backend)
    with pool:
        results = pool.imap(workfns.square, range(20), chunksize=2)
        assert next(results) == 0
        pool.close()
        if ender != "with":
            getattr(pool, ender)()
            assert not live_children()
    pool.join()
    with pytest.raises(parmap.PoolClosedError):
        list(results)


@pytest.mark.timeout(60)
def test_the_call_after_an_abandoned_imap_runs_each_item_once(process_backend, tmp_marker_dir):
    # pool/apply_async replace their multiprocessing.Pool to drop the
    # abandoned chunks; the next call's chunks went to the old one meanwhile,
    # were cut off with it and ran again (6 trials in 10).
    with parmap.Pool(workers=3, backend=process_backend) as pool:
        for trial in range(3):
            for _ in pool.imap(time.sleep, [0.05] * 4, chunksize=1):
                break
            count = functools.partial(workfns.count_runs, tmp_marker_dir)
            assert pool.map(count, range(4 * trial, 4 * trial + 4), chunksize=1) == list(
                range(4 * trial, 4 * trial + 4)
            )
    for name in os.listdir(tmp_marker_dir):
        with open(os.path.join(tmp_marker_dir, name)) as runs:
            assert len(runs.read().split()) == 1, name


@pytest.mark.timeout(60)
def test_an_imap_dropped_after_close_stops_the_workers(backend):
    pool = parmap.Pool(workers=2, backend=backend)
    unread = pool.imap(workfns.square, range(10))
    pool.close()
    del unread  # never started: no finally clause of its own runs
    gc.collect()
    pool.join()
    assert not live_children()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("started", [False, True])
def test_an_imap_the_collector_frees_under_the_pools_lock_does_not_deadlock(backend, started):
    # The collector runs wherever something allocates: under the pool's own
    # lock too. The imap's end waited there for that very lock.
    pool = parmap.Pool(workers=2, backend=backend)
    cycle = [pool.imap(workfns.square, range(3))]
    cycle.append(cycle)
    if started:
        assert next(cycle[0]) == 0
    pool.close()
    with pool._lock:
        del cycle
        gc.collect()
    pool.join()
    assert not live_children()


@pytest.mark.timeout(60)
def test_an_imap_abandoned_after_close_does_not_wait_for_its_running_items(process_backend):
    pool = parmap.Pool(workers=2, backend=process_backend)
    results = pool.imap(time.sleep, [0, 30, 30, 30], chunksize=1)
    assert next(results) is None
    pool.close()
    started = time.monotonic()
    results.close()
    pool.join()
    assert time.monotonic() - started < 5  # not the 30 s items'
    assert not live_children()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["process", "fork", "pool", "apply_async", "thread"])
def test_a_submitted_call_runs_for_good_until_terminate_fails_it(backend):
    pool = parmap.Pool(workers=1, backend=backend)
    try:
        running = pool.submit(time.sleep, 2)
        queued = pool.submit(time.sleep, 0.1)
        deadline = time.monotonic() + 10
        while not running.running() and time.monotonic() < deadline:
            time.sleep(0.01)  # pending until a worker takes it
        assert running.running() and not running.cancel()
    finally:
        pool.terminate()
    with pytest.raises(parmap.PoolClosedError, match="terminated"):
        queued.result(timeout=10)
    with pytest.raises(parmap.PoolClosedError, match="terminated"):
        running.result(timeout=10)  # a thread cannot be stopped, but its future is over


@pytest.mark.timeout(30)
def test_closing_runs_what_was_submitted_first(backend):
    with parmap.Pool(workers=2, backend=backend) as pool:
        futures = [pool.submit(pow, 2, i) for i in range(6)]
    assert [f.result(timeout=10) for f in futures] == [2**i for i in range(6)]
    pool = parmap.Pool(workers=2, backend=backend)
    futures = [pool.submit(workfns.sleep_then_square, i) for i in range(4)]
    pool.close()
    pool.join()
    assert [f.result(timeout=10) for f in futures] == [i * i for i in range(4)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["map", "close", "terminate"])
def test_a_done_callback_may_use_or_close_the_pool(backend, how):
    # A callback that waits on the pool must not run on a thread the pool
    # itself waits on (a dispatcher, multiprocessing's result thread).
    pool = parmap.Pool(workers=2, backend=backend)
    returned = threading.Event()
    got = []

    def callback(_):
        got.append(pool.map(abs, [-1, -2, -3]) if how == "map" else getattr(pool, how)())
        returned.set()

    try:
        future = pool.submit(pow, 2, 5)
        future.add_done_callback(callback)
        assert returned.wait(10), f"{how}() in a done-callback did not return"
        assert future.result() == 32
        assert got == ([[1, 2, 3]] if how == "map" else [None])
    finally:
        pool.terminate()


@pytest.fixture(params=["thread", "executor"])
def in_process_backend(request):
    """A backend whose tasks run on threads of this process, where a task may reach its own pool."""
    if request.param == "thread":
        yield "thread"
        return
    executor = concurrent.futures.ThreadPoolExecutor(2)
    yield executor
    executor.shutdown(cancel_futures=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["map", "submit"])
def test_a_task_may_call_its_own_pool_and_that_call_runs_in_the_task(in_process_backend, how):
    # On the pool's two workers, both busy with tasks waiting on the pool,
    # the inner calls would wait for ever; nested, they run serially.
    with parmap.Pool(workers=2, backend=in_process_backend) as pool:

        def task(x):
            if how == "map":
                return sum(pool.map(abs, [-x, -1]))
            return pool.submit(pow, x, 2).result(timeout=10)

        assert pool.map(task, range(6), chunksize=1) == [x + 1 if how == "map" else x * x for x in range(6)]
        assert pool.submit(task, 3).result(timeout=10) == (4 if how == "map" else 9)


@pytest.mark.timeout(30)
def test_a_task_that_closes_its_own_pool_does_not_wait_for_itself(in_process_backend):
    pool = parmap.Pool(workers=2, backend=in_process_backend)
    joined = []

    def task(x):
        if x == 0:
            pool.close()  # closes once this map is done
            with pytest.raises(RuntimeError, match="own tasks"):
                pool.join()
            joined.append(True)
        return x

    assert pool.map(task, range(4), chunksize=1) == [0, 1, 2, 3]
    pool.join()
    assert pool.closed and joined == [True]
    with pytest.raises(parmap.PoolClosedError):
        pool.map(abs, [1])


@pytest.mark.timeout(30)
def test_blocking_done_callbacks_get_a_bounded_number_of_threads():
    # One settling thread per blocked callback, without limit, was 1,000
    # threads for 1,000 futures (and a dead dispatcher where threads ran out).
    go, release = threading.Event(), threading.Event()
    with parmap.Pool(workers=2, backend="thread") as pool:
        futures = [pool.submit(go.wait, 10) for _ in range(100)]  # pending while callbacks are added
        for future in futures:
            future.add_done_callback(lambda _: release.wait(10))
        go.set()

        def settlers() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if t.name == "parmap-futures"]

        # At the bound, a while longer: room for threads past it to show.
        _wait_for(lambda: len(settlers()) >= _pool.MAX_SETTLERS)
        time.sleep(0.2)
        assert 1 < len(settlers()) <= _pool.MAX_SETTLERS
        release.set()
    assert [f.result() for f in futures] == [True] * 100


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_a_submit_that_asks_to_stop_is_not_retried(backend, tmp_path, kind):
    # As in map: SystemExit and KeyboardInterrupt stop, whatever retries says.
    marks = tmp_path / "marks"
    with parmap.Pool(workers=2, backend=backend, retries=2) as pool:
        try:
            future = pool.submit(workfns.count_then_stop, str(marks), kind)
        except KeyboardInterrupt:
            assert backend == "serial" and kind == "interrupt"  # raised here, see below
        else:
            with pytest.raises(SystemExit if kind == "exit" else KeyboardInterrupt):
                future.result(timeout=20)
    assert marks.read_text() == "x"


def test_ctrl_c_in_a_serial_submit_reaches_the_caller():
    # fn runs in the caller's thread: its Ctrl-C must not end up in a future.
    with parmap.Pool(backend="serial") as pool, pytest.raises(KeyboardInterrupt):
        pool.submit(signal.raise_signal, signal.SIGINT)


@pytest.mark.timeout(30)
def test_a_done_callback_may_wait_for_another_future_with_a_callback(backend):
    # Each future with callbacks must not be settled behind another's
    # callback: there, waiting for the later one would wait for ever.
    got = []
    with parmap.Pool(workers=2, backend=backend) as pool:
        later = pool.submit(workfns.sleep_then_square, 3, 0.3)
        later.add_done_callback(lambda _: None)
        sooner = pool.submit(pow, 2, 5)
        sooner.add_done_callback(lambda _: got.append(later.result(timeout=10)))
    assert sooner.result() == 32 and got == [9]


@pytest.mark.timeout(30)
def test_close_from_another_thread_lets_a_running_map_finish(backend, tmp_marker_dir):
    # As multiprocessing.Pool.close() does: running work is finished first.
    pool = parmap.Pool(workers=2, backend=backend)

    def close_once_running() -> None:
        _wait_for(lambda: os.listdir(tmp_marker_dir))  # an item has begun: ~0.3 s of them still to run
        pool.close()

    closer = threading.Thread(target=close_once_running)
    closer.start()
    try:
        count = functools.partial(workfns.count_runs, tmp_marker_dir, seconds=0.04)
        assert pool.map(count, range(16), chunksize=1) == list(range(16))
        closer.join()
        assert pool.closed
        with pytest.raises(parmap.PoolClosedError):
            pool.map(abs, [1])
    finally:
        closer.join()
        pool.terminate()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["process", "fork", "pool", "apply_async", "thread"])
def test_terminate_from_another_thread_ends_a_running_map(backend):
    pool = parmap.Pool(workers=2, backend=backend)
    stopper = threading.Timer(0.5, pool.terminate)
    stopper.start()
    try:
        with pytest.raises(parmap.PoolClosedError, match="terminated"):
            pool.map(time.sleep, [0.1] * 60, chunksize=1)
    finally:
        stopper.join()
        pool.terminate()


def _terminated_while_handing_out_chunks(pool: parmap.Pool) -> None:
    def items() -> Iterator[float]:
        for i in range(30):
            if i == 6:
                stopper = threading.Thread(target=pool.terminate)
                stopper.start()
                stopper.join()
            yield 0.01

    try:
        with pytest.raises(parmap.PoolClosedError, match="terminated"):
            pool.map(time.sleep, items(), chunksize=1)
    finally:
        pool.terminate()


@pytest.mark.timeout(30)
def test_a_map_still_handing_out_chunks_when_terminated_says_terminated(any_backend):
    # The map handed out its next chunks after the terminate() was over, and
    # was told "this pool is closed", as if used after a close: on every
    # backend here, and on pool/apply_async in about 1 of 10 terminates from
    # a timer (whenever the refusal came before the stopped chunks' news).
    _terminated_while_handing_out_chunks(parmap.Pool(workers=2, backend=any_backend))


@pytest.mark.timeout(30)
def test_a_map_on_an_executor_still_handing_out_chunks_when_terminated_says_terminated():
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        _terminated_while_handing_out_chunks(parmap.Pool(backend=executor))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "backend",
    [
        *PROCESS_BACKENDS,
        pytest.param("dask", marks=pytest.mark.skipif(not DASK_AVAILABLE, reason="needs parmap[dask]")),
    ],
)
def test_a_close_that_a_terminate_overtakes_returns_once_the_workers_are_gone(backend, monkeypatch):
    # The terminate() took over the close; the close then returned, and
    # join() after it, while the terminate still stopped the workers (a Dask
    # cluster of the pool's own: for a second or two).
    monkeypatch.delenv("PARMAP_DASK_ADDRESS", raising=False)
    before = set(live_children())
    pool = parmap.Pool(workers=2, backend=backend)
    assert pool.map(abs, [-1, -2]) == [1, 2]
    running = pool.submit(time.sleep, 10)

    def terminate_once_the_close_waits() -> None:
        _wait_for(lambda: pool.closed and running.running())
        time.sleep(0.2)  # from setting closed to waiting for the running call: a few lines
        pool.terminate()

    stopper = threading.Thread(target=terminate_once_the_close_waits)
    stopper.start()
    try:
        pool.close()  # waits for the running call, until the terminate
        pool.join()
        assert set(live_children()) - before == set()
        assert isinstance(running.exception(timeout=0), parmap.PoolClosedError)
    finally:
        stopper.join()
        pool.terminate()


@pytest.mark.timeout(60)
def test_a_terminate_that_overtakes_a_close_does_not_wait_for_the_closes_running_item(tmp_marker_dir):
    # The close waits for the thread running a 6 s item (an imap's: not
    # waited for by the pool, only by the thread backend's close); the
    # terminate waited in turn for that close, 6 s, not its one second; and
    # then join() and a second terminate() did, promised to return at once.
    pool = parmap.Pool(workers=1, backend="thread")
    results = pool.imap(functools.partial(workfns.count_runs, tmp_marker_dir, seconds=6), [0, 1], chunksize=1)

    def consume():
        with pytest.raises(parmap.PoolClosedError):
            list(results)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    _wait_for(lambda: os.listdir(tmp_marker_dir))  # the first item runs
    closer = threading.Thread(target=pool.close)
    closer.start()
    _wait_for(lambda: pool.closed)
    time.sleep(0.2)  # from setting closed to waiting for the thread: a few lines
    started = time.monotonic()
    pool.terminate()
    pool.join()
    pool.terminate()
    assert time.monotonic() - started < 3
    closer.join(15)


@pytest.mark.timeout(60)
def test_a_worker_killed_while_idle_does_not_wedge_the_pool(process_backend):
    # The OOM killer picks its victims regardless of what they are doing; a
    # multiprocessing.Pool worker killed while waiting for work holds the
    # pool's task queue lock for ever.
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        for _ in range(3):
            pids = set(pool.map(workfns.getpid, range(20), chunksize=1))
            victim = pids.pop()
            os.kill(victim, signal.SIGKILL)
            # Idle, dead and reaped (the pool has seen it go) before work comes.
            _wait_for(lambda pid=victim: not psutil.pid_exists(pid))
            assert pool.map(workfns.square, range(20), chunksize=1) == [x * x for x in range(20)]


@pytest.mark.timeout(60)
def test_a_worker_killed_before_it_read_its_chunk_fails_no_item(process_backend):
    # A stopped worker looks idle and is handed a chunk it cannot read; killed
    # then, it ran nothing of it, so no item is to blame and none may fail.
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        victim = set(pool.map(workfns.getpid, range(20), chunksize=1)).pop()
        os.kill(victim, signal.SIGSTOP)
        killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        try:
            assert pool.map(workfns.square, range(20), chunksize=1) == [x * x for x in range(20)]
        finally:
            killer.join()


def test_leaving_the_block_stops_the_workers(process_backend):
    import psutil

    with parmap.Pool(workers=2, backend=process_backend) as pool:
        assert os.getpid() not in set(pool.map(workfns.getpid, range(10), chunksize=1))
        workers = [psutil.Process(pid) for pid in set(pool.map(workfns.getpid, range(10), chunksize=1))]
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == []


def test_initializer_runs_once_per_worker(process_backend, tmp_marker_dir):
    with parmap.Pool(
        workers=2, backend=process_backend, initializer=workfns.count_init, initargs=(tmp_marker_dir,)
    ) as pool:
        pool.map(workfns.square, range(50), chunksize=1)
        pool.map(workfns.square, range(50), chunksize=1)
    files = os.listdir(tmp_marker_dir)
    assert 1 <= len(files) <= 2
    for name in files:
        with open(os.path.join(tmp_marker_dir, name)) as f:
            assert f.read() == "x"


def test_initargs_may_hold_multiprocessing_locks_values_and_queues(process_backend):
    # multiprocessing.Pool's way of sharing them: they may cross only to a
    # process being started, so pickling them with the initializer failed.
    context = multiprocessing.get_context()
    lock, counter, queue = context.Lock(), context.Value("i", 0), context.SimpleQueue()
    results = parmap.map(
        workfns.count_under_lock,
        range(10),
        workers=2,
        backend=process_backend,
        initializer=workfns.keep_shared,
        initargs=(lock, counter, queue),
    )
    assert results == list(range(10))
    assert counter.value == 10
    assert sorted(queue.get() for _ in range(10)) == list(range(10))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("backend", "start_method"),
    [(name, None) for name in PROCESS_BACKENDS] + [(name, "spawn") for name in PROCESS_BACKENDS if name != "fork"],
)
def test_what_the_workers_put_on_a_multiprocessing_queue_arrives(backend, start_method):
    # A queue's put leaves the write to a feeder thread, and only the
    # worker's exit waits for it: a worker killed at the close (pool's
    # terminate) or one that skipped multiprocessing's exit (fork's _exit)
    # lost what the last items put.
    options = {} if start_method is None else {"start_method": start_method}
    queue = multiprocessing.get_context(start_method).Queue()
    # A queue used before the fork: a raw fork child must reset it, as
    # multiprocessing's own do, or its puts wait on the caller's feeder thread.
    queue.put("before")
    assert queue.get(timeout=10) == "before"
    results = parmap.map(
        workfns.put_slowly,
        range(4),
        workers=2,
        backend=backend,
        initializer=workfns.keep_shared,
        initargs=(queue,),
        **options,
    )
    assert results == list(range(4))
    # Written before the call returned: nothing here waits for a worker.
    assert sorted(queue.get(timeout=0.5) for _ in range(4)) == list(range(4))


@pytest.mark.timeout(60)
def test_what_the_workers_put_on_a_multiprocessing_queue_is_there_once_the_pool_closed(process_backend):
    queue = multiprocessing.get_context().Queue()
    with parmap.Pool(2, process_backend, initializer=workfns.keep_shared, initargs=(queue,)) as pool:
        assert pool.map(workfns.put_slowly, range(4)) == list(range(4))
    assert sorted(queue.get(timeout=0.5) for _ in range(4)) == list(range(4))


@pytest.mark.timeout(60)
def test_workers_that_do_not_exit_when_told_are_killed_after_one_wait_for_all(process_backend, monkeypatch):
    # Waited for one after the other, three such workers held the close for
    # three waits.
    from parmap.backends import _local, _mppool

    monkeypatch.setattr(_local, "STOP_WAIT_SECONDS", 1.0)
    monkeypatch.setattr(_mppool, "STOP_WAIT_SECONDS", 1.0)
    pool = parmap.Pool(3, process_backend, initializer=workfns.hang_at_exit)
    assert len(set(pool.map(workfns.pid_after, [1.0] * 3, chunksize=1))) == 3
    began = time.monotonic()
    pool.close()
    pool.join()
    assert time.monotonic() - began < 2.5


@pytest.mark.timeout(60)
def test_a_terminate_cuts_short_a_close_that_waits_for_workers_to_exit(process_backend):
    # process and fork waited out their 5 s for such workers, terminate()
    # (and Ctrl-C) or not.
    pool = parmap.Pool(2, process_backend, initializer=workfns.hang_at_exit)
    assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
    threading.Timer(0.3, pool.terminate).start()
    began = time.monotonic()
    pool.close()
    pool.join()
    assert time.monotonic() - began < 3


def test_imap_close_stops_the_work(backend):
    with parmap.Pool(workers=2, backend=backend) as pool:
        results = pool.imap(workfns.square, range(10_000), chunksize=1)
        assert next(results) == 0
        results.close()
        assert pool.map(workfns.square, range(5)) == [0, 1, 4, 9, 16]  # the pool is still usable


@pytest.mark.timeout(20)
def test_items_of_an_abandoned_call_do_not_hold_up_the_next(process_backend):
    # Each abandoned item would take a minute: the next calls finish long
    # before, because the workers running them are stopped and replaced.
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        results = pool.imap(workfns.sleep_unless_zero, range(100), chunksize=1)
        assert next(results) == 0
        results.close()
        assert pool.map(workfns.square, range(5)) == [0, 1, 4, 9, 16]
        with pytest.raises(ValueError):
            pool.map(workfns.raise_on_zero_else_sleep, range(4), chunksize=1)
        assert pool.map(workfns.square, range(5)) == [0, 1, 4, 9, 16]


def test_an_imap_keeps_its_pool_alive(backend):
    # As multiprocessing.Pool's iterators do: the pool is not closed under them.
    assert list(parmap.Pool(workers=2, backend=backend).imap(workfns.square, range(4))) == [0, 1, 4, 9]
    pool = parmap.Pool(workers=2, backend=backend)
    results = pool.imap(workfns.square, range(6), chunksize=1)
    assert next(results) == 0
    del pool
    gc.collect()
    assert list(results) == [1, 4, 9, 16, 25]
    del results
    gc.collect()  # then the pool goes, and its workers with it (no_orphans checks)


def test_imap_dropped_without_close(backend):
    import gc

    results = parmap.imap(workfns.square, range(10_000), workers=2, backend=backend, chunksize=1)
    assert next(results) == 0
    del results
    gc.collect()  # the one-call pool stops its workers (no_orphans checks)


def test_a_pool_dropped_while_its_submit_runs_closes_without_deadlock(backend):
    # The last reference went with the future's result, on a thread of the
    # backend's own: closing there waited for that very thread (pool: the
    # interpreter then never exited; apply_async: three threads stuck).
    before = set(threading.enumerate())
    future = parmap.Pool(workers=2, backend=backend).submit(workfns.sleep_then_square, 3, 0.2)
    assert future.result(timeout=10) == 9
    del future
    deadline = time.monotonic() + 5
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [t.name for t in left if not t.name.startswith("tqdm")] == []


@pytest.mark.parametrize("collector", ["gc", "no gc"])
def test_a_pool_dropped_after_submit_stops_its_workers(process_backend, collector):
    # A submit's outcome handler used to be a closure that resubmitted
    # itself: a cycle, so the pool waited for the cycle collector.
    def use_and_drop():
        pool = parmap.Pool(workers=2, backend=process_backend)
        assert pool.submit(pow, 2, 3).result(timeout=10) == 8
        return weakref.ref(pool)

    before = len(psutil.Process().children())
    gc.disable()
    try:
        dropped = use_and_drop()
        if collector == "gc":
            gc.collect()
        assert dropped() is None
    finally:
        gc.enable()
    deadline = time.monotonic() + 5
    while len(psutil.Process().children()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(psutil.Process().children()) <= before


def test_a_pool_dropped_open_warns_as_multiprocessing_s_does(backend):
    # CPython's test_resource_warning asks it of multiprocessing.Pool: the
    # work a dropped pool was running is lost, and nothing else says so.
    pool = parmap.Pool(workers=2, backend=backend)
    assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
    with pytest.warns(ResourceWarning, match=r"unclosed running pool <parmap\.Pool workers=2"):
        del pool
        gc.collect()


def test_pools_that_were_closed_or_were_parmap_s_own_do_not_warn(backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with parmap.Pool(workers=2, backend=backend) as pool:
            pool.map(workfns.square, range(4))
        closed = parmap.Pool(workers=2, backend=backend)
        closed.map(workfns.square, range(4))
        closed.terminate()
        parmap.map(workfns.square, range(4), workers=2, backend=backend)
        unstarted = parmap.imap(workfns.square, range(4), workers=2, backend=backend)
        started = parmap.imap(workfns.square, range(4), workers=2, backend=backend)
        assert next(started) == 0
        del pool, closed, unstarted, started
        gc.collect()
    assert [str(w.message) for w in caught if "unclosed running pool" in str(w.message)] == []


@pytest.mark.parametrize("backend", ["pool", "apply_async"])
def test_a_big_function_travels_without_a_temporary_directory(backend, tmp_path, monkeypatch):
    # Those backends hand a big function over in a file: with no temporary
    # directory to be had, the call failed (FileNotFoundError).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    blob = bytes(range(256)) * 1000  # well past what travels inline
    result = parmap.map(lambda i: blob[i], range(8), workers=2, backend=backend, chunksize=1)
    assert result == list(range(8))


CLOSED_STANDARD_FDS_SCRIPT = """
import logging, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import parmap

def chatty(x):
    sys.stdout.write("y" * 100_000)  # more than a pipe holds
    sys.stdout.flush()
    logging.warning("item %d", x)
    return x

if __name__ == "__main__":
    report = os.fdopen(os.dup(2), "w")
    for fd in (0, 1, 2):  # as a daemon may, without reopening the null device
        os.close(fd)
    for backend in {backends!r}:
        ok = parmap.map(chatty, range(8), workers=2, backend=backend, chunksize=1) == list(range(8))
        report.write(f"{{backend}} {{ok}}\\n")
"""


@pytest.mark.timeout(60)
def test_workers_of_a_caller_without_standard_descriptors_write_nowhere(tmp_path):
    # pool/apply_async pipes took descriptors 0-2, and what workers printed
    # went into them: a wake-up pipe filled (a deadlock), garbage pids.
    script = tmp_path / "daemon.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(CLOSED_STANDARD_FDS_SCRIPT.format(root=root, tests=tests, backends=PROCESS_BACKENDS))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert result.stderr.splitlines() == [f"{b} True" for b in PROCESS_BACKENDS], result.stderr


@pytest.mark.parametrize("backend", ["process", "pool", "apply_async"])
def test_a_pool_that_cannot_start_gives_back_its_file_descriptors(backend, tmp_path, monkeypatch):
    # pool/apply_async kept their wake-up pipe of each failed start: under
    # "Too many open files" every failure made the next more likely.
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # spawn's workers cannot start where the caller has no directory
    counts = []
    for _ in range(6):  # the first may start what lives on (the resource tracker)
        try:
            parmap.map(workfns.square, range(4), workers=2, backend=backend, start_method="spawn")
        except (OSError, parmap.ParmapError):
            pass  # not kept: its traceback would hold what it failed in
        else:
            pytest.fail("the workers started")
        gc.collect()
        counts.append(psutil.Process().num_fds())
    # Two a failure leaked; one may be another test's, closing meanwhile.
    assert counts[-1] <= counts[1] + 1, counts


def test_calls_give_back_their_file_descriptors_without_the_cycle_collector(process_backend):
    # A pool/apply_async call's multiprocessing.Pool held itself in a cycle
    # (and so did one whose worker crashed, through the job it never
    # finished): its pipes stayed open until a full collection, ~8 a call.
    parmap.map(workfns.square, range(4), workers=2, backend=process_backend)
    before = psutil.Process().num_fds()
    gc.disable()
    try:
        for _ in range(3):
            parmap.map(workfns.square, range(4), workers=2, backend=process_backend)
            parmap.map(workfns.exit_3, range(8), workers=2, backend=process_backend, chunksize=1, on_error="return")
        assert psutil.Process().num_fds() <= before + 2
    finally:
        gc.enable()


@pytest.mark.parametrize("backend", ["process", "fork"])
def test_an_idle_worker_holds_nothing_of_its_last_chunk(backend):
    # It kept the chunk's items and results until its next chunk came.
    with parmap.Pool(workers=1, backend=backend) as pool:
        (worker,) = {psutil.Process(pid) for pid in pool.map(workfns.getpid, [0])}
        assert len(pool.submit(workfns.mebibytes, 64).result(timeout=30)) == 64 << 20
        assert pool.submit(len, b"\x01" * (64 << 20)).result(timeout=30) == 64 << 20
        # Freed after the result went, not when the next chunk comes (none does).
        _wait_for(lambda: worker.memory_full_info().uss < 32 << 20, timeout=5)
        assert worker.memory_full_info().uss < 32 << 20


def test_executor_as_backend_is_not_shut_down():
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        assert parmap.map(workfns.square, range(10), backend=executor) == [x * x for x in range(10)]
        assert executor.submit(workfns.square, 3).result() == 9


def test_executor_backend_refuses_worker_options():
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        with pytest.raises(ValueError, match="initializer"):
            parmap.map(workfns.square, [1], backend=executor, initializer=print)
        with pytest.raises(ValueError, match="start_method"):
            parmap.map(workfns.square, [1], backend=executor, start_method="spawn")


@pytest.mark.parametrize("backend", ["process", "fork"])
def test_workers_start_only_as_work_needs_them(backend):
    # parmap's own workers start on demand: two items never cost eight processes.
    assert max(parmap.map(workfns.siblings_after_a_pause, range(2), workers=8, backend=backend, chunksize=1)) <= 2
    with parmap.Pool(workers=8, backend=backend) as pool:
        assert pool.submit(workfns.siblings_after_a_pause, None).result() == 1
        # A big enough job still gets every worker.
        assert len(set(pool.map(workfns.getpid, range(400), chunksize=1))) >= 2


@pytest.mark.parametrize("backend", ["process", "fork"])
def test_a_job_one_worker_finishes_first_gets_one_worker(backend, monkeypatch):
    # Waiting for a first measurement as long as a thousand starts would
    # cost: the measurement, not the clock, decides, and it says that 200
    # trivial items are not worth a second process.
    monkeypatch.setattr(_local, "START_COST_FACTOR", 1000.0)
    assert len(set(parmap.map(workfns.getpid, range(200), workers=2, backend=backend))) == 1


@pytest.mark.parametrize("backend", ["process", "fork"])
def test_a_slow_first_item_does_not_hold_back_the_second_worker(backend):
    # Nothing is measured until an item ends; the second worker starts
    # after about two starts' worth of waiting, not after the first item.
    assert max(parmap.map(workfns.siblings_after_a_pause, range(2), workers=2, backend=backend, chunksize=1)) == 2


@pytest.mark.timeout(30)
def test_a_slow_item_holds_no_chunk_behind_it(process_backend):
    # Item 2 used to be sent ahead to the worker busy with item 0, and waited
    # there while the other worker, done with item 1, had nothing to do.
    pids = parmap.map(
        workfns.pid_after_a_pause_on_even_firsts, range(20), workers=2, backend=process_backend, chunksize=1
    )
    assert pids[0] != pids[2]


@pytest.mark.parametrize("backend", ["process", "fork"])
def test_a_pool_starts_its_workers_as_soon_as_work_queues(backend):
    # Only a call that owns its workers weighs each start: a Pool pays once.
    before = {p.pid for p in psutil.Process().children()}
    with parmap.Pool(workers=2, backend=backend) as pool:
        assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
        assert len({p.pid for p in psutil.Process().children()} - before) == 2


def test_another_worker_is_started_when_the_backlog_repays_it():
    backend = ForkBackend(4)
    try:
        backend._start_cost = 0.01
        cost = 0.01 * _local.START_COST_FACTOR
        now = time.monotonic()
        # Measured: worth it once the backlog split one more way saves a start.
        assert not backend._worth_growing(1, [cost * 2 * 0.9], since=now)
        assert backend._worth_growing(1, [cost * 2 * 1.1], since=now)
        assert not backend._worth_growing(3, [cost * 12 * 0.9], since=now)
        assert backend._worth_growing(3, [cost * 12 * 1.1], since=now)
        assert backend._worth_growing(1, [float("inf")], since=now)
        assert backend._grow_due is None
        # Not measured yet: wait as long as a start costs, then start one.
        assert not backend._worth_growing(1, [None, cost], since=now)
        assert backend._grow_due == pytest.approx(now + cost)
        assert backend._worth_growing(1, [None], since=now - cost)
        assert backend._worth_growing(1, [None, cost * 3], since=now)
    finally:
        backend.close()


def test_multiprocessing_idioms_imap_unordered_close_join():
    pool = parmap.Pool(workers=2, backend="process")
    assert sorted(pool.imap_unordered(workfns.square, range(20), chunksize=3)) == [x * x for x in range(20)]
    with pytest.raises(TypeError, match="ordered"):  # it used to be ignored
        pool.imap_unordered(workfns.square, range(3), ordered=True)
    with pytest.raises(ValueError, match="still open"):
        pool.join()
    pool.close()
    pool.join()
    assert pool.closed


def test_a_pool_says_what_it_is():
    pool = parmap.Pool(workers=3, backend="thread")
    assert repr(pool) == "<parmap.Pool workers=3 backend='thread' open>"
    pool.close()
    assert repr(pool) == "<parmap.Pool workers=3 backend='thread' closed>"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("closer", ["join", "close", "with"])
def test_after_shutdown_without_wait_join_and_close_wait(process_backend, closer):
    # multiprocessing's close(); join(), or leaving the block: they used to
    # return at once while the background close still ran.
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        slow = pool.submit(time.sleep, 0.25)  # still running when a close that did not wait returned
        pool.shutdown(wait=False)
        if closer != "with":
            getattr(pool, closer)()
            assert slow.done()
    assert slow.done()
    # no_orphans checks at once that the workers are gone too


EXIT_AFTER_SHUTDOWN_SCRIPT = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
import parmap, workfns

def late_mark(directory):
    time.sleep(0.25)
    workfns.mark(directory, 0)

if __name__ == "__main__":
    pool = parmap.Pool(workers=1, backend={backend!r})
    pool.submit(late_mark, {markers!r})
    pool.shutdown(wait=False)
    if {interrupted!r}:
        raise KeyboardInterrupt
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("interrupted", [False, True])
def test_an_exit_after_shutdown_without_wait_lets_the_running_work_finish(
    tmp_path, tmp_marker_dir, process_backend, interrupted
):
    # As an executor does (CPython's test_cancel_futures_wait_false): the
    # exit terminated the pool, and the submitted call never ran. A Ctrl-C
    # that ends the program still stops the workers at once.
    script = tmp_path / "exit_after_shutdown.py"
    tests = os.path.dirname(__file__)
    script.write_text(
        EXIT_AFTER_SHUTDOWN_SCRIPT.format(
            tests=tests,
            root=os.path.dirname(tests),
            backend=process_backend,
            markers=tmp_marker_dir,
            interrupted=interrupted,
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=40)
    assert result.returncode == (-signal.SIGINT if interrupted else 0), result.stderr[-2000:]
    assert os.listdir(tmp_marker_dir) == ([] if interrupted else ["0.ran"])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["thread", *PROCESS_BACKENDS])
def test_shutdown_as_an_executor_does(backend, tmp_marker_dir):
    # cancel_futures: what still waits for a worker never runs; the running call finishes.
    pool = parmap.Pool(workers=1, backend=backend)
    running = pool.submit(time.sleep, 0.3)  # from running() to the cancel takes milliseconds
    waiting = [pool.submit(workfns.mark, tmp_marker_dir, i) for i in range(30)]
    deadline = time.monotonic() + 10
    while not running.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.shutdown(cancel_futures=True)
    assert pool.closed and running.result(timeout=0) is None
    assert waiting[-1].cancelled()
    ran = {int(name.split(".")[0]) for name in os.listdir(tmp_marker_dir)}
    assert all(waiting[i].result(timeout=0) == i for i in ran)  # handed on before the cancel: ran
    assert all(f.cancelled() for i, f in enumerate(waiting) if i not in ran)

    # wait=False: returns at once, takes nothing more, finishes what it has.
    pool = parmap.Pool(workers=2, backend=backend)
    slow = pool.submit(time.sleep, 0.3)
    started = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - started < 0.25
    assert pool.closed
    with pytest.raises(parmap.PoolClosedError):
        pool.submit(workfns.square, 2)
    assert slow.result(timeout=10) is None
