"""The first promise: results equal the serial map, on every backend."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import threading
import time

import pytest
import workfns

import parmap
from parmap import _scheduler


def square(x):
    return x * x


def add(a, b):
    return a + b


def test_map_equals_serial(any_backend):
    items = list(range(257))
    assert parmap.map(square, items, workers=2, backend=any_backend) == [square(x) for x in items]


@pytest.mark.parametrize("chunksize", [1, 3, 1000])
def test_chunk_sizes(any_backend, chunksize):
    items = range(100)
    assert parmap.map(square, items, workers=3, backend=any_backend, chunksize=chunksize) == [x * x for x in items]


def test_generator_input(any_backend):
    assert parmap.map(square, (x for x in range(50)), workers=2, backend=any_backend) == [x * x for x in range(50)]


class _OneShot:
    """An iterable that can be iterated once, as a query's result set is."""

    def __init__(self, items):
        self._items = items
        self.iterated = 0

    def __iter__(self):
        self.iterated += 1
        if self.iterated > 1:
            raise RuntimeError("result set already consumed")
        return iter(self._items)


class _LengthUnknowable:
    def __iter__(self):
        return iter(range(5))

    def __len__(self):
        raise RuntimeError("size unknown")


class _Understated:
    """20,000 items under a __len__ that says 10, with a log of pulls and calls."""

    def __init__(self, log):
        self._log = log

    def __len__(self):
        return 10

    def __iter__(self):
        for i in range(20_000):
            self._log.append("pull")
            yield i


def test_a_len_that_says_too_little_does_not_shrink_chunks_to_one_item():
    # Past the stated length the rest was sized as a tail of nothing left:
    # one item per chunk, 400-800x slower. On serial, each run of calls
    # after a run of pulls is one chunk.
    log = []

    def logged(x):
        log.append("call")
        return x

    assert parmap.map(logged, _Understated(log), backend="serial") == list(range(20_000))
    chunks = sum(1 for a, b in itertools.pairwise(log) if a == "pull" and b == "call")
    assert chunks < 200


def test_an_iterable_is_iterated_once(any_backend):
    items = _OneShot(range(5))
    assert parmap.map(square, items, workers=2, backend=any_backend) == [0, 1, 4, 9, 16]
    assert items.iterated == 1
    assert list(parmap.imap(square, _OneShot(range(5)), workers=2, backend=any_backend)) == [0, 1, 4, 9, 16]
    assert parmap.starmap(add, _OneShot([(1, 2), (3, 4)]), workers=2, backend=any_backend) == [3, 7]


def test_a_length_that_cannot_be_had_is_only_a_missing_hint(any_backend):
    # map() never asks for len(): neither a __len__ that raises nor a range past sys.maxsize stops it.
    assert parmap.map(square, _LengthUnknowable(), workers=2, backend=any_backend) == [0, 1, 4, 9, 16]
    endless = parmap.imap(square, range(sys.maxsize + 1), workers=2, backend=any_backend)
    assert [next(endless) for _ in range(3)] == [0, 1, 4]
    endless.close()


def test_empty_input_starts_nothing(any_backend):
    assert parmap.map(square, [], workers=2, backend=any_backend) == []
    assert list(parmap.imap(square, iter([]), workers=2, backend=any_backend)) == []


def test_starmap(any_backend):
    pairs = [(i, i + 1) for i in range(30)]
    assert parmap.starmap(add, pairs, workers=2, backend=any_backend) == [a + b for a, b in pairs]


def test_lambda_closure_partial(any_backend):
    offset = 10
    assert parmap.map(lambda x: x + offset, range(20), workers=2, backend=any_backend) == [x + 10 for x in range(20)]
    assert parmap.map(functools.partial(add, 5), range(5), workers=2, backend=any_backend) == [5, 6, 7, 8, 9]

    def nested(x):
        return (x, offset)

    assert parmap.map(nested, [1, 2], workers=2, backend=any_backend) == [(1, 10), (2, 10)]


