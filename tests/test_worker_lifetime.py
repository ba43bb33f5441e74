"""``max_tasks_per_child``: a worker runs so many items, then a fresh one takes
its place (multiprocessing's ``maxtasksperchild``, where a task is an item)."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import pathlib

import pytest
import workfns

import parmap

OWN_WORKERS = [("fork", None), ("process", None), ("process", "spawn"), ("auto", None)]


def square_and_pid(x):
    return x * x, os.getpid()


def _per_pid(results):
    return collections.Counter(pid for _, pid in results)


@pytest.mark.parametrize(("backend", "start_method"), OWN_WORKERS)
def test_no_worker_runs_more_items_than_its_share(backend, start_method):
    results = parmap.map(
        square_and_pid, range(30), workers=2, backend=backend, start_method=start_method, max_tasks_per_child=4
    )
    assert [r for r, _ in results] == [x * x for x in range(30)]
    runs = _per_pid(results)
    assert max(runs.values()) <= 4
    assert len(runs) >= 8  # 30 items, 4 at most each
    assert os.getpid() not in runs


@pytest.mark.parametrize("backend", ["fork", "process"])
def test_a_warm_pool_replaces_its_workers_across_calls_and_submits(backend, tmp_marker_dir):
    with parmap.Pool(
        workers=2, backend=backend, max_tasks_per_child=3, initializer=workfns.count_init, initargs=(tmp_marker_dir,)
    ) as pool:
        first = pool.map(square_and_pid, range(6))
        second = pool.map(square_and_pid, range(6))
        submitted = [pool.submit(square_and_pid, x) for x in range(7)]
        done = [f.result(timeout=30) for f in submitted]
        streamed = list(pool.imap(square_and_pid, (x for x in range(9)), ordered=False))
    runs = _per_pid(first + second + done + streamed)
    assert max(runs.values()) <= 3
    assert sorted(r for r, _ in streamed) == [x * x for x in range(9)]
    # Each fresh worker ran the initializer once, as multiprocessing's do.
    started = os.listdir(tmp_marker_dir)
    assert {name.removeprefix("init-") for name in started} >= {str(pid) for pid in runs}
    assert all(pathlib.Path(tmp_marker_dir, name).read_text() == "x" for name in started)


def test_a_crash_still_names_its_item_and_the_rest_run():
    results = parmap.map(workfns.sigkill_self, range(12), workers=2, max_tasks_per_child=2, on_error="return")
    assert isinstance(results[workfns.BAD], parmap.WorkerCrashedError)
    assert [r for i, r in enumerate(results) if i != workfns.BAD] == [x for x in range(12) if x != workfns.BAD]


@pytest.mark.parametrize("backend", ["serial", "thread", "pool", "apply_async"])
def test_backends_that_cannot_retire_workers_say_so(backend):
    with pytest.raises(ValueError, match=r"max_tasks_per_child=3 needs worker processes .* backend='process'"):
        parmap.map(workfns.square, range(4), backend=backend, max_tasks_per_child=3)


def test_an_executor_cannot_take_it():
    with (
        concurrent.futures.ThreadPoolExecutor(2) as executor,
        pytest.raises(ValueError, match="max_tasks_per_child cannot be used with an Executor"),
    ):
        parmap.Pool(backend=executor, max_tasks_per_child=3)


def test_a_chunk_bigger_than_the_share_is_refused():
    with pytest.raises(ValueError, match="chunksize=10 is more than max_tasks_per_child=3"):
        parmap.map(workfns.square, range(20), chunksize=10, max_tasks_per_child=3)
    with parmap.Pool(workers=2, backend="fork", max_tasks_per_child=3) as pool:
        with pytest.raises(ValueError, match="chunksize=4 is more than"):
            pool.map(workfns.square, range(20), 4)
        assert pool.map(workfns.square, range(20), 3) == [x * x for x in range(20)]


def test_a_nested_call_runs_serially_whatever_it_asks():
    # Inside a worker there is no pool of pools: the option has nothing to retire.
    def nested(x):
        return parmap.map(abs, [x, -x], workers=2, max_tasks_per_child=1), os.getpid()

    results = parmap.map(nested, range(4), workers=2, max_tasks_per_child=2)
    assert [r for r, _ in results] == [[x, x] for x in range(4)]
    assert max(_per_pid(results).values()) <= 2
