"""A backend that can only say a chunk was *on* a worker that died (Dask's
KilledWorker for a task still waiting there): each of its items is rerun
alone, nothing else of the call in flight, and only a loss then is blamed.
A loss the backend knows the chunk did not cause is rerun, free, always."""

from __future__ import annotations

import threading
import time

import pytest

import parmap
from parmap.backends._base import Backend, Capabilities, ChunkLost
from parmap.backends.serial import SerialBackend


class LosesSome(Backend):
    """Runs chunks inline, but reports a chunk holding one of ``doomed`` as
    lost (unsure, or ``innocent``) the first ``times`` times it sees that item."""

    capabilities = Capabilities(isolated=True, can_timeout=False)

    def __init__(self, doomed: set[int], times: int, *, innocent: bool = False) -> None:
        self.workers = 2
        self._inner = SerialBackend()
        self._left = dict.fromkeys(doomed, times)
        self._innocent = innocent

    def submit(self, chunk, done):
        hit = [p for p in chunk.positions if self._left.get(p, 0) > 0]
        if hit:
            for position in hit:
                self._left[position] -= 1
            unsure, innocent = not self._innocent, self._innocent
            done(chunk, ChunkLost(None, detail="the worker died (KilledWorker)", unsure=unsure, innocent=innocent))
            return
        self._inner.submit(chunk, done)

    def close(self, kill=False):
        self._inner.close(kill)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_an_item_lost_once_unsurely_is_rerun_free(chunksize):
    backend = LosesSome({3, 6}, times=1)
    assert parmap.map(lambda x: x * 10, range(10), backend=backend, chunksize=chunksize) == [x * 10 for x in range(10)]


def test_an_item_lost_twice_is_blamed():
    backend = LosesSome({3}, times=2)
    with pytest.raises(parmap.WorkerCrashedError, match=r"item #3 \(3\).*KilledWorker"):
        parmap.map(lambda x: x, range(6), backend=backend, chunksize=1)
    # In a chunk of two: each item runs alone; item 3 is lost again and
    # blamed, item 2 never is.
    backend = LosesSome({3}, times=2)
    got = parmap.map(lambda x: x, range(6), backend=backend, chunksize=2, on_error="skip")
    assert got == [0, 1, 2, 4, 5]


def test_retries_count_only_after_the_free_rerun():
    # Lost 3 times: run alone, then retried once (alone), then out of retries.
    with pytest.raises(parmap.WorkerCrashedError, match=r"item #3"):
        parmap.map(lambda x: x, range(6), backend=LosesSome({3}, times=3), chunksize=1, retries=1)
    assert parmap.map(lambda x: x, range(6), backend=LosesSome({3}, times=3), chunksize=1, retries=2) == list(range(6))


def test_a_loss_the_chunk_did_not_cause_is_rerun_however_often():
    backend = LosesSome({2, 5}, times=4, innocent=True)
    assert parmap.map(lambda x: x + 1, range(8), backend=backend, chunksize=2) == list(range(1, 9))


class LosesOnAThread(Backend):
    """Runs each chunk on a thread after a short pause; the first chunk that
    holds ``doomed`` is reported lost (unsure). Records how many chunks were
    out when each chunk holding ``doomed`` was submitted."""

    capabilities = Capabilities(isolated=True, can_timeout=False)

    def __init__(self, doomed: int) -> None:
        self.workers = 2
        self._doomed = doomed
        self._lost = False
        self._lock = threading.Lock()
        self._out = 0
        self.out_at_reruns: list[int] = []
        self._threads: list[threading.Thread] = []

    def submit(self, chunk, done):
        with self._lock:
            holds = self._doomed in chunk.positions
            if holds and self._lost:
                self.out_at_reruns.append(self._out)
            lose = holds and not self._lost
            self._lost = self._lost or holds
            self._out += 1
        thread = threading.Thread(target=self._run, args=(chunk, done, lose))
        self._threads.append(thread)
        thread.start()

    def _run(self, chunk, done, lose):
        time.sleep(0.01)
        if lose:
            outcome = ChunkLost(None, detail="the worker died", unsure=True)
        else:
            results = [chunk.call.fn(item) for item in chunk.items]
            outcome = parmap.backends._base.ChunkOutcome(results)
        with self._lock:
            self._out -= 1
        done(chunk, outcome)

    def release(self, call):
        pass

    def close(self, kill=False):
        for thread in self._threads:
            thread.join()


def test_suspects_run_with_nothing_else_in_flight():
    backend = LosesOnAThread(doomed=5)
    assert parmap.map(lambda x: -x, range(40), backend=backend, chunksize=2) == [-x for x in range(40)]
    assert backend.out_at_reruns == [0]  # item 5 ran again alone
