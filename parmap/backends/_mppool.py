"""The machinery shared by ``pool`` and ``apply_async``: a ``multiprocessing.Pool``.

A bare ``multiprocessing.Pool`` hangs forever when a worker dies: the pool
quietly starts a replacement and the dead worker's task never completes. Here
every task first writes its worker's pid into a shared status slot, and a
monitor thread blocks on the pool workers' sentinels; when one fires, the
chunk whose slot names the dead pid is reported as :class:`ChunkLost`, and
the whole pool is swapped for a fresh one (a dead worker may hold one of its
queue locks for ever; see ``_replace_pool``). The same slots carry the
running item's start time, so a ``timeout`` kills just the stuck worker.

``fn`` reaches each pool worker once per call: inline in the task when it is
small, otherwise through a temporary file that workers read once and cache.
"""

from __future__ import annotations

import abc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.pool
import multiprocessing.popen_forkserver
import os
import signal
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .. import _worker
from .._errors import PoolClosedError
from .._serialization import ErrorInfo, InitializerPayload, loads, share_globals
from .._worker import (
    SLOT_WIDTH,
    ChunkOutcome,
    StatusSlot,
    ctrl_c_held,
    encode_outcome,
    fatal_outcome,
    prepare_worker_process,
    run_chunk,
    run_initializer,
    running_offset,
    unreadable_outcome,
)
from ._base import (
    Backend,
    Call,
    Capabilities,
    Chunk,
    ChunkLost,
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
from ._local import (
    MAX_STARTUP_FAILURES,
    MAX_WAIT_SECONDS,
    STOP_WAIT_SECONDS,
    UNMARKED_POLL_SECONDS,
    exit_sentinel,
    pickle_initializer,
)
from ._process_tree import freeze_descendants, kill_frozen, kill_trees
from .process import default_start_method

# Functions bigger than this go through a file rather than inside every task
# (a 10 MB closure must not be resent per chunk: benchmarks W7).
INLINE_FUNCTION_BYTES = 64 * 1024
# multiprocessing.Pool replaces dead workers from its own thread and tells no
# one; while chunks are in flight the monitor looks at its worker list this
# often, so a death it had no sentinel for is still reported within ~1 s.
RESCAN_SECONDS = 0.25
# How long ``Pool.terminate()`` may take before parmap frees what killed
# workers left locked (see ``_terminate``). A healthy terminate of a
# two-worker fork pool, idle or busy, took 3 ms (median and max of 10, on
# 2 loaded cores): a quarter second is ~80 times that, and a wedged pool
# (a crash mid-send, a timeout) no longer holds its call up for a second.
# Unwedging early costs nothing: it kills workers already being killed.
TERMINATE_GRACE_SECONDS = 0.25
# ... and how many such rounds before giving up on the pool's threads: by
# then every worker is dead and reaped, and a stuck daemon thread of a
# discarded pool is better than a caller that never returns.
TERMINATE_ROUNDS = 10
# The most calls' functions a pool worker keeps loaded.
FUNCTION_CACHE_SIZE = 4

# -- the pool worker side ------------------------------------------------

_status: Any = None
_init_error: Any = None
_functions: OrderedDict[int, Callable[..., Any]] = OrderedDict()


def _pool_worker_init(status: Any, init: InitializerPayload | None) -> None:
    global _status, _init_error
    prepare_worker_process(parent_death_signal=False)
    _status = status
    _init_error = run_initializer(init)


def _load_function(call_id: int, fn_ref: bytes | str) -> Callable[..., Any]:
    fn = _functions.get(call_id)
    if fn is None:
        if isinstance(fn_ref, str):
            with open(fn_ref, "rb") as f:
                fn_ref = f.read()
        fn = loads(fn_ref)
        share_globals(fn, _worker.init_globals)
        _functions[call_id] = fn
        while len(_functions) > FUNCTION_CACHE_SIZE:
            _functions.popitem(last=False)
    return fn


def run_pool_task(task: tuple[Any, ...]) -> tuple[int, bytes]:
    """The function every pool task runs; it never raises (a raise would be
    pickled by the pool, and an unpicklable one would hang it)."""
    key, slot, call_id, fn_ref, header, items_bytes = task
    status = StatusSlot(_status, slot)
    status.claim()
    _, _, positions, stop_on_error, track, star = header
    if _init_error is not None:
        return key, encode_outcome(ChunkOutcome([], fatal=_init_error), positions)
    try:
        fn = _load_function(call_id, fn_ref)
    except Exception as exc:
        return key, encode_outcome(fatal_outcome(exc, "the function"), positions)
    try:
        items = loads(items_bytes)
    except Exception as exc:
        return key, encode_outcome(unreadable_outcome(exc, positions), positions)
    outcome = run_chunk(
        fn, items, star=star, stop_on_error=stop_on_error, pickle_errors=True, status=status, track=track
    )
    return key, encode_outcome(outcome, positions)


# -- the parent side -------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Flight:
    chunk: Chunk
    done: Done
    slot: int
    sent_at: float
    task: tuple[Any, ...]
    by_value: bool = False  # the task carried its function by value
    timed_out_offset: int | None = None
    submitted: bool = False  # a submit()'s: it began when handed over (see _launch_waiting)


class MPPoolBackend(Backend):
    """Runs chunks on a ``multiprocessing.Pool``; subclasses say how tasks go in."""

    capabilities = Capabilities(isolated=True, can_timeout=True)
    queues_chunks = True

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str | None = None,
    ) -> None:
        take_standard_descriptors()  # before any pipe of ours can land on them
        self.workers = workers
        self.start_method = start_method or default_start_method()
        self._ctx = multiprocessing.get_context(self.start_method)
        self._init = pickle_initializer(initializer, initargs)
        self._slots = 4 * workers + 16
        self._status: Any = None
        self._free_slots: deque[int] = deque(range(self._slots))
        self._waiting: deque[tuple[Chunk, Done, bytes]] = deque()
        self._dropped: list[tuple[Chunk, Done]] = []  # refused by Chunk.begins, to report
        self._startup_failures = 0  # workers dead before running anything, in a row
        self._flights: dict[int, _Flight] = {}
        self._next_key = 0
        self._lock = threading.RLock()
        self._pool: Any = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._monitor: threading.Thread | None = None
        self._no_tmpdir = False  # none could be made: big functions go inline (see _fn_ref)
        self._busy_at_kill: list[int] = []  # the workers running chunks when close(kill=True) came
        self._abandoned_busy: list[int] = []  # workers running chunks of calls released early
        self._wake_pipe = WakePipe()
        self._closing = False
        self._terminated = False  # close(kill=True) came
        self._replacing = False  # the pool is being swapped: hold tasks back
        self._dormant = False  # no pool until work comes (see _go_dormant)
        self._replace_requested = False
        self._one_call = False  # see serve_one_call
        self._fn_files: dict[int, str] = {}
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    # -- subclass hooks -----------------------------------------------
    @abc.abstractmethod
    def _start_feeding(self, pool: Any) -> None:
        """Called once the pool exists (on the monitor thread)."""

    @abc.abstractmethod
    def _feed(self, task: tuple[Any, ...]) -> None:
        """Hand one task to the pool."""

    @abc.abstractmethod
    def _stop_feeding(self) -> None:
        """No more tasks will come."""

    # -- Backend interface ----------------------------------------------
    def submit(self, chunk: Chunk, done: Done) -> None:
        fn_bytes = chunk.call.local_fn_bytes
        items = chunk.items_bytes()
        if self._closing:  # before starting anything: a closed backend starts no pool
            raise closed_error(self._terminated)
        self._ensure_started()
        with self._lock:
            if self._closing:
                raise closed_error(self._terminated)
            self._fn_ref(chunk.call, fn_bytes)
            self._waiting.append((chunk, done, items))
            self._launch_waiting()
            if self._dormant:
                self._wake_pipe.wake()  # the monitor thread starts a pool for it

    def release(self, call: Call) -> None:
        with self._lock:
            self._waiting = deque(w for w in self._waiting if w[0].call is not call)
            path = self._fn_files.pop(call.id, None)
            if not self._one_call:
                # Chunks of a call that ended early (an imap closed, a call that
                # raised) still run or wait in the pool's queue, ahead of the
                # next call's: a fresh pool drops them (see _replace_pool).
                left = [key for key, flight in self._flights.items() if flight.chunk.call is call]
                # Their workers' commands go with the pool (see _end_pool).
                self._abandoned_busy += self._busy_workers(left)
                for key in left:
                    self._free_slots.append(self._flights.pop(key).slot)
                if left:
                    self._replace_requested = True
                    # The next call's chunks wait for the fresh pool: sent to
                    # this one, they would be cut off by its end and run again.
                    self._replacing = True
                    self._wake_pipe.wake()
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def serve_one_call(self) -> None:
        """The call's end ends the pool: nothing to clear out on release."""
        self._one_call = True

    def close(self, kill: bool = False) -> None:
        with self._lock:
            already = self._closing
            self._closing = True  # a polite close still runs what was submitted
            self._terminated = self._terminated or kill  # with _closing: see closed_error
        monitor = self._monitor
        if monitor is None:
            self._wake_pipe.close()
            return
        if not already or kill:
            self._kill_on_close = kill
            self._wake_pipe.wake()
        if monitor is not threading.current_thread():
            if may_wait_for_another_backend():
                join_thread(monitor)
            else:
                leave_to_finish(monitor)

    # -- internals ---------------------------------------------------------
    def _fn_ref(self, call: Call, fn_bytes: bytes) -> bytes | str:
        if len(fn_bytes) <= INLINE_FUNCTION_BYTES:
            return fn_bytes
        path = self._fn_files.get(call.id)
        if path is None and not self._no_tmpdir:
            try:
                if self._tmpdir is None:
                    self._tmpdir = tempfile.TemporaryDirectory(prefix="parmap-")
                path = os.path.join(self._tmpdir.name, f"fn-{call.id}.pkl")
                with open(path, "wb") as f:
                    f.write(fn_bytes)
            except OSError:
                # No writable temporary directory (a read-only system, TMPDIR
                # gone): inline then, slower but the same results.
                self._no_tmpdir = True
                return fn_bytes
            self._fn_files[call.id] = path
        return fn_bytes if path is None else path

    def _launch_waiting(self) -> None:
        while self._waiting and self._free_slots and not self._replacing:
            submitted = self._waiting[0][0].begin is not None
            if submitted and sum(f.submitted for f in self._flights.values()) >= 2 * self.workers:
                # A submit() future runs from here on: held back beyond one
                # running and one queued per worker, as on the process
                # backend, it can still be cancelled.
                break
            chunk, done, items = self._waiting.popleft()
            if not chunk.begins():
                # Reported by the monitor thread: done() may call back in, and this holds the lock.
                self._dropped.append((chunk, done))
                self._wake_pipe.wake()
                continue
            slot = self._free_slots.popleft()
            base = slot * SLOT_WIDTH
            self._status[base] = 0.0
            self._status[base + 1] = -1.0
            key = self._next_key
            self._next_key += 1
            call = chunk.call
            fn_ref = self._fn_files.get(call.id) or call.local_fn_bytes
            task = (key, slot, call.id, fn_ref, chunk.header(), items)
            flight = _Flight(chunk, done, slot, time.monotonic(), task, call.fn_by_value, submitted=submitted)
            self._flights[key] = flight
            self._feed(task)
        if self._flights:
            self._wake_pipe.wake()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._monitor is None:
                self._status = self._ctx.RawArray("d", self._slots * SLOT_WIDTH)
                self._kill_on_close = False
                self._monitor = threading.Thread(target=self._monitor_loop, name="parmap-pool-monitor", daemon=True)
                drives_workers(self._monitor)  # before it starts: a collection may run as it does
                self._monitor.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def _on_result(self, result: tuple[int, bytes]) -> None:
        key, data = result
        with self._lock:
            self._startup_failures = 0  # the workers can run things
            flight = self._flights.pop(key, None)
            if flight is None:
                return  # already reported lost
            self._free_slots.append(flight.slot)
            self._launch_waiting()
        outcome = decode_chunk_outcome(flight.chunk, data)
        if outcome.fn_unreadable and not flight.by_value:
            # By reference it did not load (a function of __main__ defined
            # after the pool started): once more by value, free of charge.
            flight.chunk.call.fn_by_value = True
            with self._lock:
                if not self._kill_on_close:  # terminating: report it as it is
                    self._waiting.appendleft((flight.chunk, flight.done, flight.task[5]))
                    self._launch_waiting()
                    return
        flight.done(flight.chunk, outcome)

    def _on_task_error(self, key: int, exc: BaseException) -> None:
        """The pool itself failed a task (run_pool_task does not raise): report it."""
        with self._lock:
            flight = self._flights.pop(key, None)
            if flight is None:
                return
            self._free_slots.append(flight.slot)
            self._launch_waiting()
        info = ErrorInfo.capture(exc, pickle_it=False)
        flight.done(flight.chunk, ChunkOutcome([], fatal=info))

    def _after_shutdown(self) -> None:
        """Called once the pool is gone."""

    def _monitor_loop(self) -> None:
        # The pool is created on this long-lived thread: on Linux a worker's
        # parent-death signal is tied to the thread that started it.
        try:
            self._pool = self._new_pool()
        except BaseException as exc:
            self._start_error = exc
            self._wake_pipe.close()  # nothing else will, and each failed start leaked two descriptors
            self._started.set()
            return
        self._started.set()
        known: dict[int, Any] = {}  # pid -> Process, every pool worker ever seen
        handled: set[int] = set()
        pidfds = _PidFds()
        polite = False  # a graceful close, with every chunk done
        try:
            while True:
                with self._lock:
                    dropped, self._dropped = self._dropped, []
                for chunk, done in dropped:
                    done(chunk, dropped_outcome())
                with self._lock:
                    if self._closing and self._kill_on_close:
                        self._busy_at_kill = self._busy_workers() + self._abandoned_busy
                        self._fail_all()
                        break
                    if self._closing and not self._flights and not self._waiting and not self._dropped:
                        polite = True
                        break
                    busy = bool(self._flights)
                    revive = self._dormant and bool(self._waiting)
                if revive:
                    self._revive()
                if self._dormant:
                    if self._wake_pipe.r in wait([self._wake_pipe.r]):
                        self._wake_pipe.drain()
                    continue
                current = list(self._pool._pool)
                self._note_started(known, pidfds)
                sentinels = {pidfds.sentinel(p): p for pid, p in known.items() if pid not in handled}
                timeout = self._next_deadline()
                if busy:
                    timeout = RESCAN_SECONDS if timeout is None else min(timeout, RESCAN_SECONDS)
                ready = wait([self._wake_pipe.r, *sentinels], timeout)
                if self._wake_pipe.r in ready:
                    self._wake_pipe.drain()
                deaths = len(handled)
                for obj in ready:
                    if obj != self._wake_pipe.r:
                        process = sentinels[obj]
                        handled.add(process.pid)
                        pidfds.forget(process.pid)
                        self._worker_died(process.pid, _exitcode(process))
                # A worker the pool started (and that died) since the look above.
                self._note_started(known, pidfds)
                self._find_unwatched_deaths({p.pid for p in current}, known, handled)
                with self._lock:
                    requested, self._replace_requested = self._replace_requested, False
                if len(handled) > deaths or requested:
                    with self._lock:
                        idle = not self._flights and not self._waiting
                    if idle and len(handled) > deaths:
                        self._go_dormant()
                    else:
                        self._replace_pool(known, handled)
                    known, handled = {}, set()
                    pidfds.forget_all()
                self._enforce_timeouts()
        except BaseException as exc:
            # The pool cannot be run any more (a replacement failed to start):
            # what waits on it must hear so.
            error = PoolClosedError(f"the multiprocessing pool could not be kept running: {exc!r}")
            error.__cause__ = exc
            with self._lock:
                self._closing = True
                self._fail_all(ChunkOutcome.failed(error))
        finally:
            pidfds.forget_all()
            self._shutdown_pool(polite)

    def _note_started(self, known: dict[int, Any], pidfds: _PidFds | None = None) -> None:
        """Every worker the pool started since the last look, from its own
        record rather than its list: one that started and died in between
        would be reaped by the pool with its exit code unseen (watched
        through ``pidfds`` when given)."""
        started = self._pool.started
        for _ in range(len(started)):
            process = started.popleft()
            if process.pid is None:
                started.append(process)  # not started yet: next time
            else:
                known.setdefault(process.pid, process)
                if pidfds is not None:
                    pidfds.watch(process)

    def _new_pool(self) -> Any:
        pool: Any = _RecordingPool(
            self.workers, initializer=_pool_worker_init, initargs=(self._status, self._init), context=self._ctx
        )
        # The cycle collector may run on these too: an imap of this pool
        # that it ends there must not wait for terminate(), which waits for
        # them (a deadlock that stopped all collection in the program).
        drives_workers(pool._worker_handler, pool._task_handler, pool._result_handler)
        self._start_feeding(pool)
        return pool

    def _replace_pool(self, known: dict[int, Any] | None = None, handled: set[int] | None = None) -> None:
        """Swap the pool for a fresh one after any of its workers died.

        A ``multiprocessing.Pool`` shares one task queue and one result queue
        among its workers, each behind a lock: an idle worker holds the task
        queue's while it waits, a worker sending a result holds the other's.
        Killed then, it leaves that lock held for ever, and the pool hands out
        or brings back nothing more, however many replacements it starts. No
        outside look can tell such a death from a harmless one, so every
        death costs the pool: the chunks the other workers were running go
        to the new one, free of charge (their results may already be lost
        in the old pool's queues), unless their own worker died of itself
        meanwhile (two crashes at once): that chunk is lost, as the first.
        """
        with self._lock:
            orphans = [flight for _, flight in sorted(self._flights.items())]
            busy = self._busy_workers() + self._abandoned_busy
            self._abandoned_busy = []
            self._flights.clear()
            self._free_slots = deque(range(self._slots))
            self._replacing = True
        lost: list[tuple[_Flight, ChunkLost]] = []
        try:
            forced = self._end_pool(self._pool, busy)
            # terminate() sends SIGTERM (a worker it finds idle exits 0);
            # SIGKILL only where it had to force.
            ours = {0, -signal.SIGTERM, -signal.SIGKILL} if forced else {0, -signal.SIGTERM}
            # And the workers the old pool started since the last look: one
            # may have taken a chunk and died of it meanwhile.
            known = dict(known or {})
            self._note_started(known)
            innocent = []
            # As in _worker_died: of the chunks naming one worker, only the
            # latest claimed can have died with it; the others finished, and
            # their results were lost in the old pool's queue.
            latest: dict[int, _Flight] = {}
            for flight in orphans:
                pid = int(self._status[flight.slot * SLOT_WIDTH])
                other = latest.get(pid)
                if other is None or self._claimed_at(flight) > self._claimed_at(other):
                    latest[pid] = flight
            for flight in orphans:
                if latest[int(self._status[flight.slot * SLOT_WIDTH])] is not flight:
                    innocent.append(flight)
                    continue
                death = self._own_death(flight, known, handled or set(), ours)
                if death is None:
                    innocent.append(flight)
                else:
                    lost.append((flight, death))
            with self._lock:
                self._waiting.extendleft((f.chunk, f.done, f.task[5]) for f in reversed(innocent))
            self._pool = self._new_pool()
        finally:
            with self._lock:
                self._replacing = False
                self._launch_waiting()
        for flight, death in lost:
            flight.done(flight.chunk, death)

    def _claimed_at(self, flight: _Flight) -> float:
        """When ``flight``'s chunk reached its worker, or its running item began."""
        return float(self._status[flight.slot * SLOT_WIDTH + 2])

    def _own_death(self, flight: _Flight, known: dict[int, Any], handled: set[int], ours: set[int]) -> ChunkLost | None:
        """How ``flight``'s worker died, if not of the pool's replacement."""
        pid = int(self._status[flight.slot * SLOT_WIDTH])
        process = known.get(pid)
        if process is None or pid in handled:
            return None
        exitcode = process.exitcode
        if flight.timed_out_offset is not None:
            return ChunkLost(exitcode, pid, offset=flight.timed_out_offset, timed_out=True)
        if exitcode is None or exitcode in ours:
            return None
        offset = running_offset(self._status, flight.slot) if flight.chunk.marked else None
        return ChunkLost(exitcode, pid, offset=offset)

    def _go_dormant(self) -> None:
        """A worker died with nothing to do: end the pool until work comes.

        Replaced at once, a worker that cannot start (an initializer that
        calls ``os._exit``) dies again, and ``multiprocessing.Pool`` restarts
        its dead workers by itself: a fork loop for as long as the pool
        idles. The next chunk pays for a fresh pool, as a replacement would.
        """
        with self._lock:
            self._dormant = True
            self._replacing = True  # hold tasks back until there is a pool
        self._end_pool(self._pool, [])  # every worker idle
        self._pool = None

    def _revive(self) -> None:
        self._pool = self._new_pool()
        with self._lock:
            self._dormant = False
            self._replacing = False
            self._free_slots = deque(range(self._slots))
            self._launch_waiting()

    def _fail_all(self, outcome: ChunkOutcome | None = None) -> None:
        """End every chunk still waiting or running (under the lock) with
        ``outcome``, by default that of a terminated pool."""
        failed = [(f.chunk, f.done) for f in self._flights.values()]
        failed += [(chunk, done) for chunk, done, _ in self._waiting]
        self._flights.clear()
        self._waiting.clear()
        outcome = outcome or terminated_outcome()
        for chunk, done in failed:
            done(chunk, outcome)

    def _find_unwatched_deaths(self, current: set[int], known: dict[int, Any], handled: set[int]) -> None:
        """Deaths no sentinel told us of: the pool reaped the worker first, or it
        started and died between two looks at the pool's worker list."""
        with self._lock:
            claimed = {int(self._status[f.slot * SLOT_WIDTH]) for f in self._flights.values()}
        for pid in claimed - current - handled - {0}:
            process = known.get(pid)
            if process is not None and process.exitcode is not None:
                handled.add(pid)
                self._worker_died(pid, process.exitcode)
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                # Gone, and perhaps reaped by the pool's own thread this very
                # moment: its exit code is on the way (see _exitcode).
                handled.add(pid)
                self._worker_died(pid, _exitcode(process) if process is not None else None)

    def _worker_died(self, pid: int, exitcode: int | None) -> None:
        """Report the chunk that ``pid`` was running when it died.

        A worker runs one task at a time, so of the chunks that name it only
        the latest claimed can have died with it; the earlier ones finished
        and their results are still on their way through the pool.
        """
        with self._lock:
            # Every death ends this pool (see _replace_pool): a retry that
            # done() submits must wait for the next one. Fed to this one, it
            # would run on the worker the pool starts itself, and again in
            # the next pool, as an orphan: twice for one attempt.
            self._replacing = True
            mine = [
                (self._claimed_at(f), key)
                for key, f in self._flights.items()
                if int(self._status[f.slot * SLOT_WIDTH]) == pid
            ]
            if not mine:
                failed = self._count_startup_failure()
            else:
                _, key = max(mine)
                flight = self._flights.pop(key)
                self._free_slots.append(flight.slot)
                self._launch_waiting()
        if not mine:
            if failed:
                outcome = startup_failed_outcome(exitcode)
                for chunk, done in failed:
                    done(chunk, outcome)
            return
        offset = flight.timed_out_offset
        timed_out = offset is not None
        if offset is None and flight.chunk.marked:
            offset = running_offset(self._status, flight.slot)
        flight.done(flight.chunk, ChunkLost(exitcode, pid, offset=offset, timed_out=timed_out))

    def _count_startup_failure(self) -> list[tuple[Chunk, Done]]:
        """A worker died holding no chunk while work waited (under the lock).

        Dying so several times in a row, with no result in between, means no
        worker can start (an initializer that calls ``os._exit``, say): each
        replacement pool would die alike for ever. The chunks are taken back
        to be failed, as :class:`~parmap.backends._local.LocalWorkers` does.
        """
        if not self._flights and not self._waiting:
            return []
        self._startup_failures += 1
        if self._startup_failures < MAX_STARTUP_FAILURES:
            return []
        self._startup_failures = 0
        failed = [(f.chunk, f.done) for f in self._flights.values()]
        failed += [(chunk, done) for chunk, done, _ in self._waiting]
        self._free_slots.extend(f.slot for f in self._flights.values())
        self._flights.clear()
        self._waiting.clear()
        return failed

    def _next_deadline(self) -> float | None:
        deadline: float | None = None
        now = time.monotonic()
        with self._lock:
            for flight in self._flights.values():
                timeout = flight.chunk.call.timeout
                if timeout is None or flight.timed_out_offset is not None:
                    continue
                base = flight.slot * SLOT_WIDTH
                pid, offset, started = self._status[base], self._status[base + 1], self._status[base + 2]
                if pid == 0 or offset < 0 or started < flight.sent_at:
                    # No item of it runs (queued, or its results are being
                    # sent), so none can be late: look again shortly, as an
                    # item may start at any moment. Due at its sending, this
                    # spun the loop with no wait once that had passed, and
                    # the GIL it held slowed the pool's result thread ~10x.
                    due = now + UNMARKED_POLL_SECONDS
                else:
                    due = started + timeout
                deadline = due if deadline is None else min(deadline, due)
        return None if deadline is None else min(max(0.0, deadline - time.monotonic()), MAX_WAIT_SECONDS)

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        with self._lock:
            for flight in self._flights.values():
                timeout = flight.chunk.call.timeout
                if timeout is None or flight.timed_out_offset is not None:
                    continue
                base = flight.slot * SLOT_WIDTH
                pid, offset, started = int(self._status[base]), int(self._status[base + 1]), self._status[base + 2]
                if pid == 0 or offset < 0 or started < flight.sent_at:
                    continue  # not started yet: a queued task is not running late
                if now - started >= timeout:
                    flight.timed_out_offset = offset
                    kill_trees([pid])

    def _end_pool(self, pool: Any, busy: Sequence[int], *, polite: bool = False) -> bool:
        """Stop feeding ``pool`` and terminate it (see :func:`_terminate`);
        ``polite``: its workers may first exit of themselves (see :meth:`_let_workers_leave`).

        ``busy``: the workers running items, whose commands go with them;
        terminate()'s SIGTERM would leave those to the init process. They
        are frozen first and killed once the workers are gone: a worker
        killed before terminate() wedges the pool's queues if it was
        sending a result, and the pool starts replacements that take more
        work. (The commands of idle workers, started in the background by
        earlier items, are left alone.)
        """
        self._stop_feeding()
        if polite:
            self._let_workers_leave(pool)
        commands = freeze_descendants(busy)
        try:
            forced = _terminate(pool)
            self._after_shutdown()
        finally:
            kill_frozen(commands)  # never left stopped
        # A job a dead worker took never completes, so it stays in the pool's
        # cache, and it holds the pool: a cycle, with the pool's pipes open
        # until the cycle collector runs (~8 descriptors a crashed call).
        pool._cache.clear()
        return forced

    def _let_workers_leave(self, pool: Any) -> None:
        """``close()`` ``pool`` and give its workers, idle by now, :data:`STOP_WAIT_SECONDS`
        to exit of themselves, as ``close(); join()`` would; ``close(kill=True)`` cuts it short.

        A worker that exits runs its process's finalizers, and those write
        out what it put on a ``multiprocessing.Queue`` it shares with the
        caller (a queue hands each object to a feeder thread): the SIGTERM of
        ``terminate()`` lost what the last items put. What is still running
        after the wait, the terminate that follows ends.
        """
        pool.close()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        # Once the pool's cache is empty it tells the workers to stop, and it
        # starts no replacement after that.
        handler = pool._worker_handler
        while handler.is_alive():
            if self._kill_on_close or time.monotonic() >= deadline:
                return
            handler.join(0.05)
        pidfds = _PidFds()
        try:
            workers = list(pool._pool)
            for process in workers:
                pidfds.watch(process)
            pending = [pidfds.sentinel(p) for p in workers if p.exitcode is None]
            wait_for_exits(pending, deadline, self._wake_pipe, lambda: self._kill_on_close)
        finally:
            pidfds.forget_all()

    def _busy_workers(self, keys: Sequence[int] | None = None) -> list[int]:
        """The live workers running chunks, all or those of flights ``keys`` (under the lock)."""
        flights = self._flights.values() if keys is None else [self._flights[key] for key in keys]
        claimed = {int(self._status[f.slot * SLOT_WIDTH]) for f in flights}
        pool = self._pool
        return [] if pool is None else [p.pid for p in list(pool._pool) if p.pid in claimed and p.exitcode is None]

    def _shutdown_pool(self, polite: bool) -> None:
        # Always terminate() in the end, even after a graceful close: a task
        # lost with a dead worker stays in the pool's cache forever, so
        # close(); join() alone could wait forever.
        pool = self._pool
        try:
            if pool is not None:  # None: dormant, already ended
                self._end_pool(pool, self._busy_at_kill, polite=polite)
        finally:
            self._wake_pipe.close()
            if self._tmpdir is not None:
                self._tmpdir.cleanup()


