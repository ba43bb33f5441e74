"""The smallest useful parmap program: square numbers on every core, with a bar."""

import parmap


def slow_square(x: int) -> int:
    total = 0
    for _ in range(20_000):
        total += x
    return total * x // 20_000


if __name__ == "__main__":
    results = parmap.map(slow_square, range(2_000), progress={"desc": "squares"})
    assert results == [x * x for x in range(2_000)]
    print(f"{len(results)} squares, the last is {results[-1]}")
