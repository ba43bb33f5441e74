"""Worker processes owned by parmap: the machinery of ``process`` and ``fork``.

::

    caller thread                 dispatcher thread                 workers
    ─────────────                 ─────────────────                 ───────
    submit(chunk) ─ pickles ─▶ pending ─▶ idle worker, or ─ pipe ─▶ worker_main
                   items        deque     one ahead of a            run_chunk
                                          busy one; fn once              │
                                          per call                       │
    done(chunk, outcome) ◀── decode ◀── wait(pipes, sentinels, ◀─ pipe ──┘
                                             wake-up pipe,
                                             next timeout deadline)

The dispatcher blocks in one long-lived ``poll()`` (where the platform lacks
it, :func:`multiprocessing.connection.wait`) on every worker's pipe and exit
sentinel plus a wake-up pipe, with a timeout only when an item's ``timeout``
deadline is due; it never busy-waits. A worker's death wakes
it through the sentinel: the worker's chunk is reported as :class:`ChunkLost`
and a replacement is started, so one crash costs one chunk, not the pool.

A worker started by ``fork`` while a call is under way inherits that call's
``fn`` with the rest of the parent's memory, so a function that captured
10 MB is never pickled for it nor copied through its pipe (benchmark W7);
the parent still checks that ``fn`` *could* be pickled, so a call fails the
same way under every start method. It inherits the input of a ``map`` over a
list too (``Call.source``): chunks of it then travel as a header naming their
positions, and the worker checks that its items could have been pickled.

Subclasses say how a worker process is started and reaped
(:class:`~parmap.backends.process.ProcessBackend` uses ``multiprocessing``
contexts, :class:`~parmap.backends.fork.ForkBackend` raw ``os.fork``).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import mmap
import multiprocessing.process
import os
import pickle
import select
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from .._errors import ParmapError, PoolClosedError, SerializationError
from .._serialization import PROTOCOL, InitializerPayload, Pickled
from .._wire import recv_framed, send_framed, send_room
from .._worker import SLOT_WIDTH, Inherited, ctrl_c_held, running_offset
from ._base import (
    Backend,
    Call,
    Capabilities,
    Chunk,
    ChunkLost,
    ChunkOutcome,
    Done,
    WakePipe,
    closed_error,
    decode_chunk_outcome,
    drives_workers,
    dropped_outcome,
    join_thread,
    leave_to_finish,
    may_wait_for_another_backend,
    startup_failed_outcome,
    take_standard_descriptors,
    terminated_outcome,
    wait_for_exits,
)
from ._process_tree import kill_trees

# A worker that dies before running anything this many times in a row means
# workers cannot start at all (say, __main__ cannot be imported under spawn):
# fail the call instead of respawning forever (see startup_failed_outcome).
MAX_STARTUP_FAILURES = 3
# Starting a worker costs the parent the fork (measured on each start) and
# then about as long again before the child computes (benchmark W4's
# timeline: fork 2-4 ms, first item 1.5-2.5 ms after it). See _worth_growing.
START_COST_FACTOR = 2.0
# What a start is assumed to cost before the first one is measured.
INITIAL_START_COST = 0.003
# A chunk is sent to a busy worker ahead of time only behind a chunk expected
# to take at most this long, and not before the first measurement: W1's
# chunks (~12 ms) and W2's (~100 ms) gain from it, since with both cores busy
# the dispatcher may wait milliseconds for one (W2 took ~7% longer with 0.02);
# behind a first item that takes a second, the next waited there while the
# other worker idled (20 items, two of them 1 s: 2.0 s, now 1.0 s).
MAX_AHEAD_OF_SECONDS = 0.2
# How long a worker told to stop (a polite close, or retired by
# max_tasks_per_child) may take to exit before it is killed: an idle one
# exits in milliseconds, one with an exit handler of the user's that hangs
# never would, nor one still writing to a multiprocessing queue that nobody
# reads (its exit waits for the queue's feeder thread).
STOP_WAIT_SECONDS = 5.0
# The dispatcher's longest sleep: a due time further off (a huge ``timeout``)
# is looked at again then, since the wait's own limit is ~24 days in ms.
MAX_WAIT_SECONDS = 3600.0
#: How often the dispatcher looks for the first item of a worker whose chunk
#: has a timeout while none of it runs yet: how late the clock can start.
#: The item's own start time still sets its deadline, so it costs nothing
#: in precision; it bounds the wake-ups of a long initializer to 20 a second.
UNMARKED_POLL_SECONDS = 0.05


# Every worker start of every pool in this process, one at a time. A start
# opens the child's ends of its pipes (and multiprocessing its exit
# sentinel's) in the parent until the fork is done; another pool forking in
# between would hand its worker a copy, and that copy keeps the pipe open: a
# death goes unseen (the sentinel never fires) while that worker lives.
_STARTING = threading.Lock()
# Every LocalWorkers alive here: a child forked for any reason drops their
# parent-side ends at once (see _drop_parent_ends_after_fork).
_LIVE: weakref.WeakSet[LocalWorkers] = weakref.WeakSet()


# The parent's end of the pipe of the worker being started (under _STARTING):
# the new worker must not keep it, or it would never read end-of-file.
_STARTING_ENDS: list[Any] = []


@contextlib.contextmanager
def dropped_by_a_forked_worker(conn: Any) -> Iterator[None]:
    """While this runs (under _STARTING), a forked child closes ``conn``: the
    parent's end of the pipe of the worker being started."""
    _STARTING_ENDS.append(conn)
    try:
        yield
    finally:
        _STARTING_ENDS.remove(conn)


