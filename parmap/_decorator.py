"""``@parmap.parallel``: a function that also knows how to map itself."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import _api
from ._options import CallOptions, PoolOptions, split_options

P = ParamSpec("P")
R = TypeVar("R")


class ParallelFunction(Generic[P, R]):
    """A function with ``.map``, ``.imap`` and ``.starmap``; calling it runs it here.

    Made by :func:`parallel`. It keeps the wrapped function's name, docstring
    and signature.
    """

    def __init__(self, fn: Callable[P, R], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)
        self.__wrapped__ = fn
        self._options = options

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    def map(self, items: Iterable[Any], **options: Any) -> list[R]:
        """Map the function over ``items`` in parallel; keywords override the decorator's."""
        return _api.map(self.__wrapped__, items, **{**self._options, **options})

    def imap(self, items: Iterable[Any], **options: Any) -> Iterator[R]:
        """Lazily map the function over ``items``; keywords override the decorator's."""
        return _api.imap(self.__wrapped__, items, **{**self._options, **options})

    def starmap(self, items: Iterable[Iterable[Any]], **options: Any) -> list[R]:
        """``fn(*args)`` for each tuple in ``items``, in parallel."""
        options = {**self._options, **options}
        options.pop("ordered", None)
        return _api.starmap(self.__wrapped__, items, **options)

    def __repr__(self) -> str:
        return f"<parmap.parallel {getattr(self.__wrapped__, '__qualname__', self.__wrapped__)!r}>"


@overload
def parallel(fn: Callable[P, R], /) -> ParallelFunction[P, R]: ...
@overload
def parallel(fn: None = None, /, **options: Any) -> Callable[[Callable[P, R]], ParallelFunction[P, R]]: ...


def parallel(fn: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Give a function ``.map``, ``.imap`` and ``.starmap``.

    Example::

        @parmap.parallel(workers=4, progress=True)
        def resize(path): ...

        resize("a.jpg")          # a plain call, here
        resize.map(paths)        # in parallel

    Options are those of :func:`parmap.map`, checked now; per-call keywords
    override them.
    """
    pool_options, call_options = split_options(options)
    PoolOptions(**pool_options)  # validate at decoration time
    CallOptions(**call_options)
    if fn is None:
        return lambda f: ParallelFunction(f, options)
    if not callable(fn):
        raise TypeError(f"@parallel decorates a callable, got {fn!r}")
    return ParallelFunction(fn, options)
