"""Ctrl-C and a killed parent: workers stop, nothing is left behind.

Each test runs a real script in its own session (so a signal to its process
group is exactly what a terminal's Ctrl-C sends) and watches its process tree
with psutil."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import workfns
from conftest import DASK_AVAILABLE, PROCESS_BACKENDS

import parmap
from parmap.backends._base import join_thread

TESTS_DIR = os.path.dirname(__file__)

SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import parmap

    def slow(x):
        open(os.path.join({running!r}, "%d-%d" % (os.getpid(), threading.get_ident())), "w").close()
        time.sleep({seconds!r})
        return x

    if __name__ == "__main__":
        print("started", flush=True)
        parmap.map(slow, range({items!r}), workers=2, backend={backend!r}, chunksize=1, **{options!r})
    """
)


def _running_dir(tmp_path):
    """Where each worker (process or thread) of a script marks that it runs an item."""
    running = tmp_path / "running"
    running.mkdir(exist_ok=True)
    return str(running)


def _script(tmp_path, backend, *, seconds=0.2, items=1000, **options):
    """A program mapping ``items`` items that take ``seconds`` each."""
    script = tmp_path / "long_map.py"
    root = os.path.dirname(TESTS_DIR)
    running = _running_dir(tmp_path)
    text = SCRIPT.format(
        root=root, tests=TESTS_DIR, running=running, backend=backend, seconds=seconds, items=items, options=options
    )
    script.write_text(text)
    return script


def _launch(script):
    """Run ``script`` in a session of its own; return once it has printed "started"."""
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    return proc


def _wait_until_running(proc, tmp_path, workers):
    """Wait until ``workers`` workers of the program run an item, so a signal lands mid-run
    (a worker that merely exists may still be starting up). No deadline: the test's timeout."""
    running = _running_dir(tmp_path)
    while len(os.listdir(running)) < workers:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)


def _start(tmp_path, backend, script=None, running=2):
    proc = _launch(script or _script(tmp_path, backend))
    _wait_until_running(proc, tmp_path, running)
    return proc, psutil.Process(proc.pid).children(recursive=True)


def _alive(process):
    """Whether ``process`` still runs: a zombie has exited (when an orphan is
    reaped is up to the machine's init, which here takes a second or two)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(processes, within):
    deadline = time.monotonic() + within
    alive = [p for p in processes if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _alive(p)]
    for proc in alive:
        proc.kill()
    return [p.pid for p in alive]


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_ctrl_c_stops_everything(tmp_path, backend):
    proc, workers = _start(tmp_path, backend)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    try:
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in stderr
    assert proc.returncode != 0
    assert _gone(workers, within=3) == []


STARTUP_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import parmap

    def ctrl_c_once():
        try:
            os.close(os.open({flag!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.killpg(os.getpgrp(), signal.SIGINT)  # the terminal's Ctrl-C, to the whole group

    # A worker starting up, before parmap's set-up of it: one forked from here
    # (os.fork runs this hook in the child), or one re-importing this script
    # (spawn, or the forkserver that forks the workers).
    if __name__ == "__mp_main__":
        ctrl_c_once()
    else:
        os.register_at_fork(after_in_child=ctrl_c_once)

    def slow(x):
        time.sleep(0.05)
        return x

    if __name__ == "__main__":
        try:
            parmap.map(slow, range(40), workers=2, backend={backend!r}, chunksize=1, **{options!r})
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            print("finished", flush=True)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("backend", "options"),
    [
        *((b, {}) for b in PROCESS_BACKENDS),
        ("process", {"start_method": "spawn"}),
        ("pool", {"start_method": "spawn"}),
    ],
)
def test_ctrl_c_while_workers_start_reaches_the_caller_alone(tmp_path, backend, options):
    """A starting worker holds the Ctrl-C back until it can ignore it: before,
    each printed a KeyboardInterrupt traceback (under spawn a page of "Fatal
    Python error"), over the caller's own handling of it."""
    script = tmp_path / "ctrl_c_at_start.py"
    root = os.path.dirname(TESTS_DIR)
    flag = str(tmp_path / "sent")
    script.write_text(STARTUP_SCRIPT.format(root=root, tests=TESTS_DIR, flag=flag, backend=backend, options=options))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=40, start_new_session=True
    )
    assert os.path.exists(flag)  # a worker did start, and sent the Ctrl-C
    assert result.stdout == "interrupted\n"
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_the_programs_own_forkserver_children_take_signals():
    # The forkserver, started while a worker start held Ctrl-C back, kept that
    # mask, and so did every process the program itself started through it:
    # Process.terminate() did nothing to them.
    assert parmap.map(workfns.square, range(2), workers=1, start_method="forkserver") == [0, 1]
    ctx = multiprocessing.get_context("forkserver")
    queue = ctx.SimpleQueue()
    process = ctx.Process(target=workfns.report_blocked_signals, args=(queue,))
    process.start()
    try:
        assert int(queue.get(), 16) & ((1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))) == 0
    finally:
        process.join(10)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_workers_die_of_sigterm_whatever_handler_the_caller_has(backend):
    # A forked worker kept the caller's handler (a server's, say): one that
    # did not end the worker hung multiprocessing.Pool's clean-up, which
    # stops workers with SIGTERM.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        assert parmap.map(workfns.sigterm_is_default, range(4), workers=2, backend=backend, chunksize=1) == [True] * 4
    finally:
        signal.signal(signal.SIGTERM, previous)


