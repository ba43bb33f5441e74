"""parmap's own workers (``process``, ``fork``) get their next chunk while they
compute the current one, so they never wait on a busy dispatcher. A chunk sent
ahead that its worker never read is not to blame when that worker dies."""

from __future__ import annotations

import os
import signal
import time

import pytest

import parmap
from parmap._wire import send_room, worker_pipe
from parmap.backends.fork import ForkBackend


@pytest.fixture
def counting():
    """A :class:`CountingAhead` of two workers, closed after the test (a
    backend object is the caller's to close)."""
    backend = CountingAhead(2)
    yield backend
    backend.close()


class CountingAhead(ForkBackend):
    """A fork backend that counts the chunks it sends behind a running one."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.sent_ahead = 0
        self.largest_ahead = 0

    def _send_chunk(self, worker, queued, from_source):
        if worker.ahead is not None and worker.ahead[0] is queued.chunk:
            self.sent_ahead += 1
            if queued.items is not None and not from_source:
                self.largest_ahead = max(self.largest_ahead, queued.items.nbytes)
        super()._send_chunk(worker, queued, from_source)


def nap_then_square(x):
    time.sleep(0.01)
    return x * x


def nap_then_length(data):
    time.sleep(0.01)
    return len(data)


def die_on_three(x):
    # Slow enough that the dispatcher has sent this worker its next chunk.
    time.sleep(0.3 if x == 3 else 0.02)
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.mark.parametrize("source", ["list", "generator"])
def test_busy_workers_get_their_next_chunk_ahead(counting, source):
    backend = counting
    items = range(40) if source == "list" else (x for x in range(40))
    with parmap.Pool(backend=backend) as pool:
        assert pool.map(nap_then_square, items, chunksize=1) == [x * x for x in range(40)]
    assert backend.sent_ahead > 10


def test_no_chunk_goes_ahead_when_a_timeout_is_watched(counting):
    backend = counting
    with parmap.Pool(backend=backend) as pool:
        assert pool.map(nap_then_square, range(20), chunksize=1, timeout=10) == [x * x for x in range(20)]
    assert backend.sent_ahead == 0


def test_a_chunk_too_big_for_the_socket_never_goes_ahead(counting):
    backend = counting
    ends = worker_pipe()
    room = send_room(ends[0])
    for end in ends:
        end.close()
    # A generator: the items are pickled and sent, not read from the input.
    big = (bytes(room + 1) for _ in range(6))
    with parmap.Pool(backend=backend) as pool:
        assert pool.map(nap_then_length, big, chunksize=1) == [room + 1] * 6
    assert backend.largest_ahead <= room


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["process", "fork"])
def test_a_chunk_sent_ahead_of_a_crash_runs_again_free(backend):
    # chunksize=1: a chunk sent ahead to the dying worker holds one item,
    # and would be reported as that item's crash if it were charged.
    got = parmap.map(die_on_three, range(12), workers=2, backend=backend, chunksize=1, on_error="return")
    assert isinstance(got[3], parmap.WorkerCrashedError)
    assert got[:3] + got[4:] == [x for x in range(12) if x != 3]
