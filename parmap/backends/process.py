"""``backend="process"``: parmap's own worker processes via ``multiprocessing``.

Workers are :class:`multiprocessing.Process` objects of the chosen start
method (``fork``, ``spawn`` or ``forkserver``), each fed over its own
:func:`multiprocessing.Pipe`. Everything else is the shared machinery of
:mod:`parmap.backends._local`.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from .._wire import worker_pipe
from .._worker import Inherited, worker_main
from ._local import LocalWorkers, WorkerProcess, dropped_by_a_forked_worker, exit_sentinel


class ProcessBackend(LocalWorkers):
    """Worker processes started by a ``multiprocessing`` context."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str | None = None,
        max_tasks_per_child: int | None = None,
    ) -> None:
        super().__init__(workers, initializer, initargs, max_tasks_per_child)
        self.start_method = start_method or default_start_method()
        self._ctx: Any = multiprocessing.get_context(self.start_method)
        # Only a forked child receives Process args without pickling them.
        self.forks_workers = self.start_method == "fork"

    def _make_status_array(self, size: int) -> Any:
        if self.forks_workers:
            return super()._make_status_array(size)
        return self._ctx.RawArray("d", size)  # spawn/forkserver: passed by file descriptor

    def _start_worker(self, index: int, inherited: Inherited) -> WorkerProcess:
        parent_conn, child_conn = worker_pipe()
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, self._status, index, self._init, inherited),
            name=f"parmap-worker-{index}",
            daemon=True,
        )
        with dropped_by_a_forked_worker(parent_conn):
            process.start()
        child_conn.close()
        assert process.pid is not None
        sentinel = exit_sentinel(process.pid)
        if sentinel is not None and process.exitcode is not None:
            # Dead and reaped already (multiprocessing reaps its children as
            # it starts others): the pid may be another process's by now.
            os.close(sentinel)
            sentinel = None
        return WorkerProcess(
            index, process.pid, parent_conn, process.sentinel if sentinel is None else sentinel, handle=process
        )

    def _reap(self, worker: WorkerProcess) -> int | None:
        process: multiprocessing.process.BaseProcess = worker.handle
        process.join()
        for _ in range(REAP_POLLS):
            if process.exitcode is not None:
                break
            # multiprocessing reaps its dead children whenever any thread
            # starts a process (another pool's worker, say): one that won the
            # race records the exit code a moment later, and join() saw none.
            time.sleep(0.01)
        exitcode = process.exitcode
        if worker.sentinel != process.sentinel:
            os.close(worker.sentinel)  # the pidfd (see exit_sentinel)
        try:
            process.close()
        except ValueError:  # no exit code came: the Process is left to multiprocessing
            pass
        return exitcode


# Looks, 10 ms apart, for an exit code another thread's reaping is about to record.
REAP_POLLS = 50


def default_start_method() -> str:
    """The program's own choice, made with :func:`multiprocessing.set_start_method`
    (say, ``spawn`` because CUDA does not survive a fork); else ``fork`` where
    it exists (the cheapest start, see benchmarks/startup.py), else ``spawn``."""
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen is not None:
        return chosen
    methods = multiprocessing.get_all_start_methods()
    return "fork" if "fork" in methods else "spawn"
