"""``parmap.Pool``: workers that stay alive between calls.

A Pool owns one backend. Its options are defaults for its calls; each call
may override the per-call ones. ``parmap.map`` and friends are the same
machinery with a Pool that lives for one call.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import logging
import multiprocessing.util  # noqa: F401 - its exit handler must be registered before ours
import os
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, NamedTuple, ParamSpec, TypeVar, Unpack, cast

from . import _context
from ._async_result import AsyncResult
from ._errors import PoolClosedError, SerializationError
from ._options import (
    CallOptions,
    OnError,
    PoolCallOverrides,
    PoolImapOverrides,
    PoolOptions,
    workers_or_processes,
)
from ._scheduler import SKIPPED, Record, Scheduler, lost_error
from ._serialization import find_unpicklable, short_repr, track_classes, travels_by_name
from .backends import create_backend, create_timed_stand_in
from .backends._base import Backend, Call, Chunk, ChunkLost, ChunkOutcome, may_wait_for_another_backend

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


# Pools never closed, terminated at interpreter exit before multiprocessing's
# own exit handler runs (atexit runs the last registered first, and importing
# multiprocessing.util registered that one already): left to it, a
# multiprocessing.Pool fed by parmap waited for ever on a worker's queue lock,
# and parmap's own workers raced its process finalizers.
_open_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
# Where concurrent.futures logs what a done-callback raised.
_futures_logger = logging.getLogger("concurrent.futures")


def _terminate_open_pools() -> None:
    for pool in list(_open_pools):
        _end_at_exit(pool)


def _end_at_exit(pool: Pool) -> None:
    """Terminate ``pool``; first, after ``shutdown(wait=False)``, let it
    finish its running work, as an executor does before the exit, unless
    a Ctrl-C ended the program (the interpreter's own record of it)."""
    try:
        if pool._refusing and not isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
            pool.join()
    except BaseException:  # noqa: S110 - a Ctrl-C now ends the wait; exiting, nothing left to tell
        pass
    try:
        pool.terminate()
    except Exception:  # noqa: S110 - exiting: nothing left to tell
        pass


atexit.register(_terminate_open_pools)


def terminate_at_exit_before_now(backend: object) -> None:
    """At exit, terminate the open pools over ``backend`` before the exit
    hooks registered so far run: those of ``distributed``, imported for it,
    close its clusters, and a pool's client would then try for seconds to
    reach a scheduler already gone, and say so on stderr. Other pools, and
    exit hooks of the program's that use them, keep their order."""
    atexit.register(_terminate_pools_over, weakref.ref(backend))


def _terminate_pools_over(backend: weakref.ref[object]) -> None:
    for pool in list(_open_pools):
        if backend() is not None and pool._backend is backend():
            _end_at_exit(pool)


class Pool:
    """A set of workers that serves many calls.

    Example::

        with parmap.Pool(workers=4, backend="process", progress=True) as pool:
            squares = pool.map(lambda x: x * x, range(1000))
            future = pool.submit(pow, 2, 10)
            assert future.result() == 1024

    Leaving the ``with`` block waits for running work and stops the workers
    (an exception leaving it stops them at once). Using the pool afterwards
    raises :class:`parmap.PoolClosedError`.

    ``processes=`` is another name for ``workers=``, as ``multiprocessing.Pool``
    spells it, so ``Pool(processes=4)`` carries over unchanged.
    """

    def __init__(
        self,
        workers: int | None = None,
        backend: object = "auto",
        *,
        start_method: str | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        address: str | None = None,
        max_tasks_per_child: int | None = None,
        chunksize: int | None = None,
        progress: bool | Mapping[str, Any] | None = False,
        timeout: float | None = None,
        retries: int = 0,
        on_error: OnError = "raise",
        ordered: bool = True,
        processes: int | None = None,
    ) -> None:
        self._options = PoolOptions(
            workers=workers_or_processes(workers, processes),
            backend=backend,
            start_method=start_method,
            initializer=initializer,
            initargs=initargs,  # type: ignore[arg-type]  # validated and made a tuple
            address=address,
            max_tasks_per_child=max_tasks_per_child,
        )
        self._defaults = CallOptions(
            chunksize=chunksize,
            progress=False if progress is None else progress,
            timeout=timeout,
            retries=retries,
            on_error=on_error,
            ordered=ordered,
        )
        self._backend, self._owns_backend = create_backend(self._options)
        self._timed: Backend | None = None  # see _backend_for
        self._here: Backend | None = None  # see _backend_for
        self._check_capabilities(self._defaults)
        self._closed = False
        self._killed = False
        self._refusing = False  # shutdown(wait=False): closing in the background
        self._finished = threading.Event()  # the workers are gone: close()/join() may return
        self._closers = 0  # threads closing the backend: a close() and the terminate() that overtook it
        # close() with imaps open leaves the workers to them, as a closed
        # multiprocessing.Pool does: the last to end closes the pool, unless
        # join(), the with block or terminate() ends them first.
        self._open_imaps = 0
        self._deferred = False  # a close() waits for the open imaps to end
        self._abandoned = False  # an imap left open by close() was dropped unfinished: its work is no one's
        self._enders = 0  # threads in join() or another close: a close() must not leave the workers to imaps
        # Its workers, threads and pipes belong to this process: a child made
        # by os.fork() inherits the object but none of that (see _check_open).
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._futures: set[Future[Any]] = set()
        self._running_maps = 0  # map/starmap calls under way, in any thread
        # Notified when the last submitted call settles or the last map returns.
        self._all_settled = threading.Condition(self._lock)
        # submit() futures with done-callbacks are settled on threads of
        # their own: a callback is user code, and on a backend's thread one
        # that waits on this pool (map, close) would wait on that very thread.
        self._settlers = _Settlers()
        # submit(): the call of the last function submitted, and how many
        # submits of each call have not ended (see _submit_call_for).
        self._submit_call: _SubmitCall | None = None
        self._submits_running: dict[int, int] = {}
        self._one_call = False  # parmap.map's own pool: it closes itself (see __del__)
        _open_pools.add(self)

    def _serve_one_call(self) -> None:
        """This pool lives for one call (``parmap.map`` and friends): tell the backend."""
        self._one_call = True
        if self._owns_backend:
            self._backend.serve_one_call()

    # -- calls -----------------------------------------------------------
    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        chunksize: int | None = None,
        **overrides: Unpack[PoolCallOverrides],
    ) -> list[R]:
        """``[fn(x) for x in items]``, in parallel. Per-call options may override the pool's.

        ``chunksize`` may come third, as in ``multiprocessing``
        (``pool.map(fn, xs, 8)``); ``None`` leaves the pool's own, which is
        automatic sizing unless ``Pool(chunksize=...)`` set one.
        """
        return self._map(fn, items, _with_chunksize(overrides, chunksize, "map"), star=False)

    def starmap(
        self,
        fn: Callable[..., R],
        items: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        **overrides: Unpack[PoolCallOverrides],
    ) -> list[R]:
        """``[fn(*args) for args in items]``, in parallel (``chunksize`` as in :meth:`map`)."""
        return self._map(fn, items, _with_chunksize(overrides, chunksize, "starmap"), star=True)

    def imap(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        chunksize: int | None = None,
        **overrides: Unpack[PoolImapOverrides],
    ) -> Iterator[R]:
        """Results lazily, pulling ``items`` only as fast as the workers take them.

        ``ordered=False`` yields results as they finish. Closing the iterator
        early (``break``, ``.close()``, garbage collection) stops the work.
        ``chunksize`` as in :meth:`map`.
        """
        return self._imap(fn, items, _with_chunksize(overrides, chunksize, "imap"))

    def imap_unordered(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        chunksize: int | None = None,
        **overrides: Unpack[PoolCallOverrides],
    ) -> Iterator[R]:
        """``imap(fn, items, ordered=False)``, under ``multiprocessing.Pool``'s name for it."""
        if "ordered" in overrides:
            raise TypeError("imap_unordered() got an unexpected keyword argument 'ordered': use imap(..., ordered=...)")
        return self._imap(fn, items, {**_with_chunksize(overrides, chunksize, "imap_unordered"), "ordered": False})

    def _imap(
        self, fn: Callable[..., Any], items: Iterable[Any], overrides: Mapping[str, Any], *, owned: bool = False
    ) -> Iterator[Any]:
        """``imap``; ``owned``: this pool exists for this iterator alone and ends with it."""
        options = self._call_options(overrides)
        scheduler = self._scheduler(fn, items, options, star=False, in_order=options.ordered)
        skip = options.on_error == "skip"
        if owned:
            return _flatten(scheduler.records(), skip=skip, pool=self, owned=True)
        with self._lock:
            self._check_open()
            self._open_imaps += 1
        ending = _ImapEnding(self)
        iterator = _flatten(scheduler.records(), skip=skip, pool=self, owned=False, ending=ending)
        # A generator dropped before its first value runs no finally clause.
        weakref.finalize(iterator, ending, False).atexit = False
        return iterator

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``fn(*args, **kwargs)`` on a worker; returns a :class:`concurrent.futures.Future`.

        As with :class:`concurrent.futures.ProcessPoolExecutor`, the future is
        pending while the call waits for a free worker, and ``cancel()`` then
        takes it back: it never runs. Once a worker takes it, it is running
        and cannot be cancelled. (On the ``serial`` and ``dask`` backends and
        an ``Executor`` given as backend, which hand the call on at once, it
        is running from the start. The other backends take at most two per
        worker at a time: one running, one queued behind it.) If the pool is
        terminated first, the
        future fails with ``PoolClosedError``.
        Consecutive submits of one function of a module share one call, so
        ``fn`` goes to each worker once and only the arguments travel with
        each submit. A lambda, closure or callable object is pickled at each
        submit, as ``ProcessPoolExecutor`` does: a worker runs a fresh copy
        of it as it was when submitted, whatever the caller changes in it
        later. (On the ``thread`` backend nothing is pickled: the task runs
        the caller's very object, as a ``ThreadPoolExecutor``'s does.)
        """
        self._check_open()
        _check_fn(fn)
        backend = self._backend_for(self._defaults.timeout)
        future: _SubmitFuture[R] = _SubmitFuture()
        begin = None
        if backend.queues_chunks:

            def begin() -> bool:
                try:
                    return future.set_running_or_notify_cancel()
                except RuntimeError:  # failed already, by terminate()
                    return False

        else:
            future.set_running_or_notify_cancel()
        call = self._submit_call_for(fn, backend)
        done = _Submission(self, backend, future, call, fn, (args, kwargs))
        with self._lock:
            self._futures.add(future)
        try:
            backend.submit(Chunk(call, [0], [done.item], begin=begin), done)
        except BaseException as exc:
            # Nothing was handed over: this future is not the pool's to wait for.
            self._forget(future)
            self._submit_ended(call, backend)
            if isinstance(exc, SerializationError):
                raise _submit_error(fn, args, kwargs, exc) from exc
            raise
        if backend.runs_in_caller and future.done() and not future.cancelled():
            interrupt = future.exception()
            if isinstance(interrupt, KeyboardInterrupt):
                raise interrupt  # Ctrl-C while fn ran here: the caller's, not the future's
        return future

    # -- multiprocessing.Pool's apply and async forms ---------------------
    def apply(self, fn: Callable[..., R], args: Iterable[Any] = (), kwds: Mapping[str, Any] | None = None) -> R:
        """``fn(*args, **kwds)`` on a worker, waiting for it, as ``multiprocessing.Pool.apply`` does."""
        return self.submit(fn, *args, **(kwds or {})).result()

    def apply_async(
        self,
        fn: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[R]:
        """``multiprocessing.Pool.apply_async``: :meth:`submit`, answered by an :class:`AsyncResult`.

        ``callback(result)`` or ``error_callback(exception)`` runs on a
        thread of the pool's own before ``get()`` returns (it may call the
        pool, ``close()`` included). Example::

            pending = pool.apply_async(pow, (2, 10))
            assert pending.get(timeout=30) == 1024
        """
        result: AsyncResult[R] = AsyncResult(callback, error_callback)
        self.submit(fn, *args, **(kwds or {})).add_done_callback(result._set_from)
        return result

    def map_async(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        **overrides: Unpack[PoolCallOverrides],
    ) -> AsyncResult[list[R]]:
        """``multiprocessing.Pool.map_async``: :meth:`map` in the background, answered by an :class:`AsyncResult`.

        The items are read into a list first, here, as ``multiprocessing``
        does. ``close()`` and ``join()`` wait for the map, and the callback
        runs before ``get()`` returns. Per-call options may override the
        pool's, as on :meth:`map`.
        """
        return self._map_async(fn, items, chunksize, callback, error_callback, overrides, star=False)

    def starmap_async(
        self,
        fn: Callable[..., R],
        items: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        **overrides: Unpack[PoolCallOverrides],
    ) -> AsyncResult[list[R]]:
        """``multiprocessing.Pool.starmap_async``: :meth:`starmap` in the background (see :meth:`map_async`)."""
        return self._map_async(fn, items, chunksize, callback, error_callback, overrides, star=True)

    def _map_async(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        chunksize: int | None,
        callback: Callable[[Any], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        overrides: Mapping[str, Any],
        *,
        star: bool,
    ) -> AsyncResult[Any]:
        self._check_open()
        name = "starmap_async" if star else "map_async"
        if "ordered" in overrides:
            raise TypeError(f"{name}() got an unexpected keyword argument 'ordered': its list is in input order")
        overrides = _with_chunksize(overrides, chunksize, name)
        # A copy no one else holds: the caller goes on while the workers may
        # read items from it, and a list it changes meanwhile must not change the map.
        items = list(items)
        result: AsyncResult[Any] = AsyncResult(callback, error_callback)
        with self._lock:
            self._check_open()
            self._running_maps += 1  # close() waits for it from now on
        try:
            started = self._start_map(fn, items, overrides, star=star)
            runner = threading.Thread(
                target=self._finish_map_async, args=(*started, result), name=f"parmap-{name}", daemon=True
            )
            runner.start()
        except BaseException:
            self._map_ended()
            raise
        return result

    def _finish_map_async(self, scheduler: Scheduler, options: CallOptions, result: AsyncResult[Any]) -> None:
        try:
            outcome = functools.partial(result._set, _collect(scheduler, options))
        except BaseException as exc:
            outcome = functools.partial(result._set, error=exc)
        try:
            # A callback is user code: on a settling thread, one that waits on
            # this pool (map, close) does not wait on this map's end; and the
            # close() waiting for this map waits for that thread too.
            if not (result._has_callbacks and self._settlers.put(outcome)):
                outcome()
        finally:
            self._map_ended()

    def _map_ended(self) -> None:
        with self._lock:
            self._running_maps -= 1
            self._notify_if_idle()

    def _submit_call_for(self, fn: Callable[..., Any], backend: Backend) -> Call:
        """The call that runs ``fn`` for ``submit``: the last submit's when
        ``fn`` is the same function (benchmark W8: 10,000 submits), else a
        new one; a call replaced so is released once its last submit has ended.

        Only what each worker would run the same way is shared: a function
        that is not pickled (threads), or one found by its module and name,
        which is also kept for the next submit (it lives on in its module
        anyway). A closure or a callable object sent by value gets a call of
        its own, pickled now: a worker runs it as it was at this submit, in
        a fresh copy (as ``ProcessPoolExecutor`` does), and the pool keeps
        nothing of it once it has run.
        """
        named = travels_by_name(fn, local=not backend.capabilities.remote)
        if not named and backend.capabilities.isolated:
            call = Call(_Apply(fn), timeout=self._defaults.timeout, snapshot=True)
            with self._lock:
                self._submits_running[call.id] = 1
            return call
        idle: _SubmitCall | None = None
        with self._lock:
            last = self._submit_call
            # A submit from inside a worker runs on a stand-in (see
            # _backend_for): a call lives on one backend, which releases it.
            if last is not None and last.fn is fn and last.backend is backend:
                call = last.call
            else:
                if last is not None and last.call.id not in self._submits_running:
                    idle = last  # nothing of it runs: release it now
                call = Call(_Apply(fn), timeout=self._defaults.timeout)
                self._submit_call = _SubmitCall(fn, call, backend, kept=named)
            self._submits_running[call.id] = self._submits_running.get(call.id, 0) + 1
        if idle is not None:
            idle.backend.release(idle.call)
        return call

    def _submit_ended(self, call: Call, backend: Backend) -> None:
        with self._lock:
            left = self._submits_running[call.id] - 1
            if left:
                self._submits_running[call.id] = left
                return
            del self._submits_running[call.id]
            last = self._submit_call
            if last is not None and call is last.call:
                if last.kept:
                    return  # for the next submit of the same function
                self._submit_call = None
        backend.release(call)

    # -- lifecycle -----------------------------------------------------------------
    def close(self) -> None:
        """Wait for running work, then stop the workers. Idempotent.

        Running work is every ``submit()``ted call, retries included, and
        every ``map``/``starmap`` under way in another thread; ``terminate()``
        from another thread ends the wait. An ``imap`` is not waited for (its
        consumer may not be back before this returns): as on a closed
        ``multiprocessing.Pool``, one taken before ``close()`` still yields
        all its results, and the last open one to end (read to its end,
        closed, dropped) stops the workers. ``join()``, the end of a ``with``
        block or ``terminate()`` stops them first: the imaps still open then
        raise ``PoolClosedError``.

        Example, the ``multiprocessing`` idiom::

            pool = parmap.Pool(workers=4)
            results = pool.imap(str.upper, lines)
            pool.close()  # no more calls; the imap runs on
            for line in results:
                print(line)
            pool.join()  # the workers are gone Called by one of the pool's own
        tasks (``thread`` backend), which that wait would include, it is
        ``shutdown(wait=False)``: the pool takes no new work and closes once
        its running work is done. So it is from a task of any pool over the
        same thread executor, whose thread that work may be waiting for.
        """
        if _context.working_for(self._backend) or _context.working_on(self._backend):
            self.shutdown(wait=False)
            return
        self._shutdown(kill=False, end_imaps=False)

    def terminate(self) -> None:
        """Stop the workers now; futures not yet done fail with ``PoolClosedError``."""
        self._shutdown(kill=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """:meth:`concurrent.futures.Executor.shutdown`, for code written against an executor.

        ``cancel_futures`` first cancels the ``submit()`` calls still waiting
        for a worker (they never run). ``wait=True`` is then :meth:`close`.
        ``wait=False`` returns at once: the pool takes no new work from then
        on and closes in the background once its running work is done (an
        interpreter that exits first waits for that work, as it would for an
        executor's, unless a Ctrl-C ended the program; a pool merely left
        open is terminated at the exit, as a ``multiprocessing.Pool`` is).
        """
        if cancel_futures:
            with self._lock:
                waiting = list(self._futures)
            for future in waiting:
                future.cancel()  # only those not yet running give way
        if wait:
            self.close()
            return
        self._refusing = True
        threading.Thread(target=self.close, name="parmap-shutdown", daemon=True).start()

    def join(self) -> None:
        """Return once the workers are gone; for ``close(); join()`` written for ``multiprocessing``.

        ``close()`` and ``terminate()`` already wait, so after either this
        returns at once; after ``shutdown(wait=False)`` it waits for the
        background close. An ``imap`` still open after ``close()`` is ended
        here (it raises ``PoolClosedError`` if read on): waiting for it
        could wait for ever for this very thread to read it. Before them it raises ``ValueError``, as
        ``multiprocessing.Pool.join`` does: nothing would ever stop the workers.
        """
        if not self.closed:
            raise ValueError("join() on a parmap.Pool that is still open: call close() or terminate() first")
        # From a task on the threads the work runs on, only a pool with no
        # work left can be waited for: the rest may wait for this very thread.
        if _context.working_for(self._backend):
            raise RuntimeError("join() in one of this pool's own tasks would wait for that task to end")
        if _context.working_on(self._backend) and self._has_work():
            raise RuntimeError("join() in a task on the threads this pool's work waits for would wait for that task")
        if os.getpid() == self._pid and not self._settlers.on_one():
            self._shutdown(kill=False, end_imaps=True, wait=self._finished.wait)

    def __enter__(self) -> Pool:
        self._check_open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._shutdown(kill=exc_type is not None, end_imaps=True)

    def __del__(self) -> None:
        # A pool dropped without close() must not leave processes behind.
        if not getattr(self, "_closed", True):
            # As multiprocessing.Pool and open files do: the work it was still
            # running is lost, which the caller may not know. Said after the
            # workers are stopped, so that a warning made an error stops nothing.
            unclosed = None
            try:
                if not getattr(self, "_one_call", False) and os.getpid() == self._pid:
                    unclosed = f"unclosed running pool {self!r}"
                if threading.current_thread().daemon:
                    # Likely a thread of the backend's own, which took the last
                    # reference with a result: closing here would wait for it.
                    threading.Thread(target=self._shutdown, args=(True,), name="parmap-dropped", daemon=True).start()
                else:
                    self._shutdown(kill=True)
            except Exception:  # noqa: S110 - interpreter teardown
                pass
            if unclosed is not None:
                warnings.warn(unclosed, ResourceWarning, source=self, stacklevel=2)

    @property
    def closed(self) -> bool:
        """True once the pool has been closed or terminated (or shut down, even in the background)."""
        return self._closed or self._refusing

    def __repr__(self) -> str:
        # What was asked for: a Dask backend would have to reach its cluster to count threads.
        backend, state = self._options.backend, "closed" if self.closed else "open"
        if not isinstance(backend, str):
            return f"<parmap.Pool backend={type(backend).__name__} {state}>"
        return f"<parmap.Pool workers={self._options.worker_count} backend={backend!r} {state}>"

    # -- internals ---------------------------------------------------------------
    def _shutdown(self, kill: bool, *, end_imaps: bool = True, wait: Callable[[], object] | None = None) -> None:
        """Close (``kill``: terminate) the pool, or wait for the close under way
        (``wait``: how). ``end_imaps``: the open imaps end now, rather than
        the workers waiting for them (see ``close``)."""
        if os.getpid() != self._pid:
            # A forked child's copy: the workers are the parent's, still at
            # work for it, and a lock held at the fork would never come free.
            self._closed = True
            return
        counted = False
        with self._lock:
            if self._deferred and not kill:
                if not end_imaps:
                    return  # close() again: the open imaps still come first
                self._deferred = False  # join() or the with block: they end now
                self._closers += 1
                underway = False
            else:
                # terminate() still may end a close() that waits.
                underway = self._killed or (self._closed and not kill)
                if not underway:
                    self._closed = True
                    self._killed = kill
                    self._closers += 1
                    self._deferred = False
                elif not kill:
                    # This thread may be the very one that would read the
                    # imaps: the close under way must not wait for them.
                    self._enders += 1
                    counted = True
        if underway:
            # Another thread closes it (shutdown(wait=False), say): wait for
            # that, unless this is a done-callback, which that close waits
            # for, or a backend's own thread (see may_wait_for_another_backend).
            try:
                (wait or self._wait_finished)()
            finally:
                if counted:
                    with self._lock:
                        self._enders -= 1
            return
        self._close_now(kill, imaps_may_finish=not (kill or end_imaps))

    def _close_now(self, kill: bool, *, imaps_may_finish: bool) -> None:
        """Close the backend, counted in ``_closers``; ``imaps_may_finish``:
        or leave it to the open imaps, the last of which closes it."""
        deferred = False
        try:
            deferred = self._close_backend(kill, imaps_may_finish=imaps_may_finish)
        finally:
            with self._lock:
                self._closers -= 1
                last = self._closers == 0
                handed_on = deferred and self._deferred
            if handed_on:
                pass  # to the open imaps
            elif last or kill:
                # A terminate that has stopped the workers ends every wait
                # (join(), a later terminate) even while an overtaken close
                # still runs: on `thread` that close waits out a running item.
                self._finished.set()
            else:
                # A terminate() overtook this close and is still stopping
                # the workers (a Dask cluster's take a second or two):
                # close() and join() return once they are gone.
                self._wait_finished()

    def _imap_ended(self, finished: bool) -> None:
        """An imap of this pool ended (``finished``: read to its end).

        One that was not may have been dropped by the cycle collector, which
        runs wherever something allocates: perhaps on a thread that holds
        this pool's lock, or a backend's. There it neither waits for the
        lock nor closes anything; a thread of its own does.
        """
        if finished and not threading.current_thread().daemon and not _context.working_for(self._backend):
            # The consumer's own last step; not a backend's thread, nor a
            # task of this pool's, whose close would wait for itself.
            self._end_imap(finished)
            return
        if not self._lock.acquire(blocking=False):
            _start_thread(self._end_imap, finished)
            return
        try:
            due = self._count_imap_end(finished)
        finally:
            self._lock.release()
        if due:
            _start_thread(self._close_now, self._killed, imaps_may_finish=False)

    def _end_imap(self, finished: bool) -> None:
        with self._lock:
            due = self._count_imap_end(finished)
        if due:
            self._close_now(self._killed, imaps_may_finish=False)

    def _count_imap_end(self, finished: bool) -> bool:
        """Under the lock: whether this was the last open imap that a close
        waits for, which must now stop the workers (a kill if one was
        abandoned: its running items are no one's)."""
        self._open_imaps -= 1
        self._abandoned = self._abandoned or not finished
        if not (self._deferred and not self._open_imaps):
            return False
        self._deferred = False
        self._closers += 1
        self._killed = self._abandoned
        return True

    def _wait_finished(self) -> None:
        if not self._settlers.on_one() and may_wait_for_another_backend():
            self._finished.wait()

    def _close_backend(self, kill: bool, *, imaps_may_finish: bool = False) -> bool:
        """Stop the workers (polite: once the running work is done); True
        where that is left to the open imaps instead (``imaps_may_finish``)."""
        if not kill:
            try:
                with self._lock:
                    # Submitted calls first, retries included (the backend would
                    # refuse a retry once closing), and maps running in other
                    # threads (which hand the backend their chunks as they go);
                    # on an executor given as backend too, though it runs on.
                    while (self._futures or self._running_maps) and not self._killed:
                        self._all_settled.wait()
                    if imaps_may_finish and self._open_imaps and not self._killed and not self._enders:
                        self._deferred = True
                        self._abandoned = False  # one abandoned before this close ran no longer
                        return True
            except BaseException:
                # Ctrl-C while leaving the with block: stop the workers now.
                with self._lock:
                    self._killed = True
                self._close_backend(kill=True)
                raise
        if self._owns_backend:
            try:
                self._backend.close(kill=kill)
            except BaseException:
                if kill:
                    raise
                # Ctrl-C while the backend waited for its running chunks: stop them now.
                with self._lock:
                    self._killed = True
                self._close_backend(kill=True)
                raise
        for stand_in in (self._timed, self._here):
            if stand_in is not None:
                stand_in.close(kill=kill)
        if kill:
            # Whatever the backend could not end (one not ours runs on).
            with self._lock:
                unfinished, self._futures = self._futures, set()
                self._all_settled.notify_all()
            for future in unfinished:
                _settle(future.set_exception, PoolClosedError("the pool was terminated before this call finished"))
        # Every future the workers settled is settled before close() returns,
        # unless this is a done-callback, on a settling thread itself.
        self._settlers.stop()
        return False

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._futures or self._running_maps)

    def _forget(self, future: Future[Any]) -> None:
        """``future`` is no longer the pool's to wait for."""
        with self._lock:
            self._futures.discard(future)
            self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        """Wake a close() waiting for running work, if none is left (under the lock)."""
        if not self._futures and not self._running_maps:
            self._all_settled.notify_all()

    def _check_open(self) -> None:
        if os.getpid() != self._pid:
            raise PoolClosedError(
                f"this parmap.Pool was made in process {self._pid}, and this is a child forked from it, "
                "which cannot reach that pool's workers: create a Pool in this process"
            )
        if self._closed or self._refusing:
            raise PoolClosedError("this parmap.Pool is closed; create a new one")

    def _call_options(self, overrides: Mapping[str, Any]) -> CallOptions:
        options = self._defaults.updated(overrides)
        self._check_capabilities(options)
        if self._backend.stands_in and options.progress is not False:
            # A nested call, run in a worker: its bar would be drawn over the
            # caller's, on the terminal they share.
            options = dataclasses.replace(options, progress=False)
        return options

    def _check_capabilities(self, options: CallOptions) -> None:
        most = self._backend.max_items_per_worker
        if most is not None and options.chunksize is not None and options.chunksize > most:
            raise ValueError(
                f"chunksize={options.chunksize} is more than max_tasks_per_child={most}: a chunk runs "
                "on one worker, which runs no more items than that"
            )
        if options.timeout is not None and not self._backend.capabilities.can_timeout and not self._backend.stands_in:
            raise ValueError(
                f"timeout={options.timeout:g} needs a backend that can stop a running task; "
                f"{type(self._backend).__name__} cannot. Use backend='process' (or 'fork', 'pool', 'apply_async')"
            )

    def _scheduler(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        options: CallOptions,
        *,
        star: bool,
        in_order: bool,
        source: Sequence[Any] | None = None,
    ) -> Scheduler:
        self._check_open()
        _check_fn(fn)
        call = Call(
            fn,
            star=star,
            stop_on_error=options.on_error == "raise" and options.retries == 0,
            timeout=options.timeout,
            source=source,
        )
        return Scheduler(self._backend_for(options.timeout), call, items, options, deliver_in_order=in_order)

    def _backend_for(self, timeout: float | None) -> Backend:
        """The backend for a call or a submit with this ``timeout``: the pool's, but

        * for a call made by one of the pool's own tasks (on the ``thread``
          backend, or an executor's threads), which runs serially in that
          task, as a nested call does: on the pool's workers it could wait
          for ever for the very worker it occupies;
        * for a call with a timeout made inside a parmap worker, where the
          pool's runs it here, serially (no pool of pools), and nothing here
          could stop a running item. That call runs serially still, on one
          forked child that can be stopped.
        """
        if _context.working_for(self._backend) or _context.working_on(self._backend):
            with self._lock:
                if self._here is None:
                    from .backends.serial import SerialBackend

                    self._here = SerialBackend()  # the task's thread ran the initializer already
                return self._here
        if timeout is None or not self._backend.stands_in:
            return self._backend
        with self._lock:
            if self._timed is None:
                self._timed = create_timed_stand_in(self._options)
            return self._timed

    def _map(
        self, fn: Callable[..., Any], items: Iterable[Any], overrides: Mapping[str, Any], *, star: bool
    ) -> list[Any]:
        self._check_open()  # before the lock: a forked child's copy may hold it for ever
        if "ordered" in overrides:
            # As parmap.map: a list comes in input order; only imap can yield as results finish.
            raise TypeError(
                f"{'starmap' if star else 'map'}() got an unexpected keyword argument 'ordered': its list is in "
                "input order; imap(..., ordered=False) yields results as they finish"
            )
        with self._lock:
            self._check_open()
            self._running_maps += 1
        try:
            return self._run_map(fn, items, overrides, star=star)
        finally:
            self._map_ended()

    def _run_map(
        self, fn: Callable[..., Any], items: Iterable[Any], overrides: Mapping[str, Any], *, star: bool
    ) -> list[Any]:
        return _collect(*self._start_map(fn, items, overrides, star=star))

    def _start_map(
        self, fn: Callable[..., Any], items: Iterable[Any], overrides: Mapping[str, Any], *, star: bool
    ) -> tuple[Scheduler, CallOptions]:
        options = self._call_options(overrides)
        # map blocks its caller until it returns, so a list cannot change under
        # it (imap's consumer could append to one between results): forked
        # workers may read the items from their copy of it (Call.source).
        source = cast("Sequence[Any]", items) if type(items) in (list, tuple, range) else None
        if source is not None:
            track_classes(source)
        return self._scheduler(fn, items, options, star=star, in_order=False, source=source), options


