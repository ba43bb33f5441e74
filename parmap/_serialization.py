"""Everything that crosses a process boundary goes through this module.

* The function travels with cloudpickle, so lambdas, closures, nested
  functions, partials and ``__main__`` functions work under every start
  method. It is pickled once per call and sent to each worker once.
* Items and results travel as whole chunks with the standard pickle
  (protocol 5) because it is several times faster than cloudpickle's
  pure-Python reducer on plain data; only a chunk that plain pickle refuses
  falls back to cloudpickle.
* A failure names what could not travel ("the function", "item #3", "the
  result of item #3") and why, as :class:`~parmap.SerializationError`.
* Exceptions raised by ``fn`` come home as :class:`ErrorInfo`: the pickled
  exception when it pickles, and always its type name, message and
  traceback text, so an exception that will not travel still arrives as
  :class:`~parmap.TaskError` instead of hanging the pool.
"""

from __future__ import annotations

import copyreg
import functools
import io
import operator
import os
import pickle
import reprlib
import sys
import threading
import traceback
import types
from collections import ChainMap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ._errors import RemoteTraceback, SerializationError, TaskError

PROTOCOL = 5

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6
_short.maxtuple = 6
_short.maxdict = 4


def short_repr(value: object) -> str:
    """A repr short enough for an error note."""
    try:
        return _short.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__} object>"


def dumps_function(fn: object, *, local: bool = False, what: str = "the function") -> bytes:
    """Pickle ``fn`` (or any callable payload); name the problem if it cannot be.

    cloudpickle already pickles functions of importable modules by reference
    and the rest (lambdas, closures, ``__main__``) by value. For ``local``
    workers (processes on this machine) a ``__main__`` function goes by
    reference too when the workers can import the script (a forked worker
    has it; spawn and forkserver re-import it): by value, the initializer and
    ``fn`` would each get a private copy of the script's globals, and state
    the initializer set up would be invisible to ``fn``.
    """
    if local and _main_is_importable():
        try:
            return pickle.dumps(fn, protocol=PROTOCOL)
        except Exception:  # noqa: S110 - a lambda or closure: by value below
            pass
    try:
        data: bytes = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except Exception as exc:
        raise _function_error(fn, what, exc) from exc
    return data


def check_function(fn: object, *, local: bool = False, what: str = "the function") -> None:
    """Raise what :func:`dumps_function` would raise, without keeping the bytes.

    For workers that inherit ``fn`` by ``fork`` instead of receiving it: the
    call must still fail the same way on every backend when ``fn`` cannot
    travel. Pickling into a sink costs a walk of the object graph; a large
    captured buffer is handed to the sink as is, never copied.
    """
    if local and _main_is_importable():
        try:
            pickle.Pickler(_Discard(), protocol=PROTOCOL).dump(fn)
            return
        except Exception:  # noqa: S110 - a lambda or closure: by value below
            pass
    try:
        cloudpickle.CloudPickler(_Discard(), protocol=PROTOCOL).dump(fn)
    except Exception as exc:
        raise _function_error(fn, what, exc) from exc


@functools.cache
def _inherited_only_kinds() -> tuple[type, ...]:
    """The classes whose objects multiprocessing lets cross only to a process
    it is starting (a ``Lock``, ``Value``, ``Queue``..., and subclasses):
    pickled at any other time they raise "should only be shared between
    processes through inheritance". Shared ctypes values are told by their
    ``_wrapper`` (see :func:`_inherited_only`)."""
    import multiprocessing.connection
    import multiprocessing.heap
    import multiprocessing.queues
    import multiprocessing.sharedctypes
    import multiprocessing.synchronize

    return (
        multiprocessing.synchronize.SemLock,
        multiprocessing.synchronize.Condition,
        multiprocessing.queues.Queue,
        multiprocessing.queues.SimpleQueue,
        multiprocessing.sharedctypes.SynchronizedBase,
        multiprocessing.heap.BufferWrapper,
        multiprocessing.heap.Arena,
        multiprocessing.connection.Connection,
    )


