"""The command line's TARGET: ``module:function`` or ``path/to/file.py:function``.

The function travels to workers as its *address* (a :class:`TargetFunction`),
not as its code, and each worker resolves it once. That works under every
start method: a forked worker finds the module already in ``sys.modules``; a
spawned one imports it again. A file target is imported under a module name
derived from its absolute path, the same in the parent and in every worker,
so objects whose classes the file defines pickle by reference both ways.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Target", "TargetError", "TargetFunction", "parse_target", "resolve"]


class TargetError(Exception):
    """TARGET cannot be used: malformed, not found, or failing at import."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed TARGET: where the function lives and the directory its imports need."""

    text: str
    module: str  # the importable name (for a file: the stable name it is loaded under)
    attribute: str  # dotted, e.g. "count" or "Counter.feed"
    path: str | None  # absolute path of a file target
    search_path: str  # put first on sys.path, as ``python -m`` or ``python file.py`` would


def parse_target(text: str, cwd: str | None = None) -> Target:
    """Split TARGET into module (or file) and attribute; the file must exist."""
    where, colon, attribute = text.rpartition(":")
    if not colon or not where or not _is_dotted_name(attribute):
        raise TargetError(f"TARGET must be module:function or path/to/file.py:function, got {text!r}")
    base = cwd if cwd is not None else os.getcwd()
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = os.path.abspath(os.path.join(base, where))
        if not os.path.isfile(path):
            raise TargetError(f"no such file: {where!r} (from TARGET {text!r})")
        return Target(text, _file_module_name(path), attribute, path, os.path.dirname(path))
    if not _is_dotted_name(where):
        raise TargetError(f"{where!r} is not a module name nor a path to a .py file (TARGET {text!r})")
    return Target(text, where, attribute, None, os.path.abspath(base))


def resolve(target: Target) -> Callable[..., Any]:
    """Import the target's module (or file) and return the callable it names."""
    if target.search_path not in sys.path:
        sys.path.insert(0, target.search_path)
    try:
        module = sys.modules.get(target.module) or _import(target)
    except (TargetError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # SystemExit too: a script that exits at import is not a target
        where = target.path or target.module
        raise TargetError(f"cannot import {where!r}{_raised_at(exc, target)}: {_one_line(exc)}") from exc
    value: Any = module
    for part in target.attribute.split("."):
        where = target.path or target.module
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TargetError(f"{where!r} has no attribute {target.attribute!r}") from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a module __getattr__ or a property that raises
            raise TargetError(f"cannot get {target.attribute!r} from {where!r}: {_one_line(exc)}") from exc
    if not callable(value):
        raise TargetError(f"{target.text!r} is not callable (it is a {type(value).__name__})")
    return value  # type: ignore[no-any-return]


class TargetFunction:
    """The user's function as its address: pickles as the :class:`Target`, resolves once per process."""

    __slots__ = ("_fn", "target")

    def __init__(self, target: Target, fn: Callable[..., Any] | None = None) -> None:
        self.target = target
        self._fn = fn

    def __reduce__(self) -> tuple[Any, ...]:
        return (TargetFunction, (self.target,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._fn
        if fn is None:
            fn = self._fn = resolve(self.target)
        return fn(*args, **kwargs)

    def __repr__(self) -> str:
        return self.target.text


def _import(target: Target) -> Any:
    if target.path is None:
        return importlib.import_module(target.module)
    spec = importlib.util.spec_from_file_location(target.module, target.path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {target.path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as the import system does, so that the file's
    # own classes and functions pickle by reference to this name.
    sys.modules[target.module] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(target.module, None)
        raise
    return module


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line: a usage error is one line, whatever the message."""
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ raises
        message = "(its message cannot be shown)"
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _raised_at(exc: BaseException, target: Target) -> str:
    """`` (line N)`` of the target's own file that raised ``exc``, if it was that file."""
    if target.path is None or isinstance(exc, SyntaxError):  # a SyntaxError names its line itself
        return ""
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == target.path]
    return f" (line {lines[-1]})" if lines else ""


def _file_module_name(path: str) -> str:
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    digest = hashlib.sha1(path.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"_parmap_target_{stem}_{digest}"


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))
