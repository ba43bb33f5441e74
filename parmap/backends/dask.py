"""``backend="dask"``: chunks as tasks on a Dask ``distributed`` cluster.

::

    submit(chunk) ── items pickled ──▶ client.submit(run_remote_chunk, fn_future,
                                          header, items, init_future, pure=False)
                                                    │   one task per chunk
    fn pickled once per call ──▶ a task returning it┘   (workers fetch it once)
                                                    ▼
    done(chunk, outcome) ◀── decode ◀── add_done_callback (Dask's callback thread)
                         ◀── ChunkLost ◀── KilledWorker / cancelled by the cluster

The cluster is the one at ``address=`` or ``$PARMAP_DASK_ADDRESS``;
otherwise parmap starts a :class:`distributed.LocalCluster` of ``workers``
single-threaded processes on the first chunk and closes it in :meth:`close`.
A :class:`parmap.Pool` keeps its client (and cluster) between calls.

Why it is built this way:

* ``fn`` goes to the cluster once per call, as the result of a tiny task
  that every chunk task depends on, so each Dask worker fetches it once and
  unpickles it once (cached by that task's key, unique across every client
  of a shared cluster). Not ``client.scatter``: scattered data dies with the
  worker holding it, and every task needing it is then cancelled ("lost
  dependencies"), whereas a task's result is recomputed from the scheduler's
  copy.
* Tasks are submitted with ``pure=False``: Dask would otherwise hand back a
  cached result for an identical call, which is wrong for a function with
  side effects.
* Items travel pickled by parmap (not by Dask), so an item that will not
  pickle is reported as :class:`~parmap.SerializationError` naming it.
* A worker that dies mid-task ends in Dask's ``KilledWorker`` and becomes a
  :class:`ChunkLost`; the scheduler turns it into
  :class:`~parmap.WorkerCrashedError` or a retry. Dask also assigns tasks
  to a worker before a thread there is free (``worker-saturation`` holds
  back only tasks without dependencies, and ours depend on ``fn``), and
  reports those the same way when the worker dies, so the loss is marked
  ``unsure``: the scheduler reruns each of its items alone before blaming
  one. A finished result that died with its worker, or a chunk whose
  function did, is ``innocent``: rerun, never blamed (and a function Dask
  gave up on is submitted afresh).
* Results are fetched on parmap's threads, never on Dask's one callback
  thread, where a fetch waiting on a dead worker held back every other
  task's report (~30 s); a fetch notices its data is gone and the chunk is
  resubmitted. A watchdog reports ended tasks whose callback is late, and
  brings a cluster of our own back to size when Dask dropped a worker for
  good (it does when one is killed again while its nanny restarts it).
  Before these, a map whose item kills its worker, repeated on one
  cluster, waited ~30 s about one time in eight and hung for good about
  one time in 25. A cluster parmap starts
  itself sets ``allowed-failures`` to 0 (Dask would otherwise rerun the task
  that killed a worker on three more workers) and ``worker-saturation`` to
  1.0 (so no task waits queued on a worker: a death then loses only the
  chunk that was running).
* ``initializer`` runs in each Dask worker process before its first chunk
  of this backend, keyed by a token, so it neither lingers on a shared
  cluster nor runs for other clients.
* A running Dask task cannot be stopped, so ``timeout`` is refused up front.

``import parmap`` never imports ``distributed``; this module imports it only
when a :class:`DaskBackend` is constructed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._serialization import dumps_function
from .._worker import ChunkOutcome
from ._base import (
    Backend,
    Call,
    Capabilities,
    Chunk,
    ChunkLost,
    Done,
    closed_error,
    decode_chunk_outcome,
    describe_exit,
    drives_workers,
    leave_to_finish,
    may_wait_for_another_backend,
    terminated_outcome,
)
from .executor import call_key, run_remote_chunk

__all__ = ["ADDRESS_ENV", "DaskBackend", "import_distributed"]

# One own cluster starts at a time. distributed imports its dashboard as a
# cluster starts, and a second thread starting one meanwhile could find it
# half-imported ("Cluster failed to start: module 'distributed.dashboard'
# has no attribute 'scheduler'", 1 of 3 pools started at once from threads,
# distributed 2026.8); and dask.config.set changes the process's config,
# which another start would restore under this one.
_CLUSTER_STARTS = threading.Lock()

#: The environment variable naming the scheduler when ``address=`` is not given.
ADDRESS_ENV = "PARMAP_DASK_ADDRESS"

INSTALL_HINT = "pip install parmap[dask]"

#: Seconds to reach a scheduler before giving up (Dask's default is 30 s,
#: long to sit through for a mistyped address).
CONNECT_TIMEOUT = 10

#: A task that has ended, but whose done-callback Dask has not run after this
#: many seconds, is reported by parmap's watchdog instead (Dask runs every
#: client's callbacks on one thread: one that blocks holds back the rest).
CALLBACK_GRACE = 1.0
#: How often the watchdog looks.
WATCH_INTERVAL = 0.25
#: Results are fetched off Dask's callback thread, checking this often that
#: the data still exists: when the worker holding it dies, Dask waits to
#: recompute the task, which took ~30 s in 3 of 19 trials of a map whose
#: item kills its worker; parmap resubmits the chunk at once instead.
FETCH_POLL = 0.5
FETCH_THREADS = 4
#: Seconds a KilledWorker from our own cluster waits for the dead worker's
#: nanny to say how its process ended (see _dask_exits): the scheduler may
#: hear of the death first. The nanny was at most a few ms behind here.
EXIT_CODE_WAIT = 0.5

#: Settings for clusters parmap starts itself; see the module docstring.
OWN_CLUSTER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
}


# -- the client side ----------------------------------------------------------------


def _pass_through(data: bytes) -> bytes:
    return data


def import_distributed() -> Any:
    """``distributed``, or an ImportError that says how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            f"backend='dask' needs Dask's 'distributed' package, which is not installed: {INSTALL_HINT}"
        ) from exc
    return distributed


