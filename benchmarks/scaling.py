"""W2's scaling curve: parmap against the stdlib peers as workers grow.

    python benchmarks/scaling.py                      # workers 1, 2, 4, 8, 16; W2; 3 repetitions
    python benchmarks/scaling.py --workers 1,2,4 --workloads W2,W3 --reps 5

Issue 5 asks for W2 with 1, 2, 4, 8 and 16 workers on a machine with that
many cores. Each case runs in a fresh process through ``bench.py --case``
(the same fairness rules as ``bench.py``: libraries imported before the
clock, results checked equal to the serial ``map``'s, cases interleaved and
rotated across repetitions). For each worker count it also measures the
machine's own ceiling (that many bare processes spinning at once against
one alone), since a speedup cannot beat it. Worker counts beyond
``os.cpu_count()`` still run, and are marked: they show oversubscription,
not scaling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench  # noqa: E402 - needs the path above
import workloads as wl  # noqa: E402

LIBS = ("auto", "mp_pool", "ppe")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8,16", help="comma-separated worker counts")
    parser.add_argument("--workloads", default="W2", help="comma-separated, from W2, W3")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size-scale", type=float, default=1.0, help="multiply item counts")
    parser.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, from {', '.join(bench.PEERS)}, auto")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    libs = tuple(lib.strip() for lib in args.libs.split(","))
    bench.compile_parmap()
    spin_10ms = wl.calibrate_spin(10)
    table = {w.name: w for w in bench.workload_table(args.size_scale, spin_10ms)}
    names = [n.strip() for n in args.workloads.split(",")]
    if unknown := [n for n in names if n not in ("W2", "W3")]:
        parser.error(f"--workloads: {', '.join(unknown)} has no scaling curve here (W2, W3)")
    print(
        f"# parmap scaling: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, reps={args.reps}, "
        f"spin(10 ms)={spin_10ms:,} iterations",
        flush=True,
    )
    failed = False
    started = time.perf_counter()
    for name in names:
        work = table[name]
        serial = bench.Outcome()
        rows: dict[int, dict[str, bench.Outcome]] = {n: {lib: bench.Outcome() for lib in libs} for n in counts}
        ceilings = {n: bench.parallel_ceiling(n, spin_10ms) if n > 1 else 1.0 for n in counts}
        cases = [("serial", 1), *((lib, n) for n in counts for lib in libs)]
        for rep in range(args.reps):
            # Rotated, serial included: no case always runs first or after the same one.
            shift = rep * len(cases) // args.reps
            for lib, n in cases[shift:] + cases[:shift]:
                spec = {"workload": name, "lib": lib, "workers": n, "size": work.size, **work.extra}
                record(serial if lib == "serial" else rows[n][lib], bench.run_subprocess(spec, timeout=600))
            print(f"{name} repetition {rep + 1} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
        failed |= print_curve(work, serial, rows, ceilings, libs)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


def record(outcome: bench.Outcome, out: dict[str, object]) -> None:
    if "error" in out:
        outcome.errors.append(str(out["error"]))
    else:
        outcome.times.append(float(out["time"]))  # type: ignore[arg-type]
        outcome.digests.add(str(out["digest"]))


def print_curve(
    work: bench.Workload,
    serial: bench.Outcome,
    rows: dict[int, dict[str, bench.Outcome]],
    ceilings: dict[int, float],
    libs: tuple[str, ...],
) -> bool:
    """Print one workload's curve; return whether any case failed or differed."""
    s = serial.median
    print(f"\n## {work.name}: {work.title}; serial `map` {bench.fmt_time(s)}\n")
    heads = " | ".join(f"{bench.LABELS[lib]} (speedup)" for lib in libs)
    print(f"| workers | ceiling | {heads} | parmap ÷ best peer |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in libs) + " | ---: |")
    failed = bool(serial.errors)
    cpus = os.cpu_count() or 1
    for n, res in rows.items():
        cells = []
        for lib in libs:
            out = res[lib]
            t = out.median
            if out.errors or out.digests - serial.digests:
                failed = True
            cells.append(f"{bench.fmt_time(t)} ({s / t:.2f}x)" if t and s else "error")
        peers = [res[lib].median for lib in libs if lib != "auto" and res[lib].median]
        mine = res["auto"].median if "auto" in res else None
        ratio = f"{mine / min(peers):.2f}" if mine and peers else "-"
        label = f"{n}" + (" (more than the CPUs)" if n > cpus else "")
        print(f"| {label} | {ceilings[n]:.2f}x | " + " | ".join(cells) + f" | {ratio} |")
    for n, res in rows.items():
        for lib, out in res.items():
            for error in out.errors[:1]:
                print(f"FAILED: {work.name} workers={n} {lib}: {error}", file=sys.stderr)
    print(f"\nMedians of {len(serial.times)} repetitions. Speedup = serial time / time. Interleaved, rotated.")
    return failed


if __name__ == "__main__":
    sys.exit(main())