@functools.cache
def _ctypes_kinds() -> tuple[type, ...]:
    import ctypes

    return (ctypes._SimpleCData, ctypes.Array, ctypes.Structure, ctypes.Union)


def _inherited_only(obj: object) -> bool:
    if isinstance(obj, _inherited_only_kinds()):
        return True
    # A RawValue or RawArray: ctypes over multiprocessing's shared heap (a
    # ctypes value of the user's own pickles as a copy, as it always did).
    return isinstance(obj, _ctypes_kinds()) and hasattr(obj, "_wrapper")


_loading = threading.local()  # the set-aside objects of the payload being loaded


def _set_aside_object(index: int) -> Any:
    return _loading.shared[index]


class _SettingAside:
    """A pickler mixin: objects only a starting process may receive go to
    ``shared`` and are pickled as their index there. ``reducer_override``
    sees every object but those of the builtin types with a fast path of
    their own (ints, strings, lists...), so plain data pickles at full speed."""

    shared: list[Any]

    def _set_aside(self, obj: object) -> tuple[Any, ...] | None:
        if not _inherited_only(obj):
            return None
        self.shared.append(obj)
        return (_set_aside_object, (len(self.shared) - 1,))


class _SettingAsidePickler(_SettingAside, pickle.Pickler):
    def reducer_override(self, obj: object) -> Any:
        reduced = self._set_aside(obj)
        return NotImplemented if reduced is None else reduced


class _SettingAsideCloudPickler(_SettingAside, cloudpickle.CloudPickler):  # type: ignore[misc]
    def reducer_override(self, obj: object) -> Any:
        reduced = self._set_aside(obj)
        return super().reducer_override(obj) if reduced is None else reduced


class InitializerPayload:
    """The initializer and its initargs, on their way to local workers.

    Pickled at once, so that one that cannot travel fails at the call; but a
    ``multiprocessing`` lock, value or queue among the initargs (the way
    ``multiprocessing.Pool`` users share them) is set aside, not pickled: a
    forked worker inherits it, and a spawned one receives it from
    multiprocessing itself as it starts the worker, the one time those
    objects may be pickled.
    """

    __slots__ = ("data", "shared")

    data: bytes
    shared: list[Any]

    def __init__(self, initializer: object, initargs: tuple[Any, ...]) -> None:
        payload = (initializer, tuple(initargs))
        picklers: list[type[pickle.Pickler]] = [_SettingAsideCloudPickler]
        if _main_is_importable():  # as dumps_function(local=True): __main__ by name
            picklers.insert(0, _SettingAsidePickler)
        for pickler_class in picklers:
            buffer = io.BytesIO()
            pickler = pickler_class(buffer, protocol=PROTOCOL)
            pickler.shared = []  # type: ignore[attr-defined]
            try:
                pickler.dump(payload)
            except Exception as exc:
                if pickler_class is picklers[-1]:
                    raise _function_error(payload, "the initializer or its initargs", exc) from exc
                continue
            self.data = buffer.getvalue()
            self.shared = pickler.shared  # type: ignore[attr-defined]
            return

    def load(self) -> tuple[Any, tuple[Any, ...]]:
        """``(initializer, initargs)``, in the worker."""
        _loading.shared = self.shared
        try:
            loaded: tuple[Any, tuple[Any, ...]] = pickle.loads(self.data)
        finally:
            _loading.shared = None
        return loaded

    def __getstate__(self) -> tuple[bytes, list[Any]]:
        return self.data, self.shared

    def __setstate__(self, state: tuple[bytes, list[Any]]) -> None:
        self.data, self.shared = state


def travels_by_name(fn: object, *, local: bool = False) -> bool:
    """True for a function that pickles as its module and name: whatever state
    it reads, it reads in the worker, so every copy of it is the same.

    A function of ``__main__`` counts only for ``local`` workers that can
    import the script (see :func:`dumps_function`); to others it goes by value.
    """
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)):
        return False
    module = getattr(fn, "__module__", None)
    if module is None or (module == "__main__" and not (local and _main_is_importable())):
        return False
    return module_attribute(module, getattr(fn, "__qualname__", "")) is fn


