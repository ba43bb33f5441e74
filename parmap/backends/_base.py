"""The contract between the scheduler and a backend.

A backend runs chunks and reports how each ended; nothing else. Chunking,
ordering, retries, error policy, timeouts' consequences and progress all
live in the scheduler, written once. A backend implements three methods:

``submit(chunk, done)``
    Run ``chunk`` (eventually) and call ``done(chunk, result)`` exactly once,
    from any thread, where ``result`` is a :class:`ChunkOutcome` or a
    :class:`ChunkLost`. It may raise :class:`~parmap.SerializationError`
    synchronously when the items cannot be pickled.
``release(call)``
    The call is over: drop its queued chunks (their ``done`` is never
    called) and forget its function. Running chunks finish and are ignored.
``close(kill)``
    Stop the workers: at once (``kill=True``: errors, Ctrl-C) or after the
    running chunks (``kill=False``). No process may outlive it.

and declares :class:`Capabilities` so the scheduler can refuse, up front,
what a backend cannot do (``timeout`` on threads, for example).
"""

from __future__ import annotations

import abc
import atexit
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, ClassVar

from .._errors import PoolClosedError, WorkerCrashedError
from .._serialization import Pickled, check_function, dump_data, dumps_function
from .._worker import TRACK_NONE, TRACK_OFFSETS, TRACK_TIMES, ChunkOutcome, decode_outcome, unreadable_outcome

__all__ = ["Backend", "Call", "Capabilities", "Chunk", "ChunkLost", "ChunkOutcome", "Done", "SourceSlice"]

_call_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the scheduler checks these, not backend names."""

    #: ``fn`` runs in other processes: a crash cannot take the caller down.
    isolated: bool
    #: A running item can be stopped (its worker killed), so ``timeout`` works.
    can_timeout: bool
    #: Workers may be on other machines (no shared files, no shared memory).
    remote: bool = False


@dataclass(eq=False, slots=True)
class Call:
    """One map/imap/starmap/submit: the function, sent once per worker."""

    fn: Callable[..., Any]
    star: bool = False
    stop_on_error: bool = False
    timeout: float | None = None
    #: The input itself (a list, tuple or range that stays put while the call
    #: runs): a worker forked during the call reads its items from its own
    #: copy of it instead of receiving them pickled (see :class:`SourceSlice`).
    source: Sequence[Any] | None = None
    #: Seconds of work the scheduler expects the call still to need, from what
    #: its chunks measured: ``None`` before the first measurement, ``inf``
    #: when the input's length is unknown. Backends that start workers on
    #: demand weigh it against what starting one costs.
    backlog: float | None = None
    id: int = field(default_factory=lambda: next(_call_ids))
    #: ``fn`` did not load by reference in a worker (a function of ``__main__``
    #: defined after that worker started): local workers get it by value too.
    fn_by_value: bool = False
    #: ``fn`` is to run as it was when the call was made (a ``submit``'s
    #: closure or callable object): the backend pickles it at once, and a
    #: worker forked later gets those bytes rather than inheriting ``fn``.
    snapshot: bool = False
    _fn_bytes: bytes | None = None
    _local_fn_bytes: bytes | None = None
    _local_checked: bool = False

    @property
    def fn_bytes(self) -> bytes:
        """``fn`` pickled for any worker, remote ones included; once per call."""
        if self._fn_bytes is None:
            self._fn_bytes = dumps_function(self.fn)
        return self._fn_bytes

    @property
    def local_fn_bytes(self) -> bytes:
        """``fn`` pickled for worker processes on this machine (see ``dumps_function``)."""
        if self.fn_by_value:
            return self.fn_bytes
        if self._local_fn_bytes is None:
            self._local_fn_bytes = dumps_function(self.fn, local=True)
        return self._local_fn_bytes

    def check_local(self) -> None:
        """Raise now if ``fn`` could not travel to a local worker (see ``check_function``)."""
        if self._local_fn_bytes is None and not self._local_checked:
            check_function(self.fn, local=True)
            self._local_checked = True


class SourceSlice:
    """``source[start:stop]`` of a call's input, not read until needed.

    The scheduler keeps consecutive items of a :attr:`Call.source` call as
    one of these instead of a list, so that items a forked worker reads for
    itself are never touched in the caller. Touching them would be costly:
    raising an item's reference count writes to its memory page, and a page
    still shared with a forked worker is then copied by the kernel
    (benchmark W1: ~8,000 page copies for 1,000,000 ints).
    """

    __slots__ = ("source", "start", "stop")

    def __init__(self, source: Sequence[Any], start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, offset: int) -> Any:
        if not 0 <= offset < self.stop - self.start:
            raise IndexError(offset)
        return self.source[self.start + offset]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.read())

    def read(self) -> Sequence[Any]:
        """The items themselves: one slice of the input."""
        return self.source[self.start : self.stop]


@dataclass(eq=False, slots=True)
class Chunk:
    """Consecutive or retried items of one call, with their input positions."""

    call: Call
    positions: Sequence[int]
    items: list[Any] | SourceSlice
    #: Whatever the scheduler wants back with the result; backends ignore it.
    tag: Any = None
    #: The pickled size of the items, once a backend has pickled them.
    nbytes: int = 0
    #: Pickle the items with cloudpickle, classes of ``__main__`` by value:
    #: they did not load in a worker by reference (see ``ChunkOutcome.unreadable``).
    by_value: bool = False
    #: Asked by a backend that :attr:`~Backend.queues_chunks` as the chunk
    #: leaves its queue for a worker; ``False`` (its ``submit`` future was
    #: cancelled) drops it: ``done`` gets :func:`dropped_outcome` instead.
    begin: Callable[[], bool] | None = None
    #: The worker marks each item as it starts it (a shared-memory write per
    #: item), so that a crash names the item that was running; without it a
    #: crash of a chunk of several items reruns each alone to find out.
    marked: bool = False
    #: How long the scheduler expects the chunk to take: ``inf`` before it has
    #: measured anything; ``None``: it has no say (a ``submit()``).
    expected_seconds: float | None = None

    def begins(self) -> bool:
        """Whether the chunk is still wanted, now that a worker is free for it;
        asked once: a chunk requeued after it began is wanted still."""
        begin, self.begin = self.begin, None
        return begin is None or begin()

    def pickled_items(self) -> Pickled:
        """The items pickled in parts (see :class:`~parmap._serialization.Pickled`)."""
        items = self.items.read() if isinstance(self.items, SourceSlice) else self.items
        pickled = dump_data(items, "item", self.positions, by_value=self.by_value)
        self.nbytes = pickled.nbytes
        return pickled

    def items_bytes(self) -> bytes:
        """The items pickled as one ``bytes`` object."""
        return self.pickled_items().getvalue()

    @property
    def from_source(self) -> bool:
        """Whether a worker holding the call's input can read these items itself."""
        return isinstance(self.items, SourceSlice)

    def header(self) -> tuple[Any, ...]:
        call = self.call
        track = TRACK_TIMES if call.timeout is not None else TRACK_OFFSETS if self.marked else TRACK_NONE
        return ("chunk", call.id, self.positions, call.stop_on_error, track, call.star)


