"""Arguments are checked at the call, by name, before any process starts."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import sys
import threading

import psutil
import pytest
import workfns
from conftest import PROCESS_BACKENDS

import parmap


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": -1}, ValueError, "workers"),
        ({"workers": 1.5}, TypeError, "workers"),
        ({"workers": "2"}, TypeError, "workers"),
        ({"workers": True}, TypeError, "workers"),
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"chunksize": 2.5}, TypeError, "chunksize"),
        ({"backend": "nope"}, ValueError, "nope"),
        ({"backend": 3}, TypeError, "backend"),
        ({"backend": concurrent.futures.ThreadPoolExecutor}, TypeError, r"pass an instance, ThreadPoolExecutor\("),
        ({"backend": print}, TypeError, "if it is an initializer, pass it as initializer="),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"timeout": "1"}, TypeError, "timeout"),
        ({"timeout": -(10**400)}, ValueError, "timeout"),  # past a float: no bare OverflowError
        ({"retries": -1}, ValueError, "retries"),
        ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child"),
        ({"max_tasks_per_child": 1.5}, TypeError, "max_tasks_per_child"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"progress": "yes"}, TypeError, "progress"),
        ({"progress": {"descr": "typo"}}, TypeError, "'descr'"),  # tqdm itself would refuse it at the first next()
        ({"progress": {"desc": 3}}, TypeError, "progress: tqdm cannot draw"),  # tqdm: "not subscriptable", later
        ({"progress": {"bar_format": "{typo}"}}, TypeError, "progress: .*KeyError: 'typo'"),
        ({"progress": {"file": 3}}, TypeError, "progress: file"),
        ({"start_method": "vfork"}, ValueError, "start_method"),
        ({"backend": "thread", "start_method": "spawn"}, ValueError, "start_method"),
        ({"initializer": 3}, TypeError, "initializer"),
        ({"address": "tcp://127.0.0.1:1"}, ValueError, "address=.* applies to backend='dask'"),
        ({"backend": "process", "address": "tcp://127.0.0.1:1"}, ValueError, "address"),
    ],
)
def test_bad_arguments_are_named(options, error, text):
    before = psutil.Process().children()
    with pytest.raises(error, match=text):
        parmap.map(workfns.square, [1, 2, 3], **options)
    with pytest.raises(error, match=text):
        parmap.imap(workfns.square, [1, 2, 3], **options)  # at the call, not at the first next()
    assert psutil.Process().children() == before


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="bogus"):
        parmap.map(workfns.square, [1], bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        parmap.parallel(bogus=1)


def test_ordered_is_for_imap_alone():
    # A list is in input order: map and starmap refuse ordered=, on a pool as at the top level.
    with parmap.Pool(workers=2, backend="thread", ordered=False) as pool:
        assert pool.map(workfns.square, [1, 2]) == [1, 4]  # the pool's default is imap's
        for method in (pool.map, pool.starmap, parmap.map, parmap.starmap):
            with pytest.raises(TypeError, match="ordered"):
                method(workfns.square, [(1,)], ordered=False)
        assert list(pool.imap(workfns.square, [1, 2], ordered=True)) == [1, 4]


def test_non_callable_and_non_iterable():
    with pytest.raises(TypeError, match="callable"):
        parmap.map(3, [1])
    with pytest.raises(TypeError, match="iterable"):
        parmap.map(workfns.square, 5)


async def _async_square(x):
    return x * x


def test_an_async_function_is_refused_at_the_call(backend):
    # It would return coroutines, never awaited, or fail to pickle them.
    with parmap.Pool(workers=2, backend=backend) as pool:
        for call in (
            lambda: pool.map(_async_square, [1]),
            lambda: pool.imap(_async_square, [1]),
            lambda: pool.submit(_async_square, 1),
            lambda: pool.map(functools.partial(_async_square), [1]),
        ):
            with pytest.raises(TypeError, match="async function"):
                call()
        assert pool.map(workfns.square, [3]) == [9]
    with pytest.raises(TypeError, match="async function"):
        parmap.map(workfns.square, [1], initializer=_async_square, initargs=(1,))


@pytest.mark.timeout(60)
def test_a_call_inside_a_daemonic_multiprocessing_worker_uses_fork(tmp_path):
    # multiprocessing forbids its daemonic processes (Pool workers, Celery's)
    # children: auto uses parmap's fork workers there; the backends built on
    # multiprocessing say why they cannot run.
    with multiprocessing.get_context("fork").Pool(1) as outer:
        auto, fork, process, pool = outer.map(workfns.parmap_inside, ["auto", "fork", "process", "pool"])
    assert auto == fork == [x * x for x in range(6)]
    for refused in (process, pool):
        assert refused.startswith("ValueError:") and "daemonic" in refused and "backend='fork'" in refused


def test_workers_none_means_usable_cpus():
    assert parmap.map(workfns.square, range(10), workers=None) == [x * x for x in range(10)]


def test_nested_call_runs_serially_in_the_worker(backend, capfd):
    if backend == "serial":
        pytest.skip("the serial backend has no workers: a call inside it may start a pool")
    for pids in parmap.map(workfns.nested_map, [1, 2], workers=2, backend=backend):
        assert len(set(pids)) == 1  # all three items ran in one place: that worker
    # Its progress=True drew nothing: that bar would be drawn over the caller's.
    assert "%|" not in capfd.readouterr().err


@pytest.mark.timeout(30)
def test_a_call_uses_no_more_workers_than_its_items(backend):
    # workers=10**9 for three items took ~50 s and failed with ENOMEM.
    assert parmap.map(abs, range(-3, 0), workers=10**9, backend=backend) == [3, 2, 1]
    if backend in PROCESS_BACKENDS:
        siblings = parmap.map(workfns.siblings_after_a_pause, range(3), workers=16, backend=backend, chunksize=1)
        assert max(siblings) <= 3


@pytest.mark.timeout(60)
def test_a_nested_call_keeps_its_timeout(backend):
    # Valid outside a worker, so valid inside; it runs serially there, on one
    # child that can be stopped. The timeout used to be dropped in silence.
    assert parmap.map(workfns.nested_map_with_timeout, [1, 2], workers=2, backend=backend) == [[0, 1, 4]] * 2
    assert parmap.map(workfns.nested_map_timing_out, [1, 2], workers=2, backend=backend) == ["timed out"] * 2
    # A Pool's timeout binds its submits too: they ran on, untimed.
    results = parmap.map(workfns.nested_submit_timing_out, [1, 2], workers=2, backend=backend)
    assert results == [(1, "timed out"), (4, "timed out")]


def test_fn_is_sent_once_per_worker_not_per_item(process_backend, tmp_marker_dir):
    import os

    fn = workfns.CountingFn(tmp_marker_dir)
    assert parmap.map(fn, range(200), workers=2, backend=process_backend, chunksize=1) == list(range(200))
    assert len(os.listdir(tmp_marker_dir)) <= 2  # none at all where workers fork with fn in memory


@pytest.mark.parametrize(("backend", "start_method"), [("fork", None), ("process", "fork")])
def test_forked_workers_inherit_fn_instead_of_receiving_it(backend, start_method, tmp_marker_dir):
    import os

    fn = workfns.CountingFn(tmp_marker_dir)
    with parmap.Pool(workers=2, backend=backend, start_method=start_method) as pool:
        # Workers start with this call under way: fork hands them fn as is.
        assert pool.map(fn, range(50), chunksize=1) == list(range(50))
        assert os.listdir(tmp_marker_dir) == []
        # Warm workers forked before this call must be sent it, once each.
        assert pool.map(workfns.CountingFn(tmp_marker_dir), range(50), chunksize=1) == list(range(50))
        assert 1 <= len(os.listdir(tmp_marker_dir)) <= 2


def test_unpicklable_fn_fails_alike_when_workers_would_inherit_it():
    import threading

    lock = threading.Lock()
    with pytest.raises(parmap.SerializationError, match="the function"):
        parmap.map(lambda x: (lock, x)[1], range(4), workers=2, backend="fork")


def test_progress_counts_items(capsys, any_backend):
    parmap.map(workfns.square, range(20), workers=2, backend=any_backend, progress=True)
    err = capsys.readouterr().err
    assert "20/20" in err


@pytest.mark.parametrize("on_error", ["return", "skip"])
def test_progress_counts_an_item_that_would_not_pickle(capsys, process_backend, on_error):
    # It fails in the caller, before any worker sees it; with nothing settled
    # after it the bar ended one short.
    import threading

    items = [threading.Lock()]
    parmap.map(workfns.identity, items, workers=2, backend=process_backend, progress=True, on_error=on_error)
    assert "1/1" in capsys.readouterr().err
    list(parmap.imap(workfns.identity, items, workers=2, backend=process_backend, progress=True, on_error=on_error))
    assert "1/1" in capsys.readouterr().err


def test_progress_options_reach_tqdm(capsys):
    parmap.map(workfns.square, range(7), workers=2, backend="thread", progress={"desc": "squaring"})
    err = capsys.readouterr().err
    assert "squaring" in err
    assert "7/7" in err


def test_a_timeout_past_a_float_means_no_limit():
    assert parmap.map(workfns.square, range(3), workers=2, backend="process", timeout=10**400) == [0, 1, 4]


def test_progress_takes_a_width(capsys):
    # parmap's default of following the terminal's width made tqdm drop it.
    parmap.map(workfns.square, range(7), workers=2, backend="thread", progress={"ncols": 40})
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "7/7" in line]
    assert lines and all(len(line) <= 40 for line in lines), lines


def test_progress_none_means_no_bar(capsys):
    # None is how wrappers that forward an optional setting spell "not asked for".
    assert parmap.map(workfns.square, range(7), workers=2, backend="thread", progress=None) == [x * x for x in range(7)]
    assert "7/7" not in capsys.readouterr().err


def test_a_refused_progress_value_leaves_other_bars_working(capsys):
    # tqdm keeps its global lock when a bar fails to draw: a bar that failed
    # on desc=3 in this thread made every later bar on another thread wait for ever.
    with pytest.raises(TypeError, match="progress"):
        parmap.map(workfns.square, range(3), backend="thread", progress={"desc": 3})
    other = threading.Thread(target=parmap.map, args=(workfns.square, range(5)), kwargs={"progress": True}, daemon=True)
    other.start()
    other.join(10)
    assert not other.is_alive()
    assert "5/5" in capsys.readouterr().err


def test_progress_format_may_name_the_total(capsys):
    # The off-screen trial of the options drew without a total, and refused this.
    parmap.map(workfns.square, range(7), workers=2, backend="thread", progress={"bar_format": "{n:d}/{total:d} done"})
    assert "7/7 done" in capsys.readouterr().err


@pytest.mark.parametrize("stream", ["stderr is None", "stdout closed"])
def test_a_bar_that_cannot_be_drawn_never_stops_the_work(monkeypatch, stream):
    # tqdm fails when sys.stdout is closed (it flushes it before drawing on
    # stderr), or finds no sys.stderr (descriptor 2 closed): the whole call
    # failed at its start.
    if stream == "stderr is None":
        monkeypatch.setattr(sys, "stderr", None)
    else:
        closed = open(os.devnull, "w")  # noqa: SIM115 - closed at once
        closed.close()
        monkeypatch.setattr(sys, "stdout", closed)
    result = parmap.map(workfns.slow_square, range(6), workers=2, backend="thread", chunksize=1, progress=True)
    assert result == [x * x for x in range(6)]


def test_progress_without_length(capsys):
    list(parmap.imap(workfns.square, (x for x in range(9)), workers=2, backend="thread", progress=True))
    assert "9" in capsys.readouterr().err


def test_docstring_examples_run() -> None:
    """The examples in the docstrings are what ``help()`` shows a user: they must work as written."""
    import doctest

    for module in (parmap, parmap._api, parmap._errors, parmap._decorator, parmap._pool):
        failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert failed == 0, module.__name__
