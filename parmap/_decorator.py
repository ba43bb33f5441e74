"""``@parmap.parallel``: a function that also knows how to map itself."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, Unpack, overload

from . import _api
from ._options import CallOptions, ImapOptions, MapOptions, PoolOptions, split_options
from ._serialization import module_attribute
from .backends import check_backend

P = ParamSpec("P")
R = TypeVar("R")


class ParallelFunction(Generic[P, R]):
    """A function with ``.map``, ``.imap`` and ``.starmap``; calling it runs it here.

    Made by :func:`parallel`. It keeps the wrapped function's name, docstring
    and signature, binds like a function when it decorates a method
    (``obj.method.map(items)`` calls ``method(obj, item)``), and pickles by
    reference to its module, as the function it replaced did.
    """

    __name__: str  # the wrapped function's, as functools.wraps copies them
    __qualname__: str

    def __init__(self, fn: Callable[P, R], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)
        self.__wrapped__ = fn
        self._options = options

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.__wrapped__(*args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> ParallelFunction[..., R]:
        # Only R is kept. Bound, the parameters less ``self`` cannot be spelled;
        # through the class, a type checker hands a decorated classmethod over
        # as a function that still takes ``cls``, which no overload can tell
        # from a method's ``self``.
        fn = self.__wrapped__
        if isinstance(fn, (staticmethod, classmethod)):  # @parallel above them: they bind as they would
            return ParallelFunction(fn.__get__(instance, owner), self._options)
        if instance is None:
            return self
        return ParallelFunction(types.MethodType(fn, instance), self._options)

    def __reduce__(self) -> str | tuple[Any, ...]:
        named = self._named()
        if named and self.__module__ != "__main__":  # a remote worker's __main__ is not the script
            # A string: pickle stores ``module.qualname`` and imports it back.
            return str(self.__qualname__)  # type: ignore[attr-defined]
        if named:
            self._name_the_wrapped_function()
        return (ParallelFunction, (self.__wrapped__, self._options))

    def _name_the_wrapped_function(self) -> None:
        """Let the standard pickle find the function of ``__main__`` under this one.

        cloudpickle carries a ``__main__`` function by value, which a remote
        worker needs; the standard pickle (``multiprocessing.Pool``,
        ``ProcessPoolExecutor``) only by name, and ``__main__.name`` is this
        object now. ``name.__wrapped__`` is the function, in the caller and in
        a worker that runs the script again (spawn) alike.
        """
        fn = self.__wrapped__
        qualname = f"{self.__qualname__}.__wrapped__"  # type: ignore[attr-defined]
        if getattr(fn, "__module__", None) == "__main__" and module_attribute("__main__", qualname) is fn:
            try:
                fn.__qualname__ = qualname
            except (AttributeError, TypeError):  # a callable that fixes its name: by value only
                pass

    def map(self, items: Iterable[Any], **options: Unpack[MapOptions]) -> list[R]:
        """Map the function over ``items`` in parallel; keywords override the decorator's."""
        return _api.map(self._travelling(), items, **{**self._unordered_options(), **options})

    def imap(self, items: Iterable[Any], **options: Unpack[ImapOptions]) -> Iterator[R]:
        """Lazily map the function over ``items``; keywords override the decorator's."""
        return _api.imap(self._travelling(), items, **{**self._options, **options})

    def starmap(self, items: Iterable[Iterable[Any]], **options: Unpack[MapOptions]) -> list[R]:
        """``fn(*args)`` for each tuple in ``items``, in parallel."""
        return _api.starmap(self._travelling(), items, **{**self._unordered_options(), **options})

    def _unordered_options(self) -> dict[str, Any]:
        """The decorator's options less ``ordered``, which only ``imap`` takes."""
        return {k: v for k, v in self._options.items() if k != "ordered"}

    def _travelling(self) -> Callable[..., Any]:
        # The decorated function's module attribute is this object, so the
        # bare function cannot be pickled by name; this object can, and a
        # worker that imports the module then shares its globals (with the
        # state an initializer set up there).
        return self if self._named() else self.__wrapped__

    def _named(self) -> bool:
        """True when ``module.qualname`` is this object, so pickle finds it by name."""
        return module_attribute(self.__module__, getattr(self, "__qualname__", "")) is self

    def __repr__(self) -> str:
        return f"<parmap.parallel {getattr(self, '__qualname__', self.__wrapped__)!r}>"


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
    check_backend(pool_options.get("backend", "auto"))
    CallOptions(**call_options)
    if fn is None:
        return lambda f: ParallelFunction(f, options)
    if not callable(fn) and not isinstance(fn, classmethod):
        raise TypeError(f"@parallel decorates a callable, got {fn!r}")
    return ParallelFunction(fn, options)