def module_attribute(module: str, qualname: str) -> Any:
    """``module.qualname`` if that module is loaded, else None."""
    target: Any = sys.modules.get(module)
    for name in qualname.split("."):
        target = getattr(target, name, None)
    return target


def _unwrapped(fn: object) -> object:
    for _ in range(8):  # through partials and wrappers (a submit's), not for ever
        inner = fn.func if isinstance(fn, functools.partial) else getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    return fn


def by_value_globals(fn: object) -> dict[str, Any] | None:
    """The globals of a function cloudpickle sent by value (a lambda, or any
    function of a ``__main__`` the workers cannot import), which are a copy
    private to its payload; None for a function of a module."""
    namespace = getattr(_unwrapped(fn), "__globals__", None)
    if not isinstance(namespace, dict):
        return None
    module = sys.modules.get(str(namespace.get("__name__")))
    if module is not None and getattr(module, "__dict__", None) is namespace:
        return None  # a module's own
    return namespace


#: What an initializer set up, for :func:`share_globals`: its globals, and
#: the names among them it set or changed.
InitializerGlobals = tuple[dict[str, Any], frozenset[str]]


class InitializerWatch:
    """The globals an initializer may set, looked at before it runs; after,
    :meth:`changed` says which it set or changed (see :func:`share_globals`)."""

    def __init__(self, initializer: object) -> None:
        copy = by_value_globals(initializer)
        fn = _unwrapped(initializer)
        namespace = copy if copy is not None else getattr(fn, "__globals__", None)
        self._namespace = namespace if isinstance(namespace, dict) else None
        self._names: frozenset[str] | None = None  # None: all of a by-value copy
        if self._namespace is not None and copy is None:
            self._names = _names_used(fn, self._namespace)
        self._before = {k: _fingerprint(v) for k, v in self._watched().items()}

    def _watched(self) -> dict[str, Any]:
        if self._namespace is None:
            return {}
        if self._names is None:
            return {k: v for k, v in self._namespace.items() if not (k.startswith("__") and k.endswith("__"))}
        return {k: self._namespace[k] for k in self._names if k in self._namespace}

    def changed(self) -> InitializerGlobals | None:
        """The initializer's globals and the names it set or changed in them."""
        if self._namespace is None:
            return None
        names = frozenset(k for k, v in self._watched().items() if self._changed(k, v))
        return (self._namespace, names) if names else None

    def _changed(self, name: str, value: object) -> bool:
        before = self._before.get(name)
        if before is None or before[0] != id(value):
            return True  # set, or set anew: no need to pickle what it holds now (a model, say)
        return before != _fingerprint(value)