@dataclass(slots=True)
class ChunkLost:
    """A chunk that ended without an outcome: its worker died or was stopped.

    ``offset`` is the item that was running, when the backend knows it;
    ``timed_out`` says parmap stopped the worker for ``timeout``.
    ``unsure`` says the backend knows only that the chunk was *on* the
    worker that died, not that it had started there (Dask reports a task
    waiting on a dead worker like the one that killed it): each of its items
    is then rerun alone, nothing else of the call in flight, and only a loss
    there counts against it.
    ``innocent`` says the chunk certainly did not cause the loss (it had
    finished and its result died with the worker, or something it waited
    for was lost): it is run again, free of charge, however often.
    """

    exitcode: int | None
    pid: int | None = None
    offset: int | None = None
    timed_out: bool = False
    detail: str = ""
    unsure: bool = False
    innocent: bool = False


Done = Callable[[Chunk, "ChunkOutcome | ChunkLost"], None]


class Backend(abc.ABC):
    """Runs chunks. See the module docstring for the contract."""

    capabilities: ClassVar[Capabilities]
    #: The number of chunks it can run at once (sizes the in-flight window).
    workers: int
    #: Runs a nested call in place of the worker processes it asked for: the
    #: options only they could honour (``timeout``) are not held against it.
    stands_in: bool = False
    #: Holds chunks in a queue of its own until a worker is free, and asks
    #: each :meth:`Chunk.begins` as it leaves: a ``submit`` future stays
    #: cancellable until then. Otherwise it is running from the start.
    queues_chunks: ClassVar[bool] = False
    #: Runs each chunk in the thread that submits it, before ``submit`` returns.
    runs_in_caller: ClassVar[bool] = False
    #: Items a worker runs before a fresh one takes its place
    #: (``max_tasks_per_child``); no chunk holds more. ``None``: no limit.
    max_items_per_worker: int | None = None

    @abc.abstractmethod
    def submit(self, chunk: Chunk, done: Done) -> None:
        """Run ``chunk`` and call ``done`` once with how it ended."""

    def release(self, call: Call) -> None:  # noqa: B027 - optional hook
        """The call is over; drop its queued chunks."""

    def serve_one_call(self) -> None:  # noqa: B027 - optional hook
        """A hint: this backend serves one call and is then closed (``parmap.map``
        and friends), so a worker started costs that call alone."""

    @abc.abstractmethod
    def close(self, kill: bool = False) -> None:
        """Stop every worker; with ``kill`` do not wait for running chunks."""


