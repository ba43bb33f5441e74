"""How many workers? Five tasks that each sleep S seconds, on N = 1, 2, 3 and 5 workers.

Each worker runs one task at a time, so five tasks need ceil(5/N) rounds and
take about ceil(5/N) * S seconds. A worker added helps only when it removes
a round: 3 and 4 workers both need 2 rounds, so the fourth buys nothing. The
script prints what it measured next to that prediction.

    python examples/pool_size.py              # S = 2 s, about 22 s in all
    python examples/pool_size.py --sleep 0.1  # the quick version the tests run
"""

import argparse
import math
import time

import parmap

TASKS = 5


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def measure(workers: int, seconds: float, backend: str) -> float:
    # Workers start with the first chunk; a warm-up call keeps their start-up
    # out of the measurement, so the table shows scheduling and nothing else.
    with parmap.Pool(workers=workers, backend=backend, chunksize=1) as pool:
        pool.map(nap, [0.0] * workers)
        start = time.perf_counter()
        pool.map(nap, [seconds] * TASKS)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each task sleeps (default 2)")
    parser.add_argument("--backend", default="process", help="parmap backend (default process)")
    args = parser.parse_args()

    print(f"{TASKS} tasks of {args.sleep:g} s each, backend={args.backend!r}")
    print(f"{'workers':>7}  {'rounds':>6}  {'predicted':>9}  {'measured':>8}")
    for workers in (1, 2, 3, 5):
        rounds = math.ceil(TASKS / workers)
        predicted = rounds * args.sleep
        measured = measure(workers, args.sleep, args.backend)
        print(f"{workers:>7}  {rounds:>6}  {predicted:>8.2f}s  {measured:>7.2f}s")


if __name__ == "__main__":
    main()
