"""``backend="fork"``: raw ``os.fork()`` children talking over pipes (POSIX).

No ``multiprocessing.Process`` at all: each worker is forked directly, talks
over a socket pair, and is watched through a pidfd that turns readable when
it exits (where the platform lacks pidfds: a pipe whose only write end it
holds, readable once the child is gone; either serves as a sentinel for
:func:`multiprocessing.connection.wait`).
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import multiprocessing.util
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
                _begin_as_multiprocessing_child()
                worker_main(child_conn, self._status, index, self._init, inherited)
            except SystemExit as exc:  # the initializer called sys.exit(): report its code, as multiprocessing does
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                code = 1
            finally:
                _end_as_multiprocessing_child()
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


# A worker forked here keeps the books of multiprocessing as its own forked
# children do (``BaseProcess._bootstrap``): a ``multiprocessing.Queue`` the
# caller shares with the workers (through ``initargs``, say) relies on them.
# Its ``put`` hands the object to a feeder thread, and only the process's
# exit finalizers wait for that thread to write it; ``os._exit`` alone lost
# what the last item put. And a queue the caller had put to before the fork
# needs its after-fork reset, or the child's puts wait for the caller's
# feeder thread, which the child does not have. (Those books are private
# names of multiprocessing, which typeshed leaves out.)
_mp_process: Any = multiprocessing.process
_mp_util: Any = multiprocessing.util


def _begin_as_multiprocessing_child() -> None:
    """Drop the caller's finalizers and children, and run the after-fork hooks."""
    _mp_process._children = set()  # the caller's, not this worker's to join at exit
    _mp_util._finalizer_registry.clear()
    _mp_util._exiting = False
    _mp_util._run_after_forkers()


def _end_as_multiprocessing_child() -> None:
    """Run this worker's own exit finalizers (queue feeders are flushed by them)."""
    # As in multiprocessing's own children, a finalizer that fails does not stop the exit.
    with contextlib.suppress(BaseException):
        _mp_util._exit_function()
