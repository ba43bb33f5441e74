"""Checked by mypy (``[tool.mypy] files``), never run: the public API's types
as a user's code meets them. A wrong annotation fails CI here, and so does a
wrong call that mypy stops rejecting (its ``type: ignore`` becomes unused)."""

# mypy: warn-unused-ignores

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from typing import assert_type

import parmap


def to_text(x: int) -> str:
    return str(x)


def pair_sum(a: int, b: int) -> int:
    return a + b


assert_type(parmap.map(to_text, [1, 2]), list[str])
assert_type(parmap.map(to_text, range(3), workers=2, chunksize=4, on_error="skip"), list[str])
assert_type(parmap.imap(to_text, iter([1, 2]), ordered=False), Iterator[str])
assert_type(parmap.starmap(pair_sum, [(1, 2)]), list[int])

with parmap.Pool(workers=2, backend="thread") as pool:
    assert_type(pool.map(to_text, [1]), list[str])
    assert_type(pool.imap(to_text, [1]), Iterator[str])
    assert_type(pool.map(to_text, [1], 8), list[str])
    assert_type(pool.imap_unordered(to_text, [1], 8, retries=1), Iterator[str])
    assert_type(pool.starmap(pair_sum, [(1, 2)]), list[int])
    assert_type(pool.submit(to_text, 1), Future[str])
    pool.submit(to_text, "one")  # type: ignore[arg-type]  # checked like the function's own call

assert_type(parmap.map(to_text, [1], progress=None), list[str])  # None: no bar, as False
assert_type(parmap.map(to_text, [1], max_tasks_per_child=100), list[str])
assert_type(parmap.Pool(progress={"desc": "work"}), parmap.Pool)


@parmap.parallel
def cube(x: int) -> int:
    return x**3


@parmap.parallel(workers=2, progress=True)
def half(x: float) -> float:
    return x / 2


assert_type(cube(2), int)
assert_type(cube.__name__, str)
assert_type(cube.map([1, 2]), list[int])
assert_type(cube.imap([1, 2]), Iterator[int])
assert_type(half(2.0), float)
assert_type(half.map([1.0], chunksize=1), list[float])


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    @parmap.parallel
    def scale(self, x: int) -> int:
        return x * self.factor


assert_type(Scaler(3).scale(2), int)
assert_type(Scaler(3).scale.map([1, 2]), list[int])


class Tally:
    step = 3

    @parmap.parallel
    @classmethod
    def count(cls, x: int) -> int:
        return x * cls.step

    @parmap.parallel
    @staticmethod
    def double(x: int) -> int:
        return 2 * x


assert_type(Tally.count(2), int)  # through the class: cls is bound, as classmethod binds it
assert_type(Tally().count(2), int)
assert_type(Tally.count.map([1, 2]), list[int])
assert_type(Tally.double(2), int)
assert_type(Tally().double.map([1]), list[int])


def rejected_calls(pool: parmap.Pool) -> None:
    """Calls that always fail at run time, which the types must refuse too."""
    pool.map(to_text, [1], on_error="ignore")  # type: ignore[arg-type]
    pool.map(to_text, [1], workers=3)  # type: ignore[call-arg]
    pool.map(to_text, [1], ordered=False)  # type: ignore[call-arg]
    pool.imap(to_text, [1], retries="2")  # type: ignore[arg-type]
    pool.map(to_text, [1], "8")  # type: ignore[arg-type]
    pool.imap_unordered(to_text, [1], ordered=True)  # type: ignore[call-arg]
    cube.map([1], on_error="ignore")  # type: ignore[arg-type]
    cube.map([1], workerz=2)  # type: ignore[call-arg]
    cube.starmap([(1,)], ordered=False)  # type: ignore[call-arg]
