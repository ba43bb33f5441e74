"""The byte stream between the parent and one of its own worker processes.

Control messages (a chunk's header, the function) go through the
:class:`~multiprocessing.connection.Connection` API. The two payloads that
can be megabytes, a chunk's items and its outcome, are *framed* instead: a
length, then the pickler's parts handed to the kernel in one vectored write
(never joined into one copy), read on the far side straight into one buffer
(no growing ``BytesIO``). Benchmark W5in (200 x 1 MiB ``bytes`` items)
takes about half the time it took as ``send_bytes`` messages.

Where vectored I/O is missing (Windows), the payload is an ordinary
``send_bytes`` message instead; both ends make the same choice.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, Pipe

from ._chunking import MAX_CHUNK_BYTES

# Room in each direction of a worker's socket for one whole chunk, so the
# dispatcher hands a chunk to the kernel and moves on to the next worker
# instead of waiting, ~200 KiB at a time, for this one to read it (halves
# benchmark W5in here). Linux caps it at net.core.wmem_max and charges only
# for bytes actually queued.
SOCKET_BUFFER_BYTES = MAX_CHUNK_BYTES

# Parts per writev call: far below any platform's IOV_MAX (1024 on Linux).
_PARTS_PER_WRITE = 256

# How long the rest of a payload may keep the reader waiting before it asks
# whether the sender is still alive (see recv_framed): a live one is waited
# for as long as it takes.
STALL_SECONDS = 1.0

_VECTORED = hasattr(os, "writev") and hasattr(os, "readv")
_LENGTH = struct.Struct("!Q")


def worker_pipe() -> tuple[Connection, Connection]:
    """A duplex connection to one worker whose send buffers hold a chunk."""
    ends = Pipe(duplex=True)
    for end in ends:
        try:
            sock = socket.socket(fileno=end.fileno())
        except OSError:
            continue  # not a socket (Windows pipes): only speed is lost
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        except OSError:
            pass
        finally:
            sock.detach()  # the Connection keeps owning the descriptor
    return ends


def send_room(conn: Connection) -> int:
    """Bytes that a write to ``conn`` can always hand to the kernel while the
    other end reads nothing: a quarter of the send buffer, leaving room for
    the kernel's own bookkeeping per packet. 0 where it cannot be asked."""
    try:
        sock = socket.socket(fileno=conn.fileno())
    except OSError:
        return 0
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 4
    except OSError:
        return 0
    finally:
        sock.detach()


def send_framed(conn: Connection, parts: Sequence[bytes]) -> None:
    """Send ``parts`` as one payload, read whole by :func:`recv_framed`."""
    if not _VECTORED:
        conn.send_bytes(b"".join(parts))
        return
    views = [memoryview(part) for part in parts if part]
    size = sum(view.nbytes for view in views)
    views.insert(0, memoryview(_LENGTH.pack(size)))
    fd = conn.fileno()
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _PARTS_PER_WRITE])
        # A blocking socket may still take only part (a signal, a full buffer).
        while written and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]


def recv_framed(conn: Connection, sender_alive: Callable[[], bool] | None = None) -> bytes | bytearray:
    """One payload sent by :func:`send_framed`.

    ``sender_alive``: asked whenever the rest of a payload is slow to come.
    A sender that died halfway leaves end-of-file only once every copy of its
    end is closed, and a process forked meanwhile (by the program, say) may
    hold one for as long as it lives: the read would wait for it.
    """
    if not _VECTORED:
        return conn.recv_bytes()
    fd = conn.fileno()
    (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, sender_alive, first=True))
    return _read_exactly(fd, size, sender_alive, first=False)


def _read_exactly(fd: int, size: int, sender_alive: Callable[[], bool] | None, *, first: bool) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        # The first read of a payload's length needs no look: poll() said so.
        if sender_alive is not None and (got or not first) and not _readable(fd, STALL_SECONDS):
            if not sender_alive():
                raise EOFError("the sender died in the middle of a payload")
            continue
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the connection closed in the middle of a payload")
        got += n
    return buffer


def _readable(fd: int, timeout: float) -> bool:
    if not hasattr(select, "poll"):  # pragma: no cover - Windows has no readv either
        return bool(select.select([fd], [], [], timeout)[0])
    poller = select.poll()  # not select(): descriptors past 1023 are fine
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000.0))
