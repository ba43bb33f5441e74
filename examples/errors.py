"""What failure looks like: a function that fails on some items, and the knobs.

Five scenes, each printing what a user would see:

1. the default, ``on_error="raise"``: the caller gets the worker's exception
   with its own type, a note naming the item, and the worker's traceback;
2. ``on_error="skip"``: failed items are left out of the results;
3. ``on_error="return"``: the exception object stands in the failed item's place;
4. ``timeout=``: an item that hangs is stopped, its worker replaced;
5. ``retries=``: an item that fails once (a flaky network call, say) succeeds
   on its second attempt.

    python examples/errors.py
"""

import argparse
import tempfile
import time
from pathlib import Path

import parmap


def parse_price(text: str) -> float:
    """Fails, like real parsers do, on some inputs."""
    return round(float(text.strip("$ ")), 2)


def slow_unless_small(n: int) -> int:
    if n == 3:
        time.sleep(60)  # stands in for a hung request or a runaway loop
    return n * 10


def flaky(item: tuple[str, int]) -> int:
    """Fails the first time it sees item 2, then works.

    The marker file makes the failure deterministic across processes: the
    retry may run on a different worker, which shares no memory with the
    first one.
    """
    marker_dir, n = item
    marker = Path(marker_dir) / f"seen-{n}"
    if n == 2 and not marker.exists():
        marker.touch()
        raise ConnectionError(f"item {n}: connection reset (pretend)")
    return n * n


def title(text: str) -> None:
    print(f"\n== {text} ==")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds before a hung item is stopped")
    args = parser.parse_args()
    prices = ["$3.50", "4", "n/a", "$12.999", "", "7.25"]

    title('on_error="raise" (the default)')
    try:
        parmap.map(parse_price, prices, workers=args.workers)
    except ValueError as exc:
        # The user's own exception type, so ordinary except clauses keep working.
        print(f"caught {type(exc).__name__}: {exc}")
        for note in getattr(exc, "__notes__", []):
            print(f"  note: {note}")
        # __cause__ holds the traceback from inside the worker; left uncaught,
        # Python prints it above the exception, as for any chained error.
        if isinstance(exc.__cause__, parmap.RemoteTraceback):
            print("  worker traceback:")
            for line in exc.__cause__.text.rstrip().splitlines():
                print(f"    {line}")

    title('on_error="skip"')
    kept = parmap.map(parse_price, prices, workers=args.workers, on_error="skip")
    print(f"{len(kept)} of {len(prices)} prices parsed: {kept}")

    title('on_error="return"')
    mixed = parmap.map(parse_price, prices, workers=args.workers, on_error="return")
    for text, value in zip(prices, mixed, strict=True):
        shown = f"{type(value).__name__}: {value}" if isinstance(value, Exception) else value
        print(f"  {text!r:>10} -> {shown}")

    title(f"timeout={args.timeout:g}")
    start = time.perf_counter()
    try:
        parmap.map(slow_unless_small, range(6), workers=args.workers, timeout=args.timeout)
    except parmap.TaskTimeoutError as exc:
        print(f"caught TaskTimeoutError after {time.perf_counter() - start:.1f} s: {exc}")
    start = time.perf_counter()
    results = parmap.map(slow_unless_small, range(6), workers=args.workers, timeout=args.timeout, on_error="return")
    print(f"with on_error='return', after {time.perf_counter() - start:.1f} s: {results}")

    title("retries=1")
    with tempfile.TemporaryDirectory(prefix="parmap-flaky-") as markers:
        items = [(markers, n) for n in range(5)]
        try:
            parmap.map(flaky, items, workers=args.workers)
        except ConnectionError as exc:
            print(f"without retries: ConnectionError: {exc}")
        for marker in Path(markers).iterdir():
            marker.unlink()  # make the next run fail once again
        print(f"with retries=1: {parmap.map(flaky, items, workers=args.workers, retries=1)}")


if __name__ == "__main__":
    main()
