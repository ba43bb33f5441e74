"""Functions the tests send to workers. Module-level, so every start method
(spawn included) can import them; the failing ones fail on cue for item 5."""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time

import parmap

BAD = 5


def square(x):
    return x * x


def square_or_none(x):
    return x * x if isinstance(x, int) else None


def describe(x):
    return (type(x).__name__, x)


def pack(*args):
    return args


def same_list_twice(x):
    part = [x]
    return (part, part)


def getpid(_=None):
    return os.getpid()


def pid_after(seconds):
    """This worker's pid, after ``seconds``."""
    time.sleep(seconds)
    return os.getpid()


def runner_after_a_pause(_=None):
    """Which worker ran the item (process and thread), after 20 ms: items of
    one chunk share it, and chunks of a few items spread over the workers."""
    time.sleep(0.02)
    return os.getpid(), threading.get_ident()


def raise_value_error(x):
    if x == BAD:
        raise ValueError(f"bad item {x}")
    return x


def raise_value_error_on_odd(x):
    if x % 2:
        raise ValueError(f"bad item {x}")
    return x


def sigkill_self(x):
    if x == BAD:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_3(x):
    if x == BAD:
        os._exit(3)
    return x


def sys_exit_3(x):
    if x == BAD:
        sys.exit(3)
    return x


class Stop(BaseException):
    """Not an ``Exception``: what a function raises to stop, as ``SystemExit`` does."""


STOPS = {"SystemExit": lambda: SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt, "Stop": lambda: Stop("halt")}


def stop_at_bad(marker_dir, kind, x):
    """Raise the ``kind`` of ``STOPS`` on item 5, leaving a file per attempt."""
    if x == BAD:
        with open(os.path.join(marker_dir, f"{os.getpid()}-{time.monotonic_ns()}.tried"), "w"):
            pass
        raise STOPS[kind]()
    return x


def segfault(x):
    if x == BAD:
        ctypes.string_at(0)
    return x


def sleep_forever(x):
    if x == BAD:
        time.sleep(60)
    return x


class TwoArgumentError(Exception):
    """Pickles, but pickle cannot rebuild it: __init__ takes two arguments and passes one on."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def raise_two_argument_error(x):
    if x == BAD:
        raise TwoArgumentError("needs its state", 7)
    return x


class UnpicklableError(Exception):
    """Cannot travel in any form: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable(x):
    if x == BAD:
        raise UnpicklableError("cannot travel")
    return x


def raise_unpicklable_with_a_note(x):
    error = UnpicklableError("cannot travel")
    error.add_note("while reading the user's record")
    raise error


def init_raise_unpicklable():
    raise UnpicklableError("cannot travel")


def return_unpicklable(x):
    if x == BAD:
        return threading.Lock()
    return x