def _with_chunksize(overrides: Mapping[str, Any], chunksize: object, method: str) -> Mapping[str, Any]:
    """A Pool method's overrides with its ``chunksize`` parameter: ``None``
    (not given) leaves the pool's."""
    if isinstance(chunksize, Iterable) and not isinstance(chunksize, (str, bytes)):
        # Executor.map(fn, xs, ys) zips its iterables; here the third is chunksize.
        raise TypeError(
            f"{method}() takes one iterable of items, and its third argument is chunksize, "
            f"got {short_repr(chunksize)}: for fn(x, y) over two iterables use pool.starmap(fn, zip(xs, ys))"
        )
    return overrides if chunksize is None else {**overrides, "chunksize": chunksize}


def _collect(scheduler: Scheduler, options: CallOptions) -> list[Any]:
    """The list a map returns, from its scheduler."""
    # Each record joins the results as soon as those before it have, and
    # its own list is freed at once: the results are assembled while the
    # workers still compute, not after, and the next chunk's results
    # reuse the freed memory instead of faulting in fresh pages
    # (benchmark W1).
    results: list[Any] = []
    waiting: dict[int, Record] = {}
    for record in scheduler.records():
        waiting[record.start] = record
        while (ready := waiting.pop(len(results), None)) is not None:
            results.extend(ready.values)
    if options.on_error == "skip":
        results = [v for v in results if v is not SKIPPED]
    return results