BIG_RESULTS_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading
    sys.path[:0] = [{root!r}, {tests!r}]
    import parmap

    def big(x):
        return bytes(200_000)

    if __name__ == "__main__":
        threading.Timer({delay!r}, os.killpg, (os.getpgrp(), signal.SIGINT)).start()
        parmap.map(big, range(4000), workers=2, backend="pool")
        print("finished before the Ctrl-C", flush=True)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", [0.05, 0.15, 0.25])
def test_ctrl_c_while_big_results_stream_back_ends_the_call(tmp_path, delay):
    # A worker killed while sending left a message cut short in the result
    # pipe; draining it waited for its end for ever (1 Ctrl-C in 6 hung).
    script = tmp_path / "big_results.py"
    script.write_text(BIG_RESULTS_SCRIPT.format(root=os.path.dirname(TESTS_DIR), tests=TESTS_DIR, delay=delay))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "finished" not in stdout  # the signal came mid-call
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr


LEAVING_WITH_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import parmap

    def slow(x):
        open(os.path.join({running!r}, str(os.getpid())), "w").close()
        time.sleep(30)
        return x

    if __name__ == "__main__":
        try:
            with parmap.Pool(workers=2, backend={backend!r}) as pool:
                futures = [pool.submit(slow, i) for i in range(2)]
                print("started", flush=True)
        except KeyboardInterrupt:  # the program goes on, and so did the workers
            print("caught", flush=True)
            time.sleep(30)
    """
)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_ctrl_c_while_leaving_a_with_block_stops_the_workers(tmp_path, backend):
    # Leaving the block waits for the submitted calls; Ctrl-C then ended
    # the wait but stopped nothing, and the workers ran on for good.
    script = tmp_path / "leaving_with.py"
    script.write_text(
        LEAVING_WITH_SCRIPT.format(
            root=os.path.dirname(TESTS_DIR), tests=TESTS_DIR, running=_running_dir(tmp_path), backend=backend
        )
    )
    proc, workers = _start(tmp_path, backend, script)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.stdout.readline().strip() == "caught"
        assert _gone(workers, within=3) == []
    finally:
        proc.kill()
        proc.communicate()


COMMAND_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import parmap

    def run_a_command(x):
        return subprocess.run(["sleep", "30"]).returncode

    if __name__ == "__main__":
        print("started", flush=True)
        parmap.map(run_a_command, range(4), workers=2, backend={backend!r}, chunksize=1)
    """
)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_ctrl_c_stops_the_commands_workers_run(tmp_path, backend):
    # Workers ignored SIGINT, and an ignored signal stays ignored across
    # exec: the `sleep` a worker ran outlived the Ctrl-C, as an orphan.
    script = tmp_path / "commands.py"
    script.write_text(COMMAND_SCRIPT.format(root=os.path.dirname(TESTS_DIR), tests=TESTS_DIR, backend=backend))
    proc = _launch(script)
    descendants = []
    while sum(_is_sleep(p) for p in descendants) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)  # both commands exec'd: a signal between fork and exec would be lost
        descendants = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=10)  # not communicate(): a surviving command would hold the pipes
    finally:
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert _gone(descendants, within=3) == []