def _drop_parent_ends_after_fork() -> None:
    """In a forked child: close every pool's ends of its workers' pipes.

    Held by another pool's worker (or any child), such an end stays open
    after the parent closes its own, so that worker would not read
    end-of-file when its pool ends or its parent dies.
    """
    global _STARTING
    # Held by the thread that forked (the child of a worker start always
    # inherits it held), or by one that does not exist here: a pool made in
    # the child (a nested call with a timeout) must be able to start workers.
    _STARTING = threading.Lock()
    for workers in list(_LIVE):
        workers._drop_parent_ends()
    for conn in _STARTING_ENDS:
        _close_quietly(conn)
    _forget_the_parents_children()


def _close_quietly(conn: Any) -> None:
    # A fork by anyone but a pool start (a multiprocessing.Pool's, the
    # user's) may catch a connection half closed by its parent; the rest of
    # the clean-up must still happen.
    with contextlib.suppress(OSError):
        conn.close()


def _close_parent_end(conn: Any) -> None:
    """Close the parent's end of a worker's pipe, never while a worker forks.

    ``Connection.close()`` frees the descriptor before it forgets it: a
    child forked in between would close that number again in
    :func:`_drop_parent_ends_after_fork`, and by then it may be the new
    worker's own pipe end.
    """
    with _STARTING:
        conn.close()


def _forget_the_parents_children() -> None:
    """In a forked child: drop the parent's processes from multiprocessing's
    list of this process's children, as multiprocessing does in the children
    it starts itself.

    Left there, its exit handler takes them for this process's daemonic
    children: a child made by a bare ``os.fork()`` that ends normally sent
    SIGTERM to every worker of the parent's pools.
    """
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        here = os.getpid()
        children.difference_update([p for p in children if getattr(p, "_parent_pid", here) != here])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_parent_ends_after_fork)


def exit_sentinel(pid: int) -> int | None:
    """A descriptor of child ``pid`` that turns readable when it exits, or None.

    A pidfd (Linux 5.3+) tells of the exit whatever else the child left
    behind; the pipe sentinels of multiprocessing and of the fork backend
    turn readable only once every copy of their write end is closed, and a
    process the worker forked itself (``os.fork``, a ``multiprocessing``
    helper started in ``fn``) keeps one for as long as it lives: a crash
    went unseen until then.
    """
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # another platform, an older kernel
        return None


def _still_running(pid: int) -> bool:
    """Whether child ``pid`` has not exited, asked without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False  # reaped already (multiprocessing reaps its dead children when it starts one)
    except (AttributeError, OSError):  # pragma: no cover - no waitid here: wait on, as before
        return True


@dataclass(eq=False)
class WorkerProcess:
    """The parent's handle on one worker."""

    index: int
    pid: int
    conn: Any
    sentinel: Any
    handle: Any = None
    chunk: Chunk | None = None
    done: Done | None = None
    sent_at: float = 0.0
    started_at: float = 0.0
    known_calls: set[int] = field(default_factory=set)
    #: Call id -> the chunks sent before this worker was sent that call's
    #: function by value (see _function_missed).
    by_value_after: dict[int, int] = field(default_factory=dict)
    sources: set[int] = field(default_factory=set)
    ran_anything: bool = False
    #: Killed by parmap because its call ended (see _stop_abandoned): its
    #: death says nothing about whether a worker can start.
    stopped: bool = False
    timed_out_offset: int | None = None
    sent: int = 0  # chunks sent; the worker counts those it read in its status slot
    items_sent: int = 0  # items in those chunks (see max_items_per_worker)
    seq: int = 0  # the running chunk's number among those sent
    #: A chunk sent behind the running one, with its number (see _prefetch).
    ahead: tuple[Chunk, Done, int] | None = None
    room: int = 0  # bytes a chunk may take to be sent ahead (see _wire.send_room)