_CLIENT_CLASS: Any = None


def _client_class(distributed: Any) -> Any:
    """``distributed.Client``, less its 20 s stall at exit after a failed connect.

    A client whose start fails is still collected later, and its
    ``__del__`` then waits twice the connect timeout for a close that can
    never finish. This one closes itself at once when its start fails.
    """
    global _CLIENT_CLASS
    if _CLIENT_CLASS is None:

        class Client(distributed.Client):  # type: ignore[misc,name-defined]
            def start(self, **kwargs: Any) -> Any:
                try:
                    return super().start(**kwargs)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.close(timeout=1)
                    raise

        _CLIENT_CLASS = Client
    return _CLIENT_CLASS


@dataclass(eq=False)
class _CallState:
    """One call's function (as a dask future); its tasks are the backend's ``_tasks``."""

    fn_future: Any
    released: bool = False
    generation: int = 0  # fn futures remade after Dask gave up on one


@dataclass(eq=False, slots=True)
class _Task:
    """A submitted chunk, until it is reported (by Dask's callback or the watchdog)."""

    future: Any
    chunk: Chunk
    done: Done
    state: _CallState
    ended_at: float | None = None  # when the watchdog first saw it ended
    reporting: bool = False  # its outcome is on its way to the scheduler


def _expect_a_greeting(address: str, where: str) -> None:
    """Raise ``OSError`` if a ``tcp://`` address takes a connection and says nothing.

    A scheduler speaks first (its handshake comes at once); a port that
    takes the connection and never answers (a dashboard's, a bare listener)
    kept ``Client()`` waiting for ever, past its own ``timeout``. Anything
    else (refused, unreachable, an answer) is left for Dask to judge.
    """
    parts = urllib.parse.urlsplit(address)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        return
    try:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=CONNECT_TIMEOUT)
    except OSError:
        return
    with sock:
        try:
            sock.recv(1)
        except TimeoutError:
            raise OSError(
                f"{where}: it took the connection but said nothing in {CONNECT_TIMEOUT:g} s, where a "
                "scheduler answers at once (is it a dashboard's port?)"
            ) from None
        except OSError:
            return