class _PidFds:
    """Pool workers watched through pidfds where the platform has them.

    A ``multiprocessing.Pool`` worker's own sentinel is a pipe, readable
    only once every copy of its write end is closed: a process the worker
    forked itself keeps one, and the worker's death went unseen until that
    process ended (see :func:`~parmap.backends._local.exit_sentinel`).
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def watch(self, process: Any) -> None:
        fd = exit_sentinel(process.pid)
        if fd is None:
            return
        if process.exitcode is not None:
            os.close(fd)  # reaped by the pool already: the pid may be another's by now
            return
        self._fds[process.pid] = fd

    def sentinel(self, process: Any) -> Any:
        return self._fds.get(process.pid, process.sentinel)

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def forget_all(self) -> None:
        for pid in list(self._fds):
            self.forget(pid)


class _RecordingPool(multiprocessing.pool.Pool):
    """A ``multiprocessing.Pool`` that also puts each worker process it makes
    (replacements included) in :attr:`started`, before starting it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Not self.started in make: the pool would hold itself in a cycle, and
        # its pipes would wait for the cycle collector (~8 descriptors a
        # call, "Too many open files" after some hundreds of calls).
        started: deque[Any] = deque()
        self.started = started

        def make(ctx: Any, *process_args: Any, **process_kwargs: Any) -> Any:
            process = ctx.Process(*process_args, **process_kwargs)
            method = ctx.get_start_method()
            # start() makes its Popen through this: the start itself, with
            # Ctrl-C held back (see ctrl_c_held), on whichever thread of the pool.
            popen = _ForkserverPopen if method == "forkserver" else type(process)._Popen
            process._Popen = _StartHeld(popen, method)
            started.append(process)
            return process

        # Pool makes every worker through self.Process(ctx, ...), also on its
        # maintenance thread: an attribute here comes before the staticmethod.
        self.Process = make  # type: ignore[method-assign]
        super().__init__(*args, **kwargs)


