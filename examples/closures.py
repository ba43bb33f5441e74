"""Lambdas and closures on ``start_method="spawn"``, where pickle gives up.

With plain multiprocessing, ``Pool().map(lambda x: ..., items)`` fails with
"Can't pickle <function <lambda>>", and so does a function nested in another
function. parmap sends ``fn`` with cloudpickle, which carries the code and
whatever it captured. It sends it once per worker, not once per item, so a
large lookup table captured by a lambda crosses the process boundary once
for each worker.

    python examples/closures.py
"""

import functools
import os

import parmap


def main() -> None:
    # Local data: nothing a spawned worker could import.
    exchange_rates = {"EUR": 1.08, "GBP": 1.27, "JPY": 0.0067, "USD": 1.0}
    big_table = {n: n * n for n in range(200_000)}  # a few MB once pickled
    orders = [("EUR", 120.0), ("JPY", 15_000), ("GBP", 9.99), ("USD", 42.0)] * 5

    to_usd = parmap.map(
        lambda order: round(order[1] * exchange_rates[order[0]], 2),
        orders,
        workers=2,
        start_method="spawn",
    )
    print(f"lambda over a local dict: {len(to_usd)} orders, {sum(to_usd):.2f} USD in all, first {to_usd[:4]}")

    def lookup(n: int) -> tuple[int, int, int]:
        # id(big_table) tells copies apart: one id per worker means one copy per worker.
        return os.getpid(), id(big_table), big_table[n]

    seen = parmap.map(lookup, range(0, 200_000, 500), workers=2, start_method="spawn", chunksize=10)
    assert [value for _, _, value in seen] == [n * n for n in range(0, 200_000, 500)]
    copies = {(pid, table) for pid, table, _ in seen}
    pids = {pid for pid, _ in copies}
    print(
        f"nested function: {len(seen)} items on {len(pids)} worker(s), "
        f"{len(copies)} copies of the big table (one per worker, not one per item)"
    )

    scaled = parmap.map(functools.partial(pow, 2), range(10), workers=2, start_method="spawn")
    print(f"functools.partial(pow, 2): {scaled}")


if __name__ == "__main__":
    main()
