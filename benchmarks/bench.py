"""parmap side by side with the maps users pick instead: workloads W1-W7 of issue 5.

    python benchmarks/bench.py [--quick] [--reps N] [--workers N] [--only W1,W2] [--size-scale F]

Every case (one library on one workload) runs in a fresh Python process, so
no library finds a warm pool or a parent grown by the case before it. The
cases of a workload are interleaved (A B C A B C ...) over the repetitions so
that a noisy neighbour slows all of them alike, and the table shows medians.
Each case's results are fingerprinted and must equal the serial ``map``'s;
a mismatch fails the run (exit status 1). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as wl  # noqa: E402 - needs the path above

PARMAP_BACKENDS = ("auto", "process", "fork", "pool", "apply_async")
PEERS = ("mp_pool", "ppe", "joblib", "mpire")
LABELS = {
    "serial": "serial `map`",
    "auto": "parmap auto",
    "process": "parmap process",
    "fork": "parmap fork",
    "pool": "parmap pool",
    "apply_async": "parmap apply_async",
    "thread": "parmap thread",
    "mp_pool": "multiprocessing.Pool",
    "ppe": "ProcessPoolExecutor",
    "joblib": "joblib",
    "mpire": "mpire",
}
# W6 consumer: an order-sensitive fold cheap enough not to hide the library.
_MASK = (1 << 61) - 1
SLOW_CONSUMER_SECONDS = 0.005  # W6bp: the consumer's time per result
SLOW_CONSUMER_TAKES = 200


# ============================================================================
# The side that runs inside a case process
# ============================================================================
def pool_chunksize(n: int, workers: int) -> int:
    """``multiprocessing.Pool.map``'s rule, also given to ProcessPoolExecutor."""
    return max(1, math.ceil(n / (4 * workers)))


def run_map(lib: str, fn: Callable[..., Any], items: list[Any], workers: int, *, star: bool = False) -> list[Any]:
    """``[fn(x) for x in items]`` (``star``: ``fn(*x)``) by ``lib``, starting
    and stopping its workers."""
    if lib == "serial":
        return list(itertools.starmap(fn, items) if star else map(fn, items))
    if lib == "mp_pool":
        import multiprocessing

        with multiprocessing.Pool(workers) as pool:
            return pool.starmap(fn, items) if star else pool.map(fn, items)
    if lib == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as executor:
            columns = list(zip(*items, strict=True)) if star else [items]
            return list(executor.map(fn, *columns, chunksize=pool_chunksize(len(items), workers)))
    if lib == "joblib":
        from joblib import Parallel, delayed

        calls = (delayed(fn)(*x) for x in items) if star else (delayed(fn)(x) for x in items)
        return list(Parallel(n_jobs=workers)(calls))
    if lib == "mpire":
        from mpire import WorkerPool

        with WorkerPool(n_jobs=workers) as pool:
            # mpire unpacks tuple items into arguments by itself: that is its starmap.
            return pool.map(fn, items)
    import parmap

    options: dict[str, Any] = {} if lib == "auto" else {"backend": lib}
    if star:
        return parmap.starmap(fn, items, workers=workers, **options)
    return parmap.map(fn, items, workers=workers, **options)


def run_submits(lib: str, fn: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    """``fn(x)`` for each item as one submitted call each (a future or an
    async result per item), then every result in order."""
    if lib == "serial":
        return [fn(x) for x in items]
    if lib == "mp_pool":
        import multiprocessing

        with multiprocessing.Pool(workers) as pool:
            pending = [pool.apply_async(fn, (x,)) for x in items]
            return [p.get() for p in pending]
    if lib == "ppe":
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as executor:
            futures = [executor.submit(fn, x) for x in items]
            return [f.result() for f in futures]
    if lib == "mpire":
        from mpire import WorkerPool

        with WorkerPool(n_jobs=workers) as pool:
            pending = [pool.apply_async(fn, (x,)) for x in items]
            return [p.get() for p in pending]
    import parmap

    options: dict[str, Any] = {} if lib == "auto" else {"backend": lib}
    with parmap.Pool(workers, **options) as pool:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]


