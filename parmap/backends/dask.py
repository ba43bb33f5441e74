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
  ``unsure``: each item gets one free rerun before it is blamed. A cluster parmap starts
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
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .._errors import PoolClosedError, SerializationError
from .._serialization import ErrorInfo
from .._worker import ChunkOutcome, decode_outcome
from ._base import Backend, Call, Capabilities, Chunk, ChunkLost, Done
from ._local import pickle_initializer
from .executor import call_key, run_remote_chunk

__all__ = ["ADDRESS_ENV", "DaskBackend", "import_distributed"]

#: The environment variable naming the scheduler when ``address=`` is not given.
ADDRESS_ENV = "PARMAP_DASK_ADDRESS"

INSTALL_HINT = "pip install parmap[dask]"

#: Seconds to reach a scheduler before giving up (Dask's default is 30 s,
#: long to sit through for a mistyped address).
CONNECT_TIMEOUT = 10

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


@dataclass(eq=False)
class _CallState:
    """One call's function (as a dask future) and its unfinished tasks."""

    fn_future: Any
    pending: dict[str, Any] = field(default_factory=dict)
    released: bool = False


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
        self._requested_workers = workers
        self._workers: int | None = None
        self._address_given = bool(address)
        self.address: str | None = address or os.environ.get(ADDRESS_ENV) or None
        self._init_bytes = pickle_initializer(initializer, initargs)
        self._init_future: Any = None
        self._client: Any = None
        self._cluster: Any = None
        # _start_lock serialises connecting (slow); _lock guards the bookkeeping.
        self._start_lock = threading.Lock()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._calls: dict[int, _CallState] = {}
        self._in_flight = 0
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
            state.pending[future.key] = future
            self._in_flight += 1
        future.add_done_callback(partial(self._report, chunk, done, state))

    def release(self, call: Call) -> None:
        with self._lock:
            state = self._calls.pop(call.id, None)
            if state is None:
                return
            state.released = True
            pending = list(state.pending.values())
        # Queued tasks are dropped; a running one finishes on its worker unseen.
        self._cancel(pending)

    def close(self, kill: bool = False) -> None:
        with self._lock:
            if self._client is None and self._cluster is None:
                self._closed = True
                return
            self._closed = True
            self._killed = self._killed or kill
            if not self._killed:
                # Let the running chunks finish and be reported first.
                while self._in_flight:
                    self._idle.wait()
            pending = [f for state in self._calls.values() for f in state.pending.values()]
            self._calls.clear()
            client, cluster = self._client, self._cluster
            self._client = self._cluster = self._init_future = None
        self._cancel(pending)
        try:
            client.close()
        finally:
            if cluster is not None:
                _close_cluster(cluster, kill=self._killed)

    # -- internals --------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("this dask backend is closed")

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

                with dask.config.set(OWN_CLUSTER_CONFIG):
                    cluster = distributed.LocalCluster(
                        n_workers=self._requested_workers,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address=":0",
                    )
                address = cluster.scheduler_address
            else:
                address = self.address
            try:
                try:
                    client = distributed.Client(address, set_as_default=False, timeout=CONNECT_TIMEOUT)
                except OSError as exc:
                    source = "address=" if self._address_given else f"${ADDRESS_ENV}"
                    exc.add_note(f"parmap: backend='dask' could not reach the scheduler at {address} (from {source})")
                    raise
                init = None
                if self._init_bytes is not None:
                    key = f"parmap-initializer-{uuid.uuid4().hex}"
                    init = client.submit(_pass_through, self._init_bytes, key=key, pure=False)
            except BaseException:
                if cluster is not None:
                    cluster.close()
                raise
            with self._lock:
                self._client, self._cluster, self._init_future = client, cluster, init
            return client

    def _cancel(self, futures: list[Any]) -> None:
        client = futures[0].client if futures else None
        if client is None:
            return
        try:
            client.cancel(futures)
        except Exception:  # noqa: S110 - the cluster is gone: nothing left to cancel
            pass

    def _report(self, chunk: Chunk, done: Done, state: _CallState, future: Any) -> None:
        # Runs on Dask's callback thread, once per task however it ended.
        try:
            with self._lock:
                state.pending.pop(future.key, None)
                ignore = state.released or self._killed
            if not ignore:
                done(chunk, self._outcome(future))
        finally:
            with self._lock:
                self._in_flight -= 1
                self._idle.notify_all()

    def _outcome(self, future: Any) -> ChunkOutcome | ChunkLost:
        status = future.status
        if status == "finished":
            try:
                data = future.result()
            except Exception as exc:
                return ChunkLost(None, detail=f"its result could not be fetched from the dask cluster: {exc}")
            try:
                return decode_outcome(data)
            except Exception as exc:
                error = SerializationError(f"a result could not be unpickled here: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                return ChunkOutcome([], fatal=ErrorInfo.capture(error, pickle_it=False))
        if status == "error":
            error = future.exception()
            if isinstance(error, self._distributed.KilledWorker):
                worker = getattr(error.last_worker, "address", error.last_worker)
                return ChunkLost(None, detail=f"the dask worker {worker} died (KilledWorker)", unsure=True)
            # run_remote_chunk never raises: the task could not even start there.
            if isinstance(error, ImportError):
                error.add_note("parmap: parmap (and what fn imports) must be installed on every dask worker")
            return ChunkOutcome([], fatal=ErrorInfo.capture(error, pickle_it=False))
        try:
            future.result()
            reason = f"its dask future ended as {status!r}"
        except BaseException as exc:  # a CancelledError carries the cluster's reason
            reason = str(exc) or type(exc).__name__
        # "lost": it had finished, but its result died with its worker.
        return ChunkLost(None, detail=f"the dask cluster dropped it: {reason}", unsure=status == "lost")


#: Seconds a nanny gives its worker to stop on ``close(kill=True)`` before
#: killing it; Dask's own default (5 s) would break the Ctrl-C promise (2 s).
KILL_GRACE = 0.5


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
