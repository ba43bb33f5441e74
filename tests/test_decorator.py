"""@parmap.parallel keeps the function and adds .map/.imap/.starmap."""

from __future__ import annotations

import inspect

import pytest
import workfns

import parmap


def test_plain_call_runs_here():
    assert workfns.decorated_cube(3) == 27


def test_keeps_name_doc_and_signature():
    assert workfns.decorated_cube.__name__ == "decorated_cube"
    assert workfns.decorated_cube.__doc__ == "Cube a number."
    assert str(inspect.signature(workfns.decorated_cube)) == "(x)"


def test_map_imap_starmap(backend):
    assert workfns.decorated_cube.map(range(6), workers=2, backend=backend) == [x**3 for x in range(6)]
    assert sorted(workfns.decorated_cube.imap(range(6), workers=2, backend=backend, ordered=False)) == [
        x**3 for x in range(6)
    ]
    assert workfns.decorated_cube.starmap([(2,), (3,)], workers=2, backend=backend) == [8, 27]


def test_decorator_with_options_and_overrides():
    @parmap.parallel(workers=2, backend="thread", on_error="skip")
    def fragile(x):
        if x == 2:
            raise ValueError("two")
        return x

    assert fragile.map(range(4)) == [0, 1, 3]
    assert fragile.map(range(4), on_error="return")[2].args == ("two",)
    assert fragile(1) == 1


def test_decorated_module_function_under_spawn():
    assert workfns.decorated_cube.map(range(5), workers=2, backend="process", start_method="spawn") == [
        x**3 for x in range(5)
    ]


def test_decorated_method_binds_like_a_function(backend):
    scaler = workfns.Scaler(3)
    assert scaler.scale(2) == 6
    assert scaler.scale.map(range(5), backend=backend) == [0, 3, 6, 9, 12]
    assert workfns.Scaler.scale(scaler, 4) == 12


class _Methods:
    @parmap.parallel
    @staticmethod
    def static(x):
        return x + 1

    @parmap.parallel
    @classmethod
    def of_class(cls, x):
        return (cls.__name__, x)


def test_decorating_a_staticmethod_or_classmethod_binds_as_they_do():
    # Above @staticmethod it used to bind the instance: "takes 1 positional argument but 2 were given".
    assert _Methods.static(1) == _Methods().static(1) == 2
    assert _Methods().static.map([1, 2], workers=2, backend="thread") == [2, 3]
    assert _Methods.of_class(1) == _Methods().of_class(1) == ("_Methods", 1)
    assert _Methods.of_class.map([1, 2], workers=2, backend="thread") == [("_Methods", 1), ("_Methods", 2)]


def test_decorated_function_pickles_by_name():
    import pickle

    assert pickle.loads(pickle.dumps(workfns.decorated_cube)) is workfns.decorated_cube
    # ... so it also works as the fn of another call, under spawn too.
    assert parmap.map(workfns.decorated_cube, [2], workers=1, backend="process", start_method="spawn") == [8]


def test_decorated_function_sees_the_state_its_initializer_set(process_backend):
    # Sent by name, the function runs against the worker's own module, whose
    # globals the initializer changed; a by-value copy would see "unset".
    results = workfns.decorated_read_setting.map(
        range(4), workers=2, backend=process_backend, initializer=workfns.set_setting, initargs=("set",)
    )
    assert results == ["set"] * 4


def test_a_decorator_default_of_ordered_only_reaches_imap():
    @parmap.parallel(workers=2, backend="thread", ordered=False)
    def same(x):
        return x

    assert same.map(range(5)) == list(range(5))
    assert same.starmap([(1,), (2,)]) == [1, 2]
    assert sorted(same.imap(range(5))) == list(range(5))


def test_the_decorator_checks_the_backend_at_once():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        parmap.parallel(backend="nope")
    with pytest.raises(TypeError, match="backend must be"):
        parmap.parallel(backend=3)