class _Stream:
    """An ``imap`` by ``lib`` over ``source``; ``close()`` stops its workers."""

    def __init__(self, lib: str, source: Iterable[int], workers: int, n_hint: int) -> None:
        fn = wl.square
        self._close: Callable[[], None] = lambda: None
        if lib == "serial":
            self.results: Iterator[Any] = map(fn, source)
        elif lib == "mp_pool":
            import multiprocessing

            pool = multiprocessing.Pool(workers)
            self.results = pool.imap(fn, source, chunksize=pool_chunksize(n_hint, workers))
            self._close = pool.terminate
        elif lib == "ppe":
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(workers)
            self.results = executor.map(fn, source, chunksize=pool_chunksize(n_hint, workers))
            self._close = lambda: executor.shutdown(wait=True, cancel_futures=True)
        elif lib == "joblib":
            from joblib import Parallel, delayed

            gen = Parallel(n_jobs=workers, return_as="generator")(delayed(fn)(x) for x in source)
            self.results = gen
            self._close = gen.close
        elif lib == "mpire":
            from mpire import WorkerPool

            pool = WorkerPool(n_jobs=workers)
            # Without a chunk size mpire sends an unsized input one item per task.
            self.results = pool.imap(fn, source, chunk_size=pool_chunksize(n_hint, workers))
            self._close = pool.terminate
        else:
            import parmap

            options: dict[str, Any] = {} if lib == "auto" else {"backend": lib}
            it = parmap.imap(fn, source, workers=workers, **options)
            self.results = it
            self._close = it.close  # type: ignore[attr-defined]

    def close(self) -> None:
        self._close()


