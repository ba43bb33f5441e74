"""A pipeline without hand-written queues: producer -> workers -> consumer.

The classic multiprocessing recipe wires a producer, a pool of workers and a
consumer together with Queues, sentinels and join() calls. With parmap the
producer is a generator, the workers are ``imap(ordered=False)``, and the
consumer is a for loop:

* the generator is pulled only as fast as workers free up, so it may be
  endless (or a huge file) without filling memory;
* ``ordered=False`` hands over each result as soon as it is ready, so a slow
  record does not hold back the quick ones behind it;
* leaving the loop early (``break``) stops the workers.

    python examples/streaming.py                  # 60 records, then 10 from an endless stream
    python examples/streaming.py --records 20     # the quick version
"""

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import parmap

produced = 0  # how far the producer has got; read by the consumer to show laziness


def sensor_readings(count: int | None, seed: int = 3) -> Iterator[dict[str, object]]:
    """The producer: records arriving one at a time, as from a socket or a log; endless when ``count`` is None."""
    global produced
    rng = random.Random(seed)
    for n in itertools.count() if count is None else range(count):
        produced = n + 1
        yield {"id": n, "cost": rng.choice([0.01, 0.01, 0.02, 0.15]), "values": [rng.random() for _ in range(50)]}


def summarise(record: dict[str, object]) -> dict[str, object]:
    """The work: slow for some records, quick for most."""
    time.sleep(record["cost"])  # type: ignore[arg-type]
    values: list[float] = record["values"]  # type: ignore[assignment]
    return {"id": record["id"], "mean": round(sum(values) / len(values), 4), "peak": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=60, help="how many records the producer makes")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--take", type=int, default=10, help="results to take from the endless producer")
    parser.add_argument("-o", "--output", type=Path, help="JSON lines written here (default: a temp file)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="parmap-stream-") as scratch:
        output = args.output or Path(scratch) / "summaries.jsonl"
        ids, ahead = consume(args.records, args.workers, output)
        with output.open() as written:
            lines = sum(1 for _ in written)

    overtaken = sum(1 for a, b in itertools.pairwise(ids) if b < a)
    print(f"wrote {lines} summaries to {output}")
    print(f"first ids in arrival order: {ids[:12]}")
    print(f"{overtaken} times a quick result overtook a slower, earlier record instead of waiting for it")
    print(f"the producer never ran more than {ahead} records ahead of the consumer")
    if sorted(ids) != list(range(args.records)):
        sys.exit("some records were lost or duplicated")

    # An endless producer is fine too: the loop decides when to stop, and
    # leaving it stops the workers.
    start = time.perf_counter()
    for n, _ in enumerate(parmap.imap(summarise, sensor_readings(None), ordered=False, workers=args.workers), 1):
        if n == args.take:
            break
    print(
        f"took {args.take} results from an endless producer and stopped after {time.perf_counter() - start:.2f} s; "
        f"it had produced {produced} records"
    )


def consume(records: int, workers: int, output: Path) -> tuple[list[int], int]:
    """Write each summary as it arrives; return the ids in arrival order and how far the producer ran ahead."""
    ids: list[int] = []
    ahead = 0
    with output.open("w") as sink:
        # chunksize=1: each record travels alone, so a result is never held
        # back waiting for its chunk-mates.
        results = parmap.imap(summarise, sensor_readings(records), ordered=False, workers=workers, chunksize=1)
        for summary in results:
            sink.write(json.dumps(summary) + "\n")
            sink.flush()  # the consumer's output is usable while the work is still running
            ids.append(summary["id"])  # type: ignore[arg-type]
            ahead = max(ahead, produced - len(ids))
    return ids, ahead


if __name__ == "__main__":
    main()