def _running(pid):
    """Whether pid is a live process (a zombie or a process gone mid-look is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_sleep(process):
    try:
        return process.name() == "sleep"
    except psutil.Error:
        return False


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", ["process", "pool"])
def test_killed_parent_leaves_no_forkserver_workers(tmp_path, backend):
    # A forkserver's workers are its children, not the caller's, and each
    # held the pipe that keeps it alive: killing the caller left them all.
    script = _script(tmp_path, backend, seconds=30, items=4, start_method="forkserver")
    proc, descendants = _start(tmp_path, backend, script)
    assert len(descendants) >= 4  # the resource tracker, the forkserver, two workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    assert _gone(descendants, within=5) == []


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_killed_parent_leaves_no_workers(tmp_path, backend):
    proc, workers = _start(tmp_path, backend)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    assert _gone(workers, within=5) == []


@pytest.mark.timeout(40)
@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_ctrl_c_ends_a_program_whose_items_run_in_process(tmp_path, backend):
    # Threads cannot be stopped; the program must still end, not wait for them.
    script = _script(tmp_path, backend, seconds=60, items=4)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout.readline().strip() == "started"
        _wait_until_running(proc, tmp_path, 2 if backend == "thread" else 1)  # into the items
        os.killpg(proc.pid, signal.SIGINT)
        began = time.monotonic()
        _, stderr = proc.communicate(timeout=20)
        assert time.monotonic() - began < 2
    finally:
        proc.kill()
        proc.communicate()
    assert "KeyboardInterrupt" in stderr
    assert proc.returncode != 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", [*PROCESS_BACKENDS, "thread"])
def test_a_pool_never_closed_lets_the_program_exit_cleanly(tmp_path, backend):
    script = tmp_path / "forgot_close.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path[:0] = [{os.path.dirname(TESTS_DIR)!r}, {TESTS_DIR!r}]
            import os, parmap, workfns
            pool = parmap.Pool(workers=2, backend={backend!r})
            print(sorted(set(pool.map(workfns.getpid, range(10), chunksize=1)) - {{os.getpid()}}), flush=True)
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, "")
    workers = [int(pid) for pid in result.stdout.strip().strip("[]").split(",") if pid.strip()]
    assert not [pid for pid in workers if _running(pid)]


@pytest.mark.timeout(60)
def test_a_call_from_the_final_clean_up_says_it_cannot_start():
    # A __del__ that the interpreter's last collection runs: Thread.start()
    # never returns then, and the call hung for ever.
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = [{os.path.dirname(TESTS_DIR)!r}, {TESTS_DIR!r}]
        import parmap, workfns

        class Cleanup:
            def __del__(self):
                for backend in {[*PROCESS_BACKENDS, "thread", "serial"]!r}:
                    try:
                        result = parmap.map(workfns.square, range(4), workers=2, backend=backend)
                    except parmap.ParmapError as exc:
                        result = str(exc)
                    os.write(1, f"{{backend}}: {{result}}\\n".encode())

        cleanup = Cleanup()
        cleanup.cycle = cleanup  # left to the collection at exit
        del cleanup
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    lines = result.stdout.splitlines()
    assert lines[-1] == "serial: [0, 1, 4, 9]", result.stdout
    for backend, line in zip([*PROCESS_BACKENDS, "thread"], lines[:-1], strict=True):
        assert line.startswith(f"{backend}: backend={backend!r} cannot start while the interpreter shuts down")


GC_ABANDONED_IMAP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{root!r}]
    import parmap

    class Holder:
        pass

    for _ in range(40):
        holder = Holder()
        holder.me = holder  # a cycle: only the cycle collector frees it, on whatever thread it runs
        holder.results = parmap.imap(abs, iter(range(10**6)), workers=2, backend={backend!r}, chunksize=50)
        next(holder.results)
        del holder
        assert parmap.map(abs, range(3000), workers=2, backend={backend!r}) == list(range(3000))
    print("done", flush=True)
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["process", "fork"])
def test_an_abandoned_imap_freed_by_the_cycle_collector_never_deadlocks(tmp_path, backend):
    # The collector ran on another pool's dispatcher thread while it held the
    # lock around forking a worker; the freed imap's close waited for its own
    # dispatcher, which needed that lock (a hang in most runs of this script).
    script = tmp_path / "abandoned.py"
    script.write_text(GC_ABANDONED_IMAP_SCRIPT.format(root=os.path.dirname(TESTS_DIR), backend=backend))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "done\n"), result.stderr[-2000:]


GC_ON_THE_POOLS_OWN_THREADS_SCRIPT = textwrap.dedent(
    """
    import gc, os, sys, threading, time
    sys.path[:0] = [{root!r}]
    import parmap

    freed = []
    crashing = {crashing!r}

    class Holder:
        def __del__(self):
            freed.append(threading.current_thread().name)

    def slow_abs(x):
        if crashing and x % 3 == 2:
            os._exit(1)  # the pool is replaced: terminate() runs on a thread of its own
        time.sleep(0.02)
        return abs(x)

    def parmap_threads():
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("parmap"))

    if __name__ == "__main__":
        for i in range(3):
            gc.disable()
            holder = Holder()
            holder.me = holder
            holder.results = parmap.imap(
                slow_abs, range(10**4), workers=2, backend={backend!r}, chunksize=1, on_error="skip"
            )
            next(holder.results)
            del holder
            gc.set_threshold(1)
            gc.enable()
            deadline = time.monotonic() + 10
            while len(freed) <= i and time.monotonic() < deadline:
                time.sleep(0.01)  # allocates nothing: the collection runs on a thread of the imap's pool
            gc.disable()
            while parmap_threads() and time.monotonic() < deadline:
                time.sleep(0.01)  # the freed imap's pool closes before the next one starts
        deadline = time.monotonic() + 10
        while parmap_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(len(freed), parmap_threads(), flush=True)
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("backend", "crashing"),
    [
        ("pool", False),
        ("apply_async", False),
        ("pool", True),
        ("apply_async", True),
        pytest.param("dask", False, marks=pytest.mark.skipif(not DASK_AVAILABLE, reason="needs parmap[dask]")),
    ],
)
def test_an_abandoned_imap_freed_on_its_own_pools_thread_ends_its_pool(tmp_path, backend, crashing):
    # There the imap's end waited for a close that waited for that very
    # thread (multiprocessing.Pool's result thread, Dask's event loop, the
    # thread that terminates a pool as it starts): for ever, or 11 s
    # (apply_async); and while it waited no collection could run anywhere.
    script = tmp_path / "own_thread.py"
    script.write_text(
        GC_ON_THE_POOLS_OWN_THREADS_SCRIPT.format(root=os.path.dirname(TESTS_DIR), backend=backend, crashing=crashing)
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "3 []\n"), result.stderr[-2000:]