# Records of at most this many values are handed over one by one, each
# dropped as it goes; a bigger one (an imap of tiny items) with ``yield
# from``, which costs ~30 ns less an item (benchmark W6, 2M items) and keeps
# the record's values until its last is taken.
HANDED_OVER_ONE_BY_ONE = 64


def _flatten(
    records: Iterator[Record], *, skip: bool, pool: Pool, owned: bool, ending: _ImapEnding | None = None
) -> Iterator[Any]:
    """Every value of every record. One generator does it all because each
    layer costs every item a frame switch (benchmark W6). It holds ``pool``
    alive while it runs, as ``multiprocessing.Pool``'s iterators do, so that
    ``Pool().imap(...)`` works; ``owned``: the pool is this iterator's alone,
    closed when the values run out, terminated when they are abandoned or an
    error escapes; ``ending``: told when it ends, for a pool of many."""
    finished = False
    try:
        for record in records:
            values, record.values = record.values, []
            if len(values) <= HANDED_OVER_ONE_BY_ONE:
                # Popped as they go, so that a result the consumer has dropped
                # is freed at once (CPython's test_free_reference asks it of
                # an executor's map).
                values.reverse()
                while values:
                    if skip and values[-1] is SKIPPED:
                        values.pop()
                    else:
                        yield values.pop()
            elif skip:
                for value in values:
                    if value is not SKIPPED:
                        yield value
                value = None
            else:
                yield from values
            values = []  # not kept while the next record is awaited
        finished = True
    finally:
        records.close()  # type: ignore[attr-defined]
        if ending is not None:
            ending(finished)
        if owned:
            if finished:
                pool.close()
            else:
                pool.terminate()


