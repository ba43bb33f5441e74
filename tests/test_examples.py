"""Every example runs as a user would run it, and says something meaningful.

Each script runs in a fresh interpreter (``sys.executable``), with flags that
keep it small, and must exit 0 and print the line that shows it did its job.
The repository root goes first on ``PYTHONPATH`` so that the examples import
this checkout's parmap even when it is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: name -> (arguments, a pattern that only a successful run prints)
CASES: dict[str, tuple[list[str], str]] = {
    "quickstart": ([], r"2000 squares"),
    "pool_size": (["--sleep", "0.1"], r"^\s+5\s+1\s+0\.10s\s+\d+\.\d\ds$"),
    "thumbnails": (["--count", "6", "--workers", "2"], r"made 6 thumbnails in .* \(largest 128x\d+\)"),
    "crawl": (["--pages", "20", "--latency", "0.02", "--threads", "8"], r"thread x8 .* 20 pages, \d+ KiB, 60 links"),
    "primes": (["--limit", "50000", "--pieces", "16", "--workers", "2"], r"5133 primes below 50,000"),
    "streaming": (["--records", "20", "--workers", "2"], r"wrote 20 summaries"),
    "errors": (["--timeout", "0.5"], r"with retries=1: \[0, 1, 4, 9, 16\]"),
    # How many workers got items depends on how fast each one started, so only
    # the relations are checked: no work in the caller, one copy per worker.
    "decorator": ([], r"ran in [12] worker process\(es\), none of them this one: True"),
    "closures": ([], r"400 items on (\d) worker\(s\), \1 copies of the big table"),
    "shared_state": (["--ranges", "50"], r"the shared Event stopped the other tasks early"),
}

#: The lines each example must print besides its headline, to check the story it tells.
EXTRA: dict[str, list[str]] = {
    "pool_size": [r"^\s+2\s+3\s+0\.30s", r"^\s+3\s+2\s+0\.20s"],
    "errors": [
        # Two prices fail; "raise" reports whichever failure reached the caller
        # first, and with two workers that is not always the earlier item.
        r"caught ValueError: could not convert string to float: ('n/a'|'')",
        r"note: parmap: .*item #[24]",
        r"4 of 6 prices parsed: \[3\.5, 4\.0, 13\.0, 7\.25\]",
        r"caught TaskTimeoutError after",
        r"with on_error='return', after .*: \[0, 10, 20, TaskTimeoutError\(.*\), 40, 50\]",
    ],
    "streaming": [r"took 10 results from an endless producer"],
    "shared_state": [r"100 documents, 500 words counted", r"most common: \[\('quick', 75\)"],
}


def run_example(name: str, args: list[str], timeout: float = 50) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs(name: str) -> None:
    if name == "thumbnails":
        pytest.importorskip("PIL", reason="thumbnails.py needs Pillow: pip install parmap[examples]")
    args, headline = CASES[name]
    done = run_example(name, args)
    report = f"examples/{name}.py exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report
    for pattern in [headline, *EXTRA.get(name, [])]:
        assert re.search(pattern, done.stdout, re.MULTILINE), f"no line matches {pattern!r}\n{report}"
