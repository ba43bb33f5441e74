"""``Pool.apply``, ``apply_async``, ``map_async`` and ``starmap_async``: code
written for ``multiprocessing.Pool`` runs unchanged on every backend."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time

import pytest
import workfns

import parmap


@pytest.mark.timeout(60)
def test_apply_and_apply_async_as_on_multiprocessing(any_backend):
    called = []
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        assert pool.apply(pow, (2, 5)) == 32
        assert pool.apply(int, ("ff",), {"base": 16}) == 255
        pending = pool.apply_async(workfns.square, (7,), callback=called.append)
        assert pending.get(timeout=30) == 49
        assert called == [49]  # the callback has run by the time get() returns
        assert pending.ready() and pending.successful()

        failing = pool.apply_async(workfns.raise_value_error_on_odd, (3,), error_callback=called.append)
        with pytest.raises(ValueError, match="bad item 3"):
            failing.get(timeout=30)
        assert isinstance(called[-1], ValueError) and not failing.successful()
        with pytest.raises(ValueError, match="bad item 5"):
            pool.apply(workfns.raise_value_error, (5,))


@pytest.mark.timeout(60)
def test_map_async_and_starmap_async_as_on_multiprocessing(any_backend):
    called = []
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        pending = pool.map_async(workfns.square, range(10), callback=called.append)
        assert pending.get(timeout=30) == [x * x for x in range(10)]
        assert called == [[x * x for x in range(10)]]
        assert pool.starmap_async(pow, [(2, 3), (3, 2)], 1).get(timeout=30) == [8, 9]  # chunksize third
        # parmap's own per-call options ride along as keywords.
        skipping = pool.map_async(workfns.raise_value_error_on_odd, range(6), on_error="skip")
        assert skipping.get(timeout=30) == [0, 2, 4]
        failing = pool.map_async(workfns.raise_value_error_on_odd, range(6), error_callback=called.append)
        with pytest.raises(ValueError, match="bad item 1"):
            failing.get(timeout=30)
        assert isinstance(called[-1], ValueError) and not failing.successful()


@pytest.mark.timeout(60)
def test_an_unfinished_async_result_times_out_as_on_multiprocessing(any_backend):
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        pending = pool.map_async(time.sleep, [0.3, 0.3], chunksize=1)
        with pytest.raises(multiprocessing.TimeoutError):
            pending.get(timeout=0.01)
        pending.wait(0.01)
        assert not pending.ready()
        with pytest.raises(ValueError, match="not ready"):
            pending.successful()
        assert pending.get(timeout=30) == [None, None]


@pytest.mark.timeout(60)
def test_close_and_join_wait_for_async_work_and_its_callbacks(any_backend):
    # The multiprocessing idiom: start it all, close(), join(), then read.
    called = []
    pool = parmap.Pool(workers=2, backend=any_backend)
    mapped = pool.map_async(workfns.slow_square, range(6), chunksize=1, callback=called.append)
    applied = pool.apply_async(workfns.slow_square, (9,), callback=called.append)
    pool.close()
    pool.join()
    assert mapped.ready() and applied.ready()
    assert sorted(map(str, called)) == sorted(map(str, [[x * x for x in range(6)], 81]))
    assert mapped.get(0) == [x * x for x in range(6)] and applied.get(0) == 81


@pytest.mark.timeout(60)
def test_a_callback_may_close_its_pool(backend):
    pool = parmap.Pool(workers=2, backend=backend)
    closed = threading.Event()

    def close_it(_):
        pool.close()  # waits for the map whose callback this is: it must not wait for ever
        closed.set()

    try:
        assert pool.map_async(workfns.square, [3], callback=close_it).get(timeout=30) == [9]
        assert closed.wait(30) and pool.closed
        pool.join()
    finally:
        pool.terminate()


@pytest.mark.timeout(60)
def test_terminate_fails_a_running_map_async_as_terminated(backend):
    errors = []
    pool = parmap.Pool(workers=2, backend=backend)
    pending = pool.map_async(time.sleep, [0.05] * 100, chunksize=1, error_callback=errors.append)
    time.sleep(0.2)
    pool.terminate()
    with pytest.raises(parmap.PoolClosedError, match="terminated"):
        pending.get(timeout=10)
    assert len(errors) == 1 and not pending.successful()


def test_map_async_reads_its_items_at_the_call(backend):
    items = [1, 2, 3]
    with parmap.Pool(workers=2, backend=backend) as pool:
        pending = pool.map_async(workfns.square, items)
        items.append(4)  # after the call: not the map's
        assert pending.get(timeout=30) == [1, 4, 9]

        def broken():
            yield 1
            raise OSError("the input broke")

        with pytest.raises(OSError, match="the input broke"):  # here, as multiprocessing raises it
            pool.map_async(workfns.square, broken())
        with pytest.raises(TypeError, match="ordered"):
            pool.map_async(workfns.square, [1], ordered=False)


def test_a_callback_that_raises_is_logged_and_the_result_stands(caplog):
    def bad_callback(_):
        raise RuntimeError("the callback broke")

    with parmap.Pool(workers=2, backend="thread") as pool, caplog.at_level(logging.ERROR, logger="parmap"):
        pending = pool.map_async(workfns.square, [2], callback=bad_callback)
        assert pending.get(timeout=30) == [4] and pending.successful()
    assert "the callback broke" in caplog.text


def test_async_forms_refuse_a_closed_pool(backend):
    pool = parmap.Pool(workers=2, backend=backend)
    pool.close()
    for start in (
        lambda: pool.apply(abs, (1,)),
        lambda: pool.apply_async(abs, (1,)),
        lambda: pool.map_async(abs, [1]),
        lambda: pool.starmap_async(abs, [(1,)]),
    ):
        with pytest.raises(parmap.PoolClosedError):
            start()
