"""``backend="pool"``: a ``multiprocessing.Pool`` driven through its ``imap`` machinery.

Tasks go in through one long-running ``imap_unordered`` whose input is a
generator blocking on a queue, so the pool pulls only what the scheduler has
released (``Pool.imap`` over the real input would swallow it whole).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from ._base import drives_workers
from ._mppool import MPPoolBackend, run_pool_task

_END = None


class PoolBackend(MPPoolBackend):
    """``multiprocessing.Pool.imap_unordered`` over a queue of chunks."""

    def _start_feeding(self, pool: Any) -> None:
        self._tasks: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        results = pool.imap_unordered(run_pool_task, self._task_stream(), chunksize=1)
        self._results = results
        self._reader = threading.Thread(target=self._read, args=(results,), name="parmap-pool-results", daemon=True)
        drives_workers(self._reader)  # see _new_pool
        self._reader.start()

    def _task_stream(self) -> Iterator[tuple[Any, ...]]:
        while (task := self._tasks.get()) is not _END:
            yield task

    def _read(self, results: Iterator[tuple[int, bytes]]) -> None:
        try:
            for result in results:
                self._on_result(result)
        except Exception as ended:  # the pool was terminated under the iterator
            # Its traceback holds the iterator's frame, which holds the
            # error: a cycle through the pool, with its pipes left open.
            ended.__traceback__ = None

    def _feed(self, task: tuple[Any, ...]) -> None:
        self._tasks.put(task)

    def _stop_feeding(self) -> None:
        self._tasks.put(_END)

    def _after_shutdown(self) -> None:
        # A task lost with a dead worker never completes, so the imap iterator
        # would wait for it forever; end it so the reader thread exits.
        self._results._set(0, (False, EOFError("pool shut down")))
        self._reader.join()
