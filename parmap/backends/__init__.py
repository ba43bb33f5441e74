"""Backends by name, looked up lazily: ``import parmap`` imports only the one
``backend="auto"`` picks (see the end of this module).

Adding a backend is one line in :data:`_REGISTRY` plus its module.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
from concurrent.futures import Executor
from typing import Any

from .. import _context
from .._errors import ParmapError
from .._options import PoolOptions
from ._base import Backend, Call, Capabilities, Chunk, ChunkLost, ChunkOutcome

__all__ = ["BACKEND_NAMES", "Backend", "Call", "Capabilities", "Chunk", "ChunkLost", "ChunkOutcome", "create_backend"]

#: name -> (module, class, accepts start_method)
_REGISTRY: dict[str, tuple[str, str, bool]] = {
    "process": ("process", "ProcessBackend", True),
    "pool": ("pool", "PoolBackend", True),
    "apply_async": ("apply_async", "ApplyAsyncBackend", True),
    "fork": ("fork", "ForkBackend", False),
    "thread": ("thread", "ThreadBackend", False),
    "serial": ("serial", "SerialBackend", False),
    "dask": ("dask", "DaskBackend", False),
}
BACKEND_NAMES: tuple[str, ...] = ("auto", *_REGISTRY)
#: Backends that start processes: inside a worker they run serially instead.
_PROCESS_BACKENDS = frozenset({"auto", "process", "pool", "apply_async", "fork"})
# Whose workers parmap's own dispatcher starts, feeds and can retire one by one.
_OWN_PROCESS_BACKENDS = frozenset({"process", "fork"})


def auto_backend() -> str:
    """What ``backend="auto"`` means: parmap's own worker processes.

    ``process`` is the most robust local backend (crash recovery, timeouts,
    ``fn`` sent once per worker) and, started with ``fork`` where the
    platform has it, the quickest to start (see benchmarks/README.md). It
    never runs ``fn`` in the calling process, so a crashing ``fn`` cannot
    take the caller down.

    In a daemonic ``multiprocessing`` process (a ``multiprocessing.Pool``
    worker, a Celery prefork worker), which ``multiprocessing`` forbids to
    start processes of its own, it is ``fork``: the same machinery, with
    workers started by ``os.fork()`` rather than ``multiprocessing.Process``.
    """
    if hasattr(os, "fork") and _in_daemon():
        return "fork"
    return "process"


def _in_daemon() -> bool:
    return bool(multiprocessing.current_process().daemon)


def create_backend(options: PoolOptions) -> tuple[Backend, bool]:
    """The backend for ``options`` and whether parmap owns (and so closes) it.

    Nothing is started here: workers start on the first chunk, so bad
    arguments fail before any process exists and an empty input starts none.
    """
    backend = options.backend
    if isinstance(backend, Backend):
        _no_start_method(options, "a backend object")
        return backend, False
    if isinstance(backend, Executor):
        _no_start_method(options, "an Executor")
        from .executor import ExecutorBackend

        return ExecutorBackend(backend), True  # the wrapper, not the executor: that is never shut down
    check_backend(backend)
    assert isinstance(backend, str)
    name = auto_backend() if backend == "auto" else backend
    if backend == "auto" and options.start_method is not None:
        name = "process"  # a start method asks for multiprocessing's workers
    module_name, class_name, takes_start_method = _REGISTRY[name]
    if options.start_method is not None and not takes_start_method:
        raise ValueError(
            f"start_method={options.start_method!r} applies to the 'process', 'pool' and "
            f"'apply_async' backends, not to backend={backend!r}"
        )
    if options.address is not None and name != "dask":
        # Quietly running here what was meant for a cluster would hide the mistake.
        raise ValueError(
            f"address={options.address!r} names a Dask scheduler: it applies to backend='dask', "
            f"not to backend={backend!r}"
        )
    stands_in = backend in _PROCESS_BACKENDS and _context.in_worker()
    if stands_in:
        # A parmap call inside a worker: no pool of pools.
        name, module_name, class_name = "serial", "serial", "SerialBackend"
    if takes_start_method and name != "serial" and _in_daemon():
        raise ValueError(
            f"backend={name!r} cannot start workers here: this is a daemonic multiprocessing process "
            "(a multiprocessing.Pool worker, say), and multiprocessing forbids those children; "
            "backend='fork' (or 'auto', which picks it here) or 'thread' can"
        )
    if name != "serial" and sys.is_finalizing():
        # Python starts no thread now (Thread.start() waits for ever), and
        # every backend but serial needs one.
        raise ParmapError(
            f"backend={name!r} cannot start while the interpreter shuts down (a __del__ run by its "
            "final clean-up, say): call parmap before the program ends, or use backend='serial' there"
        )
    if options.max_tasks_per_child is not None and name not in _OWN_PROCESS_BACKENDS and not stands_in:
        raise ValueError(
            f"max_tasks_per_child={options.max_tasks_per_child} needs worker processes that parmap "
            f"starts and retires itself: backend='process' or 'fork' (or 'auto'), not backend={backend!r}"
        )
    if name == "fork" and sys.platform == "win32":  # pragma: no cover
        raise ValueError("backend='fork' needs os.fork(), which Windows lacks")
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls: Any = getattr(module, class_name)
    kwargs: dict[str, Any] = {"initializer": options.initializer, "initargs": options.initargs}
    if name not in ("serial",):
        kwargs["workers"] = options.worker_count
    if takes_start_method and name != "serial":
        kwargs["start_method"] = options.start_method
    if name in _OWN_PROCESS_BACKENDS:
        kwargs["max_tasks_per_child"] = options.max_tasks_per_child
    if name == "dask":
        kwargs["address"] = options.address
    created: Backend = cls(**kwargs)
    created.stands_in = stands_in
    return created, True


def create_timed_stand_in(options: PoolOptions) -> Backend:
    """One worker that can be stopped, for a call with a ``timeout`` made
    inside a parmap worker (see ``Pool._backend_for``): a raw fork, which a
    daemonic process may make too, else a process of multiprocessing's."""
    if hasattr(os, "fork"):
        from .fork import ForkBackend

        backend: Backend = ForkBackend(1, options.initializer, options.initargs)
    else:  # pragma: no cover - Windows
        from .process import ProcessBackend

        backend = ProcessBackend(1, options.initializer, options.initargs)
    return backend


