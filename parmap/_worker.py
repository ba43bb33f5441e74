"""What runs on the far side: one chunk at a time, and the worker loop.

:func:`run_chunk` is shared by every backend (threads and the serial backend
call it directly). :func:`worker_main` is the loop of the ``process`` and
``fork`` backends' worker processes; the ``pool`` and ``apply_async``
backends run :func:`~parmap.backends._mppool.run_pool_task`, and the ``dask``
and executor backends :func:`~parmap.backends.executor.run_remote_chunk`.

Wire format between the parent and a ``worker_main`` loop (a duplex
``Connection``: control messages by ``send_bytes``/``recv_bytes``, the
payloads that can be large framed by :mod:`parmap._wire`)::

    parent -> worker   ("fn", call_id, fn_bytes)          once per worker per call,
                                                          unless forked with it
                       ("chunk", call_id, positions, stop_on_error, track, star,
                        from_source)
                       + the pickled items, framed, unless from_source: the
                       worker then reads them from its own copy of the input
                       ("forget", call_id)                 a call ended
                       None                                exit
    worker -> parent   the pickled outcome, framed         one per chunk, in order

A worker runs one chunk at a time. The parent sends a busy worker at most one
more chunk, and only one that the socket's buffer takes whole while the
worker reads nothing (``_wire.send_room``): the worker reads it only after
writing its current outcome, so neither side can block writing while the
other is writing too (the pipe deadlock of a pipelined design).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

from . import _context
from ._errors import SerializationError
from ._serialization import (
    ErrorInfo,
    InitializerGlobals,
    InitializerPayload,
    InitializerWatch,
    Pickled,
    dump_data,
    find_unpicklable,
    loads,
    plain_text,
    refused_items,
    share_globals,
)
from ._wire import recv_framed, send_framed

# Status slots let the parent see which item a worker is running and since
# when (for timeouts) without any message per item: four doubles per slot in
# shared memory: [pid, offset of the running item, its start (time.monotonic),
# chunks received (so a worker that died before reading its chunk is not
# blamed for it)].
SLOT_WIDTH = 4
#: A chunk's ``track``: what the worker marks in its slot per item.
TRACK_NONE, TRACK_OFFSETS, TRACK_TIMES = 0, 1, 2


@dataclass(slots=True)
class ChunkOutcome:
    """How one chunk ended on the worker.

    ``results[i]`` is the value of offset ``i`` unless ``i`` is in
    ``errors``. ``len(results)`` may be short of the chunk when the worker
    stopped at the first error (``stop_on_error``). ``fatal`` is an error
    that concerns the whole call (the function or initializer failed to
    load), not one item.
    """

    results: list[Any]
    errors: dict[int, ErrorInfo] = field(default_factory=dict)
    elapsed: float = 0.0
    fatal: ErrorInfo | None = None
    #: The items could not all be unpickled here, and which one failed is
    #: unknown: run them again one at a time (see :func:`unreadable_outcome`).
    split: bool = False
    #: The items did not load in the worker (``split``, or the one item's
    #: error): the scheduler sends them again by value once before blaming
    #: them (a class the worker's ``__main__`` lacks).
    unreadable: bool = False
    #: The function did not load in the worker (``fatal`` says why): a
    #: backend sends it again by value once (a function the worker's
    #: ``__main__`` lacks, defined after the worker started).
    fn_unreadable: bool = False
    #: How many bytes it came back as from a worker process (0: it never was pickled).
    nbytes: int = 0

    @classmethod
    def failed(cls, exc: BaseException, *, pickle_it: bool = False) -> ChunkOutcome:
        """The outcome of a chunk that ``exc`` stopped as a whole (``pickle_it``:
        it must travel back from a worker process)."""
        return cls([], fatal=ErrorInfo.capture(exc, pickle_it=pickle_it))


def running_offset(array: Any, index: int) -> int | None:
    """The parent's read of slot ``index``: the offset of the item its worker
    marked as running (see ``StatusSlot.marking``), or None between items."""
    offset = int(array[index * SLOT_WIDTH + 1])
    return offset if offset >= 0 else None


class StatusSlot:
    """The worker's view of its shared status slot."""

    __slots__ = ("_array", "_base")

    def __init__(self, array: Any, index: int) -> None:
        self._array = array
        self._base = index * SLOT_WIDTH

    def claim(self) -> None:
        # The claim time orders a worker's chunks: the latest is the one it runs.
        self._array[self._base + 2] = time.monotonic()
        self._array[self._base + 1] = -1.0
        self._array[self._base] = float(os.getpid())

    def received(self) -> None:
        # Also when it began loading the chunk: the user's __setstate__ may
        # run then, and a timeout must still bound it (see _local's timeouts).
        self._array[self._base + 2] = time.monotonic()
        self._array[self._base + 3] = float(int(self._array[self._base + 3]) + 1)

    def loading_function(self) -> None:
        """The function of the next chunk's call arrived: the count of chunks
        read says half a chunk more until the chunk does (see received)."""
        self._array[self._base + 2] = time.monotonic()
        self._array[self._base + 3] = int(self._array[self._base + 3]) + 0.5

    def mark(self, offset: int) -> None:
        self._array[self._base + 2] = time.monotonic()
        self._array[self._base + 1] = float(offset)

    def clear(self) -> None:
        # When the chunk's results began to be pickled (a __getstate__ may hang).
        self._array[self._base + 2] = time.monotonic()
        self._array[self._base + 1] = -1.0

    def marking(self, items: Iterator[Any], *, timed: bool) -> Iterator[Any]:
        """``items``, each marked in the slot as it is taken; ``timed``: with
        its start time too (for ``timeout``), which costs a clock read more."""
        if timed:
            for offset, item in enumerate(items):
                self.mark(offset)
                yield item
            return
        array, slot = self._array, self._base + 1
        for offset, item in enumerate(items):
            array[slot] = offset
            yield item