def _start_thread(target: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    threading.Thread(target=target, args=args, kwargs=kwargs, name="parmap-imap-end", daemon=True).start()


class _ImapEnding:
    """Tells the pool, once, that one of its imaps ended: from the iterator's
    last step, or from its finalizer when dropped before its first."""

    __slots__ = ("_pool",)

    def __init__(self, pool: Pool) -> None:
        self._pool: Pool | None = pool

    def __call__(self, finished: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._imap_ended(finished)


class _Submission:
    """The outcome of one ``submit()``: retried, or settled into its future.

    An object rather than a closure: a closure that passes itself on (to
    resubmit a retry) is a reference cycle, and a pool dropped unclosed
    would wait for the cyclic garbage collector to stop its workers.
    """

    __slots__ = ("attempts", "backend", "call", "fn", "future", "item", "pool")

    def __init__(
        self, pool: Pool, backend: Backend, future: _SubmitFuture[Any], call: Call, fn: Callable[..., Any], item: Any
    ) -> None:
        self.pool, self.backend, self.future, self.call, self.fn, self.item = pool, backend, future, call, fn, item
        self.attempts = 0

    def __call__(self, chunk: Chunk, result: ChunkOutcome | ChunkLost) -> None:
        pool, future, call = self.pool, self.future, self.call
        if future.cancelled():  # dropped before it ran: nothing to settle
            pool._submit_ended(call, self.backend)
            pool._forget(future)
            return
        if isinstance(result, ChunkOutcome) and result.unreadable and not chunk.by_value and not pool._killed:
            # The arguments did not load in the worker: once more by value, free of charge.
            try:
                self.backend.submit(Chunk(call, [0], [self.item], by_value=True), self)
                return
            except PoolClosedError:
                pass
        failed = isinstance(result, ChunkLost) or bool(result.errors)
        if failed and not (isinstance(result, ChunkLost) and result.innocent):
            self.attempts += 1
        # KeyboardInterrupt, SystemExit: fn asked to stop, as map takes it.
        stops = isinstance(result, ChunkOutcome) and any(error.stops for error in result.errors.values())
        # A polite close waits for retries too; only terminate() refuses them.
        if failed and not stops and self.attempts <= pool._defaults.retries and not pool._killed:
            try:
                self.backend.submit(Chunk(call, [0], [self.item]), self)  # retries=N, as for map
                return
            except PoolClosedError:
                pass  # closed meanwhile: report this attempt's failure
        pool._submit_ended(call, self.backend)
        settle = _settlement(future, call, self.fn, result)
        with pool._lock:
            if future not in pool._futures:
                return  # failed by terminate() already
        # Nothing of the user's runs when a future without callbacks is
        # settled: here, then, and not one thread further (10,000 submits).
        if future.settle_unhooked(settle):
            pool._forget(future)
            return
        with pool._lock:
            pool._futures.discard(future)
            pool._notify_if_idle()
        if not pool._settlers.put(settle):
            settle()  # closed while a backend not ours still ran this call


def _check_fn(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if inspect.iscoroutinefunction(fn):
        # Called, it returns a coroutine, not a result (nor anything that pickles).
        raise TypeError(
            f"fn {short_repr(fn)} is an async function: parmap calls plain functions; "
            "give it one that runs the coroutine, e.g. lambda x: asyncio.run(fn(x))"
        )


class _SubmitFuture(Future[R]):
    """A ``submit()`` future that knows whether done-callbacks were added, so
    that one without any can be settled on whichever thread has its outcome."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks = threading.Lock()
        self._hooked = False

    def add_done_callback(self, fn: Callable[[Future[R]], object]) -> None:
        with self._hooks:
            self._hooked = True
        super().add_done_callback(fn)

    def settle_unhooked(self, settle: Callable[[], None]) -> bool:
        """Run ``settle`` now unless a callback waits (it would run here too)."""
        with self._hooks:  # a callback added meanwhile finds the future done: it runs in its adder
            if self._hooked:
                return False
            settle()
            return True


#: Settling threads a pool may have at once: one per done-callback that
#: blocks (waiting for another future), up to this; later ones queue.
MAX_SETTLERS = 32


class _Settlers:
    """The ``parmap-futures`` threads, which settle the futures that have
    done-callbacks: one, and one more whenever every one is busy, because a
    callback may wait for another future, whose settling must not queue
    behind it (as on a ``ThreadPoolExecutor``, where each task's own worker
    settles it).

    It holds no reference to its pool: a pool dropped unclosed must still be
    collected, so that ``__del__`` stops its workers.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for a settlement no put() has claimed
        self._stopped = False

    def put(self, settle: Callable[[], None]) -> bool:
        """Have ``settle`` run on a free settling thread (or, past
        :data:`MAX_SETTLERS` busy ones, the next to be free); False once stopped."""
        with self._lock:
            if self._stopped:
                return False
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < MAX_SETTLERS or not self._threads:
                thread = threading.Thread(target=self._serve, name="parmap-futures", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no more threads here (a container's limit)
                    if not self._threads:
                        return False  # settled by the caller, where it is
                else:
                    self._threads.append(thread)
            self._queue.put(settle)  # under the lock: stop() cannot slip in before it
        return True

    def on_one(self) -> bool:
        """Whether this is a settling thread (a done-callback runs here)."""
        return threading.current_thread() in self._threads

    def stop(self) -> None:
        """Settle what was put, then end the threads (this one excepted, if it is one)."""
        with self._lock:
            self._stopped = True
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _serve(self) -> None:
        while (settle := self._queue.get()) is not None:
            try:
                settle()  # a done-callback's own Exception is logged by concurrent.futures
            except BaseException:  # its SystemExit, KeyboardInterrupt: this thread must live on
                _futures_logger.exception("a done-callback of a parmap.Pool future raised")
            del settle
            with self._lock:
                self._idle += 1


def _settlement(
    future: Future[Any], call: Call, fn: Callable[..., Any], result: ChunkOutcome | ChunkLost
) -> Callable[[], None]:
    """What settles a ``submit()`` future with ``result``."""
    if isinstance(result, ChunkLost):
        error: BaseException = lost_error(call, f"submit({short_repr(fn)}, ...)", result)
    elif result.fatal is not None:
        error = result.fatal.rebuild()
    elif result.errors:
        error = _retold_for_submit(result.errors[0].rebuild(), fn)
    else:
        value = result.results[0]
        return lambda: _settle(future.set_result, value)
    return lambda: _settle(future.set_exception, error)


def _retold_for_submit(error: BaseException, fn: Callable[..., Any]) -> BaseException:
    """A submit has no "item #0": its arguments, and its result, are what travelled."""
    if not isinstance(error, SerializationError):
        return error
    text = str(error)
    where = f"submit({short_repr(fn)}, ...)"
    retellings = (("the result of item #0 ", f"the result of {where} "), ("item #0 ", f"the arguments of {where} "))
    for said, meant in retellings:
        if text.startswith(said):
            retold = SerializationError(meant + text[len(said) :])
            retold.__cause__ = error.__cause__
            return retold
    return error


def _settle(setter: Callable[[Any], None], outcome: Any) -> None:
    try:
        setter(outcome)
    except InvalidStateError:
        pass  # cancelled while it had not begun (a pool terminated under it): nothing to settle


class _SubmitCall(NamedTuple):
    """The call of the last function submitted (see ``Pool._submit_call_for``)."""

    fn: Callable[..., Any]
    call: Call
    backend: Backend  # that runs the call, and releases it
    kept: bool  # for the next submit of fn, once its own have ended (a function of a module)


class _Apply:
    """The function of a ``submit`` call: ``fn(*args, **kwargs)`` for each
    item ``(args, kwargs)``, so that ``fn`` travels once per call and only
    the arguments travel with each submit."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn

    def __call__(self, item: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        args, kwargs = item
        return self.fn(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Apply, (self.fn,))

    def __repr__(self) -> str:
        return repr(self.fn)  # errors name the user's function, not this wrapper


def _submit_error(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], exc: SerializationError
) -> SerializationError:
    """``exc`` (about the wrapped call or its one item) retold as what the
    user passed to ``submit``: the function, or which argument."""
    if exc.position is None:
        return exc  # the function itself, already named
    where = f"submit({short_repr(fn)}, ...)"
    named = [(f"argument #{i} ({short_repr(a)})", a) for i, a in enumerate(args)]
    named += [(f"keyword argument {k!r} ({short_repr(v)})", v) for k, v in kwargs.items()]
    for what, value in named:
        bad, problem = find_unpicklable([value])
        if bad is not None:
            return SerializationError(f"{where}: {what} cannot be serialised: {type(problem).__name__}: {problem}")
    return SerializationError(f"{where}: the arguments cannot be serialised: {exc}")
