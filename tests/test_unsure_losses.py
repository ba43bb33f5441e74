"""A backend that can only say a chunk was *on* a worker that died (Dask's
KilledWorker for a task still waiting there) gets each item one free rerun:
an innocent item is not blamed, a guilty one is on its second loss."""

from __future__ import annotations

import pytest

import parmap
from parmap.backends._base import Backend, Capabilities, ChunkLost
from parmap.backends.serial import SerialBackend


class LosesSome(Backend):
    """Runs chunks inline, but reports a chunk holding one of ``doomed`` as
    lost (unsure) the first ``times`` times it sees that item."""

    capabilities = Capabilities(isolated=True, can_timeout=False)

    def __init__(self, doomed: set[int], times: int) -> None:
        self.workers = 2
        self._inner = SerialBackend()
        self._left = dict.fromkeys(doomed, times)

    def submit(self, chunk, done):
        hit = [p for p in chunk.positions if self._left.get(p, 0) > 0]
        if hit:
            for position in hit:
                self._left[position] -= 1
            done(chunk, ChunkLost(None, detail="the worker died (KilledWorker)", unsure=True))
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
    # In a chunk of two: the chunk is split for free, then item 3 alone is
    # spared once, then blamed; item 2 never is.
    backend = LosesSome({3}, times=3)
    got = parmap.map(lambda x: x, range(6), backend=backend, chunksize=2, on_error="skip")
    assert got == [0, 1, 2, 4, 5]


def test_retries_count_only_after_the_free_rerun():
    # Lost 3 times: spared, then retried once, then out of retries.
    with pytest.raises(parmap.WorkerCrashedError, match=r"item #3"):
        parmap.map(lambda x: x, range(6), backend=LosesSome({3}, times=3), chunksize=1, retries=1)
    assert parmap.map(lambda x: x, range(6), backend=LosesSome({3}, times=3), chunksize=1, retries=2) == list(range(6))
