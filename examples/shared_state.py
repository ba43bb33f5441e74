"""Shared state: usually return it; sometimes a Manager is the right tool.

Classic multiprocessing code often gives every task a ``Manager().dict()``
to write its findings into. Each write is a round trip to the manager
process under a lock, and the result depends on who wrote last. Part 1 does
the same job the parmap way:

* state a worker needs (a compiled pattern, a stop-word set, a connection)
  is built once per worker by ``initializer``;
* what a task finds comes back as its return value (here a Counter), and
  the caller combines them; a reduction in the caller needs no locks.

Return values arrive only when a task ends, though. When tasks must see each
other's progress *while they run*, a ``multiprocessing.Manager`` is still the
tool. Part 2: a proof-of-work search split into ranges, where
the first worker to find an answer sets a shared Event and every other task
stops early instead of finishing its range.

    python examples/shared_state.py
"""

import argparse
import functools
import hashlib
import multiprocessing
import os
import re
import time
from collections import Counter
from typing import Any

import parmap

# -- part 1: per-worker setup with initializer, results combined in the caller --


# This worker's state: filled once per worker by setup_worker, read by every task.
_worker_state: dict[str, Any] = {}


def setup_worker(stop_words: list[str]) -> None:
    # Runs once in each worker: costly set-up is paid per worker, not per item.
    _worker_state["pattern"] = re.compile(r"[a-z']+")
    _worker_state["stop"] = frozenset(stop_words)


def count_words(document: str) -> tuple[int, Counter[str]]:
    pattern, stop = _worker_state["pattern"], _worker_state["stop"]
    words = (w for w in pattern.findall(document.lower()) if w not in stop)
    return os.getpid(), Counter(words)


DOCUMENTS = [
    "the quick brown fox jumps over the lazy dog",
    "a lazy afternoon and a quick nap for the dog",
    "the fox and the dog are friends after all",
    "quick thinking saves the day for the brown fox",
] * 25


def word_frequencies(workers: int) -> None:
    per_task = parmap.map(
        count_words,
        DOCUMENTS,
        workers=workers,
        initializer=setup_worker,
        initargs=(["the", "a", "and", "for", "are", "over", "after", "all"],),
    )
    total: Counter[str] = Counter()
    per_worker: Counter[int] = Counter()
    for pid, counts in per_task:
        total.update(counts)
        per_worker[pid] += 1
    assert total["fox"] == 75 and "the" not in total
    print(f"{len(DOCUMENTS)} documents, {sum(total.values())} words counted on {len(per_worker)} workers")
    print(f"most common: {total.most_common(4)}")


# -- part 2: live coordination between running tasks, via a Manager --------


def search(found: Any, bounds: tuple[str, int, int, int]) -> tuple[int | None, int]:
    """The first nonce in [low, high) whose hash starts with ``zeros`` zeros, and how many were tried."""
    seed, zeros, low, high = bounds
    prefix = "0" * zeros
    for nonce in range(low, high):
        # Asking the manager costs a round trip, so ask every thousand nonces.
        if (nonce - low) % 1000 == 0 and found.is_set():
            return None, nonce - low
        if hashlib.sha256(f"{seed}:{nonce}".encode()).hexdigest().startswith(prefix):
            found.set()
            return nonce, nonce - low + 1
    return None, high - low


def proof_of_work(workers: int, zeros: int, ranges: int, span: int) -> None:
    with multiprocessing.Manager() as manager:
        found = manager.Event()
        start = time.perf_counter()
        # The Event's proxy travels inside the function, once per worker; each
        # worker's proxy talks to the same manager process.
        results = parmap.map(
            functools.partial(search, found),
            [("parmap", zeros, n * span, (n + 1) * span) for n in range(ranges)],
            workers=workers,
            chunksize=1,
        )
        elapsed = time.perf_counter() - start
    nonces = [nonce for nonce, _ in results if nonce is not None]
    tried = sum(count for _, count in results)
    if not nonces:
        print(f"no nonce below {ranges * span:,} gives {zeros} leading zeros; try a larger --ranges")
        return
    nonce = min(nonces)
    digest = hashlib.sha256(f"parmap:{nonce}".encode()).hexdigest()
    print(f"nonce {nonce} -> sha256 {digest[:16]}... in {elapsed:.2f} s")
    print(f"tried {tried:,} of {ranges * span:,} nonces: the shared Event stopped the other tasks early")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--zeros", type=int, default=4, help="leading hex zeros the proof of work needs")
    parser.add_argument("--ranges", type=int, default=200, help="how many ranges of nonces to split the search into")
    parser.add_argument("--span", type=int, default=5000, help="nonces per range")
    args = parser.parse_args()

    print("== part 1: initializer + return values, no shared dict ==")
    word_frequencies(args.workers)
    print("== part 2: a Manager Event, for tasks that must see each other ==")
    proof_of_work(args.workers, args.zeros, args.ranges, args.span)


if __name__ == "__main__":
    main()