def digest(data):
    return (type(data).__name__, len(data), bytes(data[:3]), bytes(data[-3:]))


def test_large_items_and_results(any_backend):
    # Big bytes items travel by reference to the socket on process/fork:
    # mixed with small and mutable ones they must still arrive intact.
    items = [bytes([i]) * (300_000 + i) for i in range(6)]
    items[2] = bytearray(b"ab" * 100_000)
    items[4] = b"tiny"
    expected = [digest(x) for x in items]
    assert parmap.map(digest, items, workers=2, backend=any_backend, chunksize=2) == expected
    back = parmap.map(bytes, [3, 200_000], workers=2, backend=any_backend)
    assert back == [bytes(3), bytes(200_000)]


def test_imap_ordered_and_unordered(any_backend):
    assert list(parmap.imap(square, range(40), workers=2, backend=any_backend)) == [x * x for x in range(40)]
    unordered = list(parmap.imap(square, range(40), workers=2, backend=any_backend, ordered=False))
    assert sorted(unordered) == [x * x for x in range(40)]


class Counted:
    """An input of unknown length that counts the items pulled from it."""

    def __init__(self, items):
        self._items = iter(items)
        self.pulled = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.pulled += 1
        return item


def test_imap_endless_generator_is_lazy(any_backend):
    source = Counted(itertools.count())
    results = parmap.imap(square, source, workers=2, backend=any_backend)
    taken = []
    for value in results:
        taken.append(value)
        if len(taken) == 100:
            break
    results.close()
    assert taken == [x * x for x in range(100)]
    # A few chunks per worker in flight at most (chunks of unknown-length input <= 2048).
    assert source.pulled <= 100 + 5 * 2048


class SayWhen(ValueError):
    pass


def _raises_at_3():
    for i in range(10):
        if i == 3:
            raise SayWhen("the input broke")
        yield i


@pytest.mark.parametrize("chunksize", [1, 2, None])
def test_an_input_that_raises_partway_acts_as_in_a_serial_map(any_backend, chunksize):
    # The results of the items before it come first, then its own error;
    # on_error has no say (it is no item's failure).
    results = parmap.imap(square, _raises_at_3(), workers=2, backend=any_backend, chunksize=chunksize)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(SayWhen, match="the input broke"):
        next(results)
    with pytest.raises(SayWhen):
        parmap.map(square, _raises_at_3(), workers=2, backend=any_backend, chunksize=chunksize, on_error="skip")


