"""The exceptions parmap raises, and how a worker's exception comes home.

::

    Exception
     ├── ParmapError                      anything parmap itself reports
     │    ├── TaskError                   fn raised something that could not be
     │    │                               brought back (unpicklable exception)
     │    ├── WorkerCrashedError          a worker died while running an item
     │    ├── TaskTimeoutError            an item ran past ``timeout=`` (also a
     │    │                               built-in TimeoutError)
     │    ├── SerializationError          the function, an item or a result could
     │    │                               not be pickled or unpickled
     │    └── PoolClosedError             a Pool was used after it was closed
     │                                    (also a RuntimeError)
     └── <the user's own exception>       re-raised with its own type, a note naming
                                          the item, and ``__cause__`` set to a
                                          RemoteTraceback holding the worker's text

Keeping the user's type is deliberate: ``except ValueError:`` must work around
``parmap.map`` exactly as it does around ``map``.
"""

from __future__ import annotations

__all__ = [
    "ParmapError",
    "PoolClosedError",
    "RemoteTraceback",
    "SerializationError",
    "TaskError",
    "TaskTimeoutError",
    "WorkerCrashedError",
]


class ParmapError(Exception):
    """Base class of every error parmap itself raises.

    ``position``: for an error about one item of a ``map``, ``imap`` or
    ``starmap`` (its worker crashed or timed out, it or its result would not
    serialise, its exception could not travel), that item's position in the
    input, counting from 0; ``None`` for an error about no single item. One
    that ``fn`` itself raised (a map nested in ``fn`` failed) is that item's
    error like any other: it gets the item's position and note. With
    ``imap(..., ordered=False, on_error="return")`` it says which item an
    error belongs to:

    >>> for result in parmap.imap(fn, items, ordered=False, on_error="return"):  # doctest: +SKIP
    ...     if isinstance(result, parmap.WorkerCrashedError):
    ...         print("item", result.position, "crashed its worker")
    """

    position: int | None = None


class TaskError(ParmapError):
    """An exception raised by ``fn`` that could not travel back to the caller.

    Raised in place of the original when that exception cannot be pickled or
    unpickled. It keeps what can always travel: the type name, the message and
    the worker's traceback text.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.traceback_text), self.__dict__)


class WorkerCrashedError(ParmapError):
    """A worker process died (signal, ``os._exit``, segfault, OOM killer).

    ``exitcode`` is the process exit code, negative for a signal (as in
    :attr:`multiprocessing.Process.exitcode`), or ``None`` when unknown.
    """

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], self.exitcode), self.__dict__)


class TaskTimeoutError(ParmapError, TimeoutError):
    """An item ran longer than ``timeout=`` seconds; its worker was replaced."""


class SerializationError(ParmapError):
    """The function, an item or a result could not be serialised.

    The message says which one ("the function", "item #3", "the result of
    item #3") and why.
    """


class PoolClosedError(ParmapError, RuntimeError, ValueError):
    """A :class:`parmap.Pool` was used after it was closed.

    Also a ``RuntimeError`` (what an executor raises after ``shutdown``) and
    a ``ValueError`` (what ``multiprocessing.Pool`` raises once closed), so
    code written for either catches it.
    """


class RemoteTraceback(Exception):
    """The ``__cause__`` of a re-raised exception: the worker's traceback text.

    Printing the re-raised exception prints this text first, so the line in
    ``fn`` that failed is visible even though it ran in another process.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'

    @property
    def tb(self) -> str:
        """``text``, under the name the ``RemoteTraceback`` of
        ``multiprocessing`` and ``concurrent.futures`` give it."""
        return self.text


# Shown and pickled as ``parmap.WorkerCrashedError`` rather than by the
# private module that defines them.
for _error in (
    ParmapError,
    TaskError,
    WorkerCrashedError,
    TaskTimeoutError,
    SerializationError,
    PoolClosedError,
    RemoteTraceback,
):
    _error.__module__ = "parmap"
del _error
