"""Start-up cost by start method: why ``backend="auto"`` is ``process`` started by fork.

    python benchmarks/startup.py [--reps N] [--workers N]

Each case times, in a fresh Python process, one ``parmap.map`` of a trivial
function over 10 items: starting the workers, shipping the function, the
map, and stopping the workers. The cases are interleaved over the
repetitions and the table shows the median and the spread (min-max). The
last row is the same map on a ``parmap.Pool`` whose workers are already
running (its second call), which is what a ``Pool`` saves per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES: dict[str, dict[str, Any]] = {
    "process, fork (auto)": {"backend": "process", "start_method": "fork"},
    "process, forkserver": {"backend": "process", "start_method": "forkserver"},
    "process, spawn": {"backend": "process", "start_method": "spawn"},
    "fork backend (raw os.fork)": {"backend": "fork"},
    "auto": {},
    "Pool, warm (second call)": {"warm": True},
}


def run_case(spec: dict[str, Any]) -> float:
    import workloads

    import parmap

    options = dict(spec["options"])
    warm = options.pop("warm", False)
    items = list(range(10))
    if warm:
        with parmap.Pool(workers=spec["workers"]) as pool:
            pool.map(workloads.square, items)
            started = time.perf_counter()
            results = pool.map(workloads.square, items)
            elapsed = time.perf_counter() - started
    else:
        started = time.perf_counter()
        results = parmap.map(workloads.square, items, workers=spec["workers"], **options)
        elapsed = time.perf_counter() - started
    if results != [x * x for x in items]:
        raise SystemExit(f"wrong results: {results!r}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH", "")) if p)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    names = list(CASES)
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            spec = {"options": CASES[name], "workers": args.workers}
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--case", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                print(f"FAILED: {name}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            times[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"# start-up + a 10-item map, workers={args.workers}, {args.reps} fresh processes each, {os.cpu_count()} CPUs\n"
    )
    print("| how the workers start | median | min - max |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values) * 1000:.1f} ms "
            f"| {min(values) * 1000:.1f} - {max(values) * 1000:.1f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