class Unloadable:
    """Pickles anywhere, unpickles nowhere."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise RuntimeError("cannot rebuild")


def return_unloadable(x):
    return Unloadable() if x == BAD else x


class ExitsOnLoad:
    """Unpickles by raising SystemExit, which is no Exception."""

    def __reduce__(self):
        return (_exit_on_load, ())


def _exit_on_load():
    raise SystemExit(5)


def return_exits_on_load(x):
    return ExitsOnLoad() if x == BAD else x


_CALLER = os.getpid()  # a forked worker inherits the caller's pid here


def _load_in_the_caller_only():
    if os.getpid() != _CALLER:
        raise RuntimeError("only loads in the caller")
    return "loaded"


class OnlyInTheCaller:
    """Pickles anywhere, unpickles only in the process that imported this module."""

    def __reduce__(self):
        return (_load_in_the_caller_only, ())


def fail_first_time(marker_dir, x):
    """Raise on the first attempt per item, succeed afterwards (a file marks the attempt)."""
    marker = os.path.join(marker_dir, f"{x}.tried")
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        raise RuntimeError(f"first attempt at {x}")
    return x


def crash_first_time(marker_dir, x):
    marker = os.path.join(marker_dir, f"{x}.tried")
    if x == BAD and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def every_seventh_crashes_once(marker_dir, x):
    """Items 3, 10, 17, ... exit the first time they run, and pass after."""
    marker = os.path.join(marker_dir, f"{x}.tried")
    if x % 7 == 3 and not os.path.exists(marker):
        # A pool replacement's SIGTERM between the marker and the exit would
        # make this crash look like the replacement's doing, and its rerun pass.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        with open(marker, "w"):
            pass
        os._exit(1)
    return x


def work_then_crash_first_time(marker_dir, x):
    """A millisecond of work per item; on ``BAD``, a crash the first time only."""
    time.sleep(0.001)
    return crash_first_time(marker_dir, x)


def record_pid_then_sleep(marker_dir, x):
    with open(os.path.join(marker_dir, f"{os.getpid()}.pid"), "w"):
        pass
    time.sleep(0.2)
    return x


def run_command_or_fail(marker_dir, x):
    """Item "cmd" runs a long command (its pid noted in marker_dir/command.pid);
    item "fail" raises once that command runs."""
    path = os.path.join(marker_dir, "command.pid")
    if x == "fail":
        while not os.path.exists(path):
            time.sleep(0.01)
        raise ValueError("failed while the command ran")
    proc = subprocess.Popen(["sleep", "60"])
    with open(path + ".tmp", "w") as f:
        f.write(str(proc.pid))
    os.rename(path + ".tmp", path)
    proc.wait()
    return x


def sigterm_is_default(_=None):
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def slow_square(x):
    time.sleep(0.02)
    return x * x


# The deepest shell leaves "<script>.reached" as it starts the sleep.
CHAIN_SCRIPT = """if [ "$1" -gt 0 ]; then sh "$0" $(($1 - 1)) "$2"; true; else : >"$0.reached"; sleep "$2"; fi"""


def run_command_chain(script, depth, seconds):
    """Run ``sleep seconds`` under ``depth`` shells, each waiting for the next."""
    subprocess.run(["sh", script, str(depth), seconds])


def blocked_signals(_=None):
    """This process's blocked-signal mask, as /proc shows it."""
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("SigBlk"))


def report_blocked_signals(queue):
    queue.put(blocked_signals())


def nested_map(x):
    """A parmap call made inside a worker: must run serially, right here, and draw no bar."""
    return parmap.map(getpid, range(3), workers=2, progress=True)


def nested_map_with_timeout(x):
    """A nested call that asks for what only worker processes could enforce."""
    return parmap.map(square, range(3), workers=2, timeout=5)


def nested_map_timing_out(x):
    """A nested call whose item runs past its timeout."""
    try:
        parmap.map(sleep_unless_zero, [x], workers=2, timeout=0.3)
    except parmap.TaskTimeoutError:
        return "timed out"
    return "not stopped"


def nested_submit_timing_out(x):
    """A pool made inside a worker whose submitted task runs past the pool's timeout."""
    with parmap.Pool(workers=2, timeout=0.3) as pool:
        fast = pool.submit(square, x)
        slow = pool.submit(sleep_unless_zero, x)
        try:
            slow.result(timeout=30)
        except parmap.TaskTimeoutError:
            return fast.result(), "timed out"
        return fast.result(), "not stopped"


def sleep_unless_nonzero(x):
    if not x:
        time.sleep(60)
    return x


def sleep_unless_zero(x):
    if x:
        time.sleep(60)
    return x


def raise_on_zero_else_sleep(x):
    if x == 0:
        raise ValueError("item 0 fails at once")
    time.sleep(60)
    return x


def count_init(marker_dir):
    with open(os.path.join(marker_dir, f"init-{os.getpid()}"), "a") as f:
        f.write("x")


def sleep_then_square(x, seconds=0.01):
    time.sleep(seconds)
    return x * x


@parmap.parallel
def decorated_cube(x):
    """Cube a number."""
    return x**3


class CountingFn:
    """Records every time it is unpickled (in a worker), to prove fn travels once per worker."""

    def __init__(self, marker_dir):
        self.marker_dir = marker_dir

    def __call__(self, x):
        return x

    def __setstate__(self, state):
        self.__dict__.update(state)
        path = os.path.join(self.marker_dir, f"unpickled-{os.getpid()}-{time.monotonic_ns()}")
        with open(path, "w"):
            pass


def siblings_after_a_pause(_):
    """How many forked workers the parent has while this item runs.

    Forks share the parent's command line; multiprocessing's helper
    processes (forkserver, resource tracker) do not, and are not counted.
    """
    import psutil

    time.sleep(0.3)
    parent = psutil.Process(os.getppid())
    return sum(1 for child in parent.children() if _same_command(child, parent))


def _same_command(child, parent) -> bool:
    import psutil

    try:  # a child may exit between the listing and the look
        return child.cmdline() == parent.cmdline()
    except psutil.NoSuchProcess:
        return False


