"""How many items go into the next chunk.

An explicit ``chunksize`` is used as given. Otherwise the size adapts:

* the first chunks are small (1, 2, 4, ... items), so the first measurement,
  and the first result, come back quickly;
* each finished chunk reports how long its items took to compute; the next
  chunk is sized to take about :data:`TARGET_CHUNK_SECONDS`, so a tiny task
  is batched by the thousand and a slow one travels alone, growing at most
  :data:`MAX_GROWTH` times past the biggest chunk measured, so a few cheap
  first items cannot send a huge chunk of expensive ones;
* near the end of an input of known length no chunk takes more than
  1/(2·workers) of what is left, so the last chunks shrink and no worker is
  left holding a long tail while the others idle (but a last few thousand
  items too cheap to unbalance anything stay together, see
  :data:`MIN_TAIL_CHUNK_SECONDS`);
* a chunk's items pickle to at most about :data:`MAX_CHUNK_BYTES`, so big
  items (images, arrays) stream to the workers a few at a time instead of
  in one huge message that the workers wait for; so do its results, so that
  big results come back a few at a time, and ``imap``'s window of chunks
  holds a few of them, not hundreds;
* an input of unknown length gets chunks of at most
  :data:`MAX_UNSIZED_CHUNK` items at first, which bounds what ``imap`` pulls
  ahead of a consumer that has just begun or is slow; the cap grows with
  what the consumer has taken (1/:data:`UNSIZED_GROWTH_SHARE` of it, up to
  :data:`MAX_GROWN_UNSIZED_CHUNK`), so a long stream of tiny tasks reaches
  the chunk sizes a list would get while the pull-ahead stays a fraction of
  what was already consumed.
"""

from __future__ import annotations

import contextvars

# A chunk should compute for about this long. A chunk's own overhead is only
# ~0.1-0.3 ms on the process backends, plus a wake-up of two of the caller's
# threads, which where the workers fill every core preempt one of them. From
# 20 ms to 100 ms chunks, 12 interleaved pairs: W2 932 -> 895 ms, W3 1406 ->
# 1384 ms; 250-500 ms measured the same as 100 within noise, and W2 with
# multiprocessing.Pool's 25-item chunks only ~1% faster (docs/performance.md).
# The shrinking tail below still balances the end (benchmarks/bench.py, W1-W3).
TARGET_CHUNK_SECONDS = 0.1
# With no length to pace against, cap the chunk so that the in-flight window
# (2 chunks per worker + 1) holds ~10,000 items on 2 workers (benchmark W6bp).
MAX_UNSIZED_CHUNK = 2048
# ... and grow it to 1/8 of the items already taken, so the window (5 chunks)
# never holds more than ~60% of what the consumer has had, up to 64k items.
# Benchmark W6 (2M tiny items, medians of 6): a cap fixed at 2048 took
# 1.59 s, growing to 16k 1.25 s, to 64k 1.15 s (peak RSS +35 MB of the 50
# allowed); W6bp still pulls only ~6,000 items ahead.
UNSIZED_GROWTH_SHARE = 8
MAX_GROWN_UNSIZED_CHUNK = 65536
# Near the end, chunks shrink no further than this much work: below it the
# imbalance they prevent is smaller than the round trips they add (benchmark
# W4, 10 trivial items: 10 chunks of one item -> 6 chunks; W2/W3 items of
# 5-200 ms still travel alone at the end).
MIN_TAIL_CHUNK_SECONDS = 0.002
# ... nor hold more items than this when they are that cheap: a chunk's
# pickling and unpickling, which the cost measures not, is then still small
# next to a round trip (W1 keeps its tail split between the workers).
MAX_UNSPLIT_TAIL = 2048
# Pulling a chunk's items from an iterator stops after this long with what
# has come: a slow input (lines piped in as they happen) gets its items to
# the workers, and their results back, as they arrive, not 2,048 at a time.
# A fast generator fills even W6's 64k-item chunks well within it (benchmark
# W6: 2M items, times unchanged).
MAX_PULL_SECONDS = 0.05
# ... and the clock is read between batches of at most this many items: an
# input that slows down in the middle of a batch (a log tail done catching up,
# a socket after a burst) holds that batch's items back until the batch is
# whole, so the first item after a burst of 20,000 waited for up to ~2,000
# more (seconds of a trickle). A 16-item cap cost an imap of a fast 2M-item
# generator ~20% of its time; this one costs nothing measurable (W6 A-B).
MAX_PULL_BATCH = 64
#: The batch cap for calls started in this context. The command line sets
#: it to :data:`CLI_PULL_BATCH`: its own work on each line (~8 us) dwarfs
#: what small batches cost (400,000 lines: no measurable change with 4, +10%
#: with 1), and its input is the one most often a stream that catches up
#: and then follows (``tail -f log | parmap ...``).
PULL_BATCH: contextvars.ContextVar[int] = contextvars.ContextVar("parmap_pull_batch", default=MAX_PULL_BATCH)
CLI_PULL_BATCH = 4
# Items that take at least this long are marked as they start (see
# Chunk.marked), so that a crash is charged to the very item that was running,
# once: the ~0.12 us it costs an item (measured on W1's x*x, doubling its
# ~0.1 us) is then about 1% of the work. Cheaper items skip it, and a crash among them reruns each item of the chunk
# alone to find the one that crashes again.
MARK_MIN_ITEM_SECONDS = 10e-6
# Chunks this small are marked whatever their items cost: 64 marks take ~8 us,
# against the ~100 us a chunk costs the parent anyway (benchmark W4).
MARK_ALWAYS_UP_TO = 64
# Before the first measurement, with a known length: chunks of 1, 2, 4, ...
# items, up to a small slice of it, so that the first cost measurement (and
# the first result) comes back after one item, and W1's first chunks, all
# overhead anyway, still grow to 64 items (benchmarks/bench.py, W1-W3).
INITIAL_SHARE = 64
MAX_INITIAL_CHUNK = 64
# Big items travel a few at a time: one pickled chunk stays under this, so the
# first worker starts on its items while the next chunk is still being pickled
# (benchmark W5in, 200 x 1 MiB items). Big results come back so too: the
# caller unpickles them while the workers compute the next (W5out, 200 x 1 MiB
# results: 370 -> 253 ms), and imap's window holds a few of them, not hundreds.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# A measured chunk sizes the next ones no bigger than this many times itself:
# items cheap at first and slow later (the first four instant, the rest 20 ms)
# made the second chunk 2,048 items, 41 s of work behind one result (now 8
# items, 0.17 s). W1 reaches its big chunks in a few more round trips: 32 ->
# 44 chunks, time within noise (benchmarks/bench.py, W1 and W6).
MAX_GROWTH = 8
# Weight of the newest measurement in the running per-item cost: one chunk
# holding a heavy item (40x the others in W3) must shrink the next chunks at
# once, and one cheap chunk must not blow them up (benchmark W3).
SMOOTHING = 0.5


