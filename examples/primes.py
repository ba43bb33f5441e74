"""CPU-bound work: count the primes below N, one range of numbers per task.

Trial division is deliberately naive so that each range keeps a core busy.
The script times the serial count and the parallel one and prints the
speedup; with W idle cores expect a little under W times. On a machine whose
cores are busy with other work the speedup shrinks toward 1, because parmap
can only use the cores it gets.

    python examples/primes.py                         # N = 1,000,000
    python examples/primes.py --limit 50000 --workers 2  # the quick version
    python examples/primes.py --backend thread           # threads share one GIL: no speedup
"""

import argparse
import math
import os
import time

import parmap


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def count_primes(bounds: tuple[int, int]) -> int:
    low, high = bounds
    return sum(1 for n in range(low, high) if is_prime(n))


def ranges(limit: int, pieces: int) -> list[tuple[int, int]]:
    step = -(-limit // pieces)
    return [(low, min(low + step, limit)) for low in range(0, limit, step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1_000_000, help="count the primes below this")
    parser.add_argument("--pieces", type=int, default=64, help="how many ranges to split it into")
    parser.add_argument("--workers", type=int, default=None, help="workers (default: all CPUs)")
    parser.add_argument("--backend", default="auto", help="parmap backend; try 'thread' to see the GIL at work")
    args = parser.parse_args()
    pieces = ranges(args.limit, args.pieces)

    start = time.perf_counter()
    serial = [count_primes(piece) for piece in pieces]
    serial_s = time.perf_counter() - start

    start = time.perf_counter()
    # Ranges high up hold bigger numbers and cost more; chunksize=1 lets a
    # worker that drew cheap ranges take the next one instead of idling.
    parallel = parmap.map(count_primes, pieces, workers=args.workers, backend=args.backend, chunksize=1)
    parallel_s = time.perf_counter() - start

    assert parallel == serial, "parallel counts differ from serial ones"
    workers = args.workers or len(os.sched_getaffinity(0))
    print(f"{sum(parallel)} primes below {args.limit:,} in {len(pieces)} ranges")
    print(f"serial   {serial_s:6.2f} s")
    print(f"parallel {parallel_s:6.2f} s  ({workers} workers, backend={args.backend!r})")
    print(f"speedup  {serial_s / parallel_s:6.2f}x")


if __name__ == "__main__":
    main()