def decode_chunk_outcome(chunk: Chunk, data: bytes | bytearray) -> ChunkOutcome:
    """A worker's pickled outcome for ``chunk``, unpickled here; a result that
    pickled there but will not unpickle here fails alone (see
    :func:`~parmap._worker.unreadable_outcome`)."""
    try:
        outcome = decode_outcome(data)
    except Exception as exc:
        return unreadable_outcome(exc, chunk.positions, results=True)
    except BaseException as exc:
        # A result whose unpickling raises SystemExit or KeyboardInterrupt:
        # on a backend's thread it would end that thread, and the call would
        # wait for ever for the chunk. The caller's own Ctrl-C stays one.
        if threading.current_thread() is threading.main_thread():
            raise
        return unreadable_outcome(exc, chunk.positions, results=True)
    outcome.nbytes = len(data)
    return outcome


# The threads that drive a backend's workers (a process backend's
# dispatcher; a multiprocessing.Pool's monitor, its own three threads and
# the pool backend's result reader; Dask's event loops). A tuple replaced
# whole, read without a lock: the reader may be a finalizer that the
# collector runs in the middle of a change, on the same thread.
_drivers: tuple[weakref.ref[threading.Thread], ...] = ()
_drivers_swap = threading.Lock()


def drives_workers(*threads: threading.Thread) -> None:
    """Mark ``threads`` (by default the calling thread) as ones that drive a backend's workers."""
    global _drivers
    refs = [weakref.ref(thread) for thread in threads or [threading.current_thread()]]
    while True:
        # Built outside the lock: building allocates, so the collector may run
        # here, and a finalizer it runs may close a pool whose thread is
        # marking itself, which would then wait for this lock for ever. Under
        # the lock only a compare and a store, which allocate nothing.
        seen = _drivers
        replacement = (*(ref for ref in seen if ref() is not None), *refs)
        with _drivers_swap:
            if _drivers is seen:
                _drivers = replacement
                return


def _forget_drivers() -> None:
    # A worker forked by such a thread runs on as that Thread object, and drives nothing.
    global _drivers, _drivers_swap
    _drivers, _drivers_swap = (), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_drivers)


def may_wait_for_another_backend() -> bool:
    """Whether this thread may wait for another backend's thread to end.

    Not a thread that drives workers: the cycle collector may run there,
    and finalize an abandoned ``imap`` of another pool, whose close would
    wait for that pool's thread while this one holds what it needs (the
    lock around forking a worker, say): a deadlock. Such a close only tells
    the other thread to stop, which it does by itself.
    """
    # By ident, not current_thread(): a thread that has yet to say it started
    # (the collector may run in its start-up too) is no current_thread(), which
    # answers with a stand-in. An ended driver's ident may be reused.
    me = threading.get_ident()
    threads = (ref() for ref in _drivers)
    return not any(
        thread is not None and thread.ident == me and (thread.is_alive() or not thread._started.is_set())  # type: ignore[attr-defined]
        for thread in threads
    )


# Backend threads told to stop but not waited for (see above), waited for at
# exit: multiprocessing's exit handler, which runs after this one (registered
# once workers have started), would race their reaping of the workers.
_LEFT_TO_FINISH: set[threading.Thread] = set()


_waits_at_exit = False


def leave_to_finish(thread: threading.Thread) -> None:
    """Let ``thread`` end by itself, and wait for it at exit."""
    global _waits_at_exit
    if not _waits_at_exit:
        _waits_at_exit = True
        atexit.register(_wait_for_the_left)
    _LEFT_TO_FINISH.difference_update([t for t in _LEFT_TO_FINISH if not t.is_alive()])
    _LEFT_TO_FINISH.add(thread)


def _wait_for_the_left() -> None:
    for thread in list(_LEFT_TO_FINISH):
        join_thread(thread, timeout=5.0)


def join_thread(thread: threading.Thread, timeout: float | None = None) -> None:
    """``thread.join(timeout)``, for a thread whose ``start()`` a Ctrl-C may
    have cut short (it runs, but ``join()`` raises until it says it started),
    or whose last ``join()`` a Ctrl-C cut short."""
    began = time.monotonic()
    while True:
        try:
            thread.join(timeout)
            break
        except RuntimeError:
            if time.monotonic() > began + 1.0:
                return  # never started after all: nothing to wait for
            time.sleep(0.005)
    # A join() that Ctrl-C interrupted marks the thread as ended while it runs
    # on (CPython 3.11's Thread._wait_for_tstate_lock releases the lock the
    # thread holds): every later join() returns at once. So the close that
    # Ctrl-C turns into a terminate() went on before the workers were
    # stopped. A thread leaves threading.enumerate() only once it has
    # really ended (after a normal join() it has, so this costs one look).
    while thread in threading.enumerate():
        if timeout is not None and time.monotonic() >= began + timeout:
            return
        time.sleep(0.005)