@dataclass(eq=False, slots=True)
class _Queued:
    chunk: Chunk
    done: Done
    items: Pickled | None


def _control(message: tuple[Any, ...] | None) -> bytes:
    """A control message (ints, bools, ranges, bytes: plain pickle's ground,
    and ~20x cheaper per chunk than cloudpickle's pickler)."""
    return pickle.dumps(message, protocol=PROTOCOL)


def pickle_initializer(initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> InitializerPayload | None:
    """The initializer and its arguments for local workers (see ``InitializerPayload``)."""
    if initializer is None:
        return None
    return InitializerPayload(initializer, initargs)


def _reads_source(worker: WorkerProcess, chunk: Chunk) -> bool:
    """Whether ``worker`` reads ``chunk``'s items from its own copy of the input."""
    return chunk.from_source and chunk.call.id in worker.sources


class LocalWorkers(Backend):
    """A fixed number of worker processes, replaced when they die."""

    capabilities = Capabilities(isolated=True, can_timeout=True)
    #: Workers are started by ``fork``: they inherit what the parent holds.
    forks_workers = True
    #: ``multiprocessing``'s start method; ``None``: a bare ``os.fork``.
    start_method: str | None = None
    queues_chunks = True

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_child: int | None = None,
    ) -> None:
        take_standard_descriptors()  # before any pipe of ours can land on them
        self.workers = workers
        self.max_items_per_worker = max_tasks_per_child
        self._init = pickle_initializer(initializer, initargs)
        self._lock = threading.Lock()
        self._pending: deque[_Queued] = deque()
        self._ended_calls: set[int] = set()
        self._procs: list[WorkerProcess | None] = [None] * workers
        self._wake_pipe = WakePipe()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._kill = False
        self._broken: ParmapError | None = None  # why the dispatcher gave up, if it did
        self._startup_failures = 0
        self._status: Any = None
        self._start_cost = INITIAL_START_COST  # seconds the last start took the parent
        self._grow_due: float | None = None  # when a deferred start is due (monotonic)
        self._one_call = False  # see serve_one_call
        self._abandoned: set[int] = set()  # calls released since the dispatcher last looked
        self._poller = select.poll() if hasattr(select, "poll") else None
        self._polled: dict[int, tuple[bool, WorkerProcess | None]] = {}  # fd -> (sentinel?, worker)
        _LIVE.add(self)

    # -- subclass hooks -------------------------------------------------
    def _make_status_array(self, size: int) -> Any:
        """Shared doubles visible to the workers (three per worker).

        An anonymous shared mapping survives fork and needs no file, nor
        ``multiprocessing.sharedctypes`` and the ~5 ms of imports behind it
        (benchmark W4); workers started otherwise need a subclass's own.
        """
        return memoryview(mmap.mmap(-1, size * 8)).cast("d")

    @abc.abstractmethod
    def _start_worker(self, index: int, inherited: Inherited) -> WorkerProcess:
        """Start worker ``index``; runs on the dispatcher thread.

        ``inherited`` (empty unless :attr:`forks_workers`): the functions and
        inputs of the calls under way, by call id, for the forked worker to
        start with.
        """

    @abc.abstractmethod
    def _reap(self, worker: WorkerProcess) -> int | None:
        """Wait for an exited worker and return its exit code (negative: signal)."""

    def _drop_parent_ends(self) -> None:
        """Close this pool's ends of its workers' pipes: in a forked child,
        which must not keep them open (see _drop_parent_ends_after_fork).

        Only the connections, closed as objects, so that nothing closes their
        descriptors again; the other descriptors (exit sentinels, the wake-up
        pipe) are read ends, whose copies change nothing for anyone.
        """
        for other in self._procs:
            if other is not None:
                _close_quietly(other.conn)

    # -- the Backend interface (caller threads) ------------------------
    def submit(self, chunk: Chunk, done: Done) -> None:
        # Fail here, in the caller, if fn cannot travel; forked workers may
        # never need its bytes, so only check then.
        if self.forks_workers and not chunk.call.snapshot:
            chunk.call.check_local()
        else:
            chunk.call.local_fn_bytes  # noqa: B018 - pickled once (now), sent per worker
        # Items a worker forked during this call can read from its own copy of
        # the input are not pickled at all (benchmarks W1, W5in). The workers
        # of an earlier call (a warm Pool) lack it: pickle here, in the caller,
        # where an item that will not pickle fails alone (see _base.Chunk).
        holds_source = (
            self.forks_workers
            and chunk.from_source
            and all(w is None or chunk.call.id in w.sources for w in self._procs)
        )
        queued = _Queued(chunk, done, None if holds_source else chunk.pickled_items())
        with self._lock:
            if self._broken is not None:
                raise PoolClosedError(f"this pool is closed: {self._broken}") from self._broken
            if self._closing:
                raise closed_error(self._kill)
            self._pending.append(queued)
            # With every worker busy, the dispatcher finds this chunk when one
            # finishes (it marks the worker idle, then looks here, under this
            # lock): waking it now would cost a round of its loop per chunk
            # (benchmark W2: the parent's CPU time, which on 2 cores comes out of
            # the workers', fell by about a quarter).
            wake = any(w is None or w.chunk is None or self._can_go_ahead(w, chunk) for w in self._procs)
            if self._thread is None:
                self._status = self._make_status_array(self.workers * SLOT_WIDTH)
                self._thread = threading.Thread(target=self._dispatch_loop, name="parmap-dispatcher", daemon=True)
                drives_workers(self._thread)  # before it starts: a collection may run as it does
                self._thread.start()
        if wake:
            self._wake_pipe.wake()

    def serve_one_call(self) -> None:
        """Weigh each worker's start against the work (see :meth:`_worth_growing`).

        Only then: a ``Pool`` pays for its workers once over many calls, and
        its user expects them all up once work has come.
        """
        self._one_call = True

    def release(self, call: Call) -> None:
        with self._lock:
            self._pending = deque(q for q in self._pending if q.chunk.call is not call)
            self._ended_calls.add(call.id)
            if not self._one_call:  # a one-call pool is about to stop them all
                self._abandoned.add(call.id)
        self._wake_pipe.wake()

    def close(self, kill: bool = False) -> None:
        with self._lock:
            if self._closing and not kill:
                thread = self._thread
            else:
                self._closing = True
                self._kill = self._kill or kill
                thread = self._thread
        self._wake_pipe.wake()
        if thread is not None and thread is not threading.current_thread():
            if may_wait_for_another_backend():
                join_thread(thread)
            else:
                leave_to_finish(thread)
        if thread is None:
            self._wake_pipe.close()

    # -- the dispatcher thread -----------------------------------------
    def _dispatch_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    closing, kill, queued = self._closing, self._kill, bool(self._pending)
                if kill:
                    self._fail_all(terminated_outcome())
                    return
                if closing and not queued and not self._busy():
                    return  # a polite close runs what was queued first
                self._stop_abandoned()
                self._send_work()
                if self._grow():
                    continue  # feed the new worker before starting another
                self._watch(self._next_deadline())
        except BaseException as exc:
            # A bug here must not leave callers waiting for ever on chunks
            # that nobody will report.
            self._abandon(exc)
        finally:
            self._stop_all()
            self._wake_pipe.close()

    def _abandon(self, exc: BaseException) -> None:
        """Fail every queued and running chunk with ``exc``; take no more work."""
        error = ParmapError(f"parmap's dispatcher thread failed, so this pool can run nothing more: {exc!r}")
        error.__cause__ = exc
        with self._lock:
            self._broken = error  # for chunks submitted from now on, which it never sees
        self._fail_all(ChunkOutcome.failed(error))

    def _fail_all(self, outcome: ChunkOutcome) -> None:
        """End every queued and running chunk with ``outcome``; take no more work."""
        with self._lock:
            self._closing = True
            failed: list[tuple[Chunk | None, Done | None]] = [(q.chunk, q.done) for q in self._pending]
            self._pending = deque()
        failed += [taken for w in self._procs if w is not None for taken in self._take_all(w)]
        for chunk, done in failed:
            if chunk is not None and done is not None:
                done(chunk, outcome)

    def _grow(self) -> bool:
        """Start a worker if queued chunks need one, up to ``workers``: a
        three-item map on a 16-CPU machine starts three processes, not 16.
        Serving one call, only if it pays: a job that one worker finishes
        sooner than a second could start gets one (see :meth:`_worth_growing`).

        One at a time, so the first worker is computing while the next is
        forked (benchmark W4). Returns whether it started one.
        """
        self._grow_due = None
        if None not in self._procs:  # all started: nothing to count, every loop
            return False
        live = [w for w in self._procs if w is not None]
        idle = sum(1 for w in live if w.chunk is None)
        with self._lock:
            if self._kill or len(self._pending) <= idle:
                return False
            backlogs = {q.chunk.call.id: q.chunk.call.backlog for q in self._pending}
        since = min((w.started_at for w in live), default=0.0)
        if live and self._one_call and not self._worth_growing(len(live), backlogs.values(), since):
            return False
        index = self._procs.index(None)
        self._procs[index] = self._start(index)
        return True

    def _worth_growing(self, running: int, backlogs: Iterable[float | None], since: float) -> bool:
        """Whether a worker added to ``running`` ones would finish the queued
        calls sooner than it costs to start.

        With ``k`` workers a backlog of ``B`` seconds takes ``B/k``; one more
        saves ``B/(k(k+1))``, worth it above the start's cost. Before a
        call's first chunk is measured its backlog is unknown: wait, while
        the workers there are make a start on it, for as long as a start
        would cost, then start one (so a job of a few milliseconds runs on
        one worker, and a slow one gets its second worker at most one start
        later; benchmark W4).
        """
        cost = self._start_cost * START_COST_FACTOR
        known, unmeasured = 0.0, False
        for backlog in backlogs:
            if backlog is None:
                unmeasured = True
            else:
                known += backlog
        if known >= cost * running * (running + 1):
            return True
        if not unmeasured:
            return False
        due = since + cost
        if time.monotonic() >= due:
            return True
        self._grow_due = due
        return False

    def _stop_abandoned(self) -> None:
        """Kill the workers still running chunks of calls that ended early (an
        ``imap`` closed, a call that raised): nobody wants those results, and
        on a warm pool the next call would wait behind them. Each such
        worker is replaced at once."""
        with self._lock:
            abandoned, self._abandoned = self._abandoned, set()
        if abandoned:
            for worker in self._procs:
                if worker is not None and worker.chunk is not None and worker.chunk.call.id in abandoned:
                    worker.stopped = True
                    self._kill_worker(worker)

    def _busy(self) -> bool:
        return any(w is not None and w.chunk is not None for w in self._procs)

    def _send_work(self) -> None:
        for worker in self._procs:
            if worker is None or worker.chunk is not None:
                continue
            with self._lock:
                queued, dropped = None, []
                while self._pending and not self._kill:
                    candidate = self._pending.popleft()
                    if candidate.chunk.begins():
                        queued = candidate
                        break
                    dropped.append(candidate)
                ended = self._ended_calls & worker.known_calls
            for gone in dropped:
                gone.done(gone.chunk, dropped_outcome())
            if queued is None:
                return
            if self._has_run_its_share(worker, queued.chunk):
                with self._lock:
                    self._pending.appendleft(queued)  # a requeued chunk that began is wanted still
                self._retire(worker)
                continue
            call = queued.chunk.call
            from_source = _reads_source(worker, queued.chunk)
            try:
                if call.id not in worker.known_calls:
                    fn_bytes = call.local_fn_bytes
                if queued.items is None and not from_source:
                    # This worker replaced one since submit, after the call's
                    # chunks had all left the queue, so it lacks the input.
                    queued.items = queued.chunk.pickled_items()
            except SerializationError as exc:  # both checked in submit: only a fickle __reduce__ lands here
                queued.done(queued.chunk, ChunkOutcome.failed(exc))
                self._wake_pipe.wake()  # this worker is still idle: come round again
                continue
            worker.chunk, worker.done, worker.sent_at = queued.chunk, queued.done, time.monotonic()
            worker.seq = worker.sent + 1
            try:
                for call_id in ended:
                    worker.conn.send_bytes(_control(("forget", call_id)))
                    worker.known_calls.discard(call_id)
                    worker.sources.discard(call_id)
                    worker.by_value_after.pop(call_id, None)
                if call.id not in worker.known_calls:
                    worker.conn.send_bytes(_control(("fn", call.id, fn_bytes)))
                    worker.known_calls.add(call.id)
                    if call.fn_by_value:
                        worker.by_value_after.setdefault(call.id, worker.sent)
                self._send_chunk(worker, queued, from_source)
            except OSError:
                pass  # the worker died under us; its sentinel reports the chunk
        self._prefetch()

    def _can_go_ahead(self, worker: WorkerProcess, chunk: Chunk) -> bool:
        """Whether ``chunk`` may be sent to ``worker`` behind the one it runs."""
        running = worker.chunk
        if running is None or worker.ahead is not None or running.call is not chunk.call:
            return False
        if self._has_run_its_share(worker, chunk):
            return False
        # Sent behind a long chunk, it would wait there while another worker
        # idles (a slow item holding back the next); and the dispatcher's
        # delay that going ahead saves is nothing beside a long chunk.
        expected = running.expected_seconds
        if expected is not None and expected > MAX_AHEAD_OF_SECONDS:
            return False
        # Timeouts watch one chunk per worker, from when it was sent.
        return chunk.call.timeout is None and None not in self._procs

    def _prefetch(self) -> None:
        """Send each busy worker its next chunk while it computes the current
        one, so that it goes on the moment it finishes instead of waiting for
        the dispatcher, which may be busy unpickling another worker's results
        (benchmark W1: the workers stood idle for a quarter of the run).

        Only a chunk of the same call, with no timeout to watch, and only
        one small enough for the socket to take whole while the worker reads
        nothing: the worker reads it only after writing its current outcome,
        so a send that had to wait for it would deadlock both.
        """
        for worker in self._procs:
            if worker is None:
                return
            with self._lock:
                if not self._pending or self._kill:
                    return
                queued = self._pending[0]
                if not self._can_go_ahead(worker, queued.chunk):
                    continue
                from_source = _reads_source(worker, queued.chunk)
                if not from_source and (queued.items is None or queued.items.nbytes > worker.room):
                    continue
                self._pending.popleft()
                wanted = queued.chunk.begins()
            if not wanted:
                queued.done(queued.chunk, dropped_outcome())
                continue
            worker.ahead = (queued.chunk, queued.done, worker.sent + 1)
            try:
                self._send_chunk(worker, queued, from_source)
            except OSError:
                pass  # the worker died under us; its sentinel reports the chunk

    def _send_chunk(self, worker: WorkerProcess, queued: _Queued, from_source: bool) -> None:
        worker.sent += 1
        worker.items_sent += len(queued.chunk.positions)
        header = (*queued.chunk.header(), from_source)
        worker.conn.send_bytes(_control(header))
        if queued.items is not None and not from_source:
            send_framed(worker.conn, queued.items.parts)

    def _next_deadline(self) -> float | None:
        """Seconds until the earliest running item could pass its timeout,
        or a deferred worker start is due."""
        deadline = self._grow_due
        now = time.monotonic()
        for worker in self._procs:
            if worker is None or worker.chunk is None or worker.chunk.call.timeout is None:
                continue
            base = worker.index * SLOT_WIDTH
            offset, started = self._status[base + 1], self._status[base + 2]
            if offset < 0:
                phase = self._between_items(worker)
                # No item runs: not at this chunk yet (starting, in the
                # initializer, finishing the last one), or loading its items.
                # Look again shortly: an item may start at any moment, and
                # nothing wakes the dispatcher when one does.
                due = now + UNMARKED_POLL_SECONDS if phase is None else min(phase, now + UNMARKED_POLL_SECONDS)
            else:
                due = (started if started >= worker.sent_at else worker.sent_at) + worker.chunk.call.timeout
            deadline = due if deadline is None else min(deadline, due)
        if deadline is None:
            return None
        return min(max(0.0, deadline - time.monotonic()), MAX_WAIT_SECONDS)

    def _ready(self, timeout: float | None) -> tuple[bool, list[WorkerProcess], list[WorkerProcess]]:
        """Wait for the wake-up pipe, worker pipes and exit sentinels; return
        whether the pipe woke us, and the workers with a message and those
        gone. One poll object serves every round, registered anew only
        where the workers changed: building a selector per round, as
        ``multiprocessing.connection.wait`` does, was a tenth of the
        dispatcher's time on small chunks (``chunksize=1`` over 10,000 items)."""
        roles: dict[int, tuple[bool, WorkerProcess | None]] = {self._wake_pipe.r: (False, None)}
        for worker in self._procs:
            if worker is not None:
                roles[worker.conn.fileno()] = (False, worker)
                roles[worker.sentinel] = (True, worker)
        if self._poller is None:  # no poll() here (Windows): multiprocessing's portable wait
            ready = wait(list(roles), timeout)
            fds = [obj if isinstance(obj, int) else obj.fileno() for obj in ready]
        else:
            for fd in self._polled.keys() - roles.keys():
                self._poller.unregister(fd)
            for fd in roles.keys() - self._polled.keys():
                self._poller.register(fd, select.POLLIN)
            self._polled = roles
            fds = [fd for fd, _ in self._poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0)]
        woken, readable, died = False, [], []
        for fd in fds:
            is_sentinel, worker = roles[fd]
            if worker is None:
                woken = True
            elif is_sentinel:
                died.append(worker)
            else:
                readable.append(worker)
        return woken, readable, died

    def _watch(self, timeout: float | None) -> None:
        woken, readable, died = self._ready(timeout)
        if woken:
            self._wake_pipe.drain()
        received: list[tuple[WorkerProcess, int, Chunk | None, Done | None, bytes | bytearray]] = []
        for worker in readable:
            try:
                data = recv_framed(worker.conn, functools.partial(_still_running, worker.pid))
            except (EOFError, OSError):
                continue  # died mid-message: its sentinel is ready too
            received.append((worker, worker.seq, *self._take(worker), data))
        # Replaced first, so that no chunk is sent to a worker already dead.
        for worker in died:
            self._replace(worker)
        if received:
            # Refill the workers that just finished before unpickling what they
            # sent: decoding a big outcome takes milliseconds that the worker
            # would otherwise spend idle (benchmark W1).
            self._send_work()
            for worker, seq, chunk, done, data in received:
                if chunk is not None and done is not None:
                    outcome = decode_chunk_outcome(chunk, data)
                    if outcome.fn_unreadable and self._function_missed(worker, seq, chunk, done):
                        continue
                    done(chunk, outcome)
        if timeout is not None:
            self._enforce_timeouts()

    def _function_missed(self, worker: WorkerProcess, seq: int, chunk: Chunk, done: Done) -> bool:
        """``worker`` could not load ``chunk``'s function: if it had it by
        reference, send it by value and the chunk again, free of charge, and
        return True. A function of ``__main__`` defined after the worker
        started is not in the worker's ``__main__``; sent by value it needs
        not be. Only a function that fails by value too is the call's error."""
        call = chunk.call
        after = worker.by_value_after.get(call.id)
        if after is not None and seq > after:
            return False  # it had the function by value, and that failed too
        call.fn_by_value = True
        if after is None:
            worker.known_calls.discard(call.id)  # so that it is sent again, by value
        with self._lock:
            self._pending.appendleft(_Queued(chunk, done, None))
        return True  # the dispatch loop sends it on its next round, before it waits

    def _take(self, worker: WorkerProcess) -> tuple[Chunk | None, Done | None]:
        """Take the worker's running chunk off it: it is idle again, or runs
        the chunk sent ahead."""
        chunk, done = worker.chunk, worker.done
        worker.chunk = worker.done = None
        worker.ran_anything = True
        if worker.ahead is not None:
            worker.chunk, worker.done, worker.seq = worker.ahead
            worker.ahead = None
            worker.sent_at = time.monotonic()
        return chunk, done

    def _take_all(self, worker: WorkerProcess) -> list[tuple[Chunk | None, Done | None]]:
        """Take every chunk off the worker: the running one, then the one ahead."""
        taken: list[tuple[Chunk | None, Done | None]] = []
        while worker.chunk is not None:
            taken.append(self._take(worker))
        return taken

    def _finish(self, worker: WorkerProcess, outcome: ChunkOutcome | ChunkLost) -> None:
        chunk, done = self._take(worker)
        if chunk is not None and done is not None:
            done(chunk, outcome)

    def _replace(self, worker: WorkerProcess) -> None:
        # A message written just before death is still in the pipe.
        try:
            while worker.chunk is not None and worker.conn.poll():
                data = recv_framed(worker.conn, functools.partial(_still_running, worker.pid))
                self._finish(worker, decode_chunk_outcome(worker.chunk, data))
        except (EOFError, OSError):
            pass
        exitcode = self._reap(worker)
        _close_parent_end(worker.conn)
        if worker.chunk is not None:
            timed_out = worker.timed_out_offset is not None
            read = self._status[worker.index * SLOT_WIDTH + 3]
            # Dead before it read this chunk (killed while idle, say): the
            # chunk did no harm and runs again free of charge. A worker that
            # had never got going counts towards MAX_STARTUP_FAILURES instead
            # (an initializer that ends its process, say), past which the
            # call fails as a whole: no item is to blame.
            unread = read < worker.seq and not timed_out
            if worker.stopped:
                pass
            elif unread and not worker.ran_anything:
                self._startup_failures += 1
            else:
                self._startup_failures = 0
            ahead = worker.ahead
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                lost: ChunkOutcome | ChunkLost = startup_failed_outcome(exitcode)
            else:
                offset = worker.timed_out_offset
                if offset is None and worker.chunk.marked and not unread:
                    offset = running_offset(self._status, worker.index)
                lost = ChunkLost(exitcode, worker.pid, offset=offset, timed_out=timed_out, innocent=unread)
            self._finish(worker, lost)
            if ahead is not None:  # not read unless the chunk before it was done with
                if isinstance(lost, ChunkLost):
                    lost = ChunkLost(exitcode, worker.pid, innocent=read < ahead[2])
                self._finish(worker, lost)
        elif not worker.ran_anything and not worker.stopped:
            self._startup_failures += 1
        self._procs[worker.index] = None
        with self._lock:
            closing = self._closing
        if closing:
            return
        if self._startup_failures >= MAX_STARTUP_FAILURES:
            self._fail_pending(exitcode)
            self._startup_failures = 0
        if not worker.ran_anything:
            with self._lock:
                waiting = bool(self._pending)
            if not waiting:
                # One that cannot start would die again at once, over and over,
                # while nothing needs it: _grow starts one when work comes.
                return
        self._procs[worker.index] = self._start(worker.index)

    def _start(self, index: int) -> WorkerProcess:
        inherited: Inherited = {}
        if self.forks_workers:
            with self._lock:
                chunks = [q.chunk for q in self._pending]
                ended = set(self._ended_calls)
            chunks += [w.chunk for w in self._procs if w is not None and w.chunk is not None]
            inherited = {
                c.call.id: (c.call.fn, c.call.source) for c in chunks if c.call.id not in ended and not c.call.snapshot
            }
        self._status[index * SLOT_WIDTH + 3] = 0.0  # the new worker has read nothing yet
        self._status[index * SLOT_WIDTH + 1] = -1.0  # nor runs an item (the last one's mark may linger)
        began = time.monotonic()
        # On the dispatcher thread, never the main one (see ctrl_c_held).
        with _STARTING, ctrl_c_held(self.start_method):
            worker = self._start_worker(index, inherited)
        worker.started_at = time.monotonic()
        self._start_cost = worker.started_at - began
        worker.room = send_room(worker.conn)
        worker.known_calls.update(inherited)
        worker.sources.update(i for i, (_, source) in inherited.items() if source is not None)
        return worker

    def _fail_pending(self, exitcode: int | None) -> None:
        with self._lock:
            failed, self._pending = list(self._pending), deque()
        outcome = startup_failed_outcome(exitcode)
        for queued in failed:
            queued.done(queued.chunk, outcome)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for worker in self._procs:
            if worker is None or worker.chunk is None or worker.timed_out_offset is not None:
                continue
            timeout = worker.chunk.call.timeout
            if timeout is None:
                continue
            base = worker.index * SLOT_WIDTH
            offset, started = int(self._status[base + 1]), self._status[base + 2]
            if offset < 0:
                phase = self._between_items(worker)
                if phase is not None and now >= phase:
                    worker.timed_out_offset = 0  # which item's load or result hangs is unknown
                    self._kill_worker(worker)
                continue
            since = started if started >= worker.sent_at else worker.sent_at
            if now - since >= timeout:
                worker.timed_out_offset = offset
                self._kill_worker(worker)

    def _between_items(self, worker: WorkerProcess) -> float | None:
        """When a worker that runs no item of its chunk is late, or None when
        it is not at its chunk yet.

        Starting, running the initializer, or finishing the chunk before is
        no item's time. Loading the chunk's items and pickling its results
        is (the user's ``__setstate__``/``__getstate__`` may hang there), at a
        timeout per item: a chunk of big results may take a while to pickle.
        """
        assert worker.chunk is not None and worker.chunk.call.timeout is not None
        base = worker.index * SLOT_WIDTH
        if self._status[base + 3] + 0.5 < worker.seq:  # + 0.5: loading this chunk's function
            return None
        since = max(float(self._status[base + 2]), worker.sent_at)
        return since + worker.chunk.call.timeout * max(1, len(worker.chunk.positions))

    def _has_run_its_share(self, worker: WorkerProcess, chunk: Chunk) -> bool:
        """Whether ``chunk`` would take ``worker`` past ``max_tasks_per_child`` items."""
        limit = self.max_items_per_worker
        return limit is not None and worker.items_sent > 0 and worker.items_sent + len(chunk.positions) > limit

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop an idle worker that has run its share of items, as a close
        stops it; :meth:`_grow` starts a fresh one in its place for the work
        still queued."""
        try:
            worker.conn.send_bytes(_control(None))
        except OSError:
            pass  # died meanwhile: it is gone either way, and ran all it was sent
        self._see_off([worker], polite=True)
        self._procs[worker.index] = None

    def _see_off(self, workers: Sequence[WorkerProcess], *, polite: bool) -> None:
        """Reap workers that were told to stop or killed, and close our ends;
        ``polite``: they have :data:`STOP_WAIT_SECONDS`, all together, to exit
        before they are killed (at once if a kill comes meanwhile)."""
        if polite:
            until = time.monotonic() + STOP_WAIT_SECONDS
            late = wait_for_exits([w.sentinel for w in workers], until, self._wake_pipe, self._kill_requested)
            for worker in workers:
                if worker.sentinel in late:
                    self._kill_worker(worker)
        for worker in workers:
            self._reap(worker)
            _close_parent_end(worker.conn)

    def _kill_requested(self) -> bool:
        with self._lock:
            return self._kill

    def _kill_worker(self, worker: WorkerProcess) -> None:
        kill_trees([worker.pid])  # and the commands its item was running

    def _stop_all(self) -> None:
        """Stop every worker: politely unless killing, always reaped."""
        with self._lock:
            kill = self._kill
        workers = [w for w in self._procs if w is not None]
        if kill:
            kill_trees(w.pid for w in workers)
        else:
            for worker in workers:
                try:
                    worker.conn.send_bytes(_control(None))
                except OSError:
                    pass
        # One wait for them all: workers that cannot exit (a queue of the
        # caller's they are still writing to, say) cost STOP_WAIT_SECONDS
        # once, not once each.
        self._see_off(workers, polite=not kill)
        self._procs = [None] * self.workers
