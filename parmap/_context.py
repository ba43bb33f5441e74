"""Whether this code runs inside a parmap worker.

A parmap call made from inside a worker must not start a pool of pools: it
runs serially there (see :func:`parmap._backends.resolve`). Process workers
set the process-wide flag; thread workers set the thread-local one.
"""

from __future__ import annotations

import threading

_process_flag = False
_thread_flag = threading.local()


def mark_worker_process() -> None:
    global _process_flag
    _process_flag = True


def set_worker_thread(backend: object | None) -> None:
    """This thread runs a chunk for ``backend`` from now on; ``None``: no longer."""
    _thread_flag.backend = backend


def in_worker() -> bool:
    """True inside a parmap worker process or worker thread."""
    return _process_flag or getattr(_thread_flag, "backend", None) is not None


def working_for(backend: object) -> bool:
    """Whether this thread runs a chunk for ``backend`` (a ``thread`` backend's, say)."""
    return getattr(_thread_flag, "backend", None) is backend


def working_on(backend: object) -> bool:
    """Whether this thread is one of the threads ``backend`` runs its chunks
    on: also a task of another backend over the same ``concurrent.futures``
    executor (each ``parmap.map(fn, items, backend=executor)`` makes its
    own), which waiting for more of that executor's threads may wait for ever."""
    marked = getattr(_thread_flag, "backend", None)
    return marked is not None and _runs_on(marked) is _runs_on(backend)


def _runs_on(backend: object) -> object:
    return getattr(backend, "executor", None) or backend
