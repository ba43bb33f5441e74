"""Lambdas, closures and __main__ functions under every start method, spawn included."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import parmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP_BACKENDS = ["process", "pool", "apply_async"]


@pytest.mark.parametrize("backend", MP_BACKENDS)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_lambda_and_closure(backend, start_method):
    data = {"offset": 100}
    results = parmap.map(lambda x: x + data["offset"], range(6), workers=2, backend=backend, start_method=start_method)
    assert results == [x + 100 for x in range(6)]


@pytest.mark.parametrize("backend", MP_BACKENDS)
@pytest.mark.parametrize("initializer", ["function", "lambda"])  # by the standard pickle, by cloudpickle
def test_initargs_may_hold_multiprocessing_locks_values_and_queues(backend, initializer):
    # A spawned worker receives them from multiprocessing as it starts, the
    # one time they may be pickled.
    import multiprocessing

    import workfns

    context = multiprocessing.get_context("spawn")
    lock, counter, queue = context.Lock(), context.Value("i", 0), context.Queue()
    options = {"workers": 2, "backend": backend, "start_method": "spawn"}
    init = workfns.keep_shared if initializer == "function" else lambda *shared: workfns.keep_shared(*shared)
    shared = {"initializer": init, "initargs": (lock, counter, queue)}
    assert parmap.map(workfns.count_under_lock, range(6), **options, **shared) == list(range(6))
    assert counter.value == 6
    assert sorted(queue.get(timeout=10) for _ in range(6)) == list(range(6))


@pytest.mark.parametrize("backend", ["process", "pool"])
def test_an_initializer_partial_of_a_lambda_travels_by_value(backend):
    # Set aside with the locks (multiprocessing registers a reducer for
    # partials too), it went to the spawned worker by the standard pickle.
    import functools

    import workfns

    init = functools.partial(lambda value: workfns.keep_shared(value), 7)
    assert (
        parmap.map(workfns.shared_value, range(3), workers=2, backend=backend, start_method="spawn", initializer=init)
        == [7] * 3
    )


# An initializer and a function sharing the script's state, for the scripts below.
READY_PREAMBLE = """
import sys
sys.path.insert(0, {root!r})
import parmap

state = {{}}

def remember():
    state["ready"] = True

def ready(_):
    return state.get("ready", False)
"""

SCRIPT = READY_PREAMBLE + textwrap.dedent(
    """
    def triple(x):
        return 3 * x

    class ScriptError(Exception):
        pass

    def fail_on_1(x):
        if x == 1:
            raise ScriptError(x)
        return x

    def raises_the_script_class(**opts):
        try:
            parmap.map(fail_on_1, range(3), **opts)
        except ScriptError:  # the caller's very class, not a rebuilt twin
            return True
        except Exception:
            return False

    if __name__ == "__main__":
        for method in ("fork", "spawn", "forkserver"):
            for backend in ("process", "pool", "apply_async"):
                opts = dict(workers=2, backend=backend, start_method=method)
                assert parmap.map(lambda x: x * 2, range(5), **opts) == [0, 2, 4, 6, 8]
                # One warm pool for the rest: each spawned start costs a fresh interpreter.
                with parmap.Pool(initializer=remember, **opts) as pool:
                    assert pool.map(triple, range(5)) == [0, 3, 6, 9, 12]
                    assert pool.map(ready, range(4)) == [True] * 4, (method, backend)
                    # A lambda goes by value, with a copy of the globals the initializer set.
                    got = pool.map(lambda _: state.get("ready", False), range(2))
                    assert got == [True] * 2, (method, backend)
                assert raises_the_script_class(**opts), (method, backend)
        assert parmap.map(lambda x: -x, range(3), workers=2, backend="fork") == [0, -1, -2]
        for backend in ("auto", "pool"):
            got = parmap.map(ready, range(2), workers=2, backend=backend, initializer=lambda: remember())
            assert got == [True] * 2, backend
            # What an initializer only read is fn's own, newer, value.
            global mode
            mode = "old"
            with parmap.Pool(workers=2, backend=backend, initializer=lambda: mode) as pool:
                assert pool.map(lambda _: mode, range(2)) == ["old"] * 2
                mode = "new"
                assert pool.map(lambda _: mode, range(2)) == ["new"] * 2, backend
        for backend in ("auto", "fork", "thread", "serial"):
            assert raises_the_script_class(workers=2, backend=backend), backend
        print("all good")
    """
)


def _run_script(tmp_path, name, template):
    """Run ``template`` as the script ``name``: its own ``__main__``, as a user's would be."""
    script = tmp_path / name
    script.write_text(template.format(root=ROOT))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(120)
