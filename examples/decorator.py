"""``@parmap.parallel``: one function, called plainly or mapped in parallel.

The decorated function stays an ordinary function (same name, docstring and
signature) when called; ``.map``, ``.imap`` and ``.starmap`` run it on
workers. This script uses ``start_method="spawn"``, the strictest start
method (fresh interpreters that inherit nothing; multiprocessing's default
on macOS and Windows), to show that a function defined in the script itself
still works there.

    python examples/decorator.py
"""

import inspect
import os

import parmap


@parmap.parallel(workers=2, start_method="spawn")
def word_count(text: str, *, lower: bool = True) -> tuple[str, int]:
    """The longest word of ``text`` and how many words it has."""
    words = (text.lower() if lower else text).split()
    return max(words, key=len, default=""), len(words)


@parmap.parallel(workers=2, start_method="spawn")
def where(n: int) -> int:
    """The worker's process id, to show the work left this process."""
    return os.getpid()


@parmap.parallel
def power(base: int, exponent: int) -> int:
    return base**exponent


LINES = [
    "Spawn starts every worker as a fresh interpreter",
    "so whatever a task needs has to travel to it",
    "parmap sends the function with cloudpickle",
    "which is why this decorated function works",
]


def main() -> None:
    print(f"plain call, here:   {word_count('It stays a normal function')}")
    print(f"keeps its metadata: {word_count.__name__}{inspect.signature(word_count)}: {word_count.__doc__}")
    print(f".map on spawn:      {word_count.map(LINES)}")
    arrived = sorted(word_count.imap(LINES, ordered=False))
    print(f".imap unordered:    {len(arrived)} results, sorted: {arrived[0]} ...")
    print(f".starmap:           {power.starmap([(2, 10), (3, 4), (10, 3)], workers=2, backend='thread')}")
    # Per-call keywords override the decorator's: one item per chunk spreads
    # these few items over both workers.
    pids = set(where.map(range(8), chunksize=1))
    print(f"ran in {len(pids)} worker process(es), none of them this one: {os.getpid() not in pids}")


if __name__ == "__main__":
    main()
