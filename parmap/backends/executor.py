"""``backend=<a concurrent.futures.Executor>``: someone else's workers.

The executor is used as it is and never shut down by parmap; chunking,
ordering, retries and error policy still come from the scheduler. A
:class:`~concurrent.futures.ThreadPoolExecutor` gets chunks directly (nothing
pickled); any other executor gets pickled chunks and ``fn`` with each chunk
(it gives no way to reach one worker once), cached per worker process.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Any

from .._errors import PoolClosedError
from .._options import default_workers
from .._serialization import ErrorInfo
from .._worker import ChunkOutcome, decode_outcome, run_encoded_chunk
from ._base import Backend, Call, Capabilities, Chunk, ChunkLost, Done
from .thread import _run_in_thread


class ExecutorBackend(Backend):
    """Runs chunks on a user-supplied executor."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._in_process = isinstance(executor, ThreadPoolExecutor)
        self.capabilities = Capabilities(isolated=not self._in_process, can_timeout=False)  # type: ignore[misc]
        self.workers = int(getattr(executor, "_max_workers", 0) or default_workers())
        self._released: set[int] = set()

    def submit(self, chunk: Chunk, done: Done) -> None:
        try:
            if self._in_process:
                future: Future[Any] = self._executor.submit(_run_in_thread, chunk)
            else:
                call = chunk.call
                future = self._executor.submit(
                    run_encoded_chunk, call.id, call.fn_bytes, chunk.header(), chunk.items_bytes()
                )
        except BrokenExecutor as exc:
            raise PoolClosedError(f"the executor is broken: {exc}") from exc
        except RuntimeError as exc:
            raise PoolClosedError(f"the executor cannot take work: {exc}") from exc
        future.add_done_callback(lambda f: self._report(f, chunk, done))

    def _report(self, future: Future[Any], chunk: Chunk, done: Done) -> None:
        if chunk.call.id in self._released:
            return
        try:
            value = future.result()
        except CancelledError:
            return
        except BrokenExecutor as exc:
            done(chunk, ChunkLost(None, detail=f"the executor's worker died ({type(exc).__name__})"))
            return
        except BaseException as exc:
            done(chunk, ChunkOutcome([], fatal=ErrorInfo.capture(exc, pickle_it=False)))
            return
        done(chunk, value if self._in_process else decode_outcome(value))

    def release(self, call: Call) -> None:
        self._released.add(call.id)

    def close(self, kill: bool = False) -> None:
        """Not ours to shut down."""