class _PeakRss:
    """The parent's peak RSS while running: psutil sampled every millisecond."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 1e6


def preimport(lib: str) -> None:
    """Import ``lib`` before the clock starts: a user's program has imported it already."""
    modules = ["concurrent.futures", "multiprocessing", "multiprocessing.pool"]
    if lib in ("joblib", "mpire"):
        modules.append(lib)
    elif lib not in ("serial", "mp_pool", "ppe"):
        modules += ["parmap", "parmap.backends", f"parmap.backends.{'process' if lib == 'auto' else lib}"]
    for name in modules:
        importlib.import_module(name)


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this (fresh) process; the result is what the driver prints."""
    workload, lib, workers, size = spec["workload"], spec["lib"], spec["workers"], spec["size"]
    preimport(lib)
    out: dict[str, Any] = {}
    if workload in ("W6", "W6bp"):
        source = wl.CountingRange(size)
        with _PeakRss() as rss:
            started = time.perf_counter()
            stream = _Stream(lib, source, workers, size)
            digest = 0
            taken = 0
            try:
                for value in stream.results:
                    digest = (digest * 31 + value) & _MASK
                    taken += 1
                    if workload == "W6bp":
                        time.sleep(SLOW_CONSUMER_SECONDS)
                        if taken == SLOW_CONSUMER_TAKES:
                            out["ahead"] = source.pulled - taken
                            break
            finally:
                stream.close()
            out["time"] = time.perf_counter() - started
        out["rss_mb"] = rss.growth_mb
        out["digest"] = f"{taken}:{digest}"
        return out
    by_reference = lib in ("mp_pool", "ppe")
    if workload == "W8":
        started = time.perf_counter()
        results = run_submits(lib, wl.square, list(range(size)), workers)
        out["time"] = time.perf_counter() - started
        out["digest"] = wl.Digest().extend(results).hexdigest()
        return out
    star = workload == "W1s"
    if workload == "W1":
        fn, items = wl.square, list(range(size))
    elif workload == "W1s":
        fn, items = wl.multiply, [(x, x) for x in range(size)]
    elif workload == "W2":
        fn, items = wl.spin, [spec["spin"]] * size
    elif workload == "W3":
        fn, items = wl.spin, wl.heavy_tailed(size, spec["spin"])
    elif workload == "W4":
        fn, items = wl.square, list(range(size))
    elif workload == "W5in":
        fn, items = wl.nbytes, wl.distinct_mib(size)
    elif workload == "W5out":
        fn, items = wl.make_mib, list(range(size))
    elif workload in ("W7", "W7base"):
        fn = wl.capture_fn(wl.CAPTURE_BYTES, captured=workload == "W7", by_reference=by_reference)
        items = list(range(size))
    else:
        raise SystemExit(f"unknown workload {workload!r}")
    started = time.perf_counter()
    results = run_map(lib, fn, items, workers, star=star)
    out["time"] = time.perf_counter() - started
    out["digest"] = wl.Digest().extend(results).hexdigest()
    return out


# ============================================================================
# The driver
# ============================================================================
@dataclass
class Workload:
    name: str
    title: str
    size: int
    libs: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    times: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    ahead: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    digests: set[str] = field(default_factory=set)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def workload_table(scale: float, spin_10ms: int) -> list[Workload]:
    def n(count: int, least: int = 4) -> int:
        return max(least, round(count * scale))

    everyone = ("serial", *PARMAP_BACKENDS, *PEERS)
    with_thread = ("serial", *PARMAP_BACKENDS, "thread", *PEERS)
    streams = ("serial", "auto", "process", "fork", "pool", "apply_async", *PEERS)
    return [
        Workload("W1", f"{n(1_000_000):,} x x*x (pure overhead)", n(1_000_000), everyone),
        Workload("W1s", f"starmap over {n(1_000_000):,} pairs, a*b (overhead with tuples)", n(1_000_000), everyone),
        Workload("W2", f"{n(200)} x ~10 ms CPU-bound, even", n(200), everyone, {"spin": spin_10ms}),
        Workload(
            "W3",
            f"{n(200)} CPU-bound, heavy-tailed (5% are 40x the ~5 ms others)",
            n(200),
            everyone,
            {"spin": spin_10ms // 2},
        ),
        Workload("W4", "10 trivial items (start-up cost)", 10, with_thread),
        Workload("W5in", f"{n(200)} distinct 1 MiB bytes in", n(200), with_thread),
        Workload("W5out", f"{n(200)} x 1 MiB results out", n(200), with_thread),
        Workload("W6", f"imap over a {n(2_000_000):,}-item generator, fast consumer", n(2_000_000), streams),
        Workload(
            "W6bp",
            f"imap over a {n(2_000_000):,}-item generator, slow consumer takes {SLOW_CONSUMER_TAKES}",
            n(2_000_000),
            streams,
        ),
        Workload("W7", f"{n(200)} items, a lambda capturing 10 MB", n(200), everyone),
        Workload("W7base", f"{n(200)} items, the same lambda without the capture", n(200), everyone),
        Workload(
            "W8",
            f"{n(10_000):,} submits of x*x, one future each",
            n(10_000),
            ("serial", *PARMAP_BACKENDS, "mp_pool", "ppe", "mpire"),
        ),
    ]


def run_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--case", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "error"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def best_peer(results: dict[str, Outcome]) -> tuple[str | None, float | None]:
    timed = [(results[p].median, p) for p in PEERS if p in results and results[p].median is not None]
    if not timed:
        return None, None
    seconds, peer = min(timed)  # type: ignore[type-var]
    return peer, seconds


def print_tables(table: list[Workload], results: dict[str, dict[str, Outcome]], workers: int) -> None:
    print(f"\n## Median wall time, workers={workers} (ratios: lower is better)\n")
    print("| workload | library | median | x serial | x best peer | notes |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for work in table:
        res = results.get(work.name)
        if not res:
            continue
        serial = res["serial"].median if "serial" in res else None
        peer, peer_time = best_peer(res)
        for i, lib in enumerate(work.libs):
            out = res[lib]
            t = out.median
            vs_serial = f"{t / serial:.2f}" if t and serial else "-"
            vs_peer = f"{t / peer_time:.2f}" if t and peer_time else "-"
            notes = []
            if out.rss:
                notes.append(f"peak RSS +{statistics.median(out.rss):.0f} MB")
            if out.ahead:
                notes.append(f"{statistics.median(out.ahead):,.0f} items pulled ahead")
            if lib == peer:
                notes.append("best peer")
            if out.errors:
                notes.append(f"ERROR: {out.errors[0]}")
            if len(out.digests) > 1 or (serial is not None and out.digests - res["serial"].digests):
                notes.append("RESULTS DIFFER FROM SERIAL")
            name = f"**{work.name}** {work.title}" if i == 0 else ""
            print(f"| {name} | {LABELS[lib]} | {fmt_time(t)} | {vs_serial} | {vs_peer} | {'; '.join(notes)} |")


def print_targets(results: dict[str, dict[str, Outcome]], ceilings: list[float]) -> None:
    """One line per issue-5 target, judged on parmap's default (``auto``)."""
    print("\n## Issue 5 targets (parmap `auto`, default options)\n")

    def med(workload: str, lib: str) -> float | None:
        out = results.get(workload, {}).get(lib)
        return out.median if out else None

    def line(label: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
        print(f"- {label}: **{verdict}** ({detail})")

    if "W1" in results:
        a, s = med("W1", "auto"), med("W1", "serial")
        if a and s:
            line("W1 <= 1.5x serial", a / s <= 1.5, f"{a / s:.2f}x serial")
    for name, need in (("W2", 1.85), ("W3", 1.8)):
        if name in results:
            a, s = med(name, "auto"), med(name, "serial")
            _, p = best_peer(results[name])
            if a and s and p:
                ceiling = f"; the machine's ceiling {min(ceilings):.2f}-{max(ceilings):.2f}x"
                line(f"{name} >= {need}x speedup", s / a >= need, f"{s / a:.2f}x speedup{ceiling}")
                line(f"{name} <= best peer", a <= p, f"{a / p:.2f}x best peer")
    for name in ("W4", "W5in", "W5out"):
        if name in results:
            a = med(name, "auto")
            _, p = best_peer(results[name])
            if a and p:
                line(f"{name} <= best peer", a <= p, f"{a / p:.2f}x best peer")
    if "W6" in results:
        out = results["W6"].get("auto")
        if out and out.rss:
            rss = statistics.median(out.rss)
            line("W6 peak RSS growth <= 50 MB", rss <= 50, f"+{rss:.0f} MB")
        a = med("W6", "auto")
        _, p = best_peer(results["W6"])
        if a and p:
            line("W6 time <= best peer", a <= p, f"{a / p:.2f}x best peer")
    if "W6bp" in results:
        out = results["W6bp"].get("auto")
        if out and out.ahead:
            ahead = statistics.median(out.ahead)
            line("W6bp <= 20,000 items pulled ahead", ahead <= 20_000, f"{ahead:,.0f} items")
    if "W7" in results and "W7base" in results:
        a, b = med("W7", "auto"), med("W7base", "auto")
        if a and b:
            line("W7 <= 1.3x without the capture", a / b <= 1.3, f"{a / b:.2f}x")
        for lib in PEERS:
            a, b = med("W7", lib), med("W7base", lib)
            if a and b:
                print(f"  - for comparison, {LABELS[lib]}: {a / b:.2f}x without the capture")


def parallel_ceiling(workers: int, spin_10ms: int, times: int = 30) -> float:
    """The speedup ``workers`` processes reach here with no library at all.

    Each of ``workers`` bare processes spins ``times`` x 10 ms at the same
    moment; the ratio to one process doing it alone is the most any library
    can get on W2/W3 right now. On a VM whose cores are shared (or are two
    threads of one core) this is well under ``workers`` and moves from minute
    to minute, so it is measured before and after the run.
    """
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    ratios = []
    for _ in range(3):
        started = time.perf_counter()
        wl.spin_times(spin_10ms, times)
        alone = time.perf_counter() - started
        procs = [ctx.Process(target=wl.spin_times, args=(spin_10ms, times)) for _ in range(workers)]
        started = time.perf_counter()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        ratios.append(workers * alone / (time.perf_counter() - started))
    return statistics.median(ratios)


def compile_parmap() -> None:
    """Byte-compile parmap's sources, as ``pip install`` does.

    The peers come from site-packages with their ``.pyc`` files; an editable
    install never gets any, and under ``PYTHONDONTWRITEBYTECODE`` each fresh
    case process would compile parmap's backend from source inside the timed
    first call (~8 ms of W4's ~20 ms here).
    """
    import compileall

    import parmap

    compileall.compile_dir(os.path.dirname(parmap.__file__), quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions (about 2 minutes)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each case (default 3; quick 2)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W6bp (W5 = W5in,W5out)")
    parser.add_argument("--size-scale", type=float, default=None, help="multiply item counts (default 1; quick 0.1)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    compile_parmap()
    reps = args.reps or (2 if args.quick else 3)
    scale = args.size_scale or (0.1 if args.quick else 1.0)
    spin_10ms = wl.calibrate_spin(10)
    table = workload_table(scale, spin_10ms)
    if args.only:
        wanted = set()
        for name in args.only.split(","):
            name = name.strip()
            wanted |= {"W5in", "W5out"} if name == "W5" else {"W7", "W7base"} if name == "W7" else {name}
        table = [w for w in table if w.name in wanted]
        if not table:
            parser.error(f"--only {args.only!r} names no workload")
    ceilings = [parallel_ceiling(args.workers, spin_10ms)]
    print(
        f"# parmap benchmarks: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"workers={args.workers}, reps={reps}, size-scale={scale:g}, spin(10 ms)={spin_10ms:,} iterations, "
        f"parallel ceiling {ceilings[0]:.2f}x",
        flush=True,
    )
    results: dict[str, dict[str, Outcome]] = {}
    started = time.perf_counter()
    for work in table:
        res = results.setdefault(work.name, {lib: Outcome() for lib in work.libs})
        for rep in range(reps):
            # Interleave A B C A B C, starting each round one later so no case always follows another.
            order = work.libs[rep % len(work.libs) :] + work.libs[: rep % len(work.libs)]
            for lib in order:
                spec = {"workload": work.name, "lib": lib, "workers": args.workers, "size": work.size, **work.extra}
                out = run_subprocess(spec, timeout=120)
                o = res[lib]
                if "error" in out:
                    o.errors.append(out["error"])
                    continue
                o.times.append(out["time"])
                o.digests.add(out["digest"])
                if "rss_mb" in out and work.name == "W6":
                    o.rss.append(out["rss_mb"])
                if "ahead" in out:
                    o.ahead.append(out["ahead"])
        summary = ", ".join(f"{lib} {fmt_time(res[lib].median)}" for lib in work.libs)
        print(f"{work.name} done at {time.perf_counter() - started:.0f} s: {summary}", file=sys.stderr, flush=True)
    ceilings.append(parallel_ceiling(args.workers, spin_10ms))
    print_tables(table, results, args.workers)
    print(
        f"\nParallel ceiling: {args.workers} bare processes spinning at once ran "
        f"{ceilings[0]:.2f}x (before) and {ceilings[1]:.2f}x (after) as fast as one; "
        "no library's W2/W3 speedup can exceed it."
    )
    print_targets(results, ceilings)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return check(results)


def check(results: dict[str, dict[str, Outcome]]) -> int:
    """Every case must have run and given the serial map's results."""
    bad = []
    for name, res in results.items():
        expected = res["serial"].digests
        if len(expected) != 1:
            bad.append(f"{name}: serial map gave {len(expected)} different results")
            continue
        for lib, out in res.items():
            if out.errors:
                bad.append(f"{name} {lib}: {out.errors[0]}")
            if out.digests - expected:
                bad.append(f"{name} {lib}: results differ from the serial map")
    for line in bad:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
