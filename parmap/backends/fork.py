"""``backend="fork"``: raw ``os.fork()`` children talking over pipes (POSIX).

No ``multiprocessing.Process`` at all: each worker is forked directly, talks
over a socket pair, and signals its exit through a pipe whose only write end
it holds (the read end turns readable when the child is gone, so it serves as
a sentinel for :func:`multiprocessing.connection.wait`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from .._wire import worker_pipe
from .._worker import Inherited, worker_main
from ._local import LocalWorkers, WorkerProcess


class ForkBackend(LocalWorkers):
    """Workers made by ``os.fork()``; POSIX only."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        if not hasattr(os, "fork"):
            raise ValueError("backend='fork' needs os.fork(), which this platform lacks")
        super().__init__(workers, initializer, initargs)

    def _start_worker(self, index: int, inherited: Inherited) -> WorkerProcess:
        parent_conn, child_conn = worker_pipe()
        sentinel_r, sentinel_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into the parent's stack
            code = 0
            try:
                os.close(sentinel_r)
                parent_conn.close()
                self._close_inherited()
                worker_main(child_conn, self._status, index, self._init_bytes, inherited)
            except SystemExit as exc:  # the initializer called sys.exit(): report its code, as multiprocessing does
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(sentinel_w)
        child_conn.close()
        return WorkerProcess(index, pid, parent_conn, sentinel_r)

    def _close_inherited(self) -> None:
        """Drop the parent's ends of the other workers' pipes and the wake-up pipe,
        so that end-of-file means what it should."""
        for other in self._procs:
            if other is not None:
                other.conn.close()
                try:
                    os.close(other.sentinel)
                except OSError:
                    pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _reap(self, worker: WorkerProcess) -> int | None:
        try:
            _, status = os.waitpid(worker.pid, 0)
            exitcode: int | None = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            exitcode = None
        try:
            os.close(worker.sentinel)
        except OSError:
            pass
        return exitcode
