"""The SPEC's "Errors" section: every failure ends in an exception, never a hang,
and leaves no process behind (the autouse no_orphans fixture checks that)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import psutil
import pytest
import workfns
from conftest import PROCESS_BACKENDS

import parmap
from parmap.backends.fork import ForkBackend

ITEMS = list(range(12))

# (function, extra options, expected error, text the message must contain)
CRASH_MATRIX = [
    pytest.param(workfns.raise_value_error, {}, ValueError, "bad item 5", id="raise"),
    pytest.param(workfns.sigkill_self, {}, parmap.WorkerCrashedError, "SIGKILL", id="sigkill"),
    pytest.param(workfns.exit_3, {}, parmap.WorkerCrashedError, "exit code 3", id="os._exit"),
    pytest.param(workfns.segfault, {}, parmap.WorkerCrashedError, "SIGSEGV", id="segfault"),
    pytest.param(workfns.raise_unpicklable, {}, parmap.TaskError, "UnpicklableError", id="unpicklable-exception"),
    pytest.param(
        workfns.return_unpicklable, {}, parmap.SerializationError, "result of item #5", id="unpicklable-result"
    ),
    pytest.param(workfns.sleep_forever, {"timeout": 0.3}, parmap.TaskTimeoutError, "item #5", id="timeout"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("fn", "options", "error", "text"), CRASH_MATRIX)
def test_crash_matrix(process_backend, fn, options, error, text):
    with pytest.raises(error) as info:
        parmap.map(fn, ITEMS, workers=2, backend=process_backend, **options)
    assert text in str(info.value) or text in "".join(getattr(info.value, "__notes__", []))
    message = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert "#5" in message  # names the item
    if isinstance(info.value, parmap.ParmapError):
        assert info.value.position == 5


@pytest.mark.timeout(30)
def test_an_exception_that_cannot_travel_keeps_its_notes(process_backend):
    # Its TaskError stand-in lost them: the user's own, and the note that
    # tells an initializer's failure from an item's.
    with pytest.raises(parmap.TaskError) as info:
        parmap.map(workfns.raise_unpicklable_with_a_note, [1], workers=1, backend=process_backend)
    assert info.value.__notes__ == ["while reading the user's record", "parmap: raised by item #0 (1)"]
    with pytest.raises(parmap.TaskError) as info:
        parmap.map(abs, [1], workers=1, backend=process_backend, initializer=workfns.init_raise_unpicklable)
    assert info.value.__notes__ == ["parmap: raised by the initializer"]


def test_an_exception_raised_again_names_only_its_latest_item(any_backend):
    # On thread and serial it is fn's own object: each item's note piled up
    # on it, and a later call's error named the items of the earlier ones.
    workfns.STORED_ERROR.__notes__ = []
    for items in (["a", "b", "c"], ["z"]):
        with pytest.raises(ConnectionError) as info:
            parmap.map(workfns.raise_the_stored_error, items, workers=2, backend=any_backend)
        assert len([note for note in info.value.__notes__ if note.startswith("parmap: raised by item")]) == 1
    assert info.value.__notes__[-1] == "parmap: raised by item #0 ('z')"


@pytest.mark.timeout(30)
def test_unpicklable_item(process_backend):
    items = [1, 2, threading.Lock(), 4]
    with pytest.raises(parmap.SerializationError, match=r"^item #2 cannot be serialised") as info:
        parmap.map(workfns.describe, items, workers=2, backend=process_backend)
    assert info.value.position == 2


@pytest.mark.timeout(30)
def test_a_result_that_will_not_unpickle_fails_its_item_alone(process_backend):
    with pytest.raises(parmap.SerializationError, match="result of item #5 could not be unpickled") as info:
        parmap.map(workfns.return_unloadable, ITEMS, workers=2, backend=process_backend)
    assert info.value.position == 5
    results = parmap.map(workfns.return_unloadable, ITEMS, workers=2, backend=process_backend, on_error="return")
    assert [type(r) for r in results] == [int] * 5 + [parmap.SerializationError] + [int] * 6


@pytest.mark.timeout(30)
def test_a_result_that_raises_system_exit_as_it_unpickles_fails_its_item_alone(process_backend):
    # It ended the backend's thread, and the call waited for ever.
    results = parmap.map(workfns.return_exits_on_load, ITEMS, workers=2, backend=process_backend, on_error="return")
    assert [type(r) for r in results] == [int] * 5 + [parmap.SerializationError] + [int] * 6
    assert "SystemExit" in str(results[5])
    with parmap.Pool(workers=2, backend=process_backend) as pool, pytest.raises(parmap.SerializationError):
        pool.submit(workfns.return_exits_on_load, 5).result(timeout=20)


@pytest.mark.timeout(30)
def test_an_item_that_will_not_unpickle_in_the_worker_fails_alone(process_backend):
    items = [0, 1, workfns.OnlyInTheCaller(), 3, 4, 5]
    results = list(
        parmap.imap(workfns.square_or_none, iter(items), workers=2, backend=process_backend, on_error="return")
    )
    assert results[:2] == [0, 1] and results[3:] == [9, 16, 25]
    assert isinstance(results[2], parmap.SerializationError)
    assert str(results[2]).startswith("item #2 could not be unpickled in the worker: RuntimeError")
    assert results[2].position == 2


@pytest.mark.timeout(60)
def test_a_parmap_error_fn_raises_is_named_as_that_items(backend):
    # A map nested in fn failed with its own item #1's TaskTimeoutError: the
    # outer call took it for its own word about its item #1 (position 1,
    # no note), though item #2 raised it.
    items = range(4)
    results = parmap.map(workfns.nested_timeout_at, items, workers=2, backend=backend, on_error="return")
    assert [type(r) for r in results] == [int, int, parmap.TaskTimeoutError, int]
    assert results[2].position == 2
    assert "parmap: raised by item #2 (2)" in results[2].__notes__
    with pytest.raises(parmap.TaskTimeoutError) as info:
        parmap.map(workfns.nested_timeout_at, items, workers=2, backend=backend)
    assert info.value.position == 2 and "parmap: raised by item #2 (2)" in info.value.__notes__


@pytest.mark.parametrize("stored", [ValueError("stored"), parmap.TaskTimeoutError("stored")])
def test_an_error_fn_raises_again_for_a_later_item_goes_on_naming_the_first(stored):
    # On threads fn's very object comes back: items 1 and 2 raise one stored
    # error (a failed future's, say), in that order, and the map raises it
    # for item 1; the later, unseen failure renamed it item 2's.
    started, first, second = threading.Event(), threading.Event(), threading.Event()

    def fn(x):
        if x == 0:
            second.wait(10)
            time.sleep(0.2)
            return 0
        if x == 2:
            started.set()  # before item 1 fails: once it has, item 2 would not start
            first.wait(10)
            second.set()
        else:
            started.wait(10)
            first.set()
        raise stored

    with pytest.raises(type(stored)) as info:
        parmap.map(fn, range(3), workers=3, backend="thread", chunksize=1)
    assert second.is_set()  # item 2 did raise it
    assert info.value is stored and stored.__notes__ == ["parmap: raised by item #1 (1)"]
    if isinstance(stored, parmap.ParmapError):
        assert stored.position == 1


@pytest.fixture
def define_late_main_class(monkeypatch):
    """Defines a class of ``__main__`` when called, as a notebook cell defines
    one after the cell that made the pool: the workers started before have
    no such attribute in their ``__main__``."""
    import sys

    def define():
        late = type("Late", (), {"__module__": "__main__"})
        monkeypatch.setattr(sys.modules["__main__"], "Late", late, raising=False)
        return late

    return define


@pytest.mark.timeout(60)
def test_items_of_a_main_class_the_workers_lack_travel_by_value(any_backend, define_late_main_class):
    with parmap.Pool(workers=2, backend=any_backend) as pool:
        assert pool.map(workfns.square, range(8), chunksize=1) == [x * x for x in range(8)]  # workers up
        late = define_late_main_class()
        items = [late() for _ in range(5)]
        assert pool.map(workfns.type_name, items, chunksize=2) == ["Late"] * 5
        assert list(pool.imap(workfns.type_name, iter(items))) == ["Late"] * 5
        assert pool.submit(workfns.type_name, late()).result(timeout=30) == "Late"


@pytest.mark.timeout(60)
def test_a_main_function_the_workers_lack_travels_by_value(process_backend, monkeypatch):
    import sys

    with parmap.Pool(workers=2, backend=process_backend) as pool:
        assert pool.map(workfns.square, range(8), chunksize=1) == [x * x for x in range(8)]  # workers up
        # Defined in __main__ only now, as a script's later lines or a notebook cell would.
        namespace: dict = {"__name__": "__main__"}
        exec("def later(x):\n    return x + 100\n", namespace)
        monkeypatch.setattr(sys.modules["__main__"], "later", namespace["later"], raising=False)
        assert pool.map(namespace["later"], range(6), chunksize=1) == [x + 100 for x in range(6)]
        assert pool.submit(namespace["later"], 1).result(timeout=30) == 101


@pytest.mark.timeout(60)
def test_a_function_that_loads_nowhere_still_fails_the_call(process_backend):
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        assert pool.map(workfns.square, range(4)) == [0, 1, 4, 9]
        with pytest.raises(parmap.SerializationError, match="the function could not be loaded in the worker"):
            pool.map(workfns.CallableOnlyInTheCaller(), range(4))


@pytest.mark.timeout(30)
def test_unordered_imap_never_yields_an_error_it_is_to_raise(backend):
    # Item 2's KeyError comes after item 1's ValueError was recorded: it is
    # no result to hand over while item 0 is awaited, as a serial loop shows.
    got = []
    with pytest.raises(ValueError, match="item 1"):
        for value in parmap.imap(
            workfns.slow_zero_then_two_failures, range(3), workers=3, backend=backend, ordered=False, chunksize=1
        ):
            got.append(value)
    assert got == ["zero"]


@pytest.mark.timeout(30)
def test_unordered_imap_yields_no_value_after_a_failure_it_knows_of(backend):
    # Item 5 fails first: a serial loop reaches nothing after it. Items 6
    # and 7, sent ahead, were yielded on the process backends all the same.
    got = []
    with pytest.raises(ValueError, match="slow 0"):
        for value in parmap.imap(
            workfns.slow_zero_fast_five_fail, range(8), workers=2, backend=backend, ordered=False, chunksize=1
        ):
            got.append(value)
    assert set(got) <= {1, 2, 3, 4}


@pytest.mark.timeout(60)
def test_workers_crashing_at_once_are_each_charged_with_their_exit_code(process_backend, tmp_path):
    # On pool/apply_async the second death fell into the pool's replacement
    # and its chunk was rerun free of charge (retries=0, yet run twice); and
    # a worker the pool restarted and lost between two looks had no exit code.
    for round_ in range(3):
        marks = tmp_path / str(round_)
        marks.mkdir()
        fn = functools.partial(workfns.count_and_crash_the_first_time, str(marks))
        results = parmap.map(fn, [0, 1], workers=2, backend=process_backend, chunksize=1, on_error="return")
        assert [type(r) for r in results] == [parmap.WorkerCrashedError] * 2, results
        assert [r.exitcode for r in results] == [3, 3]
        assert [(marks / f"{x}.runs").read_text() for x in (0, 1)] == ["x", "x"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["pool", "apply_async"])  # whose workers a multiprocessing.Pool replaces
def test_a_crash_is_charged_to_no_chunk_its_worker_had_finished(backend, tmp_path):
    # pool/apply_async: a worker that finished a chunk (its result still in
    # the old pool's queue) and then crashed on the next was charged with
    # both: a retry "failed twice" that crashed once, and skip dropped items
    # that never failed (1-6 maps in 10). And a worker the old pool started
    # since the last look, dead of its chunk, went unseen: its chunk was
    # rerun free, and passed (a map in 2).
    uncharged = 0
    for round_ in range(8):
        marks = tmp_path / str(round_)
        marks.mkdir()
        fn = functools.partial(workfns.every_seventh_crashes_once, str(marks))
        if round_ % 2:
            assert parmap.map(fn, range(60), workers=2, backend=backend, retries=1) == list(range(60))
        else:
            kept = parmap.map(fn, range(60), workers=2, backend=backend, on_error="skip")
            assert [x for x in range(60) if x % 7 != 3 and x not in kept] == []  # no innocent one dropped
            uncharged += sum(1 for x in kept if x % 7 == 3)
    # A replacement's SIGKILL between an item's marker and its exit is rare,
    # and makes its crash look like the replacement's: at most once here.
    assert uncharged <= 1


@pytest.mark.timeout(60)
def test_a_forkserver_workers_exit_code_reads_the_same_from_two_threads():
    # parmap's monitor and multiprocessing.Pool's worker handler both poll a
    # dead worker: the second reader of the forkserver's status pipe met
    # end-of-file, and "exit code 255" could be what was kept (pool backend,
    # start_method="forkserver": ~3% of crashes). With multiprocessing's own
    # Popen this loop sees a 255 about every other run of 10 processes.
    from multiprocessing.connection import wait

    from parmap.backends._mppool import _ForkserverPopen

    context = multiprocessing.get_context("forkserver")
    seen = set()
    for _ in range(30):
        process = context.Process(target=os._exit, args=(3,))
        process._Popen = _ForkserverPopen
        process.start()
        wait([process.sentinel])
        both = threading.Barrier(2)
        codes = []

        def ask(process=process, both=both, codes=codes):
            both.wait()
            codes.append(process._popen.poll())

        askers = [threading.Thread(target=ask) for _ in range(2)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        process.join()
        seen.update(codes)
    assert seen == {3}


@pytest.mark.timeout(60)
def test_a_timeout_counts_only_the_items_own_run(process_backend):
    # The worker's start, its initializer, and the sending of a chunk's
    # results were charged to an item (the first): instant items timed out.
    assert parmap.map(
        workfns.square, range(4), workers=2, backend=process_backend, timeout=0.2, initializer=workfns.slow_initializer
    ) == [0, 1, 4, 9]
    results = parmap.map(
        workfns.nap_then_big_list, range(4), workers=2, backend=process_backend, chunksize=4, timeout=0.5
    )
    assert [len(r) for r in results] == [1_000_000] * 4


def test_a_timeout_does_not_spin_the_parent_while_no_item_runs(process_backend):
    # pool/apply_async woke with no wait once a chunk's sending was a timeout
    # ago while its worker ran no item (in the initializer here, or sending
    # big results): a core of the caller's CPU, and a GIL that slowed the
    # pool's result thread ~10x.
    cpu_before = time.process_time()
    results = parmap.map(
        workfns.square,
        range(4),
        workers=2,
        backend=process_backend,
        timeout=0.1,
        initializer=time.sleep,
        initargs=(1.0,),
    )
    assert results == [0, 1, 4, 9]
    spent = time.process_time() - cpu_before
    assert spent < 0.4, f"the caller used {spent:.2f} s of CPU while its workers slept 1 s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", "fork"])
def test_a_timeout_still_bounds_the_loading_of_items_and_pickling_of_results(backend):
    # Only an item's own run counts, but a hang in the user's __setstate__ or
    # __reduce__ around it must not make the call wait for ever.
    began = time.monotonic()
    loaded = parmap.imap(
        workfns.value_or_slow_result,
        [0, workfns.SlowToLoad(5), 2],
        workers=2,
        backend=backend,
        chunksize=1,
        timeout=0.3,
        on_error="return",
    )
    results = list(loaded)
    assert [type(r) for r in results] == [int, parmap.TaskTimeoutError, int], results
    pickled = parmap.map(
        workfns.value_or_slow_result, [0, 1, 2], workers=2, backend=backend, chunksize=1, timeout=0.3, on_error="return"
    )
    assert [type(r) for r in pickled] == [int, parmap.TaskTimeoutError, int], pickled
    assert time.monotonic() - began < 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", "fork"])
def test_an_item_that_starts_while_the_dispatcher_waits_still_times_out(backend):
    # Seen loading its chunk, the worker got a deadline of the timeout times
    # the chunk's length; the item that then hung ran for all of it (12.5 s).
    began = time.monotonic()
    with pytest.raises(parmap.TaskTimeoutError):
        items = (workfns.LoadsInAWhile(x) for x in range(25))  # 1 s of loading; a list, a fork would inherit
        parmap.map(workfns.sleep_unless_nonzero, items, workers=1, backend=backend, chunksize=25, timeout=0.5)
    assert time.monotonic() - began < 6


def _command_ends(marker_dir):
    """Whether the command run_command_or_fail started is gone within a second
    (a zombie counts as gone: its new parent, the init process, may not reap)."""
    pid = int((marker_dir / "command.pid").read_text())
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    psutil.Process(pid).kill()
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
@pytest.mark.parametrize("items", [["cmd"], ["fail", "cmd"]], ids=["timeout", "raise"])
def test_a_stopped_worker_takes_the_commands_it_ran_along(tmp_path, backend, items):
    # Killed mid-item (its item timed out, or another item's error ended the
    # call), a worker left the command its item ran to the init process,
    # running for as long as it liked: an orphan of the call. ("fail" comes
    # first: map raises the first error in input order, once what precedes
    # it is done.)
    fn = functools.partial(workfns.run_command_or_fail, str(tmp_path))
    with pytest.raises((parmap.TaskTimeoutError, ValueError)):
        parmap.map(fn, items, workers=2, backend=backend, chunksize=1, timeout=0.3 if len(items) == 1 else None)
    assert _command_ends(tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_leaving_an_imap_of_a_warm_pool_takes_its_commands_along(tmp_path, backend):
    # pool/apply_async forgot the early-ended call's chunks before the pool
    # swap looked for busy workers: their commands were left running.
    fn = functools.partial(workfns.run_command_or_fail, str(tmp_path))
    with parmap.Pool(workers=2, backend=backend, chunksize=1, on_error="return") as pool:
        results = pool.imap(fn, ["fail", "cmd"])
        assert isinstance(next(results), ValueError)  # raised once the command ran
        results.close()
        assert _command_ends(tmp_path)
        assert pool.map(workfns.square, range(3)) == [0, 1, 4]


def test_a_forked_worker_is_no_thread_of_parmaps_own():
    # Forked on the dispatcher thread, a worker runs on as that Thread
    # object: it counted as one, and a nested call there no longer waited
    # for its own workers when it closed.
    from parmap.backends._base import may_wait_for_another_backend

    assert parmap.map(lambda _: may_wait_for_another_backend(), range(2), workers=2, backend="fork") == [True, True]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", "pool"])
def test_a_timed_out_worker_takes_a_deep_tree_of_commands_along(tmp_path, backend):
    # Each look over /proc went one level deeper, eight looks at most: a
    # command under eight shells was left running.
    script = tmp_path / "chain.sh"
    script.write_text(workfns.CHAIN_SCRIPT)
    seconds = f"60.{os.getpid()}{len(backend)}"  # a command line no other test runs
    fn = functools.partial(workfns.run_command_chain, str(script), 10)
    with pytest.raises(parmap.TaskTimeoutError):
        parmap.map(fn, [seconds], backend=backend, timeout=0.5)
    assert (tmp_path / "chain.sh.reached").exists()  # a timeout before the sleep started would prove nothing

    def left() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline", "status"])
            if p.info["cmdline"] == ["sleep", seconds] and p.info["status"] != psutil.STATUS_ZOMBIE
        ]

    deadline = time.monotonic() + 2
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    stray = left()
    for p in stray:
        p.kill()
    assert not stray


@pytest.mark.timeout(30)
def test_unordered_errors_say_which_item_they_belong_to(process_backend):
    results = list(
        parmap.imap(workfns.exit_3, ITEMS, workers=2, backend=process_backend, ordered=False, on_error="return")
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert [(type(e), e.position) for e in errors] == [(parmap.WorkerCrashedError, 5)]
    assert sorted(r for r in results if not isinstance(r, BaseException)) == [x for x in ITEMS if x != 5]


@pytest.mark.parametrize(
    "error",
    [
        parmap.WorkerCrashedError("the worker running item #4 died", -9),
        parmap.TaskError("ValueError", "bad", "Traceback ..."),
        parmap.TaskTimeoutError("item #4 ran longer than timeout=1s"),
    ],
)
def test_errors_keep_their_position_through_pickle(error):
    error.position = 4
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), str(again), again.position) == (type(error), str(error), 4)
    assert parmap.ParmapError("about no item").position is None


def test_unpicklable_function(process_backend):
    lock = threading.Lock()
    with pytest.raises(parmap.SerializationError, match="the function"):
        parmap.map(lambda x: (lock, x), [1, 2], workers=2, backend=process_backend)


def test_user_exception_keeps_type_note_and_traceback(any_backend):
    with pytest.raises(ValueError, match="bad item 5") as info:
        parmap.map(workfns.raise_value_error, ITEMS, workers=2, backend=any_backend)
    exc = info.value
    assert any("item #5" in note and "(5)" in note for note in exc.__notes__)
    assert isinstance(exc.__cause__, parmap.RemoteTraceback)
    assert "raise_value_error" in exc.__cause__.text  # the worker's own frame
    assert "parmap" not in exc.__cause__.text.splitlines()[1]  # it starts there, not in parmap's machinery
    assert "raise ValueError" in exc.__cause__.text
    assert exc.__cause__.tb == exc.__cause__.text  # multiprocessing's and concurrent.futures' name for it


def test_timeout_refused_where_it_cannot_work():
    for name in ("thread", "serial"):
        with pytest.raises(ValueError, match="timeout"):
            parmap.map(workfns.square, [1], backend=name, timeout=1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("timeout", [float("inf"), 1e10])
def test_a_timeout_too_far_off_to_wait_for_is_no_limit(process_backend, timeout):
    assert parmap.map(workfns.square, range(5), workers=2, backend=process_backend, timeout=timeout) == [
        x * x for x in range(5)
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(workfns.STOPS))
@pytest.mark.parametrize("policy", ["raise", "skip", "return"])
def test_fn_raising_a_base_exception_stops_the_call_with_it(any_backend, kind, policy, tmp_marker_dir):
    # As a serial map stops: the same type in the caller, whatever on_error
    # says, tried once despite retries, and no worker counted as crashed.
    fn = functools.partial(workfns.stop_at_bad, tmp_marker_dir, kind)
    with pytest.raises(type(workfns.STOPS[kind]())) as info:
        parmap.map(fn, ITEMS, workers=2, backend=any_backend, on_error=policy, retries=2, chunksize=2)
    assert "item #5 (5)" in "".join(info.value.__notes__)
    assert "stop_at_bad" in info.value.__cause__.text  # the worker's traceback
    assert len(os.listdir(tmp_marker_dir)) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("star", [False, True], ids=["map", "starmap"])
def test_a_stop_iteration_from_fn_fails_its_item_instead_of_ending_the_chunk(any_backend, star):
    # list(map(fn, items)) takes a StopIteration from fn for the end of the
    # items: the chunk came back short, and its last item was retried for ever.
    run = parmap.starmap if star else parmap.map
    fn = workfns.stop_iteration_on_bad_pair if star else workfns.stop_iteration_on_bad
    items = [(x, 0) for x in ITEMS] if star else ITEMS
    with pytest.raises(RuntimeError, match="raised StopIteration") as info:
        run(fn, items, workers=2, backend=any_backend, chunksize=4)
    assert "item #5" in "".join(info.value.__notes__)
    kept = run(fn, items, workers=2, backend=any_backend, chunksize=4, on_error="skip")
    assert kept == [x for x in ITEMS if x != workfns.BAD]


@pytest.mark.timeout(30)
def test_an_exception_whose_init_takes_other_arguments_comes_back_as_itself(any_backend):
    # pickle would call TwoArgumentError("needs its state") and fail: its state rebuilds it.
    with pytest.raises(workfns.TwoArgumentError, match="needs its state") as info:
        parmap.map(workfns.raise_two_argument_error, ITEMS, workers=2, backend=any_backend)
    assert info.value.code == 7
    assert "item #5 (5)" in "".join(info.value.__notes__)
    assert "raise_two_argument_error" in info.value.__cause__.text


@pytest.mark.timeout(30)
def test_a_pool_stopped_by_a_base_exception_goes_on_serving(process_backend, tmp_marker_dir):
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        with pytest.raises(SystemExit):
            pool.submit(workfns.sys_exit_3, workfns.BAD).result(timeout=10)
        with pytest.raises(KeyboardInterrupt):
            list(pool.imap(functools.partial(workfns.stop_at_bad, tmp_marker_dir, "KeyboardInterrupt"), ITEMS))
        assert pool.map(workfns.square, ITEMS) == [x * x for x in ITEMS]


class _FailingDispatcher(ForkBackend):
    """A dispatcher with a bug: its first wait for workers raises."""

    def _watch(self, timeout):
        raise RuntimeError("a bug in the dispatcher")


@pytest.mark.timeout(30)
def test_a_failing_dispatcher_fails_the_call_instead_of_hanging():
    backend = _FailingDispatcher(2)
    try:
        with pytest.raises(parmap.ParmapError, match="dispatcher thread failed") as info:
            parmap.map(workfns.square, ITEMS, backend=backend)
        # The bug's own traceback: as the cause of the error its chunks got,
        # or behind the closed pool that a chunk submitted after it met.
        assert "in _watch" in "".join(traceback.format_exception(info.value))
        # Later calls are told why (not just "this pool is closed").
        with pytest.raises(parmap.PoolClosedError, match="closed: parmap's dispatcher thread failed"):
            parmap.map(workfns.square, ITEMS, backend=backend)
    finally:
        backend.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("policy", ["skip", "return"])
@pytest.mark.parametrize("fn", [workfns.raise_value_error, workfns.sigkill_self], ids=["raise", "crash"])
def test_error_policies_keep_every_other_result(process_backend, policy, fn):
    results = parmap.map(fn, ITEMS, workers=2, backend=process_backend, on_error=policy, chunksize=4)
    if policy == "skip":
        assert results == [x for x in ITEMS if x != workfns.BAD]
    else:
        assert [r for r in results if not isinstance(r, Exception)] == [x for x in ITEMS if x != workfns.BAD]
        assert isinstance(results[workfns.BAD], (ValueError, parmap.WorkerCrashedError))


@pytest.mark.parametrize("policy", ["skip", "return"])
def test_error_policies_in_process(any_backend, policy):
    results = parmap.map(workfns.raise_value_error, ITEMS, workers=2, backend=any_backend, on_error=policy)
    expected_len = len(ITEMS) - (policy == "skip")
    assert len(results) == expected_len


def test_imap_skip_and_return_stay_in_order(any_backend):
    results = list(parmap.imap(workfns.raise_value_error, ITEMS, workers=2, backend=any_backend, on_error="skip"))
    assert results == [x for x in ITEMS if x != workfns.BAD]


def test_retries_rerun_failed_items(any_backend, tmp_marker_dir):
    fn = functools.partial(workfns.fail_first_time, tmp_marker_dir)
    assert parmap.map(fn, range(8), workers=2, backend=any_backend, retries=1) == list(range(8))


def test_retries_exhausted_raise(any_backend, tmp_marker_dir):
    fn = functools.partial(workfns.fail_first_time, tmp_marker_dir)
    with pytest.raises(RuntimeError, match="first attempt") as info:
        parmap.map(fn, range(4), workers=2, backend=any_backend, retries=0)
    assert info.value.__notes__


@pytest.mark.timeout(30)
def test_retries_survive_a_crash(process_backend, tmp_marker_dir):
    fn = functools.partial(workfns.crash_first_time, tmp_marker_dir)
    assert parmap.map(fn, ITEMS, workers=2, backend=process_backend, retries=1) == ITEMS


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [None, 4])
def test_without_retries_a_crash_counts_though_the_item_would_pass_again(process_backend, tmp_marker_dir, chunksize):
    # retries=0: the crash is the item's error. Run again alone to find which
    # item of the chunk crashed, it passed, and the crash went unreported.
    fn = functools.partial(workfns.work_then_crash_first_time, tmp_marker_dir)
    with pytest.raises(parmap.WorkerCrashedError, match=rf"item #{workfns.BAD} \({workfns.BAD}\)"):
        parmap.map(fn, range(40), workers=2, backend=process_backend, chunksize=chunksize)


@pytest.mark.timeout(30)
def test_a_crash_on_every_attempt_says_how_many(process_backend):
    with pytest.raises(parmap.WorkerCrashedError, match=rf"item #{workfns.BAD} \({workfns.BAD}\)") as info:
        parmap.map(workfns.sigkill_self, ITEMS, workers=2, backend=process_backend, retries=2)
    assert "parmap: the same on each of 3 attempts" in info.value.__notes__


@pytest.mark.timeout(30)
def test_pool_survives_a_crash(process_backend):
    """One dead worker costs one item; the pool carries on with a replacement."""
    with parmap.Pool(workers=2, backend=process_backend) as pool:
        with pytest.raises(parmap.WorkerCrashedError) as info:
            pool.map(workfns.sigkill_self, ITEMS)
        assert info.value.exitcode == -9
        assert pool.map(workfns.square, ITEMS) == [x * x for x in ITEMS]


def test_errors_derive_from_parmap_error():
    for error in (
        parmap.TaskError,
        parmap.WorkerCrashedError,
        parmap.TaskTimeoutError,
        parmap.SerializationError,
        parmap.PoolClosedError,
    ):
        assert issubclass(error, parmap.ParmapError)
    assert issubclass(parmap.TaskTimeoutError, TimeoutError)


def test_initializer_failure_is_reported(backend):
    with pytest.raises(ZeroDivisionError) as info:
        parmap.map(workfns.square, range(4), workers=2, backend=backend, initializer=lambda: 1 / 0)
    assert any("initializer" in note for note in info.value.__notes__)


def test_a_failed_initializer_fails_every_later_call_of_the_pool(backend):
    # serial used to run the later calls as if it had succeeded.
    with parmap.Pool(workers=2, backend=backend, initializer=workfns.init_zero_division) as pool:
        for _ in range(2):
            with pytest.raises(ZeroDivisionError):
                pool.map(workfns.square, range(4))
        with pytest.raises(ZeroDivisionError):
            pool.submit(workfns.square, 2).result(timeout=20)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("init", [workfns.init_sys_exit, workfns.init_keyboard_interrupt])
def test_an_initializer_that_exits_is_reported_as_itself(backend, init):
    # Left to end its worker, multiprocessing.Pool would replace it with one
    # that exits the same way, for ever.
    with pytest.raises((SystemExit, KeyboardInterrupt)) as info:
        parmap.map(workfns.square, range(4), workers=2, backend=backend, initializer=init)
    assert any("initializer" in note for note in info.value.__notes__)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("on_error", ["raise", "skip", "return"])
def test_workers_that_die_before_running_anything_end_the_call(process_backend, on_error):
    # An initializer that kills its worker: every replacement dies alike. No
    # item is to blame, so the call fails as a whole: skip used to return []
    # as if done, and return put a crash in every item's place.
    with pytest.raises(parmap.WorkerCrashedError, match="fail to start") as info:
        parmap.map(
            workfns.square,
            range(40),
            workers=2,
            backend=process_backend,
            chunksize=1,
            initializer=workfns.init_os_exit,
            on_error=on_error,
        )
    assert info.value.exitcode is not None


@pytest.mark.timeout(30)
def test_a_pool_whose_workers_cannot_start_stops_trying_while_idle(process_backend):
    # They used to be restarted at once, each dying again: a fork loop that
    # took most of a core for as long as the pool stayed open (on pool and
    # apply_async, multiprocessing.Pool restarts dead workers by itself).
    backend = process_backend
    others = {child.pid for child in psutil.Process().children()}  # a session's Dask cluster, say
    with parmap.Pool(workers=2, backend=backend, initializer=workfns.init_os_exit) as pool:
        with pytest.raises(parmap.WorkerCrashedError):
            pool.submit(workfns.square, 3).result(timeout=10)
        time.sleep(0.2)
        seen = set()
        for _ in range(25):
            seen.update(child.pid for child in psutil.Process().children())
            time.sleep(0.02)
        assert seen - others == set()
        with pytest.raises(parmap.WorkerCrashedError):  # new work still gets its answer
            pool.map(workfns.square, range(4))


@pytest.mark.timeout(30)
def test_a_crash_is_seen_though_the_worker_left_a_process_behind(process_backend):
    # The forked process holds copies of the worker's pipes, exit sentinel
    # included: the death went unseen until that process ended.
    began = time.monotonic()
    with pytest.raises(parmap.WorkerCrashedError, match="exit code 3"):
        parmap.map(workfns.crash_leaving_a_grandchild, range(8), workers=2, backend=process_backend, chunksize=1)
    assert time.monotonic() - began < 5  # not a speed check: the grandchild lives 8 s


CONCURRENT_POOLS_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path.insert(0, {root!r})
    import parmap

    def crash_on_3(x):
        if x == 3:
            os._exit(1)
        return x

    def long(x):
        time.sleep(15)
        return x

    def others():  # other parts of the program, starting pools meanwhile
        for _ in range(8):
            threading.Thread(target=parmap.map, args=(long, range(2)), kwargs={{"workers": 2, "backend": {backend!r}}},
                             daemon=True).start()
            time.sleep(0.15)

    if __name__ == "__main__":
        threading.Thread(target=others, daemon=True).start()
        until = time.monotonic() + 1.5
        worst = 0.0
        while time.monotonic() < until:
            began = time.monotonic()
            try:
                parmap.map(crash_on_3, range(8), workers=2, backend={backend!r}, chunksize=1)
            except parmap.WorkerCrashedError:
                pass
            worst = max(worst, time.monotonic() - began)
            if worst > 5:
                break
        print(f"worst {{worst:.1f}}")  # the daemon threads' pools end with the interpreter
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", "fork"])
def test_a_crash_is_seen_while_other_pools_start_workers(tmp_path, backend):
    # A worker forked by another pool while this one started a worker held a
    # copy of its pipes: the death went unseen until that worker ended (15 s).
    script = tmp_path / "concurrent_pools.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(CONCURRENT_POOLS_SCRIPT.format(root=root, backend=backend))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    worst = float(result.stdout.split()[-1]) if result.stdout.startswith("worst") else None
    assert worst is not None and worst < 5, (result.stdout, result.stderr[-2000:])


def test_generator_error_propagates(any_backend):
    def broken():
        yield 1
        raise KeyError("input broke")

    with pytest.raises(KeyError, match="input broke"):
        parmap.map(workfns.square, broken(), workers=2, backend=any_backend)


def test_process_backends_listed():
    assert set(PROCESS_BACKENDS) <= set(parmap.BACKEND_NAMES)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["pool", "apply_async"])
def test_pool_survives_a_worker_that_died_holding_the_result_lock(backend):
    # multiprocessing.Pool.terminate() blocks for ever on a lock a killed
    # worker held; parmap frees it once every worker is dead.
    with pytest.raises(parmap.WorkerCrashedError, match="item #0"):
        parmap.map(workfns.die_holding_result_lock, range(8), workers=2, backend=backend, chunksize=1)
    # ... and a run that goes on past the death gets every other result: the
    # wedged pool is replaced and the chunks it held are run again.
    results = parmap.map(
        workfns.die_holding_result_lock, range(8), workers=2, backend=backend, chunksize=1, on_error="skip"
    )
    assert results == list(range(1, 8))


TBLIB_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from tblib import pickling_support

    import parmap

    pickling_support.install()  # what importing distributed does

    def fail(kind):
        if kind == "decode":
            b"\\xff".decode("utf-8")
        raise SystemExit(5)

    if __name__ == "__main__":
        for kind, keep in (("decode", lambda e: (e.encoding, e.reason)), ("exit", lambda e: e.code)):
            try:
                parmap.map(fail, [kind], workers=1, backend={backend!r})
            except BaseException as exc:
                print(kind, type(exc).__name__, keep(exc))
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", "pool"])
def test_exceptions_keep_their_fields_when_tblib_pickles_exceptions(tmp_path, backend):
    # tblib's reducers (installed by importing distributed) rebuild an
    # exception without __init__: a builtin's C fields came back None.
    pytest.importorskip("tblib.pickling_support")
    script = tmp_path / "tblib_installed.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(TBLIB_SCRIPT.format(root=root, backend=backend))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert result.stdout.splitlines() == [
        "decode UnicodeDecodeError ('utf-8', 'invalid start byte')",
        "exit SystemExit 5",
    ], result.stderr[-2000:]