def test_main_script_functions_and_lambdas(tmp_path):
    assert "all good" in _run_script(tmp_path, "user_script.py", SCRIPT)


DECORATED_MAIN_SCRIPT = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing, pickle, sys
    sys.path.insert(0, {root!r})
    import parmap

    @parmap.parallel
    def triple(x):
        return 3 * x

    if __name__ == "__main__":
        # The standard pickle, as multiprocessing and ProcessPoolExecutor use it.
        assert pickle.loads(pickle.dumps(triple))(2) == 6
        for method in ("fork", "spawn"):
            context = multiprocessing.get_context(method)
            with context.Pool(2) as pool:
                assert pool.map(triple, [1, 2]) == [3, 6], method
            with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as executor:
                assert list(executor.map(triple, [1, 2])) == [3, 6], method
            assert triple.map([1, 2], workers=2, backend="process", start_method=method) == [3, 6], method
        assert repr(triple) == "<parmap.parallel 'triple'>"
        print("all good")
    """
)


@pytest.mark.timeout(120)
def test_a_decorated_main_function_travels_by_the_standard_pickle(tmp_path):
    # It used to fail: "it's not the same object as __main__.triple".
    assert "all good" in _run_script(tmp_path, "decorated_script.py", DECORATED_MAIN_SCRIPT)


UNGUARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import parmap

    def square(x):
        return x * x

    # No `if __name__ == "__main__":` guard: every spawned worker runs this
    # again on import, and multiprocessing ends it before it runs anything.
    try:
        parmap.map(square, range(200), workers=2, start_method="spawn", chunksize=1, on_error="skip")
    except parmap.WorkerCrashedError as exc:
        print("raised:", exc)
    """
)


@pytest.mark.timeout(120)
def test_workers_that_cannot_start_fail_the_call_whatever_on_error_says(tmp_path):
    # It used to skip every item, one fresh worker each (~30 s, 200 tracebacks), and return [].
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT.format(root=ROOT))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110)
    assert "raised: worker processes fail to start" in result.stdout, result.stderr[-2000:]


def test_a_script_read_from_standard_input_is_named_when_spawn_cannot_start_it():
    # `python - < script.py`: spawned workers look for a file "<stdin>"; the
    # error said to look for a missing `if __name__ == "__main__":`.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import parmap
        def square(x):
            return x * x
        if __name__ == "__main__":
            try:
                parmap.map(square, range(4), workers=2, start_method="spawn")
            except parmap.WorkerCrashedError as exc:
                print(exc)
        """
    )
    result = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=60)
    assert "this program's script (<stdin>) is no file that workers could import again" in result.stdout, result


def test_python_dash_c_lambda_under_spawn():
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); import parmap;"
        "print(parmap.map(lambda x: x + 1, range(3), workers=2, start_method='spawn'))"
    )
    # -X dev: a spawned worker used to report its second /dev/null stdin as an unclosed file at exit.
    result = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[1, 2, 3]"
    assert "Warning" not in result.stderr, result.stderr


DASH_C_INITIALIZER = (
    READY_PREAMBLE
    + """
for options in ({{"backend": "auto"}}, {{"backend": "pool"}}, {{"start_method": "spawn"}}):
    assert parmap.map(ready, range(2), workers=2, initializer=remember, **options) == [True] * 2, options
print("all good")
"""
)


@pytest.mark.timeout(120)
def test_initializer_state_reaches_fn_under_python_dash_c():
    # No script file: both go by value, each with its own copy of the globals.
    code = DASH_C_INITIALIZER.format(root=ROOT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "all good"


GLOBAL_METHOD_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, sys
    sys.path.insert(0, {root!r})
    import parmap

    def main_name(_):
        return sys.modules["__main__"].__name__  # '__mp_main__' in a spawned worker

    if __name__ == "__main__":
        assert parmap.map(main_name, range(2), workers=2) == ["__main__"] * 2  # forked
        multiprocessing.set_start_method("spawn")
        for backend in ("auto", "process", "pool", "apply_async"):
            assert parmap.map(main_name, range(2), workers=2, backend=backend) == ["__mp_main__"] * 2, backend
        assert parmap.map(main_name, range(2), workers=2, start_method="fork") == ["__main__"] * 2
        print("all good")
    """
)


@pytest.mark.timeout(120)
def test_the_programs_own_start_method_is_the_default(tmp_path):
    # As for multiprocessing.Pool and ProcessPoolExecutor: a program that chose
    # spawn (CUDA does not survive a fork) gets spawned workers unless it asks otherwise.
    assert _run_script(tmp_path, "global_method.py", GLOBAL_METHOD_SCRIPT).strip() == "all good"
