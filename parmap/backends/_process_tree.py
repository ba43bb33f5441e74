"""Stopping a worker together with every process it started.

A worker killed mid-item (a ``timeout``, a call that raised or was
interrupted, ``terminate()``) leaves the commands its ``fn`` was running
(``subprocess.run(["ffmpeg", ...])``) to the init process, still running:
orphans of the call, which the SPEC says never outlive it. So the whole
tree goes: first frozen (SIGSTOP) from the worker down, so that nothing in
it can start more while the rest is found, then killed.

Linux only, where ``/proc`` names each process's parent; elsewhere just the
worker is signalled, as before. A process that left the tree before the
kill (a daemon that double-forked to the init process) is not found.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

# A tree that keeps forking while it is frozen gets this many looks (each a
# pass over /proc, ~1 ms); depth costs none: one look walks the whole tree.
FREEZE_ROUNDS = 50


def kill_trees(roots: Iterable[int], sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to each worker in ``roots`` and SIGKILL to every process
    it started that is still its descendant.

    ``roots`` must be children of this process not yet reaped, so that their
    pids are still theirs. A worker sent a signal other than SIGKILL is
    woken (SIGCONT) after it, so the signal lands as it would have.
    """
    roots = _own_children(roots)
    for pid in roots:
        _send(pid, signal.SIGSTOP)  # first: a frozen worker starts nothing more
    kill_frozen(freeze_descendants(roots))
    for pid in roots:
        _send(pid, sig)
        if sig != signal.SIGKILL:
            _send(pid, signal.SIGCONT)


def freeze_descendants(roots: Iterable[int]) -> list[int]:
    """SIGSTOP every process that the workers in ``roots`` started (and those
    started), and return them, for :func:`kill_frozen` once the workers are
    gone. The workers themselves run on: a worker waiting for a frozen
    command waits on, and starts nothing more. A frozen process keeps its
    pid, even when its parent dies, so the kill reaches the same ones."""
    seen = set(_own_children(roots))
    frozen: list[int] = []
    for _ in range(FREEZE_ROUNDS):
        children = _children_by_parent()
        if children is None:
            break
        found: list[int] = []
        stack = list(seen)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in seen:
                    seen.add(child)
                    found.append(child)
                    stack.append(child)
        if not found:
            break  # a look after the last freeze found no newcomer
        for pid in found:
            _send(pid, signal.SIGSTOP)
        frozen += found
    return frozen


def kill_frozen(pids: Iterable[int]) -> None:
    """SIGKILL what :func:`freeze_descendants` froze."""
    for pid in pids:
        _send(pid, signal.SIGKILL)


def _own_children(pids: Iterable[int]) -> list[int]:
    return [pid for pid in dict.fromkeys(pids) if pid > 1 and pid != os.getpid()]


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _children_by_parent() -> dict[int, list[int]] | None:
    """Every process's children, from one pass over ``/proc``; None without it."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    children: dict[int, list[int]] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    return children