def run_chunk(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    star: bool,
    stop_on_error: bool,
    pickle_errors: bool,
    status: StatusSlot | None = None,
    track: int = TRACK_NONE,
    refused: dict[int, SerializationError] | None = None,
) -> ChunkOutcome:
    """Apply ``fn`` to each item, recording each failure and carrying on.

    The fast path feeds ``map`` into ``list.extend``, which keeps what it
    appended before an exception, so a failure costs one restart of the
    loop rather than a ``try`` per item. ``track`` says what to mark in
    ``status`` per item (see ``Chunk.marked``): a shared-memory write per
    item, so it is off unless a timeout is watched or the items are slow.
    ``refused``: items that fail with the given error instead of running.
    """
    results: list[Any] = []
    errors: dict[int, ErrorInfo] = {}
    started = time.perf_counter()
    count = len(items) if isinstance(items, Sized) else None
    source = iter(items)
    apply = itertools.starmap if star else map
    if track == TRACK_NONE:
        status = None
    if status is not None:
        source = status.marking(source, timed=track == TRACK_TIMES)
    if refused:
        source = _Refusing(source, refused)
    while True:
        failure: BaseException
        try:
            results.extend(apply(fn, source))
            if count is None or len(results) >= count:
                break
            # A StopIteration from fn looks to map like the end of the items,
            # and list.extend swallows it: the item that raised it is the one
            # after the last result, and the rest follow it in source.
            failure = RuntimeError(
                "the function raised StopIteration, which ends the loop that runs it; "
                "its message and traceback are lost: raise another exception type instead"
            )
        except BaseException as exc:
            failure = exc
        errors[len(results)] = info = ErrorInfo.capture(failure, pickle_it=pickle_errors)
        info.by_parmap = refused is not None and refused.get(len(results)) is failure
        results.append(None)
        # SystemExit, KeyboardInterrupt, ...: fn asks to stop, as it would stop a
        # serial map; carried back like any error rather than ending a worker
        # process (a "crash" that loses type and traceback).
        if stop_on_error or not isinstance(failure, Exception):
            break
    if status is not None:
        status.clear()
    return ChunkOutcome(results, errors, time.perf_counter() - started)


class _Refusing:
    """Items, except that a refused one raises its error where it would be
    yielded; being an iterator rather than a generator, it goes on after."""

    def __init__(self, items: Iterator[Any], refused: dict[int, SerializationError]) -> None:
        self._items, self._refused, self._offset = items, refused, 0

    def __iter__(self) -> _Refusing:
        return self

    def __next__(self) -> Any:
        item = next(self._items)
        offset, self._offset = self._offset, self._offset + 1
        if offset in self._refused:
            raise self._refused[offset]
        return item


