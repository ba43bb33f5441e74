"""Validated options: every argument is checked once, at the call, by name.

Two groups, because a :class:`parmap.Pool` fixes some for its lifetime and
lets each call override the others:

* :class:`PoolOptions` — what starts workers (``workers``, ``backend``,
  ``start_method``, ``initializer``/``initargs``, ``address``,
  ``max_tasks_per_child``);
* :class:`CallOptions` — what shapes one call (``chunksize``, ``progress``,
  ``timeout``, ``retries``, ``on_error``, ``ordered``).

Errors name the argument and the value, and are raised before any process
starts.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypedDict, cast

OnError = Literal["raise", "skip", "return"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip", "return")
START_METHODS: tuple[str, ...] = ("fork", "spawn", "forkserver")


class PoolCallOverrides(TypedDict, total=False):
    """The per-call options a :class:`~parmap.Pool` method takes as keywords
    (``pool.map(fn, xs, retries=2)``); its ``chunksize`` is a parameter of its
    own, third, as in ``multiprocessing`` (``pool.map(fn, xs, 8)``)."""

    progress: bool | Mapping[str, Any] | None
    timeout: float | None
    retries: int
    on_error: OnError


class CallOverrides(PoolCallOverrides, total=False):
    """The per-call options, ``chunksize`` included."""

    chunksize: int | None


class PoolImapOverrides(PoolCallOverrides, total=False):
    """:class:`PoolCallOverrides` and ``ordered``, which only ``Pool.imap`` takes."""

    ordered: bool


class MapOptions(CallOverrides, total=False):
    """Every option of :func:`parmap.map`: what ``@parallel`` and its ``.map`` take as keywords."""

    workers: int | None
    backend: object
    initializer: Callable[..., object] | None
    initargs: Iterable[Any]
    start_method: str | None
    address: str | None
    max_tasks_per_child: int | None


class ImapOptions(MapOptions, total=False):
    """:class:`MapOptions` and ``ordered``, for ``.imap``."""

    ordered: bool


CALL_OPTION_NAMES = frozenset({"chunksize", "progress", "timeout", "retries", "on_error", "ordered"})
POOL_OPTION_NAMES = frozenset(
    {"workers", "backend", "start_method", "initializer", "initargs", "address", "max_tasks_per_child"}
)


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def _check_workers(value: object) -> int | None:
    return None if value is None else _positive_int("workers", value)


def workers_or_processes(workers: int | None, processes: int | None) -> int | None:
    """``Pool``'s worker count from ``workers=`` or ``processes=``, the name
    ``multiprocessing.Pool`` gives it (checked under that name)."""
    if processes is None:
        return workers
    if workers is not None:
        raise TypeError(
            f"Pool() got workers={workers!r} and processes={processes!r}: "
            "processes is multiprocessing's name for workers; give one of them"
        )
    return _positive_int("processes", processes)


def _check_max_tasks_per_child(value: object) -> int | None:
    return None if value is None else _positive_int("max_tasks_per_child", value)


def _check_chunksize(value: object) -> int | None:
    return None if value is None else _positive_int("chunksize", value)


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a positive number of seconds or None, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:  # an int past float's range (10**400): for ever, or refused below
        seconds = math.inf if cast(int, value) > 0 else -math.inf  # only an int overflows a float
    if not seconds > 0:  # also refuses NaN
        raise ValueError(f"timeout must be a positive number of seconds or None, got {value!r}")
    return seconds


def _check_retries(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"retries must be an int >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"retries must be an int >= 0, got {value!r}")
    return int(value)


def _check_on_error(value: object) -> OnError:
    if value not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of 'raise', 'skip', 'return', got {value!r}")
    return value  # type: ignore[return-value]


def _check_progress(value: object) -> bool | Mapping[str, Any]:
    if value is None:  # as tqdm's own "no bar" spelling reads in wrappers: off
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, Mapping):
        options = dict(value)
        # Checked here, at the call: tqdm would refuse them only once the bar
        # starts, which for imap is the first next().
        unknown = sorted(repr(key) for key in options if key not in _tqdm_options())
        if unknown:
            raise TypeError(f"progress: tqdm takes no option {', '.join(unknown)}")
        _try_drawing(options)
        return options
    raise TypeError(f"progress must be True, False, None or a dict of tqdm options, got {value!r}")


def _try_drawing(options: dict[str, Any]) -> None:
    """Draw a bar with ``options`` once, off-screen, so that a value tqdm
    cannot use (``desc=3``, ``bar_format="{typo}"``) fails at the call, by
    name, and not at the first update of the real bar."""
    import io

    file = options.get("file")
    if file is not None and not callable(getattr(file, "write", None)):
        raise TypeError(f"progress: file must have a write() method, as tqdm writes to it, got {file!r}")
    # With a total, as the bar of a sized input has, for a format naming it.
    trial = {
        "total": 1,
        **options,
        "file": io.StringIO(),
        "disable": False,
        "delay": 0,
        "leave": False,
        "position": None,
    }
    try:
        with _TRIAL_LOCK, _trial_bar()(**trial) as bar:
            bar.update(0)
            bar.refresh()
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise TypeError(f"progress: tqdm cannot draw a bar with {options!r}: {reason}") from error


class _NoLock:
    """A lock that locks nothing, for a bar only this thread can see."""

    def acquire(self, *args: object, **kwargs: object) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass


_TRIAL_LOCK = threading.Lock()  # one trial bar at a time: they share _trial_bar()'s list of bars


def _new_trial_lock() -> None:
    # A worker forked while another thread held it would wait for ever.
    global _TRIAL_LOCK
    _TRIAL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_trial_lock)


@functools.cache
def _trial_bar() -> Any:
    """tqdm, less what a bar drawn off-screen must not touch: the monitor
    thread (tqdm leaves it running for the life of the process), the list of
    bars on screen (which places new bars below those), and tqdm's global
    lock, which a bar that fails to draw never releases."""
    import weakref

    from tqdm import tqdm

    return type("TrialBar", (tqdm,), {"monitor_interval": 0, "_instances": weakref.WeakSet(), "_lock": _NoLock()})


@functools.cache
def _tqdm_options() -> frozenset[str]:
    from tqdm import tqdm

    parameters = inspect.signature(tqdm.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY) - {
        "self",
        "iterable",  # parmap's own
    }


def _check_ordered(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"ordered must be True or False, got {value!r}")
    return value


def _check_start_method(value: object) -> str | None:
    if value is None:
        return None
    if value not in START_METHODS:
        raise ValueError(f"start_method must be one of 'fork', 'spawn', 'forkserver' or None, got {value!r}")
    import multiprocessing

    if value not in multiprocessing.get_all_start_methods():
        raise ValueError(f"start_method={value!r} is not available on this platform")
    return str(value)


def _check_initializer(value: object) -> Callable[..., object] | None:
    if value is not None and not callable(value):
        raise TypeError(f"initializer must be callable or None, got {value!r}")
    if inspect.iscoroutinefunction(value):
        raise TypeError(f"initializer {value!r} is an async function: called, it would only make a coroutine")
    return value  # type: ignore[return-value]


def _check_initargs(value: object) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"initargs must be a tuple of arguments, got {value!r}")
    return tuple(value)  # type: ignore[arg-type]


def _check_address(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"address must be a scheduler address string or None, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Options that shape one ``map``/``imap``/``starmap`` call."""

    chunksize: int | None = None
    progress: bool | Mapping[str, Any] = False
    timeout: float | None = None
    retries: int = 0
    on_error: OnError = "raise"
    ordered: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunksize", _check_chunksize(self.chunksize))
        object.__setattr__(self, "progress", _check_progress(self.progress))
        object.__setattr__(self, "timeout", _check_timeout(self.timeout))
        object.__setattr__(self, "retries", _check_retries(self.retries))
        object.__setattr__(self, "on_error", _check_on_error(self.on_error))
        object.__setattr__(self, "ordered", _check_ordered(self.ordered))

    def updated(self, overrides: Mapping[str, Any]) -> CallOptions:
        """A copy with ``overrides`` applied (validated; unknown names rejected)."""
        unknown = set(overrides) - CALL_OPTION_NAMES
        if unknown:
            message = f"unexpected per-call option(s): {', '.join(sorted(unknown))}"
            if fixed := sorted(unknown & POOL_OPTION_NAMES):
                one = len(fixed) == 1
                message += (
                    f"; {', '.join(fixed)} {'is' if one else 'are'} fixed for the pool's life: "
                    f"pass {'it' if one else 'them'} to parmap.Pool(...)"
                )
            raise TypeError(f"{message}; a call takes {', '.join(sorted(CALL_OPTION_NAMES))}")
        return replace(self, **overrides) if overrides else self


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """Options fixed for the lifetime of a pool: what the workers are."""

    workers: int | None = None
    backend: object = "auto"
    start_method: str | None = None
    initializer: Callable[..., object] | None = None
    initargs: tuple[Any, ...] = field(default=())
    address: str | None = None
    max_tasks_per_child: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", _check_workers(self.workers))
        object.__setattr__(self, "max_tasks_per_child", _check_max_tasks_per_child(self.max_tasks_per_child))
        object.__setattr__(self, "start_method", _check_start_method(self.start_method))
        object.__setattr__(self, "initializer", _check_initializer(self.initializer))
        object.__setattr__(self, "initargs", _check_initargs(self.initargs))
        object.__setattr__(self, "address", _check_address(self.address))

    @property
    def worker_count(self) -> int:
        """``workers``, or the usable CPU count when it was left as ``None``."""
        return self.workers if self.workers is not None else default_workers()


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword options into (pool options, call options); reject the rest."""
    pool = {k: v for k, v in options.items() if k in POOL_OPTION_NAMES}
    call = {k: v for k, v in options.items() if k in CALL_OPTION_NAMES}
    unknown = set(options) - POOL_OPTION_NAMES - CALL_OPTION_NAMES
    if unknown:
        raise TypeError(f"unexpected option(s): {', '.join(sorted(unknown))}")
    return pool, call