@pytest.mark.timeout(30)
def test_imap_results_keep_up_with_a_slow_input(any_backend):
    # Lines piped in as they happen (`tail -f log | ...`): each result comes
    # back soon after its item, not once a chunk's worth has trickled in.
    pulled = 0

    def trickle():
        nonlocal pulled
        for i in range(15):
            time.sleep(0.06)
            pulled += 1
            yield i

    seen_at = {}
    for value in parmap.imap(square, trickle(), workers=2, backend=any_backend):
        seen_at[value] = pulled
    assert sorted(seen_at) == [x * x for x in range(15)]
    # Items pulled after each one before its result came out: 0 when it comes
    # back before the next item arrives. Was: every result after the fifth
    # came once the input ended, and then two items late.
    late = sorted(seen_at[i * i] - (i + 1) for i in range(15))
    assert late[len(late) // 2] == 0, late


# With chunks of 4,096, the second chunk's reading of the input is 2,047
# items in (batches of 1, 2, ..., 1,024) when the burst below ends.
BURST = 4096 + 2047


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_an_input_that_slows_down_after_a_burst_holds_back_few_items(backend):
    # A log tail catching up, then following it: the first item after the
    # burst waited in its chunk for a whole batch of the input's reading
    # (2,048 items here, 20 s of the trickle) before it went to work.
    fed = 0

    def burst_then_trickle():
        nonlocal fed
        for i in itertools.count():
            if i >= BURST:
                time.sleep(0.01)
            fed = i + 1
            yield i

    results = parmap.imap(abs, burst_then_trickle(), workers=2, backend=backend, chunksize=4096, ordered=False)
    for value in results:
        if value >= BURST:
            break
    results.close()
    # At most a batch of the reading (_chunking.MAX_PULL_BATCH, 64) and what
    # trickled in while the chunk ran.
    assert fed - BURST <= 100, fed - BURST


@pytest.mark.timeout(30)
def test_the_first_result_does_not_wait_for_the_second_item(any_backend, monkeypatch):
    # `(echo hello; sleep 5; echo world) | python -m parmap ...` showed HELLO
    # only with WORLD: the caller was already waiting on the input for the
    # second line when the first result came back. The result is given 50 ms
    # (here: time enough on a loaded machine, so that the test is about the
    # order of things alone).
    monkeypatch.setattr(_scheduler, "MAX_PULL_SECONDS", 10.0)
    first_seen = threading.Event()
    resumed_after_first = []

    def a_line_then_silence():
        yield 1
        resumed_after_first.append(first_seen.wait(5))  # False: the first result waited for this
        yield 2

    results = parmap.imap(square, a_line_then_silence(), workers=2, backend=any_backend)
    assert next(results) == 1
    first_seen.set()
    assert list(results) == [4]
    assert resumed_after_first == [True]


def test_imap_pull_ahead_stays_a_fraction_of_what_was_taken():
    # A long stream of tiny tasks gets bigger chunks as the consumer keeps
    # up, but the input pulled ahead stays bounded by what it has taken.
    source = (x for x in range(10**9))  # no length hint: the unsized rule
    results = parmap.imap(square, source, workers=2, backend="process")
    taken = 150_000
    head = list(itertools.islice(results, taken))
    results.close()
    pulled = next(source)  # the next item nobody pulled
    assert head[-1] == (taken - 1) ** 2
    assert pulled - taken <= 6 * max(2048, taken // 8)


@pytest.mark.parametrize("backend", ["process", "thread", "serial"])
def test_imap_of_big_items_holds_a_few_megabytes_of_them(backend):
    # Thread and serial pickle nothing, so chunks had no byte cap there: the
    # pull-ahead grew with what was taken (4,095 items of 256 KiB, 1 GiB).
    source = Counted(b"x" * (256 << 10) for _ in itertools.count())
    results = parmap.imap(len, source, workers=2, backend=backend)
    most_ahead = 0
    for taken, size in enumerate(itertools.islice(results, 3000), 1):
        assert size == 256 << 10
        most_ahead = max(most_ahead, source.pulled - taken)
    results.close()
    assert most_ahead * (256 << 10) <= 64 << 20, most_ahead  # a few 4 MiB chunks per worker


def test_large_buffers_travel_as_items_and_in_closures(any_backend):
    # A large buffer pickled under protocol 5 (a numpy array's data) reaches
    # the pickler's file as a PickleBuffer; the checks that pickle into
    # nothing used to call len() on it and refused the item and the function.
    blobs = [workfns.Blob(bytes([n]) * (1 << 20)) for n in range(3)]
    assert parmap.map(workfns.blob_size, blobs, workers=2, backend=any_backend) == [1 << 20] * 3
    captured = workfns.Blob(b"x" * (1 << 20))
    assert parmap.map(lambda n: n + len(captured.data), [1, 2], workers=2, backend=any_backend) == [
        (1 << 20) + 1,
        (1 << 20) + 2,
    ]


STDIN_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import parmap, workfns
if __name__ == "__main__":
    for backend in ("process", "fork", "pool", "apply_async"):
        assert parmap.map(workfns.read_stdin, range(2), workers=2, backend=backend) == ["", ""], backend
    assert sys.stdin.read() == "meant for the caller\\n"
    print("ok")
"""


@pytest.mark.timeout(60)
def test_workers_read_an_empty_stdin_and_leave_the_callers_alone(tmp_path):
    # As multiprocessing's workers: a forked worker must not take the caller's input.
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "reads_stdin.py"
    script.write_text(STDIN_SCRIPT.format(root=os.path.dirname(tests), tests=tests))
    result = subprocess.run(
        [sys.executable, str(script)], input="meant for the caller\n", capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


@pytest.mark.parametrize("chunksize", [1, None])
def test_imap_keeps_no_result_the_consumer_dropped(backend, chunksize):
    # As CPython's test_free_reference asks of an executor's map.
    import gc
    import weakref

    for result in parmap.imap(workfns.Traveller, range(8), workers=2, backend=backend, chunksize=chunksize):
        ref = weakref.ref(result)
        del result
        if ref() is not None:  # a full collection costs ~0.1 s on this suite's heap: only where one could matter
            gc.collect()
        assert ref() is None


def test_items_of_a_class_defined_in_a_function_come_back_as_that_class(any_backend):
    # Forked workers read such items from their copy of the list and sent
    # the class back by value under an id the caller did not know: the
    # results were instances of a twin class, equal to nothing.
    import dataclasses
    import enum

    @dataclasses.dataclass
    class Point:
        x: int

    class Mode(enum.Enum):
        A = 1
        B = 2

    points = [Point(i) for i in range(6)]
    assert parmap.map(workfns.identity, points, workers=2, backend=any_backend) == points
    modes = [Mode.A, Mode.B] * 3
    got = parmap.map(workfns.identity, modes, workers=2, backend=any_backend)
    assert all(a is b for a, b in zip(got, modes, strict=True))


def _fail_on_0_else_nap(x):
    if x == 0:
        raise ValueError("the first")
    time.sleep(0.3)
    return x


CALLS_FROM_FOUR_THREADS = """
import sys, threading, time
sys.path.insert(0, {root!r})
import parmap

def square(x):
    return x * x

def loop(deadline):
    while time.monotonic() < deadline:
        assert parmap.map(square, range(6), workers=2, backend="process") == [x * x for x in range(6)]

deadline = time.monotonic() + 2
threads = [threading.Thread(target=loop, args=(deadline,)) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("done")
"""


@pytest.mark.timeout(60)
def test_calls_from_several_threads_fork_workers_that_start_cleanly():
    # A worker forked while another call's thread was closing a pipe end met
    # a half-closed connection in its after-fork clean-up: "Exception
    # ignored ... Bad file descriptor", and the rest of the clean-up skipped.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CALLS_FROM_FOUR_THREADS.format(root=root)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-2000:]
    assert "Exception ignored" not in result.stderr, result.stderr[-2000:]


def test_a_failed_or_closed_call_on_threads_leaves_no_thread_running():
    # As `with ThreadPoolExecutor()` would: the items under way (short
    # here) are waited for, so no thread of the call outlives it.
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="the first"):
        parmap.map(_fail_on_0_else_nap, range(6), workers=2, backend="thread", chunksize=1)
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("parmap")] == []
    results = parmap.imap(_fail_on_0_else_nap, range(1, 20), workers=2, backend="thread", chunksize=1)
    assert next(results) == 1
    results.close()
    assert [t.name for t in set(threading.enumerate()) - before if t.name.startswith("parmap")] == []


def test_closing_an_imap_stops_the_chunks_its_threads_run():
    # Queued chunks were skipped, but a running one ran to its end: with
    # chunksize=200, ~400 more calls after close().
    calls = []

    def slow(x):
        calls.append(x)
        time.sleep(0.002)
        return x

    results = parmap.imap(slow, itertools.count(), workers=2, backend="thread", chunksize=200)
    assert next(results) == 0
    results.close()
    seen = len(calls)
    time.sleep(0.1)
    assert len(calls) <= seen + 2, (seen, len(calls))  # at most the items running at close()