def test_asking_whether_a_thread_may_wait_races_no_thread_starting_a_pool():
    # The question walked a set of threads that a pool starting elsewhere
    # could grow meanwhile ("Set changed size during iteration" out of a
    # close, which then neither waited for its workers nor left them to exit).
    from parmap.backends._base import drives_workers, may_wait_for_another_backend

    errors = []
    stop = threading.Event()

    def mark():
        while not stop.is_set():
            drives_workers(threading.Thread(target=print))  # never started, dropped at once

    marker = threading.Thread(target=mark)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    marker.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                assert may_wait_for_another_backend()
            except RuntimeError as exc:
                errors.append(exc)
    finally:
        stop.set()
        marker.join()
        sys.setswitchinterval(interval)
    assert errors == []


ASYNCIO_CTRL_C_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    sys.path[:0] = [{root!r}]
    import parmap

    async def main():
        loop = asyncio.get_running_loop()
        heard = []
        loop.add_signal_handler(signal.SIGINT, heard.append, "ctrl-c")
        with parmap.Pool(workers=2, backend={backend!r}) as pool:
            assert pool.map(abs, range(-4, 0), chunksize=1) == [4, 3, 2, 1]  # the workers are up
            os.killpg(0, signal.SIGINT)  # one Ctrl-C, to the whole group, as a terminal sends it
            await asyncio.sleep(0.2)  # a worker's Ctrl-C reaches the loop within milliseconds
        print(len(heard), flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_one_ctrl_c_reaches_an_asyncio_signal_handler_once(tmp_path, backend):
    # A forked worker shared the caller's signal wake-up descriptor, which
    # asyncio's add_signal_handler sets: each worker's Ctrl-C was heard by
    # the caller's loop as one more (3 for 2 workers), and a program that
    # takes a second Ctrl-C as "quit now" quit on the first.
    script = tmp_path / "asyncio_ctrl_c.py"
    script.write_text(ASYNCIO_CTRL_C_SCRIPT.format(root=os.path.dirname(TESTS_DIR), backend=backend))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, start_new_session=True
    )
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr[-2000:]


