"""The functions and inputs of workloads W1-W7 (see benchmarks/README.md).

Everything a worker must call lives at module level here, so that peers that
pickle functions by reference (``multiprocessing``, ``concurrent.futures``,
joblib's loky workers started by spawn) can import it. ``bench.py`` puts this
directory on ``sys.path`` (and in ``PYTHONPATH`` for its case processes).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

MIB = 1 << 20
#: W7: the size of the data a closure captures.
CAPTURE_BYTES = 10 * 1000 * 1000


# -- functions that run in workers -------------------------------------------
def square(x: int) -> int:
    """W1, W4, W6: as little work as a task can be."""
    return x * x


def multiply(a: int, b: int) -> int:
    """W1s: as little work as a two-argument task can be."""
    return a * b


def spin(n: int) -> int:
    """W2, W3: ``n`` iterations of pure-Python CPU work (holds the GIL)."""
    total = 0
    for i in range(n):
        total += i
    return total


def spin_times(n: int, times: int) -> None:
    """:func:`spin` ``times`` times over (the parallel-ceiling probe in ``bench.py``)."""
    for _ in range(times):
        spin(n)


def nbytes(data: bytes) -> int:
    """W5 in: a cheap function of a large argument."""
    return len(data)


def make_mib(i: int) -> bytes:
    """W5 out: a distinct 1 MiB result from a tiny argument."""
    return i.to_bytes(8, "little") * (MIB // 8)


def add_len(data: bytes, x: int) -> int:
    """W7 for peers that pickle by reference: ``partial(add_len, big)``."""
    return x + len(data)


def add_const(n: int, x: int) -> int:
    """W7 without the capture, for the same peers: ``partial(add_const, n)``."""
    return x + n


# -- inputs ---------------------------------------------------------------------
def calibrate_spin(ms: float) -> int:
    """How many :func:`spin` iterations take about ``ms`` milliseconds here."""
    n = 200_000
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        spin(n)
        best = min(best, time.perf_counter() - started)
    return max(1, int(n * (ms / 1000) / best))


def heavy_tailed(count: int, base: int, factor: int = 40, share: float = 0.05, seed: int = 5) -> list[int]:
    """W3: ``count`` spin sizes, ``share`` of them ``factor`` times the others, at random places."""
    sizes = [base] * count
    rng = random.Random(seed)
    for position in rng.sample(range(count), max(1, round(count * share))):
        sizes[position] = base * factor
    return sizes


def distinct_mib(count: int) -> list[bytes]:
    """W5 in: ``count`` different 1 MiB ``bytes`` objects."""
    return [make_mib(i) for i in range(count)]


class CountingRange:
    """W6: a generator-like iterator over ``range(n)`` that counts what was pulled.

    It has no ``__len__`` and no ``__length_hint__``, so a library cannot tell
    how long it is (just like a generator reading a file).
    """

    def __init__(self, n: int) -> None:
        self.pulled = 0
        self._it = iter(range(n))

    def __iter__(self) -> Iterator[int]:
        return self._gen()

    def _gen(self) -> Iterator[int]:
        for x in self._it:
            self.pulled += 1
            yield x


def capture_fn(size: int, *, captured: bool, by_reference: bool) -> Callable[[int], int]:
    """W7's function: ``x + len(big)`` with ``big`` captured, or the constant inlined.

    ``by_reference`` gives a ``functools.partial`` of a module-level function
    (what ``pickle`` can send: Pool, ProcessPoolExecutor); otherwise a lambda
    (what a user writes; parmap, joblib and mpire accept it).
    """
    if captured:
        big = os.urandom(size)
        if by_reference:
            return functools.partial(add_len, big)
        return lambda x: x + len(big)
    if by_reference:
        return functools.partial(add_const, size)
    return lambda x: x + size


# -- checking ---------------------------------------------------------------------
class Digest:
    """An order-sensitive fingerprint of a result sequence, fed one result at a time."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=16)
        self.count = 0

    def add(self, value: Any) -> None:
        self.count += 1
        self._hash.update(value if isinstance(value, bytes) else repr(value).encode())
        self._hash.update(b"|")

    def extend(self, values: Any) -> Digest:
        for value in values:
            self.add(value)
        return self

    def hexdigest(self) -> str:
        return f"{self.count}:{self._hash.hexdigest()}"