class _StartHeld:
    """A Process's ``_Popen``: the start, inside :func:`ctrl_c_held`. (An
    object, not a closure over the process: no cycle through it.)"""

    __slots__ = ("method", "popen")

    def __init__(self, popen: Any, method: str) -> None:
        self.popen, self.method = popen, method

    def __call__(self, process: Any) -> Any:
        with ctrl_c_held(self.method):
            return self.popen(process)


_POLL_LOCK = threading.Lock()


class _ForkserverPopen(multiprocessing.popen_forkserver.Popen):  # type: ignore[misc]
    """A forkserver child whose exit status two threads may ask for at once.

    The status is 4 bytes the forkserver writes to a pipe. Polled from two
    threads (parmap's monitor and the pool's own worker handler), one reads
    it and the other meets end-of-file, which multiprocessing records as exit
    code 255, and that one may be what is kept: ``WorkerCrashedError`` then
    said "exit code 255" for a SIGKILL (~3% of crashes). The read is one at
    a time here; the wait for the pipe, which may be long, is not.
    """

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        if self.returncode is None:
            ready = wait([self.sentinel], 0 if flag == os.WNOHANG else None)
            # Not ready may also mean that another thread is reading the
            # status this moment (the forkserver closes the pipe only after
            # writing it): the lock waits for that read to be recorded.
            with _POLL_LOCK:
                if self.returncode is None and ready:
                    try:
                        self.returncode = multiprocessing.forkserver.read_signed(self.sentinel)
                    except (OSError, EOFError):  # the forkserver itself died
                        self.returncode = 255
        return None if self.returncode is None else int(self.returncode)