def test_the_collector_never_runs_while_the_driver_threads_are_swapped():
    # It ran while the swap's lock was held (the new tuple was built under
    # it), and a finalizer it ran closed a pool whose monitor was marking
    # a thread of its own, waiting for that lock: a deadlock, and every
    # later close of a pool backend's pool waited on it too.
    import gc

    from parmap.backends import _base

    held = []

    def look(phase, info):
        if phase == "start":
            held.append(_base._drivers_swap.locked())

    threshold = gc.get_threshold()
    gc.callbacks.append(look)
    gc.set_threshold(1)
    try:
        for _ in range(2000):
            _base.drives_workers(threading.Thread(target=print))
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(look)
    assert held and not any(held)


@pytest.mark.parametrize("backend", PROCESS_BACKENDS)
def test_an_imap_ended_after_its_pool_closed_writes_into_no_one_elses_descriptor(backend):
    # The backend's wake-up pipe was closed with its thread, and the imap's
    # end then woke it by number: the numbers were the next pipe's, whose
    # reader got a stray byte (another pool's worker connection: a stray
    # byte read as a message length, a MemoryError or a map for ever).
    pool = parmap.Pool(2, backend=backend)
    results = pool.imap(workfns.square, range(1000), chunksize=1)
    assert next(results) == 0
    pool.close()
    time.sleep(0.5)  # the backend's thread ends and closes its pipe
    pipes = [os.pipe() for _ in range(4)]  # the process's next descriptors
    try:
        results.close()
        for r, _ in pipes:
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 100)
    finally:
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)


#: For the scripts below: one Ctrl-C while the main thread leaves ``pool``'s with block.
CTRL_C_IN_THE_CLOSE = textwrap.dedent(
    """
    import os, signal, sys, threading, time, traceback

    def ctrl_c_in_the_close(pool):
        # Not before: a Ctrl-C in the block would end the block, not its close.
        leaving = type(pool).__exit__.__code__
        main = threading.main_thread().ident
        while not any(frame.f_code is leaving for frame, _ in traceback.walk_stack(sys._current_frames()[main])):
            time.sleep(0.01)
        time.sleep(0.2)  # on into the close's wait, which it reaches within a millisecond
        os.kill(os.getpid(), signal.SIGINT)
    """
)