def pickle_outcome(outcome: ChunkOutcome, positions: Sequence[int]) -> Pickled:
    """Pickle an outcome; a result that will not pickle becomes that item's error."""
    memoless = plain_text(outcome.results)
    while True:
        try:
            return dump_data([outcome], "the result of item", positions, memoless=memoless)  # type: ignore[list-item]
        except SerializationError:
            bad, exc = find_unpicklable(outcome.results)
            if bad is None:
                # Not a result: something in the errors themselves; drop payloads.
                for info in outcome.errors.values():
                    info.payload = None
                return dump_data([outcome], "the result of item", positions)  # type: ignore[list-item]
            error = SerializationError(
                f"the result of item #{positions[bad]} cannot be serialised: {type(exc).__name__}: {exc}"
            )
            outcome.results[bad] = None
            outcome.errors[bad] = info = ErrorInfo.capture(error, pickle_it=True)
            info.by_parmap = True


def encode_outcome(outcome: ChunkOutcome, positions: Sequence[int]) -> bytes:
    """:func:`pickle_outcome` as one ``bytes`` object."""
    return pickle_outcome(outcome, positions).getvalue()


def decode_outcome(data: bytes | bytearray) -> ChunkOutcome:
    outcome: ChunkOutcome = loads(data)[0]
    return outcome


#: What a worker forked during calls starts with, by call id: each call's
#: function and, when the call has one, its input (``Call.source``).
Inherited = dict[int, tuple[Callable[..., Any], "Sequence[Any] | None"]]


class FunctionCache:
    """The functions of the calls a worker has seen, loaded once each, and
    the inputs it inherited."""

    def __init__(self, inherited: Inherited | None = None) -> None:
        inherited = inherited or {}
        self._functions: dict[int, Callable[..., Any]] = {key: fn for key, (fn, _) in inherited.items()}
        self._sources = {key: source for key, (_, source) in inherited.items() if source is not None}
        for fn in self._functions.values():
            share_globals(fn, init_globals)

    def add(self, call_id: int, fn_bytes: bytes) -> None:
        fn = self._functions[call_id] = loads(fn_bytes)
        share_globals(fn, init_globals)

    def get(self, call_id: int) -> Callable[..., Any] | None:
        return self._functions.get(call_id)

    def items(self, call_id: int, positions: range) -> Sequence[Any]:
        """The items at ``positions`` of an inherited input."""
        items = self._sources[call_id][positions.start : positions.stop]
        if len(items) != len(positions):
            raise IndexError(f"the input has no items #{positions.start}-{positions.stop - 1}")
        return items

    def forget(self, call_id: int) -> None:
        self._functions.pop(call_id, None)
        self._sources.pop(call_id, None)