class WakePipe:
    """A pipe whose write end wakes the backend thread that waits on its read end.

    Once closed it stays closed: the numbers of its descriptors go to the
    next pipe or socket the process opens, and a late ``wake()`` (a release
    or close after the thread ended) wrote into that: another pool's worker
    read the stray byte as a message length (a ``MemoryError``, or a map
    that waited for ever).
    """

    def __init__(self) -> None:
        self.r, self._w = os.pipe()
        os.set_blocking(self._w, False)  # full: a wake is pending already
        # Reentrant: a finalizer that the collector runs while this thread
        # holds it (raising an error allocates) may wake or close it too.
        self._lock = threading.RLock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._w, b"x")
                except OSError:
                    pass

    def drain(self) -> None:
        """Take the wakes (on the waiting thread, once ``r`` is readable)."""
        os.read(self.r, 65536)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.r, self._w):
                try:
                    os.close(fd)
                except OSError:
                    pass


def wait_for_exits(
    sentinels: Sequence[Any], until: float, wake_pipe: WakePipe, killed: Callable[[], bool]
) -> list[Any]:
    """Wait until each of ``sentinels`` (workers told to stop) is ready, or
    ``until`` (a ``time.monotonic()``) passes, or ``killed()`` says a kill
    came (``terminate()``, Ctrl-C), which must not wait the wait out; the
    sentinels not ready, of workers to kill. A wake of ``wake_pipe`` taken
    meanwhile is given back, for the loop that waits on it next."""
    pending = list(sentinels)
    woken = False
    try:
        while pending and not killed():
            left = until - time.monotonic()
            if left <= 0:
                break
            ready = wait([wake_pipe.r, *pending], left)
            if wake_pipe.r in ready:
                wake_pipe.drain()
                woken = True
            pending = [s for s in pending if s not in ready]
    finally:
        if woken:
            wake_pipe.wake()
    return pending


def dropped_outcome() -> ChunkOutcome:
    """What a chunk that :meth:`Chunk.begins` refused comes to; it never ran."""
    return ChunkOutcome.failed(CancelledError())


TERMINATED = "the pool was terminated before this work finished"


def terminated_outcome() -> ChunkOutcome:
    """What a chunk still queued or running when its pool is terminated
    comes to: a call waiting on it (in another thread) must not wait for ever."""
    return ChunkOutcome.failed(PoolClosedError(TERMINATED))


def closed_error(killed: bool) -> PoolClosedError:
    """What ``submit()`` raises once the backend is closed. A call still
    handing out chunks when ``terminate()`` came hears of it from whichever
    it meets first, a refused chunk or a stopped one: both say terminated."""
    return PoolClosedError(TERMINATED if killed else "this pool is closed")


def startup_failed_outcome(exitcode: int | None) -> ChunkOutcome:
    """What the waiting chunks come to when no worker can start: an error
    of the call as a whole, whatever ``on_error`` and ``retries`` say, since
    no item is to blame (skipping them all would return ``[]`` as if done)."""
    hint = (
        "what they printed on standard error says why (under spawn: a script without "
        "`if __name__ == '__main__':`, say; or an initializer that ends its process)"
    )
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(script, str) and not os.path.exists(script):
        # `python - < script.py`: spawn and forkserver workers run the main
        # script again, by its path, and there is none.
        hint = (
            f"this program's script ({script}) is no file that workers could import again, as spawn and "
            "forkserver workers do: use start_method='fork', or run the script from a file"
        )
    error = WorkerCrashedError(
        f"worker processes fail to start: each died before running anything ({describe_exit(exitcode)}); {hint}",
        exitcode,
    )
    return ChunkOutcome.failed(error)


def describe_exit(exitcode: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL' for a process exit code."""
    import signal

    if exitcode is None:
        return "an unknown cause"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def take_standard_descriptors() -> None:
    """Open the null device on each of descriptors 0, 1 and 2 that is closed.

    A daemon-style caller may have closed them. The next pipe parmap made
    then took their place, and workers, which inherit them, wrote their
    standard output and error into parmap's own plumbing: garbage in the
    status array, or a wake-up pipe filled until it blocked (a deadlock).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        try:
            opened = os.open(os.devnull, os.O_RDWR)
        except OSError:
            return
        if opened != fd:  # another thread took it meanwhile, or a lower one came free
            os.dup2(opened, fd)
            os.close(opened)
        else:
            os.set_inheritable(fd, True)
