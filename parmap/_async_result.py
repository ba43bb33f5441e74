"""``AsyncResult``: ``multiprocessing.pool.AsyncResult``'s interface, for
``Pool.apply_async``, ``map_async`` and ``starmap_async``.

Code written for ``multiprocessing.Pool`` carries over unchanged: ``get``
raises ``multiprocessing.TimeoutError`` when the result is not ready in
time, and ``callback``/``error_callback`` have run by the time ``get`` or
``wait`` returns. New code can use :meth:`parmap.Pool.submit`, whose
``concurrent.futures.Future`` composes with ``as_completed`` and ``wait``.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

R = TypeVar("R")

# What a callback raised is logged, not raised: it has no caller to reach,
# and the result it was given is still the result (concurrent.futures logs
# a done-callback's error the same way).
_logger = logging.getLogger("parmap")


class AsyncResult(Generic[R]):
    """The result of ``Pool.apply_async``/``map_async``/``starmap_async``, once it is ready.

    Example::

        with parmap.Pool(workers=2) as pool:
            pending = pool.map_async(abs, [-1, -2])
            assert pending.get(timeout=30) == [1, 2]
    """

    def __init__(
        self,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        self._callback = callback
        self._error_callback = error_callback
        self._ready = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def ready(self) -> bool:
        """Whether the call has finished, its callback included."""
        return self._ready.is_set()

    def successful(self) -> bool:
        """Whether the call returned; ``ValueError`` if it has not finished."""
        if not self._ready.is_set():
            raise ValueError(f"{self!r} is not ready")
        return self._error is None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the result is ready, or ``timeout`` seconds have passed."""
        self._ready.wait(timeout)

    def get(self, timeout: float | None = None) -> R:
        """The result; the call's exception if it raised; ``multiprocessing.TimeoutError`` if not ready in time."""
        if not self._ready.wait(timeout):
            raise multiprocessing.TimeoutError(f"the result was not ready within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        state = "pending" if not self._ready.is_set() else ("failed" if self._error is not None else "done")
        return f"<parmap.AsyncResult {state}>"

    # -- for the pool --------------------------------------------------
    @property
    def _has_callbacks(self) -> bool:
        return self._callback is not None or self._error_callback is not None

    def _set(self, value: Any = None, error: BaseException | None = None) -> None:
        """Record the outcome, run the matching callback, then wake the waiters."""
        self._value, self._error = value, error
        try:
            if error is None:
                if self._callback is not None:
                    self._callback(value)
            elif self._error_callback is not None:
                self._error_callback(error)
        except Exception:
            _logger.exception("exception calling the callback of %r", self)
        finally:
            self._ready.set()

    def _set_from(self, future: Future[Any]) -> None:
        """``_set`` from a settled future (a done-callback of ``Pool.submit``'s)."""
        try:
            value = future.result()
        except BaseException as exc:  # CancelledError too: shutdown(cancel_futures=True) took it back
            self._set(error=exc)
        else:
            self._set(value)
