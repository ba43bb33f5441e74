"""``backend="serial"``: every chunk runs in the calling thread, at submit.

For debugging (a breakpoint in ``fn`` just works) and for tiny inputs. Errors
come back exactly as on the other backends, so switching to ``serial`` to
debug changes nothing but where the code runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._worker import ChunkOutcome, run_chunk
from ._base import Backend, Capabilities, Chunk, Done, closed_error


class SerialBackend(Backend):
    """Runs each chunk immediately in the caller; the initializer runs once, here."""

    capabilities = Capabilities(isolated=False, can_timeout=False)
    runs_in_caller = True

    def __init__(self, initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = ()) -> None:
        self.workers = 1
        self._initializer = initializer
        self._initargs = initargs
        self._init_error: BaseException | None = None
        self._closed = False
        self._killed = False

    def submit(self, chunk: Chunk, done: Done) -> None:
        if self._closed:
            raise closed_error(self._killed)
        if self._initializer is not None:
            initializer, self._initializer = self._initializer, None
            try:
                initializer(*self._initargs)
            except BaseException as exc:  # SystemExit too, as on every backend
                exc.add_note("parmap: raised by the initializer")
                # Kept: as on the other backends, the one worker that failed to
                # start fails every later call of the pool, not only this one.
                self._init_error = exc
        if self._init_error is not None:
            done(chunk, ChunkOutcome.failed(self._init_error))
            return
        call = chunk.call
        outcome = run_chunk(call.fn, chunk.items, star=call.star, stop_on_error=call.stop_on_error, pickle_errors=False)
        done(chunk, outcome)

    def close(self, kill: bool = False) -> None:
        self._killed = self._killed or kill
        self._closed = True
