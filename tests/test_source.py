"""Workers forked during a ``map`` read its items from their own copy of the
input (``Call.source``) instead of receiving them pickled; everything a user
can see stays as if the items had been pickled."""

from __future__ import annotations

import gc
import threading

import pytest
import workfns
from conftest import PROCESS_BACKENDS

import parmap
from parmap._serialization import MEMOLESS_LIMIT, _pickles_memoless, refused_items
from parmap.backends._base import SourceSlice

FORKED = [pytest.param("fork", {}, id="fork"), pytest.param("process", {"start_method": "fork"}, id="process-fork")]


@pytest.mark.parametrize(("backend", "options"), FORKED)
@pytest.mark.parametrize("kind", [list, tuple])
def test_forked_workers_read_the_items_themselves(backend, options, kind):
    items = kind(workfns.Traveller("original") for _ in range(50))
    assert parmap.map(workfns.tag, items, workers=2, backend=backend, chunksize=7, **options) == ["original"] * 50


@pytest.mark.parametrize(("backend", "options"), FORKED)
def test_items_travel_pickled_where_workers_lack_the_input(backend, options):
    items = [workfns.Traveller("original") for _ in range(20)]
    # imap's consumer may change a list between results: never read from a copy.
    assert list(parmap.imap(workfns.tag, items, workers=2, backend=backend, **options)) == ["pickled"] * 20
    with parmap.Pool(2, backend=backend, **options) as pool:
        assert pool.map(workfns.tag, items) == ["original"] * 20  # workers forked by this call
        # A warm pool's workers were forked before this list existed.
        assert pool.map(workfns.tag, list(items)) == ["pickled"] * 20


@pytest.mark.timeout(30)
@pytest.mark.parametrize("on_error", ["return", "skip"])
def test_unpicklable_items_fail_alone(process_backend, on_error):
    items = [1, threading.Lock(), 3, 4, threading.Lock(), 6]
    results = parmap.map(workfns.describe, items, workers=2, backend=process_backend, on_error=on_error)
    if on_error == "skip":
        assert results == [("int", 1), ("int", 3), ("int", 4), ("int", 6)]
        return
    assert [r for i, r in enumerate(results) if i not in (1, 4)] == [("int", 1), ("int", 3), ("int", 4), ("int", 6)]
    for position in (1, 4):
        assert isinstance(results[position], parmap.SerializationError)
        assert str(results[position]).startswith(f"item #{position} cannot be serialised")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_unpicklable_items_fail_alone_where_workers_start_afresh(start_method):
    # Spawned workers never hold the input: its items are pickled in the
    # caller, where one that will not pickle fails alone, as on the forked path.
    items = [1, threading.Lock(), 3]
    results = parmap.map(
        workfns.describe, items, workers=2, backend="process", start_method=start_method, on_error="return"
    )
    assert results[0] == ("int", 1) and results[2] == ("int", 3)
    assert str(results[1]).startswith("item #1 cannot be serialised")


@pytest.mark.parametrize(("backend", "options"), FORKED)
def test_forked_workers_leave_the_callers_objects_out_of_their_collections(backend, options):
    # A collection in the worker that walked the caller's heap would cost
    # time on every collection and copy each page it touched.
    held = [[i] for i in range(100)]

    def walks_held(_):
        gc.collect()
        return any(obj is held for obj in gc.get_objects())

    assert parmap.map(walks_held, [0, 1], workers=2, backend=backend, **options) == [False, False]
    assert walks_held(0)  # the check can see the list where it is collectable


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_starmap_reads_tuples_from_the_input(backend):
    pairs = [(i, i + 1) for i in range(300)]
    assert parmap.starmap(workfns.pack, pairs, workers=2, backend=backend) == pairs


def test_source_slice_reads_only_its_window():
    data = list(range(10))
    window = SourceSlice(data, 3, 7)
    assert len(window) == 4
    assert list(window) == [3, 4, 5, 6]
    assert window[0] == 3 and window[3] == 6
    with pytest.raises(IndexError):
        window[4]
    with pytest.raises(IndexError):
        window[-1]


def test_refused_items_names_each_unpicklable_item():
    assert refused_items([1, 2.5, "x", b"y", None], range(5)) == {}
    assert refused_items([(1, 2), {"a": [1]}, lambda x: x], range(3)) == {}  # cloudpickle takes the lambda
    refused = refused_items([1, threading.Lock(), 3, threading.Lock()], range(10, 14))
    assert sorted(refused) == [1, 3]
    assert str(refused[1]).startswith("item #11 cannot be serialised: TypeError")
    assert refused[3].position == 13


def test_refused_items_checks_containers_without_the_memo_where_it_can():
    pairs = [(x, str(x)) for x in range(1000)]
    assert _pickles_memoless(pairs)
    assert refused_items(pairs, range(1000)) == {}
    refused = refused_items([(1, 2), (threading.Lock(),), {"k": 3}], range(5, 8))
    assert list(refused) == [1]
    assert str(refused[1]).startswith("item #6 cannot be serialised: TypeError")


def test_refused_items_falls_back_to_the_memo_for_cycles_and_heavy_sharing():
    cycle: list = []
    cycle.append(cycle)
    assert not _pickles_memoless([cycle])  # fast mode cannot pickle a cycle
    assert refused_items([cycle, cycle], range(2)) == {}
    shared = ["x" * (1 << 20)]
    repeated = [shared] * (MEMOLESS_LIMIT // (1 << 20) + 8)
    assert not _pickles_memoless(repeated)  # each repeat written out again: over the limit
    assert refused_items(repeated, range(len(repeated))) == {}