def _terminate(pool: Any) -> bool:
    """``pool.terminate(); pool.join()``, proof against the locks of dead workers;
    whether it had to kill workers (SIGKILL) to get there.

    A pool worker holds the task queue's read lock while it waits for a task
    and the result queue's write lock while it sends a result. One killed
    right then (by ``terminate()`` itself, by a ``timeout``, by the OOM
    killer) leaves that lock held for ever, and ``terminate()`` blocks on it
    for ever. So terminate runs on a thread, and while it takes too long the
    workers are killed and reaped, results nobody will read are drained, and
    a lock still held once no worker is alive is released: only a dead
    worker can be holding it.
    """
    finished = threading.Event()

    def run() -> None:
        try:
            pool.terminate()
            pool.join()
        except (OSError, AssertionError):
            # The pool's result thread had ended (_unwedge closes the result
            # pipe under it once every worker is dead): terminate() then
            # stops short, on the jobs left in its cache (AssertionError) or
            # on the closed pipe (OSError). What it had left to do is to stop
            # the workers, which should all be gone; any that is not goes now.
            _kill_workers(list(pool._pool))
        finally:
            finished.set()

    terminating = threading.Thread(target=run, name="parmap-pool-terminate", daemon=True)
    # The monitor waits for it to start; a collection that ends an imap of
    # this pool as it starts must not wait for the monitor.
    drives_workers(terminating)
    terminating.start()
    forced = False
    for _ in range(TERMINATE_ROUNDS):
        if finished.wait(TERMINATE_GRACE_SECONDS):
            return forced
        _unwedge(pool)
        forced = True
    return forced