class ChunkSizer:
    """Decides chunk sizes; ``observe`` feeds it what finished chunks measured."""

    def __init__(self, chunksize: int | None, workers: int, total: int | None, *, most: int | None = None) -> None:
        self._fixed = chunksize
        self._most = most  # items a chunk may hold at most (max_tasks_per_child)
        self._workers = workers
        self._total = total
        self._cost: float | None = None  # seconds per item
        self._item_bytes: float | None = None  # pickled bytes per item
        self._result_bytes: float | None = None  # pickled bytes per result
        self._unmeasured = 0  # chunks sized before the first measurement
        self._largest_measured = 0  # items in the biggest chunk measured so far

    def next_size(self, remaining: int | None, taken: int = 0) -> int:
        """The size of the next chunk, given how many items remain (if known)
        and how many the consumer has taken so far."""
        if self._fixed is not None:
            return self._fixed
        if self._cost is None:
            if self._total is None:
                size = 1
            else:
                # 1, 2, 4, ... up to a small slice: an item of seconds must
                # not wait behind dozens of others for the first result.
                share = max(1, self._total // (self._workers * INITIAL_SHARE))
                size = min(MAX_INITIAL_CHUNK, share, 1 << min(self._unmeasured, 16))
                self._unmeasured += 1
        else:
            size = int(TARGET_CHUNK_SECONDS / self._cost) if self._cost > 0 else MAX_UNSIZED_CHUNK * 64
            size = min(size, MAX_GROWTH * self._largest_measured)
        per_item = max(self._item_bytes or 0.0, self._result_bytes or 0.0)
        if per_item:
            size = min(size, int(MAX_CHUNK_BYTES / per_item))
        if remaining is None:
            grown = min(MAX_GROWN_UNSIZED_CHUNK, taken // UNSIZED_GROWTH_SHARE)
            size = min(size, max(MAX_UNSIZED_CHUNK, grown))
        else:
            tail = max(1, remaining // (2 * self._workers))
            if self._cost is not None and self._cost > 0:
                # Too cheap to unbalance anything: shrinking only adds round trips.
                tail = max(tail, min(int(MIN_TAIL_CHUNK_SECONDS / self._cost), MAX_UNSPLIT_TAIL, remaining))
            size = min(size, tail)
        if self._most is not None:
            size = min(size, self._most)
        return max(1, size)

    def observe(self, items: int, seconds: float) -> None:
        """A chunk of ``items`` items computed in ``seconds``."""
        if items <= 0:
            return  # measured even with a fixed size: backlog() needs the cost
        self._largest_measured = max(self._largest_measured, items)
        cost = seconds / items
        self._cost = cost if self._cost is None else SMOOTHING * cost + (1 - SMOOTHING) * self._cost

    @property
    def item_seconds(self) -> float | None:
        """The measured seconds per item, or ``None`` before the first chunk."""
        return self._cost

    def backlog(self, remaining: int | None) -> float | None:
        """Seconds of work in ``remaining`` items (``None``: unknown count),
        or ``None`` before the first measurement."""
        if self._cost is None:
            return None
        if remaining is None:
            return float("inf")
        return self._cost * remaining

    def observe_bytes(self, items: int, nbytes: int) -> None:
        """A chunk of ``items`` items pickled to ``nbytes`` bytes."""
        if self._fixed is not None or items <= 0:
            return
        self._item_bytes = _smoothed(self._item_bytes, nbytes / items)

    def observe_result_bytes(self, results: int, nbytes: int) -> None:
        """A chunk's ``results`` came back as ``nbytes`` bytes (0: not pickled)."""
        if self._fixed is not None or results <= 0 or nbytes <= 0:
            return
        self._result_bytes = _smoothed(self._result_bytes, nbytes / results)


def _smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else SMOOTHING * sample + (1 - SMOOTHING) * average