class DaskBackend(Backend):
    """Runs chunks as tasks on a Dask ``distributed`` cluster."""

    capabilities = Capabilities(isolated=True, can_timeout=False, remote=True)

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        address: str | None = None,
    ) -> None:
        self._distributed = import_distributed()
        from .._pool import terminate_at_exit_before_now

        terminate_at_exit_before_now(self)
        self._requested_workers = workers
        self._workers: int | None = None
        self._address_given = bool(address)
        self.address: str | None = address or os.environ.get(ADDRESS_ENV) or None
        self._init_bytes = (
            None
            if initializer is None
            else dumps_function((initializer, tuple(initargs)), what="the initializer or its initargs")
        )
        self._init_future: Any = None
        self._client: Any = None
        self._cluster: Any = None
        # _start_lock serialises connecting (slow); _lock guards the bookkeeping.
        self._start_lock = threading.Lock()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._calls: dict[int, _CallState] = {}
        self._tasks: dict[str, _Task] = {}  # unreported, by key
        self._watchdog: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self._fetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._last_regrow = 0.0
        self._closed = False
        self._killed = False

    # -- sizing ---------------------------------------------------------------
    @property  # type: ignore[override]
    def workers(self) -> int:
        """Chunks the cluster runs at once: its thread count, or ``workers`` for our own cluster."""
        if self._workers is None:
            if self.address is None:
                self._workers = self._requested_workers
            else:
                threads = sum(self._ensure_client().nthreads().values())
                # Workers may still be joining: size the window for what was asked.
                self._workers = threads or self._requested_workers
        return self._workers

    @workers.setter
    def workers(self, value: int) -> None:
        self._workers = value

    # -- the Backend interface ------------------------------------------------
    def submit(self, chunk: Chunk, done: Done) -> None:
        call = chunk.call
        fn_bytes = call.fn_bytes  # raises SerializationError here, where it belongs
        items = chunk.items_bytes()
        client = self._ensure_client()
        with self._lock:
            self._check_open()
            state = self._calls.get(call.id)
        if state is None:
            fn_future = client.submit(_pass_through, fn_bytes, key=f"parmap-function-{call_key(call)}", pure=False)
            with self._lock:
                state = self._calls.setdefault(call.id, _CallState(fn_future))
        elif state.fn_future.status == "error":
            # Dask gave up on it (its worker died while computing it): every
            # task depending on it would fail at once. Make another.
            state.generation += 1
            key = f"parmap-function-{call_key(call)}-{state.generation}"
            state.fn_future = client.submit(_pass_through, fn_bytes, key=key, pure=False)
        init = self._init_future
        # Dask hands each task the bytes in place of the futures;
        # their keys (unique across the cluster's clients) key the worker caches.
        future = client.submit(
            run_remote_chunk,
            state.fn_future.key,
            state.fn_future,
            chunk.header(),
            items,
            None if init is None else init.key,
            init,
            pure=False,
        )
        with self._lock:
            self._tasks[future.key] = _Task(future, chunk, done, state)
        future.add_done_callback(self._report)

    def release(self, call: Call) -> None:
        with self._lock:
            state = self._calls.pop(call.id, None)
            if state is None:
                return
            state.released = True
            pending = [task.future for task in self._tasks.values() if task.state is state]
        # Queued tasks are dropped; a running one finishes on its worker unseen.
        self._cancel(pending)

    def close(self, kill: bool = False) -> None:
        if not may_wait_for_another_backend():
            # An event loop thread of the client or the cluster (the cycle
            # collector ended an imap there): the close waits for those loops,
            # so it runs elsewhere.
            closer = threading.Thread(target=self.close, args=(kill,), name="parmap-dask-close", daemon=True)
            closer.start()
            leave_to_finish(closer)
            return
        with self._lock:
            if self._client is None and self._cluster is None:
                self._closed = True
                self._killed = self._killed or kill
                return
            self._closed = True
            self._killed = self._killed or kill
            if self._killed:
                self._idle.notify_all()  # a polite close waiting below stops waiting
            # Let the running chunks finish and be reported first.
            while self._tasks and not self._killed:
                self._idle.wait()
            if self._client is None:
                return  # a close(kill=True) came meanwhile and closed it all
            pending = [task.future for task in self._tasks.values()]
            # Killed: what was running or queued ends now, reported as such
            # (a map waiting in another thread must hear of it).
            ended = []
            if self._killed:
                for key, task in list(self._tasks.items()):
                    if not task.reporting and not task.state.released:
                        task.reporting = True
                        ended.append((task.chunk, task.done))
                        del self._tasks[key]  # reported here: nobody else will
            self._calls.clear()
            client, cluster = self._client, self._cluster
            self._client = self._cluster = self._init_future = None
        self._stop_watching.set()
        try:
            self._cancel(pending)
            for chunk, done in ended:
                done(chunk, terminated_outcome())
        finally:  # the cluster goes, whatever a report raised
            _close_started(client, cluster, self._fetcher, kill=self._killed)

    # -- internals --------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise closed_error(self._killed)

    def _ensure_client(self) -> Any:
        with self._start_lock:
            with self._lock:
                self._check_open()
                if self._client is not None:
                    return self._client
            distributed = self._distributed
            cluster = None
            if self.address is None:
                import dask

                from . import _dask_exits

                _hush_distributed(True)
                try:
                    with _CLUSTER_STARTS, dask.config.set(OWN_CLUSTER_CONFIG):
                        cluster = distributed.LocalCluster(
                            n_workers=self._requested_workers,
                            threads_per_worker=1,
                            processes=True,
                            worker_class=_dask_exits.Nanny,
                            dashboard_address=":0",
                            # Its warnings and errors (a task cancelled, a worker
                            # lost, "marked as failed because 1 workers died") are
                            # about events parmap handles and reports itself; on
                            # Ctrl-C or a crash they were a screenful of noise.
                            silence_logs=logging.CRITICAL,
                        )
                except BaseException:
                    _hush_distributed(False)
                    raise
            client = None
            try:
                if cluster is not None:
                    _dask_exits.watch_registrations(cluster)
                address = str(self.address) if cluster is None else cluster.scheduler_address
                client = self._connect(distributed, address)
                init = None
                if self._init_bytes is not None:
                    key = f"parmap-initializer-{uuid.uuid4().hex}"
                    init = client.submit(_pass_through, self._init_bytes, key=key, pure=False)
                # What runs on the event loop threads of the client and of the
                # cluster (they may be two) must never wait for those loops:
                # the cycle collector may end an imap there.
                for loop in {id(x.loop): x.loop for x in (client, cluster) if x is not None}.values():
                    loop.add_callback(drives_workers)
                with self._lock:
                    # A terminate() meanwhile found nothing to close: what
                    # started is closed here, or it ran on after the pool.
                    self._check_open()
                    self._client, self._cluster, self._init_future = client, cluster, init
            except BaseException:
                _close_started(client, cluster, None, kill=True)
                raise
            self._fetcher = concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="parmap-dask-fetch")
            self._watchdog = threading.Thread(target=self._watch, name="parmap-dask-watchdog", daemon=True)
            self._watchdog.start()
            return client

    def _connect(self, distributed: Any, address: str) -> Any:
        """A client of the scheduler at ``address``, or an ``OSError`` naming it."""
        source = "address=" if self._address_given else f"${ADDRESS_ENV}"
        where = f"backend='dask' could not reach the scheduler at {address} (from {source})"
        _expect_a_greeting(address, where)
        try:
            return _client_class(distributed)(address, set_as_default=False, timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            exc.add_note(f"parmap: {where}")
            raise
        except Exception as exc:
            # Whatever a non-scheduler answered made Dask fail some other way
            # (a MemoryError reading an HTTP reply as a message length, say).
            raise OSError(f"{where}: {type(exc).__name__}: {exc}") from exc

    def _cancel(self, futures: list[Any]) -> None:
        client = futures[0].client if futures else None
        if client is None:
            return
        try:
            client.cancel(futures)
        except Exception:  # noqa: S110 - the cluster is gone: nothing left to cancel
            pass

    def _report(self, future: Any) -> None:
        """Start handing an ended task's outcome to the scheduler, once: from
        Dask's callback thread or, when that is late, from the watchdog."""
        with self._lock:
            task = self._tasks.get(future.key)
            if task is None or task.reporting:
                return
            task.reporting = True
            fetcher = self._fetcher
        # Fetching a result waits on the cluster; so does a lost worker's exit code.
        if future.status in ("finished", "error") and fetcher is not None:
            try:
                fetcher.submit(self._deliver, task)
                return
            except RuntimeError:
                pass  # shut down by close(): deliver here
        self._deliver(task)

    def _deliver(self, task: _Task) -> None:
        try:
            with self._lock:
                released, killed = task.state.released, self._killed
            if killed and not released:
                task.done(task.chunk, terminated_outcome())
            elif not released:
                task.done(task.chunk, self._outcome(task.chunk, task.future))
        finally:
            with self._lock:
                self._tasks.pop(task.future.key, None)
                self._idle.notify_all()

    def _watch(self) -> None:
        """Report tasks that have ended but whose callback has not run, and
        keep a cluster of our own at the size asked for."""
        while not self._stop_watching.wait(WATCH_INTERVAL):
            now = time.monotonic()
            late = []
            with self._lock:
                for task in self._tasks.values():
                    if task.reporting:
                        continue
                    if task.future.status == "pending":
                        task.ended_at = None  # rescheduled by Dask since
                    elif task.ended_at is None:
                        task.ended_at = now
                    elif now - task.ended_at >= CALLBACK_GRACE:
                        late.append(task.future)
                busy, cluster = bool(self._tasks), self._cluster
            for future in late:
                self._report(future)
            if busy and cluster is not None:
                self._regrow(cluster, now)

    def _regrow(self, cluster: Any, now: float) -> None:
        """Bring back workers our own cluster dropped.

        A ``LocalCluster`` forgets a worker that has not come back
        ``lost-worker-timeout`` (15 s) after its removal, and never starts
        another: a worker killed again while its nanny restarts it can leave
        the cluster with none, and the call waiting forever. ``scale`` to the
        same size makes it start workers for the names it lacks.
        """
        if len(cluster.workers) >= self._requested_workers or now - self._last_regrow < 1.0:
            return
        self._last_regrow = now
        try:
            cluster.scale(self._requested_workers)
        except Exception:  # noqa: S110 - closing under us: nothing to keep alive
            pass

    def _outcome(self, chunk: Chunk, future: Any) -> ChunkOutcome | ChunkLost:
        status = future.status
        if status == "finished":
            while True:
                try:
                    data = future.result(timeout=FETCH_POLL)
                    break
                except TimeoutError:
                    if future.status == "finished":
                        continue  # still on its way
                    # Its data died with its worker; Dask would recompute it, in its own time.
                    self._cancel([future])
                    return ChunkLost(None, detail="its result was lost with its dask worker", innocent=True)
                except self._distributed.KilledWorker as exc:  # it was recomputed since, and lost
                    return self._killed_worker(future, exc)
                except Exception as exc:
                    return ChunkLost(None, detail=f"its result could not be fetched from the dask cluster: {exc}")
            return decode_chunk_outcome(chunk, data)
        if status == "error":
            error = future.exception()
            if isinstance(error, self._distributed.KilledWorker):
                return self._killed_worker(future, error)
            # run_remote_chunk never raises: the task could not even start there.
            if isinstance(error, ImportError):
                error.add_note("parmap: parmap (and what fn imports) must be installed on every dask worker")
            return ChunkOutcome.failed(error)
        if status == "lost":
            # It had finished, but its result died with its worker (result()
            # would wait for Dask to recompute it).
            self._cancel([future])
            return ChunkLost(None, detail="its result was lost with its dask worker", innocent=True)
        try:
            future.result(timeout=FETCH_POLL)
            reason = f"its dask future ended as {status!r}"
        except BaseException as exc:  # a CancelledError carries the cluster's reason
            reason = str(exc) or type(exc).__name__
        return ChunkLost(None, detail=f"the dask cluster dropped it: {reason}")

    def _killed_worker(self, future: Any, error: Any) -> ChunkLost:
        worker = getattr(error.last_worker, "address", error.last_worker)
        if error.task != future.key:
            # What it waited for (its function) was on the worker that died.
            return ChunkLost(None, detail=f"the dask worker {worker} died holding its function", innocent=True)
        with self._lock:
            own = self._cluster is not None
        exitcode = None
        if own and isinstance(worker, str):
            from . import _dask_exits  # imported with the cluster it watches

            exitcode = _dask_exits.worker_exit_code(worker, EXIT_CODE_WAIT)
        if exitcode is None:
            return ChunkLost(None, detail=f"the dask worker {worker} died (KilledWorker)", unsure=True)
        return ChunkLost(exitcode, detail=f"{describe_exit(exitcode)} (the dask worker {worker})", unsure=True)


#: Seconds a nanny gives its worker to stop on ``close(kill=True)`` before
#: killing it; Dask's own default (5 s) would break the Ctrl-C promise (2 s).
KILL_GRACE = 0.5

# How many clusters of ours live, and the console handlers' levels from
# before the first (see _hush_distributed).
_hush_lock = threading.Lock()
_hushed_clusters = 0
_hushed_levels: list[tuple[logging.Handler, int]] = []


def _hush_distributed(on: bool) -> None:
    """Hold distributed's console logging at CRITICAL while any cluster of ours lives.

    Each LocalCluster's ``silence_logs`` sets the handlers' level as it
    starts and sets back what it found as it closes: with two alive, the
    first to close put the level back under the other, whose INFO lines
    ("Register worker", "Closing scheduler") then reached the console.
    """
    global _hushed_clusters
    with _hush_lock:
        _hushed_clusters += 1 if on else -1
        if on and _hushed_clusters == 1:
            for root in ("distributed", "bokeh"):
                for handler in logging.getLogger(root).handlers:
                    if isinstance(handler, logging.StreamHandler) and handler.level != logging.CRITICAL:
                        _hushed_levels.append((handler, handler.level))
                        handler.setLevel(logging.CRITICAL)
        elif not on and _hushed_clusters == 0:
            for handler, level in _hushed_levels:
                handler.setLevel(level)
            _hushed_levels.clear()


def _close_started(client: Any, cluster: Any, fetcher: Any, *, kill: bool) -> None:
    """Close what a start made (any may be None): the fetching threads, the
    client, then a cluster of our own, whatever the others raised."""
    try:
        if fetcher is not None:
            fetcher.shutdown(wait=False)
        if client is not None:
            client.close()
    finally:
        if cluster is not None:
            try:
                _close_cluster(cluster, kill=kill)
            finally:
                _hush_distributed(False)


def _close_cluster(cluster: Any, *, kill: bool) -> None:
    """Close a LocalCluster we started; with ``kill`` do not wait for running tasks."""
    if kill:

        async def stop_nannies() -> None:
            nannies = list(cluster.workers.values())
            await asyncio.gather(*(n.close(timeout=KILL_GRACE) for n in nannies), return_exceptions=True)

        try:
            cluster.sync(stop_nannies)
        except Exception:  # noqa: S110 - cluster.close below still stops them, only slower
            pass
    cluster.close()
