"""The core: one call's items, chunked, through a backend, back in order.

::

      items ──▶ ChunkSizer ──▶ Record (consecutive items) ──▶ backend.submit
     (pulled      (size from        │  kept until every item          │
      lazily)      measurements)    │  is final                       ▼
                                    │                       done(chunk, outcome)
                                    │                       from a backend thread
                                    ▼                                 │
      caller ◀── deliver complete ◀── absorb: values, errors, ◀── events queue
                 records (ordered:         retries, crashes,       (the caller
                 head first)               policy, progress         thread blocks
                                                                    here, never polls)

* **Window.** At most ``2 * workers + 1`` records are outstanding: in flight,
  or finished but not yet handed to an ordered consumer. The input is pulled
  only when a slot frees, so ``imap`` over an endless generator holds a few
  chunks, never the input. ``map`` counts only unfinished records, so one
  slow chunk does not stall the others.
* **Errors.** A failed item is retried alone (``retries``); when its attempts
  are spent the ``on_error`` policy decides: skip, return the exception in
  its place, or raise. Raising is what a serial ``map`` would do: no more
  input is pulled, the items *before* the failure are awaited (never the
  ones after it), and the earliest failed item's error is raised; the call
  is then released and its queued chunks dropped. A worker crash or timeout fails the item that was running; the
  rest of its chunk is resubmitted at no cost to their attempts. Workers
  mark each item as they start it, so the backend can say which was running,
  except on items too cheap for the mark not to show (``Chunk.marked``):
  such a chunk is split into single items so that only the one that crashes
  again is charged. When it cannot even say
  that the chunk had started (``ChunkLost.unsure``: Dask), each item is
  rerun alone, nothing else of the call in flight, and only a loss then is
  charged; a loss the chunk did not cause (``innocent``) is never charged.
* **Progress** counts items as they become final, not chunks, not yields.
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import queue
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ._chunking import MARK_ALWAYS_UP_TO, MARK_MIN_ITEM_SECONDS, MAX_PULL_SECONDS, PULL_BATCH, ChunkSizer
from ._errors import ParmapError, PoolClosedError, SerializationError, TaskError, TaskTimeoutError, WorkerCrashedError
from ._options import CallOptions
from ._progress import Progress
from ._serialization import short_repr
from .backends._base import Backend, Call, Chunk, ChunkLost, ChunkOutcome, SourceSlice, describe_exit

#: Marks an item left out by ``on_error="skip"``.
SKIPPED: Any = object()
_UNSET: Any = object()


class Record:
    """Consecutive input items submitted together, kept until all are final."""

    __slots__ = ("attempts", "by_value", "items", "pending", "raises", "start", "suspects", "values")

    def __init__(self, start: int, items: list[Any] | SourceSlice) -> None:
        self.start = start
        self.items = items
        # Filled item by item only when a chunk comes back in pieces; the
        # common case replaces it whole (_settle_all).
        self.values: list[Any] = []
        self.pending = len(items)
        self.attempts: dict[int, int] = {}
        self.suspects: set[int] = set()  # offsets that were on a worker when it died
        self.by_value = False  # its items did not load in a worker: send them by value
        self.raises = False  # holds an error to raise, not a value to hand over

    @property
    def complete(self) -> bool:
        return self.pending == 0


def input_length(items: Iterable[Any]) -> int | None:
    """``len(items)``, else a positive ``length_hint``, else unknown.

    Only a hint: ``map()`` never asks for a length, so a ``__len__`` that
    raises, or a range past ``sys.maxsize``, leaves it unknown, not failed.
    """
    try:
        return len(items)  # type: ignore[arg-type]
    except Exception:  # noqa: S110 - the hint below, or unknown
        pass
    try:
        hint = operator.length_hint(items, 0)
    except Exception:
        return None
    return hint if hint > 0 else None


class Scheduler:
    """Runs one call. Iterate :meth:`records` to drive it."""

    def __init__(
        self,
        backend: Backend,
        call: Call,
        items: Iterable[Any],
        options: CallOptions,
        *,
        deliver_in_order: bool,
    ) -> None:
        self._backend = backend
        self._pid = os.getpid()
        # Thread and serial pickle nothing, so the byte caps on chunks (and
        # so imap's memory) go by the items' size in memory instead.
        self._in_memory = not backend.capabilities.isolated
        self._call = call
        self._options = options
        self._total = input_length(items)
        try:
            # Once: an iterable may run a query, or open a file, each time.
            self._source = iter(items)
        except TypeError:
            raise TypeError(f"items must be iterable, got {type(items).__name__}: {short_repr(items)}") from None
        self._next_position = 0
        self._exhausted = False
        self._in_order = deliver_in_order
        # An empty list asks nothing of the backend: a Dask one would connect to count its workers.
        workers = 1 if self._total == 0 else backend.workers
        self._window = 2 * workers + 1
        self._sizer = ChunkSizer(options.chunksize, workers, self._total, most=backend.max_items_per_worker)
        self._events: queue.SimpleQueue[tuple[Chunk, ChunkOutcome | ChunkLost]] = queue.SimpleQueue()
        self._outstanding: deque[Record] = deque()  # in creation (= input) order
        self._unfinished = 0
        self._ready: deque[Record] = deque()  # finished, for out-of-order delivery
        self._retries: deque[tuple[Record, list[int]]] = deque()
        # Items lost with a worker without proof that they killed it: each
        # runs alone, nothing else of the call in flight, so that a second
        # loss is proof (see _lost).
        self._suspects: deque[tuple[Record, int]] = deque()
        self._alone = False  # a suspect is running
        self._in_flight = 0  # chunks submitted, outcome not yet absorbed
        self._progress_done = 0
        self._settled = 0  # items final so far
        self._taken = 0  # items in records handed to the consumer
        self._failure: tuple[int, BaseException] | None = None  # earliest, for on_error="raise"
        self._prefix_delivered = False  # the values before the failure in its record (see _raise_if_due)
        self._slow_input = False  # the last pull was cut short by MAX_PULL_SECONDS
        # Nothing tells a slow unsized input (an iterator, a file, a pipe) from
        # a fast one before its first pull has waited, and that pull may be the
        # one that waits long (a line, then silence): the first result gets its
        # moment first, once (see _fill).
        self._await_first = self._total is None
        self._pull_batch = PULL_BATCH.get()  # see _pull
        self._early: tuple[Chunk, ChunkOutcome | ChunkLost] | None = None  # an event taken while filling

    # -- driving -------------------------------------------------------------
    def records(self) -> Iterator[Record]:
        """Finished records, in input order or as they finish."""
        progress = Progress(self._options.progress, self._total)
        try:
            while True:
                if os.getpid() != self._pid:
                    # An imap carried on in a child that os.fork() made: the
                    # workers answer the parent, and a lock a parent thread
                    # held at the fork is held for ever here.
                    raise PoolClosedError(
                        f"this call was started in process {self._pid}, and this is a child forked from it, "
                        "which cannot reach its workers: start the call in this process"
                    )
                self._fill()
                # An item can settle while filling: one that would not pickle fails here.
                progress.update(self._take_progress())
                delivered = False
                for record in self._deliverable():
                    delivered = True
                    self._taken += len(record.items)
                    yield record
                if delivered:
                    continue  # delivering freed window slots: fill them before blocking
                prefix = self._raise_if_due()
                if prefix is not None:
                    yield prefix
                    continue
                if self._exhausted and not self._outstanding and not self._retries and not self._suspects:
                    return
                chunk, result = self._early or self._events.get()
                self._early = None
                self._absorb(chunk, result)
                progress.update(self._take_progress())
        finally:
            progress.close()
            if os.getpid() == self._pid:  # a forked child's copy ends with nothing to release
                self._backend.release(self._call)

    def _take_progress(self) -> int:
        done, self._progress_done = self._progress_done, 0
        return done

    def _fill(self) -> None:
        if self._failure is not None:
            # Only what comes before the failure still matters.
            limit = self._failure[0]
            self._retries = deque(
                (record, kept)
                for record, offsets in self._retries
                if (kept := [o for o in offsets if record.start + o < limit])
            )
            self._suspects = deque((r, o) for r, o in self._suspects if r.start + o < limit)
        if self._suspects or self._alone:
            if not self._alone and self._in_flight == 0:
                record, offset = self._suspects.popleft()
                self._alone = True
                self._submit(record, [offset], alone=True)
            return  # nothing else goes out until the suspects have run alone
        while self._retries:
            record, offsets = self._retries.popleft()
            self._submit(record, offsets)
        while self._failure is None and not self._exhausted and self._window_has_room():
            if not self._events.empty() or self._has_deliverable():
                break  # deliver what finished before waiting on a slow input for more
            if (self._slow_input or self._await_first) and self._in_flight and self._early is None:
                # A slow input may keep the next pull waiting long: give what is
                # in flight a moment to finish first, so its result goes out now.
                self._await_first = False
                try:
                    self._early = self._events.get(timeout=MAX_PULL_SECONDS)
                    break
                except queue.Empty:
                    pass
            new = self._next_record()
            if new is None:
                break
            self._outstanding.append(new)
            self._unfinished += 1
            self._submit(new, None)

    def _has_deliverable(self) -> bool:
        return bool(self._outstanding[0].complete) if self._in_order and self._outstanding else bool(self._ready)

    def _window_has_room(self) -> bool:
        used = len(self._outstanding) if self._in_order else self._unfinished
        return used < self._window

    def _next_record(self) -> Record | None:
        remaining = None
        if self._total is not None and self._next_position < self._total:
            remaining = self._total - self._next_position
        # else unknown: past a __len__ that said too little, chunks of one would crawl
        size = self._sizer.next_size(remaining, self._taken)
        items: list[Any] | SourceSlice
        source = self._call.source
        if source is not None and remaining is not None:
            take = min(size, remaining)
            items = SourceSlice(source, self._next_position, self._next_position + take)
            self._exhausted = take == remaining
        else:
            items = self._pull(size)
        if not items:
            self._exhausted = True
            return None
        record = Record(self._next_position, items)
        self._next_position += len(items)
        return record

    def _pull(self, size: int) -> list[Any]:
        """Up to ``size`` items from the input, fewer once pulling them has
        taken :data:`~parmap._chunking.MAX_PULL_SECONDS`: from a slow input
        (a pipe fed as events happen) what has come goes to work at once
        instead of waiting for a chunk's worth. Pulled in doubling batches,
        so a fast input pays a clock read per batch, not per item, up to
        :data:`~parmap._chunking.MAX_PULL_BATCH` items (or what the context's
        :data:`~parmap._chunking.PULL_BATCH` says)."""
        began = time.monotonic()
        items: list[Any] = []
        batch = 1
        while len(items) < size:
            want = min(batch, size - len(items))
            had = len(items)
            try:
                items.extend(itertools.islice(self._source, want))
            except Exception as exc:
                # As a serial map would: the results of the items before it
                # first (list.extend keeps what came), then the input's error.
                self._exhausted = True
                self._input_failed(self._next_position + len(items), exc)
                break
            if len(items) - had < want:
                self._exhausted = True
                break
            if time.monotonic() - began >= MAX_PULL_SECONDS:
                self._slow_input = True
                return items
            batch = min(batch * 2, self._pull_batch)
        self._slow_input = False
        return items

    def _input_failed(self, position: int, exc: Exception) -> None:
        """Iterating the input raised at ``position``: raised in its place,
        whatever ``on_error`` says (it is no item's failure)."""
        if self._failure is None or position < self._failure[0]:
            self._failure = (position, exc)

    def _submit(self, record: Record, offsets: list[int] | None, *, alone: bool = False) -> None:
        if offsets is None:
            positions: Any = range(record.start, record.start + len(record.items))
            items = record.items
        else:
            positions = [record.start + o for o in offsets]
            items = [record.items[o] for o in offsets]
        cost = self._sizer.item_seconds
        # Items cheap enough for a shared-memory write to show (W1's x*x), in
        # chunks big enough for it to add up, go unmarked; a crash among them
        # costs reruns instead (see _lost).
        marked = len(items) > 1 and (cost is None or cost >= MARK_MIN_ITEM_SECONDS or len(items) <= MARK_ALWAYS_UP_TO)
        chunk = Chunk(
            self._call,
            positions,
            items,
            tag=(record, offsets, alone),
            by_value=record.by_value,
            marked=marked,
            expected_seconds=math.inf if cost is None else cost * len(items),
        )
        self._in_flight += 1
        try:
            self._backend.submit(chunk, self._on_done)
            if chunk.nbytes:
                self._sizer.observe_bytes(len(items), chunk.nbytes)
            elif self._in_memory and isinstance(items, list):
                self._sizer.observe_bytes(len(items), in_memory_bytes(items))
        except SerializationError as exc:
            self._in_flight -= 1
            self._alone = self._alone and not alone
            position = getattr(exc, "position", None)
            if position is None:
                raise  # the function itself: nothing can run
            offset = position - record.start
            all_offsets = list(range(len(record.items))) if offsets is None else offsets
            self._item_failed(record, offset, exc, retryable=False)
            rest = [o for o in all_offsets if o != offset]
            if rest:
                self._submit(record, rest)

    def _on_done(self, chunk: Chunk, result: ChunkOutcome | ChunkLost) -> None:
        # Called from backend threads: hand over to the caller's thread.
        self._events.put((chunk, result))

    def _deliverable(self) -> Iterator[Record]:
        limit = self._failure[0] if self._failure is not None else None
        if self._in_order:
            while self._outstanding and self._outstanding[0].complete:
                head = self._outstanding[0]
                if limit is not None and head.start + len(head.items) > limit:
                    return  # holds the failure: raise, do not deliver
                yield self._outstanding.popleft()
        else:
            while self._ready:
                record = self._ready.popleft()
                if record.raises or (limit is not None and record.start >= limit):
                    # Its error is no value to yield: the earliest is raised,
                    # and one after it is not reached, as in a serial loop;
                    # nor are the values after a failure known by now.
                    continue
                self._outstanding.remove(record)
                yield record

    def _raise_if_due(self) -> Record | None:
        """Raise the recorded failure once every item before it has settled;
        first, once, return the values before it in its own record, for the
        consumer to take, as a serial map yields them before it raises."""
        if self._failure is None:
            return None
        limit, exc = self._failure
        holder = None
        for record in self._outstanding:  # in input order
            if record.start >= limit:
                break
            before = record.values[: limit - record.start]
            if record.pending and (not before or any(v is _UNSET for v in before)):
                return None
            if limit < record.start + len(record.items):
                holder = record
        if holder is not None and not self._prefix_delivered:
            self._prefix_delivered = True
            values = holder.values[: limit - holder.start]
            prefix = Record(holder.start, values)
            prefix.values, prefix.pending = values, 0
            return prefix
        raise exc

    # -- absorbing results --------------------------------------------------------
    def _absorb(self, chunk: Chunk, result: ChunkOutcome | ChunkLost) -> None:
        record, offsets, alone = chunk.tag
        self._in_flight -= 1
        if alone:
            self._alone = False
        if isinstance(result, ChunkOutcome) and result.fatal is None:
            self._sizer.observe(len(result.results), result.elapsed)
            nbytes = in_memory_bytes(result.results) if self._in_memory else result.nbytes
            self._sizer.observe_result_bytes(len(result.results), nbytes)
            left = None if self._total is None else max(0, self._total - self._settled - len(result.results))
            self._call.backlog = self._sizer.backlog(left)
            if offsets is None and not result.errors and len(result.results) == len(record.items):
                self._settle_all(record, result.results)  # the common case: one step, not one per item
                return
        offsets = list(range(len(chunk.items))) if offsets is None else offsets
        if isinstance(result, ChunkOutcome) and result.unreadable and not chunk.by_value:
            # Free of charge: most likely a class the worker's __main__ lacks.
            record.by_value = True
            self._retries.append((record, offsets))
            return
        if isinstance(result, ChunkLost):
            self._lost(record, offsets, result, alone=alone)
            return
        if result.split:  # free of charge: which item would not load is unknown
            self._retries.extend((record, [o]) for o in offsets)
            return
        if result.fatal is not None:
            raise result.fatal.rebuild()
        errors = result.errors
        for j, value in enumerate(result.results):
            if j in errors:
                info = errors[j]
                self._item_failed(record, offsets[j], info.rebuild(), retryable=True, by_fn=not info.by_parmap)
            else:
                self._settle(record, offsets[j], value)
        if len(result.results) < len(offsets):  # stopped early; not expected to remain
            self._retries.append((record, offsets[len(result.results) :]))

    def _lost(self, record: Record, offsets: list[int], lost: ChunkLost, *, alone: bool) -> None:
        if lost.innocent:
            if alone:
                self._suspects.appendleft((record, offsets[0]))
            else:
                self._retries.append((record, offsets))
            return
        if lost.unsure and not alone:
            # It may only have been waiting behind the item that killed the
            # worker: run each item alone before anything is blamed.
            for offset in offsets:
                record.suspects.add(offset)
                self._suspects.append((record, offset))
            return
        if lost.offset is None and len(offsets) > 1:
            # Which item killed the worker is unknown: rerun them one by one,
            # free of charge, so only the guilty item pays an attempt.
            self._retries.extend((record, [o]) for o in offsets)
            return
        j = lost.offset or 0
        offset = offsets[j]
        self._item_failed(record, offset, self._lost_error(record, offset, lost), retryable=True)
        rest = offsets[:j] + offsets[j + 1 :]
        if rest:
            self._retries.append((record, rest))

    def _lost_error(self, record: Record, offset: int, lost: ChunkLost) -> ParmapError:
        item = f"item #{record.start + offset} ({short_repr(record.items[offset])})"
        return lost_error(self._call, item, lost)

    def _settle_all(self, record: Record, values: list[Any]) -> None:
        record.values = values
        self._progress_done += record.pending
        self._settled += record.pending
        record.pending = 0
        self._record_done(record)

    def _record_done(self, record: Record) -> None:
        self._unfinished -= 1
        if not self._in_order:
            self._ready.append(record)

    def _settle(self, record: Record, offset: int, value: Any) -> None:
        if not record.values:
            record.values = [_UNSET] * len(record.items)
        if record.values[offset] is _UNSET:
            record.values[offset] = value
            record.pending -= 1
            self._progress_done += 1
            self._settled += 1
            if record.pending == 0:
                self._record_done(record)

    def _note(self, exc: BaseException, text: str) -> None:
        """Name the failed item on ``exc``. On the thread and serial backends
        it is fn's own object, which fn may raise again for another item or
        call (a stored error, a failed future's): the note put there for the
        earlier one goes, so that it names one item, the right one."""
        notes = getattr(exc, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [note for note in notes if not isinstance(note, _ItemNote)]
        exc.add_note(_ItemNote(text))

    def _name_item(self, exc: BaseException, record: Record, offset: int, attempts: int, *, by_fn: bool) -> None:
        """Say on ``exc`` which item failed: its position, for a parmap error
        of its own, and otherwise a note."""
        position = record.start + offset
        if isinstance(exc, ParmapError) and (by_fn or exc.position is None):
            # One fn raised (a map nested in fn failed) is, to this caller,
            # about this item: the position inside fn's own call means nothing here.
            exc.position = position
        if by_fn or not isinstance(exc, ParmapError) or isinstance(exc, TaskError):
            tries = f" on each of {attempts} attempts" if attempts > 1 else ""
            self._note(exc, f"parmap: raised by item #{position} ({short_repr(record.items[offset])}){tries}")
        elif attempts > 1:  # a crash or a timeout: the message names the item already
            exc.add_note(f"parmap: the same on each of {attempts} attempts")

    def _item_failed(
        self, record: Record, offset: int, exc: BaseException, *, retryable: bool, by_fn: bool = False
    ) -> None:
        """Count a failure of the item at ``offset``: ``exc`` is fn's own
        exception (``by_fn``), or parmap's word about the item (a crash, a
        timeout, it or its result would not serialise)."""
        attempts = record.attempts.get(offset, 0) + 1
        record.attempts[offset] = attempts
        # SystemExit, KeyboardInterrupt, ...: fn asked to stop, and a serial
        # map would stop there; neither retried nor skipped nor returned.
        stops = not isinstance(exc, Exception)
        if retryable and not stops and attempts <= self._options.retries:
            if offset in record.suspects:
                self._suspects.append((record, offset))
            else:
                self._retries.append((record, [offset]))
            return
        policy = "raise" if stops else self._options.on_error
        position = record.start + offset
        # An earlier item's error is the one raised: this one is never seen,
        # and on thread and serial it may be that very object (fn raised a
        # stored error again), which must go on naming the earlier item.
        if not (policy == "raise" and self._failure is not None and self._failure[0] < position):
            self._name_item(exc, record, offset, attempts, by_fn=by_fn)
        if policy == "raise":
            record.raises = True
            if self._failure is None or position < self._failure[0]:
                self._failure = (position, exc)
        self._settle(record, offset, SKIPPED if policy == "skip" else exc)


def in_memory_bytes(values: Sequence[Any]) -> int:
    """About how many bytes ``values`` take, from the shallow size of a few
    (exact for ``bytes`` and strings, the common big items)."""
    sample = values[:8]
    if not sample:
        return 0
    try:
        size = sum(sys.getsizeof(value) for value in sample)
    except Exception:  # a __sizeof__ of the user's that fails: no estimate
        return 0
    return size * len(values) // len(sample)


class _ItemNote(str):
    """The note naming a failed item; pickled, a plain ``str``, so that the
    caller of a call nested in a worker process keeps both notes."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))


def lost_error(call: Call, what: str, lost: ChunkLost) -> ParmapError:
    """The error for ``what`` (an item, a submitted call) whose worker was lost."""
    pid = f" (pid {lost.pid})" if lost.pid else ""
    if lost.timed_out:
        return TaskTimeoutError(
            f"{what} ran longer than timeout={call.timeout:g}s; its worker{pid} was stopped and replaced"
        )
    cause = lost.detail or describe_exit(lost.exitcode)
    return WorkerCrashedError(f"the worker{pid} running {what} died: {cause}", lost.exitcode)