def check_backend(backend: object) -> None:
    """Raise unless ``backend`` is something ``backend=`` takes."""
    if isinstance(backend, (Backend, Executor)):
        return
    if not isinstance(backend, str):
        message = (
            f"backend must be a name ({', '.join(map(repr, BACKEND_NAMES))}), a parmap Backend "
            f"or a concurrent.futures.Executor, got {backend!r}"
        )
        if isinstance(backend, type) and issubclass(backend, (Backend, Executor)):
            message += f": pass an instance, {backend.__name__}(...)"
        elif callable(backend):
            # Pool(4, init, (arg,)) is how multiprocessing.Pool is called.
            message += (
                "; if it is an initializer, pass it as initializer=... (and initargs=...): the second "
                "argument of parmap.Pool is backend, not initializer as in multiprocessing.Pool"
            )
        raise TypeError(message)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKEND_NAMES))}")


def _no_start_method(options: PoolOptions, what: str) -> None:
    """Options that only parmap-made workers can honour."""
    if options.start_method is not None:
        raise ValueError(f"start_method cannot be used with {what} as backend: its workers are already made")
    if options.address is not None:
        raise ValueError(f"address cannot be used with {what} as backend: it is already connected where it is")
    if options.max_tasks_per_child is not None:
        raise ValueError(
            f"max_tasks_per_child cannot be used with {what} as backend: parmap does not start its workers"
        )
    if options.initializer is not None:
        raise ValueError(
            f"initializer cannot be used with {what} as backend: parmap does not start its workers "
            "(give the executor its own initializer)"
        )


# The default backend is imported with parmap rather than at the first call.
# Importing it makes enough objects to set off a garbage collection, and a
# collection at the first call walks whatever the caller has just built: ~10
# ms for a fresh list of a million items (benchmark W1, where it was 5% of the
# run; W4 loses the import's ~4 ms too).
importlib.import_module(f"{__name__}.{auto_backend()}")
