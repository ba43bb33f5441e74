"""``backend="thread"``: a :class:`~concurrent.futures.ThreadPoolExecutor`.

For I/O-bound work (network, disk, subprocesses) where the GIL is released.
Nothing is pickled: ``fn`` and the items are shared with the caller. A
running thread cannot be stopped, so ``timeout`` is refused up front.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import _context
from .._errors import PoolClosedError
from .._serialization import ErrorInfo
from .._worker import ChunkOutcome, run_chunk
from ._base import Backend, Call, Capabilities, Chunk, Done


def _run_in_thread(chunk: Chunk) -> ChunkOutcome:
    call = chunk.call
    _context.set_worker_thread(True)
    try:
        return run_chunk(call.fn, chunk.items, star=call.star, stop_on_error=call.stop_on_error, pickle_errors=False)
    finally:
        _context.set_worker_thread(False)


class ThreadBackend(Backend):
    """A pool of ``workers`` threads in this process."""

    capabilities = Capabilities(isolated=False, can_timeout=False)

    def __init__(
        self, workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()
    ) -> None:
        self.workers = workers
        self._user_initializer = initializer
        self._initargs = initargs
        self._init_error: BaseException | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="parmap-thread",
            initializer=self._initialize if initializer is not None else None,
        )
        self._released: set[int] = set()

    def _initialize(self) -> None:
        # ThreadPoolExecutor drops a failing initializer's exception and only
        # says the pool is broken; keep it so the caller sees the real error.
        assert self._user_initializer is not None
        try:
            self._user_initializer(*self._initargs)
        except Exception as exc:
            exc.add_note("parmap: raised by the initializer")
            self._init_error = exc

    def submit(self, chunk: Chunk, done: Done) -> None:
        try:
            future = self._executor.submit(self._run, chunk)
        except RuntimeError as exc:  # shut down, or broken by a failing initializer
            raise PoolClosedError(f"the thread pool cannot take work: {exc}") from exc
        future.add_done_callback(lambda f: self._report(f, chunk, done))

    def _run(self, chunk: Chunk) -> ChunkOutcome | None:
        if chunk.call.id in self._released:
            return None  # the call is over: skip its queued chunks
        if self._init_error is not None:
            return ChunkOutcome([], fatal=ErrorInfo.capture(self._init_error, pickle_it=False))
        try:
            return _run_in_thread(chunk)
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt from fn: raised in the caller, as
            # a serial map would (left in the future, it would escape the
            # done-callback and the chunk would never be reported).
            return ChunkOutcome([], fatal=ErrorInfo.capture(exc, pickle_it=False))

    @staticmethod
    def _report(future: Future[ChunkOutcome | None], chunk: Chunk, done: Done) -> None:
        if future.cancelled():
            return
        outcome = future.result()
        if outcome is not None:
            done(chunk, outcome)

    def release(self, call: Call) -> None:
        self._released.add(call.id)

    def close(self, kill: bool = False) -> None:
        self._executor.shutdown(wait=not kill, cancel_futures=kill)
