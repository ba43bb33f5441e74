"""How the worker processes of parmap's own Dask clusters ended.

Dask's ``KilledWorker`` names the dead worker's address only; its nanny
alone sees the process's exit code (and only logs it). In a cluster parmap
starts, the scheduler and the nannies run in this process, on the cluster's
event loop, so two hooks there can tie one to the other:

* a scheduler plugin notes, as each worker registers, which nanny runs it;
* each nanny notes its worker process's exit code as the process ends.

A nanny runs one worker process at a time, and notes its exit before it
starts the next, so the exit code of the worker at an address is the first
that its nanny noted after that worker registered. (The nanny's own idea of
its worker's address is no use: a worker that dies just after it starts,
as a crashing item rerun alone often does, is gone before its nanny has
read the address.)

The nanny's hook is its exit callback, which distributed does not promise
to keep: without it no exit code is known, and the error says only that the
worker died. This module imports ``distributed``: it is imported only when a
cluster is started.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any

import distributed
from distributed.diagnostics.plugin import SchedulerPlugin

__all__ = ["Nanny", "watch_registrations", "worker_exit_code"]

# Bounds on what is kept: registrations and exits of clusters long closed
# are never asked for again, and a worker's address (with its port) is not
# soon reused.
_KEPT_WORKERS = 256
_KEPT_NANNIES = 64
_KEPT_EXITS_PER_NANNY = 8

_changed = threading.Condition()
_seq = 0  # orders registrations and exits (all on event loop threads of this process)
_nanny_of: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()  # worker -> (nanny, seq)
_exits: collections.OrderedDict[str, list[tuple[int, int]]] = collections.OrderedDict()  # nanny -> [(seq, code)]


def _registered(worker: str, nanny: str) -> None:
    global _seq
    with _changed:
        _seq += 1
        _nanny_of[worker] = (nanny, _seq)
        while len(_nanny_of) > _KEPT_WORKERS:
            _nanny_of.popitem(last=False)


def _exited(nanny: str, exitcode: int) -> None:
    global _seq
    with _changed:
        _seq += 1
        exits = _exits.setdefault(nanny, [])
        _exits.move_to_end(nanny)
        exits.append((_seq, exitcode))
        del exits[:-_KEPT_EXITS_PER_NANNY]
        while len(_exits) > _KEPT_NANNIES:
            _exits.popitem(last=False)
        _changed.notify_all()


def worker_exit_code(worker: str, wait: float) -> int | None:
    """The exit code of the worker process that served at address ``worker``,
    if its nanny tells within ``wait`` seconds (the scheduler may hear of the
    death first); ``None`` at once for a worker never seen to register."""
    deadline = time.monotonic() + wait
    with _changed:
        registration = _nanny_of.get(worker)
        if registration is None:
            return None  # a worker registers before it is given any task
        nanny, since = registration
        while True:
            for seq, exitcode in _exits.get(nanny, ()):
                if seq > since:
                    return exitcode
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            _changed.wait(left)


class _Registrations(SchedulerPlugin):  # type: ignore[misc]
    name = "parmap-worker-registrations"

    def add_worker(self, scheduler: Any, worker: str) -> None:
        state = scheduler.workers.get(worker)
        if state is not None and state.nanny:
            _registered(worker, state.nanny)


async def _watch(scheduler: Any) -> None:
    scheduler.add_plugin(_Registrations(), idempotent=True)
    for worker, state in scheduler.workers.items():  # registered before the plugin
        if state.nanny:
            _registered(worker, state.nanny)


def watch_registrations(cluster: Any) -> None:
    """Note which nanny runs each worker of ``cluster`` (a ``LocalCluster``
    started with :class:`Nanny`), from now on and for those already there."""
    with contextlib.suppress(Exception):  # no exit codes then, nothing worse
        cluster.sync(_watch, cluster.scheduler)


class Nanny(distributed.Nanny):  # type: ignore[misc]
    """A ``distributed.Nanny`` that notes how each worker process it ran ended."""

    def _on_worker_exit_sync(self, exitcode: int | None) -> None:
        if exitcode is not None:
            with contextlib.suppress(Exception):  # never in the way of the nanny's restart
                _exited(self.address, exitcode)
        super()._on_worker_exit_sync(exitcode)  # type: ignore[no-untyped-call]