def unreadable_outcome(exc: BaseException, positions: Sequence[int], *, results: bool = False) -> ChunkOutcome:
    """The outcome of a chunk whose items (or, with ``results``, whose
    outcome back in the caller) pickled but would not unpickle: a
    ``__reduce__`` that only works on one side. Which item broke is unknown
    in one pickle: for several items a request to run them one at a time
    (free of charge), for one that item's ``SerializationError``."""
    if len(positions) > 1:
        return ChunkOutcome([], split=True, unreadable=not results)
    what, where = ("the result of item", "here") if results else ("item", "in the worker")
    error = SerializationError(f"{what} #{positions[0]} could not be unpickled {where}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    # In the worker the error must travel; in the caller it is already home.
    info = ErrorInfo.capture(error, pickle_it=not results)
    info.by_parmap = True
    return ChunkOutcome([None], errors={0: info}, unreadable=not results)


def fatal_outcome(exc: BaseException, what: str) -> ChunkOutcome:
    """An outcome saying the whole call cannot run here (``what`` failed)."""
    error = SerializationError(f"{what} could not be loaded in the worker: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    outcome = ChunkOutcome.failed(error, pickle_it=True)
    outcome.fn_unreadable = True
    return outcome


def _empty_stdin() -> None:
    if sys.stdin is not None:
        try:
            sys.stdin.close()  # this process's descriptor only; the caller keeps its own
        except (OSError, ValueError):
            pass
    try:
        # Lives as long as the process. Not closing its descriptor itself, it
        # is not reported as an unclosed file at a spawned worker's exit.
        sys.stdin = open(os.open(os.devnull, os.O_RDONLY), encoding="utf-8", closefd=False)  # noqa: SIM115
    except OSError:  # pragma: no cover - no /dev/null
        sys.stdin = None  # type: ignore[assignment]


def prepare_worker_process(*, parent_death_signal: bool = True) -> None:
    """Set a freshly started worker process up as a well-behaved child.

    * SIGINT does nothing: Ctrl-C reaches the whole process group, and the
      parent alone decides how workers stop (no traceback spew, no orphan).
      It is caught, not ignored: an ignored signal stays ignored across
      ``exec``, and a command ``fn`` runs would then outlive Ctrl-C.
    * SIGTERM ends the worker, whatever handler a forked one inherited from
      the caller (a server's, which may exit its loop politely or not at
      all): ``multiprocessing.Pool.terminate()`` stops workers with it, and
      a worker that survived it hung the pool's clean-up.
    * The worker exits if its parent dies, so a ``kill -9`` of the parent
      never leaves workers running. With ``parent_death_signal`` (Linux) the
      kernel SIGKILLs it; that signal is tied to the *thread* that started
      the worker, so it suits only workers started by a thread that lives as
      long as they do. ``multiprocessing.Pool`` starts replacements from its
      own handler thread, which exits first on ``terminate()``; a worker
      killed then may hold the pool's queue lock and hang ``terminate()``
      forever. Those workers watch the parent process instead.
    * Nested parmap calls run serially here (no pool of pools).
    * What a forked worker inherited of the caller's heap is frozen out of
      its garbage collector (as the :func:`gc.freeze` docs advise for
      fork without exec): a collection in the worker would otherwise walk
      every object the caller holds, each time, and write to their headers,
      which copies the pages they share with the caller.
    * Standard input is empty, as in ``multiprocessing``'s workers: a worker
      forked by ``fork`` would otherwise read what was meant for the caller
      (or wait on its terminal).
    * Signals are not written to the caller's signal wake-up descriptor
      (``signal.set_wakeup_fd``, which asyncio's ``add_signal_handler``
      sets): a forked worker shares it, and each worker's Ctrl-C reached
      the caller's event loop as one more Ctrl-C of its own.
    """
    gc.freeze()
    _empty_stdin()
    _let_go_of_the_forkserver()
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # pragma: no cover - not the main thread: nothing was inherited there
        pass
    signal.signal(signal.SIGINT, _no_interrupt)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_SIGNALS)  # held back by ctrl_c_held
    _context.mark_worker_process()
    if parent_death_signal and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            _watch_parent()
    else:
        _watch_parent()


# SIGTERM too: one that a forked worker got before it dropped the caller's
# handler would run that handler (see prepare_worker_process).
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def ctrl_c_held(start_method: str | None) -> Iterator[None]:
    """Hold Ctrl-C back from the worker processes this thread starts inside.

    Until :func:`prepare_worker_process` puts its handler in place, a new
    worker has Python's own, and Ctrl-C reaches the whole process group: a
    Ctrl-C just then printed a ``KeyboardInterrupt`` traceback from each
    starting worker, or under ``spawn`` a page of "Fatal Python error:
    init_import_site" from its interpreter's start-up. A child starts with
    the signal mask of the thread that started it, across ``exec`` too, so a
    SIGINT blocked here waits in the worker until prepare_worker_process lets
    it through to its handler (CPython's resource tracker guards its own
    start the same way). This process gets its Ctrl-C as ever: the kernel
    hands it to a thread that does not block it, and Python runs the handler
    on the main thread; so the main thread must not be the one that holds it.

    ``start_method`` is ``None`` for a bare ``os.fork``. For ``spawn`` and
    ``forkserver`` the resource tracker is started first: its start unblocks
    SIGINT on the thread that starts it, which would be this one, mid-way.
    SIGTERM is held back too (see prepare_worker_process). Hold it around
    the start alone: a thread started inside keeps the mask for good, and
    so does every command it runs.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    if start_method not in (None, "fork"):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    if start_method == "forkserver":
        # Started here, the forkserver would keep the mask, and so would
        # every process the program itself starts through it.
        from multiprocessing import forkserver

        forkserver.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _let_go_of_the_forkserver() -> None:
    """In a worker the forkserver started: close its copy of the pipe that
    keeps the forkserver alive.

    The forkserver, this worker's parent, exits once nobody holds that pipe's
    write end but the caller, so when the caller dies; with every worker
    holding a copy it never did, and a worker watching its parent outlived a
    killed caller. (A forkserver this process needs later is started anew.)
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    # Only a forkserver's child has the fd without having started the server.
    if alive is None or getattr(server, "_forkserver_pid", None) is not None:
        return
    try:
        os.close(alive)
    except OSError:
        pass
    server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _no_interrupt(signum: int, frame: object) -> None:
    """A worker's SIGINT handler: the caller decides (see prepare_worker_process)."""


def _watch_parent() -> None:
    """Exit when the parent process exits, from a daemon thread."""
    parent = os.getppid()
    if parent == 1:
        os._exit(0)
    try:
        pidfd = os.pidfd_open(parent)
    except (AttributeError, OSError):
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the parent has exited
        else:  # pragma: no cover - kernels before 5.3
            while os.getppid() == parent:
                time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parmap-parent-watch", daemon=True).start()


#: What this worker's initializer set or changed in its globals: each
#: ``fn`` that arrives takes it (see ``share_globals``).
init_globals: InitializerGlobals | None = None


def run_initializer(init: InitializerPayload | None) -> ErrorInfo | None:
    """Run the user's initializer; its failure is reported, not swallowed."""
    global init_globals
    if init is None:
        return None
    try:
        initializer, initargs = init.load()
        watch = InitializerWatch(initializer)
        initializer(*initargs)
        init_globals = watch.changed()
    except BaseException as exc:
        # SystemExit too: a worker that exited here would be replaced by one
        # that exits the same way (multiprocessing.Pool does so for ever).
        exc.add_note("parmap: raised by the initializer")
        return ErrorInfo.capture(exc, pickle_it=True)
    return None


def worker_main(
    conn: Any,
    status_array: Any,
    index: int,
    init: InitializerPayload | None,
    inherited: Inherited | None = None,
) -> None:
    """The loop of a ``process``/``fork`` worker; returns when told to or on EOF.

    ``inherited``: functions (and inputs) of calls already under way when
    this worker was forked; the parent sends no ``fn`` message for those,
    and sends no items for chunks it marks ``from_source``.
    """
    prepare_worker_process()
    status = StatusSlot(status_array, index)
    status.claim()
    init_error = run_initializer(init)
    functions = FunctionCache(inherited)
    load_error: BaseException = RuntimeError("the function never arrived")
    recv = conn.recv_bytes

    def send(outcome: ChunkOutcome, positions: Sequence[int]) -> None:
        send_framed(conn, pickle_outcome(outcome, positions).parts)

    try:
        while True:
            message = loads(recv())
            if message is None:
                return
            kind = message[0]
            if kind == "fn":
                status.loading_function()
                try:
                    functions.add(message[1], message[2])
                except Exception as exc:
                    functions.forget(message[1])
                    load_error = exc
                continue
            if kind == "forget":
                functions.forget(message[1])
                continue
            _, call_id, positions, stop_on_error, track, star, from_source = message
            status.received()
            items_bytes = None if from_source else recv_framed(conn)
            if init_error is not None:
                send(ChunkOutcome([], fatal=init_error), positions)
                continue
            fn = functions.get(call_id)
            if fn is None:
                send(fatal_outcome(load_error, "the function"), positions)
                continue
            refused = None
            try:
                if items_bytes is None:
                    items = functions.items(call_id, positions)
                    refused = refused_items(items, positions)
                else:
                    items = loads(items_bytes)
            except Exception as exc:
                send(unreadable_outcome(exc, positions), positions)
                continue
            outcome = run_chunk(
                fn,
                items,
                star=star,
                stop_on_error=stop_on_error,
                pickle_errors=True,
                status=status,
                track=track,
                refused=refused,
            )
            del items
            send(outcome, positions)
            # An idle worker must not hold its last chunk's items and results
            # (500 MB of them, for one big item), as multiprocessing's do not.
            items_bytes = None
            del outcome
    except (EOFError, OSError):
        return  # the parent went away: nothing left to do