def die_holding_result_lock(x):
    """On a multiprocessing.Pool worker: take the pool's result-queue lock,
    then SIGKILL yourself, as the OOM killer may strike mid-send."""
    if x == 0:
        frame = sys._getframe()
        while frame is not None and "outqueue" not in frame.f_locals:
            frame = frame.f_back
        if frame is not None:
            frame.f_locals["outqueue"]._wlock.acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return x


class Scaler:
    """A class with a decorated method, to check ``obj.method.map``."""

    def __init__(self, factor):
        self.factor = factor

    @parmap.parallel(workers=2)
    def scale(self, x):
        return x * self.factor


SETTING = "unset"


def set_setting(value):
    """An initializer that changes this module's state in each worker."""
    global SETTING
    SETTING = value


@parmap.parallel
def decorated_read_setting(_):
    return SETTING


class Traveller:
    """Says whether it was pickled on its way to the worker: its copy is
    rebuilt with ``"pickled"`` in place of its tag."""

    def __init__(self, tag):
        self.tag = tag

    def __reduce__(self):
        return (Traveller, ("pickled",))


def tag(traveller):
    return traveller.tag


class Blob:
    """Pickles its data as a ``pickle.PickleBuffer``, the way numpy arrays do
    under protocol 5: a large one reaches the pickler's file as that object
    itself, which has no ``len()``."""

    def __init__(self, data):
        self.data = bytearray(data)

    def __reduce_ex__(self, protocol):
        return (Blob, (pickle.PickleBuffer(self.data),))


def blob_size(blob):
    return len(blob.data)


def type_name(x):
    return type(x).__name__


class CallableOnlyInTheCaller(OnlyInTheCaller):
    """A function that pickles anywhere and loads in no worker, by reference or by value."""

    def __call__(self, x):
        return x


def wait_for_file(path):
    """Block until ``path`` exists (a gate the test opens)."""
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return True


def mark(marker_dir, x):
    """Leave ``x.ran`` behind: proof that the item ran."""
    with open(os.path.join(marker_dir, f"{x}.ran"), "w"):
        pass
    return x


def stop_iteration_on_bad(x):
    """Raises StopIteration, which a loop over ``map`` takes for the end of the items."""
    if x == BAD:
        raise StopIteration("no more")
    return x


def stop_iteration_on_bad_pair(x, y):
    return stop_iteration_on_bad(x) + y


def read_stdin(_):
    """What standard input holds for a worker."""
    return sys.stdin.read()


def parmap_inside(backend):
    """A call made inside a daemonic multiprocessing worker: its results, or its error."""
    try:
        return parmap.map(square, range(6), workers=2, backend=backend)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def init_sys_exit():
    sys.exit(2)


def init_keyboard_interrupt():
    raise KeyboardInterrupt


def init_os_exit():
    """Kills each worker before it runs anything."""
    os._exit(3)


def count_then_crash(marker_dir, x):
    """Leave one file per attempt, then end the worker."""
    fd, _ = tempfile.mkstemp(dir=marker_dir, prefix=f"{x}-", suffix=".attempt")
    os.close(fd)
    os._exit(7)


def init_zero_division():
    1 / 0


def crash_leaving_a_grandchild(x):
    """On ``BAD``: fork a process that outlives this worker (holding copies
    of everything it inherited), then end the worker."""
    if x == BAD:
        if os.fork() == 0:
            time.sleep(8)
            os._exit(0)
        os._exit(3)
    return x


def pid_after_a_pause_on_even_firsts(x):
    """The worker's pid; items 0 and 2 take half a second."""
    if x in (0, 2):
        time.sleep(0.5)
    return os.getpid()


def fail_sometimes(x):
    """``ValueError`` on the integers 3 apart from a multiple of 7, else ``10 * x``."""
    if x % 7 == 3:
        raise ValueError(x)
    return 10 * x


def slow_zero_then_two_failures(i):
    """Item 0 is slow, item 1 fails at once, item 2 fails a little later."""
    if i == 0:
        time.sleep(0.6)
        return "zero"
    if i == 1:
        raise ValueError("item 1")
    time.sleep(0.2)
    raise KeyError("item 2")


def slow_zero_fast_five_fail(i):
    """Items 0 (after 0.3 s) and 5 (at once) fail; the others return at once."""
    if i == 0:
        time.sleep(0.3)
        raise ValueError("slow 0")
    if i == 5:
        raise ValueError("fast 5")
    return i


