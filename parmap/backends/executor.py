"""Someone else's workers: ``backend=<a concurrent.futures.Executor>``, and the
chunk runner that such workers (and Dask's) execute.

The executor is used as it is and never shut down by parmap; chunking,
ordering, retries and error policy still come from the scheduler. A
:class:`~concurrent.futures.ThreadPoolExecutor` gets chunks directly (nothing
pickled); any other executor gets pickled chunks and ``fn`` with each chunk
(it gives no way to reach one worker once), unpickled once per worker
process and call by :func:`run_remote_chunk`.

A foreign executor cannot replace a worker that died: a
:class:`~concurrent.futures.ProcessPoolExecutor` breaks for good. The call
then stops with :class:`~parmap.WorkerCrashedError` (no item is blamed, since
the executor does not say which one killed it) instead of retrying on a pool
that can take no more work.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .. import _context
from .._errors import PoolClosedError, WorkerCrashedError
from .._options import default_workers
from .._serialization import ErrorInfo, InitializerGlobals, InitializerWatch, loads, share_globals
from .._worker import ChunkOutcome, encode_outcome, fatal_outcome, run_chunk, unreadable_outcome
from ._base import (
    Backend,
    Call,
    Capabilities,
    Chunk,
    ChunkLost,
    Done,
    closed_error,
    decode_chunk_outcome,
    terminated_outcome,
)
from .thread import _run_in_thread

__all__ = ["ExecutorBackend", "call_key", "run_remote_chunk"]

# -- the worker side (any process, any machine) ------------------------------

# The most calls' functions a worker keeps unpickled; a long-lived worker
# serving call after call must not keep every function it ever saw.
FUNCTION_CACHE_SIZE = 4

#: Makes call keys unique across processes: workers shared by several callers
#: (a Dask cluster, a remote executor) would otherwise mix up call #1 of each.
_PROCESS_TOKEN = uuid.uuid4().hex

_worker_lock = threading.Lock()
_functions: OrderedDict[str, Callable[..., Any]] = OrderedDict()
_initialized: dict[str, ErrorInfo | None] = {}
# What each initializer set or changed in its globals, by init key (see share_globals).
_init_globals: dict[str, InitializerGlobals] = {}


def call_key(call: Call) -> str:
    """A key for ``call`` that no other caller process can produce."""
    return f"{_PROCESS_TOKEN}-{call.id}"


def _load_function(key: str, fn_bytes: bytes, init_key: str | None = None) -> Callable[..., Any]:
    with _worker_lock:
        fn = _functions.get(key)
        if fn is None:
            fn = loads(fn_bytes)
            if init_key is not None and init_key in _init_globals:
                share_globals(fn, _init_globals[init_key])
            _functions[key] = fn
            while len(_functions) > FUNCTION_CACHE_SIZE:
                _functions.popitem(last=False)
        else:
            _functions.move_to_end(key)
        return fn


def _initialize(key: str, init_bytes: bytes) -> ErrorInfo | None:
    # Held while the initializer runs: another thread of the same worker
    # process must not start a chunk before it has finished.
    with _worker_lock:
        if key not in _initialized:
            try:
                initializer, initargs = loads(init_bytes)
                watch = InitializerWatch(initializer)
                initializer(*initargs)
                _initialized[key] = None
                namespace = watch.changed()
                if namespace is not None:
                    _init_globals[key] = namespace
            except Exception as exc:
                exc.add_note("parmap: raised by the initializer")
                _initialized[key] = ErrorInfo.capture(exc, pickle_it=True)
        return _initialized[key]


def run_remote_chunk(
    fn_key: str,
    fn_bytes: bytes,
    header: tuple[Any, ...],
    items_bytes: bytes,
    init_key: str | None = None,
    init_bytes: bytes | None = None,
) -> bytes:
    """Run one pickled chunk in a foreign worker; returns an encoded outcome, never raises.

    ``fn`` is unpickled once per worker process per ``fn_key``; the
    initializer, when given, runs once per worker process per ``init_key``
    before the first chunk.
    """
    _, _, positions, stop_on_error, _track, star = header
    if init_key is not None and init_bytes is not None:
        init_error = _initialize(init_key, init_bytes)
        if init_error is not None:
            return encode_outcome(ChunkOutcome([], fatal=init_error), positions)
    try:
        fn = _load_function(fn_key, fn_bytes, init_key)
    except Exception as exc:
        return encode_outcome(fatal_outcome(exc, "the function"), positions)
    try:
        items = loads(items_bytes)
    except Exception as exc:
        return encode_outcome(unreadable_outcome(exc, positions), positions)
    # Thread-local, not process-wide: the worker may also run other work.
    _context.set_worker_thread(run_remote_chunk)  # no backend here: any marker will do
    try:
        outcome = run_chunk(fn, items, star=star, stop_on_error=stop_on_error, pickle_errors=True)
    finally:
        _context.set_worker_thread(None)
    return encode_outcome(outcome, positions)


# -- the caller side ------------------------------------------------------------------


@dataclass(eq=False)
class _CallFutures:
    #: The executor's futures still out, and whom each reports to.
    futures: dict[Future[Any], tuple[Chunk, Done]] = field(default_factory=dict)
    released: bool = False


class ExecutorBackend(Backend):
    """Runs chunks on a user-supplied executor.

    The executor is the user's: closing this backend (the pool over it)
    never shuts it down. Terminating it takes back what it queued there and
    fails what still runs, whose results are then ignored.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor  # what its chunks run on (see _context.working_on)
        self._in_process = isinstance(executor, ThreadPoolExecutor)
        self.capabilities = Capabilities(isolated=not self._in_process, can_timeout=False)  # type: ignore[misc]
        self.workers = int(getattr(executor, "_max_workers", 0) or default_workers())
        self._lock = threading.Lock()
        self._calls: dict[int, _CallFutures] = {}
        self._broken = False
        self._closed = False
        self._killed = False

    def submit(self, chunk: Chunk, done: Done) -> None:
        call = chunk.call
        with self._lock:
            if self._closed:
                raise closed_error(self._killed)
        try:
            if self._in_process:
                future: Future[Any] = self.executor.submit(_run_in_thread, chunk, self)
            else:
                future = self.executor.submit(
                    run_remote_chunk, call_key(call), call.fn_bytes, chunk.header(), chunk.items_bytes()
                )
        except BrokenExecutor as exc:
            raise WorkerCrashedError(_broken_message(exc)) from exc
        except RuntimeError as exc:
            raise PoolClosedError(f"the executor cannot take work: {exc}") from exc
        with self._lock:
            state = self._calls.get(call.id)
            if state is None:
                state = self._calls[call.id] = _CallFutures()
            # Meanwhile released (no one waits for it) or terminated (it must
            # hear so, as what close() found did): it must not run.
            late = state.released or self._closed
            if not late:
                state.futures[future] = (chunk, done)
        if late:
            future.cancel()
            if not state.released:
                done(chunk, terminated_outcome())
            return
        future.add_done_callback(partial(self._report, state))

    def _report(self, state: _CallFutures, future: Future[Any]) -> None:
        with self._lock:
            # Whoever takes it reports it: this, or a terminate() meanwhile.
            taken = state.futures.pop(future, None)
        if taken is None:
            return
        chunk, done = taken
        try:
            value = future.result()
        except CancelledError:
            # Not by us (release and terminate take it first): someone shut the executor down.
            done(chunk, ChunkLost(None, detail="the executor cancelled it (was it shut down?)"))
            return
        except BrokenExecutor as exc:
            # The whole executor is gone, not one worker: no retry can run.
            with self._lock:
                self._broken = True
            crashed = WorkerCrashedError(_broken_message(exc))
            crashed.__cause__ = exc
            done(chunk, ChunkOutcome.failed(crashed))
            return
        except BaseException as exc:
            done(chunk, ChunkOutcome.failed(exc))
            return
        done(chunk, value if self._in_process else decode_chunk_outcome(chunk, value))

    def release(self, call: Call) -> None:
        with self._lock:
            state = self._calls.pop(call.id, None)
            if state is None:
                return
            state.released = True
            futures = list(state.futures)
            state.futures.clear()
        self._cancel(futures)  # queued chunks are dropped; running ones finish unseen

    def close(self, kill: bool = False) -> None:
        """Take no more chunks; with ``kill``, also end those still out, as
        terminated. The executor itself is not ours to shut down."""
        with self._lock:
            self._closed = True
            self._killed = self._killed or kill
            if not kill:
                return
            states = list(self._calls.values())
            self._calls.clear()
            ended: list[tuple[Chunk, Done]] = []
            futures: list[Future[Any]] = []
            for state in states:
                state.released = True
                ended.extend(state.futures.values())
                futures.extend(state.futures)
                state.futures.clear()
        self._cancel(futures)  # out of the lock: a cancelled future's callback takes it
        outcome = terminated_outcome()
        for chunk, done in ended:
            done(chunk, outcome)

    def _cancel(self, futures: list[Future[Any]]) -> None:
        # A breaking ProcessPoolExecutor fails its futures one by one from its
        # manager thread; cancelling one meanwhile makes that thread die of
        # InvalidStateError (CPython 3.11) and leave its workers running.
        if not self._broken:
            for future in futures:
                future.cancel()


def _broken_message(exc: BaseException) -> str:
    return (
        f"a worker of the executor died and the executor is broken ({type(exc).__name__}: {exc}); "
        "a concurrent.futures executor cannot replace its workers, so the call stops here"
    )
