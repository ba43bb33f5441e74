"""The chunk-size rules, checked on the sizer itself (no workers needed)."""

from __future__ import annotations

from parmap._chunking import (
    MAX_CHUNK_BYTES,
    MAX_GROWN_UNSIZED_CHUNK,
    MAX_GROWTH,
    MAX_UNSIZED_CHUNK,
    MAX_UNSPLIT_TAIL,
    TARGET_CHUNK_SECONDS,
    ChunkSizer,
)

TINY = 1e-7  # seconds per item: a task that wants huge chunks


def test_explicit_chunksize_is_used_as_given():
    sizer = ChunkSizer(7, workers=2, total=1000)
    sizer.observe(7, 10.0)
    assert sizer.next_size(3) == 7


def test_chunks_aim_at_the_target_duration():
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(20, 20 * 0.001)  # 1 ms per item
    assert sizer.next_size(None) == round(TARGET_CHUNK_SECONDS / 0.001)


def test_chunks_shrink_towards_the_end_of_a_sized_input():
    sizer = ChunkSizer(None, workers=2, total=10_000)
    sizer.observe(10, 10 * TARGET_CHUNK_SECONDS / 5)  # 5 per chunk
    assert sizer.next_size(10_000) == 5
    assert sizer.next_size(8) == 2
    assert sizer.next_size(3) == 1


def test_many_tiny_items_are_still_shared_out_at_the_end():
    sizer = ChunkSizer(None, workers=2, total=1_000_000)
    sizer.observe(100_000, 100_000 * TINY / 100)
    assert sizer.next_size(1_000_000) == 1_000_000 // 4
    assert sizer.next_size(40_000) == 10_000


def test_a_cheap_tail_is_not_split_into_round_trips():
    sizer = ChunkSizer(None, workers=2, total=10_000)
    sizer.observe(1000, 1000 * TINY)
    assert sizer.next_size(5) == 5
    assert sizer.next_size(3000) == MAX_UNSPLIT_TAIL


def test_unsized_input_starts_small_and_grows_with_what_was_taken():
    sizer = ChunkSizer(None, workers=2, total=None)
    assert sizer.next_size(None) == 1  # nothing measured yet
    sizer.observe(10_000, 10_000 * TINY)
    assert sizer.next_size(None, taken=0) == MAX_UNSIZED_CHUNK
    assert sizer.next_size(None, taken=10_000) == MAX_UNSIZED_CHUNK
    assert sizer.next_size(None, taken=160_000) == 20_000
    assert sizer.next_size(None, taken=10**9) == MAX_GROWN_UNSIZED_CHUNK


def test_a_measured_chunk_sizes_the_next_no_more_than_a_few_times_bigger():
    # Four instant items, then 20 ms ones: the second chunk was 2,048 items,
    # 41 s of work before its first result came back.
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(1, TINY)
    assert sizer.next_size(None) == MAX_GROWTH
    sizer.observe(MAX_GROWTH, MAX_GROWTH * 0.02)
    assert sizer.next_size(None) <= round(TARGET_CHUNK_SECONDS / 0.01)  # the cost is now ~10 ms an item
    sized = ChunkSizer(None, workers=2, total=1_000_000)
    sized.observe(64, 64 * TINY)
    assert sized.next_size(1_000_000) == 64 * MAX_GROWTH


def test_slow_items_are_not_batched_up_by_growth():
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(2, 2 * 0.5)
    assert sizer.next_size(None, taken=10**9) == 1


def test_big_items_travel_a_few_at_a_time():
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(1000, 1000 * TINY)
    sizer.observe_bytes(4, 4 * 1024 * 1024)  # 1 MiB per item
    assert sizer.next_size(None, taken=10**9) == MAX_CHUNK_BYTES // (1024 * 1024)


def test_big_results_come_back_a_few_at_a_time():
    # imap's window of 5 chunks held ~700 MB of 10 MiB results before.
    sizer = ChunkSizer(None, workers=2, total=None)
    sizer.observe(1000, 1000 * TINY)
    sizer.observe_result_bytes(100, 100 * 1024 * 1024)  # 1 MiB per result
    assert sizer.next_size(None, taken=10**9) == MAX_CHUNK_BYTES // (1024 * 1024)


def test_backlog_is_unknown_until_a_chunk_is_measured():
    sizer = ChunkSizer(None, workers=2, total=1000)
    assert sizer.backlog(1000) is None
    sizer.observe(10, 10 * 0.002)
    assert sizer.backlog(500) == 500 * 0.002
    assert sizer.backlog(None) == float("inf")  # no length: as good as endless


def test_backlog_is_measured_even_with_a_fixed_chunksize():
    sizer = ChunkSizer(5, workers=2, total=100)
    sizer.observe(5, 5 * 0.01)
    assert sizer.next_size(95) == 5
    assert sizer.backlog(95) == 95 * 0.01


def test_before_any_measurement_chunks_double_from_one_item():
    # A long input of slow items got 64-item first chunks: the first result
    # waited for 64 of them. Tiny ones still reach the slice quickly.
    sizer = ChunkSizer(None, workers=2, total=1_000_000)
    assert [sizer.next_size(1_000_000) for _ in range(9)] == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    small = ChunkSizer(None, workers=2, total=1000)  # a slice of 1000 // 128 = 7
    assert [small.next_size(1000) for _ in range(5)] == [1, 2, 4, 7, 7]
