"""Checked by mypy (``[tool.mypy] files``), never run: the public API's types
as a user's code meets them. A wrong annotation fails CI here."""

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
    assert_type(pool.starmap(pair_sum, [(1, 2)]), list[int])
    assert_type(pool.submit(to_text, 1), Future[str])
    pool.submit(to_text, "one")  # type: ignore[arg-type]  # checked like the function's own call

assert_type(parmap.map(to_text, [1], progress=None), list[str])  # None: no bar, as False
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
