"""parmap: ``map(fn, items)`` on every core, without multiprocessing's traps.

>>> import parmap
>>> parmap.map(lambda x: x * x, range(5), workers=2)
[0, 1, 4, 9, 16]

Public API: :func:`map`, :func:`imap`, :func:`starmap`, :func:`parallel`,
:class:`Pool` (and its :class:`AsyncResult`), and the errors rooted at :class:`ParmapError`.
"""

from __future__ import annotations

from ._api import imap, map, starmap
from ._async_result import AsyncResult
from ._decorator import ParallelFunction, parallel
from ._errors import (
    ParmapError,
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    TaskError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from ._pool import Pool
from .backends import BACKEND_NAMES

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "AsyncResult",
    "ParallelFunction",
    "ParmapError",
    "Pool",
    "PoolClosedError",
    "RemoteTraceback",
    "SerializationError",
    "TaskError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "__version__",
    "imap",
    "map",
    "parallel",
    "starmap",
]