CTRL_C_IN_CLOSE_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    sys.path[:0] = [{root!r}]
    import parmap, psutil
    {ctrl_c_in_the_close}

    def worker(p):
        try:  # a worker may exit between the listing and the look
            return p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            return False

    def workers():
        return [p for p in psutil.Process().children(recursive=True) if worker(p)]

    def nap(seconds):
        open({running!r}, "w").close()
        time.sleep(seconds)

    if __name__ == "__main__":
        pool = parmap.Pool(workers=1, backend={backend!r})
        assert pool.map(abs, [-1]) == [1]
        try:
            with pool:  # leaving the block waits for the running sleep
                results = pool.imap(nap, [0.3] * 20, chunksize=20)  # one chunk of 6 s
                threading.Thread(target=lambda: list(results), daemon=True).start()
                while not os.path.exists({running!r}):
                    time.sleep(0.01)  # the chunk runs
                threading.Thread(target=ctrl_c_in_the_close, args=(pool,), daemon=True).start()
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
        _, alive = psutil.wait_procs(workers(), timeout=2)
        print(len(alive), flush=True)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "backend",
    [
        *PROCESS_BACKENDS,
        pytest.param("dask", marks=pytest.mark.skipif(not DASK_AVAILABLE, reason="needs parmap[dask]")),
    ],
)
def test_ctrl_c_while_close_waits_for_running_work_stops_the_workers(tmp_path, backend):
    # The with block's close waits for an imap's running chunk (a close()
    # would leave the workers to that imap). The Ctrl-C left the backend's
    # polite close half done: the workers ran their chunks to the end (6 s
    # here), or on after the program (dask).
    script = tmp_path / "ctrl_c_in_close.py"
    script.write_text(
        CTRL_C_IN_CLOSE_SCRIPT.format(
            root=os.path.dirname(TESTS_DIR),
            ctrl_c_in_the_close=CTRL_C_IN_THE_CLOSE,
            running=str(tmp_path / "running"),
            backend=backend,
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=40)
    assert (result.returncode, result.stdout) == (0, "KeyboardInterrupt\n0\n"), result.stderr[-2000:]


THREAD_CTRL_C_IN_CLOSE_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    sys.path[:0] = [{root!r}]
    import parmap
    {ctrl_c_in_the_close}
    running = threading.Event()
    finished = []

    def nap(seconds):
        running.set()
        time.sleep(seconds)
        finished.append(time.monotonic())

    def consume(results):
        try:
            list(results)
        except parmap.PoolClosedError:
            pass

    if __name__ == "__main__":
        pool = parmap.Pool(workers=1, backend="thread")
        assert pool.map(abs, [-1]) == [1]
        try:
            with pool:  # leaving the block waits for the running chunk
                results = pool.imap(nap, [0.3] * 20, chunksize=20)  # one chunk of 6 s
                consumer = threading.Thread(target=consume, args=(results,))
                consumer.start()
                running.wait()  # the chunk runs
                threading.Thread(target=ctrl_c_in_the_close, args=(pool,), daemon=True).start()
        except KeyboardInterrupt:
            interrupted = time.monotonic()
            print("KeyboardInterrupt", flush=True)
        consumer.join(5)
        time.sleep(0.8)  # time for two more items, had the chunk gone on: the second ends late
        late = [t for t in finished if t > interrupted + 0.35]  # the item running at the Ctrl-C may end
        print(len(late), [t.name for t in threading.enumerate() if t.name.startswith("parmap-thread")], flush=True)
    """
)


@pytest.mark.timeout(60)
def test_ctrl_c_while_close_waits_for_running_work_stops_the_thread_backends_chunk(tmp_path):
    # The thread backend's kill after a polite close that a Ctrl-C cut short
    # returned at once: the chunk ran its 20 items to the end.
    script = tmp_path / "thread_ctrl_c_in_close.py"
    script.write_text(
        THREAD_CTRL_C_IN_CLOSE_SCRIPT.format(root=os.path.dirname(TESTS_DIR), ctrl_c_in_the_close=CTRL_C_IN_THE_CLOSE)
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=40)
    assert (result.returncode, result.stdout) == (0, "KeyboardInterrupt\n0 []\n"), result.stderr[-2000:]


def test_a_join_that_ctrl_c_cut_short_still_waits_for_the_thread():
    # CPython 3.11 marks a thread as ended when Ctrl-C interrupts a join() of
    # it, and every later join() returns at once: the terminate() that
    # Ctrl-C makes of a with block's close went on before the workers were
    # stopped, and they outlived the "caught" of the program that caught it.
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()

    def ctrl_c(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, ctrl_c)
    try:
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(KeyboardInterrupt):
            join_thread(thread)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    began = time.monotonic()
    join_thread(thread, timeout=0.3)
    assert time.monotonic() - began >= 0.25  # it waited: the thread runs on
    release.set()
    join_thread(thread)
    assert thread not in threading.enumerate()