def _fingerprint(value: object) -> tuple[int, bytes | None]:
    """What tells a value changed: its identity, and for data its pickle (a
    dict the initializer filled in place keeps its identity)."""
    if isinstance(value, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
        return id(value), None
    try:
        return id(value), pickle.dumps(value, protocol=PROTOCOL)
    except Exception:
        return id(value), None  # what does not pickle cannot be in a by-value fn's copy either


def _names_used(fn: object, namespace: dict[str, Any]) -> frozenset[str]:
    """The globals ``fn`` names, and those its module's functions it names do."""
    names: set[str] = set()
    seen: set[int] = set()
    todo = [fn]
    while todo and len(seen) < 256:
        function = todo.pop()
        code = getattr(function, "__code__", None)
        if code is None or id(function) in seen:
            continue
        seen.add(id(function))
        own: set[str] = set()
        codes = [code]
        while codes:  # nested functions and comprehensions included
            current = codes.pop()
            own.update(current.co_names)
            codes.extend(c for c in current.co_consts if hasattr(c, "co_names"))
        names |= own
        todo.extend(value for name in own if getattr(value := namespace.get(name), "__globals__", None) is namespace)
    return frozenset(names)


def _module_name(namespace: dict[str, Any]) -> object:
    name = namespace.get("__name__")
    return "__main__" if name == "__mp_main__" else name  # a spawned worker's name for the script


def share_globals(fn: object, init: InitializerGlobals | None) -> None:
    """Let ``fn`` see what its initializer set up, as in one module.

    Sent by value (a lambda, a script's function where the workers cannot
    import the script), a function unpickles with a private copy of its
    module's globals, so what the initializer stored would be invisible to
    ``fn``, or ``fn``'s store to the initializer. ``fn``'s globals take the
    values the initializer set or changed, once, when ``fn`` arrives (after
    the initializer ran); those it only read stay ``fn``'s own, which were
    pickled later and so are the caller's newer ones.
    """
    if init is None:
        return
    source, names = init
    namespace = getattr(_unwrapped(fn), "__globals__", None)
    if not isinstance(namespace, dict) or namespace is source or _module_name(namespace) != _module_name(source):
        return
    namespace.update((k, source[k]) for k in names if k in source)


class _Discard:
    """A file that keeps nothing; past ``limit`` bytes a write raises :class:`_TooBig`."""

    __slots__ = ("limit", "nbytes")

    def __init__(self, limit: float = float("inf")) -> None:
        self.nbytes = 0
        self.limit = limit

    def write(self, data: Any) -> int:
        # Protocol 5 hands a large buffer (a numpy array's data) over as a
        # PickleBuffer, which has no len(); and a view's len() counts its
        # first dimension, not its bytes.
        size = len(data) if type(data) is bytes else memoryview(data).nbytes
        self.nbytes += size
        if self.nbytes > self.limit:
            raise _TooBig
        return size


def _function_error(fn: object, what: str, exc: BaseException) -> SerializationError:
    return SerializationError(f"{what} {short_repr(fn)} cannot be serialised: {type(exc).__name__}: {exc}")


def _main_is_importable() -> bool:
    """True when worker processes can import ``__main__`` (it is a script file)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.exists(path)


def loads(data: bytes | bytearray) -> Any:
    """Unpickle bytes made by this module (plain pickle reads cloudpickle's output)."""
    return pickle.loads(data)


class Pickled:
    """Pickled values as a list of ``bytes`` parts, big ones kept by reference.

    The pickler is given this as its file: it writes a ``bytes`` value of
    64 KiB or more straight through instead of copying it into its own
    buffer, so a chunk of large ``bytes`` items reaches a worker's socket
    without ever being copied into one message (benchmark W5in). Anything
    else it writes (its frames, views of mutable buffers such as
    ``bytearray`` or arrays) is copied at once, so later changes to an item
    never reach what was pickled. Past ``limit`` bytes a write raises
    :class:`_TooBig`.
    """

    __slots__ = ("limit", "nbytes", "parts")

    def __init__(self, limit: float = float("inf")) -> None:
        self.parts: list[bytes] = []
        self.nbytes = 0
        self.limit = limit

    def write(self, data: Any) -> int:
        part = data if type(data) is bytes else bytes(data)
        self.parts.append(part)
        self.nbytes += len(part)
        if self.nbytes > self.limit:
            raise _TooBig
        return len(part)

    def getvalue(self) -> bytes:
        """The parts as one ``bytes`` (no copy when there is one part)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class _TooBig(Exception):
    """A memo-free pickle outgrew its limit: pickle again with the memo."""


#: Chunks of text pickled without the memo stop at this size and are pickled
#: again with it: only a chunk repeating one big string many times gets there.
MEMOLESS_LIMIT = 64 * 1024 * 1024


def only_type(values: Sequence[Any]) -> type | None:
    """The one exact type of all ``values``, or ``None`` (mixed, or empty).

    Counting identities in C: about a third cheaper than collecting a set
    of types (benchmark W1)."""
    if not values:
        return None
    first = type(values[0])
    return first if operator.countOf(map(type, values), first) == len(values) else None


#: How many items :func:`track_classes` looks at: the classes of a list are
#: most often one or two, and a full pass would cost W1 ~10 ms.
CLASS_SAMPLES = 16


def track_classes(values: Sequence[Any]) -> None:
    """Have cloudpickle know the classes it would send by value among
    ``values`` (a sample of them), before workers are forked.

    A forked worker reads such items from its copy of the input, and its
    results, pickled by value, name their class by an id cloudpickle gives
    it on first pickling. Given in the worker, that id is new to the caller,
    which then rebuilds a twin class: results no longer equal the items'
    kind (a dataclass defined in a function). Given here, before the fork,
    the worker inherits it and the caller finds its own class by it.
    """
    count = len(values)
    if not count or type(values) is range:
        return
    seen: set[type] = set()
    for index in range(0, count, max(1, count // CLASS_SAMPLES)):
        value = values[index]
        kinds = [type(part) for part in value] if type(value) is tuple else [type(value)]  # starmap's
        for kind in kinds:
            if kind in _ALWAYS_PICKLABLE or kind in seen:
                continue
            seen.add(kind)
            try:
                cloudpickle.Pickler(_Discard(), protocol=PROTOCOL).dump(kind)
            except Exception:  # noqa: S112 - the items' own check will say so
                continue


def plain_text(values: Sequence[Any]) -> bool:
    """Whether ``values`` are all ``str`` or all ``bytes`` (exactly those types).

    Such a chunk is pickled without the pickler's memo: remembering each
    string so that a repeat could refer back to it is most of the cost of
    pickling text (a list of short strings: ~6x faster without it, and
    unpickling ~10% faster). Strings are immutable, so a repeat that comes
    back as an equal copy is the same value; that is not so for lists or
    dicts, whose shared parts must stay shared, so they keep the memo.
    """
    kind = only_type(values)
    return kind is str or kind is bytes


def dump_data(
    values: Sequence[Any],
    what: str,
    positions: Sequence[int],
    *,
    memoless: bool | None = None,
    by_value: bool = False,
) -> Pickled:
    """Pickle a chunk of items or results into :class:`Pickled` parts.

    ``what`` is ``"item"`` or ``"the result of item"``; ``positions`` are the
    input positions, used to name the one value that cannot be serialised.
    ``memoless``: pickle without the memo (default: when the values are
    :func:`plain_text`). ``by_value``: with cloudpickle only, which sends
    classes and functions of ``__main__`` by value, for a worker whose
    ``__main__`` lacks them (forked before they were defined, or spawned
    from a notebook or ``python -c``).
    """
    if by_value:
        memoless = False
    elif memoless is None:
        memoless = plain_text(values)
    if memoless:
        try:
            out = Pickled(MEMOLESS_LIMIT)
            pickler = pickle.Pickler(out, protocol=PROTOCOL)
            pickler.fast = True  # no memo (see plain_text)
            pickler.dump(values)
            return out
        except Exception:  # noqa: S110 - _TooBig, or refused: the usual way below
            pass
    if not by_value:
        try:
            out = Pickled()
            pickle.Pickler(out, protocol=PROTOCOL).dump(values)
            return out
        except Exception:  # noqa: S110 - plain pickle refused: cloudpickle may not
            pass
    try:
        out = Pickled()
        cloudpickle.Pickler(out, protocol=PROTOCOL).dump(values)
        return out
    except Exception:
        bad, exc = find_unpicklable(values)
        raise _value_error(what, positions[bad] if bad is not None else positions[0], exc) from exc


def _value_error(what: str, position: int, exc: BaseException) -> SerializationError:
    error = SerializationError(f"{what} #{position} cannot be serialised: {type(exc).__name__}: {exc}")
    error.position = position  # lets the scheduler fail just that item
    return error


#: Values of these types always pickle: a chunk of nothing else needs no check.
_ALWAYS_PICKLABLE = frozenset({int, float, complex, bool, str, bytes, type(None)})


def refused_items(values: Sequence[Any], positions: Sequence[int]) -> dict[int, SerializationError]:
    """The items that :func:`dump_data` would refuse, by offset, with its errors.

    For items that a worker read from its own copy of the input instead of
    receiving them pickled: an item that could not be pickled fails the same
    way on every start method. Cheap for plain data (a type check in C), else
    one pickling pass into nothing, without the memo when it can be
    (:func:`_pickles_memoless`).
    """
    if not values or type(values) is range:
        return {}  # a slice of a range input holds ints only
    kind = only_type(values)
    if kind in _ALWAYS_PICKLABLE or (kind is None and set(map(type, values)) <= _ALWAYS_PICKLABLE):
        return {}
    if _pickles_memoless(values):
        return {}
    for pickler in (pickle.Pickler, cloudpickle.Pickler):
        try:
            pickler(_Discard(), protocol=PROTOCOL).dump(values)
            return {}
        except Exception:  # noqa: S112 - plain pickle refused: cloudpickle may not
            continue
    refused: dict[int, SerializationError] = {}
    for offset, value in enumerate(values):
        try:
            cloudpickle.Pickler(_Discard(), protocol=PROTOCOL).dump(value)
        except Exception as exc:
            refused[offset] = _value_error("item", positions[offset], exc)
    return refused


def _pickles_memoless(values: Sequence[Any]) -> bool:
    """Whether plain pickle takes ``values`` with no memo, in at most
    :data:`MEMOLESS_LIMIT` bytes.

    Only a check, so the memo's one job, keeping shared parts shared, is
    moot, and without it pickling tuples or dicts is 3-5x cheaper (a
    ``starmap`` over 1,000,000 pairs: 55 -> 15 ms per 500,000). What this
    refuses (a cycle, which fast mode cannot pickle; one object shared so
    often that repeating it outgrows the limit; anything plain pickle
    refuses) gets the usual check.
    """
    pickler = pickle.Pickler(_Discard(MEMOLESS_LIMIT), protocol=PROTOCOL)
    pickler.fast = True  # no memo
    try:
        pickler.dump(values)
    except Exception:
        return False
    return True


def find_unpicklable(values: Sequence[Any]) -> tuple[int | None, BaseException]:
    """The offset of the first value that cloudpickle refuses, and why."""
    last: BaseException = SerializationError("unknown serialisation failure")
    for offset, value in enumerate(values):
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL)
        except Exception as exc:
            return offset, exc
    return None, last


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def traceback_text(exc: BaseException) -> str:
    """The traceback as Python prints it, less parmap's own frames above the
    first of the user's: the text starts where the user's code does."""
    report = traceback.TracebackException.from_exception(exc)
    own = 0
    while own < len(report.stack) - 1 and report.stack[own].filename.startswith(_PACKAGE_DIR):
        own += 1
    del report.stack[:own]
    return "".join(report.format())


@dataclass(slots=True)
class ErrorInfo:
    """An exception raised by ``fn``, in a form that always travels.

    ``exc`` is set when the exception never left the process (thread and
    serial backends); ``payload`` holds it pickled otherwise. The text fields
    are always present so that :meth:`rebuild` can fall back to
    :class:`~parmap.TaskError`.
    """

    type_name: str
    message: str
    traceback_text: str
    payload: bytes | None = None
    exc: BaseException | None = None
    #: Not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``): it stops
    #: the call, as in a serial loop, whatever ``retries`` and ``on_error`` say.
    stops: bool = False
    #: The exception's notes, for a TaskError standing in for it (the user's
    #: own, and "raised by the initializer").
    notes: tuple[str, ...] = ()
    #: parmap's own word about the item (it or its result would not travel),
    #: not an exception of fn's: one fn raised is fn's even when it is a
    #: ParmapError (a map nested in fn failed), and is named as fn's.
    by_parmap: bool = False

    @classmethod
    def capture(cls, exc: BaseException, *, pickle_it: bool) -> ErrorInfo:
        notes = getattr(exc, "__notes__", None)
        info = cls(
            type_name=f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            message=_safe_str(exc),
            traceback_text=traceback_text(exc),
            stops=not isinstance(exc, Exception),
            notes=tuple(note for note in notes if isinstance(note, str)) if isinstance(notes, list) else (),
        )
        if not pickle_it:
            info.exc = exc
            return info
        # Drop the chained traceback objects: they are not picklable and the
        # text above already carries them.
        exc.__traceback__ = None
        # By reference first: a class the caller can import (a forked worker's
        # __main__ is the caller's) comes back as the caller's very class, so
        # `except MyError:` works. cloudpickle would send a class of __main__
        # by value, and the caller would get a twin. Each form is loaded here
        # once: an exception can pickle and still not load, most often one
        # whose __init__ takes other arguments than it passes on to
        # Exception.__init__ (its args); its state alone then rebuilds it.
        for pickler, form in (
            (pickle.Pickler, exc),
            (pickle.Pickler, _ExceptionState(exc)),
            (cloudpickle.Pickler, exc),
            (cloudpickle.Pickler, _ExceptionState(exc)),
        ):
            try:
                payload = _dumps_exception(pickler, form)
                pickle.loads(payload)
            except Exception:  # noqa: S112 - the next form, or TaskError in the end
                continue
            info.payload = payload
            break
        return info

    def __getstate__(self) -> tuple[object, ...]:
        # Never pickle the live exception object; the payload stands for it.
        return (self.type_name, self.message, self.traceback_text, self.payload, self.stops, self.notes, self.by_parmap)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.type_name, self.message, self.traceback_text, self.payload, self.stops, self.notes, self.by_parmap = state
        self.exc = None

    def rebuild(self) -> BaseException:
        """The exception to raise in the caller, with the worker traceback as cause."""
        exc: BaseException | None = self.exc
        if exc is None and self.payload is not None:
            try:
                exc = pickle.loads(self.payload)
            except Exception:
                exc = None
        if exc is None:
            exc = TaskError(self.type_name, self.message, self.traceback_text)
            for note in self.notes:
                exc.add_note(note)
        exc.__cause__ = RemoteTraceback(self.traceback_text)
        return exc


def _dumps_exception(pickler_class: type[pickle.Pickler], form: object) -> bytes:
    """``form`` pickled by ``pickler_class``, as Python pickles an exception.

    Importing ``distributed`` has tblib register a reducer with ``copyreg``
    for every exception class; it rebuilds an exception without its
    ``__init__``, which loses what builtin ones keep in C fields (a
    ``UnicodeDecodeError``'s message, a ``SystemExit``'s code). Those
    reducers are left out here, on every backend alike.
    """
    buffer = io.BytesIO()
    pickler = pickler_class(buffer, protocol=PROTOCOL)
    table = _plain_dispatch_table()
    chain = getattr(pickler, "dispatch_table", None)
    if isinstance(chain, ChainMap):  # cloudpickle's: its own reducers, then copyreg's
        table = {**table, **chain.maps[0]}
    pickler.dispatch_table = table  # type: ignore[misc]
    pickler.dump(form)
    return buffer.getvalue()


_plain_table: tuple[int, dict[Any, Any]] = (-1, {})


def _plain_dispatch_table() -> dict[Any, Any]:
    """``copyreg.dispatch_table`` less tblib's exception reducers (kept until it changes size)."""
    global _plain_table
    size, table = _plain_table
    if size != len(copyreg.dispatch_table):
        table = {
            cls: reducer
            for cls, reducer in copyreg.dispatch_table.items()
            if not str(getattr(reducer, "__module__", "")).startswith("tblib")
        }
        _plain_table = (len(copyreg.dispatch_table), table)
    return table


class _ExceptionState:
    """Pickles an exception as its class, ``args`` and attributes, and
    unpickles it without calling its ``__init__`` (see ``ErrorInfo.capture``)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return (_restore_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", {}))))


def _restore_exception(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"
