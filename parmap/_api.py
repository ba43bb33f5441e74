"""``parmap.map``, ``imap`` and ``starmap``: a one-call :class:`~parmap.Pool`.

Options are validated when the function is called (before any process
starts, even for the lazy ``imap``); workers start with the first chunk, so
an empty input starts none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, TypeVar

from ._options import OnError
from ._pool import Pool

T = TypeVar("T")
R = TypeVar("R")


def map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    backend: object = "auto",
    chunksize: int | None = None,
    progress: bool | Mapping[str, Any] | None = False,
    timeout: float | None = None,
    retries: int = 0,
    on_error: OnError = "raise",
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
    start_method: str | None = None,
    address: str | None = None,
    max_tasks_per_child: int | None = None,
) -> list[R]:
    """``[fn(x) for x in items]``, computed in parallel: same length, order and values.

    Example::

        >>> import parmap
        >>> parmap.map(lambda x: x * x, range(5), workers=2)
        [0, 1, 4, 9, 16]

    With ``on_error="skip"`` failed items are left out; with ``"return"`` the
    exception stands in the failed item's place.
    """
    pool = Pool(
        _no_more_than_items(workers, items),
        backend,
        start_method=start_method,
        initializer=initializer,
        initargs=initargs,
        address=address,
        max_tasks_per_child=max_tasks_per_child,
        chunksize=chunksize,
        progress=progress,
        timeout=timeout,
        retries=retries,
        on_error=on_error,
    )
    pool._serve_one_call()
    return _run_once(pool, lambda: pool.map(fn, items))


def starmap(
    fn: Callable[..., R],
    items: Iterable[Iterable[Any]],
    *,
    workers: int | None = None,
    backend: object = "auto",
    chunksize: int | None = None,
    progress: bool | Mapping[str, Any] | None = False,
    timeout: float | None = None,
    retries: int = 0,
    on_error: OnError = "raise",
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
    start_method: str | None = None,
    address: str | None = None,
    max_tasks_per_child: int | None = None,
) -> list[R]:
    """``[fn(*args) for args in items]``, computed in parallel.

    Example::

        >>> import parmap
        >>> parmap.starmap(pow, [(2, 3), (3, 2)], workers=2)
        [8, 9]
    """
    pool = Pool(
        _no_more_than_items(workers, items),
        backend,
        start_method=start_method,
        initializer=initializer,
        initargs=initargs,
        address=address,
        max_tasks_per_child=max_tasks_per_child,
        chunksize=chunksize,
        progress=progress,
        timeout=timeout,
        retries=retries,
        on_error=on_error,
    )
    pool._serve_one_call()
    return _run_once(pool, lambda: pool.starmap(fn, items))


def imap(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    ordered: bool = True,
    workers: int | None = None,
    backend: object = "auto",
    chunksize: int | None = None,
    progress: bool | Mapping[str, Any] | None = False,
    timeout: float | None = None,
    retries: int = 0,
    on_error: OnError = "raise",
    initializer: Callable[..., object] | None = None,
    initargs: Iterable[Any] = (),
    start_method: str | None = None,
    address: str | None = None,
    max_tasks_per_child: int | None = None,
) -> Iterator[R]:
    """Lazily yield ``fn(x)`` for each item; memory stays bounded on any input.

    The input is pulled only as fast as the workers take it, so an endless
    generator is fine. ``ordered=False`` yields results as they finish.
    Stopping early (``break``, ``.close()``, dropping the iterator) stops the
    work and the workers.

    Example::

        for line in parmap.imap(str.upper, open("big.txt"), ordered=False):
            print(line, end="")
    """
    pool = Pool(
        _no_more_than_items(workers, items),
        backend,
        start_method=start_method,
        initializer=initializer,
        initargs=initargs,
        address=address,
        max_tasks_per_child=max_tasks_per_child,
        chunksize=chunksize,
        progress=progress,
        timeout=timeout,
        retries=retries,
        on_error=on_error,
        ordered=ordered,
    )
    pool._serve_one_call()
    try:
        return pool._imap(fn, items, {}, owned=True)
    except BaseException:
        pool.terminate()
        raise


def _no_more_than_items(workers: int | None, items: object) -> int | None:
    """``workers``, but no more than a sized input has items: a pool for one
    call could not use the rest (with ``workers=10**8`` for three items it
    used to spend seconds and gigabytes on the bookkeeping of workers it
    never started, and ``pool``/``apply_async`` start all of theirs)."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1 or not isinstance(items, Sized):
        return workers  # None, or invalid: Pool says what is wrong with it
    try:
        count = len(items)
    except Exception:  # a __len__ that fails: iterating will tell
        return workers
    return max(1, min(workers, count))


def _run_once(pool: Pool, work: Callable[[], list[R]]) -> list[R]:
    try:
        result = work()
    except BaseException:
        pool.terminate()  # errors and Ctrl-C: stop the workers now
        raise
    pool.close()
    return result
