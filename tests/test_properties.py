"""The invariant above all others: parmap equals the serial map.

For every backend, chunk size, worker count and ordering, over lists, ranges,
generators, empty input, None, strings, big ints and nested structures."""

from __future__ import annotations

from collections import Counter

import pytest
import workfns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parmap

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=3),
    ),
    max_leaves=8,
)
shapes = st.sampled_from(["list", "generator", "tuple"])
chunksizes = st.one_of(st.none(), st.integers(min_value=1, max_value=7))

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _shaped(items, shape):
    if shape == "generator":
        return (x for x in items)
    if shape == "tuple":
        return tuple(items)
    return list(items)


@SETTINGS
@given(items=st.lists(values, max_size=40), shape=shapes, chunksize=chunksizes, workers=st.integers(1, 3))
def test_map_equals_serial(any_backend, items, shape, chunksize, workers):
    expected = [workfns.describe(x) for x in items]
    got = parmap.map(workfns.describe, _shaped(items, shape), workers=workers, backend=any_backend, chunksize=chunksize)
    assert got == expected


@SETTINGS
@given(
    items=st.lists(values, max_size=40),
    shape=shapes,
    chunksize=chunksizes,
    workers=st.integers(1, 3),
    ordered=st.booleans(),
)
def test_imap_equals_serial(any_backend, items, shape, chunksize, workers, ordered):
    expected = [workfns.describe(x) for x in items]
    got = list(
        parmap.imap(
            workfns.describe,
            _shaped(items, shape),
            workers=workers,
            backend=any_backend,
            chunksize=chunksize,
            ordered=ordered,
        )
    )
    if ordered:
        assert got == expected
    else:
        assert Counter(map(repr, got)) == Counter(map(repr, expected))


@SETTINGS
@given(
    items=st.lists(st.tuples(values, values), max_size=30),
    chunksize=chunksizes,
    workers=st.integers(1, 3),
)
def test_starmap_equals_serial(any_backend, items, chunksize, workers):
    assert parmap.starmap(workfns.pack, items, workers=workers, backend=any_backend, chunksize=chunksize) == [
        workfns.pack(*args) for args in items
    ]


@SETTINGS
@given(start=st.integers(-50, 50), length=st.integers(0, 300), step=st.integers(1, 5), chunksize=chunksizes)
def test_ranges(any_backend, start, length, step, chunksize):
    items = range(start, start + length * step, step)
    assert parmap.map(workfns.square, items, workers=2, backend=any_backend, chunksize=chunksize) == [
        x * x for x in items
    ]


@SETTINGS
@given(
    items=st.lists(values, max_size=30),
    shape=shapes,
    share=st.integers(1, 8),
    chunksize=st.one_of(st.none(), st.integers(1, 8)),
    ordered=st.booleans(),
)
@pytest.mark.parametrize("backend", ["process", "fork"])
def test_retiring_workers_change_no_result(backend, items, shape, share, chunksize, ordered):
    chunksize = None if chunksize is None else min(chunksize, share)  # a bigger chunk is refused
    expected = [workfns.describe(x) for x in items]
    options = {"workers": 2, "backend": backend, "chunksize": chunksize, "max_tasks_per_child": share}
    assert parmap.map(workfns.describe, _shaped(items, shape), **options) == expected
    got = list(parmap.imap(workfns.describe, _shaped(items, shape), ordered=ordered, **options))
    assert (got if ordered else sorted(map(repr, got))) == (expected if ordered else sorted(map(repr, expected)))


@pytest.fixture(scope="module", params=["process", "pool"])
def warm_pool(request):
    with parmap.Pool(workers=2, backend=request.param) as pool:
        pool.map(workfns.square, range(4))  # start the workers before no_orphans looks
        yield pool


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(values, max_size=60), chunksize=chunksizes, ordered=st.booleans())
def test_warm_pool_equals_serial(warm_pool, items, chunksize, ordered):
    """Many more examples on a pool that stays warm, so they cost milliseconds."""
    expected = [workfns.describe(x) for x in items]
    assert warm_pool.map(workfns.describe, items, chunksize=chunksize) == expected
    got = list(warm_pool.imap(workfns.describe, iter(items), chunksize=chunksize, ordered=ordered))
    assert (got if ordered else sorted(map(repr, got))) == (expected if ordered else sorted(map(repr, expected)))


def _serial_with_policy(items, on_error):
    """What a serial loop gives under each on_error policy: (values, error raised)."""
    out = []
    for x in items:
        try:
            out.append(workfns.fail_sometimes(x))
        except ValueError as exc:
            if on_error == "raise":
                return out, exc
            if on_error == "return":
                out.append(exc)
    return out, None


@SETTINGS
@given(
    items=st.lists(st.integers(0, 30), max_size=40),
    chunksize=chunksizes,
    workers=st.integers(1, 3),
    on_error=st.sampled_from(["raise", "skip", "return"]),
)
def test_failures_equal_serial(backend, items, chunksize, workers, on_error):
    """With failing items too: imap yields what the serial loop yields, then
    raises what it raises (a failure's chunk-mates before it included)."""
    expected, error = _serial_with_policy(items, on_error)
    got = []
    raised = None
    options = {"workers": workers, "backend": backend, "chunksize": chunksize, "on_error": on_error}
    try:
        for value in parmap.imap(workfns.fail_sometimes, iter(items), **options):
            got.append(value)
    except ValueError as exc:
        raised = exc
    assert [repr(v) for v in got] == [repr(v) for v in expected]
    assert (raised is None) == (error is None)
    if error is not None:
        assert raised.args == error.args