def _kill_workers(workers: Sequence[Any]) -> None:
    for process in workers:
        if process.exitcode is None:
            process.kill()
    for process in workers:
        process.join(timeout=1.0)


def _unwedge(pool: Any) -> None:
    workers = list(pool._pool)
    _kill_workers(workers)
    if any(process.exitcode is None for process in workers):
        return  # not dead yet: their locks may still be theirs
    if not pool._result_handler.is_alive():
        # Drained so that a sender blocked on a full pipe can finish. As raw
        # bytes: a worker killed while sending left a message cut short, and
        # recv_bytes() would wait for its end for ever (Ctrl-C hung the call).
        reader = pool._outqueue._reader
        while reader.poll():
            try:
                if not os.read(reader.fileno(), 1 << 16):
                    break
            except OSError:
                break
    time.sleep(0.1)  # a thread that was sending lets go of its lock by now
    for lock in (pool._inqueue._rlock, pool._outqueue._wlock):
        if lock.acquire(block=False):
            lock.release()
        else:
            try:
                lock.release()
            except ValueError:  # let go of in the meantime
                pass
    if pool._result_handler.is_alive():
        # It may be reading a message that a worker killed mid-send cut
        # short (terminate() itself kills them so), waiting for its end for
        # ever, and terminate() for it: once the write end is closed here too
        # (every worker is dead), it reads end-of-file and ends.
        try:
            pool._outqueue._writer.close()
        except OSError:
            pass


def _exitcode(process: Any) -> int | None:
    """The exit code of a pool worker whose sentinel fired.

    The pool's own maintenance thread may be reaping the same process at
    that moment (both call waitpid); the loser sees ECHILD until the winner
    records the code, which takes a few microseconds.
    """
    for _ in range(50):
        code = process.exitcode
        if code is not None:
            return int(code)
        time.sleep(0.01)
    return None