def count_then_stop(path, kind):
    """Append a mark to ``path``, then raise SystemExit or KeyboardInterrupt."""
    with open(path, "a") as marks:
        marks.write("x")
    raise SystemExit(3) if kind == "exit" else KeyboardInterrupt


def count_and_crash_the_first_time(marker_dir, x):
    """Append a mark per run of ``x``; the first run of each item exits 3."""
    path = os.path.join(marker_dir, f"{x}.runs")
    first = not os.path.exists(path)
    with open(path, "a") as runs:
        runs.write("x")
    if first:
        os._exit(3)
    return x


def identity(x):
    return x


def nap_then_big_list(x):
    """0.15 s, then a list of a million ints: a chunk of these spends a while sending."""
    time.sleep(0.15)
    return list(range(1_000_000)) if x >= 0 else []


def slow_initializer():
    time.sleep(0.4)


class SlowToLoad:
    """Unpickles only after 30 s: a hang in the worker before any item runs."""

    def __init__(self, value):
        self.value = value

    def __setstate__(self, state):
        time.sleep(30)
        self.__dict__.update(state)


def _load_in_a_while(value):
    time.sleep(0.04)
    return value


class LoadsInAWhile:
    """Unpickles to ``value`` after 40 ms: a chunk of them loads for a while."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (_load_in_a_while, (self.value,))


class SlowToPickle:
    """Pickles only after 30 s: a hang in the worker after its item ran."""

    def __reduce__(self):
        time.sleep(30)
        return (SlowToPickle, ())


def value_or_slow_result(x):
    return SlowToPickle() if x == 1 else getattr(x, "value", x)


SHARED: tuple = ()


def keep_shared(*objects):
    """An initializer in multiprocessing.Pool's style: keep what it was given."""
    global SHARED
    SHARED = objects


def count_under_lock(x):
    """Uses the lock, value and queue the initializer kept (see keep_shared)."""
    lock, counter, queue = SHARED
    with lock:
        counter.value += 1
    queue.put(x)
    return x


class PickledInAWhile:
    """Pickled as ``x`` after 0.2 s: a multiprocessing queue pickles what was
    put on it on its feeder thread, after ``put`` returned."""

    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        time.sleep(0.2)
        return (int, (self.x,))


def put_slowly(x):
    """Puts ``x`` on the queue keep_shared kept, the write still to come as it returns."""
    (queue,) = SHARED
    queue.put(PickledInAWhile(x))
    return x


def hang_at_exit():
    """An initializer whose worker, asked to stop, takes 60 s to exit: a
    finalizer multiprocessing runs as its process exits (as a queue's is)."""
    import multiprocessing.util

    multiprocessing.util.Finalize(None, time.sleep, args=(60,), exitpriority=0)


STORED_ERROR = ConnectionError("backend down")


def raise_the_stored_error(x):
    """Raises one and the same exception object every time (a failed future's, say)."""
    raise STORED_ERROR


def shared_value(_):
    """The one object keep_shared kept."""
    (value,) = SHARED
    return value


def mebibytes(n):
    """A result of ``n`` MiB."""
    return b"\x01" * (n << 20)


def nested_timeout_at(x, at=2):
    """At item ``at``, a nested map whose own item #1 times out (a
    ParmapError raised by this fn, positioned in the nested call)."""
    if x == at:
        return parmap.map(time.sleep, [0, 5], timeout=0.2)
    return x


def own_rss(_=None):
    """This process's resident memory, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def nested_submits_of_closures(n=12, mib=8):
    """``n`` submits of closures, each capturing ``mib`` MiB, to a Pool with a
    timeout made inside a worker: how much its child grew from the first to
    the last (a child that keeps each would grow by ``n * mib`` MiB)."""
    rss = []
    with parmap.Pool(workers=1, timeout=30) as pool:
        for i in range(n):
            blob = bytes(mib << 20)
            assert pool.submit(lambda b=blob, i=i: len(b) + i).result(timeout=30) == (mib << 20) + i
            rss.append(pool.submit(own_rss).result(timeout=30))
    return rss[-1] - rss[0]


def count_runs(marker_dir, x, seconds=0.01):
    """Append a line per run of ``x`` to ``x.runs``; return ``x``."""
    with open(os.path.join(marker_dir, f"{x}.runs"), "a") as runs:
        runs.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return x
