"""``backend="thread"``: a pool of threads in this process.

For I/O-bound work (network, disk, subprocesses) where the GIL is released.
Nothing is pickled: ``fn`` and the items are shared with the caller. A
running thread cannot be stopped, so ``timeout`` is refused up front.

The threads are daemon threads of parmap's own, not a
:class:`~concurrent.futures.ThreadPoolExecutor`: Python waits at exit for an
executor's threads to finish what they run, so after Ctrl-C a program whose
items take minutes would take minutes to end. Ours are abandoned instead,
as parmap's worker processes are stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import _context
from .._worker import ChunkOutcome, run_chunk
from ._base import (
    Backend,
    Call,
    Capabilities,
    Chunk,
    Done,
    closed_error,
    dropped_outcome,
    join_thread,
    terminated_outcome,
)

#: terminate() waits at most this long for the threads to end. One running
#: an item stops before its next; the item itself cannot be stopped, and
#: one that runs on is left to finish unwatched, so that an error or Ctrl-C
#: still ends the call within about a second, as on the process backends.
KILL_WAIT_SECONDS = 1.0


def _run_in_thread(chunk: Chunk, backend: Backend, fn: Callable[..., Any] | None = None) -> ChunkOutcome:
    call = chunk.call
    _context.set_worker_thread(backend)
    try:
        fn = call.fn if fn is None else fn
        return run_chunk(fn, chunk.items, star=call.star, stop_on_error=call.stop_on_error, pickle_errors=False)
    finally:
        _context.set_worker_thread(None)


class _Released(BaseException):
    """The call ended while its chunk ran: a BaseException, so the chunk stops."""


def _until_released(fn: Callable[..., Any], backend: ThreadBackend, call_id: int) -> Callable[..., Any]:
    """``fn``, refusing to start an item once the call was released or the
    pool terminated: a closed ``imap`` stops its running chunks too, not
    only its queued ones."""
    released = backend._released

    def guarded(*args: Any) -> Any:
        if call_id in released or backend._killed:
            raise _Released
        return fn(*args)

    return guarded


class ThreadBackend(Backend):
    """A pool of up to ``workers`` threads in this process, started as work needs them."""

    capabilities = Capabilities(isolated=False, can_timeout=False)
    queues_chunks = True

    def __init__(
        self, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
    ) -> None:
        self.workers = workers
        self._user_initializer = initializer
        self._initargs = initargs
        self._init_error: BaseException | None = None
        self._jobs: queue.SimpleQueue[tuple[Chunk, Done] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # one token per thread waiting for a job
        self._lock = threading.Lock()
        self._closed = False
        self._released: set[int] = set()
        self._killed = False

    def submit(self, chunk: Chunk, done: Done) -> None:
        with self._lock:
            if self._closed:
                raise closed_error(self._killed)
            self._jobs.put((chunk, done))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.workers:
                thread = threading.Thread(target=self._serve, name=f"parmap-thread-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self) -> None:
        if self._user_initializer is not None:
            self._initialize(self._user_initializer)
        while (job := self._jobs.get()) is not None:
            self._serve_one(*job)
            # A chunk holds its call, and the call the whole input: an idle
            # thread must not keep the last one alive (CPython's
            # test_release_task_refs asks the same of multiprocessing.Pool).
            del job
            self._idle.release()

    def _serve_one(self, chunk: Chunk, done: Done) -> None:
        outcome = self._run(chunk)
        if outcome is not None:
            done(chunk, outcome)

    def _initialize(self, initializer: Callable[..., Any]) -> None:
        # Kept, so that the caller sees the initializer's own error.
        try:
            initializer(*self._initargs)
        except BaseException as exc:  # SystemExit too: a thread that died of it would serve nothing
            exc.add_note("parmap: raised by the initializer")
            self._init_error = exc

    def _run(self, chunk: Chunk) -> ChunkOutcome | None:
        if chunk.call.id in self._released:
            return None  # the call is over: skip its queued chunks
        if not chunk.begins():
            return dropped_outcome()
        if self._init_error is not None:
            return ChunkOutcome.failed(self._init_error)
        call_id = chunk.call.id
        try:
            outcome = _run_in_thread(chunk, self, _until_released(chunk.call.fn, self, call_id))
            if call_id in self._released:
                return None
            return terminated_outcome() if self._killed else outcome  # stopped by terminate()
        except BaseException as exc:
            # Raised outside fn (run_chunk carries fn's own SystemExit back):
            # fail the call rather than end this thread unreported.
            return ChunkOutcome.failed(exc)

    def release(self, call: Call) -> None:
        self._released.add(call.id)

    def close(self, kill: bool = False) -> None:
        """Stop the threads once the queued work is done; with ``kill``, drop
        the queued work, stop running chunks before their next item, and
        wait for that no longer than :data:`KILL_WAIT_SECONDS`."""
        with self._lock:
            # A kill still comes after a polite close (one a Ctrl-C cut short).
            if self._closed and (self._killed or not kill):
                return
            self._closed = True
            self._killed = self._killed or kill  # with _closed: see closed_error
            threads = list(self._threads)
        if kill:
            dropped = []
            try:
                while True:
                    job = self._jobs.get_nowait()
                    if job is not None:
                        dropped.append(job)
            except queue.Empty:
                pass
            for chunk, done in dropped:
                done(chunk, terminated_outcome())
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        for thread in threads:
            if thread is threading.current_thread():
                continue  # a task that closed its own pool
            join_thread(thread, max(0.0, deadline - time.monotonic()) if kill else None)
