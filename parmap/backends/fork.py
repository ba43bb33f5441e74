"""``backend="fork"``: raw ``os.fork()`` children talking over pipes (POSIX).

No ``multiprocessing.Process`` at all: each worker is forked directly, talks
over a socket pair, and is watched through a pidfd that turns readable when
it exits (where the platform lacks pidfds: a pipe whose only write end it
holds, readable once the child is gone; either serves as a sentinel for
:func:`multiprocessing.connection.wait`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from .._wire import worker_pipe
from .._worker import Inherited, worker_main
from ._local import LocalWorkers, WorkerProcess, exit_sentinel


class ForkBackend(LocalWorkers):
    """Workers made by ``os.fork()``; POSIX only."""

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_child: int | None = None,
    ) -> None:
        if not hasattr(os, "fork"):
            raise ValueError("backend='fork' needs os.fork(), which this platform lacks")
        super().__init__(workers, initializer, initargs, max_tasks_per_child)

    def _start_worker(self, index: int, inherited: Inherited) -> WorkerProcess:
        parent_conn, child_conn = worker_pipe()
        sentinel_r, sentinel_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into the parent's stack
            code = 0
            try:
                os.close(sentinel_r)
                parent_conn.close()  # the other pools' ends, and this one's, went at the fork
                worker_main(child_conn, self._status, index, self._init, inherited)
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
        pidfd = exit_sentinel(pid)
        if pidfd is not None:
            os.close(sentinel_r)
            sentinel_r = pidfd
        return WorkerProcess(index, pid, parent_conn, sentinel_r)

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
