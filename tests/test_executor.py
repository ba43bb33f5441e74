"""backend=<a concurrent.futures.Executor>: used as it is, never shut down by parmap."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import pytest

import parmap


def square(x):
    return x * x


def sleep_then_square(x):
    time.sleep(0.2)
    return x * x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise KeyError(x)
    return x


def nested_workers(_):
    # A parmap call inside a worker runs serially there: no pool of pools.
    return parmap.map(square, [1, 2, 3], workers=2)


@pytest.fixture(params=["thread", "process"])
def executor(request):
    """A ThreadPoolExecutor or a ProcessPoolExecutor with two workers, shut down by the test."""
    kind = ThreadPoolExecutor if request.param == "thread" else ProcessPoolExecutor
    pool = kind(max_workers=2)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


def assert_still_usable(executor: Executor) -> None:
    assert executor.submit(square, 7).result(timeout=30) == 49


def test_results_equal_serial_and_executor_left_running(executor):
    items = list(range(101))
    offset = 3
    assert parmap.map(square, items, backend=executor) == [x * x for x in items]
    assert parmap.map(lambda x: x + offset, items, backend=executor, chunksize=7) == [x + 3 for x in items]
    assert list(parmap.imap(square, iter(items), backend=executor)) == [x * x for x in items]
    unordered = parmap.imap(square, items, backend=executor, ordered=False, chunksize=5)
    assert sorted(unordered) == sorted(x * x for x in items)
    assert parmap.starmap(add, [(i, i) for i in range(20)], backend=executor) == [2 * i for i in range(20)]
    assert parmap.map(square, [], backend=executor) == []
    assert_still_usable(executor)


def test_pool_over_an_executor_does_not_shut_it_down(executor):
    with parmap.Pool(backend=executor, progress=False) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert pool.submit(add, 2, 3).result(timeout=30) == 5
    assert_still_usable(executor)


def test_closing_the_pool_waits_for_its_calls_but_leaves_the_executor(executor):
    with parmap.Pool(backend=executor) as pool:
        futures = [pool.submit(sleep_then_square, i) for i in range(4)]
    assert [f.done() for f in futures] == [True] * 4
    assert [f.result() for f in futures] == [0, 1, 4, 9]
    assert_still_usable(executor)


@pytest.mark.timeout(30)
def test_terminate_ends_the_pools_work_on_the_executor_and_leaves_it_running(executor):
    # It used to fail the futures and let their calls run anyway, and an imap
    # went on yielding: terminate() did nothing to an executor's work.
    with parmap.Pool(backend=executor) as pool:
        results = pool.imap(sleep_then_square, range(40), chunksize=1)
        assert next(results) == 0
        queued = [pool.submit(sleep_then_square, i) for i in range(8)]
        pool.terminate()
        after = []
        with pytest.raises(parmap.PoolClosedError):
            after.extend(results)
        assert len(after) <= 4  # those already back, not the other 35
        for future in queued:
            with pytest.raises(parmap.PoolClosedError):
                future.result(timeout=10)
        with pytest.raises(parmap.PoolClosedError):
            pool.map(square, range(3))
    # What ran on the executor was at most a chunk per worker (and what a
    # ProcessPoolExecutor had already moved to its workers' queue).
    started = time.monotonic()
    assert_still_usable(executor)
    assert time.monotonic() - started < 0.2 * 8


class _SlowToSubmit(ThreadPoolExecutor):
    """An executor whose submit() takes a while (a busy one, an instrumented one)."""

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        time.sleep(0.3)
        return future


@pytest.mark.timeout(30)
def test_terminate_while_a_chunk_is_being_handed_over_still_ends_the_map():
    # The chunk handed over while terminate() ran was cancelled and never
    # reported: the map waited for it for ever.
    with _SlowToSubmit(2) as ex:
        pool = parmap.Pool(backend=ex)
        outcome = []
        mapping = threading.Thread(target=lambda: outcome.append(_outcome_of(pool.map, time.sleep, [0.05])))
        mapping.start()
        time.sleep(0.15)
        pool.terminate()
        mapping.join(10)
        assert not mapping.is_alive()
        assert isinstance(outcome[0], parmap.PoolClosedError)


def _outcome_of(fn, *args):
    try:
        return fn(*args)
    except BaseException as exc:
        return exc


def test_a_task_may_close_and_join_a_pool_of_its_own_over_the_same_executor():
    # Only a task of that very pool is refused join() (it would wait for itself).
    with ThreadPoolExecutor(4) as ex:

        def task(_):
            pool = parmap.Pool(backend=ex)
            results = pool.map(abs, [-1, -2])
            pool.close()
            pool.join()
            return results

        assert parmap.map(task, range(2), backend=ex) == [[1, 2], [1, 2]]


@pytest.mark.timeout(30)
def test_a_task_closing_another_pool_over_its_executor_does_not_wait_for_its_own_thread():
    # B's submit waits for the executor's one thread, which A's task holds:
    # B.close() there, waiting for it, waited for ever.
    with ThreadPoolExecutor(1) as ex:
        a, b = parmap.Pool(backend=ex), parmap.Pool(backend=ex)
        go = threading.Event()

        def close_b():
            go.wait()
            b.close()
            return "closed"

        closing = a.submit(close_b)
        queued = b.submit(time.sleep, 0.01)
        go.set()
        assert closing.result(timeout=10) == "closed"
        assert queued.result(timeout=10) is None
        a.close()
        b.join()


def test_errors_keep_their_type(executor):
    with pytest.raises(KeyError) as info:
        parmap.map(fail_on_three, range(10), backend=executor)
    assert any("item #3" in note for note in info.value.__notes__)
    assert parmap.map(fail_on_three, range(6), backend=executor, on_error="skip") == [0, 1, 2, 4, 5]
    assert_still_usable(executor)


def test_nested_call_runs_serially(executor):
    assert parmap.map(nested_workers, range(3), backend=executor) == [[1, 4, 9]] * 3


@pytest.mark.timeout(30)
def test_a_task_of_a_thread_executor_mapping_on_that_executor_runs_the_map_itself():
    # Each parmap.map(backend=ex) makes its own backend over ex: a task that
    # waited for ex's other threads, all busy with its siblings, hung.
    with ThreadPoolExecutor(2) as ex:

        def inner(_):
            return parmap.map(square, range(3), backend=ex)  # both threads are busy with inner() meanwhile

        assert parmap.map(inner, range(4), backend=ex, chunksize=1) == [[0, 1, 4]] * 4


def test_timeout_and_start_method_are_refused(executor):
    with pytest.raises(ValueError, match="timeout"):
        parmap.map(square, range(3), backend=executor, timeout=1)
    with pytest.raises(ValueError, match="start_method"):
        parmap.map(square, range(3), backend=executor, start_method="spawn")
    with pytest.raises(ValueError, match="address"):
        parmap.map(square, range(3), backend=executor, address="tcp://127.0.0.1:1")


def _kill_on_five(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_a_broken_process_pool_ends_in_worker_crashed_error():
    executor = ProcessPoolExecutor(max_workers=2)
    try:
        with pytest.raises(parmap.WorkerCrashedError, match="cannot replace its workers"):
            parmap.map(_kill_on_five, range(20), backend=executor, chunksize=1, on_error="skip")
    finally:
        executor.shutdown(wait=True)
