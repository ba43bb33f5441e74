"""The benchmark scripts still run and still check their results (tiny sizes;
no timing is asserted: speed is shown by the benchmarks, never tested)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


def test_scaling_curve_runs_and_checks_results():
    done = run_script("scaling.py", "--workers", "1,2", "--reps", "1", "--size-scale", "0.02", "--libs", "auto,mp_pool")
    assert done.returncode == 0, done.stderr
    assert "| workers | ceiling | parmap auto (speedup) | multiprocessing.Pool (speedup) |" in done.stdout
    assert "\n| 1 | 1.00x | " in done.stdout and "\n| 2 | " in done.stdout


def test_bench_case_checks_starmap_results_against_serial():
    # One case of W1s per side: what bench.py runs in each fresh process.
    digests = set()
    for lib in ("serial", "auto", "mp_pool"):
        spec = f'{{"workload": "W1s", "lib": "{lib}", "workers": 2, "size": 1000}}'
        done = run_script("bench.py", "--case", spec)
        assert done.returncode == 0, done.stderr
        digests.add(done.stdout.strip().splitlines()[-1].split('"digest": ')[1])
    assert len(digests) == 1
